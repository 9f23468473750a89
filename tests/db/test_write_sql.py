"""`Database.write_sql`: a write transaction of plain SQL, on SQLite run whole in the
driver's thread. Committed when the work returns, rolled back when it raises, on both
databases; on SQLite, work that awaits anything but its statements is refused."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from engine.db.database import Database, SqlConnection
from engine.db.queries import driver_sql, execute_rows

INSERT_LEAD = "INSERT INTO leads (created_at, updated_at, traits) VALUES (?, ?, '{}') RETURNING id"


async def insert_lead(connection: SqlConnection) -> int:
    result = await connection.exec_driver_sql(driver_sql(connection, INSERT_LEAD), (1, 1))
    [(lead_id,)] = result.fetchall()
    return int(lead_id)


async def lead_ids(db: Database) -> list[int]:
    async with db.read() as connection:
        return list((await connection.scalars(text("SELECT id FROM leads ORDER BY id"))).all())


@pytest.fixture
async def sqlite_db(tmp_path: Path, sqlite_template: Path) -> AsyncIterator[Database]:
    path = tmp_path / "cjm.db"
    shutil.copy(sqlite_template, path)
    database = Database(f"sqlite+aiosqlite:///{path}")
    try:
        yield database
    finally:
        await database.close()


async def test_the_work_is_committed_and_its_result_returned(db: Database) -> None:
    async def work(connection: SqlConnection) -> list[int]:
        return [await insert_lead(connection), await insert_lead(connection)]

    created = await db.write_sql(work)

    assert len(set(created)) == 2
    assert await lead_ids(db) == sorted(created)


async def test_rows_given_as_a_list_are_one_executemany(db: Database) -> None:
    async def work(connection: SqlConnection) -> None:
        await execute_rows(
            connection,
            "INSERT INTO leads (created_at, updated_at, traits) VALUES (?, ?, '{}')",
            [(at, at) for at in range(1, 6)],
        )

    await db.write_sql(work)

    async with db.read() as connection:
        stamps = (await connection.execute(text("SELECT created_at FROM leads"))).scalars().all()
    assert sorted(stamps) == [1, 2, 3, 4, 5]


async def test_work_that_raises_leaves_nothing_and_the_next_write_goes_on(db: Database) -> None:
    class Refused(Exception):
        pass

    async def failing(connection: SqlConnection) -> None:
        await insert_lead(connection)
        raise Refused

    with pytest.raises(Refused):
        await db.write_sql(failing)
    assert await lead_ids(db) == []

    kept = await db.write_sql(insert_lead)
    assert await lead_ids(db) == [kept]


async def test_on_sqlite_the_work_runs_off_the_event_loop_in_one_trip(sqlite_db: Database) -> None:
    """The statements run in the driver's thread, not as awaits on the event loop."""
    loop_thread = threading.get_ident()
    seen: list[int] = []

    async def work(connection: SqlConnection) -> None:
        seen.append(threading.get_ident())
        await insert_lead(connection)
        seen.append(threading.get_ident())

    await sqlite_db.write_sql(work)

    assert len(seen) == 2 and seen[0] == seen[1] != loop_thread


async def test_on_sqlite_work_that_awaits_anything_else_is_refused_and_rolled_back(
    sqlite_db: Database,
) -> None:
    async def wanders(connection: SqlConnection) -> None:
        await insert_lead(connection)
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="awaited something other than"):
        await sqlite_db.write_sql(wanders)
    assert await lead_ids(sqlite_db) == []
    await sqlite_db.write_sql(insert_lead)
    assert len(await lead_ids(sqlite_db)) == 1


async def test_rows_returned_but_never_fetched_are_stored_all_the_same(db: Database) -> None:
    async def work(connection: SqlConnection) -> int:
        result = await connection.exec_driver_sql(
            driver_sql(
                connection,
                "INSERT INTO leads (created_at, updated_at, traits)"
                " VALUES (?, ?, '{}'), (?, ?, '{}'), (?, ?, '{}') RETURNING id",
            ),
            (1, 1, 2, 2, 3, 3),
        )
        return result.rowcount

    assert await db.write_sql(work) == 3
    assert len(await lead_ids(db)) == 3
