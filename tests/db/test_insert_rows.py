"""`insert_rows`: many rows in one statement on PostgreSQL (the columns as arrays), an
executemany on SQLite; the same rows stored either way, ON CONFLICT clauses included."""

from __future__ import annotations

from sqlalchemy import select

from engine.db.database import Database
from engine.db.queries import insert_rows, json_text
from engine.db.schema import outbox, transitions

OUTBOX_COLUMNS = (
    "idempotency_key",
    "lead_id",
    "enrollment_id",
    "journey_id",
    "action",
    "target",
    "status",
    "created_at",
    "updated_at",
)
KEEP_FIRST = " ON CONFLICT (idempotency_key) DO NOTHING"


def action(key: str, target: str) -> tuple[object, ...]:
    return (key, 7, 70, "doors", "email.send", target, "pending", 1, 1)


async def test_rows_of_every_column_type_are_stored_as_given(db: Database) -> None:
    rows = [
        (11, "doors", None, "first_contact", 1_000_001, json_text({"kind": "event", "n": 1})),
        (11, "doors", "first_contact", "landing", 2_000_002, json_text({"kind": "timer"})),
        (12, "doors", "landing", None, 3_000_003, json_text({"note": "ünïcode ✓"})),
    ]
    async with db.write() as connection:
        await insert_rows(
            connection,
            transitions,
            ("enrollment_id", "journey_id", "from_stage", "to_stage", "at", "cause"),
            rows,
        )

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
