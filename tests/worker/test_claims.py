"""Claims: a lead is processed by one transaction at a time, and a step is never written twice."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text

from engine.db import queries
from engine.db.database import Database
from engine.db.schema import events
from engine.db.types import EPOCH
from tests.worker.conftest import Engine

CATALOG = {"path": "/catalog/steel"}


async def test_events_applied_by_another_transaction_roll_this_one_back(engine: Engine) -> None:
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    (event,) = await engine.rows(events)
    now = engine.clock.now()
    db = engine.runtime.db
    async with db.write() as connection:
        await queries.mark_processed(connection, [event.id], now)

    with pytest.raises(queries.AlreadyProcessed):
        async with db.write() as connection:
            await queries.mark_processed(connection, [event.id], now)
    (again,) = await engine.rows(events)
    assert again.processed_at == now


async def test_a_lead_claimed_by_one_worker_is_skipped_by_another(
    postgres_database: str,
) -> None:
    # One lead with one pending event, in this session's PostgreSQL database.
    one, two = Database(postgres_database), Database(postgres_database)
    try:
        async with one.write() as connection:
            await connection.execute(text("TRUNCATE leads, events RESTART IDENTITY"))
            await connection.execute(
                text("INSERT INTO leads (created_at, updated_at, traits) VALUES (0, 0, '{}')")
            )
            await connection.execute(
                text(
                    "INSERT INTO events (message_id, lead_id, type, name, timestamp,"
                    " received_at, data) VALUES ('m1', 1, 'track', 'x', 0, 0, '{}')"
                )
            )
        async with one.write() as first:
            assert await queries.claim_leads_with_events(first, 10) == [1]
            async with two.write() as second:
                assert await queries.claim_leads_with_events(second, 10) == []
            await queries.mark_processed(first, [1], EPOCH)
        async with two.write() as second:
            assert await queries.claim_leads_with_events(second, 10) == []
            pending = await second.scalar(
                select(events.c.id).where(events.c.processed_at.is_(None))
            )
            assert pending is None
    finally:
        await one.close()
        await two.close()
