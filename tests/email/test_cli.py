"""`cjm validate` checks the templates journeys send; `cjm preview` renders one."""

from __future__ import annotations

import email
import email.policy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app

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
    traits.write_text(json.dumps({"email": "ada@example.com", "first_name": "Ada"}))
    result = CliRunner().invoke(app, ["preview", "welcome", "--traits", str(traits)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Subject: Welcome, Ada\n")


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
