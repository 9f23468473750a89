"""Leads' identifiers normalised and hashed ahead of the audience exports.

Normalising a lead for Meta and Google (phone numbers above all) costs about ten times
what hashing the result does, and an export that did it for every row would spend its
time there on each sync. So the audience job works a lead's rows out when its
memberships change (which is when they are numbered for the exports) and keeps them in
`audience_identities`, and exports read them.

A stored row holds only for what it was made from: the lead's identity traits and the
default region, summed up in its `digest`. An export compares that with the digest of
the traits it reads, and works out itself the row of a lead whose traits changed since
(or that no job hashed yet): what is exported is always what the current traits give.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal

import orjson
from sqlalchemy import select

from channels.audiences.normalize import both_rows, google_row, meta_row
from channels.audiences.store import Member
from engine.db.database import Database
from engine.db.queries import among, chunks, upsert
from engine.db.schema import audience_identities, leads
from engine.worker.changes import IDENTITY_TRAITS

# Leads read and written per transaction, and hashed between two yields to the event
# loop (about 6 ms of normalising), which in `cjm serve` also answers tracking calls.
REFRESH_CHUNK = 500
HASHED_PER_YIELD = 50


def identity_digest(traits: Mapping[str, Any], region: str | None) -> str:
    """What a lead's rows depend on, in 32 hex digits: the region and its identity traits.
    Only text counts: normalising makes "" of anything else, as of a missing trait."""
    values = [region]
    for name in IDENTITY_TRAITS:
        value = traits.get(name)
        values.append(value if isinstance(value, str) else None)
    return hashlib.blake2b(orjson.dumps(values), digest_size=16).hexdigest()


Platform = Literal["meta", "google"]
# How each platform's row is made from a lead's traits and the default region.
ROWS: dict[Platform, Callable[[Mapping[str, Any], str | None], list[str]]] = {
    "meta": meta_row,
    "google": google_row,
}


def identity_rows(traits: Mapping[str, Any], region: str | None) -> dict[str, list[str]]:
    """The lead's row in each platform's export."""
    meta, google = both_rows(traits, region)
    return {"meta": meta, "google": google}


def exported_row(member: Member, platform: Platform, region: str | None) -> list[str]:
    """The member's row in `platform`'s export: kept at erasure, stored by the audience
    job if it still holds for the traits and region, else worked out now."""
    if member.erased:
        return member.erased[platform]
    if member.hashed is not None and member.hashed_digest == identity_digest(member.traits, region):
        return member.hashed[platform]
    return ROWS[platform](member.traits, region)


async def refresh_identities(db: Database, lead_ids: Collection[int], region: str | None) -> int:
    """Store the rows of those leads whose stored ones are missing or stale; returns how
    many were worked out. Erased leads are left alone: their exports carry the rows kept
    at erasure. Two processes refreshing one lead at once store the same rows, or each
    the rows of the traits it read, under their digest: an export checks which."""
    refreshed = 0
    for part in chunks(sorted(lead_ids), REFRESH_CHUNK):
        async with db.read() as connection:
            found = list(
                await connection.execute(
                    select(leads.c.id, leads.c.traits, audience_identities.c.digest)
                    .outerjoin(audience_identities, audience_identities.c.lead_id == leads.c.id)
                    .where(among(connection, leads.c.id, part), leads.c.erased_at.is_(None))
                )
            )
        stale = []
        for number, (lead_id, traits, stored) in enumerate(found, start=1):
            if number % HASHED_PER_YIELD == 0:
                await asyncio.sleep(0)
            digest = identity_digest(traits, region)
            if digest != stored:
                rows = identity_rows(traits, region)
                stale.append({"lead_id": lead_id, "digest": digest, "rows": rows})
        if stale:
            async with db.write() as connection:
                statement = upsert(connection, audience_identities)
                await connection.execute(
                    statement.on_conflict_do_update(
                        index_elements=["lead_id"],
                        set_={
                            "digest": statement.excluded.digest,
                            "rows": statement.excluded.rows,
                        },
                    ),
                    stale,
                )
            refreshed += len(stale)
    return refreshed
