"""Membership changes waiting for a number are found through their partial index.

The sequencer numbers changes (`seq` null) in key order, at most a batch at a time,
and `/metrics` counts those left. Both must read only the changes still to number,
however many memberships were numbered before and whatever statistics say: SQLite
plans without any, and would otherwise scan an index of every membership; PostgreSQL
may plan on statistics taken when nothing waited.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, text

from channels.audiences.store import CHANGES, number_changes
from engine.db import queries
from engine.db.database import Database
from engine.db.schema import audience_members, counters
from tests.plans import plans_of

NOW = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
AUDIENCES = ("buyers", "cart", "visitors")
NUMBERED = range(1, 3_001)  # leads numbered in each audience when statistics are taken
CHANGED = range(2_901, 3_201)  # then: 100 numbered memberships change, 200 are new
UNNUMBERED_INDEX = "ix_audience_members_unsequenced"
OTHER_INDEXES = (
    "ix_audience_members_audience_seq",
    "ix_audience_members_seq",
    "autoindex",  # SQLite's key
    "pk_audience_members",  # PostgreSQL's
)


@pytest.fixture
async def changes(plan_database: str) -> AsyncIterator[Database]:
    """Numbered memberships, statistics taken (PostgreSQL), then changes to number."""
    db = Database(plan_database)
    upsert = text(
        "INSERT INTO audience_members (audience, lead_id, journey_id, added_at, seq)"
        " VALUES (:audience, :lead_id, 'doors', 0, :seq)"
        " ON CONFLICT (audience, lead_id) DO UPDATE SET seq = NULL"
    )
    numbered = [
        {"audience": audience, "lead_id": lead, "seq": n}
        for n, (audience, lead) in enumerate(
            ((audience, lead) for audience in AUDIENCES for lead in NUMBERED), start=1
        )
    ]
    try:
        async with db.write() as connection:
            await connection.execute(upsert, numbered)
            await connection.execute(
                text("INSERT INTO counters (name, value) VALUES (:name, :value)"),
                {"name": CHANGES, "value": len(numbered)},
            )
        if not db.is_sqlite:
            async with db.write() as connection:
                await connection.execute(text("ANALYZE audience_members"))
        async with db.write() as connection:
            await connection.execute(
                upsert,
                [
                    {"audience": audience, "lead_id": lead, "seq": None}
                    for audience in AUDIENCES
                    for lead in CHANGED
                ],
            )
        yield db
    finally:
        await db.close()


def reads_the_unnumbered_index(plan: str) -> bool:
    """Whether `plan` reads the partial index of changes to number, and no other index
    nor the table whole (SQLite's `SCAN audience_members`, PostgreSQL's `Seq Scan`)."""
    lines = plan.splitlines()
    return (
        UNNUMBERED_INDEX in plan
        and not any(other in plan for other in OTHER_INDEXES)
        and not any(line.endswith("SCAN audience_members") or "Seq Scan" in line for line in lines)
    )


async def test_changes_are_numbered_in_key_order_from_the_partial_index(
    changes: Database,
) -> None:
    numbered: list[int] = []

    async def number(connection: Any) -> None:
        numbered.extend(await number_changes(connection, limit=250))

    select_plan = (await plans_of(changes, "audience_members", number))[0]

    assert reads_the_unnumbered_index(select_plan), select_plan
    if changes.is_sqlite:  # read in the index's order, not sorted after
        assert "TEMP B-TREE" not in select_plan, select_plan
    # The first 250 changes in key order: all of `buyers`' 300, cut at 250.
    assert numbered == list(CHANGED)[:250]
    async with changes.read() as connection:
        given = (
            await connection.execute(
                select(audience_members.c.lead_id, audience_members.c.seq)
                .where(audience_members.c.audience == "buyers", audience_members.c.seq > 9_000)
                .order_by(audience_members.c.seq)
            )
        ).all()
        top = await connection.scalar(select(counters.c.value).where(counters.c.name == CHANGES))
    # Numbered after the last number given, in key order.
    assert [tuple(row) for row in given] == [
        (lead, 9_000 + n) for n, lead in enumerate(list(CHANGED)[:250], start=1)
    ]
    assert top == 9_250


async def test_the_queue_depth_counts_the_changes_from_the_partial_index(
    changes: Database,
) -> None:
    depths: dict[str, int] = {}

    async def count(connection: Any) -> None:
        depths.update(await queries.queue_depths(connection, NOW))

    [plan] = await plans_of(changes, "audience_members", count)

    assert reads_the_unnumbered_index(plan), plan
    assert depths["audience_changes_unnumbered"] == len(AUDIENCES) * len(CHANGED)
    async with changes.write() as connection:
        await number_changes(connection)
    async with changes.read() as connection:
        left = await queries.queue_depths(connection, NOW)
    assert left["audience_changes_unnumbered"] == 0
