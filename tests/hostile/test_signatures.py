"""Signed tracking calls (`X-CJM-Signature`) captured on the wire cannot be forged into
new ones nor replayed into new data: an altered body or a foreign secret is a 401, a
replay after the 300 s window is a 401, and a replay inside it adds nothing."""

from __future__ import annotations

from datetime import timedelta

import httpx
import orjson
import pytest
from sqlalchemy import func, select

from engine.db.schema import events
from tests.api.conftest import NOW, Runtime
from tests.api.test_auth import signed

AT = int(NOW.timestamp())


async def stored(runtime: Runtime) -> int:
    async with runtime.db.read() as connection:
        return int(await connection.scalar(select(func.count()).select_from(events)) or 0)


async def test_a_signature_of_another_body_or_secret_is_a_401_and_stores_nothing(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    genuine = orjson.dumps({"userId": "ada", "event": "viewed", "messageId": "m-1"})
    altered = orjson.dumps({"userId": "ada", "event": "order_completed", "messageId": "m-1"})

    retimed = signed(genuine, at=AT)["X-CJM-Signature"].replace(f"t={AT}", f"t={AT + 1}")

    answers = [
        await client.post("/v1/track", content=altered, headers=signed(genuine, at=AT)),
        await client.post(
            "/v1/track", content=genuine, headers=signed(genuine, at=AT, secret="guessed")
        ),
        await client.post(
            "/v1/track",
            content=genuine,
            headers={"X-CJM-Signature": retimed, "Content-Type": "application/json"},
        ),
    ]

    assert [answer.status_code for answer in answers] == [401, 401, 401]
    assert await stored(runtime) == 0


async def test_a_signed_call_replayed_after_the_window_is_a_401(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = orjson.dumps({"userId": "ada", "event": "viewed", "messageId": "m-1"})
    headers = signed(body, at=AT)
    first = await client.post("/v1/track", content=body, headers=headers)

    runtime.clock.advance(timedelta(seconds=301))
    replayed = await client.post("/v1/track", content=body, headers=headers)

    assert (first.status_code, replayed.status_code) == (200, 401)
    assert "300 s" in replayed.json()["error"]
    assert await stored(runtime) == 1


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps({"userId": "ada", "event": "order_completed", "messageId": "m-1"}),
        orjson.dumps({"userId": "ada", "event": "order_completed"}),
    ],
    ids=["with messageId", "without messageId"],
)
async def test_a_signed_call_replayed_inside_the_window_adds_nothing(
    client: httpx.AsyncClient, runtime: Runtime, body: bytes
) -> None:
    headers = signed(body, at=AT)

    answers = []
    for _ in range(3):
        answers.append(await client.post("/v1/track", content=body, headers=headers))
        runtime.clock.advance(timedelta(seconds=60))

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert await stored(runtime) == 1


async def test_a_signed_batch_replayed_inside_the_window_adds_nothing_and_keeps_its_items_apart(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = orjson.dumps(
        {
            "batch": [
                {"type": "track", "userId": "ada", "event": "viewed"},
                {"type": "track", "userId": "ada", "event": "viewed"},  # the same, twice
                {"type": "identify", "userId": "ada", "traits": {"plan": "pro"}},
            ]
        }
    )
    headers = signed(body, at=AT)

    first = await client.post("/v1/batch", content=body, headers=headers)
    runtime.clock.advance(timedelta(seconds=60))
    replayed = await client.post("/v1/batch", content=body, headers=headers)

    assert (first.status_code, replayed.status_code) == (200, 200)
    assert await stored(runtime) == 3  # each item once, none merged with another
