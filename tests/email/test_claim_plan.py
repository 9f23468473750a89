"""The sender's claim as each database plans it: whether an offer grant is still in
flight is looked up per due email in `ix_outbox_pending_grants`, never by a join over
the outbox's pending rows. Planned on statistics older than a burst of emails, such a
join took seconds per claim on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, text

from channels.email.sender import select_due_emails
from engine.db.database import Database

NOW = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)


async def claim_plan(db: Database) -> str:
    """The plan of the statement `select_due_emails` runs, with the parameters it runs
    with, explained on the same cursor just before it runs."""
    plans: list[str] = []
    explain = "EXPLAIN QUERY PLAN " if db.is_sqlite else "EXPLAIN "

    def before(
        _conn: Any, cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            cursor.execute(explain + statement, parameters)
            plans.extend(" ".join(str(value) for value in row) for row in cursor.fetchall())

    async with db.write() as connection:
        if not db.is_sqlite:
            # On tables this small any plan is a sequential scan; what is asked here is
            # which index the probe can use.
            await connection.execute(text("SET LOCAL enable_seqscan = off"))
            await connection.execute(text("SET LOCAL enable_bitmapscan = off"))
        event.listen(connection.sync_connection, "before_cursor_execute", before)
        await select_due_emails(connection, NOW, 500)
    return "\n".join(plans)


async def test_a_grant_in_flight_is_probed_in_its_own_index(db: Database) -> None:
    plan = await claim_plan(db)

    assert "ix_outbox_pending_grants" in plan, plan
    assert "ix_emails_queue" in plan, plan


async def test_the_probe_is_made_per_due_email_not_as_a_join(db: Database) -> None:
    plan = await claim_plan(db)

    if db.is_sqlite:
        assert "CORRELATED" in plan.upper(), plan
    else:
        assert "SubPlan" in plan, plan
        assert "Join" not in plan.replace("Left Join", ""), plan
