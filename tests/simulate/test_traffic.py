"""`cjm simulate --leads N` adds synthetic leads that follow a weighted profile of
behaviours; the traffic is reproducible for a seed and goes through the same simulation
as recorded events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.ingest.messages import Message
from engine.journey import Journey
from engine.simulate import simulate as run_simulation
from engine.traffic import DEFAULT_PROFILE, Profile, generate, generate_leads, synthetic_leads

from .test_simulate import page, write_events

# Three leads in four browse; one in four buys within the day.
PROFILE = """\
- name: browses
  weight: 3
  steps:
    - {type: page, properties: {path: /catalog}}
- name: buys
  weight: 1
  steps:
    - {type: page, properties: {path: /catalog}}
    - {type: identify, after: 5m, traits: {email: "lead-{n}@example.com"}}
    - {event: order_completed, after: 1h, properties: {revenue: 80, order: "o-{n}"}}
"""


def write_profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    return path


def simulate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["simulate", "doors", *args])
    return result.exit_code, result.output


def totals(tmp_path: Path, *args: str) -> dict[str, float]:
    output = tmp_path / "report.json"
    code, text = simulate(*args, "-o", str(output))
    assert code == 0, text
    report = json.loads(output.read_text())
    assert "leads" not in report  # more than 20 leads: KPIs and totals only
    totals: dict[str, float] = report["kpis"]["totals"]
    return totals


def test_a_weighted_profile_gives_the_same_kpis_on_every_run_and_the_expected_share(
    journeys_dir: Path, tmp_path: Path
) -> None:
    profile = write_profile(tmp_path, PROFILE)
    args = ("--leads", "400", "--seed", "1", "--profile", str(profile))

    first = totals(tmp_path, *args)
    again = totals(tmp_path, *args)

    assert first == again
    assert first["leads"] == 400
    # 1 in 4 buys: a binomial share of 400 stays well within 0.25 +- 0.1 (over 4 sigma).
    assert abs(first["conversion"] - 0.25) < 0.1
    assert first["goals"] == first["customers"]
    assert first["revenue"] == 80 * first["customers"]


def test_another_seed_gives_other_traffic_and_the_generator_is_pure() -> None:
    one = list(generate(DEFAULT_PROFILE, 50, seed=1))
    assert one == list(generate(DEFAULT_PROFILE, 50, seed=1))
    assert one != list(generate(DEFAULT_PROFILE, 50, seed=2))
    buyer = next(message for message in one if message["type"] == "identify")
    n = buyer["anonymousId"].removeprefix("sim-")
    assert buyer["userId"] == buyer["traits"]["email"] == f"lead-{n}@example.com"


def test_the_built_in_profile_is_used_and_few_leads_are_printed_with_their_paths(
    journeys_dir: Path,
) -> None:
    code, text = simulate("--leads", "5")

    assert code == 0, text
    assert "simulation of doors v1: 5 leads" in text
    assert "(enter) -> visitor  (entry: page)" in text
    assert "virtual time: 2026-01-" in text  # the default start


def test_many_leads_print_only_the_kpis_unless_paths_are_asked_for(
    journeys_dir: Path,
) -> None:
    code, text = simulate("--leads", "21")
    assert code == 0, text
    assert "lead anon:sim-" not in text
    assert "paths of the 21 leads not shown" in text
    assert "KPIs" in text

    code, text = simulate("--leads", "21", "--paths")
    assert code == 0, text
    assert "lead anon:sim-" in text


def test_recorded_events_and_synthetic_leads_run_together(
    journeys_dir: Path, tmp_path: Path
) -> None:
    events = write_events(tmp_path, [page("u1", "/catalog")])
    output = tmp_path / "report.json"

    code, text = simulate("--events", str(events), "--leads", "3", "-o", str(output))

    assert code == 0, text
    report = json.loads(output.read_text())
    assert report["kpis"]["totals"]["leads"] == 4
    assert {lead["lead"] for lead in report["leads"]} >= {"user:u1", "anon:sim-1"}


def report_of(tmp_path: Path, *args: str) -> dict[str, Any]:
    output = tmp_path / "report.json"
    code, text = simulate(*args, "-o", str(output))
    assert code == 0, text
    report: dict[str, Any] = json.loads(output.read_text())
    return report


def test_streamed_kpis_equal_those_of_the_kept_leads_for_the_same_seed(
    journeys_dir: Path, tmp_path: Path
) -> None:
    events = write_events(tmp_path, [page("u1", "/catalog"), page("u1", "/landing")])
    args = ("--events", str(events), "--leads", "300", "--seed", "7")

    kept = report_of(tmp_path, *args, "--paths")
    streamed = report_of(tmp_path, *args)

    assert len(kept["leads"]) == kept["lead_count"] == 301  # the recorded lead first
    assert kept["leads"][0]["lead"] == "user:u1"
    assert "leads" not in streamed
    assert streamed["kpis"] == kept["kpis"]
    assert streamed["kpis"]["totals"]["customers"] > 0
    same = ("lead_count", "virtual_time")
    assert {key: streamed[key] for key in same} == {key: kept[key] for key in same}


def test_synthetic_leads_are_simulated_as_they_are_made(doors: Journey) -> None:
    made = 0

    def leads() -> Iterator[list[Message]]:
        nonlocal made
        for lead in synthetic_leads(DEFAULT_PROFILE, 50, seed=3):
            made += 1
            yield lead

    streamed = run_simulation(doors, synthetic=leads(), keep_leads=False)
    kept = run_simulation(doors, synthetic=synthetic_leads(DEFAULT_PROFILE, 50, seed=3))

    assert made == streamed.lead_count == kept.lead_count == len(kept.leads) == 50
    assert streamed.leads == ()
    assert streamed.kpis == kept.kpis
    assert (streamed.started_at, streamed.ended_at) == (kept.started_at, kept.ended_at)
    assert len(list(generate(DEFAULT_PROFILE, 50, seed=3))) == sum(
        len(lead) for lead in generate_leads(DEFAULT_PROFILE, 50, seed=3)
    )


def test_neither_events_nor_leads_is_an_error(journeys_dir: Path) -> None:
    code, text = simulate()

    assert code == 1
    assert "give --events FILE, --leads N, or both" in text


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (
            "- {weight: -1, steps: [{type: page}]}",
            "behaviour 1, weight: Input should be greater than 0",
        ),
        (
            "- {weight: 1, steps: [{type: page, colour: red}]}",
            "behaviour 1, step 1: unknown key `colour`",
        ),
        (
            "- {weight: 1, steps: [{type: page}, {event: x, after: soon}]}",
            "behaviour 1, step 2, after: bad duration 'soon'",
        ),
        ("- {weight: 1, steps: [{after: 1d}]}", "behaviour 1, step 1: a track step needs"),
        ("weight: 1", "a profile is a list of behaviours"),
    ],
)
def test_a_bad_profile_exits_1_naming_the_file_and_the_problem(
    journeys_dir: Path, tmp_path: Path, profile: str, message: str
) -> None:
    path = write_profile(tmp_path, profile)

    code, text = simulate("--leads", "10", "--profile", str(path))

    assert code == 1
    assert f"{path}: {message}" in text


def test_bad_start_and_spread_are_named(journeys_dir: Path) -> None:
    code, text = simulate("--leads", "2", "--start", "yesterday")
    assert (code, "bad --start 'yesterday'" in text) == (1, True)
    code, text = simulate("--leads", "2", "--spread", "a week")
    assert (code, "bad --spread: bad duration 'a week'" in text) == (1, True)


def test_leads_arrive_within_the_spread_from_the_start() -> None:
    profile = Profile.model_validate([{"weight": 1, "steps": [{"type": "page"}]}])
    start = datetime(2026, 3, 1, tzinfo=UTC)
    moments = [
        datetime.fromisoformat(message["timestamp"])
        for message in generate(profile, 200, start=start, spread=timedelta(hours=1))
    ]
    assert all(start <= moment < start + timedelta(hours=1) for moment in moments)
