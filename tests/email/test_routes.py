"""The public email endpoints over HTTP, on a running engine, over each database."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import insert, select

from channels.email.tokens import Sealer
from engine.api.app import create_app
from engine.db.schema import emails, events, suppressions
from tests.worker.conftest import FUNNEL, Engine, running_engine, write_funnel

SHOP = "https://shop.example.com/doors?a=1&b=2"
CATALOG = {"path": "/catalog/doors"}
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.fixture
async def engine(database_url: str, tmp_path: Path) -> AsyncIterator[Engine]:
    """The worker tests' funnel, exited on `email.unsubscribed` instead of `opted_out`."""
    journeys = write_funnel(tmp_path, FUNNEL.replace("on: opted_out", "on: email.unsubscribed"))
    async with running_engine(database_url, journeys) as engine:
        yield engine


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(engine.runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://cjm.test") as client:
        yield client


async def mailed_lead(
    engine: Engine, *, lead_email: str = "Ann@Example.com", to_address: str | None = None
) -> tuple[int, int]:
    """A lead in the funnel, and an email sent to them: (lead id, email id)."""
    await engine.send("identify", userId="u1", traits={"email": lead_email})
    await engine.send("page", userId="u1", properties=CATALOG)
    await engine.run()
    lead_id = await engine.lead_id(user_id="u1")
    now = engine.clock.now()
    row = {
        "idempotency_key": f"test:{lead_id}",
        "lead_id": lead_id,
        "journey_id": "funnel",
        "template": "tip",
        "status": "sent",
        "due_at": now,
        "to_address": to_address,
        "created_at": now,
        "updated_at": now,
        "sent_at": now,
    }
    async with engine.runtime.db.write() as connection:
        email_id = await connection.scalar(insert(emails).values(row).returning(emails.c.id))
    assert email_id is not None
    return lead_id, int(email_id)


def path(url: str) -> str:
    """The path of a link, to request it from the app under test."""
    return urlsplit(url).path


async def recorded(engine: Engine, name: str) -> list[tuple[int, dict[str, object]]]:
    """(lead id, properties) of each internal event `name`."""
    return [(row.lead_id, row.data["properties"]) for row in await engine.rows(events, name=name)]


async def suppressed(engine: Engine) -> list[tuple[str, str, int | None]]:
    async with engine.runtime.db.read() as connection:
        rows = await connection.execute(select(suppressions))
        return [(row.email, row.reason, row.lead_id) for row in rows]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- open pixel ----------------------------------------------------------------------------------


async def test_open_pixel_answers_a_gif_and_records_only_the_first_open(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine)
    pixel = path(engine.runtime.links.open_pixel(email, lead))

    first = await client.get(pixel)
    second = await client.get(pixel)

    for answer in (first, second):
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/gif"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.content.startswith(b"GIF89a\x01\x00\x01\x00")
    assert await recorded(engine, "email.opened") == [(lead, {"email": email, "template": "tip"})]


async def test_open_pixel_with_a_bad_token_still_answers_the_gif_and_records_nothing(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine)
    good = path(engine.runtime.links.open_pixel(email, lead))

    answers = [await client.get(good + "x"), await client.get("/e/open/garbage")]

    assert [answer.status_code for answer in answers] == [200, 200]
    assert all(answer.headers["content-type"] == "image/gif" for answer in answers)
    assert await recorded(engine, "email.opened") == []


# --- click redirect ------------------------------------------------------------------------------


async def test_click_redirects_to_the_sealed_url_and_records_the_click(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine)

    answer = await client.get(path(engine.runtime.links.click(email, lead, SHOP)))

    assert answer.status_code == 302
    assert answer.headers["location"] == SHOP
    assert await recorded(engine, "email.clicked") == [(lead, {"email": email, "url": SHOP})]


def forgeries(sealer: Sealer, email: int, lead: int) -> list[str]:
    """Tokens a stranger could make from a real click token."""
    real = sealer.seal("click", {"email": email, "lead": lead, "url": SHOP})
    body, signature = real.split(".")
    evil = {"email": email, "lead": lead, "url": "https://evil.example/phish"}
    evil_body = b64(json.dumps(evil, separators=(",", ":"), sort_keys=True).encode())
    other = Sealer(b"another secret, not the server's").seal("click", evil)
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return [
        f"{evil_body}.{signature}",  # the url part swapped
        f"{body}.{flipped}",  # the signature altered
        real[:-3],  # truncated
        body,  # no signature at all
        other,  # signed with another key
    ]


async def test_a_forged_altered_or_truncated_click_token_is_404_and_never_redirects(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine)

    for token in forgeries(engine.runtime.links.sealer, email, lead):
        answer = await client.get(f"/e/click/{token}")
        assert answer.status_code == 404, token
        assert "location" not in answer.headers
        assert answer.headers["content-type"].startswith("text/html")
    assert await recorded(engine, "email.clicked") == []


async def test_a_token_minted_for_another_purpose_is_refused_by_the_click_endpoint(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine)
    open_url = engine.runtime.links.open_pixel(email, lead)
    token = open_url.rsplit("/", 1)[1]

    answer = await client.get(f"/e/click/{token}")

    assert answer.status_code == 404
    assert "location" not in answer.headers


async def test_a_sealed_url_that_is_not_http_is_400_not_a_redirect(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine)

    for url in ("javascript:alert(1)", "//evil.example/", "https://shop.example/\r\nX: y"):
        answer = await client.get(path(engine.runtime.links.click(email, lead, url)))
        assert answer.status_code == 400, url
        assert "location" not in answer.headers
    assert await recorded(engine, "email.clicked") == []


# --- unsubscribe ---------------------------------------------------------------------------------


async def test_unsubscribe_page_asks_with_a_post_form_and_changes_nothing(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine, to_address="ann@example.com")

    answer = await client.get(path(engine.runtime.links.unsubscribe(email, lead)))

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert '<form method="post">' in answer.text
    assert "http" not in answer.text  # nothing loaded from anywhere
    assert await suppressed(engine) == []
    assert await recorded(engine, "email.unsubscribed") == []


async def test_one_click_post_suppresses_the_address_and_records_the_unsubscribe(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine, to_address="Ann.Sent@Example.com")

    answer = await client.post(path(engine.runtime.links.unsubscribe(email, lead)), data=ONE_CLICK)

    assert answer.status_code == 200
    assert "unsubscribed" in answer.text
    assert await suppressed(engine) == [("ann.sent@example.com", "unsubscribed", lead)]
    assert await recorded(engine, "email.unsubscribed") == [(lead, {"email": email})]


async def test_unsubscribe_suppresses_the_leads_email_when_the_email_has_no_address(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine, lead_email="Ann@Example.com", to_address=None)

    answer = await client.post(path(engine.runtime.links.unsubscribe(email, lead)), data=ONE_CLICK)

    assert answer.status_code == 200
    assert await suppressed(engine) == [("ann@example.com", "unsubscribed", lead)]


async def test_unsubscribing_twice_answers_200_and_suppresses_once(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine, to_address="ann@example.com")
    url = path(engine.runtime.links.unsubscribe(email, lead))

    answers = [await client.post(url, data=ONE_CLICK), await client.post(url, data=ONE_CLICK)]

    assert [answer.status_code for answer in answers] == [200, 200]
    assert await suppressed(engine) == [("ann@example.com", "unsubscribed", lead)]
    assert len(await recorded(engine, "email.unsubscribed")) == 1


async def test_a_bad_unsubscribe_token_is_404_and_changes_nothing(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine, to_address="ann@example.com")
    click = engine.runtime.links.click(email, lead, SHOP).rsplit("/", 1)[1]

    for token in ("garbage", click):
        assert (await client.get(f"/e/unsubscribe/{token}")).status_code == 404
        assert (await client.post(f"/e/unsubscribe/{token}", data=ONE_CLICK)).status_code == 404
    assert await suppressed(engine) == []


async def test_an_unsubscribe_makes_the_lead_exit_a_journey_that_exits_on_it(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    lead, email = await mailed_lead(engine, to_address="ann@example.com")
    assert await engine.stages(lead) == [("visitor", "active")]

    await client.post(path(engine.runtime.links.unsubscribe(email, lead)), data=ONE_CLICK)
    await engine.run()

    assert await engine.stages(lead) == [("visitor", "exited")]
    assert (await engine.history(lead))[-1] == ("visitor", None, "exit")
