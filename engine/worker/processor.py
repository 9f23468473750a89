"""The worker's unit of work: claim leads, run the pure machine on them, write the outcome.

One batch is one transaction: the claim (row locks on the leads), the merges the
pending events call for, the loading of everything the machine needs in a few bulk
queries, `advance()` for each lead, and the bulk write of what came out, with the
events marked processed. A crash anywhere leaves all of it or none of it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from engine.clock import Clock
from engine.db import queries
from engine.db.database import Database, SqlConnection
from engine.journey.model import Journey
from engine.kpis.sources import FirstTouch, first_touch
from engine.machine.book import JourneyBook
from engine.machine.lead import Lead, LeadEvent, PendingTimer, advance
from engine.machine.values import Enrollment
from engine.metrics import count_worker_batch
from engine.worker.batching import BatchSize, for_database
from engine.worker.changes import Changes, EnrollmentKey, enrollment_from_row
from engine.worker.merge import merge_leads

log = logging.getLogger("cjm.worker")

# Claims up to the given number of leads, as of the given time (plain SQL: it runs in the
# batch's trip to SQLite's thread with the loads).
Claim = Callable[[SqlConnection, datetime, int], Awaitable[list[int]]]

# A lead whose processing raised (a bug, not bad luck: the core is deterministic) has
# its due timers put back by this much, so it cannot spin the worker.
FAILED_TIMER_BACKOFF = timedelta(minutes=10)


@dataclass
class Tally:
    """What one batch did, for the metrics once it has committed."""

    transitions: Counter[str] = field(default_factory=Counter)
    timer_lags: list[float] = field(default_factory=list)

    def add(self, changes: Changes) -> None:
        self.transitions.update(changes.moves)
        self.timer_lags.extend(changes.timer_lags)


# Work a channel does in the worker's transaction with the events it applies (an
# offer code in `properties.coupon` is redeemed): exactly once, as the events are.
EventHook = Callable[[AsyncConnection, Sequence[queries.EventRow], datetime], Awaitable[None]]


class Processor:
    def __init__(
        self,
        db: Database,
        book: JourneyBook,
        clock: Clock,
        *,
        batch_leads: int | None = None,
        batch_events: int = 20_000,
        event_hooks: Sequence[EventHook] = (),
    ) -> None:
        """`batch_leads`: claim this many leads per batch, instead of sizing batches by
        their duration (engine/worker/batching.py)."""
        self.db = db
        self.event_hooks = tuple(event_hooks)
        self.book = book
        self.clock = clock
        self.batch_events = batch_events
        self._batch_leads = batch_leads

        def size() -> BatchSize:
            if batch_leads is None:
                return for_database(db.is_sqlite)
            return BatchSize(smallest=batch_leads, first=batch_leads, largest=batch_leads)

        # Sized apart: a lead's pending events cost far more than a due timer.
        self.event_batches = size()
        self.timer_batches = size()
        self.version_batches = size()
        # Whether the last batch of events claimed as many leads as it could: then more
        # are known to wait. False while a batch is under way, so one that fails leaves
        # the next to look first.
        self.last_batch_full = False

    def another_lane(self) -> Processor:
        """A processor for one more batch in flight at once (the worker's lanes on
        PostgreSQL): the same database, journeys and hooks, and batch sizes and flags of
        its own, since each learns from its own batches."""
        return Processor(
            self.db,
            self.book,
            self.clock,
            batch_leads=self._batch_leads,
            batch_events=self.batch_events,
            event_hooks=self.event_hooks,
        )

    async def process_events(self, *, announced: bool = False) -> int:
        """One batch of leads with pending events; how many leads were taken forward.
        `announced`: events were said to be waiting (this process's inbox committed
        some, or another lane found a backlog)."""
        # A look on a reader first: an idle poll never queues for the one writer. Not
        # after a full batch, nor when events were announced: they are known to wait,
        # and the look would cost a read transaction for nothing on every batch of a
        # busy stream (0.6 ms of CPU on SQLite, more than a batch that claims nothing).
        if not (self.last_batch_full or announced):
            async with self.db.read() as connection:
                if not await queries.any_pending_events(connection):
                    return 0
        self.last_batch_full = False
        done, full = await self._process(
            lambda connection, _, limit: queries.claim_leads_with_events(connection, limit),
            self.event_batches,
        )
        # Set once the batch is over, not inside it: a timer batch of the sweep, which
        # shares this processor, may end meanwhile.
        self.last_batch_full = full
        return done

    async def process_due_timers(self) -> int:
        async with self.db.read() as connection:
            if not await queries.any_due_timers(connection, self.clock.now()):
                return 0
        done, _ = await self._process(
            lambda connection, now, limit: queries.claim_leads_with_due_timers(
                connection, now, limit
            ),
            self.timer_batches,
        )
        return done

    async def process_old_versions(self) -> int:
        """Move leads on an older journey version whose stage still exists to the current one."""
        done = 0
        for journey in self.book.current.values():
            if journey.id in self.book.retired:
                continue

            async def claim(
                connection: SqlConnection, _: datetime, limit: int, journey: Journey = journey
            ) -> list[int]:
                stages = [stage.id for stage in journey.stages]
                return await queries.claim_leads_on_old_versions(
                    connection, journey.id, journey.version, stages, limit
                )

            moved, _ = await self._process(claim, self.version_batches)
            done += moved
        return done

    async def _process(self, claim: Claim, size: BatchSize) -> tuple[int, bool]:
        """One batch: how many leads were taken forward, and whether it claimed as many
        as it could (more may be waiting)."""
        now = self.clock.now()
        tally = Tally()
        limit = size.leads

        async def claim_now(sql: SqlConnection) -> list[int]:
            return await claim(sql, now, limit)

        async with self.db.write() as connection:
            # From the writer's turn on, not from asking for it: the time others wait.
            started = time.perf_counter()
            loaded = await self._load(connection, now, claim=claim_now)
            claimed = len(loaded.lead_ids)
            if not claimed:
                return 0, False
            done = await self._run(connection, loaded, now, tally)
            others_waited = self.db.others_wait()
        size.observe(claimed, time.perf_counter() - started, others_waited=others_waited)
        count_worker_batch(tally.transitions, tally.timer_lags)
        return done, claimed >= limit

    async def _load(
        self,
        connection: AsyncConnection,
        now: datetime,
        *,
        claim: Callable[[SqlConnection], Awaitable[list[int]]] | None = None,
        lead_ids: Sequence[int] = (),
    ) -> _Loaded:
        """The batch's leads, claimed by `claim` or else `lead_ids`, and everything the
        machine needs about them, in one trip to SQLite's thread: the merges their
        pending events ask for, the leads, their pending events, due timers and runs.
        Through SQLAlchemy the claim, the merges and the leads took a trip each, about
        0.2 ms of CPU apiece, paid many times a second by the batches of a few dozen
        leads that tracking traffic makes (bench/batches.py).
        """

        async def load(sql: SqlConnection) -> _Loaded:
            ids = sorted(lead_ids if claim is None else await claim(sql))
            if not ids:
                return _Loaded([], [], [], [], [], [])
            return _Loaded(
                ids,
                await queries.merges_pending(sql, ids),
                await queries.load_leads(sql, ids),
                await queries.load_pending_events(sql, ids, self.batch_events),
                await queries.load_due_timers(sql, ids, now),
                await queries.load_enrollments(sql, ids),
            )

        return await self.db.within_write(connection, load)

    async def _merge(
        self, connection: AsyncConnection, lead_ids: list[int], now: datetime
    ) -> list[int]:
        """Carry out the merges the pending events ask for; the leads to process now.

        Repeated until none is left, since a merge brings the absorbed lead's pending
        events, which may ask for more. A lead whose partner another worker holds, or
        whose merge failed, waits for a later batch with its events pending.
        """
        waiting: set[int] = set()
        absorbed: set[int] = set()
        merged = True
        while merged:
            merged = False
            live = [lead for lead in lead_ids if lead not in waiting and lead not in absorbed]
            for survivor, partner in await queries.merges_pending(connection, live):
                if survivor in waiting or survivor in absorbed:
                    continue
                other = await queries.lock_live_lead(connection, partner)
                if other is None:
                    waiting.add(survivor)
                    continue
                if other == survivor:
                    continue  # one lead already
                try:
                    async with connection.begin_nested():
                        await merge_leads(connection, survivor, other, now)
                except Exception:
                    log.exception("merging lead %s into lead %s failed", other, survivor)
                    waiting.add(survivor)
                    continue
                log.info("merged lead %s into lead %s", other, survivor)
                absorbed.add(other)
                merged = True
        return [lead for lead in lead_ids if lead not in waiting and lead not in absorbed]

    async def _run(
        self, connection: AsyncConnection, loaded: _Loaded, now: datetime, tally: Tally
    ) -> int:
        """Advance the claimed leads (as loaded); how many were taken forward (not left
        for later)."""
        # Rare, as merges are: carried out through SQLAlchemy, then the leads loaded again.
        if loaded.merges:
            lead_ids = await self._merge(connection, loaded.lead_ids, now)
            loaded = await self._load(connection, now, lead_ids=lead_ids)
        # A lead absorbed by an earlier batch: its events go on to the lead it joined,
        # in this batch if that lead is in it, else in the next (counted as taken
        # forward, so that the next batch follows at once).
        absorbed = [
            (row.id, row.merged_into) for row in loaded.leads if row.merged_into is not None
        ]
        if absorbed:
            for lead_id, survivor in absorbed:
                await queries.forward_to_survivor(connection, lead_id, survivor)
            live_ids = [row.id for row in loaded.leads if row.merged_into is None]
            loaded = await self._load(connection, now, lead_ids=live_ids)
        live = sorted(loaded.leads, key=lambda row: row.id)
        pending, due, enrollment_rows = loaded.pending, loaded.due, loaded.enrollments
        events_by_lead = _group(pending)
        horizons = _horizons(live, events_by_lead, self.batch_events, now)
        timers_by_lead = _group(due)
        known: dict[EnrollmentKey, int] = {
            (row.lead_id, row.journey_id, row.entry_no): row.id for row in enrollment_rows
        }
        latest = _latest_enrollments(enrollment_rows)
        changes = Changes(known, now)
        applied: list[queries.EventRow] = []
        failed: list[tuple[int, list[queries.EventRow], list[queries.DueTimerRow]]] = []
        for row in live:
            until = horizons.get(row.id)
            if until is None:
                continue  # its events did not fit in this batch: the next one takes it
            runs = latest.get(row.id, {})
            unknown = [run for run in runs.values() if not self._knows(run)]
            if unknown:
                log.warning(
                    "lead %s runs on %s, unknown to this process: left for one that knows it",
                    row.id,
                    ", ".join(f"{run.journey_id} v{run.version}" for run in unknown),
                )
                continue
            lead_events = events_by_lead.get(row.id, [])
            lead_timers = [t for t in timers_by_lead.get(row.id, []) if t.due_at <= until]
            lead = Lead(row.traits, row.watermark, runs)
            try:
                outcome = advance(
                    self.book,
                    lead,
                    [_lead_event(event) for event in lead_events],
                    [_pending_timer(timer) for timer in lead_timers],
                    until,
                )
            except Exception:
                log.exception("processing lead %s failed", row.id)
                failed.append((row.id, lead_events, lead_timers))
                continue
            stored_touch = FirstTouch(row.first_source, row.first_source_at)
            # Events alone can change it: a timeout's move skips the look. Unchanged, the
            # same object comes back, known without comparing.
            touch = (
                first_touch(
                    stored_touch,
                    [(event.timestamp, event.data.get("context")) for event in lead_events],
                )
                if lead_events
                else stored_touch
            )
            touch_moved = touch is not stored_touch and touch != stored_touch
            event_ids = [event.id for event in lead_events]
            changes.add_outcome(row.id, outcome, event_ids, touch, touch_moved, lead)
            applied.extend(lead_events)
        # On SQLite in one trip to the driver's thread, as the loads above: with a trip
        # per statement through SQLAlchemy, a batch of 20 leads cost about a third more
        # CPU (bench/batches.py).
        await self.db.within_write(connection, changes.write)
        for hook in self.event_hooks:
            await hook(connection, applied, now)
        tally.add(changes)
        for lead_id, lead_events, lead_timers in failed:
            await self._quarantine(connection, lead_id, lead_events, lead_timers, now)
        return changes.advanced + len(failed) + len(absorbed)

    def _knows(self, run: Enrollment) -> bool:
        """Whether this process has the journey version the run is on (during a rolling
        deploy, an older process may meet a run a newer one put on a newer version)."""
        return (run.journey_id, run.version) in self.book.versions

    async def _quarantine(
        self,
        connection: AsyncConnection,
        lead_id: int,
        lead_events: Sequence[queries.EventRow],
        lead_timers: Sequence[queries.DueTimerRow],
        now: datetime,
    ) -> None:
        """Set aside a lead the machine failed on (a bug: the core is deterministic).

        Its events are kept, marked with the error and not applied; its due timers
        wait, so it cannot spin the worker. Everything else in the batch goes on.
        """
        await queries.mark_processed(
            connection, [event.id for event in lead_events], now, error="processing failed"
        )
        await queries.postpone_timers(
            connection, [timer.id for timer in lead_timers], now + FAILED_TIMER_BACKOFF
        )
        log.error("lead %s set aside: its events are kept, marked with the error", lead_id)


Row = TypeVar("Row", queries.EventRow, queries.DueTimerRow)


class _Loaded(NamedTuple):
    """What one trip loads for a batch (`Processor._load`)."""

    lead_ids: list[int]  # ascending
    merges: list[tuple[int, int]]  # (lead, the lead it is to absorb), as `merges_pending`
    leads: list[queries.LeadRow]
    pending: list[queries.EventRow]
    due: list[queries.DueTimerRow]
    enrollments: list[queries.EnrollmentRow]


def _group(rows: Sequence[Row]) -> dict[int, list[Row]]:
    grouped: dict[int, list[Row]] = {}
    for row in rows:
        grouped.setdefault(row.lead_id, []).append(row)
    return grouped


def _horizons(
    leads: Sequence[queries.LeadRow],
    events_by_lead: dict[int, list[queries.EventRow]],
    limit: int,
    now: datetime,
) -> dict[int, datetime]:
    """How far in time each lead may be taken in this batch.

    Events load in lead order up to `limit`: when the limit is hit, the last lead
    loaded may have more, so it goes only as far as its last loaded event (a timer
    due later must wait for the events before it), and leads after it not at all.
    """
    loaded = sum(len(events) for events in events_by_lead.values())
    if loaded < limit:
        return {lead.id: now for lead in leads}
    last = max(events_by_lead)
    horizons = {lead.id: now for lead in leads if lead.id < last}
    horizons[last] = min(now, events_by_lead[last][-1].timestamp)
    return horizons


def _latest_enrollments(
    rows: Sequence[queries.EnrollmentRow],
) -> dict[int, dict[str, Enrollment]]:
    """Per lead and journey: the active run, else the one that entered last (the core
    numbers a new run after it; merges renumber runs in their order of entry). Only
    those become machine values."""
    latest: dict[int, dict[str, queries.EnrollmentRow]] = {}
    for row in rows:
        per_lead = latest.setdefault(row.lead_id, {})
        held = per_lead.get(row.journey_id)
        if held is None or _rank(row) > _rank(held):
            per_lead[row.journey_id] = row
    return {
        lead_id: {journey: enrollment_from_row(row) for journey, row in per_lead.items()}
        for lead_id, per_lead in latest.items()
    }


def _rank(row: queries.EnrollmentRow) -> tuple[bool, int, int]:
    return (row.state == "active", row.entered_at, row.entry_no)


def _lead_event(row: queries.EventRow) -> LeadEvent:
    data = row.data
    return LeadEvent(
        row.id,
        row.name,
        row.timestamp,
        row.message_id,
        data.get("properties") or {},
        data.get("context") or {},
        data.get("traits") or {},
    )


def _pending_timer(row: queries.DueTimerRow) -> PendingTimer:
    return PendingTimer(
        row.journey_id, row.entry_no, row.stage, row.epoch, row.transition, row.due_at, row.id
    )
