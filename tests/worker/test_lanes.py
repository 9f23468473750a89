"""The worker's lanes: on PostgreSQL a second batch of events is under way while the
first is in the database; on SQLite, with its one writer, never."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from datetime import datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db import queries
from engine.worker.loop import Worker
from engine.worker.processor import Processor
from tests.worker.conftest import Engine

CATALOG = {"path": "/catalog/steel"}
LEADS = 15
BATCH = 5  # three full batches: the first lane wakes the second after its first
# How long a batch waits inside its transaction for another batch to join it.
OVERLAP_WAIT_S = 0.5
DEADLINE_S = 30


class Overlaps:
    """An event hook, run inside each batch's transaction, that holds the batch until a
    second one is inside its own (or OVERLAP_WAIT_S has passed) and counts how many
    were inside at once."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.batches = 0
        self._joined = asyncio.Event()

    async def __call__(
        self, _connection: AsyncConnection, _events: Sequence[queries.EventRow], _now: datetime
    ) -> None:
        self.batches += 1
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        if self.inside > 1:
            self._joined.set()
        try:
            if not self._joined.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._joined.wait(), OVERLAP_WAIT_S)
        finally:
            self.inside -= 1


async def test_a_second_batch_runs_beside_the_first_on_postgres_only(engine: Engine) -> None:
    for number in range(LEADS):
        await engine.send("page", anonymousId=f"a{number}", properties=CATALOG)
    runtime = engine.runtime
    overlaps = Overlaps()
    worker = Worker(
        Processor(runtime.db, runtime.book, engine.clock, batch_leads=BATCH, event_hooks=[overlaps])
    )
    await worker.start()
    try:
        worker.wake()
        deadline = time.monotonic() + DEADLINE_S
        while await engine.pending_events():
            assert time.monotonic() < deadline, "the worker left events pending"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()

    assert overlaps.most_inside == (1 if runtime.db.is_sqlite else 2)
    assert overlaps.batches == LEADS // BATCH
    # Each lead's one event applied once, by whichever lane claimed it.
    for number in range(LEADS):
        lead = await engine.lead_id(anonymous_id=f"a{number}")
        assert await engine.history(lead) == [(None, "visitor", "entry")]


async def test_a_worker_needs_a_lane(engine: Engine) -> None:
    runtime = engine.runtime
    with pytest.raises(ValueError, match="at least one lane"):
        Worker(Processor(runtime.db, runtime.book, engine.clock), event_lanes=0)
