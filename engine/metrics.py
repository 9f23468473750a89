"""Prometheus metrics: what this process did (counters, histograms) and how much work
waits in the shared database (gauges, read when scraped).

Counters are per process, as Prometheus expects: `cjm serve` shows everything it does
at `/metrics`; a `cjm worker` started with `--metrics-port` serves its own. Queue
depths come from the database, so any API process reports them for the whole
deployment. Work is counted after its transaction commits: a rolled-back batch
counts nothing.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import start_http_server as _start_http_server

from engine.db.database import Database
from engine.db.queries import queue_depths

REGISTRY = CollectorRegistry()

EVENTS_INGESTED = Counter(
    "cjm_events_ingested",
    "Tracking messages committed to the inbox, by type (a repeated messageId counts again).",
    ["type"],
    registry=REGISTRY,
)
TRANSITIONS = Counter(
    "cjm_transitions",
    "Moves of leads between stages (entries and exits included), by journey.",
    ["journey"],
    registry=REGISTRY,
)
TIMERS_FIRED = Counter("cjm_timers_fired", "Stage timeouts that fired.", registry=REGISTRY)
TIMER_LAG = Histogram(
    "cjm_timer_lag_seconds",
    "How late a timeout fired after it fell due.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
    registry=REGISTRY,
)
EMAILS = Counter(
    "cjm_emails",
    "Email outcomes recorded by the sender, by status (sent, deferred, failed, ...).",
    ["status"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "cjm_queue_depth",
    "Work waiting in the database now, by queue.",
    ["queue"],
    registry=REGISTRY,
)


def count_ingested(types: Iterable[str]) -> None:
    # Counted per type first: a child's look-up and increment each take a lock, a cost
    # paid per group committed rather than per message.
    for type_, count in collections.Counter(types).items():
        EVENTS_INGESTED.labels(type_).inc(count)


def count_worker_batch(transitions: Mapping[str, int], timer_lags: Sequence[float]) -> None:
    for journey, count in transitions.items():
        TRANSITIONS.labels(journey).inc(count)
    if timer_lags:
        TIMERS_FIRED.inc(len(timer_lags))
    for lag in timer_lags:
        TIMER_LAG.observe(max(lag, 0.0))


def count_email(status: str) -> None:
    EMAILS.labels(status).inc()


async def render(db: Database, now: datetime) -> bytes:
    """The Prometheus text exposition, queue depths read from the database first."""
    async with db.read() as connection:
        depths = await queue_depths(connection, now)
    for queue, depth in depths.items():
        QUEUE_DEPTH.labels(queue).set(depth)
    return generate_latest(REGISTRY)


def serve_metrics(port: int, host: str) -> None:
    """Serve this process's counters on `port` (for `cjm worker`, which has no API)."""
    _start_http_server(port, addr=host, registry=REGISTRY)
