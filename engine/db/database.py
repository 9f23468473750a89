"""Connections to the one database every cjm process shares.

SQLite (the embedded default) allows one writer at a time: writes go through a
single connection, held for the process's life and taken in turns, that starts each
transaction with `BEGIN IMMEDIATE`, so a transaction never fails half-way on a lock,
while reads use their own connections (WAL lets them run beside the writer).
PostgreSQL uses one pool for both; its reads are read-only REPEATABLE READ
transactions.

A write made only of plain SQL to the driver can run as `write_sql(work)`: on SQLite
the whole transaction then runs in the driver's thread, in one trip to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from engine.db.sqlite_driver import one_trip_url

T = TypeVar("T")

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # FULL: a commit is on disk before ingestion answers 200.
    "PRAGMA synchronous=FULL",
    "PRAGMA busy_timeout=30000",
    "PRAGMA foreign_keys=OFF",
    # Deleted rows are overwritten, not left in free pages: an erased person is gone
    # from the file, not just from the tables.
    "PRAGMA secure_delete=ON",
)


# How long a PostgreSQL transaction may sit idle between statements before the server
# ends it: the lease on a worker's claims. A worker that dies closes its connection and
# its claims come back at once; one that hangs, or whose machine drops off the network,
# loses them after this long (or when TCP keepalives find the peer gone), and the lead's
# events go to another worker. A batch spends well under a second between statements.
CLAIM_LEASE_S = 60.0
# How long closing waits for a write transaction under way on SQLite to end.
CLOSE_WAIT_S = 10.0


def _lease_settings(lease_seconds: float) -> dict[str, str]:
    return {
        "idle_in_transaction_session_timeout": str(int(lease_seconds * 1000)),
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "3",
    }


class SqlResult(Protocol):
    """What plain SQL gives back: SQLAlchemy's `CursorResult`, or inside `write_sql` on
    SQLite the statement's rows as sqlite3 gave them."""

    @property
    def rowcount(self) -> int: ...

    def fetchall(self) -> Sequence[Any]: ...


class DialectName(Protocol):
    @property
    def name(self) -> str: ...


class SqlConnection(Protocol):
    """A connection that runs plain SQL in the driver's parameter style: SQLAlchemy's
    `AsyncConnection`, or on SQLite the driver's own connection inside `write_sql`.
    The queries written against this (`engine/db/queries.py`'s driver-level helpers)
    run on either."""

    @property
    def dialect(self) -> DialectName: ...

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> SqlResult: ...


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _sqlite_engine(url: str, *, begin: str, pool_size: int) -> AsyncEngine:
    engine = create_async_engine(
        one_trip_url(url),
        pool_size=pool_size,
        max_overflow=0,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine


def _checkpoint(connection: Connection) -> None:
    # On the driver's connection: a checkpoint runs outside any transaction, and going
    # through SQLAlchemy would begin one first.
    cursor = connection.connection.cursor()
    cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cursor.close()


class Database:
    """The engine's handle on its database: `write()` and `read()` transactions."""

    def __init__(self, url: str, *, lease_seconds: float = CLAIM_LEASE_S) -> None:
        self.url = url
        # Write transactions of this process under way or waiting for their turn.
        self.writers = 0
        self.dialect = make_url(url).get_backend_name()
        if self.dialect == "sqlite":
            self._writer = _sqlite_engine(url, begin="BEGIN IMMEDIATE", pool_size=1)
            self._reader = _sqlite_engine(url, begin="BEGIN", pool_size=4)
            # The one writer connection, checked out of its pool once and kept: a pool
            # checkout and return cost 140 µs of CPU, three times a small transaction.
            # Writers take turns on it by `_sqlite_turn`.
            self._held: tuple[AsyncConnection, Any] | None = None  # and its aiosqlite driver
            self._sqlite_turn = asyncio.Lock()
        elif self.dialect == "postgresql":
            self._writer = create_async_engine(
                url,
                pool_size=10,
                max_overflow=10,
                pool_pre_ping=True,
                json_serializer=_json_dumps,
                json_deserializer=orjson.loads,
                connect_args={"server_settings": _lease_settings(lease_seconds)},
            )
            # One snapshot for a whole read (a lead's page never shows a stage without
            # the history line that led there), and no writes by mistake.
            self._reader = self._writer.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        else:
            raise ValueError(
                f"unsupported database {url!r}: use sqlite+aiosqlite:/// or postgresql+asyncpg://"
            )

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction: committed when the block ends, rolled back on error."""
        if not self.is_sqlite:
            async with self._counted_turn(), self._writer.begin() as connection:
                yield connection
            return
        async with self._counted_turn():
            connection, _ = await self._sqlite_writer()
            async with connection.begin():
                yield connection

    async def write_sql(self, work: Callable[[SqlConnection], Coroutine[Any, Any, T]]) -> T:
        """`work(connection)` as one write transaction, committed when it returns and
        rolled back if it raises; its result.

        `work` may await nothing but the connection's `exec_driver_sql` (and what awaits
        only that). Then on SQLite it runs whole in the driver's thread, on the driver's
        own connection: one trip to that thread for the transaction, where `write()`
        takes one or more per statement, each waiting its turn on a busy event loop.
        On PostgreSQL it runs in `write()`.
        """
        if not self.is_sqlite:
            async with self.write() as connection:
                return await work(connection)
        async with self._counted_turn():
            # No statement goes through SQLAlchemy, so it begins no transaction of its
            # own: the transaction is the one `_transaction_in_thread` begins.
            _, driver = await self._sqlite_writer()
            return await _in_driver_thread(driver, _transaction_in_thread, work)

    async def within_write(
        self,
        connection: AsyncConnection,
        work: Callable[[SqlConnection], Coroutine[Any, Any, T]],
    ) -> T:
        """`work(...)` inside the write transaction under way on `connection` (from
        `write()`), its result; on SQLite in one trip to the driver's thread, as
        `write_sql` runs a whole transaction, where each statement through SQLAlchemy
        takes a trip of its own. `work` may await nothing but its connection's
        `exec_driver_sql` (and what awaits only that)."""
        if not self.is_sqlite:
            return await work(connection)
        held = self._held
        if held is None or held[0] is not connection or not connection.in_transaction():
            raise RuntimeError("within_write needs the write transaction under way")
        return await _in_driver_thread(held[1], _within_transaction_in_thread, work)

    async def _sqlite_writer(self) -> tuple[AsyncConnection, Any]:
        """The held writer connection and its aiosqlite driver connection, connected on
        first use and again if SQLAlchemy gave it up (invalidated it), with no
        transaction open; call it on the writer's turn."""
        if self._held is not None and self._held[0].invalidated:
            with contextlib.suppress(Exception):
                await self._held[0].close()
            self._held = None
        if self._held is None:
            connection = await self._writer.connect()
            driver = (await connection.get_raw_connection()).driver_connection
            self._held = (connection, driver)
        elif self._held[0].in_transaction():
            # Left so by a transaction whose end failed or was cancelled half-way.
            await self._held[0].rollback()
        return self._held

    def others_wait(self) -> bool:
        """Asked by a write transaction under way: whether another writer waits for it to
        end (the worker sizes its batches by that). Only SQLite's writers wait for one
        another; here, those of this process."""
        return self.is_sqlite and self.writers > 1

    @asynccontextmanager
    async def _counted_turn(self) -> AsyncIterator[None]:
        """The writer's turn, counted in `writers` from asking for it until it ends."""
        self.writers += 1
        try:
            async with self._turn(), self._one_writer():
                yield
        finally:
            self.writers -= 1

    @asynccontextmanager
    async def _one_writer(self) -> AsyncIterator[None]:
        """On SQLite, the held writer connection to oneself; on PostgreSQL every
        transaction has a connection of its own from the pool."""
        if not self.is_sqlite:
            yield
            return
        async with self._sqlite_turn:
            yield

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """Held around each write transaction; a subclass may make writers wait their turn."""
        yield

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction with one consistent snapshot."""
        async with self._reader.begin() as connection:
            yield connection

    async def checkpoint(self) -> None:
        """On SQLite, move the write-ahead log into the database file and empty it, so
        what was just deleted is gone from the log too; best effort (a reader holding an
        old snapshot leaves the rest to the next checkpoint). Nothing to do on PostgreSQL."""
        if not self.is_sqlite:
            return
        async with self._one_writer():
            connection, _ = await self._sqlite_writer()
            await connection.run_sync(_checkpoint)

    async def close(self) -> None:
        if self.is_sqlite:
            await self._close_held()
            await self._reader.dispose()
        await self._writer.dispose()

    async def _close_held(self) -> None:
        """Close the held writer once the transaction on it, if any, has ended; after
        CLOSE_WAIT_S regardless (the process is going away, and must not hang on a
        writer that never ends)."""
        taken = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                await self._sqlite_turn.acquire()
                taken = True
        try:
            if self._held is not None:
                held, self._held = self._held[0], None
                await held.close()
        finally:
            if taken:
                self._sqlite_turn.release()


# --- a whole transaction in the SQLite driver's thread -------------------------------------------


async def _in_driver_thread(driver: Any, function: Callable[..., T], *args: Any) -> T:
    """`function(sqlite3_connection, *args)` in the thread of the aiosqlite connection
    `driver`, the one thread that uses its sqlite3 connection. aiosqlite has no public
    call for this; `_execute` is the queue every one of its own methods goes through
    (the version is pinned)."""
    result: T = await driver._execute(function, driver._conn, *args)
    return result


def _transaction_in_thread(
    raw: sqlite3.Connection, work: Callable[[SqlConnection], Coroutine[Any, Any, T]]
) -> T:
    raw.execute("BEGIN IMMEDIATE")
    try:
        result = _within_transaction_in_thread(raw, work)
        raw.execute("COMMIT")
    except BaseException:
        if raw.in_transaction:
            raw.execute("ROLLBACK")
        raise
    return result


def _within_transaction_in_thread(
    raw: sqlite3.Connection, work: Callable[[SqlConnection], Coroutine[Any, Any, T]]
) -> T:
    # The transaction is the caller's: it ends (commits or rolls back) there.
    return _run_without_suspending(work(_ThreadConnection(raw)))


def _run_without_suspending(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end on this thread, which has no event loop: possible
    because what it awaits (`_ThreadConnection.exec_driver_sql`) returns at once."""
    try:
        work.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    work.close()
    raise RuntimeError(
        "work run in SQLite's thread awaited something other than its connection's statements"
    )


class _SQLite:
    name = "sqlite"


class _ThreadConnection:
    """The `SqlConnection` of a `write_sql` transaction on SQLite: sqlite3 itself, in
    the thread that owns it. Parameters as `exec_driver_sql` takes them: one tuple for
    one execution, a list of tuples for an executemany."""

    dialect = _SQLite()

    def __init__(self, raw: sqlite3.Connection) -> None:
        self._raw = raw

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> SqlResult:
        if isinstance(parameters, list):
            cursor = self._raw.executemany(statement, parameters)
        else:
            cursor = self._raw.execute(statement, parameters or ())
        return _Rows(cursor)


class _Rows:
    """A statement's result read to its end at once, as SQLAlchemy's results are: an
    INSERT ... RETURNING whose rows nobody fetched would otherwise be left half done."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._rows = cursor.fetchall() if cursor.description is not None else []
        self.rowcount = cursor.rowcount

    def fetchall(self) -> list[Any]:
        return self._rows
