"""The plain values the pure core reads and returns: enrollments, inputs, effects.

All immutable; a changed enrollment is a new value (`dataclasses.replace`). Effects
are data for the shell to carry out in one transaction, never calls.

The core is compiled to C by mypyc (setup.py), and these are its native classes: each
field is `Final`, which the compiled class enforces at run time as a frozen dataclass
would (setting one raises AttributeError), and each class writes its own `__init__`,
since the one `dataclass` would generate could not set a `Final` field. Equality,
hash and repr are the dataclass's, from the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

EnrollmentState = Literal["active", "exited", "completed"]


@dataclass(init=False, unsafe_hash=True)
class Enrollment:
    """One run of a lead through one journey: where it is and since when."""

    journey_id: Final[str]
    version: Final[int]
    entry_no: Final[int]
    stage: Final[str]
    state: Final[EnrollmentState]
    epoch: Final[int]  # counts stage entries; timers of an older epoch are stale
    entered_at: Final[datetime]
    stage_entered_at: Final[datetime]
    ended_at: Final[datetime | None]
    sequences: Final[tuple[str, ...]]  # sequences started and not stopped

    def __init__(
        self,
        journey_id: str,
        version: int,
        entry_no: int,
        stage: str,
        state: EnrollmentState,
        epoch: int,
        entered_at: datetime,
        stage_entered_at: datetime,
        ended_at: datetime | None = None,
        sequences: tuple[str, ...] = (),
    ) -> None:
        self.journey_id = journey_id
        self.version = version
        self.entry_no = entry_no
        self.stage = stage
        self.state = state
        self.epoch = epoch
        self.entered_at = entered_at
        self.stage_entered_at = stage_entered_at
        self.ended_at = ended_at
        self.sequences = sequences

    @property
    def active(self) -> bool:
        return self.state == "active"


# --- inputs --------------------------------------------------------------------------------------


@dataclass(init=False, unsafe_hash=True)
class Event:
    """A tracked event as a journey sees it."""

    name: Final[str]
    timestamp: Final[datetime]
    message_id: Final[str]
    properties: Final[Mapping[str, Any]]
    context: Final[Mapping[str, Any]]
    traits: Final[Mapping[str, Any]]  # the lead's traits when the event is applied
    late: Final[bool]  # older than the lead's clock: the latest event or timeout applied

    def __init__(
        self,
        name: str,
        timestamp: datetime,
        message_id: str,
        properties: Mapping[str, Any],
        context: Mapping[str, Any],
        traits: Mapping[str, Any],
        late: bool = False,
    ) -> None:
        self.name = name
        self.timestamp = timestamp
        self.message_id = message_id
        self.properties = properties
        self.context = context
        self.traits = traits
        self.late = late

    @property
    def view(self) -> Mapping[str, Any]:
        """What `where` paths and goal values are read from."""
        return {
            "event": self.name,
            "properties": self.properties,
            "context": self.context,
            "traits": self.traits,
        }


@dataclass(init=False, unsafe_hash=True)
class TimerFired:
    """A stage timeout that came due."""

    journey_id: Final[str]
    entry_no: Final[int]
    stage: Final[str]
    epoch: Final[int]
    transition: Final[int]  # index in the stage's transitions
    due_at: Final[datetime]

    def __init__(
        self,
        journey_id: str,
        entry_no: int,
        stage: str,
        epoch: int,
        transition: int,
        due_at: datetime,
    ) -> None:
        self.journey_id = journey_id
        self.entry_no = entry_no
        self.stage = stage
        self.epoch = epoch
        self.transition = transition
        self.due_at = due_at


Input = Event | TimerFired


# --- effects -------------------------------------------------------------------------------------

CauseKind = Literal["entry", "event", "timer", "exit", "merge", "version"]


@dataclass(init=False, unsafe_hash=True)
class Cause:
    """Why a transition happened, as the lead's history states it."""

    kind: Final[CauseKind]
    event: Final[str | None]
    message_id: Final[str | None]
    timestamp: Final[datetime | None]
    late: Final[bool]
    after: Final[str | None]  # the timeout, for kind == "timer"
    detail: Final[str | None]

    def __init__(
        self,
        kind: CauseKind,
        event: str | None = None,
        message_id: str | None = None,
        timestamp: datetime | None = None,
        late: bool = False,
        after: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.kind = kind
        self.event = event
        self.message_id = message_id
        self.timestamp = timestamp
        self.late = late
        self.after = after
        self.detail = detail

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


@dataclass(init=False, unsafe_hash=True)
class Transitioned:
    """A line of history; `from_stage` None is an entry, `to_stage` None leaving the journey.

    `since` is when `from_stage` was entered: how long the lead spent there.
    """

    from_stage: Final[str | None]
    to_stage: Final[str | None]
    at: Final[datetime]
    cause: Final[Cause]
    since: Final[datetime | None]

    def __init__(
        self,
        from_stage: str | None,
        to_stage: str | None,
        at: datetime,
        cause: Cause,
        since: datetime | None = None,
    ) -> None:
        self.from_stage = from_stage
        self.to_stage = to_stage
        self.at = at
        self.cause = cause
        self.since = since


@dataclass(init=False, unsafe_hash=True)
class StartTimer:
    stage: Final[str]
    epoch: Final[int]
    transition: Final[int]
    due_at: Final[datetime]

    def __init__(self, stage: str, epoch: int, transition: int, due_at: datetime) -> None:
        self.stage = stage
        self.epoch = epoch
        self.transition = transition
        self.due_at = due_at


@dataclass(init=False, unsafe_hash=True)
class CancelTimers:
    """Every pending timer of the enrollment is void (it left its stage or the journey)."""

    def __init__(self) -> None:
        pass


@dataclass(init=False, unsafe_hash=True)
class AddToAudience:
    audience: Final[str]

    def __init__(self, audience: str) -> None:
        self.audience = audience


@dataclass(init=False, unsafe_hash=True)
class RemoveFromAudience:
    audience: Final[str]

    def __init__(self, audience: str) -> None:
        self.audience = audience


@dataclass(init=False, unsafe_hash=True)
class SetTrait:
    name: Final[str]
    value: Final[Any]

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value


ChannelActionKind = Literal["email.send", "sequence.start", "sequence.stop", "offer.grant"]


@dataclass(init=False, unsafe_hash=True)
class ChannelAction:
    """Work for a channel, through the outbox: `email.send`, `sequence.start`,
    `sequence.stop` or `offer.grant` of `target`.

    `key` is unique within the enrollment (stage epoch and action position), so the
    shell's idempotency key makes the action run once per stage entry.
    """

    action: Final[ChannelActionKind]
    target: Final[str]
    key: Final[str]

    def __init__(self, action: ChannelActionKind, target: str, key: str) -> None:
        self.action = action
        self.target = target
        self.key = key


@dataclass(init=False, unsafe_hash=True)
class ReachGoal:
    """A goal event of an enrolled lead: a deal for the KPIs."""

    message_id: Final[str]
    at: Final[datetime]
    value: Final[float | None]

    def __init__(self, message_id: str, at: datetime, value: float | None) -> None:
        self.message_id = message_id
        self.at = at
        self.value = value


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


@dataclass(init=False, unsafe_hash=True)
class Step:
    """What one input did to one journey enrollment."""

    enrollment: Final[Enrollment | None]
    effects: Final[tuple[Effect, ...]]

    def __init__(self, enrollment: Enrollment | None, effects: tuple[Effect, ...] = ()) -> None:
        self.enrollment = enrollment
        self.effects = effects
