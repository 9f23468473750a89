"""The audience jobs of one process: numbering membership changes for the exports,
hashing the identifiers of the leads they concern ahead of the exports (identities.py),
and removing members whose audience `ttl` ran out. Every process running a worker runs
them; the database keeps them one at a time (see store.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from channels.audiences.identities import refresh_all_identities, refresh_identities
from channels.audiences.store import expire_members, number_changes
from engine.clock import Clock
from engine.db.database import Database
from engine.machine.book import JourneyBook
from engine.scheduling import start_periodic

log = logging.getLogger("cjm.audiences")

INTERVAL_S = 0.5


class AudienceChannel:
    def __init__(
        self, *, db: Database, clock: Clock, book: JourneyBook, region: str | None = None
    ) -> None:
        self.db = db
        self.clock = clock
        self.book = book
        self.region = region  # the default region the exports normalise phone numbers in
        self._scheduler: AsyncIOScheduler | None = None
        self._backfill: asyncio.Task[None] | None = None
        self._running = asyncio.Lock()  # held by a job, so stop() lets it finish

    async def start(self) -> None:
        self._scheduler = start_periodic([("audiences", self._job)], INTERVAL_S)
        self._backfill = asyncio.create_task(self._refresh_all(), name="cjm-audience-backfill")

    async def stop(self) -> None:
        if self._backfill is not None:
            self._backfill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backfill
            self._backfill = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            async with self._running:
                pass

    async def _refresh_all(self) -> None:
        """Members' rows missing or stale since the last run (an upgrade, another default
        region), worked out once in the background: exports are right without them, only
        slower."""
        try:
            refreshed = await refresh_all_identities(self.db, self.region)
        except Exception:
            log.exception("hashing members' identifiers ahead failed; exports work them out")
            return
        if refreshed:
            log.info("hashed the identifiers of %d audience members ahead", refreshed)

    async def run_once(self) -> None:
        """Expire what is due, number every change and hash the identifiers of the leads
        concerned: for tests and one-shot runs."""
        async with self._running:
            async with self.db.write() as connection:
                await expire_members(connection, self.book.current.values(), self.clock.now())
            while True:
                async with self.db.write() as connection:
                    numbered = await number_changes(connection)
                if not numbered:
                    return
                # Outside the numbering's transaction: it holds the change counter.
                await refresh_identities(self.db, set(numbered), self.region)

    async def _job(self) -> None:
        try:
            await self.run_once()
        except Exception:
            log.exception("audience upkeep failed; retrying at the next run")
