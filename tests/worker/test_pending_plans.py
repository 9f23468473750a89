"""The worker's reads and writes of pending events as each database plans them.

A burst of events after a quiet moment: statistics gathered while few events were
pending say the index of pending events (`ix_events_pending`, partial) holds a handful
of rows, and in the burst it holds all of them. Asked as joins (`IN (SELECT
unnest(...))`), PostgreSQL planned on such statistics walked that index once per id
of a batch: with 92,000 events pending, 75 s to mark one batch's events processed and
6 s to load them; looking for the batch's merges walked it once per batch. The
statements must search by the batch's own ids whatever the statistics say. SQLite
plans without statistics; its plans are checked too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text

from engine.db import queries
from engine.db.database import Database
from engine.db.types import from_micros, to_micros
from tests.plans import plans_of

NOW = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
QUIET_LEADS = range(1, 2_001)  # three processed events each, when statistics are taken
BURST_LEADS = range(2_001, 2_401)  # then five pending events each
BATCH = list(BURST_LEADS)[:100]


def merged_into(lead: int) -> int:
    """The lead a lead's first event says is the same person (a lead of a million on)."""
    return 1_000_000 + lead


@pytest.fixture
async def burst(plan_database: str) -> AsyncIterator[Database]:
    """Events processed, statistics taken (PostgreSQL), then a burst of pending events."""
    db = Database(plan_database)
    insert = text(
        "INSERT INTO events (message_id, lead_id, type, name, timestamp, received_at, data,"
        " merge_lead_id, processed_at) VALUES (:message_id, :lead_id, 'track', 'viewed', :at,"
        " :at, '{}', :merge_lead_id, :processed_at)"
    )

    def rows(leads: range, each: int, processed: bool) -> list[dict[str, Any]]:
        at = to_micros(NOW)
        return [
            {
                "message_id": f"m-{lead}-{k}",
                "lead_id": lead,
                "at": at + k,
                # Each lead's first event merges another lead into it.
                "merge_lead_id": merged_into(lead) if k == 0 else None,
                "processed_at": at if processed else None,
            }
            for lead in leads
            for k in range(each)
        ]

    try:
        async with db.write() as connection:
            await connection.execute(insert, rows(QUIET_LEADS, 3, processed=True))
        if not db.is_sqlite:  # cjm runs no ANALYZE on SQLite, and plans there without
            async with db.write() as connection:
                await connection.execute(text("ANALYZE events"))
        async with db.write() as connection:
            await connection.execute(insert, rows(BURST_LEADS, 5, processed=False))
            await connection.execute(
                text(
                    "INSERT INTO leads (id, created_at, updated_at, traits)"
                    " VALUES (:id, 0, 0, '{}')"
                ),
                [{"id": lead} for lead in (*QUIET_LEADS, *BURST_LEADS)],
            )
        yield db
    finally:
        await db.close()


def searches_by(db: Database, plan: str, column: str) -> bool:
    """Whether `plan` searches an index by `column` for each value of the list: on
    SQLite a search by key (an id may be the rowid), on PostgreSQL an index condition
    `= ANY`."""
    if db.is_sqlite:
        keys = ("(rowid=?)", "(id=?)") if column == "id" else (f"({column}=?)",)
        return any(key in plan for key in keys)
    return f"Index Cond: ({column} = ANY" in plan


async def test_a_batch_pending_events_are_found_through_its_leads(burst: Database) -> None:
    found: list[queries.EventRow] = []

    async def load(connection: Any) -> None:
        found.extend(await queries.load_pending_events(connection, BATCH, 10_000))

    for plan in await plans_of(burst, "events", load):
        assert "ix_events_lead_id_timestamp" in plan, plan
        assert "ix_events_pending" not in plan, plan
        assert searches_by(burst, plan, "lead_id"), plan
    # All of the batch's pending events, none of another lead's, none processed.
    assert sorted((row.lead_id, row.timestamp) for row in found) == sorted(
        (lead, from_micros(to_micros(NOW) + k)) for lead in BATCH for k in range(5)
    )


async def test_a_batch_events_are_marked_processed_by_their_ids(burst: Database) -> None:
    async with burst.read() as connection:
        pending = await queries.load_pending_events(connection, BATCH, 10_000)
    ids = [row.id for row in pending]

    async def mark(connection: Any) -> None:
        await queries.mark_processed(connection, ids, NOW)

    for plan in await plans_of(burst, "events", mark):
        assert "Join" not in plan and "SCAN" not in plan, plan
        assert searches_by(burst, plan, "id"), plan
    async with burst.read() as connection:
        left = await queries.load_pending_events(connection, list(BURST_LEADS), 10_000)
    assert len(left) == 5 * (len(BURST_LEADS) - len(BATCH))
    assert not {row.lead_id for row in left} & set(BATCH)


async def test_a_batch_pending_merges_are_found_in_the_index_of_merges(burst: Database) -> None:
    found: list[tuple[int, int]] = []

    async def merges(connection: Any) -> None:
        found.extend(await queries.merges_pending(connection, BATCH + list(QUIET_LEADS)[:50]))

    for plan in await plans_of(burst, "events", merges):
        assert "ix_events_merges" in plan, plan
        assert "ix_events_pending" not in plan, plan
        assert searches_by(burst, plan, "lead_id"), plan
    # The batch's pending merges; the quiet leads' were processed.
    assert sorted(found) == [(lead, merged_into(lead)) for lead in BATCH]
