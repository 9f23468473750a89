"""The tables: the engine's whole durable state, the one part processes share.

Instants are `Instant` (integer microseconds, UTC). Rows that the worker writes in
bulk use database-generated integer ids.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, cast

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, MetaData, String, Table, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from engine.db.types import BigId, Instant

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: Instant, dict[str, Any]: JSON}


class Lead(Base):
    """One person, however many ids they were seen under."""

    __tablename__ = "leads"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    traits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Lowercased copy of traits.email, for look-ups.
    email: Mapped[str | None] = mapped_column(String(320), index=True)
    # The latest event time applied to this lead: an older event is late.
    watermark: Mapped[datetime | None]
    # Set when this lead was merged into another (identify / alias); rows moved there.
    merged_into: Mapped[int | None] = mapped_column(BigId, index=True)
    merged_at: Mapped[datetime | None]
    # Set when the person asked to be forgotten: the row stays, without personal data.
    erased_at: Mapped[datetime | None]
    # First touch: the earliest `context.campaign.source` seen, and that event's time
    # (a late event from before it replaces it). KPIs are split by it.
    first_source: Mapped[str | None] = mapped_column(String(200))
    first_source_at: Mapped[datetime | None]


class Identity(Base):
    """A userId or anonymousId, and the lead it routes to."""

    __tablename__ = "identities"

    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # user | anon
    value: Mapped[str] = mapped_column(String(256), primary_key=True)
    lead_id: Mapped[int] = mapped_column(BigId, index=True)
    created_at: Mapped[datetime]


class Event(Base):
    """The inbox: every accepted message, kept; `processed_at` is null until applied."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_lead_id_timestamp", "lead_id", "timestamp"),
        Index(
            "ix_events_pending",
            "id",
            sqlite_where=text("processed_at IS NULL"),
            postgresql_where=text("processed_at IS NULL"),
        ),
        # Events that merge two leads: rare, and a batch's pending ones are looked up
        # for every batch. Processed ones too: a condition naming `processed_at` would
        # let that lookup be planned through ix_events_pending (queries.STILL_PENDING).
        Index(
            "ix_events_merges",
            "lead_id",
            sqlite_where=text("merge_lead_id IS NOT NULL"),
            postgresql_where=text("merge_lead_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(256), unique=True)
    lead_id: Mapped[int] = mapped_column(BigId)
    type: Mapped[str] = mapped_column(String(16))  # track page screen identify alias internal
    name: Mapped[str] = mapped_column(String(200))
    timestamp: Mapped[datetime]
    received_at: Mapped[datetime]
    user_id: Mapped[str | None] = mapped_column(String(256))
    anonymous_id: Mapped[str | None] = mapped_column(String(256))
    # properties, context, traits, previous_id: the message as the worker needs it.
    data: Mapped[dict[str, Any]]
    # The lead this message says is the same person, to be merged into lead_id.
    merge_lead_id: Mapped[int | None] = mapped_column(BigId)
    processed_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)


class JourneyVersion(Base):
    """Every journey version ever run, so leads on an old version keep running on it."""

    __tablename__ = "journey_versions"

    journey_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    checksum: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    loaded_at: Mapped[datetime]


class Enrollment(Base):
    """One run of one lead through one journey."""

    __tablename__ = "enrollments"
    __table_args__ = (
        Index("uq_enrollments_lead", "lead_id", "journey_id", "entry_no", unique=True),
        Index(
            "uq_enrollments_active",
            "lead_id",
            "journey_id",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
        Index("ix_enrollments_journey_id_stage", "journey_id", "stage"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    lead_id: Mapped[int] = mapped_column(BigId)
    journey_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    entry_no: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # active | exited | completed
    # Counts stage entries; a timer carries the epoch it was started in.
    epoch: Mapped[int] = mapped_column(Integer)
    entered_at: Mapped[datetime]
    stage_entered_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    sequences: Mapped[list[str]] = mapped_column(JSON, default=list)


class Transition(Base):
    """The history: every move of an enrollment, with its cause."""

    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    enrollment_id: Mapped[int] = mapped_column(BigId, index=True)
    journey_id: Mapped[str] = mapped_column(String(64))
    from_stage: Mapped[str | None] = mapped_column(String(64))
    to_stage: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[datetime]
    cause: Mapped[dict[str, Any]]


class Timer(Base):
    """A stage timeout waiting to fire; deleted when it fires or the stage is left."""

    __tablename__ = "timers"
    __table_args__ = (Index("ix_timers_lead_id_due_at", "lead_id", "due_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    due_at: Mapped[datetime] = mapped_column(index=True)
    lead_id: Mapped[int] = mapped_column(BigId)
    enrollment_id: Mapped[int] = mapped_column(BigId, index=True)
    stage: Mapped[str] = mapped_column(String(64))
    epoch: Mapped[int] = mapped_column(Integer)
    transition: Mapped[int] = mapped_column(Integer)


# An offer grant the offers channel has not dispatched yet: the lead's emails in that
# journey wait for it (channels/email/sender.py, which writes the same literals).
PENDING_GRANT = "action = 'offer.grant' AND status = 'pending'"


class Outbox(Base):
    """Effects for the channels, written in the transaction of the step that caused them."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_status_created_at", "status", "created_at"),
        # Probed once per due email by the sender's claim; holds only the few grants in
        # flight, so a probe costs the same however many outbox rows are pending.
        Index(
            "ix_outbox_pending_grants",
            "lead_id",
            "journey_id",
            sqlite_where=text(PENDING_GRANT),
            postgresql_where=text(PENDING_GRANT),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    lead_id: Mapped[int] = mapped_column(BigId, index=True)
    enrollment_id: Mapped[int] = mapped_column(BigId)
    journey_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))  # email.send sequence.start ...
    target: Mapped[str] = mapped_column(String(64))  # the template, sequence or offer
    status: Mapped[str] = mapped_column(String(16))  # pending, then per channel
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class AudienceMember(Base):
    """Membership of a lead in a retargeting audience, with add and remove times."""

    __tablename__ = "audience_members"
    __table_args__ = (
        Index("ix_audience_members_audience_seq", "audience", "seq"),
        Index("ix_audience_members_audience_added_at", "audience", "added_at"),
        # The changes still to number, in the order the sequencer numbers them.
        Index(
            "ix_audience_members_unsequenced",
            "audience",
            "lead_id",
            sqlite_where=text("seq IS NULL"),
            postgresql_where=text("seq IS NULL"),
        ),
    )

    audience: Mapped[str] = mapped_column(String(64), primary_key=True)
    lead_id: Mapped[int] = mapped_column(BigId, primary_key=True, index=True)
    journey_id: Mapped[str] = mapped_column(String(64))
    added_at: Mapped[datetime]
    removed_at: Mapped[datetime | None]  # null while the lead is a member
    # The change number exports page by: null from a change until the sequencer numbers it,
    # in commit order, so an export cursor never passes a change still to come.
    seq: Mapped[int | None] = mapped_column(BigInteger)
    # For an erased lead: only the hashed identifiers the ad platforms need to remove
    # the person ({"meta": [...], "google": [...]}); nothing in clear.
    erased: Mapped[dict[str, Any] | None]


class AudienceIdentity(Base):
    """A lead's rows in the ad platforms' exports, normalised and hashed ahead of them:
    the audience job works them out once per change of the lead's identifiers, an
    export reads them. They hold only while the lead's identity traits, as the database
    extracts them from `leads.traits`, still equal `identifiers`, and the default region
    is still `region`: an export checks both in its query and works out the row of a
    lead whose traits changed since (channels/audiences/identities.py)."""

    __tablename__ = "audience_identities"

    lead_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    region: Mapped[str] = mapped_column(Text)  # "" for none
    identifiers: Mapped[str] = mapped_column(Text)
    # The rows as exported, ready to send: a JSON array under META_SCHEMA, and a CSV
    # line (no line end) under GOOGLE_HEADER.
    meta: Mapped[str] = mapped_column(Text)
    google: Mapped[str] = mapped_column(Text)


class GoalReached(Base):
    """One goal event of a lead enrolled in a journey: the deals behind C, P and Q."""

    __tablename__ = "goals"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    enrollment_id: Mapped[int] = mapped_column(BigId, index=True)
    journey_id: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(256))
    at: Mapped[datetime]
    value: Mapped[float | None] = mapped_column(Float)


# The emails a sender may claim: due, waiting for a retry, or on a lease that may expire.
EMAIL_QUEUE = "status IN ('queued', 'deferred', 'sending')"


class Email(Base):
    """One email to one lead: queued by the outbox, sent once, its fate recorded."""

    __tablename__ = "emails"
    __table_args__ = (
        Index("ix_emails_status_due_at", "status", "due_at"),
        # The sender's queue in the order it takes it: a claim reads the first due rows
        # only, however many are queued. Its condition is written out as literals in the
        # query too, which is what lets the planner use it.
        Index(
            "ix_emails_queue",
            "due_at",
            "id",
            sqlite_where=text(EMAIL_QUEUE),
            postgresql_where=text(EMAIL_QUEUE),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The outbox action (or sequence step) it carries out: sent at most once per key.
    idempotency_key: Mapped[str] = mapped_column(String(160), unique=True)
    lead_id: Mapped[int] = mapped_column(BigId, index=True)
    enrollment_id: Mapped[int | None] = mapped_column(BigId)
    journey_id: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str | None] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(String(64))
    # queued, sending, sent, deferred, failed, suppressed, skipped, cancelled
    status: Mapped[str] = mapped_column(String(16))
    due_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    to_address: Mapped[str | None] = mapped_column(String(320))
    message_id: Mapped[str | None] = mapped_column(String(256))
    lease_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    # The sequence run whose step this is; null for a single `email.send`.
    sequence_run_id: Mapped[int | None] = mapped_column(BigId, index=True)
    # The first open, click and unsubscribe through this email's links: each is
    # counted once in the KPIs, however often the person comes back.
    opened_at: Mapped[datetime | None]
    clicked_at: Mapped[datetime | None]
    unsubscribed_at: Mapped[datetime | None]


class SequenceRun(Base):
    """One run of a nurture sequence for one enrollment: which step is next, and when.

    At most one run of a sequence is active per enrollment. An email step waits for its
    email to be settled (sent, failed, suppressed, skipped) before the run moves on, so
    a sequence arrives in order and each `wait` counts from the previous email.
    """

    __tablename__ = "sequence_runs"
    __table_args__ = (
        Index("ix_sequence_runs_status_next_at", "status", "next_at"),
        Index(
            "uq_sequence_runs_active",
            "enrollment_id",
            "sequence",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The outbox `sequence.start` it carries out: one run per key.
    idempotency_key: Mapped[str] = mapped_column(String(160), unique=True)
    lead_id: Mapped[int] = mapped_column(BigId, index=True)
    enrollment_id: Mapped[int] = mapped_column(BigId)
    journey_id: Mapped[str] = mapped_column(String(64))
    # The journey version whose steps the run follows, from start to end.
    version: Mapped[int] = mapped_column(Integer)
    sequence: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # active | completed | stopped
    step: Mapped[int] = mapped_column(Integer)  # the index of the next step to carry out
    # When to carry it out; null while the previous step's email is being sent.
    next_at: Mapped[datetime | None]
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class OfferCode(Base):
    """The code of a time-limited offer granted to a lead. A lead holds at most one usable
    code per journey and offer; once it expired or was used, a new run may grant another."""

    __tablename__ = "offers"
    __table_args__ = (
        Index("ix_offers_lead", "lead_id", "journey_id", "offer"),
        Index("ix_offers_status_expires_at", "status", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    lead_id: Mapped[int] = mapped_column(BigId)
    enrollment_id: Mapped[int | None] = mapped_column(BigId)
    journey_id: Mapped[str] = mapped_column(String(64))
    offer: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # granted | redeemed | expired
    granted_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    redeemed_at: Mapped[datetime | None]
    # How it was redeemed: "api", or the messageId of the tracked event carrying the code.
    redeemed_by: Mapped[str | None] = mapped_column(String(256))
    expired_at: Mapped[datetime | None]
    # Redemptions refused because the code had expired: the offer came too late for them.
    refused: Mapped[int] = mapped_column(Integer, default=0)


class Suppression(Base):
    """An address never mailed again: unsubscribed, hard-bounced, or suppressed by hand."""

    __tablename__ = "suppressions"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)  # lowercased
    reason: Mapped[str] = mapped_column(String(16))  # unsubscribed | bounced | manual
    lead_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[datetime]


class Erasure(Base):
    """That a lead was erased, and how much of it: a record holding no personal data."""

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    lead_id: Mapped[int] = mapped_column(BigId)
    erased_at: Mapped[datetime]
    counts: Mapped[dict[str, Any]]


# --- KPI roll-ups ---------------------------------------------------------------------------------
# Kept up to date in the transactions that change what they count, so a KPI call reads a
# few thousand rows however long the history. `day` is a UTC day number (days since
# 1970-01-01). Counter rows are split by `shard`: concurrent writers on PostgreSQL each
# take one at random, so they rarely wait for one another's row locks; a read sums them.


class KpiLead(Base):
    """A lead's place in a journey's figures: its cohort (the day it first entered) and
    first-touch source, and its goals so far. The roll-ups below are sums over these."""

    __tablename__ = "kpi_leads"

    journey_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    lead_id: Mapped[int] = mapped_column(BigId, primary_key=True, index=True)
    day: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(200))  # "" when none is known
    goals: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)


class KpiCohort(Base):
    """Leads, customers, goals and goal value of the leads that first entered on `day`."""

    __tablename__ = "kpi_cohorts"

    journey_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    leads: Mapped[int] = mapped_column(Integer)
    customers: Mapped[int] = mapped_column(Integer)
    goals: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)


class KpiMove(Base):
    """Moves between stages by the leads of a cohort: `from_stage` "" is entering the
    journey, `to_stage` "" leaving it."""

    __tablename__ = "kpi_moves"

    journey_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[int] = mapped_column(Integer, primary_key=True)
    from_stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    to_stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    leads: Mapped[int] = mapped_column(Integer)


class KpiStageTime(Base):
    """Time spent in a stage before leaving it, as a histogram of log-spaced buckets,
    with each bucket's sum so that a bucket of equal times (a timeout) is exact."""

    __tablename__ = "kpi_stage_times"

    journey_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    leads: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)


class KpiEmail(Base):
    """Per template, the emails sent on `day` and what their readers did with them."""

    __tablename__ = "kpi_emails"

    journey_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[int] = mapped_column(Integer, primary_key=True)
    template: Mapped[str] = mapped_column(String(64), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    sent: Mapped[int] = mapped_column(Integer)
    opened: Mapped[int] = mapped_column(Integer)
    clicked: Mapped[int] = mapped_column(Integer)
    unsubscribed: Mapped[int] = mapped_column(Integer)
    bounced: Mapped[int] = mapped_column(Integer)


class KpiOffer(Base):
    """Per offer, the codes granted on `day` and what became of them."""

    __tablename__ = "kpi_offers"

    journey_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[int] = mapped_column(Integer, primary_key=True)
    offer: Mapped[str] = mapped_column(String(64), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    granted: Mapped[int] = mapped_column(Integer)
    redeemed: Mapped[int] = mapped_column(Integer)
    expired: Mapped[int] = mapped_column(Integer)
    refused: Mapped[int] = mapped_column(Integer)


class Counter(Base):
    """A number that only grows, handed out under the row's lock (audience change numbers)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class Secret(Base):
    """Server-side secrets (the key that signs email links), generated on first use."""

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]


class ApiKey(Base):
    """The write and admin keys, stored as SHA-256 hashes only."""

    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(16), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


# The Core tables, for the engine's bulk queries.
leads = cast(Table, Lead.__table__)
identities = cast(Table, Identity.__table__)
events = cast(Table, Event.__table__)
journey_versions = cast(Table, JourneyVersion.__table__)
enrollments = cast(Table, Enrollment.__table__)
transitions = cast(Table, Transition.__table__)
timers = cast(Table, Timer.__table__)
outbox = cast(Table, Outbox.__table__)
audience_members = cast(Table, AudienceMember.__table__)
goals = cast(Table, GoalReached.__table__)
api_keys = cast(Table, ApiKey.__table__)
emails = cast(Table, Email.__table__)
sequence_runs = cast(Table, SequenceRun.__table__)
suppressions = cast(Table, Suppression.__table__)
offer_codes = cast(Table, OfferCode.__table__)
secrets = cast(Table, Secret.__table__)
counters = cast(Table, Counter.__table__)
erasures = cast(Table, Erasure.__table__)
kpi_leads = cast(Table, KpiLead.__table__)
kpi_cohorts = cast(Table, KpiCohort.__table__)
kpi_moves = cast(Table, KpiMove.__table__)
kpi_stage_times = cast(Table, KpiStageTime.__table__)
kpi_emails = cast(Table, KpiEmail.__table__)
audience_identities = cast(Table, AudienceIdentity.__table__)
kpi_offers = cast(Table, KpiOffer.__table__)
