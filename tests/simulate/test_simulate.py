"""`cjm simulate` runs a journey through the pure core on a virtual clock: timeouts of
weeks pass at once, channels are recorded as data, and the KPIs come out of the run."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.journey import Journey
from engine.simulate import BadEvents, Report, read_events, simulate

START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)

DOORS = """\
id: doors
name: Entry doors
entry:
  on: page
  where: {properties.path: {startswith: /catalog}}
  reentry: always
goal:
  on: order_completed
  value: properties.revenue
stages:
  - id: visitor
    phase: awareness
    on_enter: [{audience.add: visitors}]
    transitions:
      - {on: page, where: {properties.path: {startswith: /landing}}, to: nurturing}
      - {after: 14d, to: lost}
  - id: nurturing
    phase: consideration
    on_enter:
      - sequence.start: tips
      - offer.grant: welcome
    transitions:
      - {on: order_completed, to: customer}
      - {on: offer.redeemed, to: customer}
      - {on: offer.expired, where: {properties.offer: welcome}, to: cooling}
  - id: cooling
    phase: consideration
    transitions:
      - {on: order_completed, to: customer}
      - {after: 30d, to: lost}
  - id: customer
    phase: purchase
    terminal: true
    on_enter: [{email.send: thanks}]
  - id: lost
    phase: awareness
    terminal: true
sequences:
  tips:
    stop_on: [demo_booked]
    steps:
      - email: catalog
      - wait: 2d
      - email: fittings
      - wait: 2d
      - email: locks
offers:
  welcome:
    title: Welcome
    expires: {after: 5d}
    code: "WELCOME-{6}"
audiences:
  visitors: {}
"""


def page(user: str, path: str, after: timedelta = timedelta(0)) -> dict[str, Any]:
    return {
        "type": "page",
        "userId": user,
        "properties": {"path": path},
        "timestamp": (START + after).isoformat(),
    }


def track(user: str, event: str, after: timedelta, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": event,
        "properties": properties,
        "timestamp": (START + after).isoformat(),
    }


def write_events(directory: Path, messages: list[dict[str, Any]]) -> Path:
    path = directory / "events.jsonl"
    path.write_text("".join(json.dumps(message) + "\n" for message in messages))
    return path


def run(doors: Journey, tmp_path: Path, messages: list[dict[str, Any]]) -> Report:
    return simulate(doors, read_events(write_events(tmp_path, messages)))


def moves(report: Report, lead: int = 0) -> list[tuple[str | None, str | None, str]]:
    """(from, to, what caused it) of the lead's path."""
    return [
        (step.from_stage, step.to_stage, step.cause.get("event") or step.cause["type"])
        for step in report.leads[lead].path
    ]


def test_a_14_day_timeout_passes_on_the_virtual_clock_and_the_lead_ends_lost(
    doors: Journey, tmp_path: Path
) -> None:
    report = run(doors, tmp_path, [page("u1", "/catalog/doors")])

    (lead,) = report.leads
    assert moves(report) == [(None, "visitor", "page"), ("visitor", "lost", "timer")]
    assert lead.path[-1].at == START + timedelta(days=14)
    assert [(r.stage, r.state) for r in lead.runs] == [("lost", "completed")]
    assert report.ended_at == START + timedelta(days=14)
    lost = next(figures for figures in report.kpis.stages if figures.stage == "lost")
    assert (lost.entered, lost.current) == (1, 1)


def test_purchases_move_the_lead_and_count_as_goals_with_their_value(
    doors: Journey, tmp_path: Path
) -> None:
    report = run(
        doors,
        tmp_path,
        [
            page("buyer", "/catalog"),
            page("buyer", "/landing", timedelta(hours=1)),
            track("buyer", "order_completed", timedelta(days=1), revenue=100),
            track("buyer", "order_completed", timedelta(days=2), revenue=50),
            page("browser", "/catalog"),
        ],
    )

    assert moves(report)[-1] == ("nurturing", "customer", "order_completed")
    assert [goal.value for goal in report.leads[0].goals] == [100, 50]
    kpis = report.kpis
    assert (kpis.leads, kpis.customers, kpis.goals) == (2, 1, 2)
    assert kpis.conversion == 0.5
    assert kpis.average_value == 75
    assert kpis.purchases_per_customer == 2
    assert kpis.revenue == 150
    visitor = kpis.stages[0]
    assert (visitor.entered, dict(visitor.exited_to)) == (2, {"nurturing": 1, "lost": 1})


def test_sequence_emails_go_out_at_start_plus_waits_and_stop_on_a_stop_on_event(
    doors: Journey, tmp_path: Path
) -> None:
    started = timedelta(hours=1)
    report = run(
        doors,
        tmp_path,
        [
            page("u1", "/catalog"),
            page("u1", "/landing", started),
            track("u1", "demo_booked", started + timedelta(days=3)),
        ],
    )

    emails = [(email.template, email.at) for email in report.leads[0].emails]
    assert emails == [
        ("catalog", START + started),
        ("fittings", START + started + timedelta(days=2)),
    ]
    assert {email.sequence for email in report.leads[0].emails} == {"tips"}


def test_an_unused_offer_expires_and_the_offer_expired_transition_happens(
    doors: Journey, tmp_path: Path
) -> None:
    report = run(doors, tmp_path, [page("u1", "/catalog"), page("u1", "/landing")])

    (offer,) = report.leads[0].offers
    assert (offer.code, offer.status) == ("SIM-welcome-1", "expired")
    assert offer.ended_at == offer.expires_at == START + timedelta(days=5)
    assert moves(report)[2:] == [
        ("nurturing", "cooling", "offer.expired"),
        ("cooling", "lost", "timer"),
    ]
    assert report.leads[0].path[2].at == START + timedelta(days=5)


def test_a_coupon_before_expiry_redeems_the_offer_instead(doors: Journey, tmp_path: Path) -> None:
    report = run(
        doors,
        tmp_path,
        [
            page("u1", "/catalog"),
            page("u1", "/landing"),
            track("u1", "cart_viewed", timedelta(days=1), coupon="SIM-welcome-1"),
        ],
    )

    (offer,) = report.leads[0].offers
    assert (offer.status, offer.ended_at) == ("redeemed", START + timedelta(days=1))
    assert moves(report)[-1] == ("nurturing", "customer", "offer.redeemed")
    assert "offer.expired" not in {cause for _, _, cause in moves(report)}


def test_an_identify_ties_the_anonymous_visits_to_the_user_and_sets_traits(
    doors: Journey, tmp_path: Path
) -> None:
    anonymous_visit = {
        "type": "page",
        "anonymousId": "a1",
        "properties": {"path": "/catalog"},
        "timestamp": START.isoformat(),
    }
    identify = {
        "type": "identify",
        "userId": "u1",
        "anonymousId": "a1",
        "traits": {"plan": "pro"},
        "timestamp": (START + timedelta(minutes=5)).isoformat(),
    }
    report = run(
        doors, tmp_path, [anonymous_visit, identify, page("u1", "/landing", timedelta(hours=1))]
    )

    (lead,) = report.leads
    assert lead.lead == "user:u1"
    assert lead.traits == {"plan": "pro"}
    assert moves(report)[1] == ("visitor", "nurturing", "page")


def test_every_bad_line_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    no_lead = {"type": "page", "timestamp": START.isoformat()}
    path.write_text(json.dumps(page("u1", "/catalog")) + "\n{not json\n" + json.dumps(no_lead))

    with pytest.raises(BadEvents) as raised:
        read_events(path)

    first, second = raised.value.problems
    assert first.startswith(f"{path}:2: not valid JSON")
    assert second == f"{path}:3: a message needs userId or anonymousId"


def test_cli_prints_the_report_and_writes_it_as_json(journeys_dir: Path, tmp_path: Path) -> None:
    events = write_events(tmp_path, [page("u1", "/catalog")])
    output = tmp_path / "report.json"

    result = CliRunner().invoke(app, ["simulate", "doors", "--events", str(events), "-o", output])

    assert result.exit_code == 0, result.output
    assert "lead user:u1" in result.output
    assert "virtual time: 2026-11-02 09:00 .. 2026-11-16 09:00 UTC" in result.output
    written = json.loads(output.read_text())
    assert written["kpis"]["totals"]["leads"] == 1
    assert written["leads"][0]["runs"] == [{"entry_no": 1, "stage": "lost", "state": "completed"}]


def test_cli_exits_1_naming_a_bad_line(journeys_dir: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(page("u1", "/catalog")) + "\n[1, 2]\n")

    result = CliRunner().invoke(app, ["simulate", "doors", "--events", str(events)])

    assert result.exit_code == 1
    assert f"{events}:2: a message must be a JSON object" in result.output
    assert "events.jsonl:2: " in result.output


def test_cli_exits_1_listing_the_journeys_for_an_unknown_id(
    journeys_dir: Path, tmp_path: Path
) -> None:
    events = write_events(tmp_path, [page("u1", "/catalog")])

    result = CliRunner().invoke(app, ["simulate", "windows", "--events", str(events)])

    assert result.exit_code == 1
    assert "no journey 'windows'; there are: doors" in result.output
