"""On PostgreSQL: `cjm worker` processes killed with SIGKILL while sending, and the database
dropping every connection and refusing new ones for a while, as a restart does. Every
accepted event is applied once, every due email received once, one code per lead.

The restart is played on the test's own database only (the server is shared): every
connection to it is terminated and new ones are refused, then allowed again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from channels.email.sender import LEASE
from tests.conftest import fresh_postgres_database, require_postgres
from tests.email.conftest import HELLO, WELCOME, running_mail
from tests.faults.conftest import Launcher, Process, SmtpServer, cjm_env
from tests.faults.journey import (
    PER_REQUEST,
    assert_each_promise_kept_once,
    in_doubt,
    interrupted,
    mailed_from,
    send,
    wait_until_settled,
    write_crash_journey,
)

LEADS = 80
OUTAGE_S = 4.0


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with fresh_postgres_database("cjm_faults") as url:
        yield url


async def _on_server(statement: str, **params: object) -> None:
    """One statement on the server's own database (not the test's), in autocommit."""
    engine = create_async_engine(require_postgres(), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement), params)
    finally:
        await engine.dispose()


async def _refuse_connections(name: str, refuse: bool) -> None:
    await _on_server(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(not refuse).lower()}')


async def _terminate_connections(name: str) -> None:
    await _on_server(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = :name AND pid <> pg_backend_pid()",
        name=name,
    )


def _assert_running(processes: list[Process]) -> None:
    for process in processes:
        assert process.popen.poll() is None, f"a process exited:\n{process.output()}"


def test_workers_killed_while_sending_lose_nothing_and_repeat_nothing(
    postgres_url: str, launcher: Launcher, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    write_crash_journey(tmp_path)
    env = cjm_env(postgres_url, tmp_path, smtp_server.url)
    mailbox = smtp_server.mailbox
    firsts = list(range(0, LEADS, PER_REQUEST))
    half = len(firsts) // 2
    accepted: set[int] = set()
    doubts: list[set[tuple[int, str]]] = []
    api = launcher.serve(env, "--no-worker")
    workers = [launcher.worker(env), launcher.worker(env)]

    send(api, firsts[:half], accepted)
    mailbox.wait_for(lambda received: len(received) >= 40, seconds=90)
    workers.pop(0).kill()
    doubts.append(interrupted(postgres_url))  # the survivor's claims too: a wider allowance
    workers.append(launcher.worker(env))

    send(api, firsts[half:], accepted)
    # Killed once the second half is being mailed (the first half's emails left in
    # doubt by the first kill may still be arriving: they do not count).
    second = firsts[half]
    mailbox.wait_for(lambda received: mailed_from(second, received) >= 40, seconds=120)
    workers.pop(0).kill()
    doubts.append(interrupted(postgres_url))
    workers.append(launcher.worker(env))

    send(api, [first for first in firsts if first not in accepted], accepted)
    assert accepted == set(firsts)
    wait_until_settled(postgres_url, LEADS, seconds=180)

    assert_each_promise_kept_once(postgres_url, mailbox, LEADS, doubts)
    _assert_running([api, *workers])


def test_the_database_dropping_every_connection_for_a_while_loses_nothing(
    postgres_url: str, launcher: Launcher, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    write_crash_journey(tmp_path)
    env = cjm_env(postgres_url, tmp_path, smtp_server.url)
    name = make_url(postgres_url).database
    assert name is not None
    mailbox = smtp_server.mailbox
    firsts = list(range(0, LEADS, PER_REQUEST))
    half = len(firsts) // 2
    accepted: set[int] = set()
    doubts: list[set[tuple[int, str]]] = []
    api = launcher.serve(env, "--no-worker")
    worker = launcher.worker(env)

    send(api, firsts[:half], accepted)
    mailbox.wait_for(lambda received: len(received) >= 40, seconds=90)

    # Down: every connection dropped, mid-work, and no new one let in for a while.
    asyncio.run(_refuse_connections(name, refuse=True))
    try:
        asyncio.run(_terminate_connections(name))
        down_until = time.monotonic() + OUTAGE_S
        assert send(api, firsts[half:], accepted) > 0  # the API felt the outage: 503
        time.sleep(max(0.0, down_until - time.monotonic()))
        asyncio.run(_terminate_connections(name))
    finally:
        asyncio.run(_refuse_connections(name, refuse=False))
    doubts.append(in_doubt(postgres_url))

    send(api, [first for first in firsts if first not in accepted], accepted)
    assert accepted == set(firsts)
    wait_until_settled(postgres_url, LEADS, seconds=180)

    assert_each_promise_kept_once(postgres_url, mailbox, LEADS, doubts)
    _assert_running([api, worker])


async def test_an_email_sent_while_the_database_went_away_is_recorded_and_not_sent_again(
    postgres_url: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    name = make_url(postgres_url).database
    assert name is not None
    mailbox = smtp_server.mailbox
    async with running_mail(
        postgres_url,
        tmp_path,
        smtp_server,  # type: ignore[arg-type]  # the same start/stop/url as the email tests'
        [WELCOME],
        {"hello": HELLO},
    ) as mail:
        lead_id = await mail.sign_up("ada", email="ada@example.com")
        await mail.runtime.email.dispatch_all()
        mailbox.gate.clear()  # the server holds the message until the database is away
        sending = asyncio.create_task(mail.runtime.email.sender.send_due())
        try:
            deadline = time.monotonic() + 30
            while mailbox.attempts == 0:
                assert time.monotonic() < deadline, "the message never reached the server"
                await asyncio.sleep(0.05)
            await _refuse_connections(name, refuse=True)
            try:
                await _terminate_connections(name)
                mailbox.gate.set()  # accepted now, while its outcome cannot be recorded
                while not mailbox.received():
                    assert time.monotonic() < deadline, "the server never took the message"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(OUTAGE_S / 2)
            finally:
                await _refuse_connections(name, refuse=False)
        finally:
            mailbox.gate.set()
            await sending

        (row,) = await mail.emails(lead_id)
        assert (row.status, row.attempts) == ("sent", 1)
        # Long past the lease, nothing is sent again.
        await mail.run(LEASE * 3)
        await mail.deliver()
        assert mailbox.copies() == {("ada@example.com", "Hello there"): 1}
