"""Synthetic traffic for `cjm simulate --leads N`: leads that behave as a profile says.

A profile is a YAML list of behaviours. Each has a `weight` (how often a lead follows
it, relative to the others) and `steps`, the messages such a lead sends:

    - name: browses            # optional, for the reader
      weight: 3
      steps:
        - {type: page, properties: {path: /catalog}}
        - {type: page, after: 2h, chance: 0.5, properties: {path: /landing}}
    - weight: 1
      steps:
        - {type: page, properties: {path: /catalog}}
        - {type: identify, after: 10m, traits: {email: "lead-{n}@example.com"}}
        - {event: order_completed, after: 1d, properties: {revenue: 120}}

`after` is the delay since the previous step (default 0s); `chance` is the probability
that the step, and so the rest of the behaviour, happens (default 1). `{n}` in any string
value is the lead's number. Lead n is `anonymousId` `sim-<n>`; an identify whose traits
hold an `email` gives the lead that email as its `userId` from then on.

The messages are the dicts a JSON Lines file would hold and go through the same check as
recorded ones (`engine.simulate.message_of`), so a synthetic lead is simulated exactly as
a recorded one would be. Generation is deterministic for a given seed.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.ingest.messages import Message
from engine.journey.model import parse_duration
from engine.simulate import message_of

MAX_LEADS = 1_000_000
DEFAULT_SEED = 1
DEFAULT_START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # a Monday morning
DEFAULT_SPREAD = timedelta(days=7)


def _delay(value: object) -> timedelta:
    """A journey duration, or no delay at all (`0s`, `0`)."""
    if value in (0, "0") or (isinstance(value, str) and value.strip() in ("0s", "0m", "0h", "0d")):
        return timedelta(0)
    return parse_duration(value)


Delay = Annotated[timedelta, BeforeValidator(_delay)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProfileStep(_Strict):
    """One message of a behaviour."""

    type: Literal["track", "page", "identify"] = "track"
    event: str | None = Field(default=None, min_length=1, max_length=200)
    after: Delay = timedelta(0)
    chance: float = Field(default=1.0, ge=0.0, le=1.0)
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _event_for_track(self) -> ProfileStep:
        if self.type == "track" and self.event is None:
            raise ValueError("a track step needs an `event`")
        if self.type == "identify" and self.event is not None:
            raise ValueError("an identify step has no `event`; give it `traits`")
        return self


class Behaviour(_Strict):
    name: str | None = None
    weight: float = Field(gt=0)
    steps: tuple[ProfileStep, ...] = Field(min_length=1)

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("a weight must be a finite number")
        return value


class Profile(RootModel[tuple[Behaviour, ...]]):
    root: tuple[Behaviour, ...] = Field(min_length=1)
    model_config = ConfigDict(frozen=True)

    @property
    def behaviours(self) -> tuple[Behaviour, ...]:
        return self.root


DEFAULT_PROFILE = Profile.model_validate(
    [
        {
            "name": "browses once",
            "weight": 5,
            "steps": [{"type": "page", "properties": {"path": "/catalog"}}],
        },
        {
            "name": "comes back",
            "weight": 3,
            "steps": [
                {"type": "page", "properties": {"path": "/catalog"}},
                {"type": "page", "after": "1d", "properties": {"path": "/landing"}},
            ],
        },
        {
            "name": "buys",
            "weight": 2,
            "steps": [
                {"type": "page", "properties": {"path": "/catalog"}},
                {"type": "page", "after": "2h", "properties": {"path": "/landing"}},
                {
                    "type": "identify",
                    "after": "10m",
                    "traits": {"email": "lead-{n}@example.com"},
                },
                {
                    "event": "order_completed",
                    "after": "2d",
                    "chance": 0.8,
                    "properties": {"revenue": 120, "order_id": "sim-order-{n}"},
                },
            ],
        },
    ]
)


class BadTraffic(ValueError):
    """Options or a profile file that cannot be used, each problem as `file: message`."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


def read_profile(path: Path) -> Profile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise BadTraffic([f"{path}: cannot read: {error}"]) from None
    except yaml.YAMLError as error:
        raise BadTraffic([f"{path}: not valid YAML: {error}"]) from None
    if not isinstance(data, list):
        raise BadTraffic([f"{path}: a profile is a list of behaviours, each with weight and steps"])
    try:
        return Profile.model_validate(data)
    except ValidationError as error:
        raise BadTraffic([f"{path}: {_explain(detail)}" for detail in error.errors()]) from None


def _explain(detail: Mapping[str, Any]) -> str:
    where = _where(detail["loc"])
    message = str(detail["msg"]).removeprefix("Value error, ")
    if detail["type"] == "extra_forbidden":
        message = f"unknown key `{detail['loc'][-1]}`"
        where = _where(detail["loc"][:-1])
    return f"{where}: {message}" if where else message


def _where(loc: Sequence[int | str]) -> str:
    """(0, 'steps', 1, 'after') as `behaviour 1, step 2, after`."""
    parts: list[str] = []
    for index, part in enumerate(loc):
        if isinstance(part, int) and index == 0:
            parts.append(f"behaviour {part + 1}")
        elif isinstance(part, int) and index > 0 and loc[index - 1] == "steps":
            parts[-1] = f"step {part + 1}"
        elif isinstance(part, int):
            parts[-1] += f"[{part}]"
        else:
            parts.append(part)
    return ", ".join(parts)


def parse_start(value: str) -> datetime:
    """An ISO 8601 moment; without an offset it is UTC."""
    moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def generate(
    profile: Profile,
    leads: int,
    *,
    seed: int = DEFAULT_SEED,
    start: datetime = DEFAULT_START,
    spread: timedelta = DEFAULT_SPREAD,
) -> Iterator[dict[str, Any]]:
    """The messages of `leads` synthetic leads, as JSON Lines dicts, lead after lead."""
    lead_messages = generate_leads(profile, leads, seed=seed, start=start, spread=spread)
    return itertools.chain.from_iterable(lead_messages)


def generate_leads(
    profile: Profile,
    leads: int,
    *,
    seed: int = DEFAULT_SEED,
    start: datetime = DEFAULT_START,
    spread: timedelta = DEFAULT_SPREAD,
) -> Iterator[list[dict[str, Any]]]:
    """The messages of each synthetic lead in turn, as JSON Lines dicts; a lead whose
    first step's `chance` fails sends nothing and is left out.

    Lead n arrives at a moment drawn uniformly over `[start, start + spread)`, follows a
    behaviour drawn by weight, and stops at the first step whose `chance` fails.
    """
    if not 1 <= leads <= MAX_LEADS:
        raise ValueError(f"the number of leads must be 1..{MAX_LEADS}")
    rng = random.Random(seed)
    behaviours = profile.behaviours
    cumulative = list(itertools.accumulate(behaviour.weight for behaviour in behaviours))
    total = cumulative[-1]
    spread_ms = int(spread.total_seconds() * 1000)
    for n in range(1, leads + 1):
        at = start + timedelta(milliseconds=rng.randrange(spread_ms) if spread_ms else 0)
        index = bisect.bisect_right(cumulative, rng.random() * total)
        behaviour = behaviours[min(index, len(behaviours) - 1)]
        user_id: str | None = None
        messages: list[dict[str, Any]] = []
        for number, step in enumerate(behaviour.steps, start=1):
            at += step.after
            if step.chance < 1 and rng.random() >= step.chance:
                break
            message, user_id = _step_message(step, n, number, at, user_id)
            messages.append(message)
        if messages:
            yield messages


def _step_message(
    step: ProfileStep, n: int, number: int, at: datetime, user_id: str | None
) -> tuple[dict[str, Any], str | None]:
    message: dict[str, Any] = {
        "type": step.type,
        "messageId": f"sim-{n}-{number}",
        "anonymousId": f"sim-{n}",
        "timestamp": at.isoformat(),
    }
    if step.type == "identify":
        traits = _fill(step.traits, n)
        email = traits.get("email")
        if isinstance(email, str) and email:
            user_id = email
        message["traits"] = traits
    else:
        if step.event is not None:
            message["event" if step.type == "track" else "name"] = _fill(step.event, n)
        if step.properties:
            message["properties"] = _fill(step.properties, n)
        if step.traits:
            message["context"] = {"traits": _fill(step.traits, n)}
    if user_id is not None:
        message["userId"] = user_id
    return message, user_id


def _fill(value: Any, n: int) -> Any:
    """`{n}` in every string of a value replaced by the lead's number."""
    if isinstance(value, str):
        return value.replace("{n}", str(n))
    if isinstance(value, dict):
        return {key: _fill(item, n) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, n) for item in value]
    return value


def synthetic_leads(
    profile: Profile,
    leads: int,
    *,
    seed: int = DEFAULT_SEED,
    start: datetime = DEFAULT_START,
    spread: timedelta = DEFAULT_SPREAD,
) -> Iterator[list[Message]]:
    """The generated traffic, one lead's messages at a time, checked like lines of an
    events file; made as it is read, so a million leads are never all in memory."""
    for payloads in generate_leads(profile, leads, seed=seed, start=start, spread=spread):
        yield [message_of(payload) for payload in payloads]


def traffic(
    leads: int, profile: Path | None, *, seed: int, start: str, spread: str
) -> Iterator[list[Message]]:
    """`cjm simulate --leads` from its options as given, for `simulate(synthetic=...)`: the
    options are checked at once (raises `BadTraffic`), the leads made as they are read."""
    if not 1 <= leads <= MAX_LEADS:
        raise BadTraffic([f"bad --leads {leads}: give 1..{MAX_LEADS}"])
    behaviours = DEFAULT_PROFILE if profile is None else read_profile(profile)
    try:
        first = parse_start(start)
    except ValueError:
        raise BadTraffic(
            [f"bad --start {start!r}: give an ISO moment like 2026-01-05T09:00:00Z"]
        ) from None
    try:
        over = _delay(spread)
    except ValueError as error:
        raise BadTraffic([f"bad --spread: {error}"]) from None
    return synthetic_leads(behaviours, leads, seed=seed, start=first, spread=over)
