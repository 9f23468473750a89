"""The journey the crash tests put leads through, their traffic, and the promises checked
after the faults: every accepted event applied once, each move made once, one offer code
per lead, each due email received once."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from email.message import EmailMessage
from pathlib import Path

import httpx

from tests.faults.conftest import Mailbox, Process, query, wait_until, write_journeys

PER_REQUEST = 20  # leads per /v1/batch call

JOURNEY = """\
id: crash
name: Crash safety
entry: {on: signed_up}
stages:
  - id: welcomed
    phase: awareness
    on_enter:
      - offer.grant: gift
      - email.send: welcome
    transitions: [{after: 1s, to: nurturing}]
  - id: nurturing
    phase: consideration
    on_enter:
      - email.send: reminder
      - sequence.start: tips
    transitions: [{on: order_completed, to: bought}]
  - id: bought
    phase: purchase
    terminal: true
sequences:
  tips:
    steps:
      - email: tip_one
      - wait: 1s
      - email: tip_two
offers:
  gift:
    title: A gift for you
    expires: {after: 5d}
    code: "GIFT-{8}"
"""

# Each email's subject is its template's name; each shows the lead's code.
TEMPLATES = {
    name: (
        f"{{% block subject %}}{name}{{% endblock %}}"
        "{% block html %}<p>Hello {{ lead.first_name | default('you') }}, "
        "your code: {{ offer.code if offer else 'none' }}</p>{% endblock %}"
    )
    for name in ("welcome", "reminder", "tip_one", "tip_two")
}
HISTORY = [(None, "welcomed"), ("welcomed", "nurturing")]
CODE = re.compile(r"GIFT-[A-Z0-9]+")


def write_crash_journey(directory: Path) -> None:
    write_journeys(directory, {"crash": JOURNEY}, TEMPLATES)


def address(lead: int) -> str:
    return f"lead{lead}@example.com"


def _lead_of(to: str) -> int:
    return int(to.removeprefix("lead").split("@")[0])


def mailed_from(first_lead: int, received: list[EmailMessage]) -> int:
    """How many of `received` went to leads numbered `first_lead` or above: the progress
    of the leads sent last, whatever is still arriving for those sent before."""
    return sum(_lead_of(str(message["To"])) >= first_lead for message in received)


def batch(first: int) -> dict[str, object]:
    """Leads `first` to `first + PER_REQUEST - 1` identify themselves and sign up."""
    messages: list[dict[str, object]] = []
    for lead in range(first, first + PER_REQUEST):
        traits = {"email": address(lead), "first_name": f"Lead{lead}"}
        messages.append(
            {"type": "identify", "userId": f"u{lead}", "traits": traits, "messageId": f"i{lead}"}
        )
        messages.append(
            {"type": "track", "userId": f"u{lead}", "event": "signed_up", "messageId": f"s{lead}"}
        )
    return {"batch": messages}


def send(server: Process, firsts: list[int], accepted: set[int]) -> int:
    """Post each batch once; those that got a 200 are noted in `accepted`. One cut off by a
    fault (no answer, or 503) is posted again later, as a client retries. Returns how
    many were refused with 503."""
    refused = 0
    for first in firsts:
        try:
            answer = server.post("/v1/batch", batch(first))
        except httpx.HTTPError:
            continue
        assert answer.status_code in (200, 503), answer.text
        if answer.status_code == 200:
            accepted.add(first)
        else:
            assert answer.headers["Retry-After"].isdigit()
            refused += 1
    return refused


def in_doubt(database_url: str) -> set[tuple[int, str]]:
    """(lead, template) of the emails claimed by a sender right now: if that sender just
    died, perhaps delivered without being recorded."""
    rows = query(database_url, "SELECT lead_id, template FROM emails WHERE status = 'sending'")
    return {(row.lead_id, row.template) for row in rows}


def interrupted(database_url: str) -> set[tuple[int, str]]:
    """After a kill: the emails it may have left in doubt (see `in_doubt`), once it is
    known the kill came mid-work (events or emails were still to be done), not after."""
    (row,) = query(
        database_url,
        "SELECT"
        " (SELECT count(*) FROM events WHERE processed_at IS NULL) AS events,"
        " (SELECT count(*) FROM emails WHERE status IN ('queued', 'sending', 'deferred'))"
        "   AS unsent,"
        " (SELECT count(*) FROM outbox WHERE status = 'pending') AS outbox,"
        " (SELECT count(*) FROM timers) AS timers,"
        " (SELECT count(*) FROM sequence_runs WHERE status = 'active') AS sequences",
    )
    to_do = row.events + row.unsent + row.outbox + row.timers + row.sequences
    assert to_do > 0, "the kill came after the work was done"
    return in_doubt(database_url)


def wait_until_settled(database_url: str, leads: int, seconds: float) -> None:
    def settled() -> bool:
        (row,) = query(
            database_url,
            "SELECT"
            " (SELECT count(*) FROM events WHERE processed_at IS NULL) AS events,"
            " (SELECT count(*) FROM emails WHERE status IN ('queued', 'sending', 'deferred'))"
            "   AS unsent,"
            " (SELECT count(*) FROM emails WHERE status = 'sent') AS sent,"
            " (SELECT count(*) FROM outbox WHERE status = 'pending') AS outbox",
        )
        return (row.events, row.unsent, row.outbox, row.sent) == (0, 0, 0, 4 * leads)

    wait_until(settled, seconds, "every event applied, every email sent")


def assert_each_promise_kept_once(
    database_url: str, mailbox: Mailbox, leads: int, doubts: list[set[tuple[int, str]]]
) -> None:
    """After the faults: every lead's events stored and applied once, each move made once,
    one code each, and each of its four emails received as one message."""
    mailbox.wait_for(lambda received: len(received) >= 4 * leads, seconds=60)

    events = Counter(
        row.message_id
        for row in query(database_url, "SELECT message_id FROM events WHERE type != 'internal'")
    )
    expected_ids = {f"{kind}{lead}" for lead in range(leads) for kind in ("i", "s")}
    assert set(events) == expected_ids
    assert all(count == 1 for count in events.values())

    lead_ids = {
        row.user_id: row.id
        for row in query(
            database_url,
            "SELECT i.value AS user_id, l.id FROM identities i JOIN leads l ON l.id = i.lead_id"
            " WHERE i.kind = 'user' AND l.merged_into IS NULL",
        )
    }
    assert set(lead_ids) == {f"u{lead}" for lead in range(leads)}
    histories: dict[int, list[tuple[str | None, str | None]]] = defaultdict(list)
    for row in query(
        database_url,
        "SELECT e.lead_id, t.from_stage, t.to_stage FROM transitions t"
        " JOIN enrollments e ON e.id = t.enrollment_id ORDER BY t.id",
    ):
        histories[row.lead_id].append((row.from_stage, row.to_stage))
    assert set(histories) == set(lead_ids.values())
    wrong = {lead: history for lead, history in histories.items() if history != HISTORY}
    assert not wrong, f"{len(wrong)} leads moved wrongly, e.g. {next(iter(wrong.items()))}"
    (enrollments,) = query(database_url, "SELECT count(*) AS n FROM enrollments")
    assert enrollments.n == leads

    granted = query(database_url, "SELECT lead_id, code FROM offers")
    codes = {row.lead_id: row.code for row in granted}
    assert len(granted) == leads
    assert set(codes) == set(lead_ids.values())
    assert len(set(codes.values())) == leads

    # A message may arrive twice only if its sender died between the server's acceptance
    # and recording it (no protocol closes that gap); the copy then carries the same
    # Message-ID, so the mailbox drops it.
    copies: dict[tuple[str, str], list[str]] = defaultdict(list)
    for message in mailbox.received():
        to, subject = str(message["To"]), str(message["Subject"])
        copies[(to, subject)].append(str(message["Message-ID"]))
        body = message.get_body(("plain",))
        assert body is not None
        (shown,) = CODE.findall(body.get_content())
        assert shown == codes[lead_ids[f"u{_lead_of(to)}"]], (to, subject)
    assert set(copies) == {(address(lead), name) for lead in range(leads) for name in TEMPLATES}
    doubted = Counter(pair for doubt in doubts for pair in doubt)
    for (to, template), message_ids in copies.items():
        assert len(set(message_ids)) == 1, (to, template, message_ids)
        allowed = 1 + doubted[(lead_ids[f"u{_lead_of(to)}"], template)]
        assert len(message_ids) <= allowed, (to, template, len(message_ids), allowed)
