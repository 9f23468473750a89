"""Scale-out on PostgreSQL: end-to-end throughput with 1, 2 and 4 `cjm worker` processes.

The doors traffic of bench/e2e.py (N leads, five events each, every lead ending a
customer) is ingested once into a template database. Each run copies it and starts
W real `cjm worker` processes, exactly as a deployment would, and the clock runs
until every event of the traffic is applied and every lead is a customer (the
channels' own events, `email.sent` and the like, trickle in for as long as they work
through the outbox: they are not waited for). Beside the rate, the CPU
the workers and PostgreSQL used shows where it saturates: when workers times their CPU
share reach the machine's cores, more workers only queue for them.

Then the lease check: two workers, one killed with SIGKILL mid-run and replaced by
a new one. Every lead must still end with exactly its four moves, one goal, one
offer code and one thank-you email: nothing lost, nothing done twice.

Run: `.venv/bin/python bench/scaleout.py [leads] [--postgres SERVER_URL] [--workers N ...]`
(default 20000 leads on the server of CJM_TEST_POSTGRES_URL, else 127.0.0.1:5432; 1, 2
and 4 workers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from e2e import send, settings_for
from harness import (
    POSTGRES_SERVER,
    Figure,
    cpu_seconds,
    postgres_pids,
    report,
    scratch_postgres,
)
from sqlalchemy import distinct, func, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.sql.elements import ColumnElement

from engine.db.database import Database
from engine.db.migrate import upgrade
from engine.db.schema import emails, enrollments, events, goals, offer_codes, outbox, transitions
from engine.runtime import Runtime

WORKER_COUNTS = (1, 2, 4)
# The machine this busy (workers and PostgreSQL, over all its cores) has no core left for
# one more worker: what more workers add beyond is contention.
FULL_BUSY = 0.9
MOVES_PER_LEAD = 4  # entry, to landing, to nurturing, to customer


def pending(*, traffic_only: bool) -> ColumnElement[bool]:
    """Events not applied yet; with `traffic_only`, the traffic's own only: the channels'
    internal events (`email.sent`, ...) keep coming while they work through the outbox,
    and are not the traffic measured."""
    condition: ColumnElement[bool] = events.c.processed_at.is_(None)
    return condition & (events.c.type != "internal") if traffic_only else condition


async def count_pending(db: Database, *, traffic_only: bool) -> int:
    async with db.read() as connection:
        count = await connection.scalar(
            select(func.count()).where(pending(traffic_only=traffic_only))
        )
    return int(count or 0)


async def traffic_pending(url: str) -> int:
    db = Database(url)
    try:
        return await count_pending(db, traffic_only=True)
    finally:
        await db.close()


async def work_left(db: Database, leads: int, *, outbox_too: bool) -> str | None:
    """What is still to do, or None once every lead is a customer and the traffic is
    applied; with `outbox_too`, once the channels are done too and every event they
    reported is applied. Polled several times a second while the clock runs, so each
    read stops at the first sign of work left rather than counting it all: the
    database's CPU is part of what is measured."""
    async with db.read() as connection:
        customers = await connection.scalar(
            select(func.count()).where(
                enrollments.c.journey_id == "doors", enrollments.c.stage == "customer"
            )
        )
        if customers != leads:
            return f"{customers} of {leads} leads are customers"
        waiting = select(events.c.id).where(pending(traffic_only=not outbox_too)).limit(1)
        if await connection.scalar(waiting) is not None:
            return "events are pending"
        if outbox_too and await connection.scalar(
            select(outbox.c.id).where(outbox.c.status == "pending").limit(1)
        ):
            return "the outbox has pending rows"
    return None


async def ingest(url: str, leads: int) -> None:
    """The traffic, stored and not yet applied; then the statistics autovacuum would
    have gathered by the time a live deployment had taken in that much."""
    runtime = Runtime(settings_for(url), run_worker=False)
    await runtime.start()
    try:
        await send(runtime, leads)
    finally:
        await runtime.stop()
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text("ANALYZE"))
    finally:
        await engine.dispose()


def start_workers(
    url: str, count: int, directory: Path, first: int = 0
) -> list[subprocess.Popen[bytes]]:
    """`cjm worker` processes, returned once each has started (printed its banner)."""
    settings = settings_for(url)
    env = {
        **os.environ,
        "CJM_DATABASE_URL": url,
        "CJM_JOURNEYS_DIR": str(settings.journeys_dir),
        "CJM_TEMPLATES_DIR": str(settings.templates_dir),
        "CJM_WRITE_KEY": "wk_bench",
        "CJM_ADMIN_KEY": "ak_bench",
    }
    command = [str(Path(sys.executable).parent / "cjm"), "worker"]
    workers = []
    for index in range(first, first + count):
        log = (directory / f"worker-{index}.log").open("wb")
        # The working directory is the benchmark's: without CJM_SMTP_URL, emails are
        # written as files under var/outbox there.
        workers.append(
            subprocess.Popen(command, env=env, cwd=directory, stdout=log, stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + 60
    for index, worker in zip(range(first, first + count), workers, strict=True):
        log_path = directory / f"worker-{index}.log"
        while "journeys:" not in log_path.read_text():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"a worker did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
    return workers


def stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def wait_until_done(url: str, leads: int, *, outbox_too: bool = False) -> None:
    """Until `work_left` finds none (30 minutes at most)."""

    async def wait() -> None:
        db = Database(url)
        try:
            deadline = time.monotonic() + 1800
            while (left := await work_left(db, leads, outbox_too=outbox_too)) is not None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not done after 30 minutes: {left}")
                await asyncio.sleep(0.25)
        finally:
            await db.close()

    asyncio.run(wait())


@dataclass(frozen=True)
class Run:
    workers: int
    events: int  # the traffic's events applied while the clock ran
    seconds: float
    worker_cpu: float
    postgres_cpu: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def run_workers(template: str, server: str, leads: int, count: int, directory: Path) -> Run:
    with scratch_postgres(server, f"cjm_bench_scale_{count}", template=template) as url:
        workers = start_workers(url, count, directory)
        pids = [worker.pid for worker in workers]
        try:
            # The clock, and the CPU counted, start once every worker is up: their start
            # (imports, journeys) is not the throughput measured. The first ones up have
            # begun meanwhile, so the rate counts only what is applied from here on.
            worker_before = cpu_seconds(pids)
            postgres_before = cpu_seconds(postgres_pids())
            started = time.perf_counter()
            events = asyncio.run(traffic_pending(url))
            wait_until_done(url, leads)
            seconds = time.perf_counter() - started
            worker_cpu = cpu_seconds(pids) - worker_before
            postgres_cpu = cpu_seconds(postgres_pids()) - postgres_before
        finally:
            stop(workers)
        return Run(count, events, seconds, worker_cpu, postgres_cpu)


async def exactly_once(url: str, leads: int) -> dict[str, int]:
    db = Database(url)
    try:
        async with db.read() as connection:
            counts = {
                "moves": await connection.scalar(
                    select(func.count()).where(transitions.c.journey_id == "doors")
                ),
                "goals": await connection.scalar(
                    select(func.count()).where(goals.c.journey_id == "doors")
                ),
                "codes": await connection.scalar(select(func.count()).select_from(offer_codes)),
                "leads with a code": await connection.scalar(
                    select(func.count(distinct(offer_codes.c.lead_id)))
                ),
                "thank-you emails": await connection.scalar(
                    select(func.count()).where(emails.c.template == "order_thanks")
                ),
            }
    finally:
        await db.close()
    return {name: int(value or 0) for name, value in counts.items()}


async def until_pending_at_most(url: str, count: int) -> None:
    db = Database(url)
    try:
        while True:
            if await count_pending(db, traffic_only=False) <= count:
                return
            await asyncio.sleep(0.1)
    finally:
        await db.close()


def kill_and_replace(template: str, server: str, leads: int, directory: Path) -> dict[str, int]:
    """Two workers; when a third of the events are applied, SIGKILL one and start a
    new one. Returns the exactly-once counts once all is done."""
    with scratch_postgres(server, "cjm_bench_scale_kill", template=template) as url:
        workers = start_workers(url, 2, directory, first=10)
        total = leads * 5
        try:
            asyncio.run(until_pending_at_most(url, total * 2 // 3))
            workers[0].kill()  # SIGKILL: no goodbye, its transaction dies with it
            workers[0].wait()
            workers.extend(start_workers(url, 1, directory, first=12))
            wait_until_done(url, leads, outbox_too=True)
        finally:
            stop(workers)
        return asyncio.run(exactly_once(url, leads))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("leads", nargs="?", type=int, default=20_000)
    parser.add_argument("--postgres", default=POSTGRES_SERVER, metavar="SERVER_URL")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=list(WORKER_COUNTS),
        metavar="N",
        help="the worker counts to run, in order (default: 1 2 4)",
    )
    args = parser.parse_args()
    leads, server = args.leads, args.postgres
    cores = os.cpu_count() or 1
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        with scratch_postgres(server, "cjm_bench_scale_template") as template_url:
            asyncio.run(upgrade(template_url))
            asyncio.run(ingest(template_url, leads))
            template = "cjm_bench_scale_template"
            for count in args.workers:
                runs.append(run_workers(template, server, leads, count, directory))
                print(f"  {count} worker(s): {runs[-1]}", flush=True)
            counts = kill_and_replace(template, server, leads, directory)
    events_total = leads * 5
    single = runs[0].rate

    def busy(run: Run) -> float:
        return (run.worker_cpu + run.postgres_cpu) / (run.seconds * cores)

    figures = []
    for run in runs:
        figures.append(
            Figure(
                f"{run.workers} worker(s), events/s",
                run.rate,
                "ev/s",
                baseline=single,
                baseline_what=f"{runs[0].workers} worker(s)",
            )
        )
        figures.append(
            Figure(
                "  CPU s of the workers",
                run.worker_cpu,
                "s",
                baseline=run.postgres_cpu,
                baseline_what="CPU s of PostgreSQL",
            )
        )
        figures.append(Figure("  machine busy (all cores)", busy(run) * 100, "%"))
    # Where it saturates: the most events/s any count gave, and the first count that kept
    # the machine's cores full.
    best = max(runs, key=lambda run: run.rate)
    figures.append(
        Figure(
            f"most events/s: {best.workers} worker(s)",
            best.rate,
            "ev/s",
            target=">= 10,000 ev/s",
            met=best.rate >= 10_000,
        )
    )
    full = next((run for run in runs if busy(run) >= FULL_BUSY), None)
    shown = full or runs[-1]
    where = "full from" if full else "not full at"
    figures.append(Figure(f"  cores {where} {shown.workers} worker(s)", busy(shown) * 100, "%"))
    expected = {
        "moves": leads * MOVES_PER_LEAD,
        "goals": leads,
        "codes": leads,
        "leads with a code": leads,
        "thank-you emails": leads,
    }
    for name, want in expected.items():
        figures.append(
            Figure(
                f"killed + replaced: {name}",
                counts[name],
                "",
                baseline=want,
                baseline_what="expected, exactly once",
                target="equal",
                met=counts[name] == want,
            )
        )
    report("scaleout", figures, notes={"leads": leads, "events": events_total, "cores": cores})


if __name__ == "__main__":
    main()
