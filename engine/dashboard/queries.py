"""Every query the dashboard runs besides the KPI report, one per question: a page costs
a fixed number of queries, whatever the number of stages, leads or emails on it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.schema import emails, enrollments, leads

Record = Row[*tuple[Any, ...]]


async def select_recent_emails(
    connection: AsyncConnection, journey_id: str, limit: int
) -> list[Record]:
    """The journey's latest emails, newest first (ids grow with time: the primary key
    orders them without a sort)."""
    result = await connection.execute(
        select(
            emails.c.lead_id,
            emails.c.template,
            emails.c.status,
            emails.c.stage,
            # An email gets its address when it is sent; until then, the lead's.
            func.coalesce(emails.c.to_address, leads.c.email).label("to_address"),
            func.coalesce(emails.c.sent_at, emails.c.updated_at).label("at"),
        )
        .outerjoin(leads, leads.c.id == emails.c.lead_id)
        .where(emails.c.journey_id == journey_id)
        .order_by(emails.c.id.desc())
        .limit(limit)
    )
    return list(result)


async def select_leads_in_stage(
    connection: AsyncConnection, journey_id: str, stage: str, limit: int
) -> list[Record]:
    """The runs in `stage` now, the latest to enter it first, with their lead's email."""
    result = await connection.execute(
        select(
            enrollments.c.lead_id,
            enrollments.c.version,
            enrollments.c.stage_entered_at,
            leads.c.email,
        )
        .join(leads, leads.c.id == enrollments.c.lead_id)
        .where(
            enrollments.c.journey_id == journey_id,
            enrollments.c.stage == stage,
            enrollments.c.state == "active",
        )
        .order_by(enrollments.c.stage_entered_at.desc(), enrollments.c.id.desc())
        .limit(limit)
    )
    return list(result)


async def count_leads_in_stage(connection: AsyncConnection, journey_id: str, stage: str) -> int:
    result = await connection.scalar(
        select(func.count()).where(
            enrollments.c.journey_id == journey_id,
            enrollments.c.stage == stage,
            enrollments.c.state == "active",
        )
    )
    return int(result or 0)
