"""KPI roll-ups: per-journey figures kept current in the transactions that change them.

A KPI call must answer in milliseconds for a journey with millions of leads, so it
never reads the history: it sums the roll-up tables (see `engine.db.schema`), which
every writer keeps up to date in its own transaction, exactly once as the rest:

- the worker, for each batch: entries, moves, time in stage and goals, from the
  effects it writes (`record_batch`);
- an identity merge or an erasure, which rewrite history: the leads' part is taken
  out as it was and put back as it now is, both computed from the history
  (`Rewrite`);
- the email sender and links, and the offer store: `bump_email`, `bump_offer`.

Who counts: a lead is one person, in the cohort of the UTC day it first entered the
journey and in its first-touch source. Its later runs (re-entry) move it again
through the stages, but it is one lead, and a customer once it has reached the goal,
however often (Q counts every goal). A run ended by a merge duplicated the person's
other run: its moves are not counted (its goals are: the purchases happened).

`rebuild` computes every roll-up from the history; the tests hold the incremental
figures equal to it.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import Table, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.database import Database, SqlConnection
from engine.db.queries import chunks, execute_rows, insert_rows, rows_for_ids
from engine.db.schema import (
    enrollments,
    goals,
    kpi_cohorts,
    kpi_emails,
    kpi_leads,
    kpi_moves,
    kpi_offers,
    kpi_stage_times,
    leads,
    transitions,
)
from engine.db.types import EPOCH
from engine.machine.lead import JourneyEffect
from engine.machine.values import ReachGoal, Transitioned

log = logging.getLogger("cjm.kpis")

# Concurrent writers on PostgreSQL each add to one of this many rows per key, held until
# their commit: enough that workers and email senders seldom wait for each other's,
# few enough that a KPI read sums a handful of rows per key.
SHARDS = 32
# Time in stage is kept in buckets 2^(1/8) apart: a quantile read from them is within
# about 4% of the true one, and exact when the bucket's times are equal.
BUCKETS_PER_DOUBLING = 8
# The cause a merge gives the run it ends: a duplicate of the person's other run.
MERGED = "merge"
# Stage names in `kpi_moves` for entering and leaving the journey ("" is no stage id).
OUTSIDE = ""


def day_of(moment: datetime) -> int:
    """The UTC day number of an instant: days since 1970-01-01."""
    return (moment - EPOCH).days


def day_number(day: date) -> int:
    """The number of a UTC day, as `day_of` gives it for an instant on that day."""
    return (day - EPOCH.date()).days


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a time in stage: 0 below a second, then log-spaced."""
    if seconds < 1:
        return 0
    return 1 + math.floor(math.log2(seconds) * BUCKETS_PER_DOUBLING)


def bucket_bounds(bucket: int) -> tuple[float, float]:
    """The times (seconds) a bucket holds, from its lower bound up to its upper one."""
    if bucket <= 0:
        return 0.0, 1.0
    return (
        2 ** ((bucket - 1) / BUCKETS_PER_DOUBLING),
        2 ** (bucket / BUCKETS_PER_DOUBLING),
    )


@dataclass
class LeadFigures:
    """A lead's row in `kpi_leads`: its cohort, its source and its goals in a journey."""

    day: int
    source: str
    goals: int = 0
    value: float = 0.0

    def copy(self) -> LeadFigures:
        return LeadFigures(self.day, self.source, self.goals, self.value)


LeadKey = tuple[str, int]  # journey id, lead id


@dataclass
class Deltas:
    """Additions to the roll-up counters, by key; negative to take a part out."""

    cohorts: dict[tuple[str, int, str], list[float]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0, 0, 0.0])
    )
    moves: dict[tuple[str, int, str, str], int] = field(default_factory=lambda: defaultdict(int))
    times: dict[tuple[str, int, str, int], list[float]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0.0])
    )

    def lead(self, journey_id: str, figures: LeadFigures, sign: int = 1) -> None:
        counts = self.cohorts[(journey_id, figures.day, figures.source)]
        counts[0] += sign
        counts[1] += sign if figures.goals > 0 else 0
        counts[2] += sign * figures.goals
        counts[3] += sign * figures.value

    def move(
        self, journey_id: str, day: int, from_stage: str | None, to_stage: str | None, sign: int = 1
    ) -> None:
        self.moves[(journey_id, day, from_stage or OUTSIDE, to_stage or OUTSIDE)] += sign

    def stay(self, journey_id: str, day: int, stage: str, seconds: float, sign: int = 1) -> None:
        counts = self.times[(journey_id, day, stage, bucket_of(seconds))]
        counts[0] += sign
        counts[1] += sign * seconds

    def add(self, other: Deltas, sign: int = 1) -> None:
        for key, (leads_, customers, goals_, value) in other.cohorts.items():
            counts = self.cohorts[key]
            counts[0] += sign * leads_
            counts[1] += sign * customers
            counts[2] += sign * goals_
            counts[3] += sign * value
        for move, count in other.moves.items():
            self.moves[move] += sign * count
        for time_key, (stays, seconds) in other.times.items():
            counts = self.times[time_key]
            counts[0] += sign * stays
            counts[1] += sign * seconds

    async def write(self, connection: SqlConnection) -> None:
        shard = _shard(connection)
        await _add(
            connection,
            kpi_cohorts,
            ("journey_id", "day", "source"),
            ("leads", "customers", "goals", "value"),
            [(*key, shard, *counts) for key, counts in self.cohorts.items() if any(counts)],
        )
        await _add(
            connection,
            kpi_moves,
            ("journey_id", "day", "from_stage", "to_stage"),
            ("leads",),
            [(*key, shard, count) for key, count in self.moves.items() if count],
        )
        await _add(
            connection,
            kpi_stage_times,
            ("journey_id", "day", "stage", "bucket"),
            ("leads", "seconds"),
            [(*key, shard, *counts) for key, counts in self.times.items() if counts[0]],
        )


# --- the worker's batches ------------------------------------------------------------------------


async def record_batch(
    connection: SqlConnection,
    counted: Sequence[tuple[int, JourneyEffect]],
    sources: Mapping[int, str],
    sources_moved: Collection[int],
) -> None:
    """Add one worker batch to the roll-ups.

    `counted`: the batch's effects the roll-ups count, goals reached and moves to
    another stage (entering or leaving the journey included), in the order they
    happened, per lead. `sources`: the first-touch source of each lead of the batch
    after it ("" none), for the leads it brings into a journey. `sources_moved`: the
    leads whose source this batch changed, whose figures move to it. A batch that does
    neither reads nothing."""
    lead_ids = {lead_id for lead_id, _ in counted} | set(sources_moved)
    if not lead_ids:
        return
    before = await load_figures(connection, lead_ids)
    # `after` shares the figures of `before` until one changes, then holds a copy: most
    # leads of a batch only move, which reads their cohort's day and changes nothing.
    after = dict(before)

    def to_change(key: LeadKey) -> LeadFigures:
        figures = after[key]
        if figures is before.get(key):
            figures = after[key] = figures.copy()
        return figures

    for key, held in before.items():
        source = sources.get(key[1], held.source)
        if source != held.source:
            to_change(key).source = source
    deltas = Deltas()
    for lead_id, item in counted:
        effect = item.effect
        key = (item.journey_id, lead_id)
        figures = after.get(key)
        if figures is None:
            # Its first entry (or, in a database older than the roll-ups and not yet
            # rebuilt, its first move since): the lead joins the cohort of that day.
            figures = after[key] = LeadFigures(day_of(item.at), sources.get(lead_id, ""))
        if isinstance(effect, ReachGoal):
            figures = to_change(key)
            figures.goals += 1
            figures.value += effect.value or 0.0
        elif isinstance(effect, Transitioned):
            deltas.move(item.journey_id, figures.day, effect.from_stage, effect.to_stage)
            if effect.from_stage is not None and effect.since is not None:
                seconds = (effect.at - effect.since).total_seconds()
                deltas.stay(item.journey_id, figures.day, effect.from_stage, seconds)
    await _write_figures(connection, before, after, deltas)


# --- history rewritten: merges and erasures ------------------------------------------------------


class Rewrite:
    """Takes the leads' part out of the roll-ups as the history had it before a change
    that rewrites that history (a merge, an erasure), and puts it back as it is after:

        rewrite = await Rewrite.begin(connection, [survivor, absorbed])
        ... merge ...
        await rewrite.finish(connection)
    """

    def __init__(self, lead_ids: Sequence[int], before: dict[LeadKey, LeadFigures], deltas: Deltas):
        self.lead_ids = lead_ids
        self.before = before
        self.deltas = deltas

    @classmethod
    async def begin(cls, connection: AsyncConnection, lead_ids: Sequence[int]) -> Rewrite:
        before, deltas = await figures_from_history(connection, lead_ids)
        return cls(lead_ids, before, deltas)

    async def finish(self, connection: AsyncConnection) -> None:
        after, deltas = await figures_from_history(connection, self.lead_ids)
        deltas.add(self.deltas, sign=-1)
        await _write_figures(connection, self.before, after, deltas)


async def figures_from_history(
    connection: AsyncConnection, lead_ids: Iterable[int]
) -> tuple[dict[LeadKey, LeadFigures], Deltas]:
    """These leads' figures, and their moves and times in stage, from their history alone."""
    figures: dict[LeadKey, LeadFigures] = {}
    deltas = Deltas()
    ids = sorted(set(lead_ids))
    for part in chunks(ids):
        source_of = {
            row.id: row.first_source or ""
            for row in await connection.execute(
                select(leads.c.id, leads.c.first_source).where(leads.c.id.in_(part))
            )
        }
        runs = {
            row.id: row
            for row in await connection.execute(
                select(
                    enrollments.c.id,
                    enrollments.c.lead_id,
                    enrollments.c.journey_id,
                    enrollments.c.entered_at,
                ).where(enrollments.c.lead_id.in_(part))
            )
        }
        history: dict[int, list[Any]] = defaultdict(list)
        goals_of: dict[int, list[Any]] = defaultdict(list)
        for run_ids in chunks(sorted(runs)):
            for row in await connection.execute(
                select(
                    transitions.c.enrollment_id,
                    transitions.c.from_stage,
                    transitions.c.to_stage,
                    transitions.c.at,
                    transitions.c.cause,
                )
                .where(transitions.c.enrollment_id.in_(run_ids))
                .order_by(transitions.c.enrollment_id, transitions.c.at, transitions.c.id)
            ):
                history[row.enrollment_id].append(row)
            for goal in await connection.execute(
                select(goals.c.enrollment_id, goals.c.value).where(
                    goals.c.enrollment_id.in_(run_ids)
                )
            ):
                goals_of[goal.enrollment_id].append(goal)
        _fold(runs, history, goals_of, source_of, figures, deltas)
    return figures, deltas


def _fold(
    runs: Mapping[int, Any],
    history: Mapping[int, list[Any]],
    goals_of: Mapping[int, list[Any]],
    source_of: Mapping[int, str],
    figures: dict[LeadKey, LeadFigures],
    deltas: Deltas,
) -> None:
    """Add these runs (their leads' whole history) to `figures`, and their moves and
    times in stage to `deltas` (the cohort counters follow from the figures)."""
    counted = {
        run_id: run
        for run_id, run in runs.items()
        if not any((row.cause or {}).get("type") == MERGED for row in history.get(run_id, ()))
    }
    for run in sorted(counted.values(), key=lambda run: (run.entered_at, run.id)):
        key = (run.journey_id, run.lead_id)
        if key not in figures:
            figures[key] = LeadFigures(day_of(run.entered_at), source_of.get(run.lead_id, ""))
    for run_id, run in runs.items():
        key = (run.journey_id, run.lead_id)
        run_goals = goals_of.get(run_id, ())
        if not run_goals:
            continue
        lead = figures.get(key)
        if lead is None:  # only merged-away runs: the person's cohort is theirs
            lead = figures[key] = LeadFigures(
                day_of(run.entered_at), source_of.get(run.lead_id, "")
            )
        lead.goals += len(run_goals)
        lead.value += sum(row.value or 0.0 for row in run_goals)
    for run_id, run in counted.items():
        day = figures[(run.journey_id, run.lead_id)].day
        stage_entered: datetime | None = None
        for row in history.get(run_id, ()):
            if row.from_stage == row.to_stage:
                continue  # a move onto a new version of the map, in the same stage
            deltas.move(run.journey_id, day, row.from_stage, row.to_stage)
            if row.from_stage is not None and stage_entered is not None:
                seconds = (row.at - stage_entered).total_seconds()
                deltas.stay(run.journey_id, day, row.from_stage, seconds)
            stage_entered = row.at


async def rebuild(connection: AsyncConnection, *, leads_per_pass: int = 5_000) -> int:
    """Compute every lead roll-up from the history, replacing what was there; how many
    leads were counted. Email and offer figures are counted from their own tables."""
    for table in (kpi_leads, kpi_cohorts, kpi_moves, kpi_stage_times):
        await connection.execute(delete(table))
    counted = 0
    after: int = 0
    while True:
        ids = list(
            (
                await connection.scalars(
                    select(enrollments.c.lead_id)
                    .where(enrollments.c.lead_id > after)
                    .group_by(enrollments.c.lead_id)
                    .order_by(enrollments.c.lead_id)
                    .limit(leads_per_pass)
                )
            ).all()
        )
        if not ids:
            return counted
        figures, deltas = await figures_from_history(connection, ids)
        await _write_figures(connection, {}, figures, deltas)
        counted += len({lead_id for _, lead_id in figures})
        after = ids[-1]


async def backfill_rollups(db: Database) -> None:
    """Build the roll-ups of a database whose history predates them, once: on
    PostgreSQL processes starting together take turns, and the later ones find it done."""
    async with db.write() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(select(func.pg_advisory_xact_lock(BACKFILL_LOCK)))
        has_history = await connection.scalar(select(enrollments.c.id).limit(1))
        has_rollups = await connection.scalar(select(kpi_leads.c.lead_id).limit(1))
        if has_history is None or has_rollups is not None:
            return
        log.info("counting the KPIs of the history so far")
        counted = await rebuild(connection)
        log.info("KPIs counted for %d leads", counted)


# Any number, the same in every process: the advisory lock of the backfill.
BACKFILL_LOCK = 0x6B7069


# --- channels ------------------------------------------------------------------------------------


async def bump_email(
    connection: SqlConnection, journey_id: str, day: int, template: str, counter: str, n: int = 1
) -> None:
    """Count `n` emails of `template` on `day`: sent, opened, clicked, ..."""
    counts = dict.fromkeys(EMAIL_COUNTERS, 0)
    counts[counter] = n
    await _add(
        connection,
        kpi_emails,
        ("journey_id", "day", "template"),
        EMAIL_COUNTERS,
        [(journey_id, day, template, _shard(connection), *counts.values())],
    )


async def bump_offer(
    connection: SqlConnection, journey_id: str, day: int, offer: str, counter: str, n: int = 1
) -> None:
    """Count `n` codes of `offer` granted on `day`: granted, redeemed, expired, refused."""
    counts = dict.fromkeys(OFFER_COUNTERS, 0)
    counts[counter] = n
    await _add(
        connection,
        kpi_offers,
        ("journey_id", "day", "offer"),
        OFFER_COUNTERS,
        [(journey_id, day, offer, _shard(connection), *counts.values())],
    )


EMAIL_COUNTERS = ("sent", "opened", "clicked", "unsubscribed", "bounced")
OFFER_COUNTERS = ("granted", "redeemed", "expired", "refused")


# --- writing -------------------------------------------------------------------------------------


async def load_figures(
    connection: SqlConnection, lead_ids: Iterable[int]
) -> dict[LeadKey, LeadFigures]:
    rows = await rows_for_ids(
        connection,
        "SELECT journey_id, lead_id, day, source, goals, value FROM kpi_leads"
        " WHERE lead_id IN ({ids})",
        (),
        sorted(set(lead_ids)),
    )
    return {
        (journey_id, lead_id): LeadFigures(day, source, goals, value)
        for journey_id, lead_id, day, source, goals, value in rows
    }


async def _write_figures(
    connection: SqlConnection,
    before: Mapping[LeadKey, LeadFigures],
    after: Mapping[LeadKey, LeadFigures],
    deltas: Deltas,
) -> None:
    """Store the leads' figures as `after` (dropping those only in `before`) and add to
    the counters what changed between the two, with `deltas`."""
    # Figures held in both as the same object are unchanged, known without comparing.
    for key, figures in before.items():
        kept = after.get(key)
        if kept is not figures and kept != figures:
            deltas.lead(key[0], figures, sign=-1)
    changed = [
        (key, figures)
        for key, figures in after.items()
        if (was := before.get(key)) is not figures and was != figures
    ]
    for key, figures in changed:
        deltas.lead(key[0], figures)
    gone = [key for key in before if key not in after]
    await execute_rows(
        connection, "DELETE FROM kpi_leads WHERE journey_id = ? AND lead_id = ?", gone
    )
    if changed:
        await insert_rows(
            connection,
            kpi_leads,
            ("journey_id", "lead_id", "day", "source", "goals", "value"),
            [
                (journey_id, lead_id, figures.day, figures.source, figures.goals, figures.value)
                for (journey_id, lead_id), figures in sorted(changed, key=lambda item: item[0])
            ],
            " ON CONFLICT (journey_id, lead_id) DO UPDATE SET day = excluded.day,"
            " source = excluded.source, goals = excluded.goals, value = excluded.value",
        )
    await deltas.write(connection)


def _shard(connection: SqlConnection) -> int:
    # SQLite has one writer at a time: one row per key reads fastest.
    return random.randrange(SHARDS) if connection.dialect.name == "postgresql" else 0


async def _add(
    connection: SqlConnection,
    table: Table,
    keys: Sequence[str],
    counters: Sequence[str],
    rows: list[tuple[Any, ...]],
) -> None:
    """Add to counter rows, creating them at zero. In key order, so two writers that
    take the same rows take them in the same order and never deadlock."""
    if not rows:
        return
    names = (*keys, "shard", *counters)
    width = len(keys) + 1
    await execute_rows(
        connection,
        f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({','.join('?' * len(names))})"
        f" ON CONFLICT ({', '.join(names[:width])}) DO UPDATE SET "
        + ", ".join(f"{name} = {table.name}.{name} + excluded.{name}" for name in counters),
        sorted(rows, key=lambda row: row[:width]),
    )
