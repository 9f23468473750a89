"""The lease on a worker's claims on PostgreSQL: a worker that hangs mid-batch does
not keep its leads; after the lease, another worker takes them and the hung one can
no longer write anything."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy.exc import DBAPIError

from engine.clock import SystemClock
from engine.db import queries
from engine.db.database import Database
from engine.ingest.inbox import Inbox
from engine.ingest.messages import parse_message
from tests.conftest import fresh_postgres_database

LEASE_S = 1.0


@pytest.fixture
def shared_database() -> Iterator[str]:
    with fresh_postgres_database("cjm_leases") as url:
        yield url


async def test_a_hung_workers_claim_passes_to_another_after_the_lease(
    shared_database: str,
) -> None:
    clock = SystemClock()
    hung, other = (Database(shared_database, lease_seconds=LEASE_S) for _ in range(2))
    try:
        inbox = Inbox(other, clock)
        await inbox.start()
        await inbox.accept([parse_message({"userId": "u1", "event": "x"}, "track", clock.now())])
        await inbox.stop()

        with pytest.raises(DBAPIError):
            async with hung.write() as connection:
                claimed = await queries.claim_leads_with_events(connection, 10)
                assert len(claimed) == 1
                async with other.write() as meanwhile:
                    # Held: another worker skips the lead while the claim lasts.
                    assert await queries.claim_leads_with_events(meanwhile, 10) == []
                await asyncio.sleep(LEASE_S * 2)  # hangs between two statements
                async with other.write() as later:
                    assert await queries.claim_leads_with_events(later, 10) == claimed
                # The hung worker wakes up: its transaction is gone with its lease.
                await queries.mark_processed(connection, [1], clock.now())
    finally:
        await hung.close()
        await other.close()
