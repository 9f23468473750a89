"""An email that shows the lead's offer code never goes out before the code is granted,
however the granting and the sending interleave (a worker committing its step between
the two, or another process granting the code at that very moment)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels.email.outbox import dispatch
from engine.db.schema import offer_codes
from tests.email.conftest import Mail, running_mail
from tests.faults.conftest import SmtpServer

GIFT = """\
id: gift
name: A gift on sign-up
entry: {on: signed_up}
stages:
  - id: gifted
    phase: awareness
    terminal: true
    on_enter:
      - email.send: your_code
      - offer.grant: gift
offers:
  gift:
    title: A gift
    expires: {after: 5d}
    code: "GIFT-{8}"
"""

YOUR_CODE = (
    "{% block subject %}Your code{% endblock %}"
    "{% block html %}<p>Your code: {{ offer.code if offer else 'none' }}</p>{% endblock %}"
)


@pytest.fixture
async def mail(database_url: str, tmp_path: Path, smtp_server: SmtpServer) -> AsyncIterator[Mail]:
    async with running_mail(
        database_url,
        tmp_path,
        smtp_server,  # type: ignore[arg-type]  # the same start/stop/url as the email tests'
        [GIFT],
        {"your_code": YOUR_CODE},
    ) as engine:
        yield engine


async def test_an_email_queued_before_its_offer_is_granted_waits_for_the_code(
    mail: Mail, smtp_server: SmtpServer
) -> None:
    lead_id = await mail.sign_up("ada", email="ada@example.com")
    # The step committed just after the granting ran: the email is queued, the grant
    # still pending, and the sender runs before the next granting does.
    async with mail.runtime.db.write() as connection:
        assert await dispatch(connection, mail.clock.now()) == 1
    await mail.runtime.email.send_all()
    assert smtp_server.mailbox.received() == []

    await mail.deliver()

    (message,) = smtp_server.mailbox.received()
    body = message.get_body(("plain",))
    assert body is not None
    (granted,) = await mail.rows(offer_codes, lead_id=lead_id)
    assert re.findall(r"Your code: (\S+)", body.get_content()) == [granted.code]
