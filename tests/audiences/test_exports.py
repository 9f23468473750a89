"""Audience exports over HTTP against a running engine, over each database: full and
incremental, paged without skips or repeats, with leavers exported as removals."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from channels.audiences import export
from engine.db.schema import audience_members
from tests.email.test_routes import mailed_lead
from tests.worker.conftest import FUNNEL, Engine, app_client, running_engine, write_funnel

ADMIN = {"Authorization": "Bearer ak_test"}
CATALOG = {"path": "/catalog/doors"}


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture
async def engine(database_url: str, tmp_path: Path) -> AsyncIterator[Engine]:
    # Visitors stay in `visitors` for a week at most.
    journeys = write_funnel(tmp_path, FUNNEL.replace("  visitors: {}", "  visitors: {ttl: 7d}"))
    async with running_engine(database_url, journeys) as engine:
        yield engine


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(engine.runtime, headers=ADMIN) as client:
        yield client


async def visit(engine: Engine, *user_ids: str) -> None:
    """Each user identifies and sees the catalog: the funnel adds them to `visitors`."""
    for user_id in user_ids:
        traits = {"email": f" {user_id.upper()}@Example.com", "first_name": user_id.title()}
        await engine.send("identify", userId=user_id, traits=traits)
        await engine.send("page", userId=user_id, properties=CATALOG)
    await settle(engine)


async def settle(engine: Engine, advance: timedelta = timedelta(0)) -> None:
    await engine.run(advance)
    await engine.runtime.audiences.run_once()


async def meta(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    answer = await client.get("/v1/audiences/visitors/export", params=params)
    assert answer.status_code == 200, answer.text
    page: dict[str, Any] = answer.json()
    return page


async def all_pages(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    pages = [await meta(client, **params)]
    while pages[-1]["has_more"]:
        pages.append(await meta(client, **(params | {"cursor": pages[-1]["next_cursor"]})))
    return pages


def emails(page: dict[str, Any]) -> list[str]:
    return [row[0] for row in page["data"]]


async def test_a_full_export_gives_current_members_hashed_for_meta(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await visit(engine, "ann", "bob")

    page = await meta(client)

    assert page["schema"] == ["EMAIL", "PHONE", "FN", "LN", "CT", "ST", "ZIP", "COUNTRY"]
    assert (page["op"], page["has_more"]) == ("add", False)
    assert page["data"] == [
        [sha("ann@example.com"), "", sha("ann"), "", "", "", "", ""],
        [sha("bob@example.com"), "", sha("bob"), "", "", "", "", ""],
    ]
    audiences = (await client.get("/v1/audiences")).json()
    assert {a["name"]: (a["journey"], a["size"]) for a in audiences} == {
        "visitors": ("funnel", 2),
        "abandoners": ("funnel", 0),
    }


async def test_pages_stay_stable_while_members_change_and_the_next_sync_gets_the_changes(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await visit(engine, "ann", "bob", "cat", "dan", "eve")

    first = await meta(client, limit=2)
    # Meanwhile: a new visitor joins, and one not yet exported leaves.
    await visit(engine, "fay")
    await engine.send("track", userId="eve", event="opted_out")
    await settle(engine)
    rest = await all_pages(client, cursor=first["next_cursor"], limit=2)

    exported = emails(first) + [email for page in rest for email in emails(page)]
    assert exported == [sha(f"{name}@example.com") for name in ("ann", "bob", "cat", "dan")]
    assert all(page["op"] == "add" for page in rest)

    changes = await all_pages(client, cursor=rest[-1]["next_cursor"])
    assert [(page["op"], emails(page)) for page in changes] == [
        ("add", [sha("fay@example.com")]),
        ("remove", [sha("eve@example.com")]),
    ]
    again = await meta(client, cursor=changes[-1]["next_cursor"])
    assert (again["data"], again["has_more"]) == ([], False)


async def test_leaving_the_journey_and_the_ttl_export_removals(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await visit(engine, "ann", "bob")
    synced = (await meta(client))["next_cursor"]

    await engine.send("track", userId="ann", event="opted_out")  # the funnel's exit
    await settle(engine)
    left = await meta(client, cursor=synced)
    assert (left["op"], emails(left)) == ("remove", [sha("ann@example.com")])

    await settle(engine, timedelta(days=7))
    expired = await meta(client, cursor=left["next_cursor"])
    assert (expired["op"], emails(expired)) == ("remove", [sha("bob@example.com")])
    bob = await engine.lead_id(user_id="bob")
    (row,) = await engine.rows(audience_members, lead_id=bob, audience="visitors")
    assert row.removed_at == row.added_at + timedelta(days=7)


async def test_google_and_clear_csv_stream_with_the_cursor_in_a_header(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await engine.send(
        "identify",
        userId="ann",
        traits={"email": "A.n.n+ads@Gmail.com", "phone": "8 (912) 345-67-89", "country": "RU"},
    )
    await engine.send("page", userId="ann", properties=CATALOG)
    await settle(engine)

    google = await client.get("/v1/audiences/visitors/export", params={"format": "google"})
    clear = await client.get("/v1/audiences/visitors/export", params={"format": "csv"})

    assert google.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(google.text))) == [
        ["Email", "Phone", "First Name", "Last Name", "Country", "Zip"],
        [sha("ann@gmail.com"), sha("+79123456789"), "", "", "RU", ""],
    ]
    rows = list(csv.DictReader(io.StringIO(clear.text)))
    assert [(row["op"], row["email"], row["phone"]) for row in rows] == [
        ("add", "A.n.n+ads@Gmail.com", "8 (912) 345-67-89")
    ]
    cursor = google.headers["X-CJM-Next-Cursor"]
    await engine.send("track", userId="ann", event="opted_out")
    await settle(engine)
    removes = await client.get(
        "/v1/audiences/visitors/export",
        params={"format": "google", "op": "remove", "cursor": cursor},
    )
    assert len(list(csv.reader(io.StringIO(removes.text)))) == 2  # the header and ann


async def test_bad_requests_get_clear_errors(client: httpx.AsyncClient) -> None:
    unknown = await client.get("/v1/audiences/nobody/export")
    forged = await client.get("/v1/audiences/visitors/export", params={"cursor": "bm9wZQ"})
    without_key = await client.get("/v1/audiences/visitors/export", headers={"Authorization": ""})

    assert unknown.status_code == 404
    assert forged.status_code == 400
    assert "cursor" in forged.json()["detail"]
    assert without_key.status_code == 401


async def test_an_unsubscribed_lead_is_exported_as_a_removal(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead_id, email_id = await mailed_lead(engine, lead_email="ann@example.com")
    await settle(engine)
    synced = (await meta(client))["next_cursor"]

    unsubscribe = urlsplit(engine.runtime.links.unsubscribe(email_id, lead_id)).path
    assert (await client.post(unsubscribe)).status_code == 200
    await settle(engine)

    page = await meta(client, cursor=synced)
    assert (page["op"], emails(page)) == ("remove", [sha("ann@example.com")])
    sizes = {a["name"]: a["size"] for a in (await client.get("/v1/audiences")).json()}
    assert sizes["visitors"] == 0


async def test_a_member_added_again_and_removed_in_one_batch_is_exported_as_a_removal(
    database_url: str, tmp_path: Path
) -> None:
    looping = FUNNEL.replace(
        "      - {after: 2h, to: retarget}\n",
        "      - {after: 2h, to: retarget}\n      - {on: again, to: visitor}\n",
        1,
    )
    assert looping != FUNNEL
    async with (
        running_engine(database_url, write_funnel(tmp_path, looping)) as engine,
        app_client(engine.runtime, headers=ADMIN) as client,
    ):
        await visit(engine, "ann")
        synced = (await meta(client))["next_cursor"]

        # Applied in one batch: the stage entered again (re-adding her), then the exit.
        await engine.send("track", userId="ann", event="again")
        await engine.send("track", userId="ann", event="opted_out")
        await settle(engine)

        page = await meta(client, cursor=synced)
        assert (page["op"], emails(page)) == ("remove", [sha("ann@example.com")])


async def test_csv_streams_read_in_chunks_give_every_member_once(
    engine: Engine, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ("ann", "bob", "cat", "dan", "eve")
    await visit(engine, *names)
    monkeypatch.setattr(export, "STREAM_CHUNK", 2)  # three reads: 2, 2 and 1 rows

    google = await client.get("/v1/audiences/visitors/export", params={"format": "google"})
    clear = await client.get("/v1/audiences/visitors/export", params={"format": "csv"})

    google_rows = list(csv.reader(io.StringIO(google.text)))
    assert google_rows[0][0] == "Email"
    assert [row[0] for row in google_rows[1:]] == [sha(f"{name}@example.com") for name in names]
    clear_rows = list(csv.DictReader(io.StringIO(clear.text)))
    assert [row["first_name"] for row in clear_rows] == [name.title() for name in names]
