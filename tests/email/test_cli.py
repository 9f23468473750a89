"""`cjm validate` checks the templates journeys send; `cjm preview` renders one, for a
sample lead, given traits, or a lead in the database."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from channels.email.templates import SAMPLE_UNSUBSCRIBE_URL
from engine.cli import app
from engine.clock import ManualClock
from engine.journey import load_journeys
from tests.email.test_transport import free_port
from tests.worker.conftest import START, Engine, start_engine

JOURNEY = """\
id: hello
name: Hello
entry: {on: signed_up}
stages:
  - id: welcome
    phase: awareness
    on_enter:
      - email.send: welcome
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "journeys").mkdir()
    (tmp_path / "journeys" / "hello.yaml").write_text(JOURNEY)
    (tmp_path / "emails").mkdir()
    monkeypatch.setenv("CJM_JOURNEYS_DIR", str(tmp_path / "journeys"))
    monkeypatch.setenv("CJM_TEMPLATES_DIR", str(tmp_path / "emails"))
    monkeypatch.setenv("CJM_EMAIL_FROM", "Doors <hello@doors.example>")
    return tmp_path


def welcome(project: Path, html: str) -> Path:
    path = project / "emails" / "welcome.j2"
    path.write_text(
        "{% block subject %}Welcome, {{ lead.first_name | default('friend') }}"
        "{% endblock %}\n{% block html %}\n" + html + "\n{% endblock %}\n"
    )
    return path


def test_validate_exits_1_with_the_line_of_an_undefined_variable(project: Path) -> None:
    path = welcome(project, "<p>Hi</p>\n<p>{{ lead.fist_name }}</p>")
    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 1
    assert result.output == f"{path}:4: undefined: lead.fist_name\n"


def test_validate_accepts_journeys_whose_templates_render(project: Path) -> None:
    welcome(project, "<p>Hi {{ lead.first_name | default('there') }}</p>")
    result = CliRunner().invoke(app, ["validate"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: 1 journeys")


def test_preview_prints_the_subject_for_the_given_traits(project: Path) -> None:
    welcome(project, "<p>Hi</p>")
    traits = project / "lead.json"
    traits.write_text(json.dumps({"email": "owner@example.com", "first_name": "Owner"}))
    result = CliRunner().invoke(app, ["preview", "welcome", "--traits", str(traits)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Subject: Welcome, Owner\n")


def test_preview_writes_a_multipart_alternative_eml_text_then_html(project: Path) -> None:
    welcome(project, '<p>See <a href="https://doors.example">the doors</a></p>')
    out = project / "welcome.eml"
    result = CliRunner().invoke(app, ["preview", "welcome", "-o", str(out)])
    assert result.exit_code == 0, result.output
    message = email.message_from_bytes(out.read_bytes(), policy=email.policy.default)
    assert message.get_content_type() == "multipart/alternative"
    assert message["Subject"] == "Welcome, Ada"
    assert message["From"] == "Doors <hello@doors.example>"
    assert message["To"] == "ada@example.com"
    text, html = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "the doors (https://doors.example)" in text.get_content()
    assert html.get_content_type() == "text/html"
    assert '<a href="https://doors.example">' in html.get_content()


# --- previewing a lead in the database ------------------------------------------------------------

NUDGE = """\
id: nudge
name: Nudge
entry: {on: cart_left}
stages:
  - id: waiting
    phase: consideration
    transitions:
      - {on: came_back, to: nudged}
  - id: nudged
    name: Nudged once
    phase: consideration
    on_enter:
      - email.send: welcome
"""


async def _ingest(database_url: str, project: Path) -> dict[str, int]:
    """Leads made the way production makes them: messages in, the worker applies them.

    lead-1 signed up (journey hello); lead-2 left a cart and came back (journey nudge, a
    later stage than the first to send `welcome`); visitor-1, anonymous, is then
    identified as lead-1 and merged into it."""
    journeys = load_journeys([project / "journeys"], project / "emails")
    clock = ManualClock(START)
    engine = Engine(await start_engine(database_url, journeys, clock), clock)
    try:
        await engine.send(
            "identify",
            userId="lead-1",
            traits={"email": "lead-1@example.com", "first_name": "Reader"},
        )
        await engine.send("track", userId="lead-1", event="signed_up")
        await engine.send(
            "identify",
            userId="lead-2",
            traits={"email": "lead-2@example.com", "first_name": "Shopper"},
        )
        await engine.send("track", userId="lead-2", event="cart_left")
        await engine.send("page", anonymousId="visitor-1", properties={"path": "/doors"})
        await engine.run()
        await engine.send("track", userId="lead-2", event="came_back")
        visitor = await engine.lead_id(anonymous_id="visitor-1")
        await engine.send("identify", userId="lead-1", anonymousId="visitor-1")
        await engine.run(timedelta(minutes=1))

        ids = {
            "lead-1": await engine.lead_id(user_id="lead-1"),
            "lead-2": await engine.lead_id(user_id="lead-2"),
            "visitor-1": visitor,
        }
        assert (await engine.lead(visitor)).merged_into == ids["lead-1"]
        assert await engine.stages(ids["lead-1"]) == [("welcome", "active")]
        assert await engine.stages(ids["lead-2"]) == [("nudged", "active")]
        return ids
    finally:
        await engine.runtime.stop()


@pytest.fixture
def leads(project: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Lead ids by user id (or anonymous id), in the database of CJM_DATABASE_URL."""
    (project / "journeys" / "nudge.yaml").write_text(NUDGE)
    welcome(
        project,
        "<p>Hi {{ lead.first_name | default('friend') }},"
        " from {{ journey.name }} at {{ stage.name }}.</p>\n"
        '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>',
    )
    monkeypatch.setenv("CJM_DATABASE_URL", database_url)
    return asyncio.run(_ingest(database_url, project))


def preview(*args: str) -> tuple[int, str, str]:
    """Exit code, standard output and standard error of `cjm preview welcome ...`."""
    result = CliRunner().invoke(app, ["preview", "welcome", *args])
    return result.exit_code, result.stdout, result.stderr


def test_preview_of_a_lead_renders_its_traits(leads: dict[str, int]) -> None:
    code, out, err = preview("--lead", str(leads["lead-1"]))
    assert code == 0, err
    assert out.startswith("Subject: Welcome, Reader\n")
    assert "Hi Reader, from Hello at Welcome." in out
    # The sample link, never one signed for the lead.
    assert f'href="{SAMPLE_UNSUBSCRIBE_URL}"' in out


def test_preview_of_a_lead_uses_the_journey_and_stage_it_is_in(leads: dict[str, int]) -> None:
    code, out, err = preview("--lead", str(leads["lead-2"]))
    assert code == 0, err
    assert out.startswith("Subject: Welcome, Shopper\n")
    # Not hello, the first journey to send `welcome`: nudge, where lead-2 is now.
    assert "Hi Shopper, from Nudge at Nudged once." in out


def test_preview_of_a_lead_writes_an_eml_to_its_address(
    leads: dict[str, int], project: Path
) -> None:
    out = project / "welcome.eml"
    code, _, err = preview("--lead", str(leads["lead-2"]), "-o", str(out))
    assert code == 0, err
    message = email.message_from_bytes(out.read_bytes(), policy=email.policy.default)
    assert message["To"] == "lead-2@example.com"
    assert message["Subject"] == "Welcome, Shopper"


def test_preview_of_a_merged_lead_renders_the_survivors_traits(leads: dict[str, int]) -> None:
    code, out, err = preview("--lead", str(leads["visitor-1"]))
    assert code == 0, err
    assert out.startswith("Subject: Welcome, Reader\n")
    assert "Hi Reader, from Hello at Welcome." in out


def test_preview_of_an_unknown_lead_exits_1(leads: dict[str, int]) -> None:
    unknown = max(leads.values()) + 1000
    code, out, err = preview("--lead", str(unknown))
    assert (code, out) == (1, "")
    assert err.startswith(f"no lead {unknown} in the database at ")


def test_preview_of_a_lead_and_traits_together_exits_1(project: Path) -> None:
    traits = project / "lead.json"
    traits.write_text(json.dumps({"email": "lead-1@example.com"}))
    code, out, err = preview("--lead", "1", "--traits", str(traits))
    assert (code, out) == (1, "")
    assert err == "--lead and --traits cannot be used together: preview a lead or given traits\n"


def test_preview_of_a_lead_in_a_database_never_migrated_exits_1(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "empty.db").touch()
    monkeypatch.setenv("CJM_DATABASE_URL", f"sqlite+aiosqlite:///{project / 'empty.db'}")
    code, out, err = preview("--lead", "1")
    assert (code, out) == (1, "")
    assert "never migrated" in err
    assert "run `cjm db upgrade`" in err


def test_preview_of_a_lead_without_a_database_file_exits_1_and_creates_none(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{project / 'missing.db'}"
    monkeypatch.setenv("CJM_DATABASE_URL", url)
    code, out, err = preview("--lead", "1")
    assert (code, out) == (1, "")
    assert err == f"no database at {url}: is CJM_DATABASE_URL right?\n"
    assert not (project / "missing.db").exists()


def test_preview_of_a_lead_in_an_unreachable_database_exits_1(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql+asyncpg://cjm:secret@127.0.0.1:{free_port()}/cjm"
    monkeypatch.setenv("CJM_DATABASE_URL", url)
    code, out, err = preview("--lead", "1")
    assert (code, out) == (1, "")
    assert err.startswith("cannot read lead 1 from the database at postgresql+asyncpg://cjm:***@")
    assert "secret" not in err
