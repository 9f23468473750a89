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
from harness import POSTGRES_SERVER, Figure, report, scratch_postgres
from sqlalchemy import distinct, func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from engine.db.database import Database
from engine.db.migrate import upgrade
from engine.db.schema import emails, enrollments, events, goals, offer_codes, outbox, transitions
from engine.runtime import Runtime

WORKER_COUNTS = (1, 2, 4)
MOVES_PER_LEAD = 4  # entry, to landing, to nurturing, to customer
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Progress:
    pending: int  # every event not yet applied
    # Of them, the traffic's own: the channels' internal events (`email.sent`, ...) keep
    # coming while they work through the outbox, and are not the traffic measured.
    tracked_pending: int
    customers: int
    outbox_pending: int


async def progress(url: str) -> Progress:
    db = Database(url)
    try:
        async with db.read() as connection:
            pending = await connection.scalar(
                select(func.count()).where(events.c.processed_at.is_(None))
            )
            tracked_pending = await connection.scalar(
                select(func.count()).where(
                    events.c.processed_at.is_(None), events.c.type != "internal"
                )
            )
            customers = await connection.scalar(
                select(func.count()).where(
                    enrollments.c.journey_id == "doors", enrollments.c.stage == "customer"
                )
            )
            waiting = await connection.scalar(
                select(func.count()).where(outbox.c.status == "pending")
            )
        return Progress(
            int(pending or 0), int(tracked_pending or 0), int(customers or 0), int(waiting or 0)
        )
    finally:
        await db.close()


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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far, from /proc."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except (FileNotFoundError, PermissionError):
                continue
    return pids


def wait_until_done(url: str, leads: int, *, outbox_too: bool = False) -> None:
    """Until every lead is a customer and the traffic is applied; with `outbox_too`,
    until the channels are done too, and every event they reported is applied."""
    deadline = time.monotonic() + 1800
    while True:
        state = asyncio.run(progress(url))
        applied = state.tracked_pending == 0 and state.customers == leads
        if outbox_too:
            applied = applied and state.pending == 0 and state.outbox_pending == 0
        if applied:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not done after 30 minutes: {state}")
        time.sleep(0.25)


@dataclass(frozen=True)
class Run:
    workers: int
    seconds: float
    worker_cpu: float
    postgres_cpu: float


def run_workers(template: str, server: str, leads: int, count: int, directory: Path) -> Run:
    with scratch_postgres(server, f"cjm_bench_scale_{count}", template=template) as url:
        postgres_before = cpu_seconds(postgres_pids())
        workers = start_workers(url, count, directory)
        try:
            started = time.perf_counter()
            wait_until_done(url, leads)
            seconds = time.perf_counter() - started
            worker_cpu = cpu_seconds([worker.pid for worker in workers])
            postgres_cpu = cpu_seconds(postgres_pids()) - postgres_before
        finally:
            stop(workers)
        return Run(count, seconds, worker_cpu, postgres_cpu)


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


def kill_and_replace(template: str, server: str, leads: int, directory: Path) -> dict[str, int]:
    """Two workers; when a third of the events are applied, SIGKILL one and start a
    new one. Returns the exactly-once counts once all is done."""
    with scratch_postgres(server, "cjm_bench_scale_kill", template=template) as url:
        workers = start_workers(url, 2, directory, first=10)
        total = leads * 5
        try:
            while asyncio.run(progress(url)).pending > total * 2 // 3:
                time.sleep(0.1)
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
    single = events_total / runs[0].seconds
    figures = []
    for run in runs:
        rate = events_total / run.seconds
        busy = (run.worker_cpu + run.postgres_cpu) / (run.seconds * cores)
        figures.append(
            Figure(
                f"{run.workers} worker(s), events/s",
                rate,
                "ev/s",
                baseline=single,
                baseline_what=f"{runs[0].workers} worker(s)",
                target=">= 10,000 ev/s" if run.workers == max(args.workers) else "",
                met=rate >= 10_000 if run.workers == max(args.workers) else None,
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
        figures.append(Figure("  machine busy (all cores)", busy * 100, "%"))
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
