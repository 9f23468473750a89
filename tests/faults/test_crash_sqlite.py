"""`cjm serve` on SQLite killed with SIGKILL mid-work, twice, and started again on the same
database file: every accepted event is applied once, every lead gets each of its emails
once, and holds one offer code, shown in its emails."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.faults.conftest import Launcher, SmtpServer, cjm_env
from tests.faults.journey import (
    PER_REQUEST,
    assert_each_promise_kept_once,
    interrupted,
    mailed_from,
    send,
    wait_until_settled,
    write_crash_journey,
)

LEADS = 160


def test_serve_killed_twice_mid_work_loses_nothing_and_repeats_nothing(
    launcher: Launcher, smtp_server: SmtpServer, sqlite_template: Path, tmp_path: Path
) -> None:
    path = tmp_path / "cjm.db"
    shutil.copy(sqlite_template, path)
    database_url = f"sqlite+aiosqlite:///{path}"
    write_crash_journey(tmp_path)
    env = cjm_env(database_url, tmp_path, smtp_server.url)
    mailbox = smtp_server.mailbox
    firsts = list(range(0, LEADS, PER_REQUEST))
    half = len(firsts) // 2
    accepted: set[int] = set()
    doubts: list[set[tuple[int, str]]] = []

    # Killed while the worker is applying the first half and the sender is mailing it.
    server = launcher.serve(env)
    send(server, firsts[:half], accepted)
    mailbox.wait_for(lambda received: len(received) >= 60, seconds=90)
    server.kill()
    doubts.append(interrupted(database_url))

    # Started again on the same file; the second half arrives, and it is killed again.
    server = launcher.serve(env)
    send(server, firsts[half:], accepted)
    # Killed once the second half is being mailed (the first half's emails left in
    # doubt by the first kill may still be arriving: they do not count).
    second = firsts[half]
    mailbox.wait_for(lambda received: mailed_from(second, received) >= 60, seconds=120)
    server.kill()
    doubts.append(interrupted(database_url))

    server = launcher.serve(env)
    send(server, [first for first in firsts if first not in accepted], accepted)
    assert accepted == set(firsts)
    wait_until_settled(database_url, LEADS, seconds=180)

    assert_each_promise_kept_once(database_url, mailbox, LEADS, doubts)
