"""A real `cjm serve` process on a free port, spoken to over real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

WRITE_KEY = "wk_e2e_write"
ADMIN_KEY = "ak_e2e_admin"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cjm(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.Popen[str]:
    """The `cjm` command of this checkout, as a user runs it."""
    command = [sys.executable, "-c", "from engine.cli import main; main()", *args]
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        command, env={**os.environ, **env}, text=True, **kwargs
    )


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def track(self, path: str, payload: dict[str, object]) -> httpx.Response:
        with self.client() as client:
            return client.post(path, json=payload, auth=(WRITE_KEY, ""))

    def admin(self, path: str) -> httpx.Response:
        with self.client() as client:
            return client.get(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})


def start_server(
    env: dict[str, str], log: Path, cwd: Path | None = None, args: tuple[str, ...] = ()
) -> Server:
    """`cjm serve [args]` on a free port, answering; run in `cwd` when given (where it
    writes var/outbox), else in this one."""
    port = free_port()
    output = log.open("w")
    process = cjm(
        "serve",
        *args,
        env={
            "CJM_HOST": "127.0.0.1",
            "CJM_PORT": str(port),
            "CJM_WRITE_KEY": WRITE_KEY,
            "CJM_ADMIN_KEY": ADMIN_KEY,
            **env,
        },
        stdout=output,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"cjm serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"cjm serve did not answer within 30 s:\n{log.read_text()}")


def refused_start(args: tuple[str, ...], env: dict[str, str]) -> tuple[int, str]:
    """Run a `cjm` command that should exit on its own: its exit code and stderr.
    Killed if it is still running after a minute (it started when it should not have)."""
    process = cjm(*args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """Start servers for the test; every one is stopped at the end."""
    started: list[Server] = []

    def start(*args: str, **env: str) -> Server:
        server = start_server(env, tmp_path / f"serve-{len(started)}.log", args=args)
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server)
