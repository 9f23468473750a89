"""The plain values the pure core reads and returns: enrollments, inputs, effects.

All frozen; a changed enrollment is a new value (`dataclasses.replace`). Effects are
data for the shell to carry out in one transaction, never calls.

The `new_*` functions at the end make the same values for the core's inner loop,
without the cost of a frozen dataclass's constructor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal

EnrollmentState = Literal["active", "exited", "completed"]


@dataclass(frozen=True, slots=True)
class Enrollment:
    """One run of a lead through one journey: where it is and since when."""

    journey_id: str
    version: int
    entry_no: int
    stage: str
    state: EnrollmentState
    epoch: int  # counts stage entries; timers of an older epoch are stale
    entered_at: datetime
    stage_entered_at: datetime
    ended_at: datetime | None = None
    sequences: tuple[str, ...] = ()  # sequences started and not stopped

    @property
    def active(self) -> bool:
        return self.state == "active"


# --- inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """A tracked event as a journey sees it."""

    name: str
    timestamp: datetime
    message_id: str
    properties: Mapping[str, Any]
    context: Mapping[str, Any]
    traits: Mapping[str, Any]  # the lead's traits when the event is applied
    late: bool = False  # older than the lead's clock: the latest event or timeout applied

    @property
    def view(self) -> Mapping[str, Any]:
        """What `where` paths and goal values are read from."""
        return {
            "event": self.name,
            "properties": self.properties,
            "context": self.context,
            "traits": self.traits,
        }


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A stage timeout that came due."""

    journey_id: str
    entry_no: int
    stage: str
    epoch: int
    transition: int  # index in the stage's transitions
    due_at: datetime


Input = Event | TimerFired


# --- effects -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a transition happened, as the lead's history states it."""

    kind: Literal["entry", "event", "timer", "exit", "merge", "version"]
    event: str | None = None
    message_id: str | None = None
    timestamp: datetime | None = None
    late: bool = False
    after: str | None = None  # the timeout, for kind == "timer"
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"type": self.kind}
        if self.event is not None:
            found["event"] = self.event
        if self.message_id is not None:
            found["message_id"] = self.message_id
        if self.timestamp is not None:
            found["timestamp"] = self.timestamp.isoformat().replace("+00:00", "Z")
        if self.late:
            found["late"] = True
        if self.after is not None:
            found["after"] = self.after
        if self.detail is not None:
            found["detail"] = self.detail
        return found


@dataclass(frozen=True, slots=True)
class Transitioned:
    """A line of history; `from_stage` None is an entry, `to_stage` None leaving the journey.

    `since` is when `from_stage` was entered: how long the lead spent there.
    """

    from_stage: str | None
    to_stage: str | None
    at: datetime
    cause: Cause
    since: datetime | None = None


@dataclass(frozen=True, slots=True)
class StartTimer:
    stage: str
    epoch: int
    transition: int
    due_at: datetime


@dataclass(frozen=True, slots=True)
class CancelTimers:
    """Every pending timer of the enrollment is void (it left its stage or the journey)."""


@dataclass(frozen=True, slots=True)
class AddToAudience:
    audience: str


@dataclass(frozen=True, slots=True)
class RemoveFromAudience:
    audience: str


@dataclass(frozen=True, slots=True)
class SetTrait:
    name: str
    value: Any


ChannelActionKind = Literal["email.send", "sequence.start", "sequence.stop", "offer.grant"]


@dataclass(frozen=True, slots=True)
class ChannelAction:
    """Work for a channel, through the outbox: `email.send`, `sequence.start`,
    `sequence.stop` or `offer.grant` of `target`.

    `key` is unique within the enrollment (stage epoch and action position), so the
    shell's idempotency key makes the action run once per stage entry.
    """

    action: ChannelActionKind
    target: str
    key: str


@dataclass(frozen=True, slots=True)
class ReachGoal:
    """A goal event of an enrolled lead: a deal for the KPIs."""

    message_id: str
    at: datetime
    value: float | None


Effect = (
    Transitioned
    | StartTimer
    | CancelTimers
    | AddToAudience
    | RemoveFromAudience
    | SetTrait
    | ChannelAction
    | ReachGoal
)


@dataclass(frozen=True, slots=True)
class Step:
    """What one input did to one journey enrollment."""

    enrollment: Enrollment | None
    effects: tuple[Effect, ...] = ()


# --- positional constructors for the core's inner loop -------------------------------------------
#
# A frozen dataclass's __init__ stores each field through `object.__setattr__`, which
# on the engine's hottest path costs about as much as the rest of a move. These make
# the very same values (same class, so the same equality, hash, repr and immutability)
# by storing every field straight into its slot. Each takes every field, in field
# order; tests/machine hold them to the classes' fields and constructors.

SlotSetter = Callable[[Any, Any], None]


def slot_setters(cls: type) -> tuple[SlotSetter, ...]:
    """The setters of the slots of `cls`'s fields, in field order."""
    return tuple(cls.__dict__[field.name].__set__ for field in fields(cls))


_new = object.__new__
_ENROLLMENT = slot_setters(Enrollment)
_EVENT = slot_setters(Event)
_TIMER_FIRED = slot_setters(TimerFired)
_CAUSE = slot_setters(Cause)
_TRANSITIONED = slot_setters(Transitioned)
_START_TIMER = slot_setters(StartTimer)
_CHANNEL_ACTION = slot_setters(ChannelAction)
_REACH_GOAL = slot_setters(ReachGoal)
_STEP = slot_setters(Step)


def new_enrollment(
    journey_id: str,
    version: int,
    entry_no: int,
    stage: str,
    state: EnrollmentState,
    epoch: int,
    entered_at: datetime,
    stage_entered_at: datetime,
    ended_at: datetime | None,
    sequences: tuple[str, ...],
) -> Enrollment:
    (
        set_journey_id,
        set_version,
        set_entry_no,
        set_stage,
        set_state,
        set_epoch,
        set_entered_at,
        set_stage_entered_at,
        set_ended_at,
        set_sequences,
    ) = _ENROLLMENT
    made = _new(Enrollment)
    set_journey_id(made, journey_id)
    set_version(made, version)
    set_entry_no(made, entry_no)
    set_stage(made, stage)
    set_state(made, state)
    set_epoch(made, epoch)
    set_entered_at(made, entered_at)
    set_stage_entered_at(made, stage_entered_at)
    set_ended_at(made, ended_at)
    set_sequences(made, sequences)
    return made


def new_event(
    name: str,
    timestamp: datetime,
    message_id: str,
    properties: Mapping[str, Any],
    context: Mapping[str, Any],
    traits: Mapping[str, Any],
    late: bool,
) -> Event:
    set_name, set_timestamp, set_message_id, set_properties, set_context, set_traits, set_late = (
        _EVENT
    )
    made = _new(Event)
    set_name(made, name)
    set_timestamp(made, timestamp)
    set_message_id(made, message_id)
    set_properties(made, properties)
    set_context(made, context)
    set_traits(made, traits)
    set_late(made, late)
    return made


def new_timer_fired(
    journey_id: str, entry_no: int, stage: str, epoch: int, transition: int, due_at: datetime
) -> TimerFired:
    set_journey_id, set_entry_no, set_stage, set_epoch, set_transition, set_due_at = _TIMER_FIRED
    made = _new(TimerFired)
    set_journey_id(made, journey_id)
    set_entry_no(made, entry_no)
    set_stage(made, stage)
    set_epoch(made, epoch)
    set_transition(made, transition)
    set_due_at(made, due_at)
    return made


def new_cause(
    kind: Literal["entry", "event", "timer", "exit", "merge", "version"],
    event: str | None,
    message_id: str | None,
    timestamp: datetime | None,
    late: bool,
    after: str | None,
    detail: str | None,
) -> Cause:
    set_kind, set_event, set_message_id, set_timestamp, set_late, set_after, set_detail = _CAUSE
    made = _new(Cause)
    set_kind(made, kind)
    set_event(made, event)
    set_message_id(made, message_id)
    set_timestamp(made, timestamp)
    set_late(made, late)
    set_after(made, after)
    set_detail(made, detail)
    return made


def new_transitioned(
    from_stage: str | None,
    to_stage: str | None,
    at: datetime,
    cause: Cause,
    since: datetime | None,
) -> Transitioned:
    set_from_stage, set_to_stage, set_at, set_cause, set_since = _TRANSITIONED
    made = _new(Transitioned)
    set_from_stage(made, from_stage)
    set_to_stage(made, to_stage)
    set_at(made, at)
    set_cause(made, cause)
    set_since(made, since)
    return made


def new_start_timer(stage: str, epoch: int, transition: int, due_at: datetime) -> StartTimer:
    set_stage, set_epoch, set_transition, set_due_at = _START_TIMER
    made = _new(StartTimer)
    set_stage(made, stage)
    set_epoch(made, epoch)
    set_transition(made, transition)
    set_due_at(made, due_at)
    return made


def new_channel_action(action: ChannelActionKind, target: str, key: str) -> ChannelAction:
    set_action, set_target, set_key = _CHANNEL_ACTION
    made = _new(ChannelAction)
    set_action(made, action)
    set_target(made, target)
    set_key(made, key)
    return made


def new_reach_goal(message_id: str, at: datetime, value: float | None) -> ReachGoal:
    set_message_id, set_at, set_value = _REACH_GOAL
    made = _new(ReachGoal)
    set_message_id(made, message_id)
    set_at(made, at)
    set_value(made, value)
    return made


def new_step(enrollment: Enrollment | None, effects: tuple[Effect, ...]) -> Step:
    set_enrollment, set_effects = _STEP
    made = _new(Step)
    set_enrollment(made, enrollment)
    set_effects(made, effects)
    return made
