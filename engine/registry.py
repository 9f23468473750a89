"""Publishing journey versions: the files a process loads, checked against what already runs.

Every version that ever ran is stored with its source text, so that leads on an old
version keep running on the map they entered even after the files move on. A
changed file must raise its `version`: two different maps under one version would
make histories unreadable. A journey gone from the files is retired: its leads
finish, nobody new enters.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.database import Database
from engine.db.queries import upsert
from engine.db.schema import journey_versions
from engine.journey import JourneyError, JourneyErrors, JourneySet, load_journey_text
from engine.journey.model import Journey
from engine.machine.book import JourneyBook


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def publish(db: Database, journeys: JourneySet, now: datetime) -> JourneyBook:
    """Store the new versions among `journeys` and return the book of all versions in use."""
    async with db.write() as connection:
        await _store_new_versions(connection, journeys, now)
        return await _book(connection, journeys)


async def _store_new_versions(
    connection: AsyncConnection, journeys: JourneySet, now: datetime
) -> None:
    stored = {
        (row.journey_id, row.version): row.checksum
        for row in await connection.execute(
            select(
                journey_versions.c.journey_id,
                journey_versions.c.version,
                journey_versions.c.checksum,
            )
        )
    }
    latest: dict[str, int] = {}
    for journey_id, version in stored:
        latest[journey_id] = max(version, latest.get(journey_id, 0))
    errors: list[JourneyError] = []
    new_rows = []
    for source in journeys.sources:
        journey = source.journey
        digest = checksum(source.text)
        running = stored.get((journey.id, journey.version))
        if journey.version < latest.get(journey.id, 0):
            errors.append(
                JourneyError(
                    source.path,
                    1,
                    f"journey '{journey.id}' is at version {latest[journey.id]} in the database; "
                    f"this file has version {journey.version}: update the file",
                )
            )
        elif running is not None and running != digest:
            errors.append(
                JourneyError(
                    source.path,
                    1,
                    f"journey '{journey.id}' version {journey.version} differs from the "
                    f"version {journey.version} already running: raise `version` to publish "
                    "the change",
                )
            )
        elif running is None:
            new_rows.append(
                {
                    "journey_id": journey.id,
                    "version": journey.version,
                    "checksum": digest,
                    "source": source.text,
                    "path": str(source.path),
                    "loaded_at": now,
                }
            )
    if errors:
        raise JourneyErrors(errors)
    if new_rows:
        # Another process starting at the same moment may publish the same rows.
        await connection.execute(
            upsert(connection, journey_versions).on_conflict_do_nothing(), new_rows
        )


async def _book(connection: AsyncConnection, journeys: JourneySet) -> JourneyBook:
    current: dict[str, Journey] = {journey.id: journey for journey in journeys}
    versions: dict[tuple[str, int], Journey] = {(j.id, j.version): j for j in journeys}
    retired: set[str] = set()
    rows = await connection.execute(
        select(
            journey_versions.c.journey_id,
            journey_versions.c.version,
            journey_versions.c.source,
            journey_versions.c.path,
        ).order_by(journey_versions.c.journey_id, journey_versions.c.version)
    )
    for row in rows:
        key = (row.journey_id, row.version)
        if key in versions:
            continue
        # An old version is read for its structure only: its templates may be gone.
        journey = load_journey_text(row.source, Path(row.path))
        versions[key] = journey
        if row.journey_id not in journeys:
            current[row.journey_id] = journey  # rows come in version order: the last wins
            retired.add(row.journey_id)
    return JourneyBook(current, versions, frozenset(retired))
