"""Delivery end to end: a journey's `email.send` through the outbox, the sender and real SMTP."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from datetime import timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from channels.email.sender import LEASE, MAX_ATTEMPTS, lease_emails, select_due_emails
from engine.api.app import create_app
from engine.db.schema import outbox, suppressions
from tests.email.conftest import ADMIN_KEY, BASE_URL, Mail, channel


async def test_an_email_send_is_delivered_once_personalised_with_one_click_unsubscribe(
    mail: Mail,
) -> None:
    lead_id = await mail.sign_up("ada", email="Ada@example.com", first_name="Ada")

    await mail.deliver()

    (envelope,) = mail.smtp.recorder.envelopes
    assert envelope.mail_from == "news@Shop.Example.com"
    assert envelope.rcpt_tos == ["Ada@example.com"]
    (received,) = mail.smtp.recorder.received()
    assert received["Subject"] == "Hello Ada"
    assert received.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in received.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert received["List-Unsubscribe"].startswith(f"<{BASE_URL}/e/unsubscribe/")
    assert received["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    _, html = received.iter_parts()
    assert isinstance(html, EmailMessage)
    body = html.get_content()
    assert "Hi Ada, welcome to Welcome mail." in body
    assert f'href="{BASE_URL}/e/click/' in body
    assert "https://shop.example.com/doors" not in body
    assert f'src="{BASE_URL}/e/open/' in body
    (row,) = await mail.emails(lead_id)
    assert (row.status, row.attempts, row.stage, row.last_error) == ("sent", 1, "greeted", None)
    assert row.message_id == received["Message-ID"]
    assert row.sent_at == mail.clock.now()
    (sent,) = await mail.events_named("email.sent")
    assert sent.lead_id == lead_id
    assert sent.data["properties"] == {"template": "hello", "journey": "welcome"}


async def test_running_again_or_after_a_restart_sends_nothing_more(mail: Mail) -> None:
    lead_id = await mail.sign_up("ada", email="ada@example.com")
    await mail.deliver()

    await mail.deliver()
    await channel(mail).run_once()

    assert len(mail.smtp.recorder.envelopes) == 1
    assert len(await mail.emails(lead_id)) == 1
    assert await mail.outbox(lead_id) == [("email.send", "hello", "dispatched")]


async def test_smtp_down_then_up_delivers_once_after_the_backoff(mail: Mail) -> None:
    mail.smtp.stop()
    lead_id = await mail.sign_up("ada", email="ada@example.com")

    await mail.deliver()

    (row,) = await mail.emails(lead_id)
    assert (row.status, row.attempts) == ("deferred", 1)
    assert row.last_error
    delay = row.due_at - mail.clock.now()
    assert timedelta(seconds=24) <= delay <= timedelta(seconds=36)

    mail.smtp.start()
    await mail.deliver()
    assert mail.smtp.recorder.envelopes == []  # not due yet

    await mail.run(timedelta(seconds=40))
    await mail.deliver()
    await mail.deliver()

    assert len(mail.smtp.recorder.envelopes) == 1
    (row,) = await mail.emails(lead_id)
    assert (row.status, row.attempts, row.last_error) == ("sent", 2, None)


async def test_an_email_that_never_gets_through_fails_after_the_last_attempt(mail: Mail) -> None:
    mail.smtp.stop()
    lead_id = await mail.sign_up("ada", email="ada@example.com")

    for _ in range(MAX_ATTEMPTS):
        await mail.deliver()
        await mail.run(timedelta(hours=2))

    (row,) = await mail.emails(lead_id)
    assert (row.status, row.attempts) == ("failed", MAX_ATTEMPTS)
    assert row.last_error.startswith(f"gave up after {MAX_ATTEMPTS} attempts")
    (failed,) = await mail.events_named("email.failed")
    assert failed.data["properties"]["template"] == "hello"


async def test_a_refused_recipient_fails_and_suppresses_the_address_for_later_emails(
    mail: Mail,
) -> None:
    mail.smtp.recorder.rcpt_reply = "550 no such user"
    lead_id = await mail.sign_up("gone", email="Gone@Example.com")

    await mail.deliver()

    (row,) = await mail.emails(lead_id)
    assert row.status == "failed"
    assert "550" in row.last_error
    (suppressed,) = await mail.rows(suppressions)
    assert (suppressed.email, suppressed.reason, suppressed.lead_id) == (
        "gone@example.com",
        "bounced",
        lead_id,
    )
    (bounced,) = await mail.events_named("email.bounced")
    assert bounced.lead_id == lead_id

    mail.smtp.stop()  # any attempt to connect would now defer the email instead
    await mail.send("track", userId="gone", event="signed_up")
    await mail.run()
    await mail.deliver()

    first, second = await mail.emails(lead_id)
    assert first.status == "failed"
    assert second.status == "suppressed"
    assert second.attempts == 0
    assert mail.smtp.recorder.envelopes == []


async def test_a_batch_of_outcomes_is_recorded_in_one_transaction_once_all_are_in(
    mail: Mail,
) -> None:
    """With a linger far longer than the bound on delivery, the one transaction shows the
    group was written because every email of the batch was in, not because time ran out."""
    lead_ids = [await mail.sign_up(f"u{n}", email=f"u{n}@example.com") for n in range(5)]
    lead_ids.append(await mail.sign_up("anon", first_name="Nobody"))
    sender = mail.runtime.email.sender
    sender.record_linger_s = 60.0
    groups: list[int] = []
    record = sender._record

    async def counted(group: list[Any], lease: Any) -> None:
        groups.append(len(group))
        await record(group, lease)

    sender._record = counted  # type: ignore[method-assign]

    await asyncio.wait_for(mail.deliver(), 20)

    assert groups == [6]
    statuses = [row.status for lead_id in lead_ids for row in await mail.emails(lead_id)]
    assert statuses == ["sent"] * 5 + ["skipped"]
    assert len(mail.smtp.recorder.envelopes) == 5
    assert len(await mail.events_named("email.sent")) == 5


async def test_the_next_batch_goes_out_while_the_last_email_of_one_is_still_sending(
    mail: Mail,
) -> None:
    """Batches of one email: while the server holds the first message, the second is
    claimed and sent beside it, rather than after the first batch has ended."""
    for n in range(2):
        await mail.sign_up(f"u{n}", email=f"u{n}@example.com")
    mail.runtime.email.sender.batch = 1
    release, first_held = threading.Event(), threading.Event()
    recorder = mail.smtp.recorder
    accept = recorder.handle_DATA

    async def hold_the_first(server: Any, session: Any, envelope: Any) -> str:
        if not first_held.is_set():
            first_held.set()
            for _ in range(1000):  # in the server's own loop; at most 10 s
                if release.is_set():
                    break
                await asyncio.sleep(0.01)
        return await accept(server, session, envelope)

    recorder.handle_DATA = hold_the_first  # type: ignore[method-assign]
    delivering = asyncio.create_task(mail.deliver())
    try:
        for _ in range(500):
            if first_held.is_set() and recorder.envelopes:
                break
            await asyncio.sleep(0.01)
        sent_beside = [envelope.rcpt_tos for envelope in recorder.envelopes]
    finally:
        release.set()
        await asyncio.wait_for(delivering, 20)

    assert len(sent_beside) == 1
    assert sorted(envelope.rcpt_tos[0] for envelope in recorder.envelopes) == [
        "u0@example.com",
        "u1@example.com",
    ]


async def test_a_batch_that_fails_stops_the_claiming_and_is_reported(
    mail: Mail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose leads cannot be read fails alone: no further batch is claimed
    (each would lease its emails only to fail the same way), and the error reaches the
    caller, which logs it and tries again at its next run."""
    lead_ids = [await mail.sign_up(f"u{n}", email=f"u{n}@example.com") for n in range(3)]
    await mail.runtime.email.dispatch_all()
    sender = mail.runtime.email.sender
    sender.batch = 1

    async def unreadable(ready: Any, known: Any) -> Any:
        raise RuntimeError("the leads could not be read")

    monkeypatch.setattr(sender, "_addressees", unreadable)

    with pytest.raises(RuntimeError, match="could not be read"):
        await asyncio.wait_for(mail.runtime.email.send_all(), 20)

    statuses = [row.status for lead_id in lead_ids for row in await mail.emails(lead_id)]
    assert sorted(statuses) == ["queued", "queued", "sending"]
    assert mail.smtp.recorder.envelopes == []


async def test_a_lead_without_an_email_address_is_skipped_once(mail: Mail) -> None:
    lead_id = await mail.sign_up("anon", first_name="Nobody")

    await mail.deliver()
    await mail.run(timedelta(hours=2))
    await mail.deliver()

    (row,) = await mail.emails(lead_id)
    assert (row.status, row.attempts, row.last_error) == ("skipped", 0, "no email address")
    assert mail.smtp.recorder.envelopes == []


async def test_an_email_whose_sender_died_mid_send_goes_out_when_the_lease_expires(
    mail: Mail,
) -> None:
    lead_id = await mail.sign_up("ada", email="ada@example.com")
    await mail.runtime.email.dispatch_all()
    async with mail.runtime.db.write() as connection:  # a sender that claims, then dies
        now = mail.clock.now()
        due = await select_due_emails(connection, now, limit=10)
        await lease_emails(connection, [email.id for email in due], now + LEASE, now)

    await mail.deliver()
    assert mail.smtp.recorder.envelopes == []

    await mail.run(LEASE + timedelta(seconds=1))
    await mail.deliver()

    assert len(mail.smtp.recorder.envelopes) == 1
    (row,) = await mail.emails(lead_id)
    assert row.status == "sent"


async def test_a_template_that_fails_for_this_lead_fails_the_email_without_retry(
    mail: Mail,
) -> None:
    lead_id = await mail.sign_up("ada", email="ada@example.com")
    async with mail.runtime.db.write() as connection:
        await connection.execute(update(outbox).values(target="missing"))

    await mail.deliver()

    (row,) = await mail.emails(lead_id)
    assert row.status == "failed"
    assert row.last_error.startswith("cannot render")
    assert mail.smtp.recorder.envelopes == []


async def test_without_an_smtp_url_each_email_is_written_as_an_eml_file(
    mail: Mail, tmp_path: Path
) -> None:
    lead_id = await mail.sign_up("ada", email="ada@example.com", first_name="Ada")
    directory = tmp_path / "var" / "outbox"
    settings = dataclasses.replace(mail.runtime.settings, smtp_url=None)
    local = channel(mail, settings, eml_directory=directory)

    await local.run_once()
    await local.stop()

    (path,) = directory.iterdir()
    assert path.suffix == ".eml"
    written = message_from_bytes(path.read_bytes(), policy=default)
    assert written["To"] == "ada@example.com"
    assert written["Subject"] == "Hello Ada"
    (row,) = await mail.emails(lead_id)
    assert row.status == "sent"
    assert mail.smtp.recorder.envelopes == []


async def test_the_lead_api_shows_each_email_with_its_status_and_times(mail: Mail) -> None:
    mail.smtp.stop()
    lead_id = await mail.sign_up("ada", email="ada@example.com")
    queued_at = mail.clock.now()
    await mail.deliver()
    mail.smtp.start()
    await mail.run(timedelta(minutes=1))
    await mail.deliver()

    transport = httpx.ASGITransport(app=create_app(mail.runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://cjm.test") as client:
        response = await client.get(
            f"/v1/leads/{lead_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )

    assert response.status_code == 200
    (shown,) = response.json()["emails"]
    (row,) = await mail.emails(lead_id)
    assert shown == {
        "template": "hello",
        "journey": "welcome",
        "status": "sent",
        "queued_at": queued_at.isoformat().replace("+00:00", "Z"),
        "due_at": row.due_at.isoformat().replace("+00:00", "Z"),
        "sent_at": mail.clock.now().isoformat().replace("+00:00", "Z"),
        "attempts": 2,
        "last_error": None,
        "message_id": row.message_id,
    }
