"""Leads' rows in the ad platforms' exports, normalised, hashed and written out ahead.

Normalising a lead for Meta and Google (phone numbers above all) costs about ten times
what hashing the result does, and an export that did it for every row would spend its
time there on each sync. So the audience job works a lead's rows out when its
memberships change (which is when they are numbered for the exports), writes them as
the text the exports send (a JSON array for Meta, a CSV line for Google), and keeps them
in `audience_identities`; exports splice that text into their pages and files.

A stored row holds only for what it was made from: the lead's identity traits and the
default region. The database extracts those traits from `leads.traits` itself
(`identifiers_sql`), so an export checks in its own query, without decoding a trait,
that the stored extract and region still equal the lead's; it works out the row of a
lead whose traits changed since (or that no job has hashed yet) from the current traits.
What is exported is always what the current traits give.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, cast

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from channels.audiences.normalize import both_rows, google_row, meta_row
from channels.audiences.store import OP, Op, member_rows
from engine.db.database import Database
from engine.db.queries import among, chunks, driver_sql, execute_rows, in_list, json_value
from engine.db.schema import leads
from engine.worker.changes import IDENTITY_TRAITS

# Leads read and written per transaction, and hashed between two yields to the event
# loop (about 6 ms of normalising), which in `cjm serve` also answers tracking calls.
REFRESH_CHUNK = 500
HASHED_PER_YIELD = 50

Platform = Literal["meta", "google"]
# A member as a platform's export gives it: change number, op, the row as sent.
ExportedRow = tuple[int, Op, str]
# How each platform's row is made from a lead's traits and the default region.
ROWS: dict[Platform, Callable[[Mapping[str, Any], str | None], list[str]]] = {
    "meta": meta_row,
    "google": google_row,
}


def identifiers_sql(dialect: str, leads: str) -> str:
    """SQL giving, for the row `leads` of the leads table, its identity traits' values
    as one text: equal texts mean equal values, hence equal rows (a trait whose value
    only looks different, such as a number written another way, just counts as
    changed). Computed by the same database for storing and for checking."""
    if dialect == "postgresql":
        values = ", ".join(f"{leads}.traits -> '{name}'" for name in IDENTITY_TRAITS)
        return f"json_build_array({values})::text"
    paths = ", ".join(f"'$.{name}'" for name in IDENTITY_TRAITS)
    return f"json_extract({leads}.traits, {paths})"  # several paths: a JSON array


def row_text(platform: Platform, row: list[str]) -> str:
    """A row as its platform's export writes it: a JSON array, or a CSV line without
    its line end (Google's zip is the lead's own text, so it may need quoting)."""
    if platform == "meta":
        return orjson.dumps(row).decode()
    line = io.StringIO()
    csv.writer(line, lineterminator="").writerow(row)
    return line.getvalue()


async def platform_rows(
    connection: AsyncConnection,
    audience: str,
    platform: Platform,
    region: str | None,
    *,
    after: int,
    upto: int,
    limit: int,
    adds_only: bool,
) -> list[ExportedRow]:
    """The members `member_rows` gives, each with its row as `platform` takes it: the
    stored text while it holds for the lead's traits and the region, the row kept at
    erasure for an erased lead, else the row worked out now."""
    fresh = f"i.region = ? AND i.identifiers = {identifiers_sql(connection.dialect.name, 'l')}"
    found = await member_rows(
        connection,
        # The traits only where they are needed: the driver may decode what it reads.
        # Without a stored row `fresh` is null, and a CASE takes null for false.
        f"m.seq, {OP}, m.erased, CASE WHEN {fresh} THEN i.{platform} END,"
        f" CASE WHEN {fresh} THEN NULL ELSE l.traits END",
        audience,
        after=after,
        upto=upto,
        limit=limit,
        adds_only=adds_only,
        join=" LEFT JOIN audience_identities i ON i.lead_id = l.id",
        column_parameters=(region or "", region or ""),
    )
    make = ROWS[platform]
    rows: list[ExportedRow] = []
    for seq, op, erased, stored, traits in found:
        if stored is not None:
            rows.append((seq, op, stored))
        elif erased is not None:
            rows.append((seq, op, row_text(platform, json_value(erased)[platform])))
        else:
            rows.append((seq, op, row_text(platform, make(json_value(traits) or {}, region))))
    return rows


def identity_row(
    lead_id: int, identifiers: str, traits: Any, region: str | None
) -> tuple[Any, ...]:
    """A lead's row of `audience_identities`, from its traits as read with their extract."""
    meta, google = both_rows(json_value(traits) or {}, region)
    return (lead_id, region or "", identifiers, row_text("meta", meta), row_text("google", google))


async def refresh_identities(db: Database, lead_ids: Collection[int], region: str | None) -> int:
    """Store the rows of those leads whose stored ones are missing or stale; returns how
    many were stored. Erased leads are left alone: their exports carry the rows kept
    at erasure. Two processes refreshing one lead at once store the same rows, or each
    the rows of the traits it read with the extract of those traits: an export checks
    which."""
    refreshed = 0
    for part in chunks(sorted(lead_ids), REFRESH_CHUNK):
        async with db.read() as connection:
            listed, parameters = in_list(connection, part)
            found = await connection.exec_driver_sql(
                driver_sql(connection, _stale_query(connection.dialect.name, listed)),
                (region or "", *parameters),
            )
            stale = cast(list[tuple[int, Any, str]], found.all())
        rows = []
        for number, (lead_id, traits, identifiers) in enumerate(stale, start=1):
            if number % HASHED_PER_YIELD == 0:
                await asyncio.sleep(0)
            rows.append(identity_row(lead_id, identifiers, traits, region))
        if rows:
            async with db.write() as connection:
                refreshed += await store_identity_rows(connection, rows)
    return refreshed


async def store_identity_rows(connection: AsyncConnection, rows: list[tuple[Any, ...]]) -> int:
    """Store rows made by `identity_row`, but those of leads erased since they were
    read: the leads are locked against an erasure until the commit (on PostgreSQL;
    SQLite's one writer holds them already), which deletes the rows stored before it.
    Returns how many were stored."""
    live = set(
        (
            await connection.execute(
                select(leads.c.id)
                .where(among(connection, leads.c.id, [row[0] for row in rows]))
                .where(leads.c.erased_at.is_(None))
                .with_for_update(read=True)
            )
        ).scalars()
    )
    stored = [row for row in rows if row[0] in live]
    await execute_rows(connection, _STORE, stored)
    return len(stored)


def _stale_query(dialect: str, listed: str) -> str:
    """The leads `listed` (the list of an IN) not erased, whose stored rows are missing
    or stale."""
    identifiers = identifiers_sql(dialect, "l")
    return (
        f"SELECT l.id, l.traits, {identifiers} FROM leads l"
        " LEFT JOIN audience_identities i ON i.lead_id = l.id"
        f" WHERE l.erased_at IS NULL AND (i.lead_id IS NULL OR i.region <> ?"
        f" OR i.identifiers <> {identifiers}) AND l.id IN ({listed})"
    )


_STORE = (
    "INSERT INTO audience_identities (lead_id, region, identifiers, meta, google)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (lead_id) DO UPDATE SET region = excluded.region,"
    " identifiers = excluded.identifiers, meta = excluded.meta, google = excluded.google"
)


async def refresh_all_identities(db: Database, region: str | None) -> int:
    """Store the rows of every member, of any audience, whose stored ones are missing or
    stale, as after an upgrade or a change of the default region. Run once when the
    audience job starts; returns how many were stored."""
    refreshed, after = 0, 0
    while True:
        async with db.read() as connection:
            found = await connection.exec_driver_sql(
                driver_sql(
                    connection,
                    "SELECT DISTINCT lead_id FROM audience_members WHERE lead_id > ?"
                    " ORDER BY lead_id LIMIT ?",
                ),
                (after, REFRESH_CHUNK),
            )
            lead_ids = [lead_id for (lead_id,) in found]
        if not lead_ids:
            return refreshed
        refreshed += await refresh_identities(db, lead_ids, region)
        after = lead_ids[-1]
