"""Email and offer figures in the KPI report: real emails through a real SMTP server,
their links followed over HTTP, codes granted, redeemed, expired and refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from engine.db.schema import emails, offer_codes
from tests.email.conftest import Mail, SmtpServer, running_mail
from tests.email.conftest import smtp as smtp
from tests.worker.conftest import FUNNEL, app_client

ADMIN = {"Authorization": "Bearer ak_test"}
CATALOG = {"path": "/catalog/doors"}
LANDING = {"path": "/landing/doors"}
TEMPLATE = """\
{% block subject %}News{% endblock %}
{% block html %}<p><a href="https://shop.example.com/">Shop</a></p>{% endblock %}
"""


@pytest.fixture
async def mail(database_url: str, tmp_path: Path, smtp: SmtpServer) -> AsyncIterator[Mail]:
    templates = {"tip": TEMPLATE, "thanks": TEMPLATE}
    async with running_mail(database_url, tmp_path, smtp, [FUNNEL], templates) as engine:
        yield engine


async def interested(mail: Mail, user_id: str) -> int:
    """A lead who landed: its `tip` email is sent and a `welcome` code granted."""
    await mail.send("identify", userId=user_id, traits={"email": f"{user_id}@example.com"})
    await mail.send("page", userId=user_id, properties=CATALOG)
    await mail.send("page", userId=user_id, properties=LANDING)
    await mail.run()
    await mail.deliver()
    return await mail.lead_id(user_id=user_id)


async def report(mail: Mail) -> dict[str, Any]:
    async with app_client(mail.runtime, headers=ADMIN) as client:
        answer = await client.get("/v1/journeys/funnel/kpis")
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


async def test_email_figures_count_each_email_once(mail: Mail) -> None:
    ann = await interested(mail, "ann")
    bob = await interested(mail, "bob")
    (tip,) = await mail.rows(emails, lead_id=ann, template="tip")
    links = mail.runtime.links
    async with app_client(mail.runtime) as client:
        for _ in range(3):  # opened again and again: one opened email
            await client.get(urlsplit(links.open_pixel(tip.id, ann)).path)
        await client.get(urlsplit(links.click(tip.id, ann, "https://shop.example.com/")).path)
        await client.get(urlsplit(links.click(tip.id, ann, "https://shop.example.com/a")).path)
        await client.post(urlsplit(links.unsubscribe(tip.id, ann)).path)
    await mail.send("track", userId="bob", event="order_completed", properties={"revenue": 9})
    await mail.run()
    await mail.deliver()
    assert bob

    figures = {entry["template"]: entry for entry in (await report(mail))["emails"]}
    assert figures["tip"] == {
        "template": "tip",
        "sent": 2,
        "opened": 1,
        "clicked": 1,
        "unsubscribed": 1,
        "bounced": 0,
    }
    assert figures["thanks"]["sent"] == 1
    assert len(mail.smtp.recorder.envelopes) == 3  # what the figures say went out, did


async def test_offer_figures_follow_each_code(mail: Mail) -> None:
    ann = await interested(mail, "ann")
    bob = await interested(mail, "bob")
    await interested(mail, "cat")
    (ann_code,) = await mail.rows(offer_codes, lead_id=ann)
    (bob_code,) = await mail.rows(offer_codes, lead_id=bob)
    async with app_client(mail.runtime, headers=ADMIN) as client:
        assert (await client.post(f"/v1/offers/{ann_code.code}/redeem")).status_code == 200
        assert (await client.post(f"/v1/offers/{ann_code.code}/redeem")).status_code == 409
    await mail.run(timedelta(days=6))  # bob's and cat's codes run out
    await mail.deliver()
    async with app_client(mail.runtime, headers=ADMIN) as client:
        assert (await client.post(f"/v1/offers/{bob_code.code}/redeem")).status_code == 409

    (welcome,) = (await report(mail))["offers"]
    assert welcome == {"offer": "welcome", "granted": 3, "redeemed": 1, "expired": 2, "refused": 1}
