"""SQLite's plans for the statements the code under test runs.

SQLite plans without statistics (cjm runs no ANALYZE): given a column of few values
beside a long IN list, it may walk a whole index instead of searching by the list, a
cost that grows with the table. Such a test runs the real code on a real SQLite file,
records what the writer's connection executed (values bound in), and asks SQLite how
it plans each statement.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.database import Database


class TracedSqlite:
    """A copy of the migrated template (`async with`: its `db` is closed at the end)."""

    def __init__(self, template: Path, directory: Path) -> None:
        self.path = directory / "cjm.db"
        shutil.copy(template, self.path)
        self.db = Database(f"sqlite+aiosqlite:///{self.path}")
        self.statements: list[str] = []

    async def __aenter__(self) -> TracedSqlite:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.db.close()

    async def trace(self, connection: AsyncConnection) -> None:
        """Record from now on every statement `connection`'s driver connection runs (the
        writer has one, kept in its pool: traced once, traced for good)."""
        driver = (await connection.get_raw_connection()).driver_connection
        await driver.set_trace_callback(self.statements.append)

    def selects(self, table: str) -> list[str]:
        """The recorded SELECTs that name `table`."""
        return [
            statement
            for statement in self.statements
            if statement.lstrip().upper().startswith("SELECT") and table in statement
        ]

    def plan(self, statement: str) -> list[str]:
        """SQLite's plan for `statement`, one line per step."""
        plans = sqlite3.connect(self.path)
        try:
            return [row[3] for row in plans.execute(f"EXPLAIN QUERY PLAN {statement}")]
        finally:
            plans.close()
