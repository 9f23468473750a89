"""The tracking API over real HTTP: `cjm serve` beside the floors it stands on.

A 200 from /v1/track or /v1/batch means the messages are committed, so this is where
the web stack, the key check, parsing and the group-committed inbox meet a client.
Each figure is put beside a baseline measured in the same run:

1. POST /v1/track: requests/s and p50/p99 latency of `cjm serve` (started as a user
   would, on a fresh SQLite file, with its worker) against bench/bare_app.py, a
   FastAPI route that only parses the body with orjson, served by uvicorn the way
   `cjm serve` serves cjm. Targets: at least 0.6 of the bare rate, p99 under 50 ms.
2. POST /v1/batch of 500 events: events/s stored by a fresh `cjm serve` against raw
   INSERTs of as many rows of the same shape into the same file's `events` table
   (stdlib sqlite3 with cjm's pragmas, 500 rows per transaction, the rows built
   before the clock starts). Target: at least 0.3 of raw. `--postgres` repeats it
   on PostgreSQL as README.md deploys cjm there: the API as `cjm serve --no-worker`
   and a `cjm worker` beside it applying the events while they arrive (on this
   machine's cores too); raw rows through asyncpg's executemany. Then the same with
   two API processes (the calls spread over them as a load balancer would), against
   the one: they race to create the same new leads, and every call must get a 200.

The client is a keep-alive HTTP/1.1 client on asyncio streams, one request in flight
per connection, in this process while each server has its own: httpx would spend
more CPU per request than the servers measured. Each run warms up, then counts the
answers that arrive within the measured span.

Run: `.venv/bin/python bench/tracking.py [--seconds 10] [--connections 16]
[--postgres [SERVER_URL]]` (under a minute on SQLite).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import orjson
import uvloop
from harness import (
    POSTGRES_SERVER,
    ROOT,
    Figure,
    Stopwatch,
    cpu_seconds,
    report,
    scratch_postgres,
)
from sqlalchemy.engine import make_url

from engine.db.database import SQLITE_PRAGMAS
from engine.db.types import to_micros

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
WRITE_KEY = "wk_bench_http_0123456789abcdef"
ADMIN_KEY = "ak_bench_http_0123456789abcdef"
AUTHORIZATION = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
WARMUP_S = 2.0
BATCH = 500
BATCH_CONNECTIONS = 4
# Drawn at random, so in a short run most calls come from a user cjm has not seen yet:
# the dearer path, where ingestion creates the lead and its identity.
USERS = 100_000
EVENTS = ("product_viewed", "catalog_requested", "cart_updated", "order_completed")
SOURCES = ("google", "facebook", "instagram", "newsletter")
EVENT_COLUMNS = (
    "message_id, lead_id, type, name, timestamp, received_at, user_id, anonymous_id, "
    "data, merge_lead_id, processed_at, error"
)
Row = tuple[Any, ...]


def track_call(rng: random.Random, message_id: str) -> dict[str, Any]:
    """One call as a shop's backend sends it: a known user, a product, the ad it came from."""
    return {
        "messageId": message_id,
        "userId": f"user-{rng.randrange(USERS)}",
        "event": rng.choice(EVENTS),
        "properties": {
            "product_id": f"door-{rng.randrange(400)}",
            "price": rng.randrange(300, 3000),
            "currency": "EUR",
            "form": "landing",
        },
        "context": {
            "campaign": {"source": rng.choice(SOURCES), "medium": "cpc", "name": "spring"},
            "ip": "203.0.113.7",
        },
    }


def track_bodies(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: orjson.dumps(track_call(rng, f"track-{n}"))


def batch_bodies(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: orjson.dumps(
        {"batch": [{"type": "track", **track_call(rng, f"batch-{n}-{i}")} for i in range(BATCH)]}
    )


def event_rows(count: int, seed: int) -> list[Row]:
    """`count` rows as cjm's inbox writes them (engine/ingest/inbox.py `insert_events`)."""
    rng = random.Random(seed)
    now = to_micros(datetime.now(UTC))
    rows: list[Row] = []
    for n in range(count):
        call = track_call(rng, f"raw-{n}")
        data = orjson.dumps({"properties": call["properties"], "context": call["context"]})
        lead_id = int(call["userId"].removeprefix("user-")) + 1
        # In EVENT_COLUMNS order; an identified track call has no anonymous id, no merge.
        rows.append(
            (
                call["messageId"],
                lead_id,
                "track",
                call["event"],
                now,
                now,
                call["userId"],
                None,
                data.decode(),
                None,
                None,
                None,
            )
        )
    return rows


# --- the client ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """What the client saw over the measured span, and what each side spent."""

    seconds: float
    accepted: int  # messages: one per track call, a batch's `accepted`
    latencies: list[float]  # seconds, of the answers counted
    client_cpu: float  # share of one core used by this process
    server_cpu: float  # cores used by the server processes, all threads
    server_peak_mib: float  # of the largest server process

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds

    def percentile_ms(self, percent: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[percent - 1] * 1000


class Refused(RuntimeError):
    """The server answered something other than 200: the run means nothing."""


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, await reader.readexactly(int(value))
    raise Refused(f"an answer without Content-Length: {head!r}")


async def drive(
    servers: Sequence[tuple[int, int]],
    path: str,
    body_of: Callable[[int], bytes],
    connections: int,
    seconds: float,
) -> Load:
    """Keep `connections` requests in flight for a warm-up and `seconds` more, spread
    evenly over `servers` (port, pid), as a load balancer would."""
    measure_from = time.perf_counter() + WARMUP_S
    until = measure_from + seconds
    numbers = itertools.count()
    latencies: list[float] = []
    accepted = 0

    async def connection(port: int) -> None:
        nonlocal accepted
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while time.perf_counter() < until:
                body = body_of(next(numbers))
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                    f"Authorization: {AUTHORIZATION}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                sent = time.perf_counter()
                writer.write(head.encode() + body)
                await writer.drain()
                status, answer = await _answer(reader)
                done = time.perf_counter()
                if status != 200:
                    raise Refused(f"POST {path} answered {status}: {answer[:300]!r}")
                if measure_from <= done <= until:
                    latencies.append(done - sent)
                    accepted += orjson.loads(answer).get("accepted", 1)
        finally:
            writer.close()

    # A server that stops answering fails the run instead of hanging it.
    async with asyncio.timeout(WARMUP_S + seconds + 60), asyncio.TaskGroup() as group:
        for number in range(connections):
            group.create_task(connection(servers[number % len(servers)][0]))
        pids = [pid for _, pid in servers]
        await asyncio.sleep(measure_from - time.perf_counter())
        client_from, server_from = time.process_time(), cpu_seconds(pids)
        await asyncio.sleep(until - time.perf_counter())
        client_cpu = (time.process_time() - client_from) / seconds
        server_cpu = (cpu_seconds(pids) - server_from) / seconds
    peak = max(_peak_mib(pid) for pid in pids)
    return Load(seconds, accepted, latencies, client_cpu, server_cpu, peak)


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


def cjm_env(database_url: str, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "CJM_DATABASE_URL": database_url,
        "CJM_PORT": str(port),
        "CJM_WRITE_KEY": WRITE_KEY,
        "CJM_ADMIN_KEY": ADMIN_KEY,
        "CJM_JOURNEYS_DIR": str(ROOT / "journeys"),
        "CJM_TEMPLATES_DIR": str(ROOT / "templates" / "emails"),
    }


def _answers_health(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as probe:
            probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return probe.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@contextmanager
def running(
    name: str, command: list[str], workdir: Path, env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Start `command` with its output in `workdir`/`name`.log; yield the process and
    the log's path, and always stop it."""
    log = workdir / f"{name}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        yield process, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def serving(
    name: str, command: list[str], port: int, workdir: Path, env: dict[str, str]
) -> Iterator[int]:
    """Start a server, wait until /healthz answers, yield its pid, and always stop it."""
    with running(name, command, workdir, env) as (process, log):
        deadline = time.monotonic() + 60
        while not _answers_health(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield process.pid


def cjm_load(
    database_url: str,
    workdir: Path,
    path: str,
    body_of: Callable[[int], bytes],
    connections: int,
    seconds: float,
    *serve_options: str,
    processes: int = 1,
) -> Load:
    """The load on `processes` `cjm serve` processes of one database, each on a port."""
    with ExitStack() as stack:
        servers = []
        for number in range(processes):
            port = free_port()
            command = [str(BIN / "cjm"), "serve", *serve_options]
            env = cjm_env(database_url, port)
            servers.append(
                (port, stack.enter_context(serving(f"cjm{number}", command, port, workdir, env)))
            )
        return uvloop.run(drive(servers, path, body_of, connections, seconds))


@contextmanager
def worker_alongside(database_url: str, workdir: Path) -> Iterator[None]:
    """A `cjm worker` on the database for as long as the block runs."""
    command = [str(BIN / "cjm"), "worker"]
    with running("worker", command, workdir, cjm_env(database_url, 0)) as (process, log):
        yield
        if process.poll() is not None:
            raise RuntimeError(f"cjm worker stopped:\n{log.read_text()[-2000:]}")


async def applied_events(url: str) -> int:
    connection = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM events WHERE processed_at IS NOT NULL"
        )
    finally:
        await connection.close()
    return count


def bare_load(workdir: Path, connections: int, seconds: float) -> Load:
    port = free_port()
    command = [sys.executable, str(ROOT / "bench" / "bare_app.py"), str(port)]
    with serving("bare", command, port, workdir, dict(os.environ)) as pid:
        return uvloop.run(drive([(port, pid)], "/v1/track", track_bodies(1), connections, seconds))


# --- the raw inserts -----------------------------------------------------------------------------


def raw_sqlite(path: Path, rows: list[Row]) -> float:
    """Seconds to insert `rows`, BATCH per transaction, on a connection set up as cjm's."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in SQLITE_PRAGMAS:
            connection.execute(pragma)
        insert = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({', '.join('?' * 12)})"
        with Stopwatch() as watch:
            for start in range(0, len(rows), BATCH):
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(insert, rows[start : start + BATCH])
                connection.execute("COMMIT")
    finally:
        connection.close()
    return watch.seconds


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def raw_postgres(url: str, rows: list[Row]) -> float:
    connection = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        placeholders = ", ".join(f"${i}" for i in range(1, 13))
        insert = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({placeholders})"
        with Stopwatch() as watch:
            for start in range(0, len(rows), BATCH):
                async with connection.transaction():
                    await connection.executemany(insert, rows[start : start + BATCH])
    finally:
        await connection.close()
    return watch.seconds


# --- the figures ---------------------------------------------------------------------------------


def spent(load: Load) -> dict[str, float]:
    """What each side used: the server's CPU per message varies less with the machine's
    other load than rates do, and a client near a full core would cap the rate."""
    return {
        "per_s": round(load.rate),
        "server_cpu_cores": round(load.server_cpu, 2),
        "server_cpu_ms_per_message": round(load.server_cpu / load.rate * 1000, 3),
        "client_cpu_core_share": round(load.client_cpu, 2),
    }


def track_figures(
    workdir: Path, connections: int, seconds: float, notes: dict[str, Any]
) -> list[Figure]:
    url = f"sqlite+aiosqlite:///{workdir / 'track.db'}"
    cjm = cjm_load(url, workdir, "/v1/track", track_bodies(1), connections, seconds)
    bare = bare_load(workdir, connections, seconds)
    notes["track"] = {"connections": connections, "cjm": spent(cjm), "bare": spent(bare)}
    p99 = cjm.percentile_ms(99)
    return [
        Figure(
            "POST /v1/track, SQLite",
            cjm.rate,
            "req/s",
            baseline=bare.rate,
            baseline_what=f"bare FastAPI route, same uvicorn; {connections} connections",
            target=">= 0.6 x bare",
            met=cjm.rate >= 0.6 * bare.rate,
        ),
        Figure("  p50 latency", cjm.percentile_ms(50), "ms", baseline=bare.percentile_ms(50)),
        Figure(
            "  p99 latency",
            p99,
            "ms",
            baseline=bare.percentile_ms(99),
            target="< 50 ms",
            met=p99 < 50,
        ),
        Figure("  cjm serve peak memory", cjm.server_peak_mib, "MiB"),
    ]


def batch_figure(label: str, cjm: Load, raw_seconds: float) -> Figure:
    raw_rate = cjm.accepted / raw_seconds
    return Figure(
        f"POST /v1/batch x{BATCH}, {label}",
        cjm.rate,
        "ev/s",
        baseline=raw_rate,
        baseline_what=f"raw INSERTs of as many rows, {BATCH} per commit",
        target=">= 0.3 x raw",
        met=cjm.rate >= 0.3 * raw_rate,
    )


def batch_sqlite(workdir: Path, seconds: float, notes: dict[str, Any]) -> Figure:
    path = workdir / "batch.db"
    url = f"sqlite+aiosqlite:///{path}"
    cjm = cjm_load(url, workdir, "/v1/batch", batch_bodies(2), BATCH_CONNECTIONS, seconds)
    notes["batch_sqlite"] = {"connections": BATCH_CONNECTIONS, "cjm": spent(cjm)}
    # cjm has stopped: the raw rows go into the same file, alone, as fast as they can.
    return batch_figure("SQLite", cjm, raw_sqlite(path, event_rows(cjm.accepted, 3)))


def batch_postgres(
    server: str, workdir: Path, seconds: float, notes: dict[str, Any]
) -> list[Figure]:
    """/v1/batch on PostgreSQL with one API process against raw INSERTs; then with two
    behind the client's round robin (as behind a load balancer) against the one. Each
    time a worker runs beside them, on a fresh database. The two processes' calls name
    the same users, new ones mostly: their groups race to create the same leads, and
    any answer but 200 fails the run."""
    one, raw_seconds = _batch_postgres_run(server, workdir, seconds, notes, processes=1)
    two, _ = _batch_postgres_run(server, workdir, seconds, notes, processes=2, raw=False)
    assert raw_seconds is not None
    return [
        batch_figure("PostgreSQL", one, raw_seconds),
        Figure(
            "  the same, 2 API processes",
            two.rate,
            "ev/s",
            baseline=one.rate,
            baseline_what="one API process; a cjm worker beside them both times",
        ),
    ]


def _batch_postgres_run(
    server: str,
    workdir: Path,
    seconds: float,
    notes: dict[str, Any],
    *,
    processes: int,
    raw: bool = True,
) -> tuple[Load, float | None]:
    """The load on `processes` `cjm serve --no-worker` with a `cjm worker`, and (`raw`)
    the seconds raw INSERTs then took for as many rows, on a database of their own."""
    with scratch_postgres(server, f"cjm_bench_tracking_{processes}") as url:
        upgraded = subprocess.run(
            [str(BIN / "cjm"), "db", "upgrade"],
            env=cjm_env(url, 0),
            capture_output=True,
            text=True,
        )
        if upgraded.returncode:
            raise RuntimeError(f"cjm db upgrade failed:\n{upgraded.stderr[-2000:]}")
        with worker_alongside(url, workdir):
            load = cjm_load(
                url,
                workdir,
                "/v1/batch",
                batch_bodies(4),
                BATCH_CONNECTIONS,
                seconds,
                "--no-worker",
                processes=processes,
            )
        notes[f"batch_postgres_{processes}_api"] = {
            "connections": BATCH_CONNECTIONS,
            "cjm": spent(load),
            # Applied by the worker while the API stored them: it was not idle.
            "events_applied_meanwhile": asyncio.run(applied_events(url)),
        }
        if not raw:
            return load, None
        return load, asyncio.run(raw_postgres(url, event_rows(load.accepted, 5)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured span of each run")
    parser.add_argument("--connections", type=int, default=16, help="for /v1/track")
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=POSTGRES_SERVER,
        metavar="SERVER_URL",
        help="also on PostgreSQL (a database of the benchmark's own on this server)",
    )
    args = parser.parse_args()
    notes: dict[str, Any] = {"warmup_s": WARMUP_S, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="cjm-bench-http-") as directory:
        workdir = Path(directory)
        figures = track_figures(workdir, args.connections, args.seconds, notes)
        figures.append(batch_sqlite(workdir, args.seconds, notes))
        if args.postgres:
            figures.extend(batch_postgres(args.postgres, workdir, args.seconds, notes))
    report("tracking", figures, notes)


if __name__ == "__main__":
    main()
