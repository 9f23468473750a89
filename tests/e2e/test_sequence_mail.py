"""A nurture sequence sent by a real `cjm serve` to a real SMTP server, in real time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message
from email.policy import default
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.e2e.conftest import Server, free_port

SEQUENCE = """\
id: drip
name: Second-scale drip
entry: {on: signed_up}
stages:
  - id: reading
    phase: consideration
    on_enter: [{sequence.start: drip}]
    transitions: [{on: order_completed, to: bought}]
  - id: bought
    phase: purchase
    terminal: true
sequences:
  drip:
    stop_on: [order_completed]
    steps:
      - email: first
      - wait: 1s
      - email: second
      - wait: 2s
      - email: third
"""

TEMPLATE = (
    "{% block subject %}{{ title }} for {{ lead.first_name | default('you') }}{% endblock %}"
    "{% block html %}<p>Hello {{ lead.first_name | default('you') }}</p>{% endblock %}"
)


class Inbox:
    """An aiosmtpd handler that notes when each message arrived."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, Message]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.arrivals.append(
            (time.monotonic(), message_from_bytes(envelope.content, policy=default))
        )
        return "250 OK"

    def wait_for(self, count: int, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while len(self.arrivals) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.arrivals) >= count, f"{len(self.arrivals)} of {count} emails arrived"


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, str]]:
    handler = Inbox()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, f"smtp://127.0.0.1:{port}"
    finally:
        controller.stop()


def test_a_running_server_sends_a_sequence_in_order_with_its_waits(
    serve: Callable[..., Server], database_url: str, tmp_path: Path, inbox: tuple[Inbox, str]
) -> None:
    received, smtp_url = inbox
    journeys, templates = tmp_path / "journeys", tmp_path / "templates"
    journeys.mkdir()
    templates.mkdir()
    (journeys / "drip.yaml").write_text(SEQUENCE)
    for name in ("first", "second", "third"):
        source = TEMPLATE.replace("{{ title }}", name.capitalize())
        (templates / f"{name}.j2").write_text(source)
    server = serve(
        CJM_DATABASE_URL=database_url,
        CJM_JOURNEYS_DIR=str(journeys),
        CJM_TEMPLATES_DIR=str(templates),
        CJM_SMTP_URL=smtp_url,
    )

    traits = {"email": "reader@example.com", "first_name": "Robin"}
    assert server.track("/v1/identify", {"userId": "r1", "traits": traits}).status_code == 200
    assert server.track("/v1/track", {"userId": "r1", "event": "signed_up"}).status_code == 200
    received.wait_for(3)

    times = [at for at, _ in received.arrivals]
    subjects = [str(message["Subject"]) for _, message in received.arrivals]
    assert subjects == ["First for Robin", "Second for Robin", "Third for Robin"]
    # Each wait counts from the previous email: never shorter than written.
    assert times[1] - times[0] >= 1.0
    assert times[2] - times[1] >= 2.0
    time.sleep(1)
    assert len(received.arrivals) == 3

    (lead,) = server.admin("/v1/leads?user_id=r1").json()
    detail = server.admin(f"/v1/leads/{lead['id']}").json()
    assert [(email["template"], email["status"]) for email in detail["emails"]] == [
        ("first", "sent"),
        ("second", "sent"),
        ("third", "sent"),
    ]
    assert [(run["sequence"], run["status"]) for run in detail["sequences"]] == [
        ("drip", "completed")
    ]
