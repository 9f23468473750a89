"""The KPI call at scale: one journey with N leads and about 5·N transitions on SQLite.

The history (leads, runs, transitions, goals) is loaded with raw batched INSERTs, then
counted into the roll-ups by `rebuild` (the same code that backfills an existing
database; the figures of live traffic are kept by the worker as it goes). Then the
KPI report is timed, all time and for one month, against the floor it replaces:
a single GROUP BY over the transitions table for the same journey, which the report
would need at the least if it read the history. Target: well under 200 ms at 1M leads.

Run: `.venv/bin/python bench/kpis.py [leads]` (default 1000000; about 3 minutes).
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from engine.db.database import Database
from engine.db.migrate import upgrade
from engine.db.types import to_micros
from engine.journey import load_journeys
from engine.kpis.report import Period, journey_kpis
from engine.kpis.rollup import rebuild

ROOT = Path(__file__).resolve().parent.parent
START = datetime(2026, 8, 1, tzinfo=UTC)
DAYS = 90
SOURCES = ("google", "facebook", "instagram", "newsletter", "tiktok", None)
CHUNK = 50_000
# The doors journey's likely paths, with how often each is taken: (stage, hours there).
PATHS: tuple[tuple[float, tuple[str, ...]], ...] = (
    (0.30, ("first_contact", "retargeting", "lost")),
    (0.25, ("first_contact", "landing", "nurturing", "customer")),
    (0.20, ("first_contact", "retargeting", "landing", "nurturing", "cooling", "lost")),
    (0.15, ("first_contact", "retargeting", "landing", "nurturing", "cooling", "customer")),
    (0.10, ("first_contact", "landing", "nurturing", "cooling", "lost")),
)


def history(leads: int, seed: int = 7) -> Any:
    """Rows for the lead, enrollment, transition and goal tables, lead by lead."""
    rng = random.Random(seed)
    weights = [weight for weight, _ in PATHS]
    for lead in range(1, leads + 1):
        (path,) = rng.choices([path for _, path in PATHS], weights)
        source = rng.choice(SOURCES)
        at = START + timedelta(days=rng.uniform(0, DAYS))
        entered = at
        moves: list[tuple[str | None, str | None, datetime]] = [(None, path[0], at)]
        for here, there in pairwise(path):
            at += timedelta(hours=rng.expovariate(1 / 30))
            moves.append((here, there, at))
        goals = [at + timedelta(days=k) for k in range(rng.choice((1, 1, 1, 2, 3)))]
        if path[-1] != "customer":
            goals = []
        yield lead, source, entered, path[-1], moves, goals


def load(path: Path, leads: int) -> int:
    """Fill the database with raw batched INSERTs; how many transitions were written."""
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA synchronous=OFF")
    written = 0
    batch: dict[str, list[tuple[Any, ...]]] = {"leads": [], "runs": [], "moves": [], "goals": []}

    def flush() -> None:
        connection.executemany(
            "INSERT INTO leads (id, created_at, updated_at, traits, first_source)"
            " VALUES (?, ?, ?, '{}', ?)",
            batch["leads"],
        )
        connection.executemany(
            "INSERT INTO enrollments (id, lead_id, journey_id, version, entry_no, stage, state,"
            " epoch, entered_at, stage_entered_at, sequences) VALUES (?, ?, 'doors', 1, 1, ?, ?,"
            " 1, ?, ?, '[]')",
            batch["runs"],
        )
        connection.executemany(
            "INSERT INTO transitions (enrollment_id, journey_id, from_stage, to_stage, at, cause)"
            " VALUES (?, 'doors', ?, ?, ?, '{\"type\": \"event\"}')",
            batch["moves"],
        )
        connection.executemany(
            "INSERT INTO goals (enrollment_id, journey_id, message_id, at, value)"
            " VALUES (?, 'doors', ?, ?, ?)",
            batch["goals"],
        )
        connection.commit()
        for rows in batch.values():
            rows.clear()

    for lead, source, entered, last, moves, goals in history(leads):
        t = to_micros(entered)
        batch["leads"].append((lead, t, t, source))
        state = "completed" if last == "lost" else "active"
        batch["runs"].append((lead, lead, last, state, t, to_micros(moves[-1][2])))
        batch["moves"].extend((lead, a, b, to_micros(at)) for a, b, at in moves)
        batch["goals"].extend(
            (lead, f"g{lead}.{k}", to_micros(at), 120.0) for k, at in enumerate(goals)
        )
        written += len(moves)
        if len(batch["leads"]) >= CHUNK:
            flush()
    flush()
    connection.close()
    return written


async def timed(call: Callable[[], Awaitable[Any]], runs: int) -> list[float]:
    seconds = []
    for _ in range(runs):
        began = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - began)
    return seconds


async def bench(leads: int) -> dict[str, Any]:
    journey = load_journeys([ROOT / "journeys" / "doors.yaml"], ROOT / "templates" / "emails")
    doors = journey.sources[0].journey
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kpis.db"
        url = f"sqlite+aiosqlite:///{path}"
        await upgrade(url)
        began = time.perf_counter()
        transitions = load(path, leads)
        loaded = time.perf_counter() - began
        db = Database(url)
        try:
            began = time.perf_counter()
            async with db.write() as connection:
                await rebuild(connection)
            rebuilt = time.perf_counter() - began

            async def report(period: Period) -> None:
                async with db.read() as connection:
                    await journey_kpis(connection, doors, period)

            async def scan() -> None:
                from engine.db.schema import transitions as table

                async with db.read() as connection:
                    await connection.execute(
                        select(table.c.from_stage, table.c.to_stage, func.count())
                        .where(table.c.journey_id == "doors")
                        .group_by(table.c.from_stage, table.c.to_stage)
                    )

            month = Period(date(2026, 9, 1), date(2026, 9, 30))
            await report(Period())  # warm the page cache, as a server that runs would have
            all_time = await timed(lambda: report(Period()), 21)
            one_month = await timed(lambda: report(month), 21)
            floor = await timed(scan, 3)
        finally:
            await db.close()
    return {
        "leads": leads,
        "transitions": transitions,
        "load_s": loaded,
        "rebuild_s": rebuilt,
        "kpis_all_time_ms": statistics.median(all_time) * 1000,
        "kpis_one_month_ms": statistics.median(one_month) * 1000,
        "history_scan_ms": statistics.median(floor) * 1000,
    }


def main() -> None:
    leads = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    found = asyncio.run(bench(leads))
    scan = found["history_scan_ms"]
    print(f"KPIs of one journey: {found['leads']:,} leads, {found['transitions']:,} transitions")
    print(f"  history loaded by raw INSERTs in {found['load_s']:.1f} s")
    print(f"  roll-ups rebuilt from the history in {found['rebuild_s']:.1f} s")
    print(f"{'what':<34} {'median ms':>10} {'vs history scan':>16}")
    for name, key in (
        ("KPI report, all time", "kpis_all_time_ms"),
        ("KPI report, one month", "kpis_one_month_ms"),
        ("GROUP BY over transitions (floor)", "history_scan_ms"),
    ):
        print(f"{name:<34} {found[key]:>10.1f} {found[key] / scan:>16.4f}")
    results = ROOT / "bench" / "results.json"
    saved = json.loads(results.read_text()) if results.exists() else {}
    saved["kpis"] = found
    results.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    main()
