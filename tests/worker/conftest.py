"""A running engine (inbox + worker, no HTTP) on a manual clock, over each database."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from engine.api.app import create_app
from engine.clock import ManualClock
from engine.config import Settings
from engine.db.schema import (
    audience_members,
    enrollments,
    events,
    identities,
    leads,
    outbox,
    timers,
    transitions,
)
from engine.ingest.messages import MessageType, parse_message
from engine.journey import JourneySet, load_journeys
from engine.runtime import Runtime

START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)

FUNNEL = """\
id: funnel
name: A small funnel
version: 1
entry:
  on: page
  where: {properties.path: {startswith: /catalog}}
  reentry: always
exit:
  - on: opted_out
goal:
  on: order_completed
  value: properties.revenue
stages:
  - id: visitor
    phase: awareness
    on_enter:
      - audience.add: visitors
      - trait.set: {lifecycle: visitor}
    transitions:
      - {on: page, where: {properties.path: {startswith: /landing}}, to: interested}
      - {after: 2h, to: retarget}
  - id: retarget
    phase: awareness
    on_enter: [{audience.add: abandoners}]
    transitions:
      - {on: page, where: {properties.path: {startswith: /landing}}, to: interested}
      - {after: 14d, to: lost}
  - id: interested
    phase: consideration
    on_enter:
      - audience.remove: abandoners
      - sequence.start: tips
      - offer.grant: welcome
    transitions:
      - {on: order_completed, to: customer}
  - id: customer
    phase: purchase
    on_enter:
      - email.send: thanks
      - audience.remove: [visitors, abandoners]
  - id: lost
    phase: awareness
    terminal: true
sequences:
  tips:
    steps:
      - email: tip
offers:
  welcome:
    title: Welcome
    expires: {after: 5d}
    code: "WELCOME-{6}"
audiences:
  visitors: {}
  abandoners: {}
"""


def write_funnel(directory: Path, text: str = FUNNEL) -> JourneySet:
    (directory / "funnel.yaml").write_text(textwrap.dedent(text))
    templates = directory / "templates"
    templates.mkdir(exist_ok=True)
    for name in ("tip", "thanks"):
        (templates / f"{name}.j2").write_text("{% block subject %}x{% endblock %}")
    return load_journeys([directory / "funnel.yaml"], templates)


@dataclass
class Engine:
    """The engine under test, and the questions tests ask of its database."""

    runtime: Runtime
    clock: ManualClock

    async def send(self, type_: MessageType, **payload: Any) -> None:
        """Accept one message received now; its timestamp defaults to now."""
        payload.setdefault("timestamp", self.clock.now().isoformat())
        message = parse_message(payload, type_, self.clock.now())
        await self.runtime.inbox.accept([message])

    async def run(self, advance: timedelta = timedelta(0)) -> None:
        """Let time pass, then process everything pending or due."""
        self.clock.advance(advance)
        await self.runtime.worker.drain()

    async def lead_id(self, user_id: str | None = None, anonymous_id: str | None = None) -> int:
        kind, value = ("user", user_id) if user_id else ("anon", anonymous_id)
        async with self.runtime.db.read() as connection:
            found = await connection.scalar(
                select(identities.c.lead_id).where(
                    identities.c.kind == kind, identities.c.value == value
                )
            )
        assert found is not None, f"no lead for {kind} id {value!r}"
        return int(found)

    async def rows(self, table: Any, **where: Any) -> list[Any]:
        query = select(table)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        async with self.runtime.db.read() as connection:
            return list((await connection.execute(query.order_by(*table.primary_key))).all())

    async def stages(self, lead_id: int) -> list[tuple[str, str]]:
        """(stage, state) of each enrollment of the lead, oldest first."""
        return [(row.stage, row.state) for row in await self.rows(enrollments, lead_id=lead_id)]

    async def history(self, lead_id: int) -> list[tuple[str | None, str | None, str]]:
        """(from, to, cause type) of all the lead's transitions, in order."""
        async with self.runtime.db.read() as connection:
            rows = await connection.execute(
                select(transitions.c.from_stage, transitions.c.to_stage, transitions.c.cause)
                .join(enrollments, enrollments.c.id == transitions.c.enrollment_id)
                .where(enrollments.c.lead_id == lead_id)
                .order_by(transitions.c.at, transitions.c.id)
            )
            return [(row.from_stage, row.to_stage, row.cause["type"]) for row in rows]

    async def audiences(self, lead_id: int) -> dict[str, bool]:
        """Audience name -> whether the lead is a member now."""
        rows = await self.rows(audience_members, lead_id=lead_id)
        return {row.audience: row.removed_at is None for row in rows}

    async def outbox(self, lead_id: int) -> list[tuple[str, str, str]]:
        return [
            (row.action, row.target, row.status) for row in await self.rows(outbox, lead_id=lead_id)
        ]

    async def timers(self, lead_id: int) -> list[Any]:
        return await self.rows(timers, lead_id=lead_id)

    async def lead(self, lead_id: int) -> Any:
        (row,) = await self.rows(leads, id=lead_id)
        return row

    async def pending_events(self) -> int:
        async with self.runtime.db.read() as connection:
            rows = await connection.execute(
                select(events.c.id).where(events.c.processed_at.is_(None))
            )
            return len(rows.all())


async def start_engine(
    database_url: str, journeys: JourneySet, clock: ManualClock, **options: Any
) -> Runtime:
    """`options` go to the Runtime (`writers_take_turns`)."""
    settings = Settings(database_url=database_url, write_key="wk_test", admin_key="ak_test")
    runtime = Runtime(settings, clock=clock, journeys=journeys, run_worker=False, **options)
    await runtime.start()
    return runtime


@asynccontextmanager
async def running_engine(
    database_url: str, journeys: JourneySet, **options: Any
) -> AsyncIterator[Engine]:
    """The engine running `journeys` on a manual clock set to START, stopped at the end;
    `options` as for `start_engine`."""
    clock = ManualClock(START)
    runtime = await start_engine(database_url, journeys, clock, **options)
    try:
        yield Engine(runtime, clock)
    finally:
        await runtime.stop()


@asynccontextmanager
async def app_client(runtime: Runtime, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Real HTTP against the ASGI app serving `runtime`; `options` go to the client
    (headers, auth)."""
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://cjm.test", **options
    ) as client:
        yield client


@pytest.fixture
async def engine(database_url: str, tmp_path: Path) -> AsyncIterator[Engine]:
    async with running_engine(database_url, write_funnel(tmp_path)) as engine:
        yield engine
