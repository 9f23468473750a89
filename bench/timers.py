"""Due timers among a million pending: how fast they fire, how late, and at what memory cost.

Lead-level timeouts (`after: 2h`) are rows in a timers table indexed by due time, never
jobs held in memory (DESIGN.md): millions pending should cost disk, not memory, and
not slow down the ones falling due. Three figures hold that promise to account, each
measured with the real `Processor` on SQLite, on uvloop as `cjm worker` runs it:

a. throughput: K timers due at once among N pending: fired per second until every one
   has moved its lead to `retargeting`, each exactly once (counted in the history).
   Target >= 20,000/s. The CPU it took per timer, both threads, is shown beside it:
   the machine may be shared, the CPU spent is the engine's own.
b. lag: timers falling due at a steady rate for a while, the `Worker` and its
   APScheduler sweep (every 0.2 s) running: when each move was committed minus when it
   fell due, p99. Target < 1 s at 5,000/s. The same at 500/s, a rate any worker keeps
   up with, shows the sweep's own delay apart from a backlog.
c. memory: the traced peak while the same 5,000 timers fire with N/10 and with N
   pending, in batches of 1,000 leads on both sides. Flat: the second is not ~10x the
   first.

The database holds what cjm writes when a lead enters the doors journey from a search
ad: the lead, its processed `page` event, its run in `first_contact`, the entry in the
history, its `site_visitors` membership, its KPI rows and its `after: 2h` timer, built
from the same values and loaded with raw batched INSERTs. Identities are left out:
firing a timer never reads them. The engine's clock is the system clock shifted by a
constant, so the rows can be written with fixed instants before the run while the
clock still ticks in real time: a lag measured against it is a real lag.

Run: `.venv/bin/python bench/timers.py [--pending N]` (default 1000000; about 3 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import uvloop
from harness import ROOT, Figure, Stopwatch, peak_rss_mib, report
from sqlalchemy import distinct, func, select

from channels.offers.store import redeem_coupons
from engine.db.database import Database
from engine.db.migrate import upgrade
from engine.db.schema import enrollments, transitions
from engine.db.types import to_micros
from engine.journey import JourneySet, load_journeys
from engine.journey.model import Journey
from engine.kpis.rollup import day_of
from engine.machine.book import JourneyBook
from engine.machine.values import Cause
from engine.registry import publish
from engine.runtime import tune_garbage_collector
from engine.worker.loop import SWEEP_INTERVAL_S, Worker
from engine.worker.processor import Processor

START = datetime(2026, 8, 1, 12, tzinfo=UTC)  # the engine's clock when the throughput run begins
MEMORY_DUE = 5_000  # timers fired for the memory figure (fewer for a small --pending)
# Leads per batch while the memory figure is measured, the same on both sides: the
# worker sizes its batches by their duration, and a batch's leads are in memory at once,
# so batches of whatever size the throughput run grew to would weigh on one side only.
MEMORY_BATCH = 1_000
# A rate any worker keeps up with: its lag is the sweep's own delay, not a backlog.
EASY_RATE = 500
CHUNK = 50_000  # leads per INSERT batch
SOURCE = "google"
PAGE_DATA = orjson.dumps(
    {"properties": {"path": "/catalog/steel"}, "context": {"campaign": {"source": SOURCE}}}
).decode()


@dataclass(frozen=True)
class Group:
    """`leads` consecutive leads whose timers fall due from `first` on, `spacing` apart."""

    leads: int
    first: datetime
    spacing: timedelta

    def due(self, k: int) -> datetime:
        return self.first + self.spacing * k


@dataclass(frozen=True)
class Plan:
    """The groups of one database, in lead id order; `ids(group)` are its lead ids."""

    groups: tuple[Group, ...]

    def ids(self, group: Group) -> range:
        first = 1 + sum(g.leads for g in self.groups[: self.groups.index(group)])
        return range(first, first + group.leads)


class ShiftedClock:
    """The system clock moved by a constant that `jump` sets: real time from a chosen instant."""

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def jump(self, to: datetime) -> None:
        self._offset = to - datetime.now(UTC)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset


class TimedProcessor(Processor):
    """The worker's processor, noting when each batch of due timers had committed and how
    many leads it took forward: the commit, not the batch's start, is when a move happened."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commits: list[tuple[datetime, int]] = []

    async def process_due_timers(self) -> int:
        done = await super().process_due_timers()
        if done:
            self.commits.append((self.clock.now(), done))
        return done


# --- the database ---------------------------------------------------------------------------------


def load(path: Path, journey: Journey, plan: Plan) -> None:
    """Write every lead of `plan` as the worker leaves it after its entry, in one pass. A
    lead's id is also the id of its event, its run and its timer."""
    stage = journey.first_stage
    ((index, timeout),) = stage.timeouts
    assert timeout.to == "retargeting", timeout
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA synchronous=OFF")  # a crash only loses the benchmark
    entries: Counter[int] = Counter()
    for batch in _batches(plan, timeout.after):
        rows: dict[str, list[tuple[Any, ...]]] = {
            "leads": [],
            "events": [],
            "enrollments": [],
            "transitions": [],
            "audiences": [],
            "kpi": [],
            "timers": [],
        }
        for lead, entered, due in batch:
            t = to_micros(entered)
            message_id = f"m-{lead}"
            cause = Cause("entry", event="page", message_id=message_id, timestamp=entered)
            day = day_of(entered)
            entries[day] += 1
            rows["leads"].append((lead, t, t, t, SOURCE, t))
            rows["events"].append((lead, message_id, lead, t, t, f"anon-{lead}", PAGE_DATA, t))
            rows["enrollments"].append((lead, lead, stage.id, t, t))
            rows["transitions"].append((lead, stage.id, t, orjson.dumps(cause.as_dict()).decode()))
            rows["audiences"].append((lead, t))
            rows["kpi"].append((lead, day, SOURCE))
            rows["timers"].append((lead, to_micros(due), lead, lead, stage.id, index))
        _insert(connection, rows)
    connection.executemany(
        "INSERT INTO kpi_cohorts (journey_id, day, source, shard, leads, customers, goals, value)"
        " VALUES ('doors', ?, ?, 0, ?, 0, 0, 0.0)",
        [(day, SOURCE, count) for day, count in entries.items()],
    )
    connection.executemany(
        "INSERT INTO kpi_moves (journey_id, day, from_stage, to_stage, shard, leads)"
        " VALUES ('doors', ?, '', ?, 0, ?)",
        [(day, stage.id, count) for day, count in entries.items()],
    )
    connection.commit()
    # The engine should not start by replaying a write-ahead log of the whole load.
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


def _batches(plan: Plan, after: timedelta) -> Iterator[list[tuple[int, datetime, datetime]]]:
    """(lead id, entry, due) in id order, CHUNK at a time; a timer is due `after` the entry."""
    batch: list[tuple[int, datetime, datetime]] = []
    for group in plan.groups:
        for k, lead in enumerate(plan.ids(group)):
            due = group.due(k)
            batch.append((lead, due - after, due))
            if len(batch) == CHUNK:
                yield batch
                batch = []
    yield batch


def _insert(connection: sqlite3.Connection, rows: dict[str, list[tuple[Any, ...]]]) -> None:
    connection.executemany(
        "INSERT INTO leads (id, created_at, updated_at, traits, watermark, first_source,"
        " first_source_at) VALUES (?, ?, ?, '{}', ?, ?, ?)",
        rows["leads"],
    )
    connection.executemany(
        "INSERT INTO events (id, message_id, lead_id, type, name, timestamp, received_at,"
        " anonymous_id, data, processed_at) VALUES (?, ?, ?, 'page', 'page', ?, ?, ?, ?, ?)",
        rows["events"],
    )
    connection.executemany(
        "INSERT INTO enrollments (id, lead_id, journey_id, version, entry_no, stage, state,"
        " epoch, entered_at, stage_entered_at, sequences)"
        " VALUES (?, ?, 'doors', 1, 1, ?, 'active', 1, ?, ?, '[]')",
        rows["enrollments"],
    )
    connection.executemany(
        "INSERT INTO transitions (enrollment_id, journey_id, from_stage, to_stage, at, cause)"
        " VALUES (?, 'doors', NULL, ?, ?, ?)",
        rows["transitions"],
    )
    connection.executemany(
        "INSERT INTO audience_members (audience, lead_id, journey_id, added_at)"
        " VALUES ('site_visitors', ?, 'doors', ?)",
        rows["audiences"],
    )
    connection.executemany(
        "INSERT INTO kpi_leads (journey_id, lead_id, day, source, goals, value)"
        " VALUES ('doors', ?, ?, ?, 0, 0.0)",
        rows["kpi"],
    )
    connection.executemany(
        "INSERT INTO timers (id, due_at, lead_id, enrollment_id, stage, epoch, transition)"
        " VALUES (?, ?, ?, ?, ?, 1, ?)",
        rows["timers"],
    )
    connection.commit()


async def prepare(path: Path, journeys: JourneySet, plan: Plan) -> tuple[Database, JourneyBook]:
    """A migrated, loaded database with the journey published as a starting process does."""
    url = f"sqlite+aiosqlite:///{path}"
    await upgrade(url)
    load(path, journeys.sources[0].journey, plan)
    db = Database(url)
    return db, await publish(db, journeys, START)


async def moved(db: Database, ids: range) -> tuple[int, int, int]:
    """For the leads `ids`: moves to `retargeting`, runs that made one, runs now there."""
    async with db.read() as connection:
        row = (
            await connection.execute(
                select(func.count(), func.count(distinct(transitions.c.enrollment_id))).where(
                    transitions.c.enrollment_id.between(ids.start, ids.stop - 1),
                    transitions.c.from_stage == "first_contact",
                    transitions.c.to_stage == "retargeting",
                )
            )
        ).one()
        there = await connection.scalar(
            select(func.count()).where(
                enrollments.c.id.between(ids.start, ids.stop - 1),
                enrollments.c.stage == "retargeting",
            )
        )
    return int(row[0]), int(row[1]), int(there or 0)


def assert_moved_once(found: tuple[int, int, int], leads: int) -> None:
    moves, runs, there = found
    assert moves == runs == there == leads, f"{leads} leads: {moves} moves, {runs} runs, {there}"


# --- the three measures ---------------------------------------------------------------------------


async def fire_due(processor: Processor) -> None:
    """What one sweep of the worker does with the timers due now: batch after batch."""
    while await processor.process_due_timers():
        pass


async def throughput(
    db: Database, processor: TimedProcessor, plan: Plan, group: Group
) -> tuple[float, float]:
    """Seconds to fire `group`, all due when the clock starts, and the CPU seconds this
    process spent on it (both threads: the event loop's and the SQLite driver's)."""
    cpu = time.process_time()
    with Stopwatch() as watch:
        await fire_due(processor)
    cpu = time.process_time() - cpu
    assert sum(done for _, done in processor.commits) == group.leads
    assert_moved_once(await moved(db, plan.ids(group)), group.leads)
    return watch.seconds, cpu


async def traced_peak(db: Database, processor: TimedProcessor, plan: Plan, group: Group) -> float:
    """The traced peak (KiB) of firing `group`; SQLite's own page cache is outside it,
    bounded by its cache size whatever the table holds."""
    tracemalloc.start()
    try:
        await fire_due(processor)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_moved_once(await moved(db, plan.ids(group)), group.leads)
    return peak / 1024


async def lags(
    db: Database, processor: TimedProcessor, clock: ShiftedClock, plan: Plan, group: Group
) -> list[float]:
    """Seconds from due to commit of each timer of `group`, fired by a running Worker."""
    async with db.read() as connection:
        last_before = int(await connection.scalar(select(func.max(transitions.c.id))) or 0)
    processor.commits = []
    # The worker starts a few seconds ahead, as a worker that runs has: its first sweep
    # also looks for leads on older map versions.
    clock.jump(group.first - timedelta(seconds=3))
    worker = Worker(processor)
    await worker.start()
    try:
        end = group.due(group.leads - 1)
        while sum(done for _, done in processor.commits) < group.leads:
            assert clock.now() < end + timedelta(seconds=60), "the worker fell a minute behind"
            await asyncio.sleep(0.1)
    finally:
        await worker.stop()
    assert_moved_once(await moved(db, plan.ids(group)), group.leads)
    async with db.read() as connection:
        dues = list(
            await connection.scalars(
                select(transitions.c.at)
                .where(transitions.c.id > last_before)
                .order_by(transitions.c.id)
            )
        )
    # Ids grow in commit order (one writer), and each lead moved once: the batches'
    # moves are consecutive runs of ids.
    committed = [at for at, done in processor.commits for _ in range(done)]
    assert len(committed) == len(dues) == group.leads, (len(committed), len(dues))
    return [(at - due).total_seconds() for at, due in zip(committed, dues, strict=True)]


# --- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    fired_per_s: float
    cpu_per_timer_us: float
    lags: list[float]  # at the rate asked for
    easy_lags: list[float]  # at EASY_RATE
    memory_due: int
    peak_kib: float
    small_peak_kib: float


def steady(rate: float, seconds: float, first: datetime) -> Group:
    return Group(int(rate * seconds), first, timedelta(seconds=1) / rate)


async def bench(args: argparse.Namespace, directory: Path) -> Found:
    journeys = load_journeys([ROOT / "journeys" / "doors.yaml"], ROOT / "templates" / "emails")
    clock = ShiftedClock()
    # Each measure has its own stretch of the engine's clock, in the order they run.
    at_once = Group(args.due, START - timedelta(minutes=1), timedelta(minutes=1) / args.due)
    memory_due = min(MEMORY_DUE, args.pending // 20)
    memory = Group(memory_due, START + timedelta(minutes=10), timedelta(milliseconds=1))
    easy = steady(EASY_RATE, args.seconds, START + timedelta(minutes=20))
    asked = steady(args.rate, args.seconds, START + timedelta(minutes=30))
    # The rest, due between one and two hours on: pending for the whole run.

    def pending(leads: int) -> Group:
        return Group(leads, START + timedelta(hours=1), timedelta(hours=1) / leads)

    def memory_processor(db: Database, book: JourneyBook) -> TimedProcessor:
        return TimedProcessor(
            db, book, clock, batch_leads=MEMORY_BATCH, event_hooks=[redeem_coupons]
        )

    small = Plan((memory, pending(args.pending // 10 - memory.leads)))
    db, book = await prepare(directory / "small.db", journeys, small)
    try:
        clock.jump(memory.due(memory.leads))
        small_peak = await traced_peak(db, memory_processor(db, book), small, memory)
    finally:
        await db.close()

    rest = args.pending - memory.leads - easy.leads - asked.leads
    big = Plan((at_once, memory, easy, asked, pending(rest)))
    with Stopwatch() as loading:
        db, book = await prepare(directory / "big.db", journeys, big)
    leads = sum(group.leads for group in big.groups)
    print(f"{leads:,} leads, runs and timers loaded in {loading.seconds:.0f} s")
    tune_garbage_collector()  # as `cjm serve` and `cjm worker` do once started
    try:
        processor = TimedProcessor(db, book, clock, event_hooks=[redeem_coupons])
        clock.jump(START)
        seconds, cpu = await throughput(db, processor, big, at_once)
        assert clock.now() < memory.first, "the throughput run outlasted its stretch of the clock"
        clock.jump(memory.due(memory.leads))
        peak = await traced_peak(db, memory_processor(db, book), big, memory)
        easy_lags = await lags(db, processor, clock, big, easy)
        asked_lags = await lags(db, processor, clock, big, asked)
    finally:
        await db.close()
    return Found(
        at_once.leads / seconds,
        cpu / at_once.leads * 1e6,
        asked_lags,
        easy_lags,
        memory.leads,
        peak,
        small_peak,
    )


def percentiles(lags: list[float]) -> tuple[float, float]:
    """p50 and p99."""
    cuts = statistics.quantiles(lags, n=100)
    return cuts[49], cuts[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=1_000_000, help="timers not yet due")
    parser.add_argument("--due", type=int, default=100_000, help="timers due at once (a)")
    parser.add_argument("--rate", type=float, default=5_000, help="timers falling due per s (b)")
    parser.add_argument("--seconds", type=float, default=10, help="how long they do (b)")
    args = parser.parse_args()
    if args.pending < 20_000 or (args.rate + EASY_RATE) * args.seconds > args.pending / 2:
        parser.error("--pending must be at least 20,000 and twice the timers of (b)")
    with tempfile.TemporaryDirectory() as directory:
        found = uvloop.run(bench(args, Path(directory)))  # as `cjm worker` runs
    p50, p99 = percentiles(found.lags)
    easy_p50, easy_p99 = percentiles(found.easy_lags)
    window = f"{args.seconds:g} s"
    figures = [
        Figure(
            f"fired, {args.due:,} due at once",
            found.fired_per_s,
            "timers/s",
            target=">= 20,000 timers/s",
            met=found.fired_per_s >= 20_000,
        ),
        Figure("  CPU per timer fired", found.cpu_per_timer_us, "us"),
        Figure(
            f"lag p99, {args.rate:,.0f}/s for {window}",
            p99,
            "s",
            target="< 1 s",
            met=p99 < 1,
        ),
        Figure(f"  lag p50, {args.rate:,.0f}/s", p50, "s"),
        Figure(f"lag p99, {EASY_RATE:,}/s for {window}", easy_p99, "s"),
        Figure(f"  lag p50, {EASY_RATE:,}/s", easy_p50, "s"),
        Figure(
            f"traced peak, {args.pending:,} pending",
            found.peak_kib,
            "KiB",
            found.small_peak_kib,
            f"{args.pending // 10:,} pending; {found.memory_due:,} timers fired in each",
            "not ~10x (< 2x)",
            found.peak_kib < 2 * found.small_peak_kib,
        ),
        Figure("peak RSS (process, load included)", peak_rss_mib(), "MiB"),
    ]
    notes = {
        "pending": args.pending,
        "due_at_once": args.due,
        "rate_per_s": args.rate,
        "easy_rate_per_s": EASY_RATE,
        "window_s": args.seconds,
        "sweep_interval_s": SWEEP_INTERVAL_S,
    }
    report("timers", figures, notes)


if __name__ == "__main__":
    main()
