"""Nurture sequences end to end: `sequence.start` through the runs, the sender and real SMTP,
on a manual clock, over each database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import insert

from channels.email.sequences import _active_runs, _starts_elsewhere
from engine.db.schema import emails, outbox, sequence_runs
from tests.email.conftest import ADMIN_KEY, Mail, SmtpServer, channel, running_mail
from tests.sqlite_plans import TracedSqlite
from tests.worker.conftest import app_client

TIPS = """\
id: tips
name: Door tips
version: 1
entry:
  on: signed_up
exit:
  - on: opted_out
stages:
  - id: reader
    phase: consideration
    on_enter:
      - sequence.start: tips
    transitions:
      - {on: order_completed, to: customer}
      - {on: reread, to: reader}
  - id: customer
    phase: purchase
    terminal: true
    on_enter:
      - email.send: thanks
sequences:
  tips:
    stop_on: [order_completed]
    steps:
      - email: tip_one
      - wait: 2s
      - email: tip_two
      - wait: 3s
      - email: tip_three
"""

# The same three tips, allowed on weekdays from 09:00 to 17:00 in the lead's timezone.
OFFICE_HOURS = """\
id: office
name: Office hours
version: 1
entry:
  on: asked_for_tips
stages:
  - id: reader
    phase: consideration
    on_enter:
      - sequence.start: office_tips
sequences:
  office_tips:
    window: {from: "09:00", to: "17:00", days: [mon, tue, wed, thu, fri]}
    steps:
      - email: tip_one
"""

TEMPLATES = {
    name: (
        f"{{% block subject %}}{title} for {{{{ lead.first_name | default('you') }}}}"
        "{% endblock %}{% block html %}<p>"
        f"{title}, {{{{ lead.first_name | default('friend') }}}}.</p>"
        '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>{% endblock %}'
    )
    for name, title in [
        ("tip_one", "Tip one"),
        ("tip_two", "Tip two"),
        ("tip_three", "Tip three"),
        ("thanks", "Thanks"),
    ]
}

SECOND = timedelta(seconds=1)


@pytest.fixture
async def nurture(database_url: str, tmp_path: Path, smtp: SmtpServer) -> AsyncIterator[Mail]:
    async with running_mail(
        database_url, tmp_path, smtp, [TIPS, OFFICE_HOURS], TEMPLATES
    ) as engine:
        yield engine


@pytest.fixture
async def capped(database_url: str, tmp_path: Path, smtp: SmtpServer) -> AsyncIterator[Mail]:
    async with running_mail(
        database_url, tmp_path, smtp, [TIPS, OFFICE_HOURS], TEMPLATES, frequency_cap="2/1d"
    ) as engine:
        yield engine


async def start_tips(mail: Mail, user_id: str = "reader", **traits: Any) -> int:
    traits.setdefault("email", f"{user_id}@example.com")
    await mail.send("identify", userId=user_id, traits=traits)
    await mail.send("track", userId=user_id, event="signed_up")
    await mail.run()
    await mail.deliver()
    return await mail.lead_id(user_id=user_id)


async def step(mail: Mail, advance: timedelta = timedelta(0)) -> None:
    """Let time pass, then run the worker and the email channel until nothing more is due."""
    await mail.run(advance)
    await mail.deliver()


def subjects(mail: Mail) -> list[str]:
    return [str(message["Subject"]) for message in mail.smtp.recorder.received()]


async def runs(mail: Mail, lead_id: int) -> list[tuple[str, str, str | None]]:
    return [
        (row.sequence, row.status, row.stop_reason)
        for row in await mail.rows(sequence_runs, lead_id=lead_id)
    ]


async def email_states(mail: Mail, lead_id: int) -> list[tuple[str, str]]:
    return [(row.template, row.status) for row in await mail.emails(lead_id)]


async def lead_view(mail: Mail, lead_id: int) -> dict[str, Any]:
    async with app_client(mail.runtime) as client:
        answer = await client.get(
            f"/v1/leads/{lead_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
    assert answer.status_code == 200
    lead: dict[str, Any] = answer.json()
    return lead


async def test_a_sequence_arrives_in_order_personalised_with_each_wait_honoured(
    nurture: Mail,
) -> None:
    lead_id = await start_tips(nurture, first_name="Sam")
    assert subjects(nurture) == ["Tip one for Sam"]
    first_sent = nurture.clock.now()

    await step(nurture, SECOND)
    assert subjects(nurture) == ["Tip one for Sam"]  # the 2 s wait is not over

    await step(nurture, SECOND)
    assert subjects(nurture) == ["Tip one for Sam", "Tip two for Sam"]

    await step(nurture, 2 * SECOND)
    assert len(subjects(nurture)) == 2  # 3 s after tip two, not 3 s after the start

    await step(nurture, SECOND)
    assert subjects(nurture) == ["Tip one for Sam", "Tip two for Sam", "Tip three for Sam"]
    sent = [row.sent_at for row in await nurture.emails(lead_id)]
    assert sent == [first_sent, first_sent + 2 * SECOND, first_sent + 5 * SECOND]
    assert await runs(nurture, lead_id) == [("tips", "completed", None)]
    (run,) = await nurture.rows(sequence_runs, lead_id=lead_id)
    assert (run.step, run.next_at, run.ended_at) == (5, None, sent[-1])

    # Another process running the channel later repeats nothing.
    await channel(nurture).run_once()
    await step(nurture, timedelta(days=30))
    assert len(nurture.smtp.recorder.envelopes) == 3

    (view,) = (await lead_view(nurture, lead_id))["sequences"]
    assert {key: view[key] for key in ("sequence", "status", "step", "steps", "next_at")} == {
        "sequence": "tips",
        "status": "completed",
        "step": 5,
        "steps": 5,
        "next_at": None,
    }


async def test_a_purchase_stops_the_rest_of_the_sequence(nurture: Mail) -> None:
    lead_id = await start_tips(nurture)
    await step(nurture, 2 * SECOND)
    assert len(subjects(nurture)) == 2

    await nurture.send("track", userId="reader", event="order_completed")
    await step(nurture)
    await step(nurture, timedelta(days=1))

    assert subjects(nurture) == ["Tip one for you", "Tip two for you", "Thanks for you"]
    assert await runs(nurture, lead_id) == [("tips", "stopped", "stop_on")]
    (view,) = (await lead_view(nurture, lead_id))["sequences"]
    assert (view["status"], view["stop_reason"], view["step"]) == ("stopped", "stop_on", 4)
    assert view["ended_at"] is not None


async def test_an_exit_stops_the_sequence(nurture: Mail) -> None:
    lead_id = await start_tips(nurture)

    await nurture.send("track", userId="reader", event="opted_out")
    await step(nurture)
    await step(nurture, timedelta(days=1))

    assert subjects(nurture) == ["Tip one for you"]
    assert await runs(nurture, lead_id) == [("tips", "stopped", "exited")]


async def test_an_unsubscribe_stops_the_sequence_and_cancels_its_queued_email(
    nurture: Mail,
) -> None:
    lead_id = await start_tips(nurture)
    nurture.smtp.stop()  # tip two will wait in the queue for a retry
    await step(nurture, 2 * SECOND)
    assert await email_states(nurture, lead_id) == [("tip_one", "sent"), ("tip_two", "deferred")]

    (tip_one, _) = await nurture.emails(lead_id)
    url = urlsplit(nurture.runtime.links.unsubscribe(tip_one.id, lead_id))
    async with app_client(nurture.runtime) as client:
        answer = await client.post(url.path, data={"List-Unsubscribe": "One-Click"})
    assert answer.status_code == 200
    nurture.smtp.start()
    await step(nurture, timedelta(days=1))

    assert subjects(nurture) == ["Tip one for you"]
    assert await email_states(nurture, lead_id) == [("tip_one", "sent"), ("tip_two", "cancelled")]
    assert await runs(nurture, lead_id) == [("tips", "stopped", "unsubscribed")]
    (_, cancelled) = await nurture.emails(lead_id)
    assert cancelled.last_error == "sequence stopped: unsubscribed"


async def test_the_next_step_waits_until_a_retried_email_has_gone(nurture: Mail) -> None:
    nurture.smtp.stop()
    lead_id = await start_tips(nurture)
    await step(nurture, 10 * SECOND)
    assert await email_states(nurture, lead_id) == [("tip_one", "deferred")]

    nurture.smtp.start()
    await step(nurture, timedelta(seconds=40))  # the retry after about 30 s
    assert subjects(nurture) == ["Tip one for you"]
    await step(nurture, SECOND)
    assert subjects(nurture) == ["Tip one for you"]
    await step(nurture, SECOND)
    assert subjects(nurture) == ["Tip one for you", "Tip two for you"]


async def test_starting_a_running_sequence_again_does_not_send_it_twice(nurture: Mail) -> None:
    lead_id = await start_tips(nurture)

    await nurture.send("track", userId="reader", event="reread")  # enters `reader` again
    await step(nurture)
    await step(nurture, 2 * SECOND)
    await step(nurture, 3 * SECOND)
    await step(nurture, timedelta(days=1))

    assert subjects(nurture) == ["Tip one for you", "Tip two for you", "Tip three for you"]
    assert await runs(nurture, lead_id) == [("tips", "completed", None)]


async def test_a_bounced_address_stops_the_sequence(nurture: Mail) -> None:
    nurture.smtp.recorder.rcpt_reply = "550 5.1.1 No such user"
    lead_id = await start_tips(nurture)
    assert await email_states(nurture, lead_id) == [("tip_one", "failed")]

    await step(nurture, 2 * SECOND)
    # Tip two finds the address suppressed; the run ends there instead of going on.
    assert await email_states(nurture, lead_id) == [
        ("tip_one", "failed"),
        ("tip_two", "suppressed"),
    ]
    assert await runs(nurture, lead_id) == [("tips", "stopped", "address suppressed")]


async def test_outside_its_window_an_email_goes_when_the_window_opens_in_the_leads_timezone(
    nurture: Mail,
) -> None:
    # START is Monday 09:00 UTC: 18:00 in Tokyo, after the window closed there.
    await nurture.send(
        "identify", userId="tokyo", traits={"email": "t@example.com", "timezone": "Asia/Tokyo"}
    )
    await nurture.send(
        "identify", userId="london", traits={"email": "l@example.com", "timezone": "Europe/London"}
    )
    for user_id in ("tokyo", "london"):
        await nurture.send("track", userId=user_id, event="asked_for_tips")
    await step(nurture)

    assert [e.rcpt_tos for e in nurture.smtp.recorder.envelopes] == [["l@example.com"]]
    tokyo = await nurture.lead_id(user_id="tokyo")
    (held,) = await nurture.emails(tokyo)
    opening = nurture.clock.now().replace(hour=0) + timedelta(days=1)  # Tue 09:00 in Tokyo
    assert (held.status, held.due_at, held.attempts) == ("deferred", opening, 0)
    assert held.last_error == "outside the sending window"

    await step(nurture, opening - nurture.clock.now() - SECOND)
    assert len(nurture.smtp.recorder.envelopes) == 1
    await step(nurture, SECOND)
    assert [e.rcpt_tos for e in nurture.smtp.recorder.envelopes] == [
        ["l@example.com"],
        ["t@example.com"],
    ]
    (sent,) = await nurture.emails(tokyo)
    assert (sent.status, sent.sent_at) == ("sent", opening)


async def test_leads_without_a_timezone_use_the_configured_default(
    database_url: str, tmp_path: Path, smtp: SmtpServer
) -> None:
    async with running_mail(
        database_url, tmp_path, smtp, [OFFICE_HOURS], TEMPLATES, default_timezone="Asia/Tokyo"
    ) as mail:
        await mail.send("identify", userId="anyone", traits={"email": "a@example.com"})
        await mail.send("track", userId="anyone", event="asked_for_tips")
        await step(mail)

        lead_id = await mail.lead_id(user_id="anyone")
        assert await email_states(mail, lead_id) == [("tip_one", "deferred")]
        await step(mail, timedelta(hours=15))  # Tuesday 09:00 in Tokyo
        assert await email_states(mail, lead_id) == [("tip_one", "sent")]


async def test_over_the_frequency_cap_an_email_is_deferred_never_dropped(capped: Mail) -> None:
    lead_id = await start_tips(capped)
    first_sent = capped.clock.now()
    await step(capped, 2 * SECOND)
    await step(capped, 3 * SECOND)

    # Two a day: tip three waits until a day after tip one.
    assert subjects(capped) == ["Tip one for you", "Tip two for you"]
    (*_, tip_three) = await capped.emails(lead_id)
    assert (tip_three.status, tip_three.last_error) == ("deferred", "frequency cap 2/1d")
    assert tip_three.due_at == first_sent + timedelta(days=1)

    # Other journeys' sequences count against the same cap (office hours: Monday 09:00 UTC).
    await capped.send("track", userId="reader", event="asked_for_tips")
    await step(capped)
    assert len(subjects(capped)) == 2

    await step(capped, tip_three.due_at - capped.clock.now())
    assert subjects(capped)[2:] == ["Tip three for you"]
    await step(capped, 2 * SECOND)  # tip two's day is over too
    assert subjects(capped)[2:] == ["Tip three for you", "Tip one for you"]
    assert [row.status for row in await capped.rows(emails, lead_id=lead_id)] == ["sent"] * 4


async def test_a_single_email_send_is_not_held_by_the_cap(capped: Mail) -> None:
    lead_id = await start_tips(capped)
    await step(capped, 2 * SECOND)
    assert len(subjects(capped)) == 2  # the cap is reached

    await capped.send("track", userId="reader", event="order_completed")
    await step(capped)

    assert subjects(capped)[-1] == "Thanks for you"
    assert await runs(capped, lead_id) == [("tips", "stopped", "stop_on")]


async def test_senders_in_two_processes_keep_the_cap_between_them(
    database_url: str, tmp_path: Path, smtp: SmtpServer
) -> None:
    async with running_mail(
        database_url, tmp_path, smtp, [TIPS, OFFICE_HOURS], TEMPLATES, frequency_cap="1/1d"
    ) as mail:
        await mail.send("identify", userId="both", traits={"email": "both@example.com"})
        await mail.send("track", userId="both", event="signed_up")
        await mail.send("track", userId="both", event="asked_for_tips")
        await mail.run()
        await mail.runtime.email.dispatch_all()  # two first emails due at once
        first, second = channel(mail), channel(mail)
        first.sender.batch = second.sender.batch = 1  # each claims one of them

        await asyncio.gather(first.send_all(), second.send_all())

        lead_id = await mail.lead_id(user_id="both")
        assert sorted(row.status for row in await mail.emails(lead_id)) == ["deferred", "sent"]
        assert len(mail.smtp.recorder.envelopes) == 1


async def test_on_sqlite_active_runs_are_looked_up_by_enrollment(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """Which of some (enrollment, sequence) pairs have an active run: SQLite, planning
    without statistics, walked every active run there is to answer it (the status
    index), a cost that grew with the runs under way. It must search the index of
    active runs by enrollment, and still answer for the pairs asked about alone."""
    now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    async with (
        TracedSqlite(sqlite_template, tmp_path) as traced,
        traced.db.write() as connection,
    ):
        await connection.execute(
            insert(sequence_runs),
            [
                {
                    "idempotency_key": f"run-{n}",
                    "lead_id": enrollment,
                    "enrollment_id": enrollment,
                    "journey_id": "doors",
                    "version": 1,
                    "sequence": sequence,
                    "status": status,
                    "step": 0,
                    "started_at": now,
                    "updated_at": now,
                }
                for n, (enrollment, sequence, status) in enumerate(
                    [(1, "tips", "active"), (1, "other", "stopped"), (2, "other", "active")]
                )
            ],
        )
        await traced.trace(connection)
        asked = {(1, "tips"), (1, "other"), (2, "tips"), *((n, "tips") for n in range(3, 20))}
        assert await _active_runs(connection, asked) == {(1, "tips")}
    (lookup,) = traced.selects("sequence_runs")
    assert traced.plan(lookup) == [
        "SEARCH sequence_runs USING INDEX uq_sequence_runs_active (enrollment_id=?)"
    ]


async def test_on_sqlite_a_stops_pending_start_is_looked_up_by_lead(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """A stop waits for its run's start if another dispatcher holds it. Asked by status,
    action and enrollment, SQLite walked every pending outbox row to find such starts;
    it must search the outbox of the stopping leads, and find only the starts that are
    pending, not ours, and earlier than the stop."""
    now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    rows = [  # id, lead (= enrollment), action, target, status
        (1, 1, "sequence.start", "tips", "pending"),  # held elsewhere: the stop waits
        (2, 2, "sequence.start", "tips", "dispatched"),  # started already
        (3, 3, "sequence.start", "tips", "pending"),  # claimed with its stop
        (4, 4, "sequence.start", "other", "pending"),  # another sequence
        (5, 1, "sequence.stop", "tips", "pending"),
        (6, 2, "sequence.stop", "tips", "pending"),
        (7, 3, "sequence.stop", "tips", "pending"),
        (8, 4, "sequence.stop", "tips", "pending"),
        (9, 5, "sequence.start", "tips", "pending"),  # after its stop
        *((n, n, "sequence.stop", "tips", "pending") for n in range(10, 30)),
    ]
    async with (
        TracedSqlite(sqlite_template, tmp_path) as traced,
        traced.db.write() as connection,
    ):
        await connection.execute(
            insert(outbox),
            [
                {
                    "id": row_id,
                    "idempotency_key": f"{lead}/{row_id}",
                    "lead_id": lead,
                    "enrollment_id": lead,
                    "journey_id": "doors",
                    "action": action,
                    "target": target,
                    "status": status,
                    "created_at": now,
                    "updated_at": now,
                }
                for row_id, lead, action, target, status in rows
            ],
        )
        claimed = [
            SimpleNamespace(
                id=row_id, lead_id=lead, enrollment_id=lead, action=action, target=target
            )
            for row_id, lead, action, target, _ in rows
            if row_id in (3, *range(5, 9), *range(10, 30))
        ]
        await traced.trace(connection)
        assert await _starts_elsewhere(connection, claimed) == {(1, "tips")}
    (lookup,) = traced.selects("outbox")
    assert traced.plan(lookup) == ["SEARCH outbox USING INDEX ix_outbox_lead_id (lead_id=?)"]
