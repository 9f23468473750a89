"""The worker's unit of work: claim leads, run the pure machine on them, write the outcome.

One batch is one transaction: the claim (row locks on the leads), the merges the
pending events call for, the loading of everything the machine needs in a few bulk
queries, `advance()` for each lead, and the bulk write of what came out, with the
events marked processed. A crash anywhere leaves all of it or none of it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.clock import Clock
from engine.db import queries
from engine.db.database import Database
from engine.db.schema import events, timers
from engine.journey.model import Journey
from engine.machine.book import JourneyBook
from engine.machine.lead import Lead, LeadEvent, PendingTimer, advance
from engine.machine.values import Enrollment
from engine.worker.changes import Changes, EnrollmentKey, enrollment_from_row
from engine.worker.merge import merge_leads

log = logging.getLogger("cjm.worker")

Claim = Callable[[AsyncConnection, datetime], Awaitable[list[int]]]

# A lead whose processing raised (a bug, not bad luck: the core is deterministic) has
# its due timers put back by this much, so it cannot spin the worker.
FAILED_TIMER_BACKOFF = timedelta(minutes=10)


class Processor:
    def __init__(
        self,
        db: Database,
        book: JourneyBook,
        clock: Clock,
        *,
        batch_leads: int = 500,
        batch_events: int = 20_000,
    ) -> None:
        self.db = db
        self.book = book
        self.clock = clock
        self.batch_leads = batch_leads
        self.batch_events = batch_events

    async def process_events(self) -> int:
        """One batch of leads with pending events; the number of leads processed."""
        return await self._process(
            lambda connection, _: queries.claim_leads_with_events(connection, self.batch_leads)
        )

    async def process_due_timers(self) -> int:
        return await self._process(
            lambda connection, now: queries.claim_leads_with_due_timers(
                connection, now, self.batch_leads
            )
        )

    async def process_old_versions(self) -> int:
        """Move leads on an older journey version whose stage still exists to the current one."""
        done = 0
        for journey in self.book.current.values():
            if journey.id in self.book.retired:
                continue

            async def claim(
                connection: AsyncConnection, _: datetime, journey: Journey = journey
            ) -> list[int]:
                stages = [stage.id for stage in journey.stages]
                return await queries.claim_leads_on_old_versions(
                    connection, journey.id, journey.version, stages, self.batch_leads
                )

            done += await self._process(claim)
        return done

    async def _process(self, claim: Claim) -> int:
        now = self.clock.now()
        async with self.db.write() as connection:
            lead_ids = await claim(connection, now)
            if not lead_ids:
                return 0
            lead_ids = await self._merge(connection, lead_ids, now)
            await self._run(connection, lead_ids, now)
            return len(lead_ids)

    async def _merge(
        self, connection: AsyncConnection, lead_ids: list[int], now: datetime
    ) -> list[int]:
        """Carry out the merges pending events ask for; the leads left to process now.

        A lead whose partner is locked by another worker waits for the next batch.
        """
        pairs = await queries.merges_pending(connection, lead_ids)
        if not pairs:
            return lead_ids
        claimed = set(lead_ids)
        merged_into = {
            row.id: row.merged_into
            for row in await queries.load_leads(
                connection, sorted({lead for pair in pairs for lead in pair})
            )
        }
        skip: set[int] = set()
        for survivor, absorbed in pairs:
            if survivor in skip or survivor == absorbed:
                continue
            if merged_into.get(survivor) is not None or merged_into.get(absorbed) is not None:
                continue
            if absorbed not in claimed and not await queries.lock_lead(connection, absorbed):
                skip.add(survivor)
                continue
            await merge_leads(connection, survivor, absorbed, now)
            merged_into[absorbed] = survivor
            skip.add(absorbed)
            log.info("merged lead %s into lead %s", absorbed, survivor)
        return [lead for lead in lead_ids if lead not in skip]

    async def _run(self, connection: AsyncConnection, lead_ids: list[int], now: datetime) -> None:
        lead_rows = await queries.load_leads(connection, lead_ids)
        live = [row for row in lead_rows if row.merged_into is None]
        for row in lead_rows:
            if row.merged_into is not None:
                await self._forward_events(connection, row.id, row.merged_into)
        ids = [row.id for row in live]
        events_by_lead = _group(
            await queries.load_pending_events(connection, ids, self.batch_events)
        )
        timers_by_lead = _group(await queries.load_due_timers(connection, ids, now))
        enrollment_rows = await queries.load_enrollments(connection, ids)
        known: dict[EnrollmentKey, int] = {
            (row.lead_id, row.journey_id, row.entry_no): row.id for row in enrollment_rows
        }
        latest = _latest_enrollments(enrollment_rows)
        changes = Changes(known, now)
        failed: list[tuple[int, list[Any], list[Any]]] = []
        for row in live:
            lead_events = events_by_lead.get(row.id, [])
            lead_timers = timers_by_lead.get(row.id, [])
            lead = Lead(row.traits or {}, row.watermark, latest.get(row.id, {}))
            try:
                outcome = advance(
                    self.book,
                    lead,
                    [_lead_event(event) for event in lead_events],
                    [_pending_timer(timer) for timer in lead_timers],
                    now,
                )
            except Exception:
                log.exception("processing lead %s failed", row.id)
                failed.append((row.id, lead_events, lead_timers))
                continue
            changes.add_outcome(row.id, outcome, [event.id for event in lead_events])
        await changes.write(connection)
        for lead_id, lead_events, lead_timers in failed:
            await self._quarantine(connection, lead_id, lead_events, lead_timers, now)

    async def _forward_events(
        self, connection: AsyncConnection, absorbed: int, survivor: int
    ) -> None:
        """Events that reached a lead after it was merged belong to the surviving lead."""
        await connection.execute(
            update(events)
            .where(events.c.lead_id == absorbed, events.c.processed_at.is_(None))
            .values(lead_id=survivor)
        )

    async def _quarantine(
        self,
        connection: AsyncConnection,
        lead_id: int,
        lead_events: Sequence[Any],
        lead_timers: Sequence[Any],
        now: datetime,
    ) -> None:
        """Keep a lead the machine failed on out of the loop, its data intact for a replay."""
        await queries.mark_processed(
            connection, [event.id for event in lead_events], now, error="processing failed"
        )
        await connection.execute(
            update(timers)
            .where(timers.c.id.in_([timer.id for timer in lead_timers]))
            .values(due_at=now + FAILED_TIMER_BACKOFF)
        )
        log.error("lead %s quarantined: its events are kept with an error", lead_id)


def _group(rows: Sequence[Any]) -> dict[int, list[Any]]:
    grouped: dict[int, list[Any]] = {}
    for row in rows:
        grouped.setdefault(row.lead_id, []).append(row)
    return grouped


def _latest_enrollments(rows: Sequence[Any]) -> dict[int, dict[str, Enrollment]]:
    """Per lead and journey: the active run, else the one that entered last."""
    latest: dict[int, dict[str, Any]] = {}
    for row in rows:
        per_lead = latest.setdefault(row.lead_id, {})
        held = per_lead.get(row.journey_id)
        if held is None or _rank(row) > _rank(held):
            per_lead[row.journey_id] = row
    return {
        lead_id: {journey: enrollment_from_row(row) for journey, row in per_lead.items()}
        for lead_id, per_lead in latest.items()
    }


def _rank(row: Any) -> tuple[bool, datetime, int]:
    return (row.state == "active", row.entered_at, row.entry_no)


def _lead_event(row: Any) -> LeadEvent:
    data = row.data or {}
    return LeadEvent(
        seq=row.id,
        name=row.name,
        timestamp=row.timestamp,
        message_id=row.message_id,
        properties=data.get("properties") or {},
        context=data.get("context") or {},
        traits=data.get("traits") or {},
    )


def _pending_timer(row: Any) -> PendingTimer:
    return PendingTimer(
        journey_id=row.journey_id,
        entry_no=row.entry_no,
        stage=row.stage,
        epoch=row.epoch,
        transition=row.transition,
        due_at=row.due_at,
        id=row.id,
    )
