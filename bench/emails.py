"""Email sending: nurture emails/s from queued to recorded as sent, against raw SMTP.

N leads of the doors journey download the catalog: the worker takes each into
`nurturing`, which grants the free-installation offer and starts the `door_tips`
sequence, and dispatching queues the sequence's first email (`catalog`, showing the
lead's code), as a running email channel does. (A line of its own shows how fast that
dispatch went, leads/s beside the worker's.) The clock then runs while the channel
sends them all: claim under a lease, pace (sending window), render the Jinja2
template, send the links through click tracking, add the open pixel and one-click
unsubscribe, hand the message to SMTP, and record the outcome with the run's next
step, the KPI count and the `email.sent` event.

The floor is aiosmtplib alone sending one message cjm built to as many recipients,
prepared before its clock starts, over as many connections as cjm's transport keeps
open. Both send to the same
aiosmtpd server, which runs in a process of its own on the other core and only counts
what it accepts: each side must land exactly N messages there. Every side runs on
uvloop, as `cjm serve` and `cjm worker` run the sender: the server too, so that the
floor is as high as this machine allows.

Run: `.venv/bin/python bench/emails.py [emails]` (default 2000). Not named email.py:
with bench/ first on sys.path, that file would stand in for the standard library's
`email` package in every benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import Envelope, Session
from aiosmtplib import SMTP
from harness import ROOT, Figure, Stopwatch, peak_rss_mib, report
from sqlalchemy import func, select

from channels.email.message import build_message
from channels.email.sender import SENT
from channels.email.templates import OfferView
from channels.email.transport import SmtpTransport
from engine.clock import ManualClock
from engine.config import Settings
from engine.db.schema import emails
from engine.ingest.messages import parse_batch
from engine.runtime import Runtime, tune_garbage_collector

# A Tuesday at 10:00 UTC: inside door_tips' sending window (09:00-20:00, Monday to
# Saturday) for leads without a timezone, so pacing holds no email back.
NOW = datetime(2026, 11, 3, 10, 0, tzinfo=UTC)
SENDER = "Portal Doors <news@doors.example>"
TEMPLATE = "catalog"
BATCH = 500  # events per /v1/batch call
# The connections cjm's transport keeps open unless told otherwise.
CONNECTIONS: int = inspect.signature(SmtpTransport).parameters["concurrency"].default
TARGET = 0.8

# (envelope sender, recipients, the message as sent)
Prepared = tuple[str, list[str], bytes]


def two_cores() -> tuple[set[int], set[int]]:
    """A core for the server and another for the sender, so neither slows the other;
    on a single core they share it."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return set(available), set(available)
    return {available[0]}, {available[1]}


# --- the server: its own process, counting what it accepts -------------------------------------


class Sink:
    """An aiosmtpd handler that accepts every message and only counts it."""

    def __init__(self, received: Synchronized[int]) -> None:
        self.received = received

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        self.received.value += 1
        return "250 OK"


def serve(cores: set[int], received: Synchronized[int], port: Connection, stop: Event) -> None:
    """The server process: sends its port through `port`, then serves until `stop`."""
    os.sched_setaffinity(0, cores)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        sink = Sink(received)
        # A fixed hostname: aiosmtpd would otherwise look the machine's up per connection.
        server = await loop.create_server(
            lambda: SmtpServer(sink, hostname="bench.localhost"), "127.0.0.1", 0
        )
        port.send(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, stop.wait)
        server.close()
        await server.wait_closed()

    uvloop.run(run())


# --- cjm: leads taken into nurturing, their emails queued, then sent ----------------------------


def lead_calls(n: int) -> list[dict[str, Any]]:
    """Lead n opens the catalog, leaves an email address and requests the catalog."""
    anonymous = f"anon-{n}"
    at = NOW - timedelta(minutes=10) + timedelta(milliseconds=n)

    def call(seconds: int, kind: str, **fields: Any) -> dict[str, Any]:
        stamp = (at + timedelta(seconds=seconds)).isoformat()
        return {"type": kind, "anonymousId": anonymous, "timestamp": stamp, **fields}

    return [
        call(0, "page", properties={"path": "/catalog/steel"}),
        call(
            5,
            "identify",
            userId=f"user-{n}",
            traits={"email": f"lead.{n}@example.com", "first_name": "Sam"},
        ),
        call(10, "track", userId=f"user-{n}", event="catalog_requested"),
    ]


async def queue_emails(runtime: Runtime, count: int) -> dict[str, float]:
    """Events in through the inbox, leads moved by the worker, emails queued by dispatch;
    the seconds the worker and the dispatch took."""
    calls = [call for n in range(count) for call in lead_calls(n)]
    for start in range(0, len(calls), BATCH):
        batch = parse_batch({"batch": calls[start : start + BATCH]}, runtime.clock.now())
        assert not batch.rejected, batch.rejected[:3]
        await runtime.inbox.accept(batch.messages)
    with Stopwatch() as worker:
        await runtime.worker.drain()
    with Stopwatch() as dispatch:
        await runtime.email.dispatch_all()
    queued = await count_emails(runtime, "queued")
    assert queued == count, f"{queued} of {count} emails queued"
    return {"worker": worker.seconds, "dispatch": dispatch.seconds}


async def count_emails(runtime: Runtime, status: str) -> int:
    async with runtime.db.read() as connection:
        found = await connection.scalar(
            select(func.count())
            .select_from(emails)
            .where(emails.c.template == TEMPLATE, emails.c.status == status)
        )
    return int(found or 0)


# --- the floor: aiosmtplib alone, on the same server -------------------------------------------


def prepared(runtime: Runtime, count: int) -> list[Prepared]:
    """One catalog email as cjm builds it, to `count` recipients. The server only counts,
    so one message body serves them all: what SMTP costs depends on its size."""
    links = runtime.links
    rendered = runtime.email.sender.templates.render(
        TEMPLATE,
        lead={"email": "lead.0@example.com", "first_name": "Sam"},
        offer=OfferView("DOORS-7KQ4PX", "Free installation", NOW + timedelta(days=5)),
        journey=("doors", "Entry doors"),
        stage=("nurturing", "Tips on fittings, locks and alarms"),
        unsubscribe_url=links.unsubscribe(0, 0),
    )
    message = build_message(
        rendered,
        sender=SENDER,
        to="lead.0@example.com",
        message_id="<0123456789abcdef0123456789abcdef.0@doors.example>",
        unsubscribe_url=links.unsubscribe(0, 0),
        click_url=lambda url: links.click(0, 0, url),
        open_pixel_url=links.open_pixel(0, 0),
        now=NOW,
    )
    return [(message.envelope_from, [f"lead.{n}@example.com"], message.data) for n in range(count)]


async def send_raw(port: int, messages: list[Prepared]) -> None:
    """Each connection, kept open throughout, sends the next message left until none are,
    with the commands cjm's transport writes (MAIL with its SIZE, RCPT, DATA) and no
    more: not through `sendmail`, which parses the addresses and rewrites the line
    endings again, work cjm's transport leaves out."""
    waiting: Iterator[Prepared] = iter(messages)

    async def connection() -> None:
        client = SMTP(hostname="127.0.0.1", port=port)
        await client.connect()
        await client.ehlo()
        for sender, recipients, wire in waiting:
            await client.mail(sender, options=[f"SIZE={len(wire)}"])
            for recipient in recipients:
                await client.rcpt(recipient)
            await client.data(wire)
        await client.quit()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))


# --- the run -----------------------------------------------------------------------------------


async def run(count: int, port: int, received: Synchronized[int]) -> dict[str, float]:
    """Emails/s of cjm and of the floor, each counted at the server."""
    with tempfile.TemporaryDirectory() as directory:
        settings = Settings(
            database_url=f"sqlite+aiosqlite:///{Path(directory) / 'bench.db'}",
            journeys_dir=ROOT / "journeys",
            templates_dir=ROOT / "templates" / "emails",
            smtp_url=f"smtp://127.0.0.1:{port}",
            email_from=SENDER,
            base_url="https://cjm.doors.example",
        )
        # No background jobs: each step below runs when the one before it is done.
        runtime = Runtime(settings, clock=ManualClock(NOW), run_worker=False)
        await runtime.start()
        tune_garbage_collector()  # as `cjm serve` and `cjm worker` do once started
        try:
            queuing = await queue_emails(runtime, count)
            messages = prepared(runtime, count)

            before = received.value
            with Stopwatch() as raw:
                await send_raw(port, messages)
            assert received.value - before == count, f"raw: {received.value - before} received"

            before = received.value
            with Stopwatch() as cjm:
                await runtime.email.send_all()
            assert received.value - before == count, f"cjm: {received.value - before} received"
            sent = await count_emails(runtime, SENT)
            assert sent == count, f"{sent} of {count} emails recorded as sent"
        finally:
            await runtime.stop()
    return {
        "cjm": count / cjm.seconds,
        "raw": count / raw.seconds,
        "dispatch": count / queuing["dispatch"],
        "worker": count / queuing["worker"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("emails", nargs="?", type=int, default=2_000)
    count: int = parser.parse_args().emails
    server_cores, sender_cores = two_cores()
    # Spawned, not forked: the server starts from a clean interpreter.
    context = multiprocessing.get_context("spawn")
    received = context.Value("q", 0)
    ours, theirs = context.Pipe()
    stop = context.Event()
    server = context.Process(
        target=serve, args=(server_cores, received, theirs, stop), name="smtp-sink"
    )
    server.start()
    # Only the server holds its end now: if it dies before answering, recv() raises.
    theirs.close()
    try:
        port = ours.recv()
        os.sched_setaffinity(0, sender_cores)
        rates = uvloop.run(run(count, port, received))
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.kill()
            server.join()
    report(
        "email",
        [
            Figure(
                f"{count:,} nurture emails, SQLite",
                rates["cjm"],
                "emails/s",
                baseline=rates["raw"],
                baseline_what=f"aiosmtplib alone, a pre-built message, {CONNECTIONS} connections",
                target=f">= {TARGET} x baseline",
                met=rates["cjm"] >= TARGET * rates["raw"],
            ),
            Figure(
                f"  dispatch before sending, {count:,} leads",
                rates["dispatch"],
                "leads/s",
                baseline=rates["worker"],
                baseline_what="the worker taking the same leads to their stage",
            ),
            Figure("peak memory (sender process)", peak_rss_mib(), "MiB"),
        ],
    )


if __name__ == "__main__":
    main()
