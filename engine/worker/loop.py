"""The worker's schedule: events as they arrive, timers as they fall due.

Events: a loop that processes full batches while there are any, then waits for the
inbox to say something was committed in this process (instant on the embedded SQLite
setup) or for a short poll interval (other API processes on PostgreSQL), and lets
events gather for a few milliseconds before the next batch.
On PostgreSQL a second lane takes batches beside the first while there is a backlog:
one batch's statements run in the database while the other's leads run through the
machine here, where one lane leaves each side idle while the other works
(bench/README.md: ingest to stage 1.2 times as fast). Lanes claim different leads
(SKIP LOCKED), as separate workers do. SQLite has one writer, so one lane.
Timers: APScheduler's interval job sweeps due timers a few times a second, so a
timeout fires well within a second of its due time. The timers themselves are rows
(millions cost disk, not memory); APScheduler only runs the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from engine.scheduling import start_periodic
from engine.worker.processor import Processor

log = logging.getLogger("cjm.worker")

SWEEP_INTERVAL_S = 0.2
IDLE_POLL_S = 0.2
GATHER_S = 0.02
ERROR_BACKOFF_S = 1.0
# Batches of events in flight at once on PostgreSQL. Two keep both sides busy; a third
# measured no faster, and holds one more connection.
POSTGRES_EVENT_LANES = 2


class Worker:
    def __init__(self, processor: Processor, *, event_lanes: int | None = None) -> None:
        """`event_lanes`: batches of events in flight at once; by default one on SQLite,
        POSTGRES_EVENT_LANES on PostgreSQL."""
        if event_lanes is None:
            event_lanes = 1 if processor.db.is_sqlite else POSTGRES_EVENT_LANES
        if event_lanes < 1:
            raise ValueError(f"a worker needs at least one lane, not {event_lanes}")
        self.processor = processor
        self._lanes = [processor] + [processor.another_lane() for _ in range(event_lanes - 1)]
        self._wakeups = [asyncio.Event() for _ in self._lanes]
        self._tasks: list[asyncio.Task[None]] = []
        self._scheduler: AsyncIOScheduler | None = None
        self._old_versions_left = True
        self._sweeping = asyncio.Lock()  # held by a running sweep; stop() waits for it

    def wake(self) -> None:
        """Something was committed to the inbox: look now rather than at the next poll.
        The first lane looks; it wakes the next one when it finds a full batch."""
        self._wakeups[0].set()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._process_events(lane), name=f"cjm-events-{lane}")
            for lane in range(len(self._lanes))
        ]
        self._scheduler = start_periodic([("timer-sweep", self.sweep)], SWEEP_INTERVAL_S)

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            async with self._sweeping:
                pass  # a sweep under way finishes before the database is closed
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def sweep(self) -> None:
        """Fire every due timer (and move leads off older map versions), batch by batch."""
        async with self._sweeping:
            try:
                while await self.processor.process_due_timers():
                    pass
                if self._old_versions_left:
                    self._old_versions_left = await self.processor.process_old_versions() > 0
            except asyncio.CancelledError:
                return  # the process is stopping: the next start sweeps again
            except Exception:
                log.exception("timer sweep failed; retrying at the next sweep")

    async def drain(self) -> None:
        """Process until nothing is pending or due: for tests and one-shot runs."""
        while (
            await self.processor.process_events()
            + await self.processor.process_due_timers()
            + await self.processor.process_old_versions()
        ):
            pass

    async def _process_events(self, lane: int) -> None:
        """The first lane polls for events. A further lane sleeps until the lane before it
        finds a full batch (a backlog), then works until its own batch is not full. When
        a batch fails, the first lane retries; a further one goes back to sleep, rather
        than fail (and log) beside it each round, say while the database is away."""
        processor = self._lanes[lane]
        wakeup = self._wakeups[lane]
        next_lane = self._wakeups[lane + 1] if lane + 1 < len(self._lanes) else None
        backlog = False
        while True:
            if lane and not backlog:
                await wakeup.wait()
            announced = wakeup.is_set()
            wakeup.clear()
            backlog = False
            try:
                processed = await processor.process_events(announced=announced)
            except Exception:
                then = "the first lane retries" if lane else "retrying"
                log.exception("event processing failed (lane %d); %s", lane, then)
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            if processed and processor.last_batch_full:
                backlog = True  # more is waiting
                if next_lane is not None:
                    next_lane.set()
                continue
            if lane:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), IDLE_POLL_S)
            # Let what is arriving gather for a moment: under load, one batch of many
            # leads costs far less than many batches of a few (each batch is one
            # transaction on the database's one writer, shared with ingestion).
            await asyncio.sleep(GATHER_S)
