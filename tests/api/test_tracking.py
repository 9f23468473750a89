"""The tracking routes over HTTP: 200 means stored, with every refusal and its reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from engine.api.tracking import tracking_router
from engine.db.database import Database
from engine.db.schema import events
from engine.ingest.inbox import Inbox
from tests.api.conftest import ADMIN, NOW, WRITE, Runtime
from tests.ingest.write_lock import held_write_lock


async def stored_events(runtime: Runtime) -> list[Any]:
    async with runtime.db.read() as connection:
        return list(await connection.execute(select(events).order_by(events.c.id)))


async def test_track_answers_200_only_after_the_event_is_committed(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    response = await client.post(
        "/v1/track", json={"userId": "u1", "event": "catalog_requested"}, auth=WRITE
    )
    assert response.status_code == 200
    assert response.json() == {"success": True}
    assert runtime.commits == [1]
    (row,) = await stored_events(runtime)
    assert (row.type, row.name, row.user_id, row.received_at) == (
        "track",
        "catalog_requested",
        "u1",
        NOW,
    )


@pytest.mark.parametrize(
    ("path", "body", "name"),
    [
        ("/v1/page", {"anonymousId": "a1", "properties": {"path": "/catalog"}}, "page"),
        ("/v1/screen", {"anonymousId": "a1", "name": "Home"}, "screen"),
        ("/v1/identify", {"userId": "u1", "traits": {"email": "a@x.test"}}, "identify"),
        ("/v1/alias", {"previousId": "a1", "userId": "u1"}, "alias"),
    ],
)
async def test_each_call_is_stored_under_its_event_name(
    client: httpx.AsyncClient, runtime: Runtime, path: str, body: dict[str, Any], name: str
) -> None:
    response = await client.post(path, json=body, auth=WRITE)
    assert response.status_code == 200
    (row,) = await stored_events(runtime)
    assert row.name == name


async def test_a_repeated_message_id_is_stored_once(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = {"userId": "u1", "event": "x", "messageId": "m-1"}
    first = await client.post("/v1/track", json=body, auth=WRITE)
    again = await client.post("/v1/track", json=body, auth=WRITE)
    assert (first.status_code, again.status_code) == (200, 200)
    assert len(await stored_events(runtime)) == 1


@pytest.mark.parametrize(
    ("path", "content", "reason"),
    [
        ("/v1/track", b'{"userId": "u1",', "malformed JSON: "),
        ("/v1/track", b"[]", "a message must be a JSON object"),
        ("/v1/track", b'{"event": "x"}', "a message needs userId or anonymousId"),
        ("/v1/track", b'{"userId": "u1"}', "`event` must be a non-empty string"),
        ("/v1/track", b'{"userId": "u1", "event": ""}', "`event` must be a non-empty string"),
        ("/v1/track", b'{"userId": 1.5, "event": "x"}', "`userId` must be a string or an integer"),
        ("/v1/page", b'{"anonymousId": "a1", "properties": [1]}', "`properties` must be an object"),
        ("/v1/page", b'{"anonymousId": "a1", "context": 1}', "`context` must be an object"),
        ("/v1/identify", b'{"userId": "u1", "traits": "vip"}', "`traits` must be an object"),
        ("/v1/alias", b'{"userId": "u1"}', "an alias needs previousId and userId"),
        ("/v1/page", b'{"anonymousId": "a1", "timestamp": "noon"}', "bad timestamp 'noon'"),
        ("/v1/batch", b'{"batch": "no"}', "`batch` must be a non-empty array of messages"),
        (
            "/v1/track",
            b'{"userId": "u1", "event": "email.unsubscribed"}',
            "event names starting with email. or offer. are reserved for cjm",
        ),
    ],
)
async def test_a_bad_message_is_refused_400_with_the_reason(
    client: httpx.AsyncClient, runtime: Runtime, path: str, content: bytes, reason: str
) -> None:
    response = await client.post(path, content=content, auth=WRITE)
    assert response.status_code == 400
    answer = response.json()
    assert answer["success"] is False
    assert answer["error"].startswith(reason)
    assert await stored_events(runtime) == []


async def test_a_message_over_32_kb_is_refused_413(client: httpx.AsyncClient) -> None:
    body = {"userId": "u1", "event": "x", "properties": {"blob": "x" * 33 * 1024}}
    response = await client.post("/v1/track", json=body, auth=WRITE)
    assert response.status_code == 413
    assert response.json() == {"success": False, "error": "request body exceeds the 32 KB limit"}


async def test_a_batch_over_500_kb_is_refused_413(client: httpx.AsyncClient) -> None:
    item = {"type": "track", "userId": "u1", "event": "x", "properties": {"blob": "x" * 1000}}
    body = {"batch": [item] * 501}
    response = await client.post("/v1/batch", json=body, auth=WRITE)
    assert len(response.request.content) > 501 * 1000
    assert response.status_code == 413
    assert response.json()["error"] == "request body exceeds the 500 KB limit"


async def test_a_streamed_body_is_cut_off_at_the_limit(client: httpx.AsyncClient) -> None:
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            sent.append(1)
            yield b" " * 1024

    response = await client.post("/v1/track", content=chunks(), auth=WRITE)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert len(sent) < 100


async def test_a_batch_stores_its_good_messages_and_rejects_a_bad_one_alone(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = {
        "batch": [
            {"type": "track", "userId": "u1", "event": "a", "messageId": "m1"},
            {"type": "track", "userId": "u1", "messageId": "m2"},
            {"type": "page", "anonymousId": "a1", "messageId": "m3"},
        ]
    }
    response = await client.post("/v1/batch", json=body, auth=WRITE)
    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "accepted": 2,
        "rejected": [
            {"index": 1, "messageId": "m2", "error": "`event` must be a non-empty string"}
        ],
    }
    assert [row.message_id for row in await stored_events(runtime)] == ["m1", "m3"]


async def test_a_batch_of_only_bad_messages_is_refused_400_with_the_list(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    body = {"batch": [{"type": "group", "userId": "u1"}, {"type": "track", "event": "x"}]}
    response = await client.post("/v1/batch", json=body, auth=WRITE)
    assert response.status_code == 400
    assert response.json() == {
        "success": False,
        "error": "every message of the batch was rejected",
        "accepted": 0,
        "rejected": [
            {
                "index": 0,
                "messageId": None,
                "error": "`type` must be one of track, page, screen, identify, alias",
            },
            {"index": 1, "messageId": None, "error": "a message needs userId or anonymousId"},
        ],
    }
    assert await stored_events(runtime) == []


async def test_concurrent_posts_are_all_answered_after_a_shared_commit(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    async def post(n: int) -> tuple[int, int]:
        response = await client.post(
            "/v1/track", json={"userId": f"u{n}", "event": "x"}, auth=WRITE
        )
        return response.status_code, len(runtime.commits)

    answers = await asyncio.gather(*(post(n) for n in range(50)))
    assert all(status == 200 and commits >= 1 for status, commits in answers)
    assert len(await stored_events(runtime)) == 50
    assert len(runtime.commits) < 50


async def test_a_storage_failure_answers_503_with_retry_after(
    client: httpx.AsyncClient, runtime: Runtime, tmp_path: Path
) -> None:
    broken = Database(f"sqlite+aiosqlite:///{tmp_path / 'no-tables.db'}")
    await runtime.inbox.stop()
    runtime.inbox = Inbox(broken, runtime.clock)
    await runtime.inbox.start()
    try:
        response = await client.post("/v1/track", json={"userId": "u1", "event": "x"}, auth=WRITE)
    finally:
        await broken.close()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"success": False, "error": "storage unavailable: retry later"}


async def test_an_overloaded_inbox_answers_503_at_once_and_stores_each_200_once(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    # Writes held back by another connection: one request in the writer's hands, two
    # queued, and every request beyond them refused at once rather than left waiting.
    await runtime.inbox.stop()
    runtime.inbox = Inbox(runtime.db, runtime.clock, max_group=1, max_queued=2, max_wait_s=600)
    await runtime.inbox.start()

    async def post(n: int) -> httpx.Response:
        body = {"userId": f"u{n}", "event": "x", "messageId": f"m{n}"}
        return await client.post("/v1/track", json=body, auth=WRITE)

    async with held_write_lock(runtime.db):
        requests = []
        for n in range(6):
            requests.append(asyncio.create_task(post(n)))
            await asyncio.sleep(0.02)
        for _ in range(600):  # answered while the lock is still held (liveness bound)
            if sum(request.done() for request in requests) >= 3:
                break
            await asyncio.sleep(0.05)
        early = [request.result() for request in requests if request.done()]
    answers = [await request for request in requests]

    assert len(early) == 3
    assert all(answer.status_code == 503 for answer in early)
    assert all(answer.headers["retry-after"] == "1" for answer in early)
    assert early[0].json() == {"success": False, "error": "overloaded: retry later"}
    accepted = sorted(f"m{n}" for n, answer in enumerate(answers) if answer.status_code == 200)
    assert len(accepted) == 3
    assert sorted(row.message_id for row in await stored_events(runtime)) == accepted


async def test_browsers_may_post_tracking_calls_from_any_origin(client: httpx.AsyncClient) -> None:
    preflight = await client.options(
        "/v1/track",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    response = await client.post(
        "/v1/track",
        content=orjson.dumps({"userId": "u1", "event": "x"}),
        headers={"Origin": "https://shop.example", "Content-Type": "text/plain"},
        auth=WRITE,
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"


async def test_admin_routes_get_no_cors_headers(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/v1/journeys", headers={**ADMIN, "Origin": "https://elsewhere.example"}
    )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


async def test_an_anonymous_visitor_who_identifies_is_one_lead(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    await client.post("/v1/page", json={"anonymousId": "a1"}, auth=WRITE)
    await client.post("/v1/identify", json={"anonymousId": "a1", "userId": "u1"}, auth=WRITE)
    found = (await client.get("/v1/leads", params={"user_id": "u1"}, headers=ADMIN)).json()
    assert [(lead["user_id"], lead["anonymous_ids"]) for lead in found] == [("u1", ["a1"])]
    assert len({row.lead_id for row in await stored_events(runtime)}) == 1


@pytest.mark.parametrize(
    "content",
    [
        b'{"userId": "u", "event": "x", "properties": {"a": "\\u0000"}}',
        b'{"userId": "u", "event": "x", "properties": {"\\u0000": 1}}',
        b'{"userId": "u", "event": "x", "properties": {"a": "\\ud800"}}',
        b'{"userId": "u", "event": "x", "timestamp": "0001-01-01T00:00:00"}',
        b'{"userId": "u", "event": "x", "properties": {"n": 1e400}}',
    ],
    ids=["NUL in a value", "NUL in a key", "lone surrogate", "year 1", "huge number"],
)
async def test_odd_but_wellformed_bodies_never_get_a_server_error(
    client: httpx.AsyncClient, content: bytes
) -> None:
    response = await client.post("/v1/track", content=content, auth=WRITE)
    assert response.status_code in (200, 400), response.text


@pytest.mark.parametrize(
    ("path", "content", "headers"),
    [
        ("/v1/track", b'{"userId": "u1", "event": "x", "messageId": "m-1"}', {}),
        ("/v1/identify", b'{"anonymousId": "a1", "traits": {"email": "a@x.test"}}', {}),
        ("/v1/batch", b'{"batch": [{"type": "track", "userId": "u1", "event": "x"}, 7]}', {}),
        ("/v1/batch", b'{"batch": [7]}', {}),
        ("/v1/track", b'{"userId": "u1", "event": "x"', {}),
        ("/v1/track", b'{"userId": "u1", "event": "x"}', {"authorization": "Basic d3Jvbmc6"}),
        ("/v1/page", b'{"properties": {}}', {}),
        ("/v1/track", b" " * (33 * 1024), {}),
    ],
)
async def test_the_documented_routes_answer_as_the_tracking_fast_path_does(
    client: httpx.AsyncClient,
    runtime: Runtime,
    path: str,
    content: bytes,
    headers: dict[str, str],
) -> None:
    """The app answers tracking POSTs before FastAPI's routing (TrackingCalls); the
    FastAPI routes, there for the OpenAPI document, must answer alike."""
    routes_only = FastAPI()
    routes_only.include_router(tracking_router(runtime))
    transport = httpx.ASGITransport(app=routes_only)
    async with httpx.AsyncClient(transport=transport, base_url="http://cjm.test") as plain:
        answers = [
            await each.post(path, content=content, auth=None if headers else WRITE, headers=headers)
            for each in (client, plain)
        ]
    fast, routed = ((a.status_code, a.json(), _answer_headers(a)) for a in answers)
    assert fast == routed
    assert fast[0] in (200, 400, 401, 413)


def _answer_headers(answer: httpx.Response) -> dict[str, str]:
    return {
        name: answer.headers[name]
        for name in ("content-type", "retry-after", "www-authenticate")
        if name in answer.headers
    }
