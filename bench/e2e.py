"""Ingest to stage, end to end: N leads of the doors journey, five events each.

Each lead opens the catalog from a search ad (enters `first_contact`), comes back from
a Facebook ad (`landing`), identifies with an email, requests the catalog
(`nurturing`: the tips sequence starts and a free-installation code is granted) and
orders (`customer`, the goal). Events arrive as `/v1/batch` calls of 500 would hand
them to the inbox (their bodies parsed as the API parses them, group-committed), and
a lead's five events arrive in five different batches, so the worker takes most
leads forward several times. The clock runs from the first batch to the moment every
lead is a customer: ingestion and the worker share the process and its cores, as in
`cjm serve`, on uvloop as cjm runs.

Run: `.venv/bin/python bench/e2e.py [leads] [--postgres [SERVER_URL]]` (default 100000,
SQLite; with --postgres, PostgreSQL too).
`--headline` runs the 1,000,000-lead case (5,000,000 events).
`--worker-process` runs the worker in a process of its own, so that ingestion and the
worker each have a core, as `cjm serve --worker-process` does on a machine of two or
more cores.
Beside each rate: how busy the run kept the machine's cores (the benchmark's processes
and PostgreSQL's, over the wall time), which says whether the cores or the waits
between them set the pace; and the CPU each event cost in each process.
`--lanes N` gives the worker N batches of events in flight at once on PostgreSQL
instead of its default (engine/worker/loop.py), to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import orjson
import uvloop
from harness import (
    POSTGRES_SERVER,
    ROOT,
    Figure,
    Stopwatch,
    cpu_seconds,
    peak_rss_mib,
    postgres_pids,
    report,
    scratch_postgres,
)
from sqlalchemy import func, select

from channels.offers.store import redeem_coupons
from engine.config import Settings
from engine.db.migrate import upgrade
from engine.db.schema import enrollments, events
from engine.db.types import to_micros
from engine.ingest.messages import parse_batch, parse_json
from engine.runtime import Runtime, tune_garbage_collector
from engine.worker.loop import Worker
from engine.worker.processor import Processor

BATCH = 500
# Leads whose five events are sent before the next block starts: a lead's events are
# spread over five batches, and the worker meets each lead about five times.
BLOCK = 10_000
SENDERS = 8  # concurrent /v1/batch callers
CORES = os.cpu_count() or 1


def lead_events(n: int, at: datetime) -> list[dict[str, Any]]:
    """The five calls of lead n, a few seconds apart, as a website would send them."""
    anonymous = f"anon-{n}"

    def call(seconds: int, kind: str, **fields: Any) -> dict[str, Any]:
        stamp = (at + timedelta(seconds=seconds)).isoformat()
        return {"type": kind, "anonymousId": anonymous, "timestamp": stamp, **fields}

    return [
        call(
            0,
            "page",
            properties={"path": "/catalog/steel"},
            context={"campaign": {"source": "google"}},
        ),
        call(
            5,
            "page",
            properties={"path": "/landing/free-install"},
            context={"campaign": {"source": "facebook"}},
        ),
        call(
            10,
            "identify",
            userId=f"user-{n}",
            traits={"email": f"lead.{n}@example.com", "first_name": "Sam"},
        ),
        call(15, "track", userId=f"user-{n}", event="catalog_requested"),
        call(
            20,
            "track",
            userId=f"user-{n}",
            event="order_completed",
            properties={"revenue": 1290, "order_id": f"o-{n}"},
        ),
    ]


# Stand-ins for a lead's number and its first call's time in the calls as `lead_events`
# writes them, where `bodies` puts each lead's own.
_N = 987_654_321
_AT = datetime(2001, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)


def _call_templates() -> list[tuple[str, int]]:
    """Each of the five calls of `lead_events` as JSON text, with `%(n)d` and `%(at)s`
    where a lead's number and the call's time go; beside it, the call's time after the
    lead's first call, in microseconds."""
    templates = []
    for call in lead_events(_N, _AT):
        stamp = call["timestamp"]
        text = orjson.dumps(call).decode().replace("%", "%%")
        assert text.count(str(_N)) >= 1 and text.count(stamp) == 1
        offset = to_micros(datetime.fromisoformat(stamp)) - to_micros(_AT)
        templates.append((text.replace(str(_N), "%(n)d").replace(stamp, "%(at)s"), offset))
    return templates


@functools.cache
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _timestamp(micros: int) -> str:
    """An instant (microseconds since the epoch) in ISO 8601, as `isoformat()` writes it
    but always with the microseconds, without a `datetime` made for each call."""
    seconds, fraction = divmod(micros, 1_000_000)
    return f"{_second(seconds)}.{fraction:06d}+00:00"


def bodies(leads: int) -> Iterator[bytes]:
    """The `/v1/batch` bodies the website sends: BATCH calls each, a block of leads at a
    time, each lead's five calls in five different batches.

    Written from templates, as a client's own code would be elsewhere: building the
    calls as Python objects took 5 µs an event of the ingesting process, charged to
    cjm. The inbox's side parses them as the API does (`parse_json`, then `parse_batch`).
    """
    # An hour ago: every event is in the past, and no lead has stayed anywhere long
    # enough for a timeout (the shortest, 2h in first_contact) to move it elsewhere.
    began = to_micros(datetime.now(UTC) - timedelta(hours=1))
    templates = _call_templates()
    for first in range(0, leads, BLOCK):
        block = range(first, min(first + BLOCK, leads))
        for template, offset in templates:
            calls = [
                template % {"n": n, "at": _timestamp(began + n * 1000 + offset)} for n in block
            ]
            for start in range(0, len(calls), BATCH):
                yield ('{"batch":[' + ",".join(calls[start : start + BATCH]) + "]}").encode()


async def send(runtime: Runtime, leads: int) -> float:
    """Hand every lead's events to the inbox as SENDERS concurrent batch calls would;
    the seconds it took."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=SENDERS * 2)

    async def sender() -> None:
        while (body := await queue.get()) is not None:
            batch = parse_batch(parse_json(body), runtime.clock.now())
            assert not batch.rejected, batch.rejected[:3]
            await runtime.inbox.accept(batch.messages)

    with Stopwatch() as watch:
        tasks = [asyncio.create_task(sender()) for _ in range(SENDERS)]
        for body in bodies(leads):
            await queue.put(body)
        for _ in tasks:
            await queue.put(None)
        await asyncio.gather(*tasks)
    return watch.seconds


def settings_for(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        journeys_dir=ROOT / "journeys",
        templates_dir=ROOT / "templates" / "emails",
    )


async def customers(runtime: Runtime) -> int:
    async with runtime.db.read() as connection:
        count = await connection.scalar(
            select(func.count())
            .select_from(enrollments)
            .where(enrollments.c.journey_id == "doors", enrollments.c.stage == "customer")
        )
    return int(count or 0)


async def any_pending(runtime: Runtime) -> bool:
    """Whether an event waits to be applied. Asked every 0.2 s while the worker runs: a
    count of the pending events took several milliseconds of the same cores with a
    backlog of 100,000, this one look-up in the pending index none."""
    async with runtime.db.read() as connection:
        first = await connection.scalar(
            select(events.c.id).where(events.c.processed_at.is_(None)).limit(1)
        )
    return first is not None


async def pending(runtime: Runtime) -> int:
    """How many events wait to be applied: asked once, as ingestion ends (a walk of the
    pending index, some milliseconds with a backlog of 100,000)."""
    async with runtime.db.read() as connection:
        count = await connection.scalar(
            select(func.count()).select_from(events).where(events.c.processed_at.is_(None))
        )
    return int(count or 0)


def event_worker(runtime: Runtime, lanes: int | None = None) -> Worker:
    """The worker of `cjm serve`, without the email and audience dispatchers: they have
    benchmarks of their own. `lanes`: its batches of events in flight at once, if not
    its default."""
    processor = Processor(runtime.db, runtime.book, runtime.clock, event_hooks=[redeem_coupons])
    return Worker(processor, event_lanes=lanes)


async def run(
    leads: int, database_url: str, *, worker_process: bool = False, lanes: int | None = None
) -> dict[str, float]:
    """Seconds from the first batch until every lead is a customer (and those spent
    handing the events in). `worker_process`: the worker runs in a process of its own,
    so that ingestion and the worker each have a core, as in `cjm serve --worker-process`
    (their write transactions take turns on the SQLite file as there)."""
    settings = settings_for(database_url)
    runtime = Runtime(settings, run_worker=False, writers_take_turns=worker_process)
    await runtime.start()
    tune_garbage_collector()  # as `cjm serve` does once started
    worker = None if worker_process else event_worker(runtime, lanes)
    child = WorkerChild(database_url, lanes) if worker_process else None
    if worker is not None:
        runtime.inbox.on_commit = worker.wake
        await worker.start()
    if child is not None:
        await asyncio.to_thread(child.start)
    on_postgres = not runtime.db.is_sqlite
    try:
        worker_pids = [child.pid] if child is not None else []
        ingest_before, worker_before = cpu_seconds([os.getpid()]), cpu_seconds(worker_pids)
        postgres_before = cpu_seconds(postgres_pids()) if on_postgres else 0.0
        with Stopwatch() as watch:
            ingest_seconds = await send(runtime, leads)
            worker_ingesting_cpu = cpu_seconds(worker_pids) - worker_before
            pending_then = await pending(runtime)
            while await any_pending(runtime):  # the worker has no "idle" event to wait for
                if child is not None:
                    child.check()
                await asyncio.sleep(0.2)
        ingest_cpu = cpu_seconds([os.getpid()]) - ingest_before
        worker_cpu = cpu_seconds(worker_pids) - worker_before
        postgres_cpu = cpu_seconds(postgres_pids()) - postgres_before if on_postgres else 0.0
        done = await customers(runtime)
        assert done == leads, f"{done} of {leads} leads reached the customer stage"
        return {
            "seconds": watch.seconds,
            "ingest_seconds": ingest_seconds,
            "busy": (ingest_cpu + worker_cpu + postgres_cpu) / (watch.seconds * CORES),
            # CPU per event of each process (one process: ingestion and the worker both).
            "ingest_cpu_us": ingest_cpu / (leads * 5) * 1e6,
            "worker_cpu_us": worker_cpu / (leads * 5) * 1e6,
            "applied_ingesting": 1 - pending_then / (leads * 5),
            # Of one core: how busy the worker process was while the events came in.
            "worker_ingesting_busy": worker_ingesting_cpu / ingest_seconds,
        }
    finally:
        if worker is not None:
            await worker.stop()
        if child is not None:
            await asyncio.to_thread(child.stop)
        await runtime.stop()


class WorkerChild:
    """`event_worker` in a process of its own on the same database. It is not woken at
    each commit, as `cjm serve --worker-process` wakes its worker: with a backlog it
    never waits, and idle it looks every IDLE_POLL_S."""

    def __init__(self, database_url: str, lanes: int | None) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter, as cjm's
        self._ready = context.Event()
        self._stop = context.Event()
        self._process = context.Process(
            target=_child_main,
            args=(database_url, lanes, self._ready, self._stop),
            name="cjm-bench-worker",
        )

    @property
    def pid(self) -> int:
        assert self._process.pid is not None, "not started"
        return self._process.pid

    def start(self) -> None:
        self._process.start()
        if not self._ready.wait(120):
            self._process.kill()
            raise RuntimeError("the worker process did not start")

    def check(self) -> None:
        """Raise if the process has ended: the events it left would wait forever."""
        if not self._process.is_alive():
            raise RuntimeError(f"the worker process ended (exit code {self._process.exitcode})")

    def stop(self) -> None:
        self._stop.set()
        self._process.join(60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _child_main(database_url: str, lanes: int | None, ready: Event, stop: Event) -> None:
    async def serve() -> None:
        runtime = Runtime(settings_for(database_url), run_worker=False, writers_take_turns=True)
        await runtime.start()
        tune_garbage_collector()
        worker = event_worker(runtime, lanes)
        await worker.start()
        ready.set()
        await asyncio.to_thread(stop.wait)
        await worker.stop()
        await runtime.stop()

    uvloop.run(serve())  # as `cjm serve --worker-process` runs its worker


def rate_figure(database: str, leads: int, seconds: float, target: int) -> Figure:
    rate = leads * 5 / seconds
    return Figure(
        f"{database}, {leads:,} leads x 5 events",
        rate,
        "ev/s",
        target=f">= {target:,} ev/s",
        met=rate >= target,
    )


def busy_figure(result: dict[str, float]) -> Figure:
    """How much of the machine the run kept busy: the CPU of the benchmark's processes
    (and of PostgreSQL's) over the wall time of all cores. What is left idle is lost to
    waiting (on SQLite, for its one writer), not to a core short."""
    return Figure(f"  machine busy (all {CORES} cores)", result["busy"] * 100, "%")


def cpu_figures(result: dict[str, float], apart: bool) -> list[Figure]:
    """The CPU each event cost, per process: the worker's sets the most one worker
    process can apply in a second, however well it overlaps with the rest. And what
    the worker got done while the events came in: what it applies then need not be
    applied after."""
    applied = Figure("  applied while ingesting", result["applied_ingesting"] * 100, "%")
    if not apart:
        return [Figure("  CPU per event (the process)", result["ingest_cpu_us"], "us"), applied]
    return [
        Figure("  CPU per event, ingesting process", result["ingest_cpu_us"], "us"),
        Figure("  CPU per event, worker process", result["worker_cpu_us"], "us"),
        applied,
        Figure(
            "  worker process busy while ingesting (one core)",
            result["worker_ingesting_busy"] * 100,
            "%",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("leads", nargs="?", type=int, default=100_000)
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=POSTGRES_SERVER,
        metavar="SERVER_URL",
        help="also run on PostgreSQL (a database of the benchmark's own on this server)",
    )
    parser.add_argument("--headline", action="store_true", help="1,000,000 leads")
    parser.add_argument(
        "--worker-process",
        action="store_true",
        help="the worker in a process of its own, as `cjm serve --worker-process`",
    )
    parser.add_argument(
        "--lanes",
        type=int,
        metavar="N",
        help="the worker's batches of events in flight at once (default: its own)",
    )
    args = parser.parse_args()
    leads = 1_000_000 if args.headline else args.leads
    apart: bool = args.worker_process
    where = ", worker in its own process" if apart else ""
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}"
        result = uvloop.run(run(leads, url, worker_process=apart))
    figures.append(rate_figure(f"SQLite{where}", leads, result["seconds"], 20_000))
    figures.append(
        Figure("  of which ingestion alone", leads * 5 / result["ingest_seconds"], "ev/s")
    )
    figures.append(busy_figure(result))
    figures.extend(cpu_figures(result, apart))
    figures.append(
        Figure(
            "  wall time, first event to last stage",
            result["seconds"],
            "s",
            target="< 600 s" if args.headline else "",
            met=result["seconds"] < 600 if args.headline else None,
        )
    )
    if args.postgres:
        with scratch_postgres(args.postgres, "cjm_bench_e2e") as url:
            asyncio.run(upgrade(url))
            result = uvloop.run(run(leads, url, worker_process=apart, lanes=args.lanes))
        lanes = "" if args.lanes is None else f", {args.lanes} lane(s)"
        figures.append(rate_figure(f"PostgreSQL{where}{lanes}", leads, result["seconds"], 10_000))
        figures.append(busy_figure(result))
        figures.extend(cpu_figures(result, apart))
    figures.append(
        Figure(f"peak memory ({'ingesting ' if apart else ''}process)", peak_rss_mib(), "MiB")
    )
    name = "headline" if args.headline else "e2e"
    report(f"{name}_worker_process" if apart else name, figures)


if __name__ == "__main__":
    main()
