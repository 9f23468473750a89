"""`cjm serve` on SQLite running out of disk: ingestion answers 503 with Retry-After (not
500, not a hang), whatever got a 200 is stored once, nothing is half-written, and once
there is room again the server goes on.

The disk fills up for real as far as SQLite can tell: the process may not grow any file
past a size limit (RLIMIT_FSIZE), so its writes fail with EFBIG.
"""

from __future__ import annotations

import resource
import shutil
from collections import Counter
from pathlib import Path

import httpx

from tests.faults.conftest import (
    Launcher,
    Process,
    cjm_env,
    process_tree,
    query,
    wait_until,
    write_journeys,
)

PER_REQUEST = 25
PADDING = "x" * 1_000  # so the files grow by some kilobytes per request
ROOM = 512 * 1024  # how far past its size at start a file may grow
MAX_REQUESTS = 400  # the disk is full long before this many
AFTER_FULL = 5  # requests sent once the disk is full, each must be refused the same way


def _batch(number: int) -> dict[str, object]:
    return {
        "batch": [
            {
                "type": "track",
                "userId": f"u{number}-{index}",
                "event": "viewed",
                "messageId": _message_id(number, index),
                "properties": {"padding": PADDING},
            }
            for index in range(PER_REQUEST)
        ]
    }


def _message_id(number: int, index: int) -> str:
    return f"m{number}-{index}"


def _post(server: Process, number: int) -> httpx.Response:
    return server.post("/v1/batch", _batch(number))


def test_a_full_disk_refuses_with_503_keeps_every_accepted_event_and_recovers(
    launcher: Launcher, sqlite_template: Path, tmp_path: Path
) -> None:
    path = tmp_path / "cjm.db"
    shutil.copy(sqlite_template, path)
    database_url = f"sqlite+aiosqlite:///{path}"
    write_journeys(tmp_path, {}, {})
    env = cjm_env(database_url, tmp_path, None)

    server = launcher.serve(env, file_size_limit=path.stat().st_size + ROOM)
    accepted: list[int] = []
    refused: list[int] = []
    for number in range(MAX_REQUESTS):
        answer = _post(server, number)  # a hang would raise here, after its timeout
        assert answer.status_code in (200, 503), (answer.status_code, answer.text)
        if answer.status_code == 200:
            accepted.append(number)
            continue
        assert answer.headers["Retry-After"].isdigit(), answer.headers
        refused.append(number)
        if len(refused) == AFTER_FULL:
            break
    assert len(refused) == AFTER_FULL, f"the disk never filled up:\n{server.output()}"
    assert accepted, "not even the first request was stored"

    # Room again (the limit lifted) while it runs: the next try is stored.
    for pid in process_tree(server.popen.pid):
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    retried = refused.pop(0)

    def stored_on_retry() -> bool:
        answer = _post(server, retried)
        assert answer.status_code in (200, 503), (answer.status_code, answer.text)
        return answer.status_code == 200

    wait_until(stored_on_retry, 30, "a request stored once the disk has room again")
    accepted.append(retried)
    server.kill()

    # Started again with room on the disk, on the same file.
    server = launcher.serve(env)
    (check,) = query(database_url, "PRAGMA integrity_check")
    assert tuple(check) == ("ok",)
    stored = Counter(row.message_id for row in query(database_url, "SELECT message_id FROM events"))
    for number in accepted:
        assert all(stored[_message_id(number, index)] == 1 for index in range(PER_REQUEST)), (
            f"request {number} got a 200 but is not stored once"
        )
    for number in refused:  # refused as a whole: all of it stored, or none
        present = {stored[_message_id(number, index)] for index in range(PER_REQUEST)}
        assert present in ({0}, {1}), (number, present)

    # What was refused is sent again, as a client does after Retry-After, and new traffic.
    for number in [*refused, MAX_REQUESTS]:
        answer = _post(server, number)
        assert answer.status_code == 200, answer.text
    expected = {
        _message_id(number, index)
        for number in [*accepted, *refused, MAX_REQUESTS]
        for index in range(PER_REQUEST)
    }

    def all_processed() -> bool:
        rows = query(database_url, "SELECT message_id, processed_at FROM events")
        done = {row.message_id for row in rows if row.processed_at is not None}
        return expected <= done

    wait_until(all_processed, 120, "every stored event processed after the restart")
    stored = Counter(row.message_id for row in query(database_url, "SELECT message_id FROM events"))
    assert all(stored[message_id] == 1 for message_id in expected)
