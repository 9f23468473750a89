"""The engine's queries, named and kept together: the database contract in one place.

Every function takes an open connection inside the caller's transaction. Claims lock
`leads` rows with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so any number of workers
share the load and a lead is processed by one transaction at a time; the lock is
released by the commit, or by the database when a worker dies. SQLite renders no
locking clause: there the writer connection's `BEGIN IMMEDIATE` serializes all work.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, bindparam, case, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.schema import (
    audience_members,
    emails,
    enrollments,
    events,
    goals,
    identities,
    leads,
    offer_codes,
    outbox,
    sequence_runs,
    timers,
    transitions,
)

# Candidate leads are read from a window of the oldest pending work this many times
# larger than the claim, so that workers skipping each other's locked leads still fill
# their batch.
WINDOW_FACTOR = 4
# An outbox row waits as `pending` until its channel takes it over.
OUTBOX_PENDING, OUTBOX_DISPATCHED = "pending", "dispatched"
# Bound on bound parameters in one IN list (SQLite allows 32,766).
CHUNK = 5_000


def chunks(values: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def upsert(connection: AsyncConnection, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that supports ON CONFLICT on both databases."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


# --- claims --------------------------------------------------------------------------------------


async def _lock_leads(connection: AsyncConnection, window: Select[Any], limit: int) -> list[int]:
    claim = (
        select(leads.c.id)
        .where(leads.c.id.in_(window.scalar_subquery()))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list((await connection.scalars(claim)).all())


async def any_pending_events(connection: AsyncConnection) -> bool:
    found = await connection.scalar(
        select(events.c.id).where(events.c.processed_at.is_(None)).limit(1)
    )
    return found is not None


async def any_due_timers(connection: AsyncConnection, now: datetime) -> bool:
    found = await connection.scalar(select(timers.c.id).where(timers.c.due_at <= now).limit(1))
    return found is not None


async def claim_leads_with_events(connection: AsyncConnection, limit: int) -> list[int]:
    window = (
        select(events.c.lead_id)
        .where(events.c.processed_at.is_(None))
        .order_by(events.c.id)
        .limit(limit * WINDOW_FACTOR)
    )
    return await _lock_leads(connection, window, limit)


async def claim_leads_with_due_timers(
    connection: AsyncConnection, now: datetime, limit: int
) -> list[int]:
    window = (
        select(timers.c.lead_id)
        .where(timers.c.due_at <= now)
        .order_by(timers.c.due_at)
        .limit(limit * WINDOW_FACTOR)
    )
    return await _lock_leads(connection, window, limit)


async def claim_leads_on_old_versions(
    connection: AsyncConnection, journey_id: str, version: int, stages: Sequence[str], limit: int
) -> list[int]:
    """Leads active on an older version of the journey, in a stage the current one has."""
    window = (
        select(enrollments.c.lead_id)
        .where(
            enrollments.c.journey_id == journey_id,
            enrollments.c.state == "active",
            enrollments.c.version != version,
            enrollments.c.stage.in_(stages),
        )
        .limit(limit * WINDOW_FACTOR)
    )
    return await _lock_leads(connection, window, limit)


async def lock_live_lead(connection: AsyncConnection, lead_id: int) -> int | None:
    """Lock the lead that `lead_id` is now (following merges), unless another worker
    holds it: then None. A lead this transaction already holds is returned as is.

    `merged_into` is read by the locking statement itself, so a merge committed by
    another worker just before cannot be missed.
    """
    while True:
        row = (
            await connection.execute(
                select(leads.c.id, leads.c.merged_into)
                .where(leads.c.id == lead_id)
                .with_for_update(skip_locked=True)
            )
        ).first()
        if row is None:
            return None
        if row.merged_into is None:
            return int(row.id)
        lead_id = row.merged_into


# A merge chain longer than this is a bug, not data.
MAX_MERGE_DEPTH = 16


async def select_survivors(
    connection: AsyncConnection, lead_ids: Collection[int]
) -> dict[int, Any]:
    """For each id, the lead that survives it: itself, or the end of its `merged_into` chain.

    Unknown ids are left out. One query per level of merging, usually one in all.
    """
    rows: dict[int, Any] = {}
    wanted = set(lead_ids)
    for _ in range(MAX_MERGE_DEPTH):
        if not wanted:
            break
        result = await connection.execute(select(leads).where(leads.c.id.in_(wanted)))
        rows.update((row.id, row) for row in result)
        wanted = {
            row.merged_into
            for row in rows.values()
            if row.merged_into is not None and row.merged_into not in rows
        }
    survivors: dict[int, Any] = {}
    for lead_id in lead_ids:
        row = rows.get(lead_id)
        for _ in range(MAX_MERGE_DEPTH):
            if row is None or row.merged_into is None:
                break
            row = rows.get(row.merged_into)
        if row is not None and row.merged_into is None:
            survivors[lead_id] = row
    return survivors


# --- loading a batch -----------------------------------------------------------------------------


async def load_leads(connection: AsyncConnection, lead_ids: Sequence[int]) -> list[Any]:
    rows: list[Any] = []
    for part in chunks(lead_ids):
        rows.extend(
            await connection.execute(
                select(
                    leads.c.id,
                    leads.c.traits,
                    leads.c.watermark,
                    leads.c.merged_into,
                    leads.c.first_source,
                    leads.c.first_source_at,
                ).where(leads.c.id.in_(part))
            )
        )
    return rows


async def load_pending_events(
    connection: AsyncConnection, lead_ids: Sequence[int], limit: int
) -> list[Any]:
    """Pending events of the leads, each lead's in timestamp then arrival order."""
    query = (
        select(
            events.c.id,
            events.c.lead_id,
            events.c.name,
            events.c.timestamp,
            events.c.message_id,
            events.c.data,
        )
        .where(events.c.lead_id.in_(bindparam("ids", expanding=True)))
        .where(events.c.processed_at.is_(None))
        .order_by(events.c.lead_id, events.c.timestamp, events.c.id)
        .limit(limit)
    )
    rows: list[Any] = []
    for part in chunks(lead_ids):
        rows.extend(await connection.execute(query, {"ids": list(part)}))
    return rows


async def load_due_timers(
    connection: AsyncConnection, lead_ids: Sequence[int], now: datetime
) -> list[Any]:
    rows: list[Any] = []
    for part in chunks(lead_ids):
        rows.extend(
            await connection.execute(
                select(
                    timers.c.id,
                    timers.c.lead_id,
                    timers.c.due_at,
                    timers.c.stage,
                    timers.c.epoch,
                    timers.c.transition,
                    enrollments.c.journey_id,
                    enrollments.c.entry_no,
                )
                .join(enrollments, enrollments.c.id == timers.c.enrollment_id)
                .where(timers.c.lead_id.in_(part), timers.c.due_at <= now)
            )
        )
    return rows


async def load_enrollments(connection: AsyncConnection, lead_ids: Sequence[int]) -> list[Any]:
    rows: list[Any] = []
    for part in chunks(lead_ids):
        rows.extend(
            await connection.execute(select(enrollments).where(enrollments.c.lead_id.in_(part)))
        )
    return rows


async def merges_pending(
    connection: AsyncConnection, lead_ids: Sequence[int]
) -> list[tuple[int, int]]:
    """(lead_id, merge_lead_id) of pending events of live leads that say two leads are
    one person, oldest first; the partner may have been merged into a third lead since.

    Two plain queries rather than a join: a join planned on a freshly filled events
    table (no statistics yet) can rescan every pending event once per lead.
    """
    found: list[Any] = []
    for part in chunks(lead_ids):
        found.extend(
            await connection.execute(
                select(
                    events.c.id, events.c.lead_id, events.c.merge_lead_id, events.c.timestamp
                ).where(
                    events.c.lead_id.in_(part),
                    events.c.processed_at.is_(None),
                    events.c.merge_lead_id.is_not(None),
                )
            )
        )
    if not found:
        return []
    live = set(
        await connection.scalars(
            select(leads.c.id).where(
                leads.c.id.in_(sorted({row.lead_id for row in found})),
                leads.c.merged_into.is_(None),
            )
        )
    )
    found.sort(key=lambda row: (row.timestamp, row.id))
    return [(row.lead_id, row.merge_lead_id) for row in found if row.lead_id in live]


# --- writing a batch -----------------------------------------------------------------------------


class AlreadyProcessed(RuntimeError):
    """Events this transaction applied were applied by another one first.

    Claims make this impossible; the check makes the transaction roll back rather
    than write a step twice should a claim ever fail.
    """


async def mark_processed(
    connection: AsyncConnection, event_ids: Sequence[int], now: datetime, error: str | None = None
) -> None:
    marked = 0
    for part in chunks(event_ids):
        result = await connection.execute(
            update(events)
            .where(events.c.id.in_(part), events.c.processed_at.is_(None))
            .values(processed_at=now, error=error)
        )
        marked += result.rowcount
    if marked != len(event_ids):
        raise AlreadyProcessed(f"{len(event_ids) - marked} events were processed meanwhile")


async def _update_by_id(
    connection: AsyncConnection, table: Any, columns: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    """One UPDATE ... WHERE id = ? executed for many rows (each row: id and `columns`)."""
    if not rows:
        return
    # Bound names must differ from column names in an UPDATE's SET clause.
    statement = (
        update(table)
        .where(table.c.id == bindparam("_id"))
        .values({column: bindparam(f"_{column}") for column in columns})
    )
    await connection.execute(
        statement, [{f"_{key}": value for key, value in row.items()} for row in rows]
    )


async def update_leads(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """rows: {id, traits, email, watermark, first_source, first_source_at, updated_at}."""
    columns = ("traits", "email", "watermark", "first_source", "first_source_at", "updated_at")
    await _update_by_id(connection, leads, columns, rows)


async def insert_enrollments(connection: AsyncConnection, rows: list[dict[str, Any]]) -> list[int]:
    """The new rows' ids, in the order given.

    Inserted in one executemany, then read back by their unique key (lead, journey,
    entry number): RETURNING in parameter order would make SQLAlchemy insert one row
    per statement on SQLite, ten times slower.
    """
    if not rows:
        return []
    await connection.execute(insert(enrollments), rows)
    ids: dict[tuple[int, str, int], int] = {}
    for part in chunks(sorted({row["lead_id"] for row in rows})):
        result = await connection.execute(
            select(
                enrollments.c.id,
                enrollments.c.lead_id,
                enrollments.c.journey_id,
                enrollments.c.entry_no,
            ).where(enrollments.c.lead_id.in_(part))
        )
        ids.update(((row.lead_id, row.journey_id, row.entry_no), row.id) for row in result)
    return [ids[(row["lead_id"], row["journey_id"], row["entry_no"])] for row in rows]


ENROLLMENT_CHANGES = (
    "version",
    "stage",
    "state",
    "epoch",
    "stage_entered_at",
    "ended_at",
    "sequences",
)


async def update_entry_numbers(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """rows: {id, entry_no}."""
    await _update_by_id(connection, enrollments, ("entry_no",), rows)


async def update_enrollments(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """rows: {id, and each of ENROLLMENT_CHANGES}."""
    await _update_by_id(connection, enrollments, ENROLLMENT_CHANGES, rows)


async def insert_rows(connection: AsyncConnection, table: Any, rows: list[dict[str, Any]]) -> None:
    if rows:
        await connection.execute(insert(table), rows)


async def insert_transitions(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    await insert_rows(connection, transitions, rows)


async def insert_goals(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    await insert_rows(connection, goals, rows)


async def insert_timers(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    await insert_rows(connection, timers, rows)


async def delete_timers(connection: AsyncConnection, timer_ids: Sequence[int]) -> None:
    for part in chunks(timer_ids):
        await connection.execute(delete(timers).where(timers.c.id.in_(part)))


async def delete_timers_of(connection: AsyncConnection, enrollment_ids: Sequence[int]) -> None:
    for part in chunks(enrollment_ids):
        await connection.execute(delete(timers).where(timers.c.enrollment_id.in_(part)))


async def postpone_timers(
    connection: AsyncConnection, timer_ids: Sequence[int], due_at: datetime
) -> None:
    for part in chunks(timer_ids):
        await connection.execute(update(timers).where(timers.c.id.in_(part)).values(due_at=due_at))


async def mark_outbox_dispatched(
    connection: AsyncConnection, outbox_ids: Sequence[int], now: datetime
) -> None:
    """A channel took these effects over: they are its rows now, not the outbox's."""
    for part in chunks(outbox_ids):
        await connection.execute(
            update(outbox)
            .where(outbox.c.id.in_(part))
            .values(status=OUTBOX_DISPATCHED, updated_at=now)
        )


async def insert_outbox(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Channel actions; one that ran already for its idempotency key is ignored."""
    if rows:
        statement = upsert(connection, outbox).on_conflict_do_nothing(
            index_elements=["idempotency_key"]
        )
        await connection.execute(statement, rows)


async def add_to_audiences(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """rows: {audience, lead_id, journey_id, added_at, removed_at}. A current member keeps
    its original add time; a former member is added again from now."""
    if not rows:
        return
    statement = upsert(connection, audience_members)
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=["audience", "lead_id"],
        set_={
            "journey_id": excluded.journey_id,
            # A current member keeps the time it joined.
            "added_at": case(
                (audience_members.c.removed_at.is_(None), audience_members.c.added_at),
                else_=excluded.added_at,
            ),
            "removed_at": excluded.removed_at,
            # Unchanged for the exports only if it was and stays a member; a former
            # member back, or a member added and removed in one batch, is a change.
            "seq": case(
                (
                    and_(audience_members.c.removed_at.is_(None), excluded.removed_at.is_(None)),
                    audience_members.c.seq,
                ),
                else_=None,
            ),
            "erased": None,
        },
    )
    await connection.execute(statement, rows)


async def remove_from_audiences(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """rows: {audience, lead_id, removed_at}; only current members are removed."""
    if rows:
        await connection.execute(
            update(audience_members)
            .where(
                and_(
                    audience_members.c.audience == bindparam("a_audience"),
                    audience_members.c.lead_id == bindparam("a_lead"),
                    audience_members.c.removed_at.is_(None),
                )
            )
            .values(removed_at=bindparam("a_removed_at"), seq=None),
            [
                {
                    "a_audience": row["audience"],
                    "a_lead": row["lead_id"],
                    "a_removed_at": row["removed_at"],
                }
                for row in rows
            ],
        )


async def forward_to_survivor(connection: AsyncConnection, absorbed: int, survivor: int) -> None:
    """Ids and pending events of a merged lead belong to the lead it was merged into.

    Also run for a lead already merged: ingestion may have routed a message, or even
    mapped a new id, to it just before the merge committed.
    """
    await connection.execute(
        update(identities).where(identities.c.lead_id == absorbed).values(lead_id=survivor)
    )
    await connection.execute(
        update(events)
        .where(events.c.lead_id == absorbed, events.c.processed_at.is_(None))
        .values(lead_id=survivor)
    )


async def move_lead_rows(connection: AsyncConnection, absorbed: int, survivor: int) -> None:
    """Point everything of `absorbed` at `survivor` (enrollment conflicts are settled first)."""
    await forward_to_survivor(connection, absorbed, survivor)
    for table in (enrollments, timers, outbox, emails, sequence_runs, offer_codes):
        await connection.execute(
            update(table).where(table.c.lead_id == absorbed).values(lead_id=survivor)
        )


# --- monitoring ----------------------------------------------------------------------------------


async def queue_depths(connection: AsyncConnection, now: datetime) -> dict[str, int]:
    """How much work waits, by queue; each count is served by an index."""
    counts = {
        "events_pending": select(func.count()).where(events.c.processed_at.is_(None)),
        "timers_due": select(func.count()).where(timers.c.due_at <= now),
        "outbox_pending": select(func.count()).where(outbox.c.status == OUTBOX_PENDING),
        "emails_due": select(func.count()).where(
            emails.c.status.in_(("queued", "deferred", "sending")), emails.c.due_at <= now
        ),
        "sequence_steps_due": select(func.count()).where(
            sequence_runs.c.status == "active", sequence_runs.c.next_at <= now
        ),
        "audience_changes_unnumbered": select(func.count()).where(audience_members.c.seq.is_(None)),
    }
    return {name: int(await connection.scalar(query) or 0) for name, query in counts.items()}
