"""The journey map as typed, frozen values.

A journey file becomes a tree of these models. They check the *shape* of one
file (types, unknown keys, durations, names); what needs the whole map or the
tree of files (unknown stages in `to`, unreachable stages, undeclared
audiences, missing templates, duplicate ids) is checked in `validate.py`.
Pydantic locations of errors are turned into `file:line` by the loader.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    field_validator,
    model_validator,
)

from engine.journey.conditions import Condition, compile_where, resolve_path

NAME_PATTERN = r"^[a-z0-9_]+$"
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
PHASES = ("awareness", "consideration", "purchase", "retention", "loyalty")
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# Events the channels emit back into the inbox; journeys may listen for these and no others
# in the reserved `email.` and `offer.` namespaces.
INTERNAL_EVENTS = frozenset(
    {
        "email.sent",
        "email.opened",
        "email.clicked",
        "email.bounced",
        "email.failed",
        "email.unsubscribed",
        "offer.granted",
        "offer.expired",
        "offer.redeemed",
    }
)
RESERVED_PREFIXES = ("email.", "offer.")

_DURATION = re.compile(r"^(\d{1,12})(s|m|h|d|w)$")
# Longer waits are mistakes, and datetimes end in the year 9999.
MAX_DURATION = timedelta(days=10 * 366)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_CODE_SLOT = re.compile(r"\{(\d+)\}")
MAX_CODE_LENGTH = 64  # what the offers table and the redeem API take
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def parse_duration(value: object) -> timedelta:
    """`90s`, `2h`, `3d`, `1w`: a positive integer and one unit, nothing else."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f"bad duration {value!r}: write an integer and a unit, like 90s, 2h, 3d")
    match = _DURATION.match(value.strip())
    if match is None:
        raise ValueError(
            f"bad duration {value!r}: write an integer and one unit of s, m, h, d, w (like 2h)"
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds == 0:
        raise ValueError(f"bad duration {value!r}: a duration must be longer than zero")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"bad duration {value!r}: durations are at most 10 years")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling of a duration, the inverse of `parse_duration`."""
    seconds = int(value.total_seconds())
    for unit in ("w", "d", "h", "m"):
        if seconds % _UNIT_SECONDS[unit] == 0:
            return f"{seconds // _UNIT_SECONDS[unit]}{unit}"
    return f"{seconds}s"


def _check_event_name(value: str) -> str:
    if value != value.strip() or not value:
        raise ValueError(f"bad event name {value!r}: it must be non-empty, without outer spaces")
    if value.startswith(RESERVED_PREFIXES) and value not in INTERNAL_EVENTS:
        known = ", ".join(sorted(INTERNAL_EVENTS))
        raise ValueError(f"unknown internal event {value!r}; the internal events are: {known}")
    return value


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


Duration = Annotated[
    timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Names = Annotated[tuple[Name, ...], BeforeValidator(_one_or_many), Field(min_length=1)]
EventName = Annotated[str, Field(max_length=200), AfterValidator(_check_event_name)]
Phase = Literal["awareness", "consideration", "purchase", "retention", "loyalty"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


# --- where: the declarative conditions ---------------------------------------------------------

Scalar = str | int | float | bool | None


class Matcher(Frozen):
    """One comparison, written as a one-key mapping: `{startswith: /catalog}`."""

    eq: Scalar = None
    ne: Scalar = None
    in_: tuple[Scalar, ...] | None = Field(default=None, alias="in")
    not_in: tuple[Scalar, ...] | None = None
    gt: int | float | str | None = None
    gte: int | float | str | None = None
    lt: int | float | str | None = None
    lte: int | float | str | None = None
    startswith: str | None = None
    endswith: str | None = None
    contains: Scalar = None
    exists: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Matcher:
        if len(self.model_fields_set) != 1:
            raise ValueError("a matcher has exactly one operator, like {startswith: /catalog}")
        return self

    @property
    def operator(self) -> str:
        (field,) = self.model_fields_set
        return "in" if field == "in_" else field

    @property
    def operand(self) -> Any:
        (field,) = self.model_fields_set
        return getattr(self, field)


def _check_path(path: str) -> str:
    root, _, rest = path.partition(".")
    if path == "event" or (root in ("properties", "context", "traits") and rest):
        return path
    raise ValueError(
        f"bad path {path!r}: use event, properties.<name>, context.<name> or traits.<name>"
    )


WherePath = Annotated[str, AfterValidator(_check_path)]
WhereValue = Annotated[
    Annotated[Matcher, Tag("matcher")] | Annotated[Scalar, Tag("value")],
    Discriminator(lambda v: "matcher" if isinstance(v, Mapping | Matcher) else "value"),
]
Where = dict[WherePath, WhereValue]


class Triggered(Frozen):
    """Something that happens on an event, optionally only `where` it matches."""

    on: EventName
    where: Where | None = None

    @cached_property
    def condition(self) -> Condition:
        return compile_where(self.where or {})


# --- actions: run once on entering a stage -----------------------------------------------------


class AudienceAdd(Frozen):
    audiences: Names = Field(alias="audience.add")


class AudienceRemove(Frozen):
    audiences: Names = Field(alias="audience.remove")


class EmailSend(Frozen):
    template: Name = Field(alias="email.send")


class SequenceStart(Frozen):
    sequence: Name = Field(alias="sequence.start")


class SequenceStop(Frozen):
    sequence: Name = Field(alias="sequence.stop")


class OfferGrant(Frozen):
    offer: Name = Field(alias="offer.grant")


class TraitSet(Frozen):
    traits: dict[Annotated[str, Field(min_length=1)], Any] = Field(alias="trait.set", min_length=1)


ACTION_KINDS: dict[str, type[BaseModel]] = {
    "audience.add": AudienceAdd,
    "audience.remove": AudienceRemove,
    "email.send": EmailSend,
    "sequence.start": SequenceStart,
    "sequence.stop": SequenceStop,
    "offer.grant": OfferGrant,
    "trait.set": TraitSet,
}


def _action_kind(value: object) -> str | None:
    if isinstance(value, Mapping) and len(value) == 1:
        (key,) = value
        return key if key in ACTION_KINDS else None
    for kind, model in ACTION_KINDS.items():
        if isinstance(value, model):
            return kind
    return None


Action = Annotated[
    Annotated[AudienceAdd, Tag("audience.add")]
    | Annotated[AudienceRemove, Tag("audience.remove")]
    | Annotated[EmailSend, Tag("email.send")]
    | Annotated[SequenceStart, Tag("sequence.start")]
    | Annotated[SequenceStop, Tag("sequence.stop")]
    | Annotated[OfferGrant, Tag("offer.grant")]
    | Annotated[TraitSet, Tag("trait.set")],
    Discriminator(
        _action_kind,
        custom_error_type="unknown_action",
        custom_error_message=("an action is a one-key mapping, one of: " + ", ".join(ACTION_KINDS)),
    ),
]


# --- transitions: what moves a lead on -----------------------------------------------------------


class OnEvent(Triggered):
    to: Name


class AfterTimeout(Frozen):
    """Fires when the lead is still in the stage `after` its entry."""

    after: Duration
    to: Name


def _transition_kind(value: object) -> str | None:
    if isinstance(value, OnEvent) or (isinstance(value, Mapping) and "on" in value):
        return "on"
    if isinstance(value, AfterTimeout) or (isinstance(value, Mapping) and "after" in value):
        return "after"
    return None


Transition = Annotated[
    Annotated[OnEvent, Tag("on")] | Annotated[AfterTimeout, Tag("after")],
    Discriminator(
        _transition_kind,
        custom_error_type="bad_transition",
        custom_error_message="a transition has `on: <event>` or `after: <duration>`, and `to`",
    ),
]


class StageKpi(Frozen):
    """Targets the map is coloured against."""

    conversion: Annotated[float, Field(ge=0, le=1)] | None = None
    median_time: Duration | None = None
    p90_time: Duration | None = None


class Stage(Frozen):
    id: Name
    name: str | None = None
    phase: Phase
    description: str | None = None
    touchpoints: tuple[str, ...] = ()
    objections: tuple[str, ...] = ()
    emotions: tuple[str, ...] = ()
    kpi: StageKpi | None = None
    on_enter: tuple[Action, ...] = ()
    transitions: tuple[Transition, ...] = ()
    terminal: bool = False

    @property
    def title(self) -> str:
        return self.name or self.id.replace("_", " ").capitalize()

    @cached_property
    def on_event(self) -> Mapping[str, tuple[tuple[int, OnEvent], ...]]:
        """Event transitions by event name, each with its index in `transitions`."""
        by_name: dict[str, list[tuple[int, OnEvent]]] = {}
        for index, transition in enumerate(self.transitions):
            if isinstance(transition, OnEvent):
                by_name.setdefault(transition.on, []).append((index, transition))
        return {name: tuple(items) for name, items in by_name.items()}

    @cached_property
    def timeouts(self) -> tuple[tuple[int, AfterTimeout], ...]:
        return tuple(
            (index, transition)
            for index, transition in enumerate(self.transitions)
            if isinstance(transition, AfterTimeout)
        )


# --- the journey-level parts ----------------------------------------------------------------------

_REENTRY = re.compile(r"^after\s+(\S+)$")


def _check_reentry(value: str) -> str:
    if value in ("never", "always"):
        return value
    match = _REENTRY.match(value)
    if match is None:
        raise ValueError(f'bad reentry {value!r}: use never, always or "after <duration>"')
    parse_duration(match.group(1))
    return value


class Entry(Triggered):
    reentry: Annotated[str, AfterValidator(_check_reentry)] = "never"

    @cached_property
    def reentry_delay(self) -> timedelta | None:
        """None: never again; zero: whenever the previous run has ended; else that long after
        the previous entry."""
        if self.reentry == "never":
            return None
        if self.reentry == "always":
            return timedelta(0)
        match = _REENTRY.match(self.reentry)
        assert match is not None  # checked by the validator
        return parse_duration(match.group(1))


class ExitRule(Triggered):
    pass


class Goal(Triggered):
    value: WherePath | None = None

    def value_of(self, event: Mapping[str, Any]) -> float | None:
        """The deal's value read from the event, when it carries a finite number there.

        "NaN" or "1e400" would poison every average they enter: they count as no value.
        """
        if self.value is None:
            return None
        found = resolve_path(event, self.value)
        if isinstance(found, bool) or not isinstance(found, int | float | str):
            return None
        try:
            value = float(found)
        except (ValueError, OverflowError):
            return None
        return value if math.isfinite(value) else None


class Segment(Frozen):
    name: str
    description: str | None = None
    jobs: tuple[str, ...] = ()


class EmailStep(Frozen):
    email: Name


class WaitStep(Frozen):
    wait: Duration


def _step_kind(value: object) -> str | None:
    if isinstance(value, EmailStep) or (isinstance(value, Mapping) and "email" in value):
        return "email"
    if isinstance(value, WaitStep) or (isinstance(value, Mapping) and "wait" in value):
        return "wait"
    return None


SequenceStep = Annotated[
    Annotated[EmailStep, Tag("email")] | Annotated[WaitStep, Tag("wait")],
    Discriminator(
        _step_kind,
        custom_error_type="bad_step",
        custom_error_message="a sequence step is `email: <template>` or `wait: <duration>`",
    ),
]


def _check_clock(value: str) -> str:
    if not _CLOCK.match(value):
        raise ValueError(f'bad time {value!r}: write HH:MM on a 24-hour clock, like "09:00"')
    return value


Clock = Annotated[str, AfterValidator(_check_clock)]


class Window(Frozen):
    """When a sequence may send, in the lead's own timezone.

    Sending is allowed from `from_` up to, not including, `to` on the listed `days`. A `to`
    earlier than `from_` wraps past midnight, and the window belongs to the day it opens on:
    fri 20:00 to 08:00 runs from Friday evening to Saturday morning.
    """

    from_: Clock = Field(alias="from")
    to: Clock
    days: tuple[Weekday, ...] = WEEKDAYS

    @field_validator("days")
    @classmethod
    def _days_not_empty(cls, days: tuple[str, ...]) -> tuple[str, ...]:
        if not days:
            raise ValueError("a window needs at least one day")
        return days

    @model_validator(mode="after")
    def _opens_and_closes_apart(self) -> Window:
        # Equal ends could mean an empty window or a whole day: refuse to guess.
        if self.from_ == self.to:
            raise ValueError(
                f"a window opens and closes at different times, not both at {self.from_}; "
                'past midnight is fine, like from: "20:00", to: "08:00"'
            )
        return self


class Sequence(Frozen):
    stop_on: tuple[EventName, ...] = ()
    window: Window | None = None
    steps: tuple[SequenceStep, ...] = Field(min_length=1)


class Expiry(Frozen):
    after: Duration | None = None
    at: datetime | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Expiry:
        if (self.after is None) == (self.at is None):
            raise ValueError("an offer expires either `after: <duration>` or `at: <date and time>`")
        if self.at is not None and self.at.utcoffset() is None:
            raise ValueError("`at` needs a timezone, like 2026-12-31T23:59:59+03:00")
        return self


def _check_code(pattern: str) -> str:
    slots = [int(n) for n in _CODE_SLOT.findall(pattern)]
    if not slots:
        raise ValueError(f'bad code {pattern!r}: it needs a random part, like "DOORS-{{6}}"')
    if sum(slots) < 6 or any(n > 32 for n in slots):
        raise ValueError(
            f"bad code {pattern!r}: use 6 to 32 random characters in all so codes cannot be guessed"
        )
    length = len(_CODE_SLOT.sub("", pattern)) + sum(slots)
    if length > MAX_CODE_LENGTH:
        raise ValueError(
            f"bad code {pattern!r}: its codes would be {length} characters long; "
            f"keep them to {MAX_CODE_LENGTH}"
        )
    return pattern


class Offer(Frozen):
    title: str
    description: str | None = None
    expires: Expiry
    code: Annotated[str, AfterValidator(_check_code)]


class Audience(Frozen):
    description: str | None = None
    # How long a lead stays in the audience after joining; unset: until removed.
    ttl: Duration | None = None


class Journey(Frozen):
    id: Name
    name: str
    version: Annotated[int, Field(ge=1, le=2**31 - 1)] = 1
    description: str | None = None
    segment: Segment | None = None
    entry: Entry
    exit: tuple[ExitRule, ...] = ()
    goal: Goal | None = None
    stages: tuple[Stage, ...] = Field(min_length=1)
    sequences: dict[Name, Sequence] = {}
    offers: dict[Name, Offer] = {}
    audiences: dict[Name, Audience] = {}

    @property
    def first_stage(self) -> Stage:
        return self.stages[0]

    @cached_property
    def stage_by_id(self) -> Mapping[str, Stage]:
        return {stage.id: stage for stage in self.stages}

    def stage(self, stage_id: str) -> Stage:
        return self.stage_by_id[stage_id]

    @cached_property
    def templates(self) -> frozenset[str]:
        """The email templates this journey sends: `email.send` and sequence steps."""
        names = {
            action.template
            for stage in self.stages
            for action in stage.on_enter
            if isinstance(action, EmailSend)
        }
        names.update(
            step.email
            for sequence in self.sequences.values()
            for step in sequence.steps
            if isinstance(step, EmailStep)
        )
        return frozenset(names)

    @cached_property
    def listens_to(self) -> frozenset[str]:
        """Every event name that can change something in this journey for a lead."""
        names = {self.entry.on, *(rule.on for rule in self.exit)}
        if self.goal is not None:
            names.add(self.goal.on)
        for stage in self.stages:
            names.update(stage.on_event)
        for sequence in self.sequences.values():
            names.update(sequence.stop_on)
        return frozenset(names)
