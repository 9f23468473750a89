"""SQLAlchemy's aiosqlite dialect, with each statement run in one trip to the driver.

aiosqlite runs sqlite3 in a thread of its own: every call is handed to that thread,
and its result handed back to the event loop, which must wake up for it. SQLAlchemy's
adapter makes four such calls per statement: open a cursor, execute, fetch the rows,
close the cursor. Here the four run as one function in the driver's thread: one trip
per statement. Nothing else changes: SQLAlchemy's adapter had already read every row
before returning (it offers no streaming on this cursor), and transactions, errors
and server-side cursors are its own.

Measured (bench/README.md, 2026-12-07, second round): a worker batch of 20 tracked
events handed SQLite's thread 44 calls for its 10 statements, and cost 7.6-8.4 ms of
CPU; with this cursor, 5.6-5.7 ms.

The adapter classes are SQLAlchemy's (the version is pinned); `_execute` is the queue
every aiosqlite method goes through, as `database._in_driver_thread` uses it.
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    SQLiteDialect_aiosqlite,
)
from sqlalchemy.engine import make_url
from sqlalchemy.util import EMPTY_DICT

# The driver name `_sqlite_engine` gives URLs of `sqlite+aiosqlite`.
DRIVER = "aiosqlite_one_trip"


def _run_statement(
    raw: sqlite3.Connection, operation: str, parameters: Any, many: bool
) -> tuple[Any, list[Any], int, int | None]:
    """In the driver's thread: execute, read every row, close; what the cursor told."""
    cursor = raw.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """A cursor that holds what its last statement gave, read in one trip."""

    __slots__ = ("_arraysize", "_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: Any) -> None:
        # No aiosqlite cursor to open: each statement opens and closes its own in the
        # driver's thread.
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int:
        return self._lastrowid  # type: ignore[return-value]

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    async def _run(self, operation: Any, parameters: Any, many: bool) -> None:
        async with self._adapt_connection._execute_mutex:
            driver = self._connection
            found = await driver._execute(_run_statement, driver._conn, operation, parameters, many)
        self._description, rows, self._rowcount, self._lastrowid = found
        self._rows = collections.deque(rows)

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        await self._run(operation, parameters, many=False)
        return self

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        await self._run(operation, seq_of_parameters, many=True)
        return self

    async def _async_soft_close(self) -> None:
        return  # the driver's cursor was closed in the statement's trip

    def close(self) -> None:
        self._rows.clear()

    def nextset(self) -> None:
        raise NotImplementedError("one statement at a time")

    def setinputsizes(self, *inputsizes: Any) -> None:
        return None


class OneTripConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = OneTripCursor


class OneTripDBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> OneTripConnection:
        # SQLAlchemy's connect opens the aiosqlite connection and wraps it in its own
        # adapter, which names its class: the connection is wrapped again in this one.
        adapted = super().connect(*arg, **kw)
        return OneTripConnection(self, adapted._connection)


class OneTripDialect(SQLiteDialect_aiosqlite):
    driver = DRIVER
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> OneTripDBAPI:
        return OneTripDBAPI(__import__("aiosqlite"), __import__("sqlite3"))


registry.register(f"sqlite.{DRIVER}", __name__, "OneTripDialect")


def one_trip_url(url: str) -> str:
    """`url` (sqlite+aiosqlite) with this module's dialect."""
    return make_url(url).set(drivername=f"sqlite+{DRIVER}").render_as_string(hide_password=False)
