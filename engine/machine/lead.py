"""`advance()`: everything pending for one lead, applied in time order across its journeys.

Pure, like `step()`, which it calls. Events and due timers are merged into one
stream ordered by time (a timer before an event of the same instant; events of the
same instant in arrival order; timers of the same instant by journey id, then in the
order of their stage's transitions, so the first listed wins whatever order the
shell hands them in). A timeout started on the way that falls due before
the next input, or by `until`, fires in its place, so a backlog of old events is
replayed exactly as if it had arrived live. The shell persists the outcome in one
transaction; the simulator calls this on a virtual clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.journey.model import Journey
from engine.machine.book import JourneyBook
from engine.machine.step import step, upgrade
from engine.machine.values import (
    CancelTimers,
    Effect,
    Enrollment,
    Event,
    SetTrait,
    StartTimer,
    Step,
    TimerFired,
)


@dataclass(frozen=True, slots=True)
class LeadEvent:
    """An inbox message of the lead, as the machine needs it."""

    seq: int  # arrival order: breaks ties between events of the same timestamp
    name: str
    timestamp: datetime
    message_id: str
    properties: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)
    traits: Mapping[str, Any] = field(default_factory=dict)  # identify: traits to merge


@dataclass(frozen=True, slots=True)
class PendingTimer:
    journey_id: str
    entry_no: int
    stage: str
    epoch: int
    transition: int
    due_at: datetime
    id: int | None = None  # the stored row; None for a timer started in this run


@dataclass(frozen=True, slots=True)
class Lead:
    """What the machine knows of a lead: traits, the time reached, latest enrollments."""

    traits: Mapping[str, Any]
    watermark: datetime | None
    enrollments: Mapping[str, Enrollment]  # the latest enrollment per journey id


@dataclass(frozen=True, slots=True)
class JourneyEffect:
    """An effect, the enrollment (journey and entry number) it belongs to, and when."""

    journey_id: str
    entry_no: int
    at: datetime
    effect: Effect


@dataclass(frozen=True, slots=True)
class Outcome:
    lead: Lead
    changed: tuple[Enrollment, ...]  # the final value of every enrollment this run changed
    effects: tuple[JourneyEffect, ...]
    fired: tuple[int, ...]  # stored timers consumed (fired or found void)
    cancelled: frozenset[tuple[str, int]]  # enrollments whose stored timers are all void
    timers: tuple[PendingTimer, ...]  # timers started and still pending: to store


@dataclass(order=True)
class _Queued:
    at: datetime
    rank: int  # 0: timer, 1: event, at the same instant
    tie: tuple[str | int, ...]  # events: arrival; timers: journey, entry, epoch, transition
    item: LeadEvent | PendingTimer = field(compare=False)
    void: bool = field(default=False, compare=False)


def advance(
    book: JourneyBook,
    lead: Lead,
    events: Sequence[LeadEvent],
    timers: Sequence[PendingTimer],
    until: datetime,
) -> Outcome:
    """Apply `events` and the due stored `timers` to `lead`; fire timeouts due by `until`."""
    run = _Run(book, lead, until)
    for event in events:
        run.push(_Queued(event.timestamp, 1, (event.seq,), event))
        run.horizon = max(run.horizon, event.timestamp)
    for timer in timers:
        run.push(_timer_queued(timer))
    run.upgrade_enrollments()
    run.drain()
    return run.outcome()


def _timer_queued(timer: PendingTimer) -> _Queued:
    tie = (timer.journey_id, timer.entry_no, timer.epoch, timer.transition)
    return _Queued(timer.due_at, 0, tie, timer)


class _Run:
    """The working state of one `advance` call."""

    def __init__(self, book: JourneyBook, lead: Lead, until: datetime) -> None:
        self.book = book
        self.traits = dict(lead.traits)
        self.watermark = lead.watermark
        self.enrollments = dict(lead.enrollments)
        self.horizon = until  # timers started in this run fire inline when due by then
        self.queue: list[_Queued] = []
        self.effects: list[JourneyEffect] = []
        self.changed: dict[tuple[str, int], Enrollment] = {}
        self.fired: list[int] = []
        self.cancelled: set[tuple[str, int]] = set()
        self.started: dict[tuple[str, int], list[_Queued]] = {}

    def push(self, queued: _Queued) -> None:
        heapq.heappush(self.queue, queued)

    def upgrade_enrollments(self) -> None:
        """Enrollments on an older map move to the current one if their stage is still there."""
        at = self._first_moment()
        for journey_id, enrollment in sorted(self.enrollments.items()):
            current = self.book.current.get(journey_id)
            if current is None or journey_id in self.book.retired:
                continue
            # Only forward: an older process in a rolling deploy must not move runs back.
            if enrollment.active and enrollment.version < current.version:
                self._apply(journey_id, upgrade(current, enrollment, at), at)

    def _first_moment(self) -> datetime:
        first = min((queued.at for queued in self.queue), default=self.horizon)
        return first if self.watermark is None else max(first, self.watermark)

    def drain(self) -> None:
        while self.queue:
            queued = heapq.heappop(self.queue)
            if queued.void:
                continue
            item = queued.item
            now = queued.at if self.watermark is None else max(queued.at, self.watermark)
            if isinstance(item, PendingTimer):
                if not self._fire(item, now):
                    continue  # a void timer is no input: the lead's time stays where it was
            else:
                self._deliver(item, now)
            self.watermark = now

    def _fire(self, timer: PendingTimer, now: datetime) -> bool:
        """Fire `timer`; False when it was void (its stage or enrollment is gone)."""
        if timer.id is not None:
            self.fired.append(timer.id)
        enrollment = self.enrollments.get(timer.journey_id)
        if enrollment is None or not enrollment.active:
            return False
        journey = self.book.journey(timer.journey_id, enrollment.version)
        fired = TimerFired(
            timer.journey_id,
            timer.entry_no,
            timer.stage,
            timer.epoch,
            timer.transition,
            timer.due_at,
        )
        result = step(journey, enrollment, fired, now)
        self._apply(timer.journey_id, result, now)
        return result.enrollment is not enrollment

    def _deliver(self, message: LeadEvent, now: datetime) -> None:
        if message.traits:
            self.traits.update(message.traits)
        event = Event(
            name=message.name,
            timestamp=message.timestamp,
            message_id=message.message_id,
            properties=message.properties,
            context=message.context,
            traits=dict(self.traits),
            late=self.watermark is not None and message.timestamp < self.watermark,
        )
        for journey_id, journey in self._listeners(message.name):
            previous = self.enrollments.get(journey_id)
            self._apply(journey_id, step(journey, previous, event, now), now)

    def _listeners(self, name: str) -> list[tuple[str, Journey]]:
        """The journeys this event may change for the lead, in a fixed order."""
        found: dict[str, Journey] = {}
        for journey_id, enrollment in self.enrollments.items():
            if enrollment.active:
                journey = self.book.journey(journey_id, enrollment.version)
            elif journey_id in self.book.retired:
                continue
            else:
                journey = self.book.current[journey_id]
            if name in journey.listens_to:
                found[journey_id] = journey
        for journey in self.book.entries_on.get(name, ()):
            found.setdefault(journey.id, journey)
        return sorted(found.items())

    def _apply(self, journey_id: str, result: Step, now: datetime) -> None:
        enrollment = result.enrollment
        if enrollment is None:
            return
        key = (journey_id, enrollment.entry_no)
        if enrollment is not self.enrollments.get(journey_id):
            self.enrollments[journey_id] = enrollment
            self.changed[key] = enrollment
        for effect in result.effects:
            self.effects.append(JourneyEffect(journey_id, enrollment.entry_no, now, effect))
            if isinstance(effect, StartTimer):
                self._start(journey_id, enrollment.entry_no, effect)
            elif isinstance(effect, CancelTimers):
                self.cancelled.add(key)
                for queued in self.started.pop(key, []):
                    queued.void = True
            elif isinstance(effect, SetTrait):
                self.traits[effect.name] = effect.value

    def _start(self, journey_id: str, entry_no: int, start: StartTimer) -> None:
        timer = PendingTimer(
            journey_id, entry_no, start.stage, start.epoch, start.transition, start.due_at
        )
        queued = _timer_queued(timer)
        self.started.setdefault((journey_id, entry_no), []).append(queued)
        if start.due_at <= self.horizon:
            self.push(queued)

    def outcome(self) -> Outcome:
        pending = tuple(
            queued.item
            for queued_list in self.started.values()
            for queued in queued_list
            if not queued.void
            and queued.at > self.horizon
            and isinstance(queued.item, PendingTimer)
        )
        return Outcome(
            lead=Lead(self.traits, self.watermark, self.enrollments),
            changed=tuple(self.changed.values()),
            effects=tuple(self.effects),
            fired=tuple(self.fired),
            cancelled=frozenset(self.cancelled),
            timers=pending,
        )
