"""A minute of sustained tracking traffic against a real `cjm serve` while timers fire
and emails send: every accepted event is stored and applied exactly once, every due
email arrives exactly once, memory stays flat, and a caller is answered (200, or
429/503 with Retry-After), never left to time out.

The clients send as fast as eight keep-alive connections allow (a few hundred
requests a second from this Python client on two cores; `bench/tracking.py`'s
leaner client reaches more). Each lead signs up (enters,
and after two seconds a timer moves it on unless it was seen first); every other lead
views and orders; one lead in ten gives an email address and so is mailed on entry
and, when the timer moves it, once more. Nothing in here measures time: the counts
are what is asserted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import WRITE_KEY, Server
from tests.faults.conftest import SmtpServer

LOAD_SECONDS = float(os.environ.get("CJM_TEST_LOAD_SECONDS", "60"))
CONNECTIONS = 8
CLIENT_TIMEOUT_S = 20  # far above any answer the server owes: reaching it is a failure
DRAIN_S = 300  # for the worker and the sender to finish what the minute left behind

JOURNEY = """\
id: load
name: Sustained load
entry: {on: signed_up}
stages:
  - id: welcomed
    phase: awareness
    on_enter: [{email.send: welcome}]
    transitions:
      - {on: viewed, to: interested}
      - {after: 2s, to: reminded}
  - id: reminded
    phase: consideration
    on_enter: [{email.send: reminder}]
    transitions:
      - {on: viewed, to: interested}
  - id: interested
    phase: consideration
    transitions:
      - {on: order_completed, to: bought}
  - id: bought
    phase: purchase
    terminal: true
"""
TEMPLATE = (
    "{% block subject %}[[name]] {{ lead.email }}{% endblock %}{% block html %}Hi{% endblock %}"
)


def subjects(server: SmtpServer) -> Counter[str]:
    return Counter(str(message["Subject"]) for message in server.mailbox.received())


def lead_messages(n: int) -> list[tuple[str, dict[str, Any]]]:
    """The calls lead n makes, in order, each with a message id of its own."""
    user = f"load-{n}"
    calls: list[tuple[str, dict[str, Any]]] = []
    if n % 10 == 0:
        calls.append(("identify", {"traits": {"email": f"{user}@example.com"}}))
    calls.append(("track", {"event": "signed_up"}))
    if n % 2 == 0:
        calls.append(("track", {"event": "viewed"}))
        calls.append(("track", {"event": "order_completed", "properties": {"revenue": 10}}))
    return [
        (path, {"userId": user, "messageId": f"{user}.{k}", **body})
        for k, (path, body) in enumerate(calls)
    ]


class Traffic:
    """Clients on several threads, each sending whole leads in order, until told to stop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.accepted: set[str] = set()
        self.leads_done = 0
        self.refusals: Counter[int] = Counter()
        self.problems: list[str] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def run(self, seconds: float) -> None:
        threads = [threading.Thread(target=self._client) for _ in range(CONNECTIONS)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        self._stop.set()
        for thread in threads:
            thread.join()

    def _take_lead(self) -> int:
        with self._lock:
            self._next += 1
            return self._next

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, auth=(WRITE_KEY, ""), timeout=CLIENT_TIMEOUT_S) as c:
            while not self._stop.is_set():
                n = self._take_lead()
                for path, body in lead_messages(n):
                    if not self._deliver(c, path, body):
                        return
                with self._lock:
                    self.leads_done += 1

    def _deliver(self, client: httpx.Client, path: str, body: dict[str, Any]) -> bool:
        """Send one message until it is accepted, honouring Retry-After: what a tracking
        library does. False when something happened that a caller must never see."""
        while True:
            try:
                response = client.post(f"/v1/{path}", json=body)
            except httpx.TimeoutException:
                self._problem(f"{body['messageId']}: no answer within {CLIENT_TIMEOUT_S} s")
                return False
            if response.status_code == 200:
                with self._lock:
                    self.accepted.add(body["messageId"])
                return True
            retry_after = response.headers.get("retry-after")
            if response.status_code not in (429, 503) or retry_after is None:
                self._problem(f"{body['messageId']}: {response.status_code} {response.text}")
                return False
            with self._lock:
                self.refusals[response.status_code] += 1
            time.sleep(min(float(retry_after), 2.0))

    def _problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)


def process_tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and every process it started, in MiB."""
    total_kib = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def read_database(path: Path, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as connection:
        return connection.execute(query).fetchall()


def wait_until(condition: Callable[[], bool], seconds: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {seconds:.0f} s: {what()}")


def test_a_minute_of_sustained_traffic_is_stored_and_applied_exactly_once_in_flat_memory(
    serve: Callable[..., Server], tmp_path: Path, smtp_server: SmtpServer
) -> None:
    journeys, templates = tmp_path / "journeys", tmp_path / "templates"
    journeys.mkdir()
    templates.mkdir()
    (journeys / "load.yaml").write_text(JOURNEY)
    for name in ("welcome", "reminder"):
        (templates / f"{name}.j2").write_text(TEMPLATE.replace("[[name]]", name))
    database = tmp_path / "load.db"
    server = serve(
        CJM_DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        CJM_JOURNEYS_DIR=str(journeys),
        CJM_TEMPLATES_DIR=str(templates),
        CJM_SMTP_URL=smtp_server.url,
    )

    traffic = Traffic(server.url)
    sender = threading.Thread(target=traffic.run, args=(LOAD_SECONDS,))
    sender.start()
    # Memory once the server is warm (its caches filled), and again at the end.
    time.sleep(LOAD_SECONDS / 3)
    warm_mib = process_tree_rss_mib(server.process.pid)
    sender.join()
    end_mib = process_tree_rss_mib(server.process.pid)

    assert traffic.problems == []
    leads = traffic.leads_done
    assert leads > 100, f"only {leads} leads were sent in {LOAD_SECONDS:.0f} s"
    sent_ids = {body["messageId"] for n in range(1, leads + 1) for _, body in lead_messages(n)}
    assert sent_ids <= traffic.accepted

    def backlog() -> dict[str, int]:
        """What is still to do: pending events and actions, unsent emails, timers."""
        counts = {
            "events": "SELECT count(*) FROM events WHERE processed_at IS NULL",
            "actions": "SELECT count(*) FROM outbox WHERE status = 'pending'",
            "emails": "SELECT count(*) FROM emails "
            "WHERE status IN ('queued', 'sending', 'deferred')",
            "timers": "SELECT count(*) FROM timers",
        }
        return {what: read_database(database, query)[0][0] for what, query in counts.items()}

    wait_until(lambda: not any(backlog().values()), DRAIN_S, lambda: f"backlog {backlog()}")

    # Every accepted message stored exactly once (message_id is unique: a retried
    # message that got a 200 twice is still one row) and applied without error.
    stored = read_database(
        database,
        "SELECT message_id, processed_at IS NOT NULL, error FROM events "
        "WHERE message_id LIKE 'load-%'",
    )
    assert {message_id for message_id, _, _ in stored} == traffic.accepted
    assert len(stored) == len(traffic.accepted)
    assert [row for row in stored if not row[1] or row[2] is not None] == []

    # Every lead's run, move by move: one entry, then either seen or reminded first
    # (the race between `viewed` and the two-second timer is the lead's own), each
    # event that moves a lead moving it exactly once.
    history: dict[str, list[tuple[str | None, str | None, str]]] = {}
    for user_id, from_stage, to_stage, cause in read_database(
        database,
        "SELECT i.value, t.from_stage, t.to_stage, t.cause FROM transitions t "
        "JOIN enrollments e ON e.id = t.enrollment_id "
        "JOIN identities i ON i.lead_id = e.lead_id AND i.kind = 'user' "
        "ORDER BY t.id",
    ):
        kind = json.loads(cause)["type"]
        history.setdefault(user_id, []).append((from_stage, to_stage, kind))
    assert len(history) == leads
    buyer_paths = {
        ((None, "welcomed", "entry"), ("welcomed", "interested", "event"),
         ("interested", "bought", "event")),
        ((None, "welcomed", "entry"), ("welcomed", "reminded", "timer"),
         ("reminded", "interested", "event"), ("interested", "bought", "event")),
    }  # fmt: skip
    browser_path = ((None, "welcomed", "entry"), ("welcomed", "reminded", "timer"))
    for n in range(1, leads + 1):
        path = tuple(history[f"load-{n}"])
        assert path in buyer_paths if n % 2 == 0 else path == browser_path, (n, path)

    # Emails: a welcome for each lead with an address, a reminder for each one the
    # timer moved; none twice.
    reminded = {user for user, path in history.items() if ("welcomed", "reminded", "timer") in path}
    expected = Counter(
        {f"welcome load-{n}@example.com": 1 for n in range(10, leads + 1, 10)}
        | {
            f"reminder load-{n}@example.com": 1
            for n in range(10, leads + 1, 10)
            if f"load-{n}" in reminded
        }
    )
    wait_until(
        lambda: subjects(smtp_server) == expected,
        30,
        lambda: (
            f"emails: {sorted((subjects(smtp_server) - expected).items())[:5]} too many, "
            f"{sorted((expected - subjects(smtp_server)).items())[:5]} missing"
        ),
    )
    time.sleep(1)
    assert subjects(smtp_server) == expected

    # Flat memory: what the server holds does not grow with the events it has seen.
    assert end_mib < warm_mib * 1.25 + 16, (warm_mib, end_mib)
