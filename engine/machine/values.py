"""The plain values the pure core reads and returns: enrollments, inputs, effects.

All frozen; a changed enrollment is a new value (`dataclasses.replace`). Effects are
data for the shell to carry out in one transaction, never calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class ChannelAction:
    """Work for a channel, through the outbox: `email.send`, `sequence.start`,
    `sequence.stop` or `offer.grant` of `target`.

    `key` is unique within the enrollment (stage epoch and action position), so the
    shell's idempotency key makes the action run once per stage entry.
    """

    action: Literal["email.send", "sequence.start", "sequence.stop", "offer.grant"]
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
