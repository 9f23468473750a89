"""Audience export at scale: rows/s and peak memory of a Meta export and a Google CSV
stream, against a loop that only hashes the same values, at two audience sizes.

Speed is a ratio to the hash loop measured in the same run, since machines differ: the
Meta export must keep at least half its pace (the Google CSV is shown beside it). As
in a running cjm, the members' identifiers are normalised and hashed ahead, as the
audience job does when they join (channels/audiences/identities.py); that step's own
rate is shown first, against the same loop.
Memory must stay flat as the audience grows, since pages and stream chunks are
bounded: the larger audience's peak (Python's allocations, traced) under twice the
smaller's.

Run: `.venv/bin/python bench/audience_export.py [N ...]` (default 100000 1000000).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from harness import Figure, Stopwatch, report
from sqlalchemy import insert

from channels.audiences.export import Cursor, csv_export, meta_page
from channels.audiences.identities import refresh_identities
from channels.audiences.normalize import META_SCHEMA
from engine.db.database import Database
from engine.db.migrate import upgrade
from engine.db.schema import audience_members, counters, leads

AUDIENCE = "bench_visitors"
CHUNK = 20_000
NOW = datetime(2026, 11, 2, tzinfo=UTC)
META, GOOGLE = "Meta export", "Google CSV"
AHEAD = "identifiers hashed ahead (audience job)"
SPEED_TARGET = 0.5  # of the hash loop's rows/s
FLAT_WITHIN = 2  # the larger audience's peak memory, at most this many times the smaller's


def traits(number: int) -> dict[str, Any]:
    return {
        "email": f" Lead.{number}@Example.com",
        "phone": f"+1 415 555 {number % 10_000:04d}",
        "first_name": "Sample",
        "last_name": f"Lead-{number}",
        "city": "San Francisco",
        "state": "CA",
        "zip": "94107-1234",
        "country": "US",
    }


async def fill(db: Database, size: int) -> None:
    for start in range(0, size, CHUNK):
        numbers = range(start + 1, min(start + CHUNK, size) + 1)
        async with db.write() as connection:
            await connection.execute(
                insert(leads),
                [
                    {
                        "id": n,
                        "created_at": NOW,
                        "updated_at": NOW,
                        "traits": traits(n),
                        "email": f"lead.{n}@example.com",
                    }
                    for n in numbers
                ],
            )
            await connection.execute(
                insert(audience_members),
                [
                    {
                        "audience": AUDIENCE,
                        "lead_id": n,
                        "journey_id": "bench",
                        "added_at": NOW,
                        "seq": n,
                    }
                    for n in numbers
                ],
            )
    async with db.write() as connection:
        await connection.execute(insert(counters), [{"name": "audience_changes", "value": size}])


def hash_loop(size: int) -> int:
    """The floor: SHA-256 of eight already-normalised values per row, nothing else."""
    rows = 0
    for n in range(1, size + 1):
        values = (
            f"lead.{n}@example.com",
            f"1415555{n % 10_000:04d}",
            "sample",
            f"lead{n}",
            "sanfrancisco",
            "ca",
            "94107",
            "us",
        )
        row = [hashlib.sha256(value.encode()).hexdigest() for value in values]
        rows += len(row) == len(META_SCHEMA)
    return rows


async def meta_export(db: Database) -> int:
    rows, cursor = 0, Cursor()
    while True:
        page = await meta_page(db, AUDIENCE, cursor, 10_000, None)
        rows += len(page.rows)
        page.json()  # what the API sends
        if not page.has_more:
            return rows
        cursor = Cursor.decode(page.next_cursor)


async def google_export(db: Database) -> int:
    export = await csv_export(db, AUDIENCE, Cursor(), google=True, ops=["add"], region=None)
    lines = 0
    async for chunk in export.lines:
        lines += chunk.count("\n")
    return lines - 1


async def measure(run: Callable[[], Awaitable[int]]) -> tuple[int, float, float]:
    """(rows, seconds, peak MiB): timed once plain, then once under tracemalloc for memory."""
    with Stopwatch() as watch:
        rows = await run()
    tracemalloc.start()
    await run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return rows, watch.seconds, peak / 2**20


@dataclass(frozen=True)
class Export:
    """One export at one audience size: its rows/s, the hash loop's, and its peak memory."""

    name: str
    size: int
    rows_per_s: float
    floor_rows_per_s: float
    peak_mib: float


async def bench(size: int) -> list[Export]:
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}"
        await upgrade(url)
        db = Database(url)
        try:
            await fill(db, size)
            # What the audience job does as members join: their rows hashed ahead.
            with Stopwatch() as ahead:
                hashed_ahead = await refresh_identities(db, range(1, size + 1), None)
            assert hashed_ahead == size, f"{hashed_ahead} of {size} leads hashed ahead"
            with Stopwatch() as floor:
                hashed = hash_loop(size)
            assert hashed == size, f"the hash loop gave {hashed} rows of {size}"
            exports: list[tuple[str, Callable[[Database], Awaitable[int]]]] = [
                (META, meta_export),
                (GOOGLE, google_export),
            ]
            results = [Export(AHEAD, size, size / ahead.seconds, size / floor.seconds, 0.0)]
            for name, export in exports:
                rows, seconds, peak = await measure(partial(export, db))
                assert rows == size, f"{name} gave {rows} rows of {size}"
                results.append(Export(name, size, rows / seconds, size / floor.seconds, peak))
            return results
        finally:
            await db.close()


def speed(export: Export) -> Figure:
    """Rows/s beside the hash loop's; only the Meta export has a target."""
    meta = export.name == META
    return Figure(
        f"{export.name}, {export.size:,} members",
        export.rows_per_s,
        "rows/s",
        baseline=export.floor_rows_per_s,
        baseline_what="a loop that only hashes the same values" if meta else "",
        target=f">= {SPEED_TARGET} x hash loop" if meta else "",
        met=export.rows_per_s >= SPEED_TARGET * export.floor_rows_per_s if meta else None,
    )


def flatness(small: Export, large: Export) -> Figure:
    """The larger audience's peak memory beside the smaller's: flat when under
    FLAT_WITHIN times it, however many more members there are."""
    return Figure(
        f"{large.name} peak at {large.size:,}",
        large.peak_mib,
        "MiB",
        baseline=small.peak_mib,
        baseline_what=f"its peak at {small.size:,} members; ratio: how many times that",
        target=f"< {FLAT_WITHIN} x the smaller",
        met=large.peak_mib < FLAT_WITHIN * small.peak_mib,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[100_000, 1_000_000])
    sizes = sorted(parser.parse_args().sizes)
    results = [asyncio.run(bench(size)) for size in sizes]
    figures = [speed(export) for exports in results for export in exports]
    exports = [[export for export in run if export.name != AHEAD] for run in results]
    figures += [
        Figure(f"{export.name} peak at {export.size:,}", export.peak_mib, "MiB")
        for export in exports[0]
    ]
    if len(exports) > 1:
        figures += [
            flatness(small, large) for small, large in zip(exports[0], exports[-1], strict=True)
        ]
    report("audience_export", figures)


if __name__ == "__main__":
    main()
