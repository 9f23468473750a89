"""Real faults for real processes: `cjm` killed with SIGKILL, SMTP servers that go down
or refuse, databases that drop their connections, a disk that fills up.

A `cjm` process is started in a session of its own, and killed with every process
it started (a worker child may run in a session of its own too) at once, as a power
cut would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import text

from engine.db.database import Database
from tests.e2e.conftest import ADMIN_KEY, WRITE_KEY, free_port

CJM = [sys.executable, "-c", "from engine.cli import main; main()"]
# The same, first limiting the size of any file it writes (Python ignores SIGXFSZ, so a
# write past the limit fails with EFBIG, as on a full disk). Only the soft limit, which
# the test may lift again while it runs: room on the disk again.
CJM_LIMITED = (
    "import resource, sys; limit = int(sys.argv.pop(1)); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)); "
    "from engine.cli import main; main()"
)


# --- a real SMTP server that can misbehave ------------------------------------------------------


@dataclass
class Mailbox:
    """An aiosmtpd handler that keeps every message it accepted and counts every attempt
    to deliver one (each MAIL command, which starts a message).

    It answers `refusal` to the first `refuse_first` attempts, at `refuse_at` ("mail":
    the sender, "rcpt": the address, "data": the message), and to every attempt while
    `refuse_always` is set."""

    refusal: str = "451 4.3.0 try again later"
    refuse_first: int = 0
    refuse_always: bool = False
    refuse_at: str = "data"
    attempts: int = 0
    messages: list[EmailMessage] = field(default_factory=list)
    # Cleared, the server holds every message at DATA until it is set: a slow server.
    gate: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.gate.set()

    def _refuses(self, stage: str) -> bool:
        return stage == self.refuse_at and (
            self.refuse_always or self.attempts <= self.refuse_first
        )

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        with self._lock:
            self.attempts += 1
            if self._refuses("mail"):
                return self.refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        with self._lock:
            if self._refuses("rcpt"):
                return self.refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.to_thread(self.gate.wait)
        with self._lock:
            if self._refuses("data"):
                return self.refusal
            assert isinstance(envelope.content, bytes)
            message = message_from_bytes(envelope.content, policy=default)
            assert isinstance(message, EmailMessage)
            self.messages.append(message)
        return "250 OK"

    def received(self) -> list[EmailMessage]:
        with self._lock:
            return list(self.messages)

    def copies(self) -> Counter[tuple[str, str]]:
        """How many messages each (recipient, subject) pair received."""
        return Counter((str(m["To"]), str(m["Subject"])) for m in self.received())

    def wait_for(self, condition: Callable[[list[EmailMessage]], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not condition(self.received()):
            assert time.monotonic() < deadline, (
                f"the mailbox never got there: {len(self.received())} messages, "
                f"{self.attempts} attempts"
            )
            time.sleep(0.1)


class SmtpServer:
    """A Mailbox behind aiosmtpd on a port chosen up front, so it can be stopped and
    started again on the same port while `cjm` keeps its URL."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        self._controller: Controller | None = None

    def start(self) -> None:
        self._controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    server = SmtpServer(Mailbox())
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- real cjm processes ------------------------------------------------------------------------


@dataclass
class Process:
    """A `cjm` command running in a session (and process group) of its own."""

    popen: subprocess.Popen[bytes]
    log: Path
    url: str | None = None  # where it answers HTTP, for `serve`

    def kill(self) -> None:
        """SIGKILL to the command, its process group and every process it started, all
        found before the first dies (an orphan would be re-parented out of reach)."""
        tree = process_tree(self.popen.pid)
        with _no_such_process():
            os.killpg(self.popen.pid, signal.SIGKILL)
        for pid in tree:
            with _no_such_process():
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in tree):
            assert time.monotonic() < deadline, f"processes {tree} survived SIGKILL"
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL if it has not ended within 20 s."""
        if self.popen.poll() is None:
            with _no_such_process():
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=20)
        self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        assert self.url is not None
        return httpx.post(f"{self.url}{path}", json=payload, auth=(WRITE_KEY, ""), timeout=30)


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (in parentheses) may hold spaces: the fields follow its end.
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has died already)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class _no_such_process:
    """Tolerates a process group that is gone already."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is ProcessLookupError


def cjm_env(database_url: str, directory: Path, smtp_url: str | None) -> dict[str, str]:
    """The environment of a `cjm` process on `database_url`, with the journeys and
    templates `write_journeys` put in `directory`, mailing `smtp_url` (None: .eml files)."""
    env = {
        **os.environ,
        "CJM_DATABASE_URL": database_url,
        "CJM_JOURNEYS_DIR": str(directory / "journeys"),
        "CJM_TEMPLATES_DIR": str(directory / "templates"),
        "CJM_WRITE_KEY": WRITE_KEY,
        "CJM_ADMIN_KEY": ADMIN_KEY,
        "CJM_HOST": "127.0.0.1",
    }
    if smtp_url is not None:
        env["CJM_SMTP_URL"] = smtp_url
    return env


@dataclass
class Launcher:
    """Starts `cjm` processes for one test and stops every one of them at the end."""

    directory: Path
    started: list[Process] = field(default_factory=list)

    def serve(self, env: dict[str, str], *args: str, file_size_limit: int | None = None) -> Process:
        """`cjm serve` on a free port, once it answers /healthz. With `file_size_limit`,
        no file it writes may grow past that many bytes (writes past it fail with EFBIG,
        as on a full disk)."""
        port = free_port()
        process = self._start(["serve", *args], {**env, "CJM_PORT": str(port)}, file_size_limit)
        process.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if process.popen.poll() is not None:
                pytest.fail(
                    f"cjm serve exited with {process.popen.returncode}:\n{process.output()}"
                )
            try:
                if httpx.get(f"{process.url}/healthz", timeout=2).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"cjm serve never answered:\n{process.output()}"
            time.sleep(0.1)

    def worker(self, env: dict[str, str]) -> Process:
        """`cjm worker`, once it has printed its banner (it is running)."""
        process = self._start(["worker"], env, None)
        deadline = time.monotonic() + 60
        while "journeys:" not in process.output():
            assert process.popen.poll() is None, process.output()
            assert time.monotonic() < deadline, f"cjm worker never started:\n{process.output()}"
            time.sleep(0.05)
        return process

    def _start(self, args: list[str], env: dict[str, str], file_size_limit: int | None) -> Process:
        log = self.directory / f"{args[0]}-{len(self.started)}.log"
        command = [*CJM, *args]
        if file_size_limit is not None:
            command = [sys.executable, "-c", CJM_LIMITED, str(file_size_limit), *args]
        with log.open("wb") as output:
            popen = subprocess.Popen(
                command,
                env=env,
                cwd=self.directory,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = Process(popen, log)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launch = Launcher(tmp_path)
    try:
        yield launch
    finally:
        launch.stop_all()


def write_journeys(directory: Path, journeys: dict[str, str], templates: dict[str, str]) -> None:
    """`journeys` (id -> YAML) and `templates` (name -> Jinja2) where cjm_env points."""
    (directory / "journeys").mkdir(exist_ok=True)
    (directory / "templates").mkdir(exist_ok=True)
    for name, source in journeys.items():
        (directory / "journeys" / f"{name}.yaml").write_text(source)
    for name, source in templates.items():
        (directory / "templates" / f"{name}.j2").write_text(source)


# --- reading the database the processes write ----------------------------------------------------


def query(database_url: str, statement: str, **params: Any) -> list[Any]:
    """The rows of one read, over a connection of the test's own."""

    async def read() -> list[Any]:
        database = Database(database_url)
        try:
            async with database.read() as connection:
                return list(await connection.execute(text(statement), params))
        finally:
            await database.close()

    return asyncio.run(read())


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds:.0f} s: {what}"
        time.sleep(0.25)
