"""The example journeys shipped in journeys/ run their segment's story end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from engine.clock import ManualClock
from engine.db.schema import goals
from engine.journey import load_journeys
from tests.worker.conftest import START, Engine, start_engine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def examples(database_url: str) -> AsyncIterator[Engine]:
    clock = ManualClock(START)
    journeys = load_journeys([ROOT / "journeys"], ROOT / "templates" / "emails")
    runtime = await start_engine(database_url, journeys, clock)
    try:
        yield Engine(runtime, clock)
    finally:
        await runtime.stop()


async def _stages_visited(engine: Engine, lead: int) -> list[str]:
    return [to for _, to, _ in await engine.history(lead) if to is not None]


async def test_doors_search_visitor_is_retargeted_nurtured_offered_and_buys(
    examples: Engine,
) -> None:
    engine = examples
    google = {"campaign": {"source": "google"}}
    await engine.send(
        "page", anonymousId="v1", properties={"path": "/catalog/steel"}, context=google
    )
    await engine.run(timedelta(hours=3))  # left without a word: retargeted after 2h
    await engine.send("page", anonymousId="v1", properties={"path": "/landing/winter-sale"})
    await engine.send("identify", anonymousId="v1", userId="ann", traits={"email": "ann@x.example"})
    await engine.send(
        "track", userId="ann", event="catalog_requested", properties={"format": "pdf"}
    )
    await engine.run(timedelta(days=2))
    await engine.send("track", userId="ann", event="order_completed", properties={"revenue": 1290})
    await engine.run()
    lead = await engine.lead_id(user_id="ann")

    assert await _stages_visited(engine, lead) == [
        "first_contact",
        "retargeting",
        "landing",
        "nurturing",
        "customer",
    ]
    actions = await engine.outbox(lead)
    assert ("sequence.start", "door_tips", "pending") in actions
    assert ("offer.grant", "free_install", "pending") in actions
    assert ("email.send", "order_thanks", "pending") in actions
    assert ("sequence.stop", "door_tips", "pending") in actions  # stop_on: order_completed
    assert [row.value for row in await engine.rows(goals)] == [1290.0]
    audiences = await engine.audiences(lead)
    assert audiences["catalog_abandoners"] is False


async def test_subscription_box_social_visitor_subscribes_and_becomes_loyal(
    examples: Engine,
) -> None:
    engine = examples
    social = {"campaign": {"source": "instagram"}}
    await engine.send("page", userId="sam", properties={"path": "/boxes"}, context=social)
    await engine.send("identify", userId="sam", traits={"email": "sam@x.example"})
    await engine.send("track", userId="sam", event="quiz_completed")
    await engine.run(timedelta(hours=1))
    await engine.send("track", userId="sam", event="subscription_started")
    await engine.run(timedelta(days=3))
    await engine.send("track", userId="sam", event="box_delivered", properties={"box_number": 1})
    for box in (2, 3):
        await engine.run(timedelta(days=30))
        await engine.send(
            "track",
            userId="sam",
            event="order_completed",
            properties={"revenue": 29, "box_number": box},
        )
    await engine.run()
    lead = await engine.lead_id(user_id="sam")

    assert await _stages_visited(engine, lead) == [
        "discovery",
        "considering",
        "subscriber",
        "first_box",
        "loyal",
    ]
    assert [row.value for row in await engine.rows(goals)] == [29.0, 29.0]


async def test_b2b_trial_signup_books_a_demo_and_signs(examples: Engine) -> None:
    engine = examples
    await engine.send("page", userId="ops@acme.example", properties={"path": "/pricing"})
    await engine.send("identify", userId="ops@acme.example", traits={"email": "ops@acme.example"})
    await engine.send("track", userId="ops@acme.example", event="trial_started")
    await engine.run(timedelta(days=3))
    await engine.send("track", userId="ops@acme.example", event="demo_booked")
    await engine.run(timedelta(days=2))
    await engine.send(
        "track", userId="ops@acme.example", event="demo_attended", properties={"duration_min": 40}
    )
    await engine.run(timedelta(days=10))
    await engine.send(
        "track", userId="ops@acme.example", event="contract_signed", properties={"revenue": 12000}
    )
    await engine.run()
    lead = await engine.lead_id(user_id="ops@acme.example")

    assert await _stages_visited(engine, lead) == [
        "evaluating",
        "trial",
        "demo_scheduled",
        "proposal",
        "customer",
    ]
    assert (await engine.lead(lead)).traits["lifecycle"] == "customer"
    assert [row.value for row in await engine.rows(goals)] == [12000.0]
