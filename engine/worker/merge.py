"""Identity merge: two leads found to be one person become one lead.

Runs inside the worker's transaction with both leads locked. The surviving lead
keeps the union: identities, pending events, enrollments with their history,
timers, outbox rows, audience memberships, traits (its own win), the earlier first
touch. Where both were active in the same journey, the run that entered first
continues and the other is ended with a `merge` cause, so a person is never in two
stages of one journey, and the KPIs count the person once (`Rewrite`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db import queries
from engine.db.schema import audience_members, enrollments, leads
from engine.kpis.rollup import Rewrite
from engine.machine.lead import JourneyEffect
from engine.machine.step import leave
from engine.machine.values import Cause
from engine.worker.changes import Changes, enrollment_from_row

# Above any real entry number: parked numbers never meet real ones.
PARKED = 1_000_000


async def merge_leads(
    connection: AsyncConnection, survivor: int, absorbed: int, now: datetime
) -> None:
    kpis = await Rewrite.begin(connection, [survivor, absorbed])
    await _settle_enrollments(connection, survivor, absorbed, now)
    await _park_entries(connection, absorbed)
    await queries.move_lead_rows(connection, absorbed, survivor)
    await _renumber_entries(connection, survivor)
    await _merge_audiences(connection, survivor, absorbed)
    await _merge_traits(connection, survivor, absorbed, now)
    await kpis.finish(connection)


async def _settle_enrollments(
    connection: AsyncConnection, survivor: int, absorbed: int, now: datetime
) -> None:
    rows = await queries.load_enrollments(connection, [survivor, absorbed])
    active: dict[str, list[Any]] = {}
    for row in rows:
        if row.state == "active":
            active.setdefault(row.journey_id, []).append(row)
    ids = {(row.lead_id, row.journey_id, row.entry_no): row.id for row in rows}
    changes = Changes(ids, now, kpis=False)  # the merge's Rewrite counts it
    cause = Cause("merge", detail=f"lead {absorbed} merged into lead {survivor}")
    for both in active.values():
        if len(both) < 2:
            continue
        # The run that started first carries on; ties go to the surviving lead.
        both.sort(key=lambda row: (row.entered_at, row.lead_id != survivor))
        loser = both[1]
        result = leave(enrollment_from_row(loser), now, cause)
        assert result.enrollment is not None
        changes.add_effects(
            loser.lead_id,
            [result.enrollment],
            [
                JourneyEffect(loser.journey_id, loser.entry_no, now, effect)
                for effect in result.effects
            ],
        )
        changes.cancelled.add((loser.lead_id, loser.journey_id, loser.entry_no))
    await changes.write(connection)


async def _park_entries(connection: AsyncConnection, absorbed: int) -> None:
    """Negative entry numbers for the absorbed runs, so moving them collides with nothing."""
    await connection.execute(
        update(enrollments)
        .where(enrollments.c.lead_id == absorbed)
        .values(entry_no=-enrollments.c.entry_no)
    )


async def _renumber_entries(connection: AsyncConnection, survivor: int) -> None:
    """Number the person's runs of each journey 1, 2, ... in the order they entered.

    The core numbers a new run after the one that entered last, so the order of
    entry and of numbers must agree. Entry numbers are unique per lead and journey
    at every row update, so each row first goes to a parked negative number.
    """
    rows = await connection.execute(
        select(enrollments.c.id, enrollments.c.journey_id)
        .where(enrollments.c.lead_id == survivor)
        .order_by(enrollments.c.journey_id, enrollments.c.entered_at, enrollments.c.id)
    )
    numbers: dict[str, int] = {}
    parked: list[dict[str, Any]] = []
    for row in rows:
        numbers[row.journey_id] = numbers.get(row.journey_id, 0) + 1
        parked.append({"id": row.id, "entry_no": -(numbers[row.journey_id] + PARKED)})
    await queries.update_entry_numbers(connection, parked)
    await connection.execute(
        update(enrollments)
        .where(enrollments.c.lead_id == survivor)
        .values(entry_no=-enrollments.c.entry_no - PARKED)
    )


async def _merge_audiences(connection: AsyncConnection, survivor: int, absorbed: int) -> None:
    rows = (
        await connection.execute(
            select(audience_members).where(audience_members.c.lead_id.in_([survivor, absorbed]))
        )
    ).all()
    kept = {row.audience: row for row in rows if row.lead_id == survivor}
    for row in rows:
        if row.lead_id != absorbed:
            continue
        mine = kept.get(row.audience)
        if mine is None or (mine.removed_at is not None and row.removed_at is None):
            await connection.execute(
                audience_members.delete().where(
                    audience_members.c.audience == row.audience,
                    audience_members.c.lead_id == survivor,
                )
            )
            await connection.execute(
                update(audience_members)
                .where(
                    audience_members.c.audience == row.audience,
                    audience_members.c.lead_id == absorbed,
                )
                .values(lead_id=survivor)
            )
    await connection.execute(
        audience_members.delete().where(audience_members.c.lead_id == absorbed)
    )
    # The survivor's traits are the merged ones now: exports send its rows again.
    await connection.execute(
        update(audience_members).where(audience_members.c.lead_id == survivor).values(seq=None)
    )


async def _merge_traits(
    connection: AsyncConnection, survivor: int, absorbed: int, now: datetime
) -> None:
    rows = {
        row.id: row
        for row in await connection.execute(
            select(
                leads.c.id,
                leads.c.traits,
                leads.c.email,
                leads.c.watermark,
                leads.c.first_source,
                leads.c.first_source_at,
            ).where(leads.c.id.in_([survivor, absorbed]))
        )
    }
    mine, theirs = rows[survivor], rows[absorbed]
    watermarks = [w for w in (mine.watermark, theirs.watermark) if w is not None]
    touches = [row for row in (mine, theirs) if row.first_source_at is not None]
    first = min(touches, key=lambda row: row.first_source_at, default=mine)
    await connection.execute(
        update(leads)
        .where(leads.c.id == survivor)
        .values(
            traits={**(theirs.traits or {}), **(mine.traits or {})},
            email=mine.email or theirs.email,
            watermark=max(watermarks, default=None),
            first_source=first.first_source,
            first_source_at=first.first_source_at,
            updated_at=now,
        )
    )
    await connection.execute(
        update(leads).where(leads.c.id == absorbed).values(merged_into=survivor, merged_at=now)
    )
