"""Editing a journey: leads keep the map they entered unless their stage lives on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from engine.clock import ManualClock
from engine.db.schema import enrollments
from engine.journey import JourneyErrors, JourneySet
from tests.worker.conftest import FUNNEL, START, Engine, start_engine, write_funnel

CATALOG = {"path": "/catalog/steel"}

OTHER = """\
id: other
name: Another journey
entry: {on: page, where: {properties.path: {startswith: /shop}}}
stages:
  - {id: only, phase: awareness}
"""

# Version 2: `visitor` is renamed `browsing`, and retargeting gives up after 7 days.
FUNNEL_V2 = (
    FUNNEL.replace("version: 1", "version: 2")
    .replace("- id: visitor", "- id: browsing")
    .replace("{after: 14d, to: lost}", "{after: 7d, to: lost}")
)


@asynccontextmanager
async def running(
    database_url: str, journeys: JourneySet, clock: ManualClock
) -> AsyncIterator[Engine]:
    runtime = await start_engine(database_url, journeys, clock)
    try:
        yield Engine(runtime, clock)
    finally:
        await runtime.stop()


async def _versions(engine: Engine, lead: int) -> list[tuple[str, int]]:
    return [(row.stage, row.version) for row in await engine.rows(enrollments, lead_id=lead)]


async def test_lead_moves_to_new_version_when_its_stage_still_exists(
    database_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(START)
    async with running(database_url, write_funnel(tmp_path), clock) as engine:
        await engine.send("page", anonymousId="a1", properties=CATALOG)
        await engine.run()
        await engine.run(timedelta(hours=2))  # now in retarget, lost after 14 days
        lead = await engine.lead_id(anonymous_id="a1")

    async with running(database_url, write_funnel(tmp_path, FUNNEL_V2), clock) as engine:
        await engine.run()
        assert await _versions(engine, lead) == [("retarget", 2)]
        await engine.run(timedelta(days=7))
        assert await engine.stages(lead) == [("lost", "completed")]
        assert ("retarget", "retarget", "version") in await engine.history(lead)


async def test_lead_keeps_the_old_version_when_its_stage_is_gone(
    database_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(START)
    async with running(database_url, write_funnel(tmp_path), clock) as engine:
        await engine.send("page", anonymousId="a1", properties=CATALOG)
        await engine.run()
        lead = await engine.lead_id(anonymous_id="a1")

    async with running(database_url, write_funnel(tmp_path, FUNNEL_V2), clock) as engine:
        await engine.run()
        assert await _versions(engine, lead) == [("visitor", 1)]
        # The old map's timeout still runs, into a stage the new map has: it moves on.
        await engine.run(timedelta(hours=2))
        assert await _versions(engine, lead) == [("retarget", 2)]

        await engine.send("page", anonymousId="b1", properties=CATALOG)
        await engine.run()
        newcomer = await engine.lead_id(anonymous_id="b1")
        assert await _versions(engine, newcomer) == [("browsing", 2)]


async def test_changed_journey_under_the_same_version_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(START)
    async with running(database_url, write_funnel(tmp_path), clock):
        pass
    changed = write_funnel(tmp_path, FUNNEL.replace("after: 2h", "after: 3h"))

    with pytest.raises(JourneyErrors, match="raise `version` to publish the change"):
        await start_engine(database_url, changed, clock)


async def test_file_older_than_the_running_version_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(START)
    async with running(database_url, write_funnel(tmp_path, FUNNEL_V2), clock):
        pass

    with pytest.raises(JourneyErrors, match="is at version 2 in the database"):
        await start_engine(database_url, write_funnel(tmp_path), clock)


async def test_journey_removed_from_the_files_lets_its_leads_finish_but_takes_no_one_new(
    database_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(START)
    async with running(database_url, write_funnel(tmp_path), clock) as engine:
        await engine.send("page", anonymousId="a1", properties=CATALOG)
        await engine.run()
        lead = await engine.lead_id(anonymous_id="a1")

    async with running(database_url, write_funnel(tmp_path, OTHER), clock) as engine:
        await engine.run(timedelta(hours=2))
        assert await engine.stages(lead) == [("retarget", "active")]
        await engine.send("page", anonymousId="b1", properties=CATALOG)
        await engine.run()
        assert await engine.stages(await engine.lead_id(anonymous_id="b1")) == []


async def test_an_older_process_leaves_runs_on_a_newer_version_alone(
    database_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(START)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    async with (
        running(database_url, write_funnel(tmp_path / "v1"), clock) as old,
        running(database_url, write_funnel(tmp_path / "v2", FUNNEL_V2), clock) as new,
    ):
        await new.send("page", anonymousId="b1", properties=CATALOG)
        await new.run()
        lead = await new.lead_id(anonymous_id="b1")

        # Its next event is claimed by a process still on version 1 (a rolling deploy).
        await old.send("page", anonymousId="b1", properties={"path": "/landing/x"})
        await old.run()
        assert await _versions(old, lead) == [("browsing", 2)]
        assert await old.pending_events() == 1

        # A lead of version 1, moved to version 2 by the new process, stays there.
        await old.send("page", anonymousId="c1", properties=CATALOG)
        await old.run()
        await old.run(timedelta(hours=2))
        await new.run()
        await old.send("page", anonymousId="c1", properties={"path": "/about"})
        await old.run()
        c1 = await old.lead_id(anonymous_id="c1")
        assert await _versions(old, c1) == [("retarget", 2)]

        await new.run()
        assert await new.pending_events() == 0
        assert await _versions(new, lead) == [("interested", 2)]
