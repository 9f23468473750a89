"""A running engine whose journey sends one email, and a real SMTP server to receive it."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller

from channels.email.channel import EmailChannel
from engine.clock import ManualClock
from engine.config import Settings
from engine.db.schema import emails, events
from engine.journey import load_journeys
from engine.runtime import Runtime
from tests.email.test_transport import Recorder, free_port
from tests.worker.conftest import START, Engine

ADMIN_KEY = "ak_test"
SENDER = "Door Shop <news@Shop.Example.com>"
BASE_URL = "https://cjm.example.com"

WELCOME = """\
id: welcome
name: Welcome mail
version: 1
entry:
  on: signed_up
  reentry: always
stages:
  - id: greeted
    name: Greeted warmly
    phase: awareness
    terminal: true
    on_enter:
      - email.send: hello
"""

HELLO = """\
{% block subject %}Hello {{ lead.first_name | default("there") }}{% endblock %}
{% block html %}<html><body>
<p>Hi {{ lead.first_name | default("there") }}, welcome to {{ journey.name }}.</p>
<p><a href="https://shop.example.com/doors">See our doors</a></p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>
</body></html>{% endblock %}
"""


class SmtpServer:
    """An aiosmtpd server on a port fixed up front, so it can be down and then come up."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@dataclass
class Mail(Engine):
    """The engine, its SMTP server, and what the email tests ask."""

    smtp: SmtpServer

    async def sign_up(self, user_id: str, **traits: Any) -> int:
        """The lead identifies with `traits` and enters the journey, which queues `hello`."""
        await self.send("identify", userId=user_id, traits=traits)
        await self.send("track", userId=user_id, event="signed_up")
        await self.run()
        return await self.lead_id(user_id=user_id)

    async def deliver(self) -> None:
        await self.runtime.email.run_once()

    async def emails(self, lead_id: int) -> list[Any]:
        return await self.rows(emails, lead_id=lead_id)

    async def events_named(self, name: str) -> list[Any]:
        return await self.rows(events, name=name)


def channel(mail: Mail, settings: Settings | None = None, **options: Path) -> EmailChannel:
    """Another channel on the same database, as a restarted process would have."""
    runtime = mail.runtime
    return EmailChannel(
        settings=settings or runtime.settings,
        db=runtime.db,
        clock=runtime.clock,
        book=runtime.book,
        links=runtime.links,
        **options,
    )


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer(Recorder())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def running_mail(
    database_url: str,
    directory: Path,
    smtp: SmtpServer,
    journeys: Sequence[str],
    templates: Mapping[str, str],
    **settings: Any,
) -> AsyncIterator[Mail]:
    """An engine on a manual clock running `journeys` (YAML texts) with `templates`
    (name -> Jinja2 source), sending to `smtp`; `settings` override the defaults."""
    paths = []
    for text in journeys:
        path = directory / f"{yaml.safe_load(text)['id']}.yaml"
        path.write_text(textwrap.dedent(text))
        paths.append(path)
    template_dir = directory / "templates"
    template_dir.mkdir(exist_ok=True)
    for name, source in templates.items():
        (template_dir / f"{name}.j2").write_text(source)
    options: dict[str, Any] = {
        "database_url": database_url,
        "templates_dir": template_dir,
        "smtp_url": smtp.url,
        "email_from": SENDER,
        "base_url": BASE_URL,
        "write_key": "wk_test",
        "admin_key": ADMIN_KEY,
    }
    clock = ManualClock(START)
    runtime = Runtime(
        Settings(**(options | settings)),
        clock=clock,
        journeys=load_journeys(paths, template_dir),
        run_worker=False,
    )
    await runtime.start()
    try:
        yield Mail(runtime, clock, smtp)
    finally:
        await runtime.stop()


@pytest.fixture
async def mail(database_url: str, tmp_path: Path, smtp: SmtpServer) -> AsyncIterator[Mail]:
    async with running_mail(database_url, tmp_path, smtp, [WELCOME], {"hello": HELLO}) as engine:
        yield engine
