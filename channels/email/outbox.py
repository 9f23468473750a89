"""From the outbox to the emails table: each `email.send` effect becomes one email to send.

The journey step that decided to send wrote an outbox row in its own transaction;
dispatching turns it into an `emails` row, whose life (queued, sending, sent, retried,
failed) the sender then owns. Both writes happen in one transaction, and the email
carries the outbox row's idempotency key, so an effect yields exactly one email
however often dispatching runs or crashes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.queries import OUTBOX_PENDING, mark_outbox_dispatched, upsert
from engine.db.schema import emails, enrollments, outbox

SEND = "email.send"
BATCH = 500


async def dispatch(connection: AsyncConnection, now: datetime, limit: int = BATCH) -> int:
    """Queue an email for up to `limit` pending `email.send` effects, in the caller's
    transaction; returns how many were dispatched (fewer than `limit`: none are left)."""
    claimed = await claim_pending_sends(connection, limit)
    if not claimed:
        return 0
    await insert_emails(
        connection,
        [
            {
                "idempotency_key": row.idempotency_key,
                "lead_id": row.lead_id,
                "enrollment_id": row.enrollment_id,
                "journey_id": row.journey_id,
                "stage": row.stage,
                "template": row.target,
                "status": "queued",
                "due_at": now,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
            for row in claimed
        ],
    )
    await mark_outbox_dispatched(connection, [row.id for row in claimed], now)
    return len(claimed)


# --- the queries -------------------------------------------------------------------------------


async def claim_pending_sends(connection: AsyncConnection, limit: int) -> list[Any]:
    """The oldest pending `email.send` rows, locked (skipping those another process holds),
    with the stage their enrollment is in now."""
    result = await connection.execute(
        select(
            outbox.c.id,
            outbox.c.idempotency_key,
            outbox.c.lead_id,
            outbox.c.enrollment_id,
            outbox.c.journey_id,
            outbox.c.target,
            enrollments.c.stage,
        )
        .outerjoin(enrollments, enrollments.c.id == outbox.c.enrollment_id)
        .where(outbox.c.status == OUTBOX_PENDING, outbox.c.action == SEND)
        .order_by(outbox.c.created_at, outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=outbox)
    )
    return list(result)


async def insert_emails(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """An email whose idempotency key is already queued is not queued again."""
    statement = upsert(connection, emails).on_conflict_do_nothing(
        index_elements=["idempotency_key"]
    )
    await connection.execute(statement, rows)
