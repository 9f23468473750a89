"""Several `cjm worker` processes on one PostgreSQL: each lead's events once, in order."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engine.clock import SystemClock
from engine.config import Settings
from engine.db.database import Database
from engine.db.schema import enrollments, events, leads, transitions
from engine.ingest.messages import Message, parse_message
from engine.journey import load_journeys
from engine.runtime import Runtime
from tests.conftest import fresh_postgres_database

WORKERS = 3
LEADS = 1_000
STEPS = 5

CHAIN = (
    """\
id: chain
name: One stage per step
entry: {on: step, where: {properties.n: 1}}
stages:
"""
    + "".join(
        f"""  - id: s{n}
    phase: awareness
    transitions: [{{on: step, where: {{properties.n: {n + 1}}}, to: s{n + 1}}}]
"""
        for n in range(1, STEPS)
    )
    + f"""  - id: s{STEPS}
    phase: purchase
    transitions: [{{after: 1s, to: done}}]
  - id: done
    phase: retention
    terminal: true
"""
)


# Every tenth person is first seen on a second device, merged in after step 1.
def _two_devices(lead: int) -> bool:
    return lead % 10 == 0


def _message(lead: int, n: int, at: datetime, received: datetime) -> Message:
    ids = {"anonymousId": f"a{lead}"} if n == 1 and _two_devices(lead) else {"userId": f"u{lead}"}
    payload = {**ids, "event": "step", "properties": {"n": n}, "timestamp": at.isoformat()}
    return parse_message(payload, "track", received)


@pytest.fixture
def shared_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, migrated."""
    with fresh_postgres_database("cjm_workers") as url:
        yield url


@pytest.fixture
def journeys_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "journeys"
    directory.mkdir()
    (directory / "chain.yaml").write_text(CHAIN)
    (tmp_path / "templates").mkdir()
    return directory


@pytest.fixture
async def ingest(shared_database: str, journeys_dir: Path) -> AsyncIterator[Runtime]:
    """An inbox on the shared database, with no worker of its own."""
    settings = Settings(
        database_url=shared_database,
        journeys_dir=journeys_dir,
        templates_dir=journeys_dir.parent / "templates",
        write_key="wk_test",
        admin_key="ak_test",
    )
    runtime = Runtime(
        settings,
        journeys=load_journeys([journeys_dir], settings.templates_dir),
        run_worker=False,
    )
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def _start_workers(
    database_url: str, journeys_dir: Path, logs: Path, count: int = WORKERS, first: int = 0
) -> list[subprocess.Popen[bytes]]:
    """Start `count` workers and return once each is running (has printed its banner)."""
    env = {
        **os.environ,
        "CJM_DATABASE_URL": database_url,
        "CJM_JOURNEYS_DIR": str(journeys_dir),
        "CJM_TEMPLATES_DIR": str(journeys_dir.parent / "templates"),
        "CJM_WRITE_KEY": "wk_test",
        "CJM_ADMIN_KEY": "ak_test",
    }
    command = [sys.executable, "-c", "from engine.cli import main; main()", "worker"]
    indexes = range(first, first + count)
    workers = []
    for index in indexes:
        log = (logs / f"worker-{index}.log").open("wb")
        workers.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    for index, worker in zip(indexes, workers, strict=True):
        log_path = logs / f"worker-{index}.log"
        while "journeys:" not in log_path.read_text():
            assert worker.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "a worker did not start within 60 s"
            time.sleep(0.05)
    return workers


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.wait(timeout=30)


async def _send_steps(ingest: Runtime, after_step: Callable[[int], None] = lambda _: None) -> None:
    """Step by step, each lead's events arrive in order, interleaved with other leads',
    in small groups while the workers are busy with the previous ones: the same lead is
    pending again while a worker may still be processing it."""
    clock = SystemClock()
    start = clock.now() - timedelta(hours=1)
    # The other device's person is known by user id before anything happens.
    await ingest.inbox.accept(
        [
            parse_message({"userId": f"u{lead}"}, "identify", clock.now())
            for lead in range(LEADS)
            if _two_devices(lead)
        ]
    )
    for n in range(1, STEPS + 1):
        order = list(range(LEADS))
        random.Random(n).shuffle(order)
        at = start + timedelta(seconds=n)
        messages = [_message(lead, n, at, clock.now()) for lead in order]
        if n == 1:
            messages += [
                parse_message(
                    {
                        "userId": f"u{lead}",
                        "anonymousId": f"a{lead}",
                        "timestamp": (at + timedelta(milliseconds=500)).isoformat(),
                    },
                    "identify",
                    clock.now(),
                )
                for lead in order
                if _two_devices(lead)
            ]
        for offset in range(0, len(messages), 25):
            await ingest.inbox.accept(messages[offset : offset + 25])
        await asyncio.sleep(0.1)
        after_step(n)


@dataclass
class Settled:
    pending: int
    failed: int
    merged: int
    histories: dict[int, list[tuple[str | None, str | None]]]


async def _settle(database_url: str) -> Settled:
    """Wait (up to two minutes) until every event is applied and every run completed."""
    database = Database(database_url)
    try:
        deadline = time.monotonic() + 120
        while True:
            async with database.read() as connection:
                pending = await connection.scalar(
                    select(func.count()).where(events.c.processed_at.is_(None))
                )
                done = await connection.scalar(
                    select(func.count()).where(enrollments.c.state == "completed")
                )
            if (pending == 0 and done == LEADS) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        async with database.read() as connection:
            failed = await connection.scalar(
                select(func.count()).where(events.c.error.is_not(None))
            )
            merged = await connection.scalar(
                select(func.count()).where(leads.c.merged_into.is_not(None))
            )
            rows = await connection.execute(
                select(enrollments.c.lead_id, transitions.c.from_stage, transitions.c.to_stage)
                .join(enrollments, enrollments.c.id == transitions.c.enrollment_id)
                .order_by(enrollments.c.lead_id, transitions.c.at, transitions.c.id)
            )
            histories: dict[int, list[tuple[str | None, str | None]]] = {}
            for row in rows:
                histories.setdefault(row.lead_id, []).append((row.from_stage, row.to_stage))
    finally:
        await database.close()
    return Settled(int(pending or 0), int(failed or 0), int(merged or 0), histories)


def _assert_each_step_applied_once_in_order(settled: Settled) -> None:
    assert settled.pending == 0, f"{settled.pending} events were never processed"
    assert settled.failed == 0
    assert settled.merged == sum(1 for lead in range(LEADS) if _two_devices(lead))
    expected = [
        (None, "s1"),
        *((f"s{n}", f"s{n + 1}") for n in range(1, STEPS)),
        (f"s{STEPS}", "done"),
    ]
    assert len(settled.histories) == LEADS
    wrong = {lead: history for lead, history in settled.histories.items() if history != expected}
    assert not wrong, f"{len(wrong)} leads with a wrong history, e.g. {next(iter(wrong.items()))}"


async def test_three_workers_apply_every_event_timeout_and_merge_once_in_order(
    ingest: Runtime, shared_database: str, journeys_dir: Path, tmp_path: Path
) -> None:
    workers = _start_workers(shared_database, journeys_dir, tmp_path)
    try:
        await _send_steps(ingest)
        assert all(worker.poll() is None for worker in workers), "a worker died"
        settled = await _settle(shared_database)
    finally:
        _stop(workers)

    outputs = [(tmp_path / f"worker-{index}.log").read_text() for index in range(WORKERS)]
    assert all(worker.returncode == 0 for worker in workers), outputs
    _assert_each_step_applied_once_in_order(settled)


async def test_a_worker_killed_mid_work_is_replaced_and_no_event_is_lost_or_applied_twice(
    ingest: Runtime, shared_database: str, journeys_dir: Path, tmp_path: Path
) -> None:
    workers = _start_workers(shared_database, journeys_dir, tmp_path, count=2)
    killed: list[int] = []

    def kill_one_and_replace_it(step: int) -> None:
        # Mid-traffic: both workers are busy with the first steps, more are to come.
        if step == 2:
            victim = workers.pop(0)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            killed.append(victim.returncode)
            workers.extend(_start_workers(shared_database, journeys_dir, tmp_path, 1, first=2))

    try:
        await _send_steps(ingest, kill_one_and_replace_it)
        settled = await _settle(shared_database)
    finally:
        _stop(workers)

    assert killed == [-signal.SIGKILL]
    _assert_each_step_applied_once_in_order(settled)
