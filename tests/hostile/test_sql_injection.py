"""SQL in ids, traits, event names and query parameters is data like any other: stored
and found as written, matching nothing else, and changing no other row."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from engine.db.schema import leads
from tests.worker.conftest import Engine, app_client
from tests.worker.conftest import engine as engine

INJECTIONS = (
    "ada'); DROP TABLE leads; --",
    "' OR '1'='1",
    '" OR ""="',
    "1; DELETE FROM events",
    "%",
    "_",
    "\\'; UPDATE leads SET traits = '{}' --",
)
USER_ID = INJECTIONS[0]
ANONYMOUS_ID = INJECTIONS[1]
TRAITS = {
    "email": "x@example.com' OR '1'='1",
    "first_name": "Robert'); DROP TABLE events;--",
    "city": "%' UNION SELECT value FROM secrets --",
    "'; DELETE FROM leads; --": "a key is data too",
}
BOB = {"email": "bob@example.com", "first_name": "Bob"}


def admin(request: httpx.Request) -> httpx.Request:
    request.headers["Authorization"] = "Bearer ak_test"
    return request


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(engine.runtime, auth=httpx.BasicAuth("wk_test", "")) as client:
        yield client


async def find(client: httpx.AsyncClient, **query: str) -> list[dict[str, Any]]:
    answer = await client.get("/v1/leads", params=query, auth=admin)
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()
    return found


async def test_sql_in_ids_traits_and_events_is_stored_literally_and_touches_no_other_row(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await client.post("/v1/identify", json={"userId": "bob", "traits": BOB})
    await engine.run()
    bob_before = await engine.rows(leads)

    identify = {"userId": USER_ID, "anonymousId": ANONYMOUS_ID, "traits": TRAITS}
    answers = [
        await client.post("/v1/identify", json=identify),
        await client.post(
            "/v1/track",
            json={"userId": USER_ID, "event": INJECTIONS[3], "properties": {"q": INJECTIONS[6]}},
        ),
    ]
    await engine.run()

    assert [answer.status_code for answer in answers] == [200, 200]
    (ada,) = await find(client, user_id=USER_ID)
    assert (ada["user_id"], ada["anonymous_ids"], ada["traits"]) == (
        USER_ID,
        [ANONYMOUS_ID],
        TRAITS,
    )
    assert await find(client, anonymous_id=ANONYMOUS_ID) == [ada]
    assert await find(client, email=TRAITS["email"]) == [ada]
    detail = (await client.get(f"/v1/leads/{ada['id']}", auth=admin)).json()
    assert [event["name"] for event in detail["events"]] == [INJECTIONS[3], "identify"]
    for injection in INJECTIONS[1:]:
        for field in ("user_id", "email"):
            assert await find(client, **{field: injection}) == [], (field, injection)
    bob_after = [row for row in await engine.rows(leads) if row.id == bob_before[0].id]
    assert bob_after == bob_before


@pytest.mark.parametrize("injection", INJECTIONS)
async def test_sql_in_path_and_query_parameters_of_admin_routes_is_a_4xx(
    client: httpx.AsyncClient, injection: str
) -> None:
    paths = [
        f"/v1/leads/{injection}",
        f"/v1/journeys/{injection}",
        f"/v1/journeys/{injection}/kpis",
        f"/v1/offers/{injection}",
        f"/v1/audiences/{injection}/export",
    ]
    answers = [await client.get(path, auth=admin) for path in paths]
    answers += [
        await client.get("/v1/audiences/visitors/export", params={"cursor": injection}, auth=admin),
        await client.get("/v1/audiences/visitors/export", params={"format": injection}, auth=admin),
        await client.get("/v1/journeys/funnel/kpis", params={"from": injection}, auth=admin),
        await client.post(f"/v1/offers/{injection}/redeem", auth=admin),
    ]

    assert all(400 <= answer.status_code < 500 for answer in answers), [
        (answer.request.url, answer.status_code) for answer in answers
    ]
