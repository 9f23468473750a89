"""The SMTP server down, answering 4xx, or refusing with 5xx: every email is delivered once
when it can be, refused ones are not retried, refused addresses are suppressed.

The engine runs on a manual clock (so a backoff of minutes passes at once) against a
real aiosmtpd server, which counts every attempt it saw.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from channels.email import sender as sender_module
from channels.email.sender import LEASE, select_due_emails
from engine.db.schema import suppressions
from tests.email.conftest import HELLO, WELCOME, Mail, running_mail
from tests.faults.conftest import SmtpServer

LEADS = 5
SUBJECT = "Hello there"  # HELLO for a lead without a first name
# Over this window a sender that retried a refused email would have tried it many times.
ROUNDS, ROUND = 12, timedelta(hours=1)


@pytest.fixture
async def mail(database_url: str, tmp_path: Path, smtp_server: SmtpServer) -> AsyncIterator[Mail]:
    async with running_mail(
        database_url,
        tmp_path,
        smtp_server,  # type: ignore[arg-type]  # the same start/stop/url as the email tests'
        [WELCOME],
        {"hello": HELLO},
    ) as engine:
        yield engine


async def _attempts(mail: Mail, lead_ids: list[int]) -> list[tuple[str, int]]:
    return [(row.status, row.attempts) for lead in lead_ids for row in await mail.emails(lead)]


async def test_smtp_down_then_back_on_its_port_delivers_each_email_once_after_the_backoff(
    mail: Mail, smtp_server: SmtpServer
) -> None:
    smtp_server.stop()
    lead_ids = [await mail.sign_up(f"u{n}", email=f"u{n}@example.com") for n in range(LEADS)]

    await mail.deliver()
    assert await _attempts(mail, lead_ids) == [("deferred", 1)] * LEADS
    # Still down, and the sender runs again and again: nothing is due before its backoff.
    for _ in range(5):
        await mail.deliver()
    assert await _attempts(mail, lead_ids) == [("deferred", 1)] * LEADS

    smtp_server.start()
    await mail.deliver()
    assert smtp_server.mailbox.attempts == 0  # back, but the backoff is not over
    await mail.run(timedelta(seconds=40))  # the first backoff is 30 s, give or take 20%
    await mail.deliver()
    await mail.run(ROUND)
    await mail.deliver()

    assert smtp_server.mailbox.copies() == {(f"u{n}@example.com", SUBJECT): 1 for n in range(LEADS)}
    assert await _attempts(mail, lead_ids) == [("sent", 2)] * LEADS


async def test_451_answers_are_retried_with_growing_backoff_and_the_email_delivered_once(
    mail: Mail, smtp_server: SmtpServer
) -> None:
    mailbox = smtp_server.mailbox
    mailbox.refuse_first = 3
    lead_id = await mail.sign_up("ada", email="ada@example.com")

    delays = []
    for attempt in range(1, 4):
        await mail.deliver()
        (row,) = await mail.emails(lead_id)
        assert (row.status, row.attempts) == ("deferred", attempt)
        assert row.last_error.startswith("451")
        delays.append(row.due_at - mail.clock.now())
        await mail.deliver()  # not due yet: not tried
        assert mailbox.attempts == attempt
        await mail.run(delays[-1] + timedelta(seconds=1))
    await mail.deliver()
    await mail.run(ROUND)
    await mail.deliver()

    assert mailbox.copies() == {("ada@example.com", SUBJECT): 1}
    assert mailbox.attempts == 4
    (row,) = await mail.emails(lead_id)
    assert (row.status, row.attempts, row.last_error) == ("sent", 4, None)
    # Each wait about doubles the one before (the 20% jitter cannot reorder them).
    assert timedelta(seconds=24) <= delays[0] <= timedelta(seconds=36)
    assert delays[0] < delays[1] < delays[2]


async def test_a_refused_address_is_suppressed_and_never_tried_again(
    mail: Mail, smtp_server: SmtpServer
) -> None:
    mailbox = smtp_server.mailbox
    mailbox.refusal, mailbox.refuse_at, mailbox.refuse_always = (
        "550 5.1.1 no such user",
        "rcpt",
        True,
    )
    lead_id = await mail.sign_up("gone", email="Gone@Example.com")

    for _ in range(ROUNDS):
        await mail.deliver()
        await mail.run(ROUND)
    # The journey mails the same address again: suppressed, not even tried.
    await mail.send("track", userId="gone", event="signed_up")
    for _ in range(ROUNDS):
        await mail.run(ROUND)
        await mail.deliver()

    assert mailbox.attempts == 1
    assert mailbox.received() == []
    first, second = await mail.emails(lead_id)
    assert (first.status, first.attempts) == ("failed", 1)
    assert first.last_error.startswith("550")
    assert (second.status, second.attempts) == ("suppressed", 0)
    (suppressed,) = await mail.rows(suppressions)
    assert (suppressed.email, suppressed.reason) == ("gone@example.com", "bounced")
    assert len(await mail.events_named("email.bounced")) == 1


async def test_a_refused_message_fails_once_without_retry_and_the_address_stays_usable(
    mail: Mail, smtp_server: SmtpServer
) -> None:
    mailbox = smtp_server.mailbox
    mailbox.refusal, mailbox.refuse_always = "554 5.6.0 message content rejected", True
    lead_id = await mail.sign_up("ada", email="ada@example.com")

    for _ in range(ROUNDS):
        await mail.deliver()
        await mail.run(ROUND)

    assert mailbox.attempts == 1
    (row,) = await mail.emails(lead_id)
    assert (row.status, row.attempts) == ("failed", 1)
    assert row.last_error.startswith("554")
    assert len(await mail.events_named("email.failed")) == 1
    # The message was refused, not the address: the next email to it goes out.
    assert await mail.rows(suppressions) == []
    mailbox.refuse_always = False
    await mail.send("track", userId="ada", event="signed_up")
    await mail.run()
    await mail.deliver()
    assert mailbox.copies() == {("ada@example.com", SUBJECT): 1}


async def test_after_the_smtp_server_restarts_the_next_email_goes_out_on_its_first_try(
    mail: Mail, smtp_server: SmtpServer
) -> None:
    first = await mail.sign_up("ada", email="ada@example.com")
    await mail.deliver()  # leaves an idle connection to the server, for the next email
    smtp_server.stop()
    smtp_server.start()

    second = await mail.sign_up("bob", email="bob@example.com")
    await mail.deliver()

    assert smtp_server.mailbox.copies() == {
        ("ada@example.com", SUBJECT): 1,
        ("bob@example.com", SUBJECT): 1,
    }
    assert await _attempts(mail, [first, second]) == [("sent", 1), ("sent", 1)]


async def test_a_server_refusing_the_sender_defers_every_email_until_it_is_fixed(
    mail: Mail, smtp_server: SmtpServer
) -> None:
    """A 5xx before any recipient is named (the sender address, the relay policy) says
    nothing about the emails or their addresses: none fails or is suppressed for it, and
    each goes out once when the server takes mail again."""
    mailbox = smtp_server.mailbox
    mailbox.refusal, mailbox.refuse_at = "550 5.7.1 sender not allowed to relay", "mail"
    mailbox.refuse_always = True
    lead_ids = [await mail.sign_up(f"u{n}", email=f"u{n}@example.com") for n in range(LEADS)]

    await mail.deliver()
    assert await _attempts(mail, lead_ids) == [("deferred", 1)] * LEADS
    assert mailbox.attempts == LEADS
    assert await mail.rows(suppressions) == []

    mailbox.refuse_always = False  # the operator fixed the relay
    for _ in range(2):
        await mail.run(ROUND)
        await mail.deliver()

    assert mailbox.copies() == {(f"u{n}@example.com", SUBJECT): 1 for n in range(LEADS)}
    assert await _attempts(mail, lead_ids) == [("sent", 2)] * LEADS
    assert await mail.events_named("email.failed") == []


async def test_a_slow_smtp_server_outlasting_the_lease_still_gets_the_email_once(
    mail: Mail, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the server sits on a message, its sender keeps renewing the lease: no other
    sender takes the email, however long past the first lease it goes on."""
    monkeypatch.setattr(sender_module, "RENEW_EVERY_S", 0.1)
    mailbox = smtp_server.mailbox
    mailbox.gate.clear()
    lead_id = await mail.sign_up("ada", email="ada@example.com")
    await mail.runtime.email.dispatch_all()
    sending = asyncio.create_task(mail.runtime.email.sender.send_due())
    try:
        deadline = time.monotonic() + 30
        while mailbox.attempts == 0:  # the server holds the message now
            assert time.monotonic() < deadline, "the message never reached the server"
            await asyncio.sleep(0.05)
        for _ in range(3):  # three times the lease's length, a third at a time
            now = mail.clock.advance(LEASE / 3 * 2)
            while (await mail.emails(lead_id))[0].lease_until <= now + LEASE / 2:
                assert time.monotonic() < deadline, "the lease was never renewed"
                await asyncio.sleep(0.05)
            async with mail.runtime.db.write() as connection:  # as another sender looks
                assert await select_due_emails(connection, now, limit=10) == []
    finally:
        mailbox.gate.set()
        await sending

    assert mailbox.copies() == {("ada@example.com", SUBJECT): 1}
    assert mailbox.attempts == 1
    (row,) = await mail.emails(lead_id)
    assert (row.status, row.attempts) == ("sent", 1)
