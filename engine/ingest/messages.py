"""Segment messages: checked, normalised, and turned into `Message` values.

Hand-written checks rather than a schema library: each failure names the field and
what is wrong with it in words a client developer can act on, and the checks cost a
few dictionary look-ups per message. Anything that would make the database refuse a
row (over-long ids, NUL characters) is refused here, so one bad message can never
fail the commit of the group it would have been written with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from random import getrandbits
from typing import Any, Final, Literal, cast
from urllib.parse import urlsplit

import orjson

from engine.journey.model import RESERVED_PREFIXES

MessageType = Literal["track", "page", "screen", "identify", "alias"]
MESSAGE_TYPES: tuple[MessageType, ...] = ("track", "page", "screen", "identify", "alias")

KB = 1024
MAX_MESSAGE_BYTES = 32 * KB
MAX_BATCH_BYTES = 500 * KB
MAX_ID_LENGTH = 256  # identities.value, events.message_id
MAX_EVENT_LENGTH = 200  # events.name
# Levels of objects and arrays in one message. Far beyond what tracking needs, and far
# below what storing and showing it takes (JSON encoders stop at 255 levels: a deeper
# message would fail the commit of every message stored with it).
MAX_DEPTH = 128


class InvalidMessage(ValueError):
    """A message (or a whole request body) that cannot be accepted, and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(init=False, slots=True)
class Message:
    """One accepted tracking call, as the inbox stores it.

    Immutable as a frozen dataclass would be, checked by the type checker (`Final`)
    rather than at run time: a frozen dataclass sets each field through
    `object.__setattr__`, and building one took 2.2 µs of each event's ingestion; this
    `__init__` takes 0.8."""

    type: Final[MessageType]
    name: Final[str]
    message_id: Final[str]
    user_id: Final[str | None]
    anonymous_id: Final[str | None]
    previous_id: Final[str | None]
    timestamp: Final[datetime]
    received_at: Final[datetime]
    properties: Final[dict[str, Any]]
    context: Final[dict[str, Any]]
    traits: Final[dict[str, Any]]

    def __init__(
        self,
        *,
        type: MessageType,
        name: str,
        message_id: str,
        user_id: str | None,
        anonymous_id: str | None,
        previous_id: str | None,
        timestamp: datetime,
        received_at: datetime,
        properties: dict[str, Any],
        context: dict[str, Any],
        traits: dict[str, Any],
    ) -> None:
        self.type = type
        self.name = name
        self.message_id = message_id
        self.user_id = user_id
        self.anonymous_id = anonymous_id
        self.previous_id = previous_id
        self.timestamp = timestamp
        self.received_at = received_at
        self.properties = properties
        self.context = context
        self.traits = traits


@dataclass(frozen=True, slots=True)
class Rejection:
    """A batch item refused on its own, while the rest of the batch is stored."""

    index: int
    message_id: str | None
    error: str


@dataclass(frozen=True, slots=True)
class Batch:
    messages: list[Message]
    rejected: list[Rejection]


def parse_json(raw: bytes) -> object:
    try:
        return cast(object, orjson.loads(raw))
    except orjson.JSONDecodeError as error:
        raise InvalidMessage(f"malformed JSON: {error}") from None


def parse_message(
    payload: object,
    type_: MessageType,
    received_at: datetime,
    *,
    batch_context: Mapping[str, Any] | None = None,
    call_id: str | None = None,
) -> Message:
    """Check one message of a known type and normalise it; raises `InvalidMessage`.

    `call_id`: the message id to give it when it has none (a signed call's, which its
    replays share); else one is made up.
    """
    if not isinstance(payload, dict):
        raise InvalidMessage("a message must be a JSON object")
    _refuse_deep(payload)
    return _checked_message(payload, type_, received_at, batch_context, call_id)


def _checked_message(
    payload: dict[str, Any],
    type_: MessageType,
    received_at: datetime,
    batch_context: Mapping[str, Any] | None,
    call_id: str | None,
) -> Message:
    """`parse_message` past the checks of the payload's shape and depth."""
    user_id = _identifier(payload, "userId")
    anonymous_id = _identifier(payload, "anonymousId")
    previous_id = None
    if type_ == "alias":
        previous_id = _identifier(payload, "previousId")
        if previous_id is None or user_id is None:
            raise InvalidMessage("an alias needs previousId and userId")
    elif user_id is None and anonymous_id is None:
        raise InvalidMessage("a message needs userId or anonymousId")

    properties = _object(payload, "properties")
    context = _object(payload, "context")
    if batch_context:
        context = {**batch_context, **context}
    traits = _object(payload, "traits")
    if type_ == "identify":
        context_traits = context.get("traits")
        if context_traits is not None and not isinstance(context_traits, dict):
            raise InvalidMessage("`context.traits` must be an object")
        if context_traits:
            traits = {**context_traits, **traits}

    if type_ == "track":
        name = _event_name(payload.get("event"))
    else:
        name = type_
        if type_ in ("page", "screen"):
            properties = _page_properties(payload, properties)

    return Message(
        type=type_,
        name=name,
        message_id=_identifier(payload, "messageId") or call_id or time_ordered_id(),
        user_id=user_id,
        anonymous_id=anonymous_id,
        previous_id=previous_id,
        timestamp=_event_time(payload, received_at),
        received_at=received_at,
        properties=properties,
        context=context,
        traits=traits,
    )


def time_ordered_id() -> str:
    """A new UUID of version 7 (RFC 9562): the milliseconds since the epoch, then 74
    random bits; the id of a message sent without a `messageId`.

    Ids made later sort later, to the millisecond, as text too. The inbox's unique
    index on message ids then takes each new one at its end, on the few pages it holds
    already, where a random id (version 4) lands on a page of its own somewhere in the
    index: once that index outgrows the page cache, each event stored read a page and
    wrote a page at its commit. Ingestion on SQLite, a million leads x 5 events
    without message ids: 10,373 ev/s with random ids, 16,044 with these
    (bench/README.md). Ids of the same millisecond differ in 74 random bits: among a
    million of them, two are the same with a chance of about one in 4 x 10^10.

    The bits come from `random`, seeded from the system's randomness when the process
    starts and again in every forked child: an id must be unique, not unguessable
    (a caller may choose any `messageId` it likes). `os.urandom` is a system call per
    id, 1.7 µs alone and 3.5 µs of CPU beside SQLite's busy thread: 3-4% of the
    headline run's time; `getrandbits` takes 0.1 µs.
    """
    random_bits = getrandbits(74)
    value = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76  # the version
        | (random_bits >> 62) << 64
        | 0b10 << 62  # the variant
        | random_bits & ((1 << 62) - 1)
    )
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def parse_batch(payload: object, received_at: datetime, *, call_id: str | None = None) -> Batch:
    """Check a `/v1/batch` body: whole-body faults raise, bad items are rejected alone.
    `call_id`: as for `parse_message`, each item's followed by its index."""
    if not isinstance(payload, dict):
        raise InvalidMessage("a batch must be a JSON object with a `batch` array")
    items = payload.get("batch")
    if not isinstance(items, list) or not items:
        raise InvalidMessage("`batch` must be a non-empty array of messages")
    batch_context = _object(payload, "context")
    _refuse_deep({"context": batch_context})  # as deep as it will be in each message
    messages: list[Message] = []
    rejected: list[Rejection] = []
    for index, item in enumerate(items):
        try:
            item_id = None if call_id is None else f"{call_id}-{index}"
            messages.append(_batch_item(item, received_at, batch_context, item_id))
        except InvalidMessage as error:
            rejected.append(Rejection(index, _given_message_id(item), error.reason))
    return Batch(messages, rejected)


def _batch_item(
    item: object, received_at: datetime, batch_context: dict[str, Any], call_id: str | None
) -> Message:
    if not isinstance(item, dict):
        raise InvalidMessage("a message must be a JSON object")
    _refuse_deep(item)  # before measuring it: encoding it would fail
    type_ = item.get("type")
    if type_ not in MESSAGE_TYPES:
        raise InvalidMessage("`type` must be one of " + ", ".join(MESSAGE_TYPES))
    if len(orjson.dumps(item)) > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"message exceeds the {MAX_MESSAGE_BYTES // KB} KB limit")
    return _checked_message(item, cast(MessageType, type_), received_at, batch_context, call_id)


_CONTAINERS = (dict, list)


def _refuse_deep(message: dict[str, Any]) -> None:
    """Refuse a message with objects and arrays nested more than MAX_DEPTH levels.

    Each object and array is visited once, from a stack, rather than in a list built
    per level: 1.3 µs for a page call of `bench/e2e.py`, against 2.3."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(message, 1)]
    while stack:
        value, depth = stack.pop()
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, _CONTAINERS):
                if depth == MAX_DEPTH:
                    raise InvalidMessage(f"the message is nested more than {MAX_DEPTH} levels deep")
                stack.append((child, depth + 1))


def _given_message_id(item: object) -> str | None:
    if isinstance(item, dict):
        given = item.get("messageId")
        if isinstance(given, str | int) and not isinstance(given, bool):
            return str(given)
    return None


def _identifier(payload: dict[str, Any], field: str) -> str | None:
    """An id as a string; clients send numbers for database ids, so integers are stringified."""
    value = payload.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidMessage(f"`{field}` must be a string or an integer")
    text = str(value)
    if len(text) > MAX_ID_LENGTH:
        raise InvalidMessage(f"`{field}` is longer than {MAX_ID_LENGTH} characters")
    if "\x00" in text:
        raise InvalidMessage(f"`{field}` must not contain NUL characters")
    return text


def _object(payload: dict[str, Any], field: str) -> dict[str, Any]:
    value = payload.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidMessage(f"`{field}` must be an object")
    return value


def _event_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidMessage("`event` must be a non-empty string")
    if len(value) > MAX_EVENT_LENGTH:
        raise InvalidMessage(f"`event` is longer than {MAX_EVENT_LENGTH} characters")
    if "\x00" in value:
        raise InvalidMessage("`event` must not contain NUL characters")
    if value.startswith(RESERVED_PREFIXES):
        # cjm's own channels report these; anyone holding the (public) write key must not.
        raise InvalidMessage(
            f"event names starting with {' or '.join(RESERVED_PREFIXES)} are reserved for cjm"
        )
    return value


def _page_properties(payload: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    """Fill `name` and `path` the way analytics.js does, so journeys can match on them."""
    name = payload.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidMessage("`name` must be a string")
    url = properties.get("url")
    derive_path = "path" not in properties and isinstance(url, str)
    if (name is None or "name" in properties) and not derive_path:
        return properties
    filled = dict(properties)
    if name is not None:
        filled.setdefault("name", name)
    if derive_path:
        filled["path"] = _url_path(cast(str, url))
    return filled


def _url_path(url: str) -> str:
    try:
        return urlsplit(url).path or "/"
    except ValueError:
        return "/"


def _event_time(payload: dict[str, Any], received_at: datetime) -> datetime:
    """When it happened: the client's time, corrected for its clock skew like Segment does.

    `timestamp + (received_at - sentAt)` moves the client's clock onto ours; whatever
    remains in the future is clamped to the moment we received the message.
    """
    timestamp = _instant(payload, "timestamp")
    sent_at = _instant(payload, "sentAt")
    if timestamp is None:
        return received_at
    if sent_at is not None:
        try:
            timestamp = timestamp + (received_at - sent_at)
        except OverflowError:
            raise InvalidMessage(f"bad timestamp {_shown(payload['timestamp'])}") from None
    return min(timestamp, received_at)


def _instant(payload: dict[str, Any], field: str) -> datetime | None:
    """An ISO-8601 time as aware UTC; a time without an offset is taken to be UTC."""
    value = payload.get(field)
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        moment = datetime.fromisoformat(value)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidMessage(f"bad {field} {_shown(value)}") from None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
