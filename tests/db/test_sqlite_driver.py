"""Statements on SQLite run in one trip to the driver's thread, with the results and
errors SQLAlchemy's own adapter gives."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.database import Database

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("body", String(32), nullable=False, unique=True),
)


@pytest.fixture
async def db(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[Database]:
    path = tmp_path / "cjm.db"
    shutil.copy(sqlite_template, path)
    database = Database(f"sqlite+aiosqlite:///{path}")
    async with database.write() as connection:
        await connection.run_sync(metadata.create_all)
    try:
        yield database
    finally:
        await database.close()


class Trips:
    """Counts the calls handed to an aiosqlite connection's thread."""

    def __init__(self, driver: Any) -> None:
        self.count = 0
        handed = driver._execute

        async def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await handed(function, *args, **kwargs)

        driver._execute = counted

    async def of(self, statement: Any) -> int:
        """The trips `await statement` takes."""
        before = self.count
        await statement
        return self.count - before


async def trips_on(connection: AsyncConnection) -> Trips:
    return Trips((await connection.get_raw_connection()).driver_connection)


async def test_each_statement_is_one_trip_to_the_driver_thread(db: Database) -> None:
    async with db.write() as connection:
        trips = await trips_on(connection)
        rows = [{"body": f"note {n}"} for n in range(3)]

        assert await trips.of(connection.execute(insert(notes), rows)) == 1
        assert await trips.of(connection.execute(select(notes))) == 1
        assert await trips.of(connection.execute(update(notes).values(body=notes.c.body))) == 1
        assert await trips.of(connection.exec_driver_sql("SELECT count(*) FROM notes")) == 1
    async with db.read() as connection:
        trips = await trips_on(connection)
        assert await trips.of(connection.execute(select(notes.c.id))) == 1


async def test_rows_counts_and_keys_are_what_sqlite_gives(db: Database) -> None:
    async with db.write() as connection:
        many = await connection.execute(insert(notes), [{"body": "a"}, {"body": "b"}])
        one = await connection.execute(insert(notes).values(body="c"))
        changed = await connection.execute(
            update(notes).where(notes.c.body != "a").values(body=notes.c.body + "!")
        )
        returned = await connection.execute(
            update(notes).where(notes.c.body == "a").values(body="A").returning(notes.c.id)
        )
        listed = await connection.execute(select(notes.c.id, notes.c.body).order_by(notes.c.id))

        assert many.rowcount == 2 and not many.returns_rows
        assert one.inserted_primary_key == (3,)
        assert changed.rowcount == 2
        assert returned.all() == [(1,)]
        assert [tuple(row) for row in listed] == [(1, "A"), (2, "b!"), (3, "c!")]
        # A result read in part gives the rest after, and nothing once read.
        again = await connection.execute(select(notes.c.body).order_by(notes.c.id))
        assert again.fetchone() == ("A",)
        assert again.fetchmany(5) == [("b!",), ("c!",)]
        assert again.fetchall() == []


async def test_errors_are_sqlalchemys_and_leave_the_transaction_usable(db: Database) -> None:
    async with db.write() as connection:
        await connection.execute(insert(notes).values(body="kept"))
    with pytest.raises(IntegrityError, match=r"UNIQUE constraint failed: notes\.body"):
        async with db.write() as connection:
            await connection.execute(insert(notes).values(body="lost"))
            await connection.execute(insert(notes).values(body="kept"))
    with pytest.raises(OperationalError, match="no such table: nowhere"):
        async with db.write() as connection:
            await connection.execute(text("SELECT * FROM nowhere"))
    async with db.write() as connection:  # the held writer goes on
        await connection.execute(insert(notes).values(body="after"))
    async with db.read() as connection:
        bodies = (await connection.execute(select(notes.c.body).order_by(notes.c.id))).scalars()
        assert bodies.all() == ["kept", "after"]


async def test_streamed_results_arrive_whole(db: Database) -> None:
    async with db.write() as connection:
        await connection.execute(insert(notes), [{"body": f"note {n:04}"} for n in range(2_500)])
    async with db.read() as connection:
        streamed = await connection.stream(select(notes.c.body).order_by(notes.c.id))
        bodies = [body async for (body,) in streamed]
    assert bodies == [f"note {n:04}" for n in range(2_500)]
