"""The worker's schedule: events as they arrive, timers as they fall due.

Events: a loop that processes full batches while there are any, then waits for the
inbox to say something was committed in this process (instant on the embedded SQLite
setup) or for a short poll interval (other API processes on PostgreSQL), and lets
events gather for a few milliseconds before the next batch.
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


class Worker:
    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._old_versions_left = True
        self._sweeping = asyncio.Lock()  # held by a running sweep; stop() waits for it

    def wake(self) -> None:
        """Something was committed to the inbox: look now rather than at the next poll."""
        self._wakeup.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._process_events(), name="cjm-events")
        self._scheduler = start_periodic([("timer-sweep", self.sweep)], SWEEP_INTERVAL_S)

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            async with self._sweeping:
                pass  # a sweep under way finishes before the database is closed
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

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

    async def _process_events(self) -> None:
        while True:
            self._wakeup.clear()
            try:
                processed = await self.processor.process_events()
            except Exception:
                log.exception("event processing failed; retrying")
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            if processed and self.processor.last_batch_full:
                continue  # a full batch: more is waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), IDLE_POLL_S)
            # Let what is arriving gather for a moment: under load, one batch of many
            # leads costs far less than many batches of a few (each batch is one
            # transaction on the database's one writer, shared with ingestion).
            await asyncio.sleep(GATHER_S)
