"""This checkout against an earlier revision, on one benchmark, in alternated runs.

On a shared machine one run of each side says little: the same code swings by a
fifth from one hour to the next. What does say something is runs of the two sides
taken in turn, in the same minutes, with the order flipped every pair. This does
that, and checks what a comparison by hand easily gets wrong:

- the revision runs from a git worktree of its own, with this checkout's `bench/`
  copied in, so both sides run the same benchmark and only the engine differs;
- its pure core runs compiled when this checkout's does: the compiled modules are
  copied when its core's sources are the same, else built there (setup.py);
- each side is checked to import its own `engine` before anything runs;
- the runs write their tables to files of their own, never over bench/results.json.

Run: `.venv/bin/python bench/compare.py [--pairs N] REV BENCHMARK [ARGS...]`, e.g.
`.venv/bin/python bench/compare.py --pairs 3 HEAD~1 e2e.py 100000 --worker-process`.
It prints each run's figures, then every figure of both sides, their medians, and
the ratio of this checkout's median to the revision's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness import ROOT

CORE = Path("engine", "machine")
THIS = "this checkout"


@dataclass
class Side:
    """One side of the comparison: a tree to run from, and the figures its runs gave."""

    name: str
    root: Path
    # (benchmark, figure) -> (unit, the value of each run, in order)
    figures: dict[tuple[str, str], tuple[str, list[float]]] = field(default_factory=dict)

    def add(self, results: dict[str, object]) -> None:
        for benchmark, table in results.items():
            assert isinstance(table, dict)
            for figure in table["figures"]:
                what = figure["what"].strip()
                self._add((benchmark, what), figure["unit"], figure["value"])
                if figure["ratio"] is not None:  # to the baseline of the same run
                    self._add((benchmark, f"{what}, to its baseline"), "x", figure["ratio"])

    def _add(self, key: tuple[str, str], unit: str, value: float) -> None:
        self.figures.setdefault(key, (unit, []))[1].append(value)


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """A detached worktree of `revision`, removed afterwards."""
    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    parent = Path(tempfile.mkdtemp(prefix="cjm-compare-"))
    tree = parent / commit[:12]
    try:
        git("worktree", "add", "--detach", str(tree), commit)
        yield tree
    finally:
        if tree.exists():
            git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(parent, ignore_errors=True)


def compiled_sources(root: Path) -> dict[str, str] | None:
    """The SHA-256 of each core module built in `root`, or None if it runs interpreted."""
    manifest = root / CORE / "_compiled.py"
    if not manifest.is_file() or not any((root / CORE).glob("*.so")):
        return None
    namespace: dict[str, object] = {}
    exec(manifest.read_text(), namespace)
    sources = namespace["SOURCES"]
    assert isinstance(sources, dict)
    return sources


def prepare(tree: Path) -> str:
    """Put this checkout's benchmarks in `tree` and its core as this checkout runs it:
    compiled if this one's is. What was done, in words."""
    shutil.copytree(
        ROOT / "bench",
        tree / "bench",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "results.json"),
    )
    ours = compiled_sources(ROOT)
    if ours is None:
        return "the core runs interpreted on both sides, as in this checkout"
    theirs = {
        name: hashlib.sha256((tree / CORE / f"{name}.py").read_bytes()).hexdigest()
        for name in ours
        if (tree / CORE / f"{name}.py").is_file()
    }
    if theirs == ours:
        for built in [*(ROOT / CORE).glob("*.so"), ROOT / CORE / "_compiled.py"]:
            shutil.copy2(built, tree / CORE / built.name)
        return "the same core on both sides: its compiled modules copied"
    done = subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"building the revision's core failed:\n{output(done)}")
    return "the revision's core differs: compiled there"


def output(done: subprocess.CompletedProcess[str]) -> str:
    """The end of what a failed command printed, for the error."""
    return (done.stdout[-3000:] + done.stderr[-3000:]).strip()


def environment(root: Path, results: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "CJM_BENCH_RESULTS": str(results)}


def check_imports(side: Side) -> None:
    """That the side's runs import its own engine and its core as prepared."""
    probe = (
        "import engine, channels, engine.machine as core;"
        "print(engine.__file__, channels.__file__, core.COMPILED)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=side.root,
        env=environment(side.root, Path(os.devnull)),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"{side.name}: importing the engine failed:\n{output(done)}")
    engine_file, channels_file, compiled = done.stdout.split()
    for imported in (engine_file, channels_file):
        if not Path(imported).is_relative_to(side.root):
            sys.exit(f"{side.name} imports {imported}, not its own tree {side.root}")
    expected = compiled_sources(ROOT) is not None
    if (compiled == "True") != expected:
        sys.exit(f"{side.name}: the core runs {'' if compiled == 'True' else 'un'}compiled")


def run(side: Side, benchmark: Sequence[str], scratch: Path) -> None:
    results = scratch / "results.json"
    results.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, str(Path("bench") / benchmark[0]), *benchmark[1:]],
        cwd=side.root,
        env=environment(side.root, results),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not results.is_file():
        sys.exit(f"{side.name}: the benchmark failed:\n{output(done)}")
    found = json.loads(results.read_text())
    side.add(found)
    shown = [
        f"{figure['what'].strip()} {figure['value']:,.2f} {figure['unit']}"
        for table in found.values()
        for figure in table["figures"]
    ]
    print(f"  {side.name}: " + "; ".join(shown[:3]) + ("; ..." if len(shown) > 3 else ""))


def order(pair: int, this: Side, base: Side) -> tuple[Side, Side]:
    """Which side runs first in each pair: in turn, so neither always runs after the
    other (a machine warming up, or growing busier, favours one order)."""
    return (this, base) if pair % 2 == 0 else (base, this)


def table(this: Side, base: Side) -> list[tuple[str, str, str, str, str]]:
    """Each figure both sides gave: what, this checkout's runs, the revision's, their
    medians, and this median / the revision's."""
    rows = []
    for key, (unit, ours) in this.figures.items():
        if key not in base.figures:
            continue
        theirs = base.figures[key][1]
        mine, other = statistics.median(ours), statistics.median(theirs)
        ratio = f"{mine / other:.3f}" if other else "-"
        rows.append(
            (
                f"{key[0]}: {key[1]} ({unit})",
                ", ".join(f"{value:,.2f}" for value in ours),
                ", ".join(f"{value:,.2f}" for value in theirs),
                f"{mine:,.2f} / {other:,.2f}",
                ratio,
            )
        )
    return rows


def print_table(rows: list[tuple[str, str, str, str, str]], revision: str) -> None:
    header = ("figure", THIS, revision, "medians", "ratio")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(5)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="runs of each side (default 2)")
    parser.add_argument("revision", help="the git revision to compare with, e.g. HEAD~1")
    parser.add_argument("benchmark", nargs=argparse.REMAINDER, help="e.g. e2e.py 100000")
    args = parser.parse_args()
    if not args.benchmark or not (ROOT / "bench" / args.benchmark[0]).is_file():
        parser.error("name a benchmark of bench/ and its arguments, e.g. e2e.py 100000")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    with worktree(args.revision) as tree, tempfile.TemporaryDirectory() as scratch:
        print(f"{args.revision} in {tree}: {prepare(tree)}")
        this, base = Side(THIS, ROOT), Side(args.revision, tree)
        for side in (this, base):
            check_imports(side)
        for pair in range(args.pairs):
            print(f"pair {pair + 1} of {args.pairs}")
            for side in order(pair, this, base):
                run(side, args.benchmark, Path(scratch))
    print()
    print_table(table(this, base), args.revision)


if __name__ == "__main__":
    main()
