"""What a worker batch costs: fixed, whatever it holds, and per lead.

A backlog of tracked events (the calls `tracking.py` sends: users drawn from 100,000)
is written through the inbox, then the worker's `process_events` takes it with
batches held at a given number of leads until none is left, and the CPU of this
process is read around it (all its threads: the event loop's and SQLite's).

Under tracking traffic the inbox waits for the worker's batches, which are then sized
to 10 ms and hold a few dozen leads: a batch's fixed cost is paid many times a
second. The baseline is the same leads' share of the CPU of batches of 1,000 leads,
where the fixed cost is spread thin: the ratio says how much dearer a lead is in a
small batch. The fixed cost itself is worked out from the two sizes.

Run: `.venv/bin/python bench/batches.py [--events 20000] [--small 20]` (SQLite, on
uvloop as cjm runs; about half a minute).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import uvloop
from e2e import any_pending, event_worker, settings_for
from harness import Figure, report
from tracking import track_call

from engine.db.migrate import upgrade
from engine.ingest.messages import parse_batch
from engine.runtime import Runtime, tune_garbage_collector
from engine.worker.batching import BatchSize

LARGE = 1_000
CALLS_PER_BATCH = 500  # as /v1/batch hands them to the inbox


async def cpu_per_batch(directory: Path, events: int, leads_per_batch: int) -> tuple[float, int]:
    """CPU seconds per batch, and how many leads the batches took in all."""
    url = f"sqlite+aiosqlite:///{directory / f'batches-{leads_per_batch}.db'}"
    await upgrade(url)
    runtime = Runtime(settings_for(url), run_worker=False)
    await runtime.start()
    tune_garbage_collector()  # as `cjm serve` does once started
    try:
        rng = random.Random(7)  # the same backlog for every size
        for start in range(0, events, CALLS_PER_BATCH):
            calls = [
                {"type": "track", **track_call(rng, f"m-{start + n}")}
                for n in range(min(CALLS_PER_BATCH, events - start))
            ]
            batch = parse_batch({"batch": calls}, runtime.clock.now())
            await runtime.inbox.accept(batch.messages)
        processor = event_worker(runtime).processor
        processor.event_batches = BatchSize(
            smallest=leads_per_batch, first=leads_per_batch, largest=leads_per_batch
        )
        batches = leads = 0
        cpu = time.process_time()  # every thread of the process: the loop's and SQLite's
        while taken := await processor.process_events():
            batches += 1
            leads += taken
        cpu = time.process_time() - cpu
        assert not await any_pending(runtime), "a batch took no lead with events left"
        return cpu / batches, leads
    finally:
        await runtime.stop()


async def bench(events: int, small: int) -> list[Figure]:
    with tempfile.TemporaryDirectory() as directory:
        small_cpu, leads = await cpu_per_batch(Path(directory), events, small)
        large_cpu, same_leads = await cpu_per_batch(Path(directory), events, LARGE)
    assert leads == same_leads, (leads, same_leads)
    # cpu = fixed + per_lead * leads, from the two sizes.
    per_lead = (large_cpu - small_cpu) / (LARGE - small)
    fixed = small_cpu - per_lead * small
    return [
        Figure(
            f"CPU per batch of {small} leads",
            small_cpu * 1000,
            "ms",
            baseline=large_cpu / LARGE * small * 1000,
            baseline_what=f"the same leads' share of batches of {LARGE:,}",
        ),
        Figure("  of which fixed, per batch", fixed * 1000, "ms"),
        Figure("  per lead", per_lead * 1e6, "us"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="tracked events pending")
    parser.add_argument("--small", type=int, default=20, help="leads in a small batch")
    args = parser.parse_args()
    figures = uvloop.run(bench(args.events, args.small))  # the loop cjm runs on
    report("batches", figures, {"events": args.events, "large_batch_leads": LARGE})


if __name__ == "__main__":
    main()
