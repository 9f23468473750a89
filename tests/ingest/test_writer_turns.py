"""Writers of one SQLite file take turns through a lock file: the inbox of `cjm serve`
and its worker process alternate instead of one starving the other."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from engine.db.database import SqlConnection
from engine.runtime import TurnTakingDatabase


@pytest.fixture
async def database_file(tmp_path: Path, sqlite_template: Path) -> AsyncIterator[Path]:
    path = tmp_path / "cjm.db"
    shutil.copy(sqlite_template, path)
    yield path


@pytest.fixture
def outsider(database_file: Path) -> Iterator[int]:
    """The writers' lock file as another process opens it."""
    descriptor = os.open(f"{database_file}.writers", os.O_RDWR | os.O_CREAT)
    yield descriptor
    os.close(descriptor)


def lock_is_free(descriptor: int) -> bool:
    """Whether no other open file holds a lock on the file (flock, as another process)."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    return True


def database(path: Path) -> TurnTakingDatabase:
    return TurnTakingDatabase(f"sqlite+aiosqlite:///{path}", Path(f"{path}.writers"))


@pytest.fixture
async def two_processes(
    database_file: Path,
) -> AsyncIterator[tuple[TurnTakingDatabase, TurnTakingDatabase]]:
    """The database as two processes open it (each its own lock files)."""
    first, second = database(database_file), database(database_file)
    yield first, second
    await first.close()
    await second.close()


async def write(db: TurnTakingDatabase, entered: asyncio.Event) -> None:
    """A write transaction that sets `entered` once it has the turn."""
    async with db.write():
        entered.set()


async def test_a_write_holds_the_turn_until_it_ends(database_file: Path, outsider: int) -> None:
    db = database(database_file)
    try:
        async with db.write() as connection:
            await connection.execute(text("DELETE FROM events"))
            assert not lock_is_free(outsider)
        assert lock_is_free(outsider)
    finally:
        await db.close()


async def test_a_plain_sql_write_holds_the_turn_until_it_ends(
    database_file: Path, outsider: int
) -> None:
    db = database(database_file)
    held: list[bool] = []

    async def work(connection: SqlConnection) -> None:
        await connection.exec_driver_sql("DELETE FROM events")
        held.append(not lock_is_free(outsider))

    try:
        await db.write_sql(work)
        assert held == [True]
        assert lock_is_free(outsider)
    finally:
        await db.close()


async def test_a_writer_waits_for_the_turn_of_another(
    two_processes: tuple[TurnTakingDatabase, TurnTakingDatabase], outsider: int
) -> None:
    first, second = two_processes
    entered = asyncio.Event()
    async with first.write():
        waiting = asyncio.create_task(write(second, entered))
        await asyncio.sleep(0.2)
        assert not entered.is_set()
    await asyncio.wait_for(waiting, 30)  # liveness only
    assert entered.is_set()
    assert lock_is_free(outsider)


async def test_a_writer_cancelled_while_waiting_leaves_the_turn_free(
    two_processes: tuple[TurnTakingDatabase, TurnTakingDatabase], outsider: int
) -> None:
    first, second = two_processes
    async with first.write():
        waiting = asyncio.create_task(write(second, asyncio.Event()))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    # The waiting thread takes the turn, then gives it back: free for a second
    # running, not once only (a check may come before the thread woke up).
    free_in_a_row = 0
    for _ in range(600):
        free_in_a_row = free_in_a_row + 1 if lock_is_free(outsider) else 0
        if free_in_a_row == 20:
            break
        await asyncio.sleep(0.05)
    assert free_in_a_row == 20, "the turn stayed taken after its waiter was cancelled"


async def test_a_writer_sees_a_writer_of_another_process_waiting(
    two_processes: tuple[TurnTakingDatabase, TurnTakingDatabase],
) -> None:
    first, second = two_processes
    entered = asyncio.Event()
    async with first.write():
        assert not first.others_wait()
        waiting = asyncio.create_task(write(second, entered))
        seen = False
        for _ in range(100):  # until the second's thread waits for the turn
            await asyncio.sleep(0.02)
            if seen := first.others_wait():
                break
        assert seen, "the writer waiting in another process was not seen"
        assert not entered.is_set()
        assert first.writers == 1  # not one of this process's own
    await asyncio.wait_for(waiting, 30)
    async with first.write():
        assert not first.others_wait()  # the wait ended with the second's turn
