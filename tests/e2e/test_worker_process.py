"""`cjm serve --worker-process` runs its worker as a child process: started with the
server, stopped with it however the server ends, and replaced when it dies alone.
Without the option, `cjm serve` is one process."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import Server

Serve = Callable[..., Server]

JOURNEY = """\
id: visits
name: Visitors of the catalog
entry: {on: page, where: {properties.path: {startswith: /catalog}}}
stages:
  - id: browsing
    phase: awareness
    transitions: [{on: signed_up, to: trial}]
  - id: trial
    phase: consideration
    terminal: true
"""


def _journeys(tmp_path: Path) -> dict[str, str]:
    directory = tmp_path / "journeys"
    directory.mkdir(exist_ok=True)
    (directory / "visits.yaml").write_text(JOURNEY)
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    return {"CJM_JOURNEYS_DIR": str(directory), "CJM_TEMPLATES_DIR": str(templates)}


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux: /proc)."""
    found: list[int] = []
    for tasks in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # the thread or the process ended meanwhile
            found.extend(int(child) for child in tasks.read_text().split())
    return [child for child in found if _alive(child)]


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().rstrip("\0").split("\0")


def _worker_of(server: Server) -> int:
    """The server's worker process, once it runs."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        workers = [
            child for child in _children(server.process.pid) if "worker" in _command_line(child)
        ]
        if workers:
            (worker,) = workers
            return worker
        time.sleep(0.05)
    raise AssertionError(f"cjm serve has no worker process:\n{server.log.read_text()}")


def _wait_until_gone(pid: int) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _stage_of(server: Server, user_id: str) -> str | None:
    found = server.admin(f"/v1/leads?user_id={user_id}").json()
    if not found:
        return None
    journeys = server.admin(f"/v1/leads/{found[0]['id']}").json()["journeys"]
    return str(journeys[0]["stage"]) if journeys else None


def _processed(server: Server, user_id: str) -> bool:
    """Send a lead's first page view; whether the worker enrolls it (15 s for liveness)."""
    response = server.track("/v1/page", {"userId": user_id, "properties": {"path": "/catalog"}})
    assert response.status_code == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _stage_of(server, user_id) == "browsing":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_worker_process_stops_with_the_server(
    serve: Serve, database_url: str, tmp_path: Path, signum: signal.Signals
) -> None:
    server = serve("--worker-process", CJM_DATABASE_URL=database_url, **_journeys(tmp_path))
    worker = _worker_of(server)
    assert _processed(server, "u1"), server.log.read_text()

    server.process.send_signal(signum)
    server.process.wait(timeout=60)

    # Stopped gracefully, then ended by the signal as uvicorn does: its status says so.
    ended_by = {signal.SIGTERM: -signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
    assert server.process.returncode == ended_by[signum], server.log.read_text()
    assert _wait_until_gone(worker), f"worker {worker} outlived its server"
    assert "did not stop" not in server.log.read_text()  # it stopped when asked, not killed


def test_a_killed_server_leaves_no_worker_behind(
    serve: Serve, database_url: str, tmp_path: Path
) -> None:
    server = serve("--worker-process", CJM_DATABASE_URL=database_url, **_journeys(tmp_path))
    worker = _worker_of(server)

    server.process.kill()
    server.process.wait(timeout=30)

    assert _wait_until_gone(worker), f"worker {worker} outlived its killed server"
    assert "the server process is gone" in server.log.read_text()


def test_a_worker_process_that_dies_is_replaced(
    serve: Serve, database_url: str, tmp_path: Path
) -> None:
    server = serve("--worker-process", CJM_DATABASE_URL=database_url, **_journeys(tmp_path))
    first = _worker_of(server)

    os.kill(first, signal.SIGKILL)
    assert _wait_until_gone(first)
    second = _worker_of(server)

    assert second != first
    assert _processed(server, "u2"), server.log.read_text()
    assert "the worker process was killed by SIGKILL" in server.log.read_text()


def test_serve_without_a_worker_starts_no_worker_process(
    serve: Serve, database_url: str, tmp_path: Path
) -> None:
    server = serve("--no-worker", CJM_DATABASE_URL=database_url, **_journeys(tmp_path))
    response = server.track("/v1/page", {"userId": "u3", "properties": {"path": "/catalog"}})

    assert response.status_code == 200
    assert _children(server.process.pid) == []


def test_serve_is_one_process_by_default_and_processes_events(
    serve: Serve, database_url: str, tmp_path: Path
) -> None:
    server = serve(CJM_DATABASE_URL=database_url, **_journeys(tmp_path))

    assert _processed(server, "u4"), server.log.read_text()
    assert _children(server.process.pid) == []
