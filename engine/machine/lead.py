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
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

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


@dataclass(init=False, unsafe_hash=True)
class LeadEvent:
    """An inbox message of the lead, as the machine needs it."""

    seq: Final[int]  # arrival order: breaks ties between events of the same timestamp
    name: Final[str]
    timestamp: Final[datetime]
    message_id: Final[str]
    properties: Final[Mapping[str, Any]]
    context: Final[Mapping[str, Any]]
    traits: Final[Mapping[str, Any]]  # identify: traits to merge

    def __init__(
        self,
        seq: int,
        name: str,
        timestamp: datetime,
        message_id: str,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        traits: Mapping[str, Any] | None = None,
    ) -> None:
        self.seq = seq
        self.name = name
        self.timestamp = timestamp
        self.message_id = message_id
        self.properties = {} if properties is None else properties
        self.context = {} if context is None else context
        self.traits = {} if traits is None else traits


@dataclass(init=False, unsafe_hash=True)
class PendingTimer:
    journey_id: Final[str]
    entry_no: Final[int]
    stage: Final[str]
    epoch: Final[int]
    transition: Final[int]
    due_at: Final[datetime]
    id: Final[int | None]  # the stored row; None for a timer started in this run

    def __init__(
        self,
        journey_id: str,
        entry_no: int,
        stage: str,
        epoch: int,
        transition: int,
        due_at: datetime,
        id: int | None = None,
    ) -> None:
        self.journey_id = journey_id
        self.entry_no = entry_no
        self.stage = stage
        self.epoch = epoch
        self.transition = transition
        self.due_at = due_at
        self.id = id


@dataclass(init=False, unsafe_hash=True)
class Lead:
    """What the machine knows of a lead: traits, the time reached, latest enrollments."""

    traits: Final[Mapping[str, Any]]
    watermark: Final[datetime | None]
    enrollments: Final[Mapping[str, Enrollment]]  # the latest enrollment per journey id

    def __init__(
        self,
        traits: Mapping[str, Any],
        watermark: datetime | None,
        enrollments: Mapping[str, Enrollment],
    ) -> None:
        self.traits = traits
        self.watermark = watermark
        self.enrollments = enrollments


@dataclass(init=False, unsafe_hash=True)
class JourneyEffect:
    """An effect, the enrollment (journey and entry number) it belongs to, and when."""

    journey_id: Final[str]
    entry_no: Final[int]
    at: Final[datetime]
    effect: Final[Effect]

    def __init__(self, journey_id: str, entry_no: int, at: datetime, effect: Effect) -> None:
        self.journey_id = journey_id
        self.entry_no = entry_no
        self.at = at
        self.effect = effect


@dataclass(init=False, unsafe_hash=True)
class Outcome:
    lead: Final[Lead]
    changed: Final[tuple[Enrollment, ...]]  # the final value of each enrollment this run changed
    effects: Final[tuple[JourneyEffect, ...]]
    fired: Final[tuple[int, ...]]  # stored timers consumed (fired or found void)
    cancelled: Final[frozenset[tuple[str, int]]]  # enrollments whose stored timers are all void
    timers: Final[tuple[PendingTimer, ...]]  # timers started and still pending: to store

    def __init__(
        self,
        lead: Lead,
        changed: tuple[Enrollment, ...],
        effects: tuple[JourneyEffect, ...],
        fired: tuple[int, ...],
        cancelled: frozenset[tuple[str, int]],
        timers: tuple[PendingTimer, ...],
    ) -> None:
        self.lead = lead
        self.changed = changed
        self.effects = effects
        self.fired = fired
        self.cancelled = cancelled
        self.timers = timers


class _Queued:
    """An input waiting in the run's queue, behind its sort key (see `_Entry`).

    A timer started in this run is voided in place when its enrollment cancels its
    timers. Entries of equal keys compare as neither first, as the keys alone would.
    """

    __slots__ = ("item", "void")

    def __init__(self, item: LeadEvent | PendingTimer) -> None:
        self.item = item
        self.void = False

    def __lt__(self, other: _Queued) -> bool:
        return False


# (when, rank, tie, input): rank 0 is a timer and 1 an event, at the same instant; the
# tie is the arrival order of events, and journey, entry, epoch, transition of timers.
# Plain tuples, so that the heap compares them without a call into Python.
_Entry = tuple[datetime, int, tuple[str | int, ...], _Queued]


def advance(
    book: JourneyBook,
    lead: Lead,
    events: Sequence[LeadEvent],
    timers: Sequence[PendingTimer],
    until: datetime,
) -> Outcome:
    """Apply `events` and the due stored `timers` to `lead`; fire timeouts due by `until`."""
    run = _Run(book, lead, until)
    push, queue = heapq.heappush, run.queue
    for event in events:
        push(queue, (event.timestamp, 1, (event.seq,), _Queued(event)))
        if event.timestamp > run.horizon:
            run.horizon = event.timestamp
    for timer in timers:
        push(queue, _timer_entry(timer))
    run.upgrade_enrollments()
    run.drain()
    return run.outcome()


def _timer_entry(timer: PendingTimer) -> _Entry:
    tie = (timer.journey_id, timer.entry_no, timer.epoch, timer.transition)
    return (timer.due_at, 0, tie, _Queued(timer))


class _Run:
    """The working state of one `advance` call."""

    def __init__(self, book: JourneyBook, lead: Lead, until: datetime) -> None:
        self.book = book
        self.traits = dict(lead.traits)
        # A copy of `traits` as events carry them, shared by events until traits change.
        self.traits_seen: dict[str, Any] | None = None
        self.watermark = lead.watermark
        self.enrollments = dict(lead.enrollments)
        self.horizon = until  # timers started in this run fire inline when due by then
        self.queue: list[_Entry] = []
        self.effects: list[JourneyEffect] = []
        self.changed: dict[tuple[str, int], Enrollment] = {}
        self.fired: list[int] = []
        self.cancelled: set[tuple[str, int]] = set()
        self.started: dict[tuple[str, int], list[_Entry]] = {}

    def upgrade_enrollments(self) -> None:
        """Enrollments on an older map move to the current one if their stage is still there."""
        at: datetime | None = None
        for journey_id, enrollment in sorted(self.enrollments.items()):
            current = self.book.current.get(journey_id)
            if current is None or journey_id in self.book.retired:
                continue
            # Only forward: an older process in a rolling deploy must not move runs back.
            if enrollment.active and enrollment.version < current.version:
                if at is None:  # before the first upgrade queues the timers it starts
                    at = self._first_moment()
                self._apply(journey_id, upgrade(current, enrollment, at), at)

    def _first_moment(self) -> datetime:
        first = min((entry[0] for entry in self.queue), default=self.horizon)
        return first if self.watermark is None else max(first, self.watermark)

    def drain(self) -> None:
        queue, pop = self.queue, heapq.heappop
        while queue:
            at, _, _, queued = pop(queue)
            if queued.void:
                continue
            item = queued.item
            now = at if self.watermark is None else max(at, self.watermark)
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
        journey = self.book.versions[(timer.journey_id, enrollment.version)]
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
            self.traits_seen = None
        traits = self.traits_seen
        if traits is None:
            traits = self.traits_seen = dict(self.traits)
        watermark = self.watermark
        event = Event(
            message.name,
            message.timestamp,
            message.message_id,
            message.properties,
            message.context,
            traits,
            watermark is not None and message.timestamp < watermark,
        )
        for journey_id, journey in self._listeners(message.name):
            previous = self.enrollments.get(journey_id)
            self._apply(journey_id, step(journey, previous, event, now), now)

    def _listeners(self, name: str) -> list[tuple[str, Journey]]:
        """The journeys this event may change for the lead, in a fixed order."""
        book = self.book
        found: dict[str, Journey] = {}
        for journey_id, enrollment in self.enrollments.items():
            if enrollment.state == "active":
                journey = book.versions[(journey_id, enrollment.version)]
            elif journey_id in book.retired:
                continue
            else:
                journey = book.current[journey_id]
            if name in journey.listens_to:
                found[journey_id] = journey
        for journey in book.entries_on.get(name, ()):
            # A run in progress cannot enter again; an older map it runs on may not listen
            # to the current map's entry event, and the current map may lack its stage.
            running = self.enrollments.get(journey.id)
            if running is None or not running.active:
                found.setdefault(journey.id, journey)
        return sorted(found.items()) if len(found) > 1 else list(found.items())

    def _apply(self, journey_id: str, result: Step, now: datetime) -> None:
        enrollment = result.enrollment
        if enrollment is None:
            return
        entry_no = enrollment.entry_no
        key = (journey_id, entry_no)
        if enrollment is not self.enrollments.get(journey_id):
            self.enrollments[journey_id] = enrollment
            self.changed[key] = enrollment
        append = self.effects.append
        for effect in result.effects:
            append(JourneyEffect(journey_id, entry_no, now, effect))
            kind = type(effect)  # the core's own values: one type test, not an isinstance each
            if kind is StartTimer:
                self._start(journey_id, entry_no, cast(StartTimer, effect))
            elif kind is CancelTimers:
                self.cancelled.add(key)
                for entry in self.started.pop(key, ()):
                    entry[3].void = True
            elif kind is SetTrait:
                trait = cast(SetTrait, effect)
                self.traits[trait.name] = trait.value
                self.traits_seen = None

    def _start(self, journey_id: str, entry_no: int, start: StartTimer) -> None:
        timer = PendingTimer(
            journey_id, entry_no, start.stage, start.epoch, start.transition, start.due_at, None
        )
        entry = _timer_entry(timer)
        self.started.setdefault((journey_id, entry_no), []).append(entry)
        if start.due_at <= self.horizon:
            heapq.heappush(self.queue, entry)

    def outcome(self) -> Outcome:
        horizon = self.horizon
        pending = tuple(
            queued.item
            for entries in self.started.values()
            for at, _, _, queued in entries
            if not queued.void and at > horizon and isinstance(queued.item, PendingTimer)
        )
        return Outcome(
            Lead(self.traits, self.watermark, self.enrollments),
            tuple(self.changed.values()),
            tuple(self.effects),
            tuple(self.fired),
            frozenset(self.cancelled),
            pending,
        )
