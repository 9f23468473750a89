"""Periodic work on APScheduler, the way every engine job wants it: never two runs of
a job at once, and runs missed while one was busy folded into the next."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from apscheduler.schedulers.asyncio import AsyncIOScheduler

Job = Callable[[], Awaitable[None]]


def _not_a_skipped_run(record: logging.LogRecord) -> bool:
    # With max_instances=1 a run that finds the last one still busy is skipped by design
    # (a long sweep under load); APScheduler would log a warning for each one.
    return "maximum number of running instances reached" not in record.getMessage()


logging.getLogger("apscheduler.scheduler").addFilter(_not_a_skipped_run)


def start_periodic(jobs: Iterable[tuple[str, Job]], seconds: float) -> AsyncIOScheduler:
    """A started scheduler running each (name, job) every `seconds`."""
    scheduler = AsyncIOScheduler()
    for name, job in jobs:
        scheduler.add_job(
            job,
            "interval",
            seconds=seconds,
            id=name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
    scheduler.start()
    return scheduler
