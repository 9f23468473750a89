"""`insert_rows` and `update_rows`: many rows in one statement on PostgreSQL (the
columns as arrays, or a COPY), an executemany on SQLite; the same rows stored either
way, ON CONFLICT clauses and extra conditions included."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from sqlalchemy import literal, select

from engine.db.database import Database
from engine.db.queries import OUTBOX_COLUMNS, insert_rows, json_text, update_rows
from engine.db.schema import audience_members, outbox, transitions
from engine.db.types import from_micros

KEEP_FIRST = " ON CONFLICT (idempotency_key) DO NOTHING"
HISTORY = ("enrollment_id", "journey_id", "from_stage", "to_stage", "at", "cause")


def action(key: str, target: str) -> tuple[object, ...]:
    return (key, 7, 70, "doors", "email.send", target, "pending", 1, 1)


@pytest.mark.parametrize("first", [True, False], ids=["first-statement", "after-another"])
async def test_rows_of_every_column_type_are_stored_as_given(db: Database, first: bool) -> None:
    """On PostgreSQL, first in its transaction as unnest's arrays, after another
    statement as a COPY."""
    rows = [
        (11, "doors", None, "first_contact", 1_000_001, json_text({"kind": "event", "n": 1})),
        (11, "doors", "first_contact", "landing", 2_000_002, json_text({"kind": "timer"})),
        (12, "doors", "landing", None, 3_000_003, json_text({"note": "ünïcode ✓"})),
    ]
    async with db.write() as connection:
        if not first:
            await connection.execute(select(literal(1)))
        await insert_rows(connection, transitions, HISTORY, rows)

    async with db.read() as connection:
        stored = (
            await connection.execute(
                select(
                    transitions.c.enrollment_id,
                    transitions.c.from_stage,
                    transitions.c.to_stage,
                    transitions.c.cause,
                ).order_by(transitions.c.id)
            )
        ).all()
    assert [tuple(row) for row in stored] == [
        (11, None, "first_contact", {"kind": "event", "n": 1}),
        (11, "first_contact", "landing", {"kind": "timer"}),
        (12, "landing", None, {"note": "ünïcode ✓"}),
    ]


async def test_rows_copied_on_postgres_roll_back_with_their_transaction(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COPY only inside a transaction already begun on the server: first in it, the
    COPY would run before the transaction and commit on its own."""
    copies = 0
    copy = asyncpg.Connection.copy_records_to_table

    async def counted_copy(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> str:
        nonlocal copies
        copies += 1
        return await copy(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", counted_copy)
    row = (11, "doors", None, "first_contact", 1_000_001, json_text({"kind": "event"}))
    for first in (True, False):
        with pytest.raises(RuntimeError, match="roll back"):
            async with db.write() as connection:
                if not first:
                    await connection.execute(select(literal(1)))
                await insert_rows(connection, transitions, HISTORY, [row])
                raise RuntimeError("roll back")

    async with db.read() as connection:
        assert (await connection.execute(select(transitions.c.id))).all() == []
    assert copies == (0 if db.is_sqlite else 1)


async def test_a_conflict_clause_applies_within_the_rows_and_against_stored_ones(
    db: Database,
) -> None:
    async with db.write() as connection:
        await insert_rows(connection, outbox, OUTBOX_COLUMNS, [action("a", "first")], KEEP_FIRST)
    async with db.write() as connection:
        await insert_rows(
            connection,
            outbox,
            OUTBOX_COLUMNS,
            [action("a", "again"), action("b", "first"), action("b", "again")],
            KEEP_FIRST,
        )

    async with db.read() as connection:
        stored = (
            await connection.execute(
                select(outbox.c.idempotency_key, outbox.c.target).order_by(outbox.c.id)
            )
        ).all()
    assert [tuple(row) for row in stored] == [("a", "first"), ("b", "first")]


async def test_no_rows_is_no_statement(db: Database) -> None:
    async with db.write() as connection:
        await insert_rows(connection, outbox, OUTBOX_COLUMNS, [], KEEP_FIRST)
    async with db.read() as connection:
        assert (await connection.execute(select(outbox.c.id))).all() == []


async def test_updates_match_on_every_key_and_keep_to_the_extra_condition(db: Database) -> None:
    members = [
        ("retarget", 1, "doors", 10, None),
        ("retarget", 2, "doors", 10, None),
        ("retarget", 3, "doors", 10, 20),  # removed already: keeps its removal time
        ("newsletter", 1, "doors", 10, None),  # another audience, same lead: untouched
    ]
    async with db.write() as connection:
        await insert_rows(
            connection,
            audience_members,
            ("audience", "lead_id", "journey_id", "added_at", "removed_at"),
            members,
        )
        await connection.execute(audience_members.update().values(seq=5))
    async with db.write() as connection:
        await update_rows(
            connection,
            audience_members,
            ("removed_at",),
            ("audience", "lead_id"),
            [(30, "retarget", 1), (31, "retarget", 3), (32, "retarget", 9)],
            also="seq = NULL",
            where="removed_at IS NULL",
        )

    async with db.read() as connection:
        stored = (
            await connection.execute(
                select(
                    audience_members.c.audience,
                    audience_members.c.lead_id,
                    audience_members.c.removed_at,
                    audience_members.c.seq,
                ).order_by(audience_members.c.audience, audience_members.c.lead_id)
            )
        ).all()
    removed = {(audience, lead): (at, seq) for audience, lead, at, seq in stored}
    assert removed[("retarget", 1)] == (from_micros(30), None)  # changed: numbered again
    assert removed[("retarget", 2)] == (None, 5)
    assert removed[("retarget", 3)] == (from_micros(20), 5)  # not current: not touched
    assert removed[("newsletter", 1)] == (None, 5)
    assert len(removed) == 4  # no row made for the lead that was never a member
