"""The worker's bulk writes: rows go to the driver as plain values, so what they store
must be exactly what the schema's column types store (instants as integer
microseconds, JSON as the engine's serializer writes it), and batched grants must
give each lead one code and count each once."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from sqlalchemy import Table, func, insert, select

from channels.offers.store import grant_offers
from engine.db.queries import OUTBOX_PENDING, json_text
from engine.db.schema import (
    audience_members,
    enrollments,
    kpi_offers,
    leads,
    offer_codes,
    outbox,
    timers,
    transitions,
)
from engine.db.types import to_micros
from engine.machine.values import Cause
from engine.worker.changes import cause_json
from engine.worker.processor import Processor
from tests.worker.conftest import Engine

CATALOG = {"path": "/catalog/steel"}
LANDING = {"path": "/landing/winter"}


async def _stored(engine: Engine, table: Table, instants: list[str], documents: list[str]) -> None:
    """Each row as SQLAlchemy reads it, against the raw values the database holds."""
    columns = [*instants, *(f"CAST({name} AS TEXT)" for name in documents)]
    async with engine.runtime.db.read() as connection:
        typed = (await connection.execute(select(table).order_by(*table.primary_key))).all()
        order = ", ".join(column.name for column in table.primary_key)
        raw = (
            await connection.exec_driver_sql(
                f"SELECT {', '.join(columns)} FROM {table.name} ORDER BY {order}"
            )
        ).all()
    assert typed, f"the worker wrote no {table.name}"
    assert len(raw) == len(typed)
    for row, stored in zip(typed, raw, strict=True):
        values: list[Any] = list(stored)
        for name, value in zip(instants, values[: len(instants)], strict=True):
            moment = getattr(row, name)
            if moment is None:
                assert value is None
            else:
                assert moment.utcoffset() == timedelta(0)
                assert isinstance(value, int)
                assert value == to_micros(moment), (table.name, name)
        for name, value in zip(documents, values[len(instants) :], strict=True):
            assert value == orjson.dumps(getattr(row, name)).decode(), (table.name, name)


async def test_rows_written_in_bulk_are_stored_as_the_column_types_store_them(
    engine: Engine,
) -> None:
    await engine.send(
        "page",
        anonymousId="a1",
        properties=CATALOG,
        context={"campaign": {"source": "google"}},
    )
    await engine.run(timedelta(hours=2))  # to retarget: among the abandoners
    landed_at = engine.clock.now()
    await engine.send("identify", anonymousId="a1", userId="u1", traits={"email": " A@B.example "})
    await engine.send("page", anonymousId="a1", properties=LANDING)
    await engine.send("page", anonymousId="a2", properties=CATALOG)  # waits on its timeout
    await engine.run(timedelta(minutes=5))

    lead = await engine.lead(await engine.lead_id(anonymous_id="a1"))
    assert lead.email == "a@b.example"
    assert lead.first_source == "google"
    assert lead.traits["email"] == " A@B.example "
    await _stored(engine, leads, ["updated_at", "watermark", "first_source_at"], ["traits"])
    await _stored(
        engine,
        enrollments,
        ["entered_at", "stage_entered_at", "ended_at"],
        ["sequences"],
    )
    await _stored(engine, transitions, ["at"], ["cause"])
    await _stored(engine, timers, ["due_at"], [])
    await _stored(engine, audience_members, ["added_at", "removed_at"], [])
    await _stored(engine, outbox, ["created_at", "updated_at"], [])
    (run,) = await engine.rows(enrollments, lead_id=lead.id)
    assert run.sequences == ["tips"]
    assert await engine.audiences(lead.id) == {"visitors": True, "abandoners": False}
    (left,) = await engine.rows(audience_members, lead_id=lead.id, audience="abandoners")
    assert left.removed_at == landed_at


async def test_a_timeouts_move_changes_the_run_and_of_the_lead_only_its_clock(
    engine: Engine,
) -> None:
    """A timer's move changes the run, and of the lead only its clock (the watermark):
    `updated_at` stays when its events were last applied. The batch still counts the
    lead as taken forward (a sweep goes on while batches take leads forward)."""
    for n in range(3):
        await engine.send(
            "page", anonymousId=f"a{n}", properties=CATALOG, context={"campaign": {"source": "x"}}
        )
    await engine.run()
    ids = [await engine.lead_id(anonymous_id=f"a{n}") for n in range(3)]
    before = [await engine.lead(lead_id) for lead_id in ids]

    engine.clock.advance(timedelta(hours=2))
    processor = Processor(engine.runtime.db, engine.runtime.book, engine.clock, batch_leads=2)
    assert await processor.process_due_timers() == 2
    assert await processor.process_due_timers() == 1
    assert await processor.process_due_timers() == 0

    for lead_id, was in zip(ids, before, strict=True):
        assert ("visitor", "retarget", "timer") in await engine.history(lead_id)
        after = await engine.lead(lead_id)
        assert after.watermark == was.watermark + timedelta(hours=2)
        assert {**after._mapping, "watermark": None} == {**was._mapping, "watermark": None}

    # An event that changes nothing of the lead moves its clock and `updated_at`.
    await engine.send("page", anonymousId="a0", properties=LANDING)
    await engine.run(timedelta(minutes=1))
    lead = await engine.lead(ids[0])
    assert lead.watermark == engine.clock.now() - timedelta(minutes=1)  # the page's time
    assert lead.updated_at == engine.clock.now()
    assert lead.traits == before[0].traits
    await _stored(engine, leads, ["updated_at", "watermark"], ["traits"])


def test_a_cause_is_written_as_the_text_of_its_dict() -> None:
    """The worker writes a transition's cause in one call, not through `as_dict()`:
    every field, set or not, and every kind of timestamp comes out the same text."""
    instants = [
        None,
        datetime(2026, 3, 1, 9, 30, tzinfo=UTC),  # no microseconds: none written
        datetime(2026, 3, 1, 9, 30, 0, 120, tzinfo=UTC),
        datetime(2026, 3, 1, 9, 30, 5, 999999, tzinfo=timezone(timedelta(hours=2))),
        datetime(1999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    ]
    written = set()
    for event, message_id, timestamp, late, after, detail in itertools.product(
        [None, "order_completed"],
        [None, 'm-1 "quoted" é'],
        instants,
        [False, True],
        [None, "2h"],
        [None, "merged into lead 7"],
    ):
        cause = Cause("event", event, message_id, timestamp, late, after, detail)
        text = cause_json(cause)
        assert text == json_text(cause.as_dict()), cause.as_dict()
        written.add(text)
    assert len(written) == 2 * 2 * len(instants) * 2 * 2 * 2  # no two causes alike


async def test_grants_in_one_batch_give_each_lead_one_code_and_are_counted_once(
    engine: Engine,
) -> None:
    for n in range(3):
        await engine.send("page", anonymousId=f"a{n}", properties=CATALOG)
    await engine.run()
    now = engine.clock.now()
    runs = await engine.rows(enrollments)
    assert len(runs) == 3
    async with engine.runtime.db.write() as connection:
        # Two grants of the same offer for the first lead, one for each other lead.
        for index, run in enumerate([runs[0], *runs]):
            await connection.execute(
                insert(outbox).values(
                    idempotency_key=f"{run.id}/grant-{index}",
                    lead_id=run.lead_id,
                    enrollment_id=run.id,
                    journey_id="funnel",
                    action="offer.grant",
                    target="welcome",
                    status=OUTBOX_PENDING,
                    created_at=now,
                    updated_at=now,
                )
            )
        handled = await grant_offers(connection, engine.runtime.book, now)
    assert handled == 4

    codes = await engine.rows(offer_codes)
    assert sorted(row.lead_id for row in codes) == sorted(run.lead_id for run in runs)
    assert len({row.code for row in codes}) == 3
    assert all(row.code.startswith("WELCOME-") for row in codes)
    assert all(row.expires_at == now + timedelta(days=5) for row in codes)
    async with engine.runtime.db.read() as connection:
        granted = await connection.scalar(select(func.sum(kpi_offers.c.granted)))
        reported = await connection.scalar(
            select(func.count()).select_from(outbox).where(outbox.c.status == OUTBOX_PENDING)
        )
    assert granted == 3
    assert reported == 0
