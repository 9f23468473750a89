"""`cjm serve` as a user runs it: real HTTP, real processes, real time."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.conftest import ROOT, Server, refused_start, start_server, stop_server

QUICK = """\
id: quick
name: A journey with short timeouts
entry: {on: page, where: {properties.path: {startswith: /catalog}}}
exit: [{on: opted_out}]
stages:
  - id: browsing
    phase: awareness
    on_enter: [{audience.add: browsers}]
    transitions:
      - {on: signed_up, to: trial}
      - {after: 1s, to: reminded}
  - id: reminded
    phase: awareness
    transitions: [{on: signed_up, to: trial}]
  - id: trial
    phase: consideration
    transitions: [{after: 2s, to: expired}]
  - id: expired
    phase: consideration
    terminal: true
audiences:
  browsers: {}
"""


def _journeys(tmp_path: Path, text: str = QUICK) -> dict[str, str]:
    directory = tmp_path / "journeys"
    directory.mkdir(exist_ok=True)
    (directory / "quick.yaml").write_text(text)
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    return {"CJM_JOURNEYS_DIR": str(directory), "CJM_TEMPLATES_DIR": str(templates)}


def _wait_for_stage(server: Server, user_id: str, stage: str) -> dict[str, Any]:
    """The lead once its enrollment is in `stage` (checked for liveness, not speed)."""
    deadline = time.monotonic() + 15
    journey: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = server.admin(f"/v1/leads?user_id={user_id}").json()
        if found:
            lead = server.admin(f"/v1/leads/{found[0]['id']}").json()
            journeys = lead["journeys"]
            if journeys and journeys[0]["stage"] == stage:
                return dict(lead)
            journey = journeys[0] if journeys else {}
        time.sleep(0.05)
    raise AssertionError(f"{user_id} never reached {stage}; last seen: {journey}")


Serve = Callable[..., Server]


def test_events_and_timeouts_move_a_lead_through_a_running_server(
    serve: Serve, database_url: str, tmp_path: Path
) -> None:
    server = serve(CJM_DATABASE_URL=database_url, **_journeys(tmp_path))

    response = server.track("/v1/page", {"userId": "u1", "properties": {"path": "/catalog/a"}})
    assert response.status_code == 200
    assert response.json() == {"success": True}
    _wait_for_stage(server, "u1", "reminded")

    server.track("/v1/track", {"userId": "u1", "event": "signed_up"})
    lead = _wait_for_stage(server, "u1", "expired")

    (journey,) = lead["journeys"]
    assert journey["state"] == "completed"
    assert [(line["from"], line["to"], line["cause"]["type"]) for line in journey["history"]] == [
        (None, "browsing", "entry"),
        ("browsing", "reminded", "timer"),
        ("reminded", "trial", "event"),
        ("trial", "expired", "timer"),
    ]
    assert [audience["name"] for audience in lead["audiences"]] == ["browsers"]


def test_a_timeout_due_while_the_server_was_down_fires_when_it_is_back(
    serve: Serve, database_url: str, tmp_path: Path
) -> None:
    env = {"CJM_DATABASE_URL": database_url, **_journeys(tmp_path)}
    server = serve(**env)
    server.track("/v1/page", {"userId": "u1", "properties": {"path": "/catalog/a"}})
    _wait_for_stage(server, "u1", "browsing")
    stop_server(server)
    time.sleep(1.5)

    restarted = serve(**env)
    lead = _wait_for_stage(restarted, "u1", "reminded")
    assert lead["journeys"][0]["history"][-1]["cause"]["type"] == "timer"


def test_serve_loads_the_example_journeys_by_default(serve: Serve, database_url: str) -> None:
    server = serve(
        CJM_DATABASE_URL=database_url,
        CJM_JOURNEYS_DIR=str(ROOT / "journeys"),
        CJM_TEMPLATES_DIR=str(ROOT / "templates" / "emails"),
    )

    journeys = server.admin("/v1/journeys").json()
    assert sorted(journey["id"] for journey in journeys) == [
        "b2b_trial",
        "doors",
        "subscription_box",
    ]


def test_serve_refuses_to_start_with_an_invalid_journey(tmp_path: Path) -> None:
    env = _journeys(tmp_path, QUICK.replace("to: reminded}", "to: remindd}"))
    returncode, err = refused_start(
        ("serve",), {**env, "CJM_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cjm.db'}"}
    )

    assert returncode == 1
    assert re.search(
        r"quick\.yaml:\d+: stage 'browsing': transition to unknown stage 'remindd'", err
    )
    assert "not starting" in err


def test_first_start_prints_generated_keys_once_and_they_work(tmp_path: Path) -> None:
    env = {
        **_journeys(tmp_path),
        "CJM_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cjm.db'}",
        "CJM_WRITE_KEY": "",
        "CJM_ADMIN_KEY": "",
    }
    first = start_server(env, tmp_path / "first.log")
    stop_server(first)
    printed = first.log.read_text()
    write_key = re.search(r"write key: (wk_\S+)", printed)
    admin_key = re.search(r"admin key: (ak_\S+)", printed)
    assert write_key and admin_key, printed

    second = start_server(env, tmp_path / "second.log")
    try:
        again = second.log.read_text()
        assert write_key.group(1) not in again and "write key: stored" in again
        with second.client() as client:
            tracked = client.post(
                "/v1/track", json={"userId": "u1", "event": "x"}, auth=(write_key.group(1), "")
            )
            looked_up = client.get(
                "/v1/journeys", headers={"Authorization": f"Bearer {admin_key.group(1)}"}
            )
            refused = client.get(
                "/v1/journeys", headers={"Authorization": f"Bearer {write_key.group(1)}"}
            )
        assert tracked.status_code == 200
        assert looked_up.status_code == 200
        assert refused.status_code == 401
    finally:
        stop_server(second)


def test_serve_refuses_to_start_with_a_template_that_would_break_on_a_lead(
    tmp_path: Path,
) -> None:
    with_email = QUICK.replace(
        "on_enter: [{audience.add: browsers}]",
        "on_enter: [{audience.add: browsers}, {email.send: hello}]",
    )
    env = _journeys(tmp_path, with_email)
    (Path(env["CJM_TEMPLATES_DIR"]) / "hello.j2").write_text(
        "{% block subject %}Hi{% endblock %}\n{% block html %}\n<p>{{ lead.fist_name }}</p>\n"
        "{% endblock %}\n"
    )
    returncode, err = refused_start(
        ("serve",), {**env, "CJM_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cjm.db'}"}
    )

    assert returncode == 1
    assert re.search(r"hello\.j2:3: undefined: lead\.fist_name", err), err
