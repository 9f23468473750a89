"""A database whose writers are held back by another connection, as another process
(a long transaction, a backup) would hold them."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.engine import make_url

from engine.db.database import Database


@asynccontextmanager
async def held_write_lock(db: Database) -> AsyncIterator[None]:
    """While the block runs, no other connection can store an event in `db`: SQLite's
    write lock taken with BEGIN IMMEDIATE, or PostgreSQL's events table locked against
    writes. Released when the block ends."""
    if db.is_sqlite:
        holder = sqlite3.connect(make_url(db.url).database or "", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            yield
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        return
    other = Database(db.url)
    try:
        async with other.write() as connection:
            await connection.execute(text("LOCK TABLE events IN EXCLUSIVE MODE"))
            yield
    finally:
        await other.close()
