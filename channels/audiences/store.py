"""Audience membership as the exports read it: numbered changes, expiry, leavers.

The worker records each add and remove in `audience_members` (the row keeps its add and
remove times) and marks the row changed (`seq` null). The sequencer then numbers changed
rows, one sequencer at a time, so change numbers grow in commit order: an export that
has read up to number N has seen every change numbered N or less, and a cursor holding
N lets the next sync ask for exactly what changed since. A row changed again is
numbered again: a sync gets each member's latest state once.

A member is exported as a removal once it left the audience (its journey ended, its
`ttl` ran out, the audience dropped it) or once its address unsubscribed: people who
asked for no marketing are taken out of ad audiences too.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import BigInteger, and_, exists, func, select, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.queries import driver_sql, json_value, update_rows, upsert
from engine.db.schema import (
    audience_members,
    counters,
    leads,
    suppressions,
)
from engine.db.types import Instant, from_micros
from engine.journey.model import Journey

CHANGES = "audience_changes"  # the counter of membership change numbers
SEQUENCE_BATCH = 10_000

Op = Literal["add", "remove"]


async def number_changes(connection: AsyncConnection, limit: int = SEQUENCE_BATCH) -> list[int]:
    """Number up to `limit` changed memberships after the last number given; returns the
    leads whose memberships were numbered (none: nothing was left to number). Run in its
    own short transaction: the counter's row lock, held to commit, keeps numbering one
    at a time, so numbers become visible in the order they were given."""
    # Rows a worker is changing right now are skipped, not waited for: numbering never
    # holds the counter while waiting on a worker, so the two cannot deadlock.
    changed = list(
        await connection.execute(
            select(audience_members.c.audience, audience_members.c.lead_id)
            .where(audience_members.c.seq.is_(None))
            .order_by(audience_members.c.audience, audience_members.c.lead_id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if not changed:
        return []
    await connection.execute(
        upsert(connection, counters)
        .values(name=CHANGES, value=0)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    top = await connection.scalar(
        update(counters)
        .where(counters.c.name == CHANGES)
        .values(value=counters.c.value + len(changed))
        .returning(counters.c.value)
    )
    first = int(top or 0) - len(changed) + 1
    # Plain rows in one statement (an executemany on SQLite): the counter stays locked
    # until commit, and workers adding to these memberships wait for their row locks as
    # long.
    await update_rows(
        connection,
        audience_members,
        ("seq",),
        ("audience", "lead_id"),
        [(number, row.audience, row.lead_id) for number, row in enumerate(changed, start=first)],
        where="seq IS NULL",
    )
    return [row.lead_id for row in changed]


async def expire_members(
    connection: AsyncConnection, journeys: Collection[Journey], now: datetime
) -> int:
    """Remove members whose audience `ttl` has run out since they joined; returns how many."""
    removed = 0
    for journey in journeys:
        for name, audience in journey.audiences.items():
            if audience.ttl is None:
                continue
            result = await connection.execute(
                update(audience_members)
                .where(
                    audience_members.c.audience == name,
                    audience_members.c.removed_at.is_(None),
                    audience_members.c.added_at <= now - audience.ttl,
                )
                # Left when the ttl ran out, however late the sweep came.
                .values(removed_at=_plus(audience_members.c.added_at, audience.ttl), seq=None)
            )
            removed += result.rowcount
    return removed


def _plus(instant: Any, duration: timedelta) -> Any:
    """`instant + duration` computed in the database, on the microseconds it stores."""
    micros = duration // timedelta(microseconds=1)
    return type_coerce(type_coerce(instant, BigInteger) + micros, Instant)


async def remove_lead(connection: AsyncConnection, lead_id: int, now: datetime) -> None:
    """Take the lead out of every audience (it unsubscribed from marketing)."""
    await connection.execute(
        update(audience_members)
        .where(audience_members.c.lead_id == lead_id, audience_members.c.removed_at.is_(None))
        .values(removed_at=now, seq=None)
    )


@dataclass(frozen=True)
class Member:
    """One exported row: the change number, what to do, and the lead's traits."""

    seq: int
    op: Op
    lead_id: int
    traits: dict[str, Any]
    added_at: datetime
    removed_at: datetime | None
    # An erased lead's hashed identifiers by platform ("meta", "google"): all that is left.
    erased: dict[str, list[str]] | None = None


async def last_number(connection: AsyncConnection) -> int:
    """The last change number given: every change numbered up to it is visible."""
    top = await connection.scalar(select(counters.c.value).where(counters.c.name == CHANGES))
    return int(top or 0)


def _unsubscribed() -> Any:
    return exists().where(
        suppressions.c.email == leads.c.email, suppressions.c.reason == "unsubscribed"
    )


# Written for the driver, not built with SQLAlchemy: an export reads every member of an
# audience, and SQLAlchemy's handling of each value (JSON columns, instants) cost five
# times what SQLite takes to find the rows.
_LEAVING = (
    "(m.removed_at IS NOT NULL OR EXISTS (SELECT 1 FROM suppressions s"
    " WHERE s.email = l.email AND s.reason = 'unsubscribed'))"
)
# The columns of `member_rows`' queries: `m` is the membership, `l` the lead.
OP = f"CASE WHEN {_LEAVING} THEN 'remove' ELSE 'add' END"
_MEMBERS = (
    "SELECT {columns} FROM audience_members m JOIN leads l ON l.id = m.lead_id{join}"
    " WHERE m.audience = ? AND m.seq > ? AND m.seq <= ?{only_adds}"
    " ORDER BY m.seq LIMIT ?"
)


async def member_rows(
    connection: AsyncConnection,
    columns: str,
    audience: str,
    *,
    after: int,
    upto: int,
    limit: int,
    adds_only: bool,
    join: str = "",
    column_parameters: tuple[Any, ...] = (),
) -> list[tuple[Any, ...]]:
    """`columns` of the audience's changes numbered in (after, upto], oldest first, at
    most `limit`: each member's latest state. `adds_only` (a full export) leaves out the
    leavers. `join` adds tables to `m` and `l`; `column_parameters` fill the `?` in
    `columns`. Values come as the driver gives them (JSON as text on SQLite)."""
    statement = _MEMBERS.format(
        columns=columns, join=join, only_adds=f" AND NOT {_LEAVING}" if adds_only else ""
    )
    result = await connection.exec_driver_sql(
        driver_sql(connection, statement),
        (*column_parameters, audience, after, upto, limit),
    )
    return cast(list[tuple[Any, ...]], result.all())


async def read_members(
    connection: AsyncConnection,
    audience: str,
    *,
    after: int,
    upto: int,
    limit: int,
    adds_only: bool,
) -> list[Member]:
    """The members `member_rows` gives, with their traits and times."""
    rows = await member_rows(
        connection,
        f"m.seq, m.lead_id, m.added_at, m.removed_at, l.traits, m.erased, {OP}",
        audience,
        after=after,
        upto=upto,
        limit=limit,
        adds_only=adds_only,
    )
    return [
        Member(
            seq,
            op,
            lead_id,
            json_value(traits) or {},
            from_micros(added_at),
            None if removed_at is None else from_micros(removed_at),
            json_value(erased),
        )
        for seq, lead_id, added_at, removed_at, traits, erased, op in rows
    ]


async def count_members(
    connection: AsyncConnection, audience: str, *, after: int, upto: int, adds_only: bool
) -> int:
    """How many rows `read_members` would give over the whole range (for progress bars)."""
    query = (
        select(func.count())
        .select_from(audience_members.join(leads, leads.c.id == audience_members.c.lead_id))
        .where(
            audience_members.c.audience == audience,
            audience_members.c.seq > after,
            audience_members.c.seq <= upto,
        )
    )
    if adds_only:
        query = query.where(and_(audience_members.c.removed_at.is_(None), ~_unsubscribed()))
    return int(await connection.scalar(query) or 0)


async def audience_sizes(connection: AsyncConnection) -> dict[str, int]:
    """Current members per audience (unsubscribed leads not counted)."""
    result = await connection.execute(
        select(audience_members.c.audience, func.count())
        .select_from(audience_members.join(leads, leads.c.id == audience_members.c.lead_id))
        .where(audience_members.c.removed_at.is_(None), ~_unsubscribed())
        .group_by(audience_members.c.audience)
    )
    return {name: int(size) for name, size in result}
