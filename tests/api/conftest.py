"""An API over a real database: a small runtime, the app, and an HTTP client on it.

ASGITransport does not run the lifespan, so the runtime fixture starts and stops
the inbox itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import pytest

from channels.email.links import Links
from engine.api.app import create_app
from engine.clock import ManualClock
from engine.config import Settings
from engine.db.database import Database
from engine.ingest.inbox import Inbox
from engine.journey.model import Journey
from engine.keys import ApiKeys
from engine.machine.book import JourneyBook

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
WRITE_KEY = "wk_test_write_key"
ADMIN_KEY = "ak_test_admin_key"
SIGNING_SECRET = "test-signing-secret"

WRITE = httpx.BasicAuth(WRITE_KEY, "")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

DOORS = Journey.model_validate(
    {
        "id": "doors",
        "name": "Entry doors",
        "version": 1,
        "segment": {"name": "Homeowners", "jobs": ["protect my home"]},
        "entry": {"on": "page", "where": {"properties.path": {"startswith": "/catalog"}}},
        "stages": [
            {
                "id": "first_contact",
                "name": "First contact",
                "phase": "awareness",
                "transitions": [
                    {"on": "order_completed", "to": "customer"},
                    {"after": "2h", "to": "lost"},
                ],
            },
            {"id": "customer", "phase": "purchase"},
            {"id": "lost", "phase": "awareness", "terminal": True},
        ],
    }
)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    clock: ManualClock
    keys: ApiKeys
    inbox: Inbox
    book: JourneyBook
    links: Links
    commits: list[int] = field(default_factory=list)

    async def start(self) -> None:
        await self.inbox.start()

    async def stop(self) -> None:
        await self.inbox.stop()


@pytest.fixture
async def runtime(db: Database) -> AsyncIterator[Runtime]:
    settings = Settings(
        database_url=db.url,
        write_key=WRITE_KEY,
        admin_key=ADMIN_KEY,
        signing_secret=SIGNING_SECRET,
    )
    keys, _ = await ApiKeys.load(db, settings)
    clock = ManualClock(NOW)
    links = await Links.load(db, "https://cjm.example", NOW)
    book = JourneyBook.of([DOORS])
    runtime = Runtime(settings, db, clock, keys, Inbox(db, clock), book, links)
    runtime.inbox.on_commit = lambda: runtime.commits.append(len(runtime.commits) + 1)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://cjm.test") as client:
        yield client
