"""How each database plans the statements the code under test runs on a table.

PostgreSQL plans on statistics, which may date from a quiet moment; SQLite plans
without any (cjm runs no ANALYZE there). A test that asks which index a statement
searches takes `plan_database` (a database of its own, so its statistics die with
it), runs the real code, and reads the plan of each statement on the table, explained
on the same cursor with the same parameters just before it runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.database import Database


async def plans_of(
    db: Database, table: str, run: Callable[[AsyncConnection], Awaitable[Any]]
) -> list[str]:
    """The plan of each statement naming `table` that `run(connection)` executes, one
    text per statement (its lines joined)."""
    plans: list[str] = []
    explain = "EXPLAIN QUERY PLAN " if db.is_sqlite else "EXPLAIN "

    def before(
        _conn: Any, cursor: Any, statement: str, parameters: Any, _context: Any, many: bool
    ) -> None:
        if f" {table} " in f" {statement} ":
            # An executemany (`many`) is explained with its first row: one plan serves all.
            cursor.execute(explain + statement, parameters[0] if many else parameters)
            plans.append("\n".join(" ".join(map(str, row)) for row in cursor.fetchall()))

    async with db.write() as connection:
        if not db.is_sqlite:
            # A table this small is cheapest read whole; what is asked is which index
            # the statement searches, and how.
            await connection.execute(text("SET LOCAL enable_seqscan = off"))
        event.listen(connection.sync_connection, "before_cursor_execute", before)
        await run(connection)
    assert plans, f"no statement on {table} was run"
    return plans
