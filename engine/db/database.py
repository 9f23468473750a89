"""Connections to the one database every cjm process shares.

SQLite (the embedded default) allows one writer at a time: writes go through a
single pooled connection that starts each transaction with `BEGIN IMMEDIATE`, so a
transaction never fails half-way on a lock, while reads use their own connections
(WAL lets them run beside the writer). PostgreSQL uses one pool for both; its reads
are read-only REPEATABLE READ transactions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

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


def _lease_settings(lease_seconds: float) -> dict[str, str]:
    return {
        "idle_in_transaction_session_timeout": str(int(lease_seconds * 1000)),
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "3",
    }


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _sqlite_engine(url: str, *, begin: str, pool_size: int) -> AsyncEngine:
    engine = create_async_engine(
        url,
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
        self.dialect = make_url(url).get_backend_name()
        if self.dialect == "sqlite":
            self._writer = _sqlite_engine(url, begin="BEGIN IMMEDIATE", pool_size=1)
            self._reader = _sqlite_engine(url, begin="BEGIN", pool_size=4)
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
        async with self._writer.begin() as connection:
            yield connection

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
        async with self._writer.connect() as connection:
            await connection.run_sync(_checkpoint)

    async def close(self) -> None:
        await self._writer.dispose()
        if self.is_sqlite:
            await self._reader.dispose()
