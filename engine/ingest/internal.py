"""Internal events: what cjm's own channels report about a lead (`email.sent`,
`email.unsubscribed`, `offer.expired`, ...), entering the same inbox as tracked events
so that journeys react to them in order with everything else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.queries import upsert
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
    connection: AsyncConnection,
    *,
    lead_id: int,
    name: str,
    properties: Mapping[str, Any],
    at: datetime,
    key: str,
) -> None:
    """Record one fact for the lead in the caller's transaction."""
    await emit_all(connection, [Fact(lead_id, name, properties, at, key)])


async def emit_all(connection: AsyncConnection, facts: Sequence[Fact]) -> None:
    """Record `facts` in the caller's transaction, in one statement."""
    for fact in facts:
        if fact.name not in INTERNAL_EVENTS:
            raise ValueError(f"{fact.name!r} is not an internal event")
    if not facts:
        return
    rows = [
        {
            "message_id": f"cjm:{fact.key}",
            "lead_id": fact.lead_id,
            "type": "internal",
            "name": fact.name,
            "timestamp": fact.at,
            "received_at": fact.at,
            "data": {"properties": dict(fact.properties)},
        }
        for fact in facts
    ]
    statement = upsert(connection, events).on_conflict_do_nothing(
        index_elements=[events.c.message_id]
    )
    await connection.execute(statement, rows)
