"""Internal events: what cjm's own channels report about a lead (`email.sent`,
`email.unsubscribed`, `offer.expired`, ...), entering the same inbox as tracked events
so that journeys react to them in order with everything else."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.queries import upsert
from engine.db.schema import events
from engine.journey.model import INTERNAL_EVENTS


async def emit(
    connection: AsyncConnection,
    *,
    lead_id: int,
    name: str,
    properties: Mapping[str, Any],
    at: datetime,
    key: str,
) -> None:
    """Record `name` for the lead in the caller's transaction. `key` names the fact
    (`email.sent:42`): the same fact reported twice is one event."""
    if name not in INTERNAL_EVENTS:
        raise ValueError(f"{name!r} is not an internal event")
    row = {
        "message_id": f"cjm:{key}",
        "lead_id": lead_id,
        "type": "internal",
        "name": name,
        "timestamp": at,
        "received_at": at,
        "data": {"properties": dict(properties)},
    }
    statement = upsert(connection, events).on_conflict_do_nothing(
        index_elements=[events.c.message_id]
    )
    await connection.execute(statement, [row])
