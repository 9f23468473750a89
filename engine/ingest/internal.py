"""Internal events: what cjm's own channels report about a lead (`email.sent`,
`email.unsubscribed`, `offer.expired`, ...), entering the same inbox as tracked events
so that journeys react to them in order with everything else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine.db.database import SqlConnection
from engine.db.queries import insert_rows, json_text, micros
from engine.db.schema import events
from engine.journey.model import INTERNAL_EVENTS


@dataclass(frozen=True)
class Fact:
    """One internal event: `name` for the lead, at `at`. `key` names the fact
    (`email.sent:42`): the same fact reported twice is one event."""

    lead_id: int
    name: str
    properties: Mapping[str, Any]
    at: datetime
    key: str


async def emit(
    connection: SqlConnection,
    *,
    lead_id: int,
    name: str,
    properties: Mapping[str, Any],
    at: datetime,
    key: str,
) -> None:
    """Record one fact for the lead in the caller's transaction."""
    await emit_all(connection, [Fact(lead_id, name, properties, at, key)])


FACT_COLUMNS = ("message_id", "lead_id", "type", "name", "timestamp", "received_at", "data")


async def emit_all(connection: SqlConnection, facts: Sequence[Fact]) -> None:
    """Record `facts` in the caller's transaction, in one statement of plain SQL (so it
    can run in a `Database.write_sql` transaction)."""
    for fact in facts:
        if fact.name not in INTERNAL_EVENTS:
            raise ValueError(f"{fact.name!r} is not an internal event")
    rows = [
        (
            f"cjm:{fact.key}",
            fact.lead_id,
            "internal",
            fact.name,
            micros(fact.at),
            micros(fact.at),
            json_text({"properties": dict(fact.properties)}),
        )
        for fact in facts
    ]
    suffix = " ON CONFLICT (message_id) DO NOTHING"
    await insert_rows(connection, events, FACT_COLUMNS, rows, suffix)
