"""Segment messages are checked and normalised before anything is stored."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from typing import Any

import pytest

from engine.ingest.messages import (
    MAX_DEPTH,
    MAX_MESSAGE_BYTES,
    InvalidMessage,
    MessageType,
    parse_batch,
    parse_json,
    parse_message,
    time_ordered_id,
)

RECEIVED = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def parse(type_: MessageType, **fields: Any) -> Any:
    return parse_message(fields, type_, RECEIVED)


def reason(type_: MessageType, **fields: Any) -> str:
    with pytest.raises(InvalidMessage) as caught:
        parse(type_, **fields)
    return caught.value.reason


def test_track_takes_its_name_from_event() -> None:
    message = parse("track", userId="u1", event="catalog_requested", properties={"n": 1})
    assert (message.type, message.name, message.user_id) == ("track", "catalog_requested", "u1")
    assert message.properties == {"n": 1}


@pytest.mark.parametrize("type_", ["page", "screen", "identify"])
def test_other_calls_are_named_after_their_type(type_: MessageType) -> None:
    assert parse(type_, anonymousId="a1").name == type_


def test_alias_is_named_alias_and_keeps_the_previous_id() -> None:
    message = parse("alias", previousId="old", userId="new")
    assert (message.name, message.previous_id, message.user_id) == ("alias", "old", "new")


def test_integer_ids_are_stringified() -> None:
    message = parse("track", userId=42, anonymousId=7, event="x", messageId=99)
    assert (message.user_id, message.anonymous_id, message.message_id) == ("42", "7", "99")


def test_a_missing_message_id_is_generated_as_a_uuid7_of_now() -> None:
    before = time.time_ns() // 1_000_000
    message = parse("track", userId="u1", event="x")
    after = time.time_ns() // 1_000_000
    generated = uuid.UUID(message.message_id)
    assert (generated.version, generated.variant) == (7, uuid.RFC_4122)
    assert str(generated) == message.message_id  # the canonical text form
    assert before <= generated.int >> 80 <= after  # its milliseconds since the epoch


def test_generated_message_ids_sort_as_text_in_the_order_they_were_made() -> None:
    """What keeps the inbox's unique index appending: a later id sorts later."""
    made = []
    for _ in range(5):
        made.append(time_ordered_id())
        time.sleep(0.002)  # the next one in a later millisecond
    assert sorted(made) == made


def test_generated_message_ids_of_one_millisecond_differ() -> None:
    assert len({time_ordered_id() for _ in range(20_000)}) == 20_000


def _ids_in_child(connection: Connection) -> None:
    connection.send([time_ordered_id() for _ in range(1_000)])


def test_forked_processes_make_ids_of_their_own() -> None:
    """API processes forked from one parent must not share its random state: their ids
    of one millisecond would be the same, and a message would be dropped as a repeat."""
    forks = multiprocessing.get_context("fork")
    made: list[str] = []
    for _ in range(2):
        receiver, sender = forks.Pipe(duplex=False)
        child = forks.Process(target=_ids_in_child, args=(sender,))
        child.start()
        made += receiver.recv()
        child.join()
    made += [time_ordered_id() for _ in range(1_000)]
    # The random part alone: the milliseconds of the three processes may well match.
    assert len({uuid.UUID(made_id).int & ((1 << 76) - 1) for made_id in made}) == 3_000


def test_unknown_fields_are_ignored() -> None:
    message = parse(
        "track",
        userId="u1",
        event="x",
        integrations={"All": True},
        _metadata={},
        writeKey="k",
        type="identify",
        channel="server",
    )
    assert message.type == "track"


def test_page_path_is_derived_from_url_when_missing() -> None:
    message = parse("page", anonymousId="a1", properties={"url": "https://x.test/catalog/a?q=1"})
    assert message.properties["path"] == "/catalog/a"


def test_page_path_given_is_kept() -> None:
    message = parse("page", anonymousId="a1", properties={"url": "https://x.test/b", "path": "/a"})
    assert message.properties["path"] == "/a"


def test_page_name_is_copied_into_properties() -> None:
    assert parse("page", anonymousId="a1", name="Catalog").properties == {"name": "Catalog"}


def test_identify_merges_context_traits_under_its_traits() -> None:
    message = parse(
        "identify",
        userId="u1",
        traits={"email": "a@x.test"},
        context={"traits": {"email": "old@x.test", "city": "Oslo"}},
    )
    assert message.traits == {"email": "a@x.test", "city": "Oslo"}


def test_timestamp_without_offset_is_utc() -> None:
    message = parse("track", userId="u1", event="x", timestamp="2026-03-02T10:00:00")
    assert message.timestamp == datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def test_timestamp_with_offset_is_converted_to_utc() -> None:
    message = parse("track", userId="u1", event="x", timestamp="2026-03-02T13:00:00+03:00")
    assert message.timestamp == datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def test_missing_timestamp_is_the_receive_time() -> None:
    message = parse("track", userId="u1", event="x")
    assert message.timestamp == message.received_at == RECEIVED


def test_sent_at_corrects_the_client_clock_skew() -> None:
    # The client's clock is 1 h fast: it sent at 13:00 its time, we received at 12:00.
    message = parse(
        "track",
        userId="u1",
        event="x",
        timestamp="2026-03-02T12:50:00Z",
        sentAt="2026-03-02T13:00:00Z",
    )
    assert message.timestamp == RECEIVED - timedelta(minutes=10)


def test_a_timestamp_in_the_future_is_clamped_to_the_receive_time() -> None:
    message = parse("track", userId="u1", event="x", timestamp="2026-03-03T00:00:00Z")
    assert message.timestamp == RECEIVED


# A valid message of each type; each case below spoils one field of it.
VALID: dict[MessageType, dict[str, Any]] = {
    "track": {"userId": "u1", "event": "x"},
    "page": {"anonymousId": "a1"},
    "identify": {"userId": "u1"},
    "alias": {"previousId": "a1", "userId": "u1"},
}


@pytest.mark.parametrize(
    ("type_", "spoiled", "expected"),
    [
        ("track", {"userId": None}, "a message needs userId or anonymousId"),
        ("track", {"userId": ""}, "a message needs userId or anonymousId"),
        ("track", {"event": None}, "`event` must be a non-empty string"),
        ("track", {"event": " "}, "`event` must be a non-empty string"),
        ("track", {"event": 5}, "`event` must be a non-empty string"),
        ("track", {"event": "e" * 201}, "`event` is longer than 200 characters"),
        ("track", {"event": "a\x00"}, "`event` must not contain NUL characters"),
        ("track", {"userId": 1.5}, "`userId` must be a string or an integer"),
        ("track", {"userId": True}, "`userId` must be a string or an integer"),
        ("track", {"anonymousId": ["a"]}, "`anonymousId` must be a string or an integer"),
        ("track", {"userId": "u" * 257}, "`userId` is longer than 256 characters"),
        ("track", {"userId": "u\x00"}, "`userId` must not contain NUL characters"),
        ("track", {"messageId": {}}, "`messageId` must be a string or an integer"),
        ("track", {"properties": []}, "`properties` must be an object"),
        ("track", {"context": "web"}, "`context` must be an object"),
        ("identify", {"traits": 3}, "`traits` must be an object"),
        ("identify", {"context": {"traits": 3}}, "`context.traits` must be an object"),
        ("page", {"name": 3}, "`name` must be a string"),
        ("alias", {"previousId": None}, "an alias needs previousId and userId"),
        ("alias", {"userId": None, "anonymousId": "a2"}, "an alias needs previousId and userId"),
        ("track", {"timestamp": "yesterday"}, "bad timestamp 'yesterday'"),
        ("track", {"timestamp": 1700000000}, "bad timestamp 1700000000"),
        ("track", {"sentAt": "soon"}, "bad sentAt 'soon'"),
    ],
)
def test_an_invalid_message_is_refused_with_a_precise_reason(
    type_: MessageType, spoiled: dict[str, Any], expected: str
) -> None:
    assert reason(type_, **{**VALID[type_], **spoiled}) == expected


def test_a_message_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="a message must be a JSON object"):
        parse_message([1], "track", RECEIVED)


def _nested(levels: int, shape: str) -> Any:
    """`levels` levels of objects and arrays around a string, by `shape` from the
    outside in ("o" an object, "a" an array, repeated), each beside plain values."""
    value: Any = "leaf"
    for level in reversed(range(levels)):
        value = {"k": value, "n": 1} if shape[level % len(shape)] == "o" else [0, value, "x"]
    return value


@pytest.mark.parametrize("shape", ["o", "a", "oa", "aao"])
def test_nesting_is_refused_one_level_past_the_limit_and_not_at_it(shape: str) -> None:
    """The message is the first level and `properties` the second, so a value under
    it of MAX_DEPTH - 2 levels reaches the limit; shallow siblings around it."""

    def properties(levels: int) -> dict[str, Any]:
        return {"a": [1, {"b": [2]}], "deep": _nested(levels, shape), "z": {}}

    at_limit = parse("track", userId="u1", event="e", properties=properties(MAX_DEPTH - 2))
    assert at_limit.properties == properties(MAX_DEPTH - 2)
    expected = f"the message is nested more than {MAX_DEPTH} levels deep"
    assert reason("track", userId="u1", event="e", properties=properties(MAX_DEPTH - 1)) == expected
    batch = parse_batch(
        {
            "batch": [
                {"type": "track", "userId": "u1", "event": "e", "properties": properties(n)}
                for n in (MAX_DEPTH - 2, MAX_DEPTH - 1)
            ]
        },
        RECEIVED,
    )
    assert [m.properties for m in batch.messages] == [properties(MAX_DEPTH - 2)]
    assert [(r.index, r.error) for r in batch.rejected] == [(1, expected)]


def test_malformed_json_is_refused_with_the_parser_reason() -> None:
    with pytest.raises(InvalidMessage, match=r"^malformed JSON: "):
        parse_json(b'{"userId": ')


def test_batch_context_is_merged_under_each_message_context() -> None:
    batch = parse_batch(
        {
            "context": {"library": "js", "ip": "1.2.3.4"},
            "batch": [
                {"type": "track", "userId": "u1", "event": "x", "context": {"ip": "5.6.7.8"}}
            ],
        },
        RECEIVED,
    )
    assert batch.messages[0].context == {"library": "js", "ip": "5.6.7.8"}


def test_batch_rejects_a_bad_item_alone_with_its_index_and_message_id() -> None:
    batch = parse_batch(
        {
            "batch": [
                {"type": "track", "userId": "u1", "event": "ok"},
                {"type": "track", "userId": "u1", "messageId": "m2"},
                {"type": "group", "userId": "u1", "messageId": 3},
                "not an object",
            ]
        },
        RECEIVED,
    )
    assert [message.name for message in batch.messages] == ["ok"]
    assert [(r.index, r.message_id, r.error) for r in batch.rejected] == [
        (1, "m2", "`event` must be a non-empty string"),
        (2, "3", "`type` must be one of track, page, screen, identify, alias"),
        (3, None, "a message must be a JSON object"),
    ]


def test_batch_rejects_an_item_over_the_message_size_limit() -> None:
    big = {
        "type": "track",
        "userId": "u1",
        "event": "x",
        "properties": {"s": "x" * MAX_MESSAGE_BYTES},
    }
    batch = parse_batch({"batch": [big]}, RECEIVED)
    assert batch.rejected[0].error == "message exceeds the 32 KB limit"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ([], "a batch must be a JSON object with a `batch` array"),
        ({"batch": {}}, "`batch` must be a non-empty array of messages"),
        ({"batch": []}, "`batch` must be a non-empty array of messages"),
        ({"batch": [{"type": "track"}], "context": 1}, "`context` must be an object"),
    ],
)
def test_a_malformed_batch_is_refused_as_a_whole(body: object, expected: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_batch(body, RECEIVED)
    assert caught.value.reason == expected
