"""Time-limited offers end to end: granted by a journey, shown in its email, expired on
time, redeemed once by the API or by a tracked event, over each database."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from channels.offers.codes import ALPHABET
from channels.offers.store import _held_offers
from engine.db.schema import events, offer_codes
from engine.journey import JourneyErrors
from engine.journey.loader import load_journey_text
from tests.email.conftest import ADMIN_KEY, Mail, SmtpServer, channel, running_mail
from tests.sqlite_plans import TracedSqlite
from tests.worker.conftest import app_client

PROMO = """\
id: promo
name: Promo
version: 1
entry:
  on: signed_up
stages:
  - id: offered
    phase: consideration
    on_enter:
      - offer.grant: welcome
      - email.send: promo
    transitions:
      - {on: offer.redeemed, to: bought}
      - {on: offer.expired, where: {properties.offer: welcome}, to: lapsed}
      - {on: asked_again, to: offered}
  - id: bought
    phase: purchase
    terminal: true
  - id: lapsed
    phase: consideration
    terminal: true
offers:
  welcome:
    title: Ten percent off
    expires: {after: 1h}
    code: "WELCOME-{6}"
"""

PROMO_EMAIL = (
    "{% block subject %}{% if offer %}Your code {{ offer.code }}{% else %}No code{% endif %}"
    "{% endblock %}{% block html %}<p>{% if offer %}{{ offer.title }} until "
    '{{ offer.expires_at.strftime("%H:%M") }}{% endif %}</p>{% endblock %}'
)
CODE = re.compile(rf"WELCOME-[{ALPHABET}]{{6}}")
HOUR = timedelta(hours=1)


@pytest.fixture
async def promo(database_url: str, tmp_path: Path, smtp: SmtpServer) -> AsyncIterator[Mail]:
    async with running_mail(database_url, tmp_path, smtp, [PROMO], {"promo": PROMO_EMAIL}) as mail:
        yield mail


@pytest.fixture
async def client(promo: Mail) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(
        promo.runtime, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as client:
        yield client


async def sign_up(mail: Mail, user_id: str = "shopper") -> int:
    await mail.send("identify", userId=user_id, traits={"email": f"{user_id}@example.com"})
    await mail.send("track", userId=user_id, event="signed_up")
    await settle(mail)
    return await mail.lead_id(user_id=user_id)


async def settle(mail: Mail, advance: timedelta = timedelta(0)) -> None:
    """Let time pass; run the worker and the channels until nothing is left to do."""
    await mail.run(advance)
    await mail.deliver()
    await mail.run()


async def offers_of(mail: Mail, lead_id: int) -> list[Any]:
    return await mail.rows(offer_codes, lead_id=lead_id)


async def test_a_grant_gives_one_unguessable_code_that_its_email_shows(promo: Mail) -> None:
    lead_id = await sign_up(promo)

    (offer,) = await offers_of(promo, lead_id)
    assert CODE.fullmatch(offer.code)
    assert (offer.status, offer.expires_at) == ("granted", promo.clock.now() + HOUR)
    (received,) = promo.smtp.recorder.received()
    assert received["Subject"] == f"Your code {offer.code}"
    _, html = received.iter_parts()
    until = (promo.clock.now() + HOUR).strftime("%H:%M")
    assert f"Ten percent off until {until}" in html.get_content()  # type: ignore[attr-defined]
    (granted,) = await promo.rows(events, name="offer.granted")
    assert granted.data["properties"]["code"] == offer.code

    await promo.send("track", userId="shopper", event="asked_again")  # the grant runs again
    await settle(promo)
    assert [row.code for row in await offers_of(promo, lead_id)] == [offer.code]
    assert len(await promo.rows(events, name="offer.granted")) == 1


async def test_codes_are_unique_across_leads(promo: Mail) -> None:
    for number in range(40):
        await promo.send("identify", userId=f"u{number}", traits={"email": f"{number}@x.test"})
        await promo.send("track", userId=f"u{number}", event="signed_up")
    await settle(promo)

    codes = [row.code for row in await promo.rows(offer_codes)]
    assert len(codes) == 40
    assert len(set(codes)) == 40


async def test_an_unredeemed_code_expires_on_time_even_after_a_restart(promo: Mail) -> None:
    lead_id = await sign_up(promo)
    granted_at = promo.clock.now()

    await settle(promo, HOUR - timedelta(seconds=1))
    assert [row.status for row in await offers_of(promo, lead_id)] == ["granted"]

    promo.clock.advance(timedelta(hours=5))  # the server was down when it fell due
    await channel(promo).run_once()  # a freshly started process
    await settle(promo)

    (offer,) = await offers_of(promo, lead_id)
    assert (offer.status, offer.expired_at) == ("expired", promo.clock.now())
    (expired,) = await promo.rows(events, name="offer.expired")
    assert expired.timestamp == granted_at + HOUR
    assert expired.data["properties"] == {
        "offer": "welcome",
        "code": offer.code,
        "journey": "promo",
    }
    assert await promo.stages(lead_id) == [("lapsed", "completed")]


async def test_redeeming_by_api_works_once_and_moves_the_lead(
    promo: Mail, client: httpx.AsyncClient
) -> None:
    lead_id = await sign_up(promo)
    (offer,) = await offers_of(promo, lead_id)

    first = await client.post(f"/v1/offers/{offer.code.lower()}/redeem")
    again = await client.post(f"/v1/offers/{offer.code}/redeem")
    await settle(promo)

    assert first.status_code == 200
    assert (first.json()["status"], first.json()["code"]) == ("redeemed", offer.code)
    assert again.status_code == 409
    assert again.json()["detail"] == "already redeemed"
    assert len(await promo.rows(events, name="offer.redeemed")) == 1
    assert await promo.stages(lead_id) == [("bought", "completed")]
    shown = (await client.get(f"/v1/offers/{offer.code}")).json()
    assert (shown["status"], shown["redeemed_at"] is not None) == ("redeemed", True)
    assert (await client.get("/v1/offers/WELCOME-NOPE23")).status_code == 404
    assert (await client.post("/v1/offers/WELCOME-NOPE23/redeem")).status_code == 404


async def test_after_expiry_a_redemption_is_refused_and_counted(
    promo: Mail, client: httpx.AsyncClient
) -> None:
    lead_id = await sign_up(promo)
    await sign_up(promo, "other")
    (offer,) = await offers_of(promo, lead_id)
    await settle(promo, HOUR)

    late = await client.post(f"/v1/offers/{offer.code}/redeem")
    also_late = await client.post(f"/v1/offers/{offer.code}/redeem")

    assert late.status_code == also_late.status_code == 409
    assert late.json()["detail"] == "the code has expired"
    assert also_late.json()["offer"]["refused_after_expiry"] == 2
    figures = (await client.get("/v1/journeys/promo/offers")).json()
    assert figures == [
        {
            "journey": "promo",
            "offer": "welcome",
            "title": "Ten percent off",
            "granted": 2,
            "redeemed": 0,
            "expired": 2,
            "redemption_rate": 0.0,
            "refused_after_expiry": 2,
        }
    ]


async def test_a_tracked_event_with_the_coupon_redeems_it_exactly_once(
    promo: Mail, client: httpx.AsyncClient
) -> None:
    lead_id = await sign_up(promo)
    (offer,) = await offers_of(promo, lead_id)

    for message_id in ("order-1", "order-2"):
        await promo.send(
            "track",
            userId="shopper",
            event="order_completed",
            messageId=message_id,
            properties={"coupon": offer.code, "revenue": 90},
        )
    await settle(promo)

    (redeemed,) = await offers_of(promo, lead_id)
    assert (redeemed.status, redeemed.redeemed_by, redeemed.refused) == ("redeemed", "order-1", 0)
    assert len(await promo.rows(events, name="offer.redeemed")) == 1
    assert await promo.stages(lead_id) == [("bought", "completed")]
    lead = (await client.get(f"/v1/leads/{lead_id}")).json()
    assert [(o["offer"], o["code"], o["status"]) for o in lead["offers"]] == [
        ("welcome", offer.code, "redeemed")
    ]


async def test_two_leads_merged_keep_one_code_each_and_both_still_redeem(
    promo: Mail, client: httpx.AsyncClient
) -> None:
    await promo.send("track", anonymousId="phone", event="signed_up")
    await settle(promo)
    phone = await promo.lead_id(anonymous_id="phone")
    desktop = await sign_up(promo, "buyer")
    (phone_code,) = await offers_of(promo, phone)
    (desktop_code,) = await offers_of(promo, desktop)

    await promo.send("alias", previousId="phone", userId="buyer")
    await settle(promo)

    held = sorted(row.code for row in await offers_of(promo, desktop))
    assert held == sorted([phone_code.code, desktop_code.code])
    assert await offers_of(promo, phone) == []
    lead = (await client.get(f"/v1/leads/{desktop}")).json()
    assert sorted(offer["code"] for offer in lead["offers"]) == sorted(
        [phone_code.code, desktop_code.code]
    )
    for code in (phone_code.code, desktop_code.code):
        assert (await client.post(f"/v1/offers/{code}/redeem")).status_code == 200


async def test_an_offer_can_run_until_a_fixed_date(
    database_url: str, tmp_path: Path, smtp: SmtpServer
) -> None:
    deadline = "2026-12-31T23:59:59+03:00"
    dated = PROMO.replace("expires: {after: 1h}", f'expires: {{at: "{deadline}"}}')
    async with running_mail(database_url, tmp_path, smtp, [dated], {"promo": PROMO_EMAIL}) as mail:
        lead_id = await sign_up(mail)
        (offer,) = await offers_of(mail, lead_id)
        assert offer.expires_at == datetime.fromisoformat(deadline)

        await settle(mail, offer.expires_at - mail.clock.now() - timedelta(seconds=1))
        assert [row.status for row in await offers_of(mail, lead_id)] == ["granted"]
        await settle(mail, timedelta(seconds=1))
        assert [row.status for row in await offers_of(mail, lead_id)] == ["expired"]


async def test_a_lead_back_in_the_journey_after_its_code_expired_gets_a_new_one(
    database_url: str, tmp_path: Path, smtp: SmtpServer
) -> None:
    again = PROMO.replace("  on: signed_up\n", "  on: signed_up\n  reentry: always\n")
    async with running_mail(database_url, tmp_path, smtp, [again], {"promo": PROMO_EMAIL}) as mail:
        lead_id = await sign_up(mail)
        await settle(mail, HOUR)  # expired: the run ends in `lapsed`
        await mail.send("track", userId="shopper", event="signed_up")
        await settle(mail)

        first, second = await offers_of(mail, lead_id)
        assert (first.status, second.status) == ("expired", "granted")
        assert first.code != second.code
        assert CODE.fullmatch(second.code)


async def test_a_purchase_made_before_the_deadline_counts_even_if_it_arrives_after(
    promo: Mail,
) -> None:
    lead_id = await sign_up(promo)
    (offer,) = await offers_of(promo, lead_id)
    bought_at = promo.clock.now() + HOUR - timedelta(minutes=1)
    await settle(promo, 2 * HOUR)
    assert [row.status for row in await offers_of(promo, lead_id)] == ["expired"]

    await promo.send(
        "track",
        userId="shopper",
        event="order_completed",
        timestamp=bought_at.isoformat(),
        properties={"coupon": offer.code},
    )
    await settle(promo)

    (redeemed,) = await offers_of(promo, lead_id)
    assert (redeemed.status, redeemed.redeemed_at, redeemed.refused) == ("redeemed", bought_at, 0)


async def test_a_coupon_no_code_could_be_is_ignored_and_the_worker_goes_on(promo: Mail) -> None:
    lead_id = await sign_up(promo)
    for number, coupon in enumerate(["AB\x00C", "x" * 500, "has space", 42]):
        await promo.send(
            "track",
            userId="shopper",
            event="order_completed",
            messageId=f"odd-{number}",
            properties={"coupon": coupon},
        )
    await settle(promo)

    odd = [
        row
        for row in await promo.rows(events, lead_id=lead_id)
        if row.message_id.startswith("odd-")
    ]
    assert len(odd) == 4
    assert all(row.processed_at is not None and row.error is None for row in odd)
    assert [row.status for row in await offers_of(promo, lead_id)] == ["granted"]


def test_an_offer_whose_codes_would_not_fit_is_refused_by_validation() -> None:
    long = PROMO.replace(
        'code: "WELCOME-{6}"', 'code: "HOLIDAY-SPECIAL-FREE-INSTALLATION-{16}-{16}"'
    )

    with pytest.raises(JourneyErrors) as refused:
        load_journey_text(long, Path("promo.yaml"))

    assert "67 characters long; keep them to 64" in str(refused.value)


async def test_on_sqlite_the_codes_leads_hold_are_looked_up_by_lead(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """SQLite plans without statistics: asked for some leads' usable codes by status
    and lead, it walked every usable code there is (the status index), a cost that
    grew with the codes granted. The lookup must search the index of the leads."""
    async with (
        TracedSqlite(sqlite_template, tmp_path) as traced,
        traced.db.write() as connection,
    ):
        await traced.trace(connection)
        assert await _held_offers(connection, set(range(1, 21))) == set()
    (lookup,) = traced.selects("offers")
    steps = traced.plan(lookup)
    assert steps == ["SEARCH offers USING INDEX ix_offers_lead (lead_id=?)"], (lookup, steps)
