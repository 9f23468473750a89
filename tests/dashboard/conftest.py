"""The example journeys running on a manual clock, their dashboard over HTTP, and ways to
read the map out of a page."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.clock import ManualClock
from engine.config import Settings
from engine.runtime import Runtime
from tests.worker.conftest import START, Engine, app_client

ROOT = Path(__file__).resolve().parents[2]
WRITE_KEY = "wk_dashboard_test"
ADMIN_KEY = "ak_dashboard_test"
BEARER = {"Authorization": f"Bearer {ADMIN_KEY}"}
SVG = "{http://www.w3.org/2000/svg}"
GOOGLE = {"campaign": {"source": "google"}}
FACEBOOK = {"campaign": {"source": "facebook"}}


@asynccontextmanager
async def example_engine(
    database_url: str, *, admin_key: str | None = ADMIN_KEY
) -> AsyncIterator[Engine]:
    """The journeys and email templates shipped in the repository, as `cjm serve` loads
    them, with the worker and channels driven by the test; `admin_key=None` leaves the
    admin key to the database, where it can be rotated."""
    clock = ManualClock(START)
    settings = Settings(
        database_url=database_url,
        journeys_dir=ROOT / "journeys",
        templates_dir=ROOT / "templates" / "emails",
        write_key=WRITE_KEY,
        admin_key=admin_key,
    )
    runtime = Runtime(settings, clock=clock, run_worker=False)
    await runtime.start()
    try:
        yield Engine(runtime, clock)
    finally:
        await runtime.stop()


async def visit(engine: Engine, user: str, context: dict[str, Any] = GOOGLE) -> None:
    await engine.send("page", userId=user, properties={"path": "/catalog/steel"}, context=context)


async def request_catalog(engine: Engine, user: str, email: str) -> None:
    await engine.send("identify", userId=user, traits={"email": email})
    await engine.send("track", userId=user, event="catalog_requested")


async def doors_traffic(engine: Engine) -> None:
    """Ann orders, Bob waits in first contact, Cy comes back from social, Dan is retargeted."""
    await visit(engine, "dan")
    await engine.run(timedelta(hours=3))
    await visit(engine, "ann")
    await request_catalog(engine, "ann", "ann@example.com")
    await engine.send("track", userId="ann", event="order_completed", properties={"revenue": 990})
    await visit(engine, "cy", FACEBOOK)
    await engine.send("page", userId="cy", properties={"path": "/x"}, context=FACEBOOK)
    await engine.run(timedelta(minutes=1))
    await visit(engine, "bob")
    await engine.send("identify", userId="bob", traits={"email": "bob@example.com"})
    await engine.run(timedelta(minutes=1))
    await visit(engine, "eve")
    await engine.run()


@pytest.fixture
async def examples(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Engine]:
    # Emails are written as .eml files under ./var/outbox when no SMTP server is set.
    monkeypatch.chdir(tmp_path)
    async with example_engine(database_url) as engine:
        yield engine


@pytest.fixture
async def dashboard(examples: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """A script's view: the admin key as a bearer token."""
    async with app_client(examples.runtime, headers=BEARER) as client:
        yield client


def map_of(page: str) -> ET.Element:
    """The map's SVG element in a dashboard page (it is well-formed XML on its own)."""
    found = re.search(r"<svg\b.*?</svg>", page, re.DOTALL)
    assert found is not None, "no map on the page"
    return ET.fromstring(found.group(0))


def stage_cards(svg: ET.Element) -> dict[str, ET.Element]:
    return {card.get("data-stage", ""): card for card in svg.iter(f"{SVG}g") if _is(card, "stage")}


def moves(svg: ET.Element) -> dict[tuple[str, str], ET.Element]:
    """The arrows, by (from stage, to stage or "exit")."""
    return {
        (arrow.get("data-from", ""), arrow.get("data-to", "")): arrow
        for arrow in svg.iter(f"{SVG}g")
        if _is(arrow, "move")
    }


def texts(element: ET.Element) -> list[str]:
    """Each text of an element as one string, its wrapped lines joined again."""
    return [
        " ".join(part.strip() for part in text.itertext() if part.strip())
        for text in element.iter(f"{SVG}text")
    ]


def _is(element: ET.Element, kind: str) -> bool:
    return kind in (element.get("class") or "").split()
