"""`Database.write_sql`: a write transaction of plain SQL, on SQLite run whole in the
driver's thread. Committed when the work returns, rolled back when it raises, on both
databases; on SQLite, work that awaits anything but its statements is refused.

`Database.within_write`: plain SQL inside a `write()` transaction under way, on SQLite
in one trip to the driver's thread: part of that transaction, whatever ends it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from engine.db import database
from engine.db.database import Database, SqlConnection
from engine.db.queries import driver_sql, execute_rows

INSERT_LEAD = "INSERT INTO leads (created_at, updated_at, traits) VALUES (?, ?, '{}') RETURNING id"


async def insert_lead(connection: SqlConnection) -> int:
    result = await connection.exec_driver_sql(driver_sql(connection, INSERT_LEAD), (1, 1))
    [(lead_id,)] = result.fetchall()
    return int(lead_id)


class Refused(Exception):
    pass


async def count_leads(connection: SqlConnection) -> int:
    [(count,)] = (await connection.exec_driver_sql("SELECT count(*) FROM leads")).fetchall()
    return int(count)


async def insert_then_refuse(connection: SqlConnection) -> None:
    await insert_lead(connection)
    raise Refused


async def insert_then_wander(connection: SqlConnection) -> None:
    """Awaits something other than its statements, which SQLite's thread cannot run."""
    await insert_lead(connection)
    await asyncio.sleep(0)


def insert_noting_threads(seen: list[int]) -> Callable[[SqlConnection], Awaitable[None]]:
    """Work that inserts a lead, noting the thread it ran on before and after."""

    async def work(connection: SqlConnection) -> None:
        seen.append(threading.get_ident())
        await insert_lead(connection)
        seen.append(threading.get_ident())

    return work


async def lead_ids(db: Database) -> list[int]:
    async with db.read() as connection:
        return list((await connection.scalars(text("SELECT id FROM leads ORDER BY id"))).all())


async def write_held_open(db: Database, release: asyncio.Event) -> asyncio.Task[int]:
    """A write that stores a lead, then waits for `release` inside its transaction; the
    task, once it is inside."""
    inside = asyncio.Event()

    async def write() -> int:
        async with db.write() as connection:
            lead_id = await insert_lead(connection)
            inside.set()
            await release.wait()
            return lead_id

    task = asyncio.create_task(write())
    await asyncio.wait_for(inside.wait(), 10)
    return task


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
    with pytest.raises(Refused):
        await db.write_sql(insert_then_refuse)
    assert await lead_ids(db) == []

    kept = await db.write_sql(insert_lead)
    assert await lead_ids(db) == [kept]


async def test_on_sqlite_the_work_runs_off_the_event_loop_in_one_trip(sqlite_db: Database) -> None:
    """The statements run in the driver's thread, not as awaits on the event loop."""
    loop_thread = threading.get_ident()
    seen: list[int] = []

    await sqlite_db.write_sql(insert_noting_threads(seen))

    assert len(seen) == 2 and seen[0] == seen[1] != loop_thread


async def test_on_sqlite_work_that_awaits_anything_else_is_refused_and_rolled_back(
    sqlite_db: Database,
) -> None:
    with pytest.raises(RuntimeError, match="awaited something other than"):
        await sqlite_db.write_sql(insert_then_wander)
    assert await lead_ids(sqlite_db) == []
    await sqlite_db.write_sql(insert_lead)
    assert len(await lead_ids(sqlite_db)) == 1


async def test_work_within_a_write_sees_its_transaction_and_commits_with_it(db: Database) -> None:
    async with db.write() as connection:
        before = await insert_lead(connection)
        seen = await db.within_write(connection, count_leads)
        within = await db.within_write(connection, insert_lead)
        after = await insert_lead(connection)

    assert seen == 1  # the row written before it, not committed yet
    assert await lead_ids(db) == sorted([before, within, after])


async def test_work_within_a_write_rolls_back_with_it(db: Database) -> None:
    with pytest.raises(Refused):
        async with db.write() as connection:
            await db.within_write(connection, insert_lead)
            raise Refused
    assert await lead_ids(db) == []

    with pytest.raises(Refused):
        async with db.write() as connection:
            await insert_lead(connection)
            await db.within_write(connection, insert_then_refuse)
    assert await lead_ids(db) == []

    kept = await db.write_sql(insert_lead)
    assert await lead_ids(db) == [kept]


async def test_on_sqlite_work_within_a_write_runs_off_the_event_loop(sqlite_db: Database) -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    async with sqlite_db.write() as connection:
        await sqlite_db.within_write(connection, insert_noting_threads(seen))

    assert len(seen) == 2 and seen[0] == seen[1] != loop_thread
    assert len(await lead_ids(sqlite_db)) == 1


async def test_on_sqlite_work_within_anything_but_the_write_under_way_is_refused(
    sqlite_db: Database,
) -> None:
    async with sqlite_db.read() as connection:
        with pytest.raises(RuntimeError, match="needs the write transaction"):
            await sqlite_db.within_write(connection, insert_lead)

    with pytest.raises(RuntimeError, match="awaited something other than"):
        async with sqlite_db.write() as connection:
            await sqlite_db.within_write(connection, insert_then_wander)
    assert await lead_ids(sqlite_db) == []


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


async def test_a_write_cancelled_half_way_leaves_nothing_and_the_next_ones_go_on(
    db: Database,
) -> None:
    """A task cancelled inside its transaction (a shutdown, a timeout) gives the writer
    back rolled back: the writes after it, of either kind, are neither refused nor
    part of its transaction."""
    task = await write_held_open(db, asyncio.Event())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    assert await lead_ids(db) == []
    kept = [await asyncio.wait_for(db.write_sql(insert_lead), 10)]
    async with db.write() as connection:
        kept.append(await insert_lead(connection))
    assert await lead_ids(db) == sorted(kept)


async def test_on_sqlite_a_writer_connection_given_up_is_replaced(sqlite_db: Database) -> None:
    """SQLAlchemy invalidates a connection it can no longer trust; the writer, held for
    the process's life, is then opened again for the next write."""
    with contextlib.suppress(Exception):
        async with sqlite_db.write() as connection:
            await insert_lead(connection)
            await connection.invalidate()

    assert await lead_ids(sqlite_db) == []
    kept = await sqlite_db.write_sql(insert_lead)
    async with sqlite_db.write() as connection:
        also = await insert_lead(connection)
    assert await lead_ids(sqlite_db) == [kept, also]


async def test_on_sqlite_closing_lets_a_write_under_way_end_first(sqlite_db: Database) -> None:
    finish = asyncio.Event()
    writing = await write_held_open(sqlite_db, finish)
    closing = asyncio.create_task(sqlite_db.close())
    await asyncio.sleep(0.05)
    finish.set()
    kept = await asyncio.wait_for(writing, 10)
    await asyncio.wait_for(closing, 10)

    reopened = Database(sqlite_db.url)
    try:
        assert await lead_ids(reopened) == [kept]
    finally:
        await reopened.close()


async def test_on_sqlite_closing_does_not_wait_forever_for_a_write(
    sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(database, "CLOSE_WAIT_S", 0.1)
    writing = await write_held_open(sqlite_db, asyncio.Event())  # never released

    await asyncio.wait_for(sqlite_db.close(), 10)

    writing.cancel()
    with contextlib.suppress(BaseException):
        await writing
