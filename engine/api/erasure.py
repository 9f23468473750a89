"""Erasure: what `DELETE /v1/leads/{id}` does when a person asks to be forgotten.

In one transaction, for the lead and every lead merged into it: traits, ids and events
are deleted; runs end and their timers, queued emails, running sequences, pending
effects and unredeemed codes go; sent emails keep only their fate; an address on the
suppression list stays suppressed as its SHA-256, so the person is still never mailed
again. Audience memberships end and keep only the hashed identifiers the ad platforms
need to remove the person, so the next sync sends the removal. The lead row stays,
empty, so figures keep counting it, and the erasure itself is recorded without
personal data.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from channels.audiences.normalize import GOOGLE_HEADER, google_row, meta_row
from channels.email.sequences import stop_lead_runs
from engine.db.hashing import HASHED, hashed_address
from engine.db.queries import upsert
from engine.db.schema import (
    audience_identities,
    audience_members,
    emails,
    enrollments,
    erasures,
    events,
    identities,
    leads,
    offer_codes,
    outbox,
    suppressions,
    timers,
    transitions,
)
from engine.db.types import Instant
from engine.kpis.rollup import Rewrite


async def erase_lead(
    connection: AsyncConnection,
    lead_id: int,
    family: Sequence[int],
    now: datetime,
    region: str | None,
) -> dict[str, int]:
    """Erase the lead `lead_id` and the leads merged into it (`family`, itself included);
    returns what was erased, by kind."""
    ids = list(family)
    rows = list(
        await connection.execute(select(leads).where(leads.c.id.in_(ids)).with_for_update())
    )
    survivor = next(row for row in rows if row.id == lead_id)
    traits = dict(survivor.traits or {})
    addresses = {row.email for row in rows if row.email}
    counts = {
        "events": await _delete(connection, events, ids),
        "identities": await _delete(connection, identities, ids),
        "timers": await _delete(connection, timers, ids),
        "emails_unsent": await _delete(
            connection, emails, ids, emails.c.status.in_(("queued", "deferred"))
        ),
        "codes_unredeemed": await _delete(
            connection, offer_codes, ids, offer_codes.c.status == "granted"
        ),
    }
    # An email being handed to SMTP right now loses its lease: its sender cannot record
    # the outcome, so the address is not written back, nor reported, nor suppressed again.
    # Emails before sequence runs, the order the sender locks them in: no deadlock.
    await connection.execute(
        update(emails)
        .where(emails.c.lead_id.in_(ids), emails.c.status == "sending")
        .values(status="cancelled", lease_until=None)
    )
    await connection.execute(
        update(emails)
        .where(emails.c.lead_id.in_(ids))
        .values(to_address=None, last_error=None, updated_at=now)
    )
    await stop_lead_runs(connection, ids, "erased", now)
    await connection.execute(
        update(outbox)
        .where(outbox.c.lead_id.in_(ids), outbox.c.status == "pending")
        .values(status="erased", updated_at=now)
    )
    # Ending the runs rewrites their history: the KPIs count them as having left.
    kpis = await Rewrite.begin(connection, ids)
    counts["runs_ended"] = await _end_runs(connection, ids, now)
    await kpis.finish(connection)
    counts["audiences"] = await _leave_audiences(
        connection,
        ids,
        now,
        _removal_keys(traits, region),
    )
    counts["suppressions_hashed"] = await _hash_suppressions(connection, ids, addresses)
    # The hashed rows stored for the exports: the memberships keep their own for removal.
    await _delete(connection, audience_identities, ids)
    await connection.execute(
        update(leads)
        .where(leads.c.id.in_(ids))
        .values(traits={}, email=None, erased_at=now, updated_at=now)
    )
    await connection.execute(insert(erasures).values(lead_id=lead_id, erased_at=now, counts=counts))
    return counts


def _removal_keys(traits: dict[str, Any], region: str | None) -> dict[str, list[str]]:
    """The hashed identifiers a removal needs, per platform. Google's file carries Country
    and Zip in clear, so those are left blank: a removal matches on the hashed columns."""
    google = google_row(traits, region)
    hashed = {GOOGLE_HEADER.index(name) for name in ("Email", "Phone", "First Name", "Last Name")}
    return {
        "meta": meta_row(traits, region),
        "google": [value if index in hashed else "" for index, value in enumerate(google)],
    }


async def _delete(connection: AsyncConnection, table: Any, ids: list[int], *more: Any) -> int:
    result = await connection.execute(delete(table).where(table.c.lead_id.in_(ids), *more))
    return int(result.rowcount)


async def _end_runs(connection: AsyncConnection, ids: list[int], now: datetime) -> int:
    """Active runs end here, with the erasure as the cause in their history."""
    active = list(
        await connection.execute(
            select(enrollments.c.id, enrollments.c.journey_id, enrollments.c.stage).where(
                enrollments.c.lead_id.in_(ids), enrollments.c.state == "active"
            )
        )
    )
    if not active:
        return 0
    await connection.execute(
        update(enrollments)
        .where(enrollments.c.id.in_([run.id for run in active]))
        .values(state="exited", ended_at=now, sequences=[])
    )
    await connection.execute(
        insert(transitions),
        [
            {
                "enrollment_id": run.id,
                "journey_id": run.journey_id,
                "from_stage": run.stage,
                "to_stage": None,
                "at": now,
                "cause": {"type": "erased"},
            }
            for run in active
        ],
    )
    return len(active)


async def _leave_audiences(
    connection: AsyncConnection, ids: list[int], now: datetime, keys: dict[str, Any]
) -> int:
    result = await connection.execute(
        update(audience_members)
        .where(audience_members.c.lead_id.in_(ids))
        .values(
            removed_at=func.coalesce(audience_members.c.removed_at, literal(now, Instant)),
            erased=keys,
            seq=None,  # exported again: as a removal
        )
    )
    return int(result.rowcount)


async def _hash_suppressions(
    connection: AsyncConnection, ids: list[int], addresses: set[str]
) -> int:
    rows = list(
        await connection.execute(
            select(suppressions).where(
                suppressions.c.lead_id.in_(ids) | suppressions.c.email.in_(addresses)
            )
        )
    )
    clear = [row for row in rows if not row.email.startswith(HASHED)]
    if not clear:
        return 0
    await connection.execute(
        upsert(connection, suppressions).on_conflict_do_nothing(index_elements=["email"]),
        [
            {
                "email": hashed_address(row.email),
                "reason": row.reason,
                "lead_id": row.lead_id,
                "created_at": row.created_at,
            }
            for row in clear
        ],
    )
    await connection.execute(
        delete(suppressions).where(suppressions.c.email.in_([row.email for row in clear]))
    )
    return len(clear)
