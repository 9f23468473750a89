"""Bodies no client should send: too large, nested without end, not UTF-8, not JSON.
Each is refused with a 4xx that says why, and nothing of it is stored; a body nested
deep but within the limits is stored and shown back without a 500."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from engine.db.schema import events
from tests.worker.conftest import Engine, app_client
from tests.worker.conftest import engine as engine

WRITE = httpx.BasicAuth("wk_test", "")
KB = 1024


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(engine.runtime, auth=WRITE) as client:
        yield client


def admin(request: httpx.Request) -> httpx.Request:
    """The admin key, in place of the client's write key."""
    request.headers["Authorization"] = "Bearer ak_test"
    return request


def track(**properties: object) -> dict[str, object]:
    return {"userId": "ada", "event": "viewed", "properties": properties}


def nested(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = {"a": [value]}
    return value


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 16 * KB):
        yield data[start : start + 16 * KB]


async def stored(engine: Engine) -> list[object]:
    return await engine.rows(events)


@pytest.mark.parametrize(
    ("path", "limit_kb"), [("/v1/track", 32), ("/v1/identify", 32), ("/v1/batch", 500)]
)
async def test_a_body_over_the_limit_is_a_413_and_stores_nothing(
    engine: Engine, client: httpx.AsyncClient, path: str, limit_kb: int
) -> None:
    filler = "x" * (limit_kb * KB)
    body = {"batch": [track(filler=filler)]} if path == "/v1/batch" else track(filler=filler)

    declared = await client.post(path, json=body)
    streamed = await client.post(
        path,
        content=chunks(json.dumps(body).encode()),  # no Content-Length: counted as it arrives
        headers={"Content-Type": "application/json"},
    )

    for answer in (declared, streamed):
        assert answer.status_code == 413
        assert f"{limit_kb} KB" in answer.json()["error"]
    assert await stored(engine) == []


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 30_000,
        b'{"userId": "ada", "event": "x", "properties": ' + b'{"a": ' * 5_000,
        b'{"userId": "ada", "event": "x", "properties": '
        + b'{"a": [' * 2_000
        + b"1"
        + b"]}" * 2_000
        + b"}",
    ],
    ids=["unclosed arrays", "unclosed objects", "closed, 2000 deep"],  # all under 32 KB
)
async def test_json_nested_beyond_reason_is_a_clear_400(
    engine: Engine, client: httpx.AsyncClient, body: bytes
) -> None:
    answer = await client.post(
        "/v1/track", content=body, headers={"Content-Type": "application/json"}
    )

    assert answer.status_code == 400
    assert answer.json()["error"].startswith("malformed JSON")
    assert await stored(engine) == []


async def test_json_nested_deep_within_the_limits_is_stored_and_shown_without_error(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    deep = nested(60)

    answer = await client.post("/v1/track", json=track(deep=deep))
    await engine.run()
    lead_id = await engine.lead_id(user_id="ada")
    shown = await client.get(f"/v1/leads/{lead_id}", auth=admin)

    assert answer.status_code == 200
    assert shown.status_code == 200
    (event,) = shown.json()["events"]
    assert (event["processed_at"] is not None, event["error"]) == (True, None)
    (row,) = await stored(engine)
    assert row.data["properties"] == {"deep": deep}


async def test_json_nested_deeper_than_storage_takes_is_a_400_and_fails_no_other_message(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    deep = nested(150)  # two levels per step: 300 deep, and well under 32 KB

    answer = await client.post("/v1/track", json=track(deep=deep))
    other = await client.post("/v1/track", json={"userId": "bob", "event": "viewed"})

    assert answer.status_code == 400
    assert "nested" in answer.json()["error"]
    assert other.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"userId": "ada", "event": "\xff\xfe"}',
        '{"userId": "ada", "event": "café"}'.encode("latin-1"),
        '{"userId": "ada", "event": "x"}'.encode("utf-16"),
        b'{"userId": "ada", "event": "\xed\xa0\x80"}',  # an encoded surrogate
    ],
    ids=["invalid bytes", "latin-1", "utf-16", "surrogate"],
)
async def test_a_body_that_is_not_utf8_is_a_400(
    engine: Engine, client: httpx.AsyncClient, body: bytes
) -> None:
    answer = await client.post(
        "/v1/track", content=body, headers={"Content-Type": "application/json"}
    )

    assert answer.status_code == 400
    assert answer.json()["success"] is False
    assert await stored(engine) == []


@pytest.mark.parametrize("query", [b"email=%FF%FE", b"user_id=%C3%28", b"anonymous_id=%ED%A0%80"])
async def test_a_query_that_is_not_utf8_finds_no_one_and_breaks_nothing(
    engine: Engine, client: httpx.AsyncClient, query: bytes
) -> None:
    await client.post("/v1/identify", json={"userId": "ada", "traits": {"email": "a@b.example"}})
    await engine.run()

    answer = await client.get(f"/v1/leads?{query.decode()}", auth=admin)

    # Decoded with replacement characters, the filter matches no one (dropped, it would
    # list the most recent leads: Ada); or it is refused.
    if answer.status_code == 200:
        assert answer.json() == []
    else:
        assert answer.status_code in (400, 422)


@pytest.mark.parametrize("query", [b"anonymous_id=%00", b"limit=1e9999", b"limit=%FF", b"limit=0"])
async def test_a_query_value_the_api_cannot_take_is_a_422(
    client: httpx.AsyncClient, query: bytes
) -> None:
    answer = await client.get(f"/v1/leads?{query.decode()}", auth=admin)

    assert answer.status_code == 422


async def test_a_batch_item_nested_deeper_than_storage_takes_is_rejected_alone(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    batch = {
        "batch": [
            {"type": "track", "userId": "ada", "event": "viewed", "properties": {"d": nested(150)}},
            {"type": "track", "userId": "bob", "event": "viewed", "messageId": "kept"},
        ]
    }

    answer = await client.post("/v1/batch", json=batch)

    assert answer.status_code == 200
    assert answer.json()["accepted"] == 1
    (rejection,) = answer.json()["rejected"]
    assert rejection["index"] == 0
    assert "nested" in rejection["error"]
    assert [row.message_id for row in await stored(engine)] == ["kept"]  # type: ignore[attr-defined]
