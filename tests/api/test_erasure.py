"""`DELETE /v1/leads/{id}`: a person asks to be forgotten, over each database. Nothing of
them is left in any table (nor, on SQLite, anywhere in the database file), ad platforms
get the removal, and their address stays suppressed as a hash."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from engine.db.schema import Base, emails, erasures, offer_codes, suppressions
from tests.email.conftest import ADMIN_KEY, Mail, SmtpServer, running_mail
from tests.email.conftest import smtp as smtp
from tests.worker.conftest import app_client

JOURNEY = """\
id: care
name: Care
version: 1
entry:
  on: signed_up
stages:
  - id: welcomed
    phase: consideration
    on_enter:
      - audience.add: members
      - offer.grant: welcome
      - email.send: hello
      - sequence.start: tips
    transitions:
      - {after: 30d, to: lapsed}
  - id: lapsed
    phase: loyalty
sequences:
  tips:
    steps: [{wait: 1d}, {email: hello}]
offers:
  welcome:
    title: Welcome
    expires: {after: 7d}
    code: "CARE-{8}"
audiences:
  members: {}
"""
HELLO = (
    "{% block subject %}Hello {{ lead.first_name | default('you') }}{% endblock %}"
    "{% block html %}<p>Hi {{ lead.first_name | default('you') }}</p>"
    '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>{% endblock %}'
)
# What identifies the person: none of it may be left anywhere after the erasure.
ADDRESS = "Forget.Me.Xq7@Example.com"
PERSONAL = (
    "forget.me.xq7",
    "Quillonbarr",
    "Zzyzx-Springs",
    "+14155550199",
    "user-forget-xq7",
    "94107-1234",
    "anon-forget-xq7",
    "phone-forget-xq7",
    "Orchard-Lane-xq7",
    "203.0.113.77",
    "Browser-Of-Xq7",
    "Quillonbarr-page",
)


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture
async def care(database_url: str, tmp_path: Path, smtp: SmtpServer) -> AsyncIterator[Mail]:
    async with running_mail(database_url, tmp_path, smtp, [JOURNEY], {"hello": HELLO}) as mail:
        yield mail


@pytest.fixture
async def client(care: Mail) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(care.runtime, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


async def settle(mail: Mail) -> None:
    await mail.run()
    await mail.deliver()
    await mail.runtime.audiences.run_once()
    await mail.run()


async def visit(mail: Mail, moment: str) -> None:
    """Someone else browsing and telling who they are."""
    for visitor in range(3):
        await mail.send(
            "identify",
            anonymousId=f"visitor-{moment}-{visitor}",
            traits={"first_name": f"Visitor {moment} {visitor}"},
        )
        await mail.send(
            "page",
            anonymousId=f"visitor-{moment}-{visitor}",
            properties={"url": f"https://shop.example/catalog/{moment}/{visitor}"},
        )


async def everything(mail: Mail) -> str:
    """Every row of every table, as text."""
    dump = []
    async with mail.runtime.db.read() as connection:
        for table in Base.metadata.sorted_tables:
            dump.extend(repr(tuple(row)) for row in await connection.execute(select(table)))
    return "\n".join(dump)


async def test_an_erased_person_leaves_nothing_behind_but_their_removal(
    care: Mail, client: httpx.AsyncClient, database_url: str
) -> None:
    # Two devices of one person, merged; each with something personal. Other visitors'
    # rows sit in the same pages and outlive the erasure, so the person's bytes are not
    # dropped with whole pages: only overwriting them removes them from the file.
    await visit(care, "before")
    await care.send("identify", anonymousId="phone-forget-xq7", traits={"city": "Zzyzx-Springs"})
    await care.send(
        "identify",
        userId="user-forget-xq7",
        anonymousId="anon-forget-xq7",
        traits={
            "email": ADDRESS,
            "first_name": "Quillonbarr",
            "phone": "+14155550199",
            "country": "US",
            "zip": "94107-1234",
        },
    )
    await care.send(
        "track",
        userId="user-forget-xq7",
        event="signed_up",
        properties={"referral_note": "Orchard-Lane-xq7"},
        context={"ip": "203.0.113.77", "userAgent": "Browser-Of-Xq7"},
    )
    await care.send(
        "page",
        anonymousId="anon-forget-xq7",
        properties={"url": "https://shop.example/account?name=Quillonbarr-page"},
    )
    await visit(care, "between")
    await care.send("alias", previousId="phone-forget-xq7", userId="user-forget-xq7")
    await visit(care, "after")
    await settle(care)
    lead_id = await care.lead_id(user_id="user-forget-xq7")
    synced = (await client.get("/v1/audiences/members/export")).json()
    assert len(synced["data"]) == 1
    (sent,) = await care.rows(emails, lead_id=lead_id)
    unsubscribe = urlsplit(care.runtime.links.unsubscribe(sent.id, lead_id)).path
    assert (await client.post(unsubscribe)).status_code == 200  # the address is suppressed
    await settle(care)
    before = await everything(care)
    assert all(part.lower() in before.lower() for part in PERSONAL)

    answer = await client.delete(f"/v1/leads/{lead_id}")

    assert answer.status_code == 200
    counts = answer.json()["counts"]
    assert counts["identities"] == 3
    assert counts["events"] > 0
    assert counts["codes_unredeemed"] == 1
    assert counts["suppressions_hashed"] == 1
    left = await everything(care)
    for part in PERSONAL:
        assert part.lower() not in left.lower()
    lead = (await client.get(f"/v1/leads/{lead_id}")).json()
    assert (lead["traits"], lead["user_id"], lead["events"]) == ({}, None, [])
    assert lead["erased_at"] is not None
    assert await care.rows(offer_codes, lead_id=lead_id) == []
    (erasure,) = await care.rows(erasures)
    assert erasure.lead_id == lead_id

    # The ad platforms are told to remove the person, by hashed identifiers only.
    await care.runtime.audiences.run_once()
    removal = (
        await client.get("/v1/audiences/members/export", params={"cursor": synced["next_cursor"]})
    ).json()
    assert removal["op"] == "remove"
    assert removal["data"][0][:2] == [sha("forget.me.xq7@example.com"), sha("14155550199")]

    # The address stays suppressed, as its hash: the person is never mailed again.
    (suppressed,) = await care.rows(suppressions)
    assert suppressed.email == "sha256:" + sha("forget.me.xq7@example.com")
    await care.send("identify", userId="someone-new", traits={"email": ADDRESS})
    await care.send("track", userId="someone-new", event="signed_up")
    await settle(care)
    newcomer = await care.lead_id(user_id="someone-new")
    assert [row.status for row in await care.rows(emails, lead_id=newcomer)] == ["suppressed"]
    await client.delete(f"/v1/leads/{newcomer}")

    if care.runtime.db.is_sqlite:
        # Not in the file either: deleted rows are overwritten, the log emptied.
        database = Path(str(make_url(database_url).database))
        raw = b"".join(
            path.read_bytes() for path in database.parent.glob(database.name + "*")
        ).lower()
        for part in PERSONAL:
            assert part.lower().encode() not in raw


async def test_erasing_an_unknown_lead_is_a_404_and_again_changes_nothing(
    care: Mail, client: httpx.AsyncClient
) -> None:
    await care.send("identify", userId="someone", traits={"email": "someone@example.com"})
    await care.run()
    lead_id = await care.lead_id(user_id="someone")

    first = await client.delete(f"/v1/leads/{lead_id}")
    again = await client.delete(f"/v1/leads/{lead_id}")

    assert first.status_code == again.status_code == 200
    assert all(count == 0 for count in again.json()["counts"].values())
    assert (await client.delete("/v1/leads/999999")).status_code == 404
    assert [row.lead_id for row in await care.rows(erasures)] == [lead_id, lead_id]
