"""The worker's lanes: on PostgreSQL a second batch of events is under way while the
first is in the database; on SQLite, with its one writer, one lane."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db import queries
from engine.worker import loop
from engine.worker.loop import Worker
from engine.worker.processor import Processor
from tests.worker.conftest import Engine

CATALOG = {"path": "/catalog/steel"}
LEADS = 15
BATCH = 5  # three full batches: the first lane wakes the second after its first
# How long a batch waits inside its transaction for a second batch to join it; the
# second lane reaches its own in a fraction of a second.
JOIN_WAIT_S = 10.0
DEADLINE_S = 60


class Overlaps:
    """An event hook, run inside each batch's transaction, that holds the batch until a
    second one is inside its own (or JOIN_WAIT_S has passed) and notes how many were
    inside at once. Not the first batch: the second lane wakes only once the first lane
    found a full batch, so the first batch never has company."""

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
            if self.batches > 1 and not self._joined.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._joined.wait(), JOIN_WAIT_S)
        finally:
            self.inside -= 1


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_second_batch_runs_beside_the_first(engine: Engine) -> None:
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

    assert overlaps.most_inside == 2
    assert overlaps.batches == LEADS // BATCH
    # Each lead's one event applied once, by whichever lane claimed it.
    for number in range(LEADS):
        lead = await engine.lead_id(anonymous_id=f"a{number}")
        assert await engine.history(lead) == [(None, "visitor", "entry")]


async def test_a_worker_runs_one_lane_on_sqlite_and_two_on_postgres(engine: Engine) -> None:
    """SQLite's one writer: a second lane would only queue behind the first, and shrink
    its batches as if the inbox waited."""
    runtime = engine.runtime
    worker = Worker(Processor(runtime.db, runtime.book, engine.clock))
    await worker.start()
    try:
        lanes = [task for task in asyncio.all_tasks() if task.get_name().startswith("cjm-events")]
    finally:
        await worker.stop()
    assert len(lanes) == (1 if runtime.db.is_sqlite else 2)


async def test_a_worker_needs_a_lane(engine: Engine) -> None:
    runtime = engine.runtime
    with pytest.raises(ValueError, match="at least one lane"):
        Worker(Processor(runtime.db, runtime.book, engine.clock), event_lanes=0)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_timer_batch_ending_inside_an_event_batch_leaves_it_full(engine: Engine) -> None:
    """The first lane shares its processor with the timer sweep. On PostgreSQL a timer
    batch can end while an event batch is under way; whether the event batch was full
    (more events wait) must still be the event batch's."""
    await engine.send("page", anonymousId="early", properties=CATALOG)
    await engine.run()  # enters `visitor`, 2h from its timeout
    engine.clock.advance(timedelta(hours=3))
    for number in range(3):
        await engine.send("page", anonymousId=f"a{number}", properties=CATALOG)
    runtime = engine.runtime
    timers_moved: list[int] = []
    swept = False

    async def run_the_sweep(
        _connection: AsyncConnection, _events: Sequence[queries.EventRow], _now: datetime
    ) -> None:
        nonlocal swept
        if not swept:  # once: the timer batch runs the hooks too
            swept = True
            timers_moved.append(await processor.process_due_timers())

    processor = Processor(
        runtime.db, runtime.book, engine.clock, batch_leads=2, event_hooks=[run_the_sweep]
    )
    assert await processor.process_events() == 2
    assert timers_moved == [1]  # a batch of one lead, not full
    assert processor.last_batch_full
    assert await processor.process_events() == 1
    assert not processor.last_batch_full


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_second_lane_that_fails_waits_for_the_first_to_find_a_backlog(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """While batches keep failing (the database away, a bug), the first lane retries
    each second; the second fails once and waits, not failing and logging beside it."""
    for number in range(LEADS):
        await engine.send("page", anonymousId=f"a{number}", properties=CATALOG)
    runtime = engine.runtime
    batches = 0

    async def fail_after_the_first(
        _connection: AsyncConnection, _events: Sequence[queries.EventRow], _now: datetime
    ) -> None:
        nonlocal batches
        batches += 1
        if batches > 1:  # the first, full, wakes the second lane
            raise RuntimeError("the batch fails")

    def failures(lane: int) -> int:
        return sum(f"(lane {lane})" in record.getMessage() for record in caplog.records)

    worker = Worker(
        Processor(
            runtime.db,
            runtime.book,
            engine.clock,
            batch_leads=BATCH,
            event_hooks=[fail_after_the_first],
        )
    )
    await worker.start()
    try:
        worker.wake()
        deadline = time.monotonic() + DEADLINE_S
        while failures(0) < 3:  # three rounds of the first lane, a second apart
            assert time.monotonic() < deadline, "the first lane stopped retrying"
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()

    assert failures(1) == 1
    assert await engine.pending_events() == LEADS - BATCH


class Recording(Processor):
    """A processor that notes, for each batch of events, whether the events were
    announced to it and how many leads it took."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[bool, int]] = []
        self.batch_done = asyncio.Event()

    async def process_events(self, *, announced: bool = False) -> int:
        taken = await super().process_events(announced=announced)
        self.batches.append((announced, taken))
        self.batch_done.set()
        return taken


async def test_events_the_inbox_announces_are_taken_as_announced(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a wake the first lane's batch is told that events wait (no look on a
    reader first); after a poll that timed out, it is not."""
    monkeypatch.setattr(loop, "IDLE_POLL_S", DEADLINE_S)  # only a wake ends the wait
    runtime = engine.runtime
    processor = Recording(runtime.db, runtime.book, engine.clock)
    worker = Worker(processor)
    await worker.start()
    try:
        async with asyncio.timeout(DEADLINE_S):
            await processor.batch_done.wait()  # the first poll, before anything was sent
            for number in range(3):
                await engine.send("page", anonymousId=f"a{number}", properties=CATALOG)
            processor.batch_done.clear()
            worker.wake()
            await processor.batch_done.wait()
    finally:
        await worker.stop()

    assert processor.batches == [(False, 0), (True, 3)]
    assert await engine.pending_events() == 0
