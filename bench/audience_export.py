"""Audience export at scale: rows/s and peak memory of a Meta export and a Google CSV
stream, against a loop that only hashes the same values, at two audience sizes.

Memory must stay flat as the audience grows (pages and stream chunks are bounded);
speed is shown as a ratio to the hash loop measured in the same run, since machines
differ. Run: `.venv/bin/python bench/audience_export.py [N ...]` (default 100000 1000000).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from channels.audiences.export import Cursor, csv_export, meta_page
from channels.audiences.normalize import META_SCHEMA
from engine.db.database import Database
from engine.db.migrate import upgrade
from engine.db.schema import audience_members, counters, leads

AUDIENCE = "bench_visitors"
CHUNK = 20_000
NOW = datetime(2026, 11, 2, tzinfo=UTC)


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
        rows += len(page["data"])
        json.dumps(page)  # what the API sends
        if not page["has_more"]:
            return rows
        cursor = Cursor.decode(page["next_cursor"])


async def google_export(db: Database) -> int:
    export = await csv_export(db, AUDIENCE, Cursor(), google=True, ops=["add"], region=None)
    lines = 0
    async for chunk in export.lines:
        lines += chunk.count("\n")
    return lines - 1


async def measure(run: Callable[[], Awaitable[int]]) -> tuple[int, float, float]:
    """(rows, seconds, peak MiB): timed once plain, then once under tracemalloc for memory."""
    started = time.perf_counter()
    rows = await run()
    seconds = time.perf_counter() - started
    tracemalloc.start()
    await run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return rows, seconds, peak / 2**20


async def bench(size: int) -> list[tuple[str, int, float, float]]:
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}"
        await upgrade(url)
        db = Database(url)
        try:
            await fill(db, size)
            started = time.perf_counter()
            hashed = hash_loop(size)
            floor = time.perf_counter() - started
            results = [("hash loop (floor)", hashed, floor, 0.0)]
            exports: list[tuple[str, Callable[[Database], Awaitable[int]]]] = [
                ("meta export", meta_export),
                ("google csv", google_export),
            ]
            for name, export in exports:
                rows, seconds, peak = await measure(partial(export, db))
                assert rows == size, f"{name} gave {rows} rows of {size}"
                results.append((name, rows, seconds, peak))
            return results
        finally:
            await db.close()


def main() -> None:
    sizes = [int(arg) for arg in sys.argv[1:]] or [100_000, 1_000_000]
    print(f"{'members':>10}  {'what':<18} {'rows/s':>10} {'vs hash loop':>13} {'peak MiB':>9}")
    for size in sizes:
        results = asyncio.run(bench(size))
        floor = results[0][2]
        for name, rows, seconds, peak in results:
            ratio = floor / seconds if seconds else 0.0
            memory = f"{peak:9.1f}" if peak else f"{'-':>9}"
            print(f"{size:>10}  {name:<18} {rows / seconds:>10,.0f} {ratio:>13.2f} {memory}")


if __name__ == "__main__":
    main()
