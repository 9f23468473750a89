"""Leads as the admin API shows them: who they are and everything the journeys did to them.

A lead merged into another (identify, alias) answers as the lead it survives in.
A lead's page is read in one snapshot with one query per table, whatever the
number of journeys, timers or emails.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as FastApiPath
from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from channels.offers.routes import offer_view
from engine.api.erasure import erase_lead
from engine.api.schemas import (
    AudienceView,
    EmailView,
    EnrollmentView,
    Erased,
    EventView,
    GoalView,
    HistoryEntry,
    LeadDetail,
    LeadSummary,
    OfferView,
    SequenceView,
    TimerView,
)
from engine.db.queries import MAX_MERGE_DEPTH, select_survivors
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
from engine.ingest.identity import ANON, USER
from engine.machine.book import JourneyBook

if TYPE_CHECKING:
    from engine.api.app import AppRuntime

Record = Row[*tuple[Any, ...]]


# Merges chain (A into B, later B into C); a longer chain than this is a bug, not data.
# Ids and emails never hold NUL (ingestion refuses it, and PostgreSQL cannot compare it).
NO_NUL = r"^[^\x00]*$"
RECENT_EVENTS = 50


def leads_router(runtime: AppRuntime) -> APIRouter:
    router = APIRouter(tags=["leads"])

    @router.get("/v1/leads", summary="Find leads by id or email; the most recent without a filter")
    async def find_leads(
        user_id: Annotated[str | None, Query(max_length=256, pattern=NO_NUL)] = None,
        anonymous_id: Annotated[str | None, Query(max_length=256, pattern=NO_NUL)] = None,
        email: Annotated[str | None, Query(max_length=320, pattern=NO_NUL)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[LeadSummary]:
        async with runtime.db.read() as connection:
            found = await find_lead_rows(connection, user_id, anonymous_id, email, limit)
            ids_of = await select_identities(connection, [lead.id for lead in found])
        return [_summary(lead, ids_of[lead.id]) for lead in found]

    @router.get(
        "/v1/leads/{lead_id}",
        summary="One lead with its journeys, audiences, emails, offers, goals and events",
        responses={404: {"description": "No lead has this id."}},
    )
    async def get_lead(lead_id: Annotated[int, FastApiPath(ge=1, le=2**63 - 1)]) -> LeadDetail:
        async with runtime.db.read() as connection:
            lead = (await select_survivors(connection, [lead_id])).get(lead_id)
            if lead is None:
                raise HTTPException(404, f"no lead {lead_id}")
            return await lead_detail(connection, lead, runtime.book)

    @router.delete(
        "/v1/leads/{lead_id}",
        summary="Erase a lead on request: personal data, ids, events, queued emails and codes",
        description=(
            "The lead and every lead merged into it. Its audience memberships end and are "
            "exported as removals; an address it unsubscribed or bounced stays suppressed, "
            "as a hash. Erasing again changes nothing more."
        ),
        responses={404: {"description": "No lead has this id."}},
    )
    async def erase(lead_id: Annotated[int, FastApiPath(ge=1, le=2**63 - 1)]) -> Erased:
        now = runtime.clock.now()
        async with runtime.db.write() as connection:
            lead = (await select_survivors(connection, [lead_id])).get(lead_id)
            if lead is None:
                raise HTTPException(404, f"no lead {lead_id}")
            family = [lead.id, *await select_merged_ids(connection, lead.id)]
            counts = await erase_lead(
                connection, lead.id, family, now, runtime.settings.default_region
            )
        await runtime.db.checkpoint()
        return Erased(id=lead.id, erased_at=now, counts=counts)

    return router


async def find_lead_rows(
    connection: AsyncConnection,
    user_id: str | None,
    anonymous_id: str | None,
    email: str | None,
    limit: int,
) -> list[Record]:
    """The surviving leads matching every filter given, newest first."""
    filters: list[set[int]] = []
    if user_id is not None:
        filters.append(await select_lead_ids_by_identity(connection, USER, user_id))
    if anonymous_id is not None:
        filters.append(await select_lead_ids_by_identity(connection, ANON, anonymous_id))
    if email is not None:
        filters.append(await select_lead_ids_by_email(connection, email.strip().lower()))
    if not filters:
        return await select_recent_leads(connection, limit)
    survivors = await select_survivors(connection, set().union(*filters))
    matching = set.intersection(
        *({survivors[lead_id].id for lead_id in ids if lead_id in survivors} for ids in filters)
    )
    rows = {row.id: row for row in survivors.values() if row.id in matching}
    return sorted(rows.values(), key=lambda row: (row.created_at, row.id), reverse=True)[:limit]


def _summary(lead: Record, lead_ids: Sequence[Record]) -> LeadSummary:
    user_ids = [row.value for row in lead_ids if row.kind == USER]
    return LeadSummary(
        id=lead.id,
        user_id=user_ids[-1] if user_ids else None,
        anonymous_ids=[row.value for row in lead_ids if row.kind == ANON],
        traits=lead.traits,
        created_at=lead.created_at,
        updated_at=lead.updated_at,
        erased_at=lead.erased_at,
    )


async def lead_detail(connection: AsyncConnection, lead: Record, book: JourneyBook) -> LeadDetail:
    """The lead as `GET /v1/leads/{id}` answers it (the dashboard's lead page shows it too)."""
    lead_ids = (await select_identities(connection, [lead.id]))[lead.id]
    merged_ids = await select_merged_ids(connection, lead.id)
    runs = await select_enrollments(connection, lead.id)
    run_ids = [row.id for row in runs]
    history_of = _by_enrollment(await select_transitions(connection, run_ids))
    timers_of = _by_enrollment(await select_timers(connection, lead.id))
    queued = await select_outbox(connection, lead.id)
    return LeadDetail(
        **_summary(lead, lead_ids).model_dump(),
        user_ids=[row.value for row in lead_ids if row.kind == USER],
        merged_ids=merged_ids,
        journeys=[
            EnrollmentView(
                journey=row.journey_id,
                version=row.version,
                entry=row.entry_no,
                stage=row.stage,
                state=row.state,
                entered_at=row.entered_at,
                stage_entered_at=row.stage_entered_at,
                ended_at=row.ended_at,
                timers=[
                    TimerView(
                        due_at=timer.due_at, stage=timer.stage, to=_timeout_target(book, row, timer)
                    )
                    for timer in timers_of[row.id]
                ],
                history=[
                    HistoryEntry(
                        from_=step.from_stage, to=step.to_stage, at=step.at, cause=step.cause
                    )
                    for step in history_of[row.id]
                ],
            )
            for row in runs
        ],
        audiences=[
            AudienceView(
                name=row.audience,
                journey=row.journey_id,
                added_at=row.added_at,
                removed_at=row.removed_at,
            )
            for row in await select_audiences(connection, lead.id)
        ],
        emails=[
            EmailView(
                template=row.template,
                journey=row.journey_id,
                status=row.status,
                queued_at=row.created_at,
                due_at=row.due_at,
                sent_at=row.sent_at,
                attempts=row.attempts,
                last_error=row.last_error,
                message_id=row.message_id,
            )
            for row in await select_emails(connection, [lead.id, *merged_ids])
        ],
        offers=[
            *(offer_view(row) for row in await select_offers(connection, [lead.id, *merged_ids])),
            *(
                OfferView(
                    offer=row.target,
                    journey=row.journey_id,
                    code=None,
                    status="pending",
                    granted_at=row.created_at,
                    expires_at=None,
                )
                for row in queued
                if row.action == "offer.grant" and row.status == "pending"
            ),
        ],
        sequences=[
            *(
                SequenceView(
                    sequence=row.sequence,
                    journey=row.journey_id,
                    status=row.status,
                    step=row.step,
                    steps=_step_count(book, row),
                    next_at=row.next_at,
                    started_at=row.started_at,
                    ended_at=row.ended_at,
                    stop_reason=row.stop_reason,
                )
                for row in await select_sequence_runs(connection, lead.id)
            ),
            *(
                SequenceView(
                    sequence=row.target,
                    journey=row.journey_id,
                    status="pending",
                    step=0,
                    steps=None,
                    next_at=None,
                    started_at=row.created_at,
                    ended_at=None,
                    stop_reason=None,
                )
                for row in queued
                if row.action == "sequence.start" and row.status == "pending"
            ),
        ],
        goals=[
            GoalView(journey=row.journey_id, at=row.at, value=row.value)
            for row in await select_goals(connection, run_ids)
        ],
        events=[
            EventView(
                message_id=row.message_id,
                type=row.type,
                name=row.name,
                timestamp=row.timestamp,
                received_at=row.received_at,
                processed_at=row.processed_at,
                error=row.error,
            )
            for row in await select_recent_events(connection, [lead.id, *merged_ids], RECENT_EVENTS)
        ],
    )


def _by_enrollment(rows: Sequence[Record]) -> defaultdict[int, list[Record]]:
    grouped: defaultdict[int, list[Record]] = defaultdict(list)
    for row in rows:
        grouped[row.enrollment_id].append(row)
    return grouped


def _step_count(book: JourneyBook, run: Record) -> int | None:
    journey = book.versions.get((run.journey_id, run.version))
    sequence = journey.sequences.get(run.sequence) if journey is not None else None
    return len(sequence.steps) if sequence is not None else None


def _timeout_target(book: JourneyBook, enrollment: Record, timer: Record) -> str | None:
    """The stage a pending timeout leads to, read from the journey version the lead runs on."""
    journey = book.versions.get((enrollment.journey_id, enrollment.version))
    stage = journey.stage_by_id.get(timer.stage) if journey is not None else None
    if stage is None or not 0 <= timer.transition < len(stage.transitions):
        return None
    target: str = stage.transitions[timer.transition].to
    return target


# --- the queries -------------------------------------------------------------------------------


async def select_merged_ids(connection: AsyncConnection, lead_id: int) -> list[int]:
    """The leads merged into this one, directly or through others."""
    merged: list[int] = []
    frontier = [lead_id]
    for _ in range(MAX_MERGE_DEPTH):
        result = await connection.execute(
            select(leads.c.id).where(leads.c.merged_into.in_(frontier)).order_by(leads.c.id)
        )
        frontier = [id_ for id_ in result.scalars() if id_ not in merged and id_ != lead_id]
        if not frontier:
            break
        merged.extend(frontier)
    return sorted(merged)


async def select_recent_leads(connection: AsyncConnection, limit: int) -> list[Record]:
    result = await connection.execute(
        select(leads)
        .where(leads.c.merged_into.is_(None))
        .order_by(leads.c.created_at.desc(), leads.c.id.desc())
        .limit(limit)
    )
    return list(result)


async def select_lead_ids_by_identity(
    connection: AsyncConnection, kind: str, value: str
) -> set[int]:
    result = await connection.execute(
        select(identities.c.lead_id).where(identities.c.kind == kind, identities.c.value == value)
    )
    return set(result.scalars())


async def select_lead_ids_by_email(connection: AsyncConnection, email: str) -> set[int]:
    result = await connection.execute(select(leads.c.id).where(leads.c.email == email))
    return set(result.scalars())


async def select_identities(
    connection: AsyncConnection, lead_ids: Sequence[int]
) -> defaultdict[int, list[Record]]:
    """Each lead's ids, oldest first."""
    grouped: defaultdict[int, list[Record]] = defaultdict(list)
    if not lead_ids:
        return grouped
    result = await connection.execute(
        select(identities.c.lead_id, identities.c.kind, identities.c.value)
        .where(identities.c.lead_id.in_(lead_ids))
        .order_by(identities.c.created_at, identities.c.kind, identities.c.value)
    )
    for row in result:
        grouped[row.lead_id].append(row)
    return grouped


async def select_enrollments(connection: AsyncConnection, lead_id: int) -> list[Record]:
    """Newest first."""
    result = await connection.execute(
        select(enrollments)
        .where(enrollments.c.lead_id == lead_id)
        .order_by(enrollments.c.entered_at.desc(), enrollments.c.id.desc())
    )
    return list(result)


async def select_transitions(
    connection: AsyncConnection, enrollment_ids: Sequence[int]
) -> list[Record]:
    """Oldest first."""
    if not enrollment_ids:
        return []
    result = await connection.execute(
        select(transitions)
        .where(transitions.c.enrollment_id.in_(enrollment_ids))
        .order_by(transitions.c.at, transitions.c.id)
    )
    return list(result)


async def select_timers(connection: AsyncConnection, lead_id: int) -> list[Record]:
    result = await connection.execute(
        select(timers).where(timers.c.lead_id == lead_id).order_by(timers.c.due_at, timers.c.id)
    )
    return list(result)


async def select_audiences(connection: AsyncConnection, lead_id: int) -> list[Record]:
    result = await connection.execute(
        select(audience_members)
        .where(audience_members.c.lead_id == lead_id)
        .order_by(audience_members.c.added_at, audience_members.c.audience)
    )
    return list(result)


async def select_outbox(connection: AsyncConnection, lead_id: int) -> list[Record]:
    result = await connection.execute(
        select(outbox).where(outbox.c.lead_id == lead_id).order_by(outbox.c.created_at, outbox.c.id)
    )
    return list(result)


async def select_offers(connection: AsyncConnection, lead_ids: Sequence[int]) -> list[Record]:
    return list(
        await connection.execute(
            select(offer_codes)
            .where(offer_codes.c.lead_id.in_(lead_ids))
            .order_by(offer_codes.c.granted_at, offer_codes.c.id)
        )
    )


async def select_sequence_runs(connection: AsyncConnection, lead_id: int) -> list[Record]:
    return list(
        await connection.execute(
            select(sequence_runs)
            .where(sequence_runs.c.lead_id == lead_id)
            .order_by(sequence_runs.c.started_at, sequence_runs.c.id)
        )
    )


async def select_emails(connection: AsyncConnection, lead_ids: Sequence[int]) -> list[Record]:
    """Oldest first; emails queued for a lead before it was merged stay under its id."""
    result = await connection.execute(
        select(emails)
        .where(emails.c.lead_id.in_(lead_ids))
        .order_by(emails.c.created_at, emails.c.id)
    )
    return list(result)


async def select_goals(connection: AsyncConnection, enrollment_ids: Sequence[int]) -> list[Record]:
    if not enrollment_ids:
        return []
    result = await connection.execute(
        select(goals)
        .where(goals.c.enrollment_id.in_(enrollment_ids))
        .order_by(goals.c.at, goals.c.id)
    )
    return list(result)


async def select_recent_events(
    connection: AsyncConnection, lead_ids: Sequence[int], limit: int
) -> list[Record]:
    """Newest first; the events a merged lead had processed stay under its id."""
    result = await connection.execute(
        select(
            events.c.message_id,
            events.c.type,
            events.c.name,
            events.c.timestamp,
            events.c.received_at,
            events.c.processed_at,
            events.c.error,
        )
        .where(events.c.lead_id.in_(lead_ids))
        .order_by(events.c.timestamp.desc(), events.c.id.desc())
        .limit(limit)
    )
    return list(result)
