"""bench/compare.py: a revision against this checkout, in alternated runs, each side
from its own tree, and nothing left behind."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def test_a_revision_is_compared_in_alternated_runs_from_a_tree_of_its_own() -> None:
    results = ROOT / "bench" / "results.json"
    kept = results.read_bytes() if results.exists() else None
    worktrees = _git("worktree", "list")

    done = subprocess.run(
        [sys.executable, "bench/compare.py", "--pairs", "2", "HEAD", "step.py", "--leads", "200"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    tree = re.match(r"HEAD in (\S+): ", lines[0])
    assert tree is not None, lines[0]
    # The order flips every pair.
    runs = [line.split(":")[0].strip() for line in lines if line.startswith("  ")]
    assert runs == ["this checkout", "HEAD", "HEAD", "this checkout"]
    # Every figure of both sides, the median of each, and their ratio.
    row = next(line for line in lines if line.startswith("step: advance() per lead"))
    cells = re.split(r"\s{2,}", row)
    ours, theirs = (
        [float(value.replace(",", "")) for value in cell.split(", ")] for cell in cells[1:3]
    )
    assert len(ours) == len(theirs) == 2
    # Of the values as printed, to two decimals: the medians to a cent, the ratio to 0.001.
    mine, other = statistics.median(ours), statistics.median(theirs)
    shown = [float(median.replace(",", "")) for median in cells[3].split(" / ")]
    assert shown == pytest.approx([mine, other], abs=0.011)
    assert float(cells[4]) == pytest.approx(mine / other, abs=0.0011)
    assert any(
        line.startswith("step: step(), compiled") and ", to its baseline (x)" in line
        for line in lines
    )
    # Nothing left: the worktree is gone, and bench/results.json is as it was.
    assert not Path(tree.group(1)).exists()
    assert _git("worktree", "list") == worktrees
    assert (results.read_bytes() if results.exists() else None) == kept


def test_a_revision_that_is_not_one_is_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "bench/compare.py", "no-such-revision", "step.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "git rev-parse --verify no-such-revision^{commit} failed" in done.stderr
