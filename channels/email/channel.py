"""The email channel of one process: dispatching from the outbox, walking sequences and
sending, on a schedule. It also grants and expires offers, since emails show them:
codes are granted in the dispatch that queues the emails of the same step, before them,
so the first email of a stage that grants an offer already shows its code.

Every process running a worker runs one; they share the work through the database
(claims skip each other's rows), never through memory. APScheduler only paces the
jobs; what is due is decided by the `emails` and `sequence_runs` rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.ext.asyncio import AsyncConnection

from channels.email.links import Links
from channels.email.outbox import dispatch
from channels.email.pacing import FrequencyCap, load_zone
from channels.email.sender import Sender
from channels.email.sequences import advance_sequences, dispatch_sequences
from channels.email.templates import EmailTemplates
from channels.email.transport import EmlDirectory, SmtpTransport, Transport
from channels.offers.store import expire_offers, grant_offers
from engine.clock import Clock
from engine.config import Settings
from engine.db.database import Database
from engine.machine.book import JourneyBook
from engine.scheduling import start_periodic

log = logging.getLogger("cjm.email")

# One kind of dispatch work, in a write transaction at `now`; returns how much it did.
Dispatcher = Callable[[AsyncConnection, datetime], Awaitable[int]]

INTERVAL_S = 0.5
# The embedded default when no SMTP server is configured.
EML_DIRECTORY = Path("var/outbox")


class EmailChannel:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        clock: Clock,
        book: JourneyBook,
        links: Links,
        eml_directory: Path = EML_DIRECTORY,
    ) -> None:
        self.db = db
        self.clock = clock
        self.transport: Transport = (
            SmtpTransport(settings.smtp_url) if settings.smtp_url else EmlDirectory(eml_directory)
        )
        self.sender = Sender(
            db=db,
            clock=clock,
            book=book,
            links=links,
            templates=EmailTemplates(settings.templates_dir),
            transport=self.transport,
            sender=settings.email_from,
            cap=FrequencyCap.parse(settings.frequency_cap) if settings.frequency_cap else None,
            zone=load_zone(settings.default_timezone),
        )
        self.book = book
        self._scheduler: AsyncIOScheduler | None = None
        # Held by a running job, so that stop() lets it finish before the database closes.
        self._dispatching = asyncio.Lock()
        self._sending = asyncio.Lock()
        # In this order: codes first, so an email queued in the same step shows its code.
        self._dispatchers: list[tuple[str, Dispatcher]] = [
            ("granting offers", lambda c, now: grant_offers(c, book, now)),
            ("expiring offers", expire_offers),
            ("queueing emails", dispatch),
            ("starting and stopping sequences", dispatch_sequences),
            ("advancing sequences", lambda c, now: advance_sequences(c, book, now)),
        ]

    async def start(self) -> None:
        # Dispatching also walks the sequences: both turn decisions into emails to send.
        self._scheduler = start_periodic(
            [("email-dispatch", self._dispatch_job), ("email-send", self._send_job)], INTERVAL_S
        )

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            async with self._dispatching, self._sending:
                pass
        await self.transport.close()

    async def run_once(self) -> None:
        """Dispatch, walk sequences and send until nothing more is due now: for tests and
        one-shot runs."""
        while await self.dispatch_all() + await self.send_all():
            pass

    async def dispatch_all(self) -> int:
        """Grant and expire offers, queue the emails of pending effects and of due
        sequence steps; returns how many were handled. Each kind of work commits on its
        own, so one that fails (and is logged) never holds the others up."""
        handled = 0
        async with self._dispatching:
            while True:
                done = 0
                for name, work in self._dispatchers:
                    try:
                        async with self.db.write() as connection:
                            done += await work(connection, self.clock.now())
                    except Exception:
                        log.exception("%s failed; retrying at the next run", name)
                if not done:
                    return handled
                handled += done

    async def send_all(self) -> int:
        async with self._sending:
            return await self.sender.send_all_due()

    async def _dispatch_job(self) -> None:
        try:
            await self.dispatch_all()
        except Exception:
            log.exception("email dispatch failed; retrying at the next run")

    async def _send_job(self) -> None:
        try:
            await self.send_all()
        except Exception:
            log.exception("email sending failed; retrying at the next run")
