"""What every benchmark shares: the machine it ran on, a table that puts cjm beside the
floor of the layer it stands on (measured in the same run, since machines differ and
are noisy), and `bench/results.json`, where each benchmark replaces its own entry.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Elsewhere only for the runs of bench/compare.py, which must not replace the figures here.
RESULTS = Path(os.environ.get("CJM_BENCH_RESULTS") or ROOT / "bench" / "results.json")


@dataclass(frozen=True)
class Figure:
    """One measured line: cjm's figure, the baseline's when there is one, and the target.

    `ratio` is cjm / baseline for rates (higher is better); `met` is None when the
    line only informs (no target of its own).
    """

    what: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_what: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline:
            return None
        return self.value / self.baseline


def machine() -> dict[str, Any]:
    """What the figures ran on: they mean little without it."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gib = 0.0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        first = meminfo.read_text().splitlines()[0]  # MemTotal:  N kB
        memory_gib = round(int(first.split()[1]) / 2**20, 1)
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far, all their threads, from /proc; a
    process that has ended counts nothing."""
    total = 0
    for pid in pids:
        try:
            # utime and stime, the 14th and 15th fields, counted after the parenthesised name.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def postgres_pids() -> list[int]:
    """The PostgreSQL server's processes on this machine (its backends come and go)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except (FileNotFoundError, PermissionError):
                continue
    return pids


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _shown(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def report(benchmark: str, figures: list[Figure], notes: dict[str, Any] | None = None) -> None:
    """Print the table and store it under `benchmark` in bench/results.json."""
    print(f"\n{benchmark}")
    width = max([34, *(len(figure.what) for figure in figures)])
    header = f"  {'what':<{width}} {'cjm':>18} {'baseline':>18} {'ratio':>7}  {'target':<22} met"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for figure in figures:
        ratio = figure.ratio
        met = {True: "yes", False: "NO", None: ""}[figure.met]
        print(
            f"  {figure.what:<{width}} {_shown(figure.value, figure.unit):>18} "
            f"{_shown(figure.baseline, figure.unit):>18} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>7}  {figure.target:<22} {met}"
        )
        if figure.baseline_what:
            print(f"  {'':<{width}} baseline: {figure.baseline_what}")
    saved: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    saved[benchmark] = {
        "ran_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": [{**asdict(figure), "ratio": figure.ratio} for figure in figures],
        **({"notes": notes} if notes else {}),
    }
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")


class Stopwatch:
    """`with Stopwatch() as watch: ...` then `watch.seconds`."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self._started


POSTGRES_SERVER = os.environ.get(
    "CJM_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


async def _autocommit(server_url: str, statement: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


def database_url(server_url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


@contextmanager
def scratch_postgres(server_url: str, name: str, template: str | None = None) -> Iterator[str]:
    """A PostgreSQL database of the benchmark's own (a copy of `template` if given),
    dropped on leaving; the server's other databases are never touched."""
    import asyncio

    asyncio.run(_autocommit(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    copy = f' TEMPLATE "{template}"' if template else ""
    asyncio.run(_autocommit(server_url, f'CREATE DATABASE "{name}"{copy}'))
    try:
        yield database_url(server_url, name)
    finally:
        asyncio.run(_autocommit(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
