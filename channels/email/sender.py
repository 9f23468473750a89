"""The sender: claims due emails, sends them, records what happened to each.

An email is claimed by setting it to `sending` with a lease, committed before any
SMTP traffic, so no other sender (in this process or another) takes it meanwhile.
The lease is short and renewed while the batch is being sent, so a slow SMTP server
never outlasts it, yet the emails of a sender that died go out again within a minute.
An email is handed to the transport only while its lease has time left, and its
outcome is recorded only if the row is still `sending` under this sender's lease:
a sender that lost its lease cannot send it, overwrite or double-report a result.

If a process dies between handing a message to the SMTP server and recording it,
the row stays `sending` until the lease expires and the message is then sent again.
No protocol closes that gap (the server's acceptance and our commit cannot be one
transaction), so delivery is at-least-once at the SMTP edge and exactly-once
everywhere else: one row per idempotency key, one recorded outcome per row, one
internal event per outcome. The resent copy carries the same Message-ID as the
first (it is derived from the row), so a mailbox that already holds it drops it.

Sequence emails are paced when they are claimed: one due outside its sequence's
sending window (in the lead's timezone) or over the lead's frequency cap is
deferred to when it may go, without counting as an attempt. When an email of a
sequence is settled, its run moves on in the same transaction (see sequences.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import TemplateError
from sqlalchemy import and_, bindparam, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.selectable import TextualSelect

from channels.email.links import Links
from channels.email.message import OutgoingEmail, build_message, only_mailbox
from channels.email.pacing import FrequencyCap, lead_zone, next_opening
from channels.email.sequences import steps_settled
from channels.email.templates import EmailTemplates, OfferView
from channels.email.transport import PermanentFailure, TransientFailure, Transport
from channels.offers.store import GRANT, latest_offers
from engine.clock import Clock
from engine.db.database import Database, SqlConnection
from engine.db.hashing import hashed_address
from engine.db.queries import (
    OUTBOX_PENDING,
    among,
    chunks,
    execute_rows,
    insert_rows,
    micros,
    rows_for_ids,
    select_survivors,
)
from engine.db.schema import (
    EMAIL_QUEUE,
    emails,
    enrollments,
    leads,
    sequence_runs,
    suppressions,
)
from engine.ingest.internal import Fact, emit_all
from engine.journey.model import Window
from engine.kpis.rollup import bump_email, day_of
from engine.machine.book import JourneyBook
from engine.metrics import count_email

log = logging.getLogger("cjm.email")

QUEUED, SENDING, SENT, DEFERRED = "queued", "sending", "sent", "deferred"
FAILED, SUPPRESSED, SKIPPED = "failed", "suppressed", "skipped"

# Short, so a crashed sender's emails go out again soon after; renewed every
# RENEW_EVERY_S while the batch is being sent, so a slow SMTP server never outlasts it.
LEASE = timedelta(seconds=20)
RENEW_EVERY_S = 5.0
# An email is handed to the transport only with this much of its lease left: time
# enough for a renewal to land before it expires.
SEND_MARGIN = timedelta(seconds=5)
# Pauses between tries to record an outcome while the database is away: half a minute
# in all, enough for a restart; beyond it, the email goes out again once its lease expires.
RECORD_RETRIES_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
# How long a group of outcomes gathers before it is recorded, unless every email of
# the batch is in sooner. A transaction costs more than recording a few outcomes in it,
# and nothing waits on the record: each email's slot was freed when SMTP answered.
GROUP_LINGER_S = 0.02
MAX_ATTEMPTS = 8
FIRST_RETRY = timedelta(seconds=30)
LONGEST_RETRY = timedelta(hours=1)
# Spreads the retries of a burst that failed together (a server restart) apart.
JITTER = 0.2
BATCH = 100
CONCURRENCY = 8
NO_ADDRESS = "no email address"
OUTSIDE_WINDOW = "outside the sending window"
# The namespace of the PostgreSQL advisory locks that serialise counting a lead's sends.
CAP_LOCKS = 0x636A6D  # "cjm"


def retry_delay(attempts: int, rng: random.Random) -> timedelta:
    """The wait before the next try after `attempts` failed ones: doubling from 30 s,
    at most an hour, give or take 20%."""
    base: timedelta = min(FIRST_RETRY * 2**attempts, LONGEST_RETRY)
    return base * rng.uniform(1 - JITTER, 1 + JITTER)


@dataclass(frozen=True)
class Outcome:
    """What became of one try, as it is recorded."""

    status: str
    lead_id: int
    error: str | None = None
    to_address: str | None = None
    message_id: str | None = None
    retry_at: datetime | None = None
    event: str | None = None  # the internal event reporting it, if any
    suppress: bool = False  # the address bounced: never mail it again
    attempted: bool = False  # handed to the transport: counts as an attempt


@dataclass(frozen=True)
class _Batch:
    """A claimed batch: how many emails were due, those leased to be sent now (the rest
    were held back), the lease, and the leads the claim read."""

    due: int
    ready: list[Any]
    lease: Lease
    lead_rows: dict[int, Any]  # the survivors the claim read, by the id the emails name


# What the sender reads of a lead: its traits (the address, the timezone, what
# templates show).
LEAD_COLUMNS = (leads.c.traits,)


def _nothing() -> None:
    pass


def _ended_well(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


class Lease:
    """This sender's lease on one claimed batch: every value it has set `lease_until` to,
    the latest last. A row is still ours while it holds one of them (another sender's
    claim sets a value of its own, so it never matches)."""

    def __init__(self, until: datetime) -> None:
        self.values = [until]

    @property
    def until(self) -> datetime:
        return self.values[-1]

    def held(self) -> tuple[str, list[int | None]]:
        """Plain SQL saying a row still holds one of the lease's values, and its
        parameters: `lease_until IN (?, ...)`."""
        placeholders = ",".join("?" * len(self.values))
        return f"lease_until IN ({placeholders})", [micros(value) for value in self.values]


@dataclass(frozen=True)
class Held:
    """An email that may not go yet: deferred `until`, for `reason`."""

    id: int
    until: datetime
    reason: str


@dataclass(frozen=True)
class Addressee:
    """What composing one email needs from the database: the lead (the survivor, if it
    was merged), its address and whether that is suppressed, the version of the journey
    the email belongs to, and the offer code the lead holds in it."""

    lead_id: int
    traits: Mapping[str, Any]
    address: str | None
    suppressed: str | None  # why the address must not be mailed, if it must not
    version: int | None
    offer: Any | None


class Sender:
    """Sends what is due, `concurrency` emails at a time."""

    def __init__(
        self,
        *,
        db: Database,
        clock: Clock,
        book: JourneyBook,
        links: Links,
        templates: EmailTemplates,
        transport: Transport,
        sender: str,
        batch: int = BATCH,
        concurrency: int = CONCURRENCY,
        rng: random.Random | None = None,
        cap: FrequencyCap | None = None,
        zone: ZoneInfo | None = None,
        record_linger_s: float = GROUP_LINGER_S,
    ) -> None:
        self.db = db
        self.clock = clock
        self.book = book
        self.links = links
        self.templates = templates
        self.transport = transport
        self.sender = sender
        self.batch = batch
        # Settings.from_env refuses a sender that is no single address with its variable's
        # name; one given otherwise raises here, at start, rather than in every email.
        self._domain = only_mailbox(sender).domain
        self._slots = asyncio.Semaphore(concurrency)
        self._rng = rng or random.Random()
        self.cap = cap  # on sequence emails, across journeys
        self.zone = zone or ZoneInfo("UTC")  # for leads without a `timezone` trait
        self.record_linger_s = record_linger_s

    async def send_due(self) -> int:
        """Claim one batch of due emails and settle each; returns how many were due.

        Nurture emails outside their sequence's sending window, or over the lead's
        frequency cap, are deferred to when they may go instead of being sent."""
        batch = await self._claim()
        await self._send(batch)
        return batch.due

    async def send_all_due(self) -> int:
        """Send batch after batch until none is due; returns how many were due.

        The next batch is claimed as soon as every email of the current one has its slot
        to SMTP, while the last of them are still on their way: the connections do not
        idle while one batch ends and the next is claimed and read. The slots bound the
        emails in flight across the batches under way. A batch that fails stops the
        claiming, and is reported once every batch under way has ended.
        """
        due = 0
        sending: list[asyncio.Task[None]] = []
        try:
            while (batch := await self._claim()).due:
                due += batch.due
                all_in_slots = asyncio.Event()
                sending.append(asyncio.create_task(self._send(batch, all_in_slots.set)))
                waiting = asyncio.ensure_future(all_in_slots.wait())
                await asyncio.wait((sending[-1], waiting), return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                # Those ended well are let go: a long run must not keep every batch's rows.
                sending = [task for task in sending if not _ended_well(task)]
                if any(task.done() for task in sending):
                    break  # one failed
        except asyncio.CancelledError:
            for task in sending:
                task.cancel()
            raise
        finally:
            ended = await asyncio.gather(*sending, return_exceptions=True)
        for outcome in ended:
            if isinstance(outcome, BaseException):
                raise outcome
        return due

    async def _claim(self) -> _Batch:
        """Lease the next batch of due emails (holding back those that must wait)."""
        now = self.clock.now()
        lease = Lease(now + LEASE)
        async with self.db.write() as connection:
            due = await select_due_emails(connection, now, self.batch)
            ready, held, lead_rows = await self._pace(connection, due, now)
            await lease_emails(connection, [email.id for email in ready], lease.until, now)
            await hold_emails(connection, held, now)
        return _Batch(len(due), ready, lease, lead_rows)

    async def _send(self, batch: _Batch, all_in_slots: Callable[[], None] = _nothing) -> None:
        """Settle every email of `batch`; `all_in_slots` is called once each has taken its
        slot to SMTP (or needed none)."""
        ready, lease = batch.ready, batch.lease
        if not ready:
            all_in_slots()
            return
        addressees = await self._addressees(ready, batch.lead_rows)
        unsettled = {email.id for email in ready}
        outcomes = GroupCommit(
            lambda group: self._record_all(group, lease), len(ready), self.record_linger_s
        )
        without_slot = len(ready)

        def slot_taken() -> None:
            nonlocal without_slot
            without_slot -= 1
            if not without_slot:
                all_in_slots()

        renewing = asyncio.create_task(self._renew(lease, unsettled))
        try:
            await asyncio.gather(
                *(
                    self._settle(
                        email, addressees.get(email.id), lease, unsettled, outcomes, slot_taken
                    )
                    for email in ready
                )
            )
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            await outcomes.flushed()

    async def _addressees(self, ready: list[Any], known: Mapping[int, Any]) -> dict[int, Addressee]:
        """What composing each email needs, by email id (none for an email whose lead
        is gone): read for the whole batch at once, just after it was claimed. `known`
        holds the leads the claim read already (`_pace`), by the id the emails name."""
        async with self.db.read() as connection:
            survivors = {**known}
            unknown = {email.lead_id for email in ready} - known.keys()
            if unknown:
                survivors |= await select_survivors(connection, unknown, LEAD_COLUMNS)
            addresses = {lead.id: _address(lead.traits) for lead in survivors.values()}
            reasons = await select_suppressions(
                connection, {address.lower() for address in addresses.values() if address}
            )
            versions = await select_enrollment_versions(
                connection, {email.enrollment_id for email in ready if email.enrollment_id}
            )
            offers = await latest_offers(
                connection,
                {
                    (survivors[email.lead_id].id, email.journey_id)
                    for email in ready
                    if email.lead_id in survivors
                },
            )
        found: dict[int, Addressee] = {}
        for email in ready:
            lead = survivors.get(email.lead_id)
            if lead is None:
                continue
            address = addresses[lead.id]
            found[email.id] = Addressee(
                lead_id=lead.id,
                traits=lead.traits,
                address=address,
                suppressed=reasons.get(address.lower()) if address else None,
                version=versions.get(email.enrollment_id),
                offer=offers.get((lead.id, email.journey_id)),
            )
        return found

    async def _renew(self, lease: Lease, unsettled: set[int]) -> None:
        """Extend the lease of the batch's emails not settled yet, until cancelled."""
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            if not unsettled:
                continue
            now = self.clock.now()
            until = now + LEASE
            # Known before the commit, so an outcome recorded meanwhile still matches.
            lease.values.append(until)
            try:
                async with self.db.write() as connection:
                    await renew_lease(connection, list(unsettled), lease.values, until, now)
            except Exception:
                # The emails keep the lease they had; the next renewal tries again.
                log.exception("renewing the lease of %d emails failed", len(unsettled))

    async def _pace(
        self, connection: AsyncConnection, due: list[Any], now: datetime
    ) -> tuple[list[Any], list[Held], dict[int, Any]]:
        """Split due emails into those that go now and those held for later, and give
        the leads read to decide (their survivors, by the id the emails name). Only
        sequence emails are paced: a single `email.send` answers something the lead
        just did (an order, a sign-up) and goes at once."""
        nurture = [email for email in due if email.sequence_run_id is not None]
        if not nurture:
            return due, [], {}
        lead_ids = {email.lead_id for email in nurture}
        windows = {email.id: self._window(email) for email in nurture}
        lead_rows: dict[int, Any] = {}
        zones: dict[int, ZoneInfo] = {}
        if any(windows.values()):
            lead_rows = await select_survivors(connection, lead_ids, LEAD_COLUMNS)
            zones = {
                lead_id: lead_zone(lead.traits.get("timezone"), self.zone)
                for lead_id, lead in lead_rows.items()
            }
        recent: dict[int, list[datetime]] = {}
        if self.cap is not None:
            await lock_leads_for_cap(connection, lead_ids)
            recent = await select_capped_sends(connection, lead_ids, now - self.cap.period, now)
        ready: list[Any] = []
        held: list[Held] = []
        for email in due:
            if email.sequence_run_id is None:
                ready.append(email)
                continue
            window = windows[email.id]
            if window is not None:
                opening = next_opening(window, zones.get(email.lead_id, self.zone), now)
                if opening > now:
                    held.append(Held(email.id, opening, OUTSIDE_WINDOW))
                    continue
            if self.cap is not None:
                sends = recent.setdefault(email.lead_id, [])
                allowed = self.cap.next_allowed(sends, now)
                if allowed is not None:
                    held.append(Held(email.id, allowed, f"frequency cap {self.cap}"))
                    continue
                sends.append(now)
            ready.append(email)
        return ready, held, lead_rows

    def _window(self, email: Any) -> Window | None:
        journey = self.book.versions.get((email.journey_id, email.run_version))
        sequence = journey.sequences.get(email.sequence) if journey is not None else None
        return sequence.window if sequence is not None else None

    async def _settle(
        self,
        email: Any,
        addressee: Addressee | None,
        lease: Lease,
        unsettled: set[int],
        outcomes: GroupCommit,
        slot_taken: Callable[[], None],
    ) -> None:
        handed_in = False
        try:
            async with self._slots:  # bounds the emails on their way to SMTP, not the records
                slot_taken()
                if self.clock.now() + SEND_MARGIN >= lease.until:
                    # Waited for a slot until the lease (no longer renewed) is nearly
                    # over: another sender may take it any moment, so leave it to them.
                    log.warning("email %s: lease nearly expired, left for later", email.id)
                    return
                outcome = await self._attempt(email, addressee)
            handed_in = True
            await outcomes.record(email, outcome)
        except Exception:
            # The row keeps its lease and is tried again when it expires.
            log.exception("email %s: sending failed", email.id)
        finally:
            unsettled.discard(email.id)
            if not handed_in:
                outcomes.none_from(email)

    async def _record_all(self, group: list[tuple[Any, Outcome]], lease: Lease) -> None:
        """Record a group of outcomes in one transaction; if that fails, each on its own,
        so that one that cannot be recorded holds up no other."""
        try:
            await self._record(group, lease)
            return
        except Exception as error:
            if len(group) == 1:
                log.warning("recording the outcome of email %s failed (%s)", group[0][0].id, error)
            else:
                log.warning("recording %d outcomes together failed (%s)", len(group), error)
        await asyncio.gather(
            *(self._record_despite_outages(email, lease, outcome) for email, outcome in group)
        )

    async def _record_despite_outages(self, email: Any, lease: Lease, outcome: Outcome) -> None:
        """Record `outcome`, waiting out a database that is away for a moment (a restart,
        a failover): once the SMTP server has the message, an outcome not recorded means
        the email goes out again when its lease expires. Recording after the lease expired
        is still right as long as no other sender took the email meanwhile."""
        for pause in (*RECORD_RETRIES_S, None):
            try:
                await self._record([(email, outcome)], lease)
                return
            except Exception as error:
                if pause is None:
                    log.exception("email %s: recording %s failed", email.id, outcome.status)
                    return
                log.warning(
                    "email %s: recording %s failed (%s); trying again in %.1f s",
                    email.id,
                    outcome.status,
                    error,
                    pause,
                )
                await asyncio.sleep(pause)

    async def _attempt(self, email: Any, addressee: Addressee | None) -> Outcome:
        if addressee is None or addressee.address is None:
            lead_id = addressee.lead_id if addressee is not None else email.lead_id
            return Outcome(SKIPPED, lead_id, error=NO_ADDRESS)
        lead_id, address = addressee.lead_id, addressee.address
        if addressee.suppressed is not None:
            return Outcome(
                SUPPRESSED, lead_id, error=f"address suppressed ({addressee.suppressed})"
            )
        try:
            message = self._compose(
                email, lead_id, addressee.traits, address, addressee.version, addressee.offer
            )
        except (TemplateError, ValueError) as error:  # a header with a line break is a ValueError
            error_text = f"cannot render: {error}"
            return Outcome(
                FAILED, lead_id, error=error_text, to_address=address, event="email.failed"
            )
        try:
            await self.transport.send(message)
        except TransientFailure as error:
            return self._after_transient(email, lead_id, address, error.reason)
        except PermanentFailure as error:
            bounced = error.recipient_refused
            return Outcome(
                FAILED,
                lead_id,
                error=str(error),
                to_address=address,
                event="email.bounced" if bounced else "email.failed",
                suppress=bounced,
                attempted=True,
            )
        return Outcome(
            SENT,
            lead_id,
            to_address=address,
            message_id=message.message_id,
            event="email.sent",
            attempted=True,
        )

    def _after_transient(self, email: Any, lead_id: int, address: str, reason: str) -> Outcome:
        """Deferred with backoff, or failed for good once the attempts are used up."""
        if email.attempts + 1 >= MAX_ATTEMPTS:
            return Outcome(
                FAILED,
                lead_id,
                error=f"gave up after {MAX_ATTEMPTS} attempts: {reason}",
                to_address=address,
                event="email.failed",
                attempted=True,
            )
        return Outcome(
            DEFERRED,
            lead_id,
            error=reason,
            to_address=address,
            retry_at=self.clock.now() + retry_delay(email.attempts, self._rng),
            attempted=True,
        )

    def _compose(
        self,
        email: Any,
        lead_id: int,
        traits: Mapping[str, Any],
        address: str,
        version: int | None,
        offer: Any | None,
    ) -> OutgoingEmail:
        journey = self.book.versions.get((email.journey_id, version or 0)) or self.book.current.get(
            email.journey_id
        )
        stage = journey.stage_by_id.get(email.stage or "") if journey is not None else None
        terms = journey.offers.get(offer.offer) if journey is not None and offer else None
        unsubscribe_url = self.links.unsubscribe(email.id, lead_id)
        rendered = self.templates.render(
            email.template,
            lead=traits,
            offer=(
                OfferView(code=offer.code, title=terms.title, expires_at=offer.expires_at)
                if offer is not None and terms is not None
                else None
            ),
            journey=(email.journey_id, journey.name if journey is not None else email.journey_id),
            stage=(email.stage or "", stage.title if stage is not None else email.stage or ""),
            unsubscribe_url=unsubscribe_url,
        )
        return build_message(
            rendered,
            sender=self.sender,
            to=address,
            # Every try of this email carries the same Message-ID, so a copy resent after
            # a crash (the first was delivered but not recorded) is one the mailbox drops.
            message_id=stable_message_id(email, self._domain),
            unsubscribe_url=unsubscribe_url,
            click_url=lambda url: self.links.click(email.id, lead_id, url),
            open_pixel_url=self.links.open_pixel(email.id, lead_id),
            now=self.clock.now(),
        )

    async def _record(self, group: list[tuple[Any, Outcome]], lease: Lease) -> None:
        """Record each outcome of `group` whose email is still ours, in one transaction:
        the email's row, its run's next step, a bounced address, the internal event, and
        last the KPI counts. All of it plain SQL, so on SQLite the transaction runs whole
        in the driver's thread (`Database.write_sql`): a group is a handful of emails,
        and a statement's trip through SQLAlchemy and the event loop cost more than the
        statement."""
        now = self.clock.now()

        async def record(connection: SqlConnection) -> set[int]:
            ours = await select_still_ours(connection, [email.id for email, _ in group], lease)
            recorded = [(email, outcome) for email, outcome in group if email.id in ours]
            await update_outcomes(connection, recorded, lease, now)
            # The run's next step waits for this one; a suppressed address would only be
            # skipped again, so its run stops here.
            runs = [
                (email.sequence_run_id, outcome.status)
                for email, outcome in recorded
                if email.sequence_run_id is not None
            ]
            going_on = [run for run, status in runs if status not in (DEFERRED, SUPPRESSED)]
            stopping = [run for run, status in runs if status == SUPPRESSED]
            await steps_settled(connection, going_on, stop=None, now=now)
            await steps_settled(connection, stopping, stop="address suppressed", now=now)
            await insert_suppressions(
                connection,
                [
                    (outcome.to_address.lower(), "bounced", outcome.lead_id)
                    for _, outcome in recorded
                    if outcome.suppress and outcome.to_address is not None
                ],
                now,
            )
            await emit_all(
                connection,
                [
                    Fact(
                        outcome.lead_id,
                        outcome.event,
                        _event_properties(email, outcome),
                        now,
                        f"{outcome.event}:{email.id}",
                    )
                    for email, outcome in recorded
                    if outcome.event is not None
                ],
            )
            # Last: the KPI shard rows are shared by every sender, so they are held
            # only for the moment before the commit (and taken in one order by all).
            counts = Counter(
                (email.journey_id, email.template, counter)
                for email, outcome in recorded
                if (counter := _kpi_counter(outcome)) is not None
            )
            for (journey_id, template, counter), n in sorted(counts.items()):
                await bump_email(connection, journey_id, day_of(now), template, counter, n)
            return ours

        ours = await self.db.write_sql(record)
        for email, outcome in group:
            if email.id in ours:
                count_email(outcome.status)
            else:
                log.warning("email %s: lease lost before recording %s", email.id, outcome.status)


def _event_properties(email: Any, outcome: Outcome) -> dict[str, Any]:
    properties = {"template": email.template, "journey": email.journey_id}
    if outcome.error is not None:
        properties["reason"] = outcome.error
    return properties


def _kpi_counter(outcome: Outcome) -> str | None:
    """The email KPI an outcome counts toward, if any."""
    if outcome.status == SENT:
        return "sent"
    if outcome.event == "email.bounced":
        return "bounced"
    return None


class GroupCommit:
    """The outcomes of one batch, recorded together: a group is written once every
    email of the batch not yet recorded has handed in its outcome, or `linger_s` after
    it started gathering, whichever comes first; while one group is written, the next
    gathers. So a batch costs a few transactions, not one an email. `record()` returns
    once its outcome's group has been written (or has failed: `write` reports that
    itself)."""

    def __init__(
        self,
        write: Callable[[list[tuple[Any, Outcome]]], Awaitable[None]],
        expected: int,
        linger_s: float,
    ) -> None:
        self._write = write
        self._linger_s = linger_s
        self._waiting: list[tuple[Any, Outcome, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._outstanding = expected  # emails whose outcome has yet to be handed in
        self._all_in: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if expected <= 0:
            self._all_in.set_result(None)

    async def record(self, email: Any, outcome: Outcome) -> None:
        written = asyncio.get_running_loop().create_future()
        self._waiting.append((email, outcome, written))
        self._handed_in()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_waiting())
        await written

    def none_from(self, email: Any) -> None:
        """`email` hands in no outcome (it was left for later): none is waited for."""
        self._handed_in()

    async def flushed(self) -> None:
        """Once every outcome handed in so far is written, even if its caller was cancelled."""
        if self._writer is not None:
            await self._writer

    def _handed_in(self) -> None:
        self._outstanding -= 1
        if self._outstanding <= 0 and not self._all_in.done():
            self._all_in.set_result(None)

    async def _write_waiting(self) -> None:
        while self._waiting:
            if not self._all_in.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._all_in), self._linger_s)
            group, self._waiting = self._waiting, []
            try:
                await self._write([(email, outcome) for email, outcome, _ in group])
            finally:
                for *_, written in group:
                    if not written.done():
                        written.set_result(None)


def stable_message_id(email: Any, domain: str) -> str:
    """The Message-ID of `email` (a row of `emails`), the same on every try: unique
    per row (its id, key and creation time), and telling nothing about the lead."""
    identity = f"{email.id}|{email.idempotency_key}|{email.created_at.isoformat()}"
    return f"<{hashlib.sha256(identity.encode()).hexdigest()[:32]}.{email.id}@{domain}>"


def _address(traits: Mapping[str, Any]) -> str | None:
    value = traits.get("email")
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


# --- the queries -------------------------------------------------------------------------------


@functools.cache
def _due_emails(dialect: str) -> TextualSelect:
    """The claim `select_due_emails` runs, written out for the dialect. Its plan is the
    point, and SQLAlchemy has no way to name an index to SQLite (it drops table hints).

    - The queue is read through ix_emails_queue, in its order: the condition is written
      as that index's literals, and SQLite is told the index by name (without statistics
      it would take the status index and sort every queued email).
    - A grant in flight is probed per due email in ix_outbox_pending_grants (again its
      literals). OFFSET 0 keeps PostgreSQL from making the NOT EXISTS an anti-join:
      planned on statistics older than a burst of emails (autovacuum analyzes a minute
      later at best), that join took seconds per claim.
    """
    sqlite = dialect == "sqlite"
    columns = ", ".join(f"emails.{column.name}" for column in emails.c)
    return (
        text(
            f"SELECT {columns}, sequence_runs.version AS run_version, sequence_runs.sequence"
            f" FROM emails{' INDEXED BY ix_emails_queue' if sqlite else ''}"
            " LEFT OUTER JOIN sequence_runs ON sequence_runs.id = emails.sequence_run_id"
            f" WHERE emails.{EMAIL_QUEUE} AND emails.due_at <= :now"
            " AND (emails.lease_until IS NULL OR emails.lease_until <= :now)"
            " AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.lead_id = emails.lead_id"
            " AND outbox.journey_id = emails.journey_id"
            f" AND outbox.action = '{GRANT}' AND outbox.status = '{OUTBOX_PENDING}'"
            f" {'LIMIT -1 OFFSET 0' if sqlite else 'OFFSET 0'})"
            " ORDER BY emails.due_at, emails.id LIMIT :limit"
            f"{'' if sqlite else ' FOR UPDATE OF emails SKIP LOCKED'}"
        )
        .bindparams(bindparam("now", type_=emails.c.due_at.type), bindparam("limit"))
        .columns(*emails.c, sequence_runs.c.version.label("run_version"), sequence_runs.c.sequence)
    )


async def select_due_emails(connection: AsyncConnection, now: datetime, limit: int) -> list[Any]:
    """Due emails not leased by another sender, locked, with the journey version and
    sequence of the run they belong to (null for a single `email.send`).

    An email waits while an offer granted to its lead in its journey is not dispatched
    yet (or being dispatched by another process right now): the code is written in the
    transaction that marks the grant dispatched, and an email sent before would lack
    the code it shows."""
    statement = _due_emails(connection.dialect.name)
    return list(await connection.execute(statement, {"now": now, "limit": limit}))


async def lease_emails(
    connection: AsyncConnection, email_ids: list[int], lease: datetime, now: datetime
) -> None:
    """Ours until `lease`: no other sender takes them meanwhile."""
    for part in chunks(email_ids):
        await connection.execute(
            update(emails)
            .where(emails.c.id.in_(part))
            .values(status=SENDING, lease_until=lease, updated_at=now)
        )


async def renew_lease(
    connection: AsyncConnection,
    email_ids: list[int],
    ours: Collection[datetime],
    until: datetime,
    now: datetime,
) -> None:
    """Ours until `until`: the emails still `sending` under one of our lease values."""
    for part in chunks(email_ids):
        await connection.execute(
            update(emails)
            .where(
                emails.c.id.in_(part),
                emails.c.status == SENDING,
                emails.c.lease_until.in_(list(ours)),
            )
            .values(lease_until=until, updated_at=now)
        )


async def hold_emails(connection: AsyncConnection, held: list[Held], now: datetime) -> None:
    """Deferred, not attempted: each is due again when it may go."""
    for email in held:
        await connection.execute(
            update(emails)
            .where(emails.c.id == email.id)
            .values(
                status=DEFERRED,
                due_at=email.until,
                last_error=email.reason,
                lease_until=None,
                updated_at=now,
            )
        )


async def lock_leads_for_cap(connection: AsyncConnection, lead_ids: Collection[int]) -> None:
    """On PostgreSQL, senders in several processes count one lead's sends one at a time
    (until they commit), so two of them cannot both let through the email that fills the
    cap. SQLite has a single writer already. Locks are taken in key order: no deadlock."""
    if connection.dialect.name != "postgresql":
        return
    # The lock key is an int4: leads far apart may share one, which only serialises more.
    for key in sorted({lead_id % 2**31 for lead_id in lead_ids}):
        await connection.execute(select(func.pg_advisory_xact_lock(CAP_LOCKS, key)))


async def select_capped_sends(
    connection: AsyncConnection, lead_ids: Collection[int], since: datetime, now: datetime
) -> dict[int, list[datetime]]:
    """When each lead's sequence emails went out after `since`; those on their way to
    the SMTP server right now count as sent now."""
    result = await connection.execute(
        select(emails.c.lead_id, emails.c.status, emails.c.sent_at).where(
            emails.c.lead_id.in_(list(lead_ids)),
            emails.c.sequence_run_id.is_not(None),
            or_(
                and_(emails.c.status == SENT, emails.c.sent_at > since),
                and_(emails.c.status == SENDING, emails.c.lease_until > now),
            ),
        )
    )
    sends: dict[int, list[datetime]] = {}
    for row in result:
        sends.setdefault(row.lead_id, []).append(row.sent_at if row.status == SENT else now)
    return sends


async def select_still_ours(
    connection: SqlConnection, email_ids: list[int], lease: Lease
) -> set[int]:
    """Those of `email_ids` still `sending` under one of our lease values, locked until
    the commit (on PostgreSQL; SQLite's one writer holds them already)."""
    held, lease_values = lease.held()
    lock = " FOR UPDATE" if connection.dialect.name == "postgresql" else ""
    rows = await rows_for_ids(
        connection,
        f"SELECT id FROM emails WHERE id {{among}} AND status = '{SENDING}' AND {held}{lock}",
        (),
        email_ids,
        lease_values,
    )
    return {email_id for (email_id,) in rows}


async def update_outcomes(
    connection: SqlConnection, recorded: list[tuple[Any, Outcome]], lease: Lease, now: datetime
) -> None:
    """Each email's row as its outcome leaves it, in one executemany. The lease is checked
    again, so a row that is no longer ours (select_still_ours) is never written."""
    at = micros(now)
    rows = [
        (
            outcome.status,
            outcome.error,
            outcome.to_address,
            at,
            email.attempts + 1 if outcome.attempted else email.attempts,
            micros(outcome.retry_at),
            at if outcome.status == SENT else None,
            outcome.message_id if outcome.status == SENT else None,
            email.id,
        )
        for email, outcome in recorded
    ]
    held, lease_values = lease.held()
    await execute_rows(
        connection,
        "UPDATE emails SET status = ?, last_error = ?, to_address = ?, lease_until = NULL,"
        " updated_at = ?, attempts = ?, due_at = COALESCE(?, due_at),"
        " sent_at = COALESCE(?, sent_at), message_id = COALESCE(?, message_id)"
        f" WHERE id = ? AND status = '{SENDING}' AND {held}",
        [(*row, *lease_values) for row in rows],
    )


async def select_suppressions(
    connection: AsyncConnection, addresses: Collection[str]
) -> dict[str, str]:
    """Why each of the (lowercased) addresses must not be mailed, for those that must not.
    An erased person's address is kept only as its hash, and still counts."""
    hashes = {hashed_address(address): address for address in addresses}
    reasons: dict[str, str] = {}
    for part in chunks([*addresses, *hashes]):
        result = await connection.execute(
            select(suppressions.c.email, suppressions.c.reason).where(
                suppressions.c.email.in_(part)
            )
        )
        for stored, reason in result:
            reasons.setdefault(hashes.get(stored, stored), reason)
    return reasons


async def select_enrollment_versions(
    connection: AsyncConnection, enrollment_ids: Collection[int]
) -> dict[int, int]:
    """The journey version of each enrollment."""
    if not enrollment_ids:
        return {}
    result = await connection.execute(
        select(enrollments.c.id, enrollments.c.version).where(
            among(connection, enrollments.c.id, enrollment_ids)
        )
    )
    return {enrollment_id: version for enrollment_id, version in result}


async def insert_suppressions(
    connection: SqlConnection, rows: list[tuple[str, str, int]], now: datetime
) -> None:
    """Suppress each (address, reason, lead id); an address already suppressed keeps its
    first reason."""
    await insert_rows(
        connection,
        suppressions,
        ("email", "reason", "lead_id", "created_at"),
        [(*row, micros(now)) for row in rows],
        " ON CONFLICT (email) DO NOTHING",
    )
