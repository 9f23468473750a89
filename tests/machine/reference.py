"""The pure core as first written, before its inner loop was optimized: the oracle
that `step()`, `upgrade()`, `leave()` and `advance()` must match exactly (the same
enrollments, the same effects in the same order) on any journey and any input.

Kept deliberately plain: every rule read off the journey model on every call, values
made by their dataclass constructors, one heap of queued inputs. It shares only the
value classes with the core. One change since: an event that only the current
map's entry listens to no longer reaches a run in progress on an older map (it raised
a KeyError when that map's stage was gone from the current one).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from engine.journey.model import (
    AfterTimeout,
    AudienceAdd,
    AudienceRemove,
    EmailSend,
    Journey,
    OfferGrant,
    SequenceStart,
    SequenceStop,
    Stage,
    TraitSet,
    format_duration,
)
from engine.machine.book import JourneyBook
from engine.machine.lead import JourneyEffect, Lead, LeadEvent, Outcome, PendingTimer
from engine.machine.values import (
    AddToAudience,
    CancelTimers,
    Cause,
    ChannelAction,
    Effect,
    Enrollment,
    Event,
    Input,
    ReachGoal,
    RemoveFromAudience,
    SetTrait,
    StartTimer,
    Step,
    TimerFired,
    Transitioned,
)

# --- step ----------------------------------------------------------------------------------------


def reference_step(
    journey: Journey, enrollment: Enrollment | None, input: Input, now: datetime
) -> Step:
    """Apply `input` at `now` to the lead's latest enrollment in `journey` (None: never in it).

    An input causes at most one move per journey: entering, leaving, or one transition.
    """
    if isinstance(input, TimerFired):
        return _on_timer(journey, enrollment, input, now)
    return _on_event(journey, enrollment, input, now)


def reference_upgrade(journey: Journey, enrollment: Enrollment, now: datetime) -> Step:
    """Move an active enrollment onto `journey`, a newer version of its map.

    Only possible while its stage still exists; its timeouts are planned again from
    the stage entry by the new map's durations (one already overdue fires at `now`).
    A stage that became terminal ends the run there, as entering it would have.
    """
    stage = journey.stage_by_id.get(enrollment.stage)
    if not enrollment.active or stage is None or enrollment.version == journey.version:
        return Step(enrollment)
    moved = replace(enrollment, version=journey.version, epoch=enrollment.epoch + 1)
    cause = Cause("version", detail=f"version {enrollment.version} to {journey.version}")
    effects: list[Effect] = [
        CancelTimers(),
        Transitioned(stage.id, stage.id, now, cause, since=moved.stage_entered_at),
        *_start_timers(stage, moved, since=moved.stage_entered_at, not_before=now),
    ]
    return Step(_finish_if_terminal(journey, moved, now, effects), tuple(effects))


def reference_leave(enrollment: Enrollment, now: datetime, cause: Cause) -> Step:
    """End an active enrollment at once: timers void, sequences stopped."""
    effects: list[Effect] = [
        CancelTimers(),
        Transitioned(enrollment.stage, None, now, cause, since=enrollment.stage_entered_at),
    ]
    effects.extend(_stop_sequences(enrollment, "exit"))
    ended = replace(enrollment, state="exited", ended_at=now, sequences=())
    return Step(ended, tuple(effects))


# --- inputs --------------------------------------------------------------------------------------


def _on_event(journey: Journey, enrollment: Enrollment | None, event: Event, now: datetime) -> Step:
    view = event.view
    effects: list[Effect] = []
    if enrollment is None or not enrollment.active:
        if _may_enter(journey, enrollment, event, view, now):
            entry_no = 1 if enrollment is None else enrollment.entry_no + 1
            enrollment = _new_enrollment(journey, entry_no, now)
            cause = _event_cause("entry", event)
            effects.extend(_enter_stage(journey, journey.first_stage, enrollment, None, now, cause))
            enrollment = _finish_if_terminal(journey, enrollment, now, effects)
        if enrollment is not None:
            effects.extend(_goal(journey, event, view))
        return Step(enrollment, tuple(effects))

    effects.extend(_goal(journey, event, view))
    for rule in journey.exit:
        if rule.on == event.name and rule.condition(view):
            left = reference_leave(enrollment, now, _event_cause("exit", event))
            return Step(left.enrollment, (*effects, *left.effects, *_leave_audiences(journey)))
    enrollment = _stop_on(journey, enrollment, event, effects)
    stage = journey.stage(enrollment.stage)
    for _, transition in stage.on_event.get(event.name, ()):
        if transition.condition(view):
            cause = _event_cause("event", event)
            return _move(journey, enrollment, transition.to, now, cause, effects)
    return Step(enrollment, tuple(effects))


def _on_timer(
    journey: Journey, enrollment: Enrollment | None, timer: TimerFired, now: datetime
) -> Step:
    if (
        enrollment is None
        or not enrollment.active
        or timer.entry_no != enrollment.entry_no
        or timer.epoch != enrollment.epoch
        or timer.stage != enrollment.stage
    ):
        return Step(enrollment)  # the lead left that stage: the timer is void
    transition = journey.stage(enrollment.stage).transitions[timer.transition]
    if not isinstance(transition, AfterTimeout):
        return Step(enrollment)
    cause = Cause("timer", timestamp=timer.due_at, after=format_duration(transition.after))
    return _move(journey, enrollment, transition.to, now, cause, [])


# --- moves ---------------------------------------------------------------------------------------


def _may_enter(
    journey: Journey,
    previous: Enrollment | None,
    event: Event,
    view: Mapping[str, Any],
    now: datetime,
) -> bool:
    entry = journey.entry
    if entry.on != event.name or not entry.condition(view):
        return False
    if previous is None:
        return True
    delay = entry.reentry_delay
    return delay is not None and now >= previous.entered_at + delay


def _new_enrollment(journey: Journey, entry_no: int, now: datetime) -> Enrollment:
    return Enrollment(
        journey_id=journey.id,
        version=journey.version,
        entry_no=entry_no,
        stage=journey.first_stage.id,
        state="active",
        epoch=1,
        entered_at=now,
        stage_entered_at=now,
    )


def _move(
    journey: Journey,
    enrollment: Enrollment,
    to: str,
    now: datetime,
    cause: Cause,
    effects: list[Effect],
) -> Step:
    effects.append(CancelTimers())
    # Spelled out rather than dataclasses.replace, which costs several times more on
    # the engine's hottest path.
    moved = Enrollment(
        journey_id=enrollment.journey_id,
        version=enrollment.version,
        entry_no=enrollment.entry_no,
        stage=to,
        state=enrollment.state,
        epoch=enrollment.epoch + 1,
        entered_at=enrollment.entered_at,
        stage_entered_at=now,
        ended_at=enrollment.ended_at,
        sequences=enrollment.sequences,
    )
    stage = journey.stage(to)
    effects.extend(
        _enter_stage(
            journey, stage, moved, enrollment.stage, now, cause, since=enrollment.stage_entered_at
        )
    )
    return Step(_finish_if_terminal(journey, moved, now, effects), tuple(effects))


def _enter_stage(
    journey: Journey,
    stage: Stage,
    enrollment: Enrollment,
    from_stage: str | None,
    now: datetime,
    cause: Cause,
    since: datetime | None = None,
) -> list[Effect]:
    effects: list[Effect] = [Transitioned(from_stage, stage.id, now, cause, since)]
    for index, action in enumerate(stage.on_enter):
        key = f"{enrollment.epoch}.{index}"
        if isinstance(action, AudienceAdd):
            effects.extend(AddToAudience(name) for name in action.audiences)
        elif isinstance(action, AudienceRemove):
            effects.extend(RemoveFromAudience(name) for name in action.audiences)
        elif isinstance(action, TraitSet):
            effects.extend(SetTrait(name, value) for name, value in action.traits.items())
        elif isinstance(action, EmailSend):
            effects.append(ChannelAction("email.send", action.template, key))
        elif isinstance(action, SequenceStart):
            effects.append(ChannelAction("sequence.start", action.sequence, key))
        elif isinstance(action, SequenceStop):
            effects.append(ChannelAction("sequence.stop", action.sequence, key))
        elif isinstance(action, OfferGrant):
            effects.append(ChannelAction("offer.grant", action.offer, key))
    effects.extend(_start_timers(stage, enrollment, since=now, not_before=now))
    return effects


def _start_timers(
    stage: Stage, enrollment: Enrollment, *, since: datetime, not_before: datetime
) -> list[Effect]:
    return [
        StartTimer(stage.id, enrollment.epoch, index, max(since + timeout.after, not_before))
        for index, timeout in stage.timeouts
    ]


def _with_sequences(enrollment: Enrollment, effects: list[Effect]) -> Enrollment:
    """The enrollment's running sequences after the channel actions among `effects`."""
    running = list(enrollment.sequences)
    for effect in effects:
        if isinstance(effect, ChannelAction):
            if effect.action == "sequence.start" and effect.target not in running:
                running.append(effect.target)
            elif effect.action == "sequence.stop" and effect.target in running:
                running.remove(effect.target)
    if tuple(running) == enrollment.sequences:
        return enrollment  # most steps start or stop none: no copy
    return replace(enrollment, sequences=tuple(running))


def _finish_if_terminal(
    journey: Journey, enrollment: Enrollment, now: datetime, effects: list[Effect]
) -> Enrollment:
    """A terminal stage ends the run: the lead leaves the journey there."""
    enrollment = _with_sequences(enrollment, effects)
    if not journey.stage(enrollment.stage).terminal:
        return enrollment
    effects.extend(_stop_sequences(enrollment, "end"))
    effects.extend(_leave_audiences(journey, keep=journey.stage(enrollment.stage)))
    return replace(enrollment, state="completed", ended_at=now, sequences=())


def _leave_audiences(journey: Journey, keep: Stage | None = None) -> list[Effect]:
    """A lead whose run ends leaves the journey's audiences: ads follow the journey. The
    audiences the final stage itself adds the lead to are kept (a terminal `lost` stage
    may put the lead in a win-back audience on purpose)."""
    # Audiences the final stage adds are kept; those it removes are gone already.
    settled = {
        name
        for action in (keep.on_enter if keep is not None else ())
        if isinstance(action, AudienceAdd | AudienceRemove)
        for name in action.audiences
    }
    return [RemoveFromAudience(name) for name in journey.audiences if name not in settled]


def _stop_on(
    journey: Journey, enrollment: Enrollment, event: Event, effects: list[Effect]
) -> Enrollment:
    """Stop each running sequence that lists the event in `stop_on` (a purchase ends the
    nurture emails); the event may still move the lead as well."""
    stopping = [
        name
        for name in enrollment.sequences
        if name in journey.sequences and event.name in journey.sequences[name].stop_on
    ]
    if not stopping:
        return enrollment
    effects.extend(
        ChannelAction("sequence.stop", name, f"{enrollment.epoch}.stop.{name}") for name in stopping
    )
    running = tuple(name for name in enrollment.sequences if name not in stopping)
    return replace(enrollment, sequences=running)


def _stop_sequences(enrollment: Enrollment, why: str) -> list[Effect]:
    return [
        ChannelAction("sequence.stop", name, f"{enrollment.epoch}.{why}.{name}")
        for name in enrollment.sequences
    ]


def _goal(journey: Journey, event: Event, view: Mapping[str, Any]) -> list[Effect]:
    goal = journey.goal
    if goal is None or goal.on != event.name or not goal.condition(view):
        return []
    return [ReachGoal(event.message_id, event.timestamp, goal.value_of(view))]


def _event_cause(kind: Literal["entry", "event", "exit"], event: Event) -> Cause:
    return Cause(
        kind,
        event=event.name,
        message_id=event.message_id,
        timestamp=event.timestamp,
        late=event.late,
    )


# --- advance -------------------------------------------------------------------------------------


@dataclass(order=True)
class _Queued:
    at: datetime
    rank: int  # 0: timer, 1: event, at the same instant
    tie: tuple[str | int, ...]  # events: arrival; timers: journey, entry, epoch, transition
    item: LeadEvent | PendingTimer = field(compare=False)
    void: bool = field(default=False, compare=False)


def reference_advance(
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
                self._apply(journey_id, reference_upgrade(current, enrollment, at), at)

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
        result = reference_step(journey, enrollment, fired, now)
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
            self._apply(journey_id, reference_step(journey, previous, event, now), now)

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
            # A run in progress cannot enter again; an older map it runs on may not listen
            # to the current map's entry event, and the current map may lack its stage.
            running = self.enrollments.get(journey.id)
            if running is None or not running.active:
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
