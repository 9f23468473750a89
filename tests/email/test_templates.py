"""Rendering email templates: sandboxed, autoescaped HTML, plain subject and text."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

from channels.email import EmailTemplates, RenderedEmail, check_templates
from channels.email.templates import MINIMAL_LEAD, SAMPLE_LEAD, SAMPLE_OFFER

EXAMPLES = Path(__file__).parents[2] / "templates" / "emails"


def write(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.j2"
    path.write_text(body, encoding="utf-8")
    return path


def render(directory: Path, name: str, **traits: object) -> RenderedEmail:
    return EmailTemplates(directory).render(
        name,
        lead={"email": "ada@example.com", **traits},
        offer=None,
        journey=("doors", "Doors"),
        stage=("first_contact", "First contact"),
        unsubscribe_url="https://example.com/u/1",
    )


@pytest.mark.parametrize("name", EmailTemplates(EXAMPLES).names())
@pytest.mark.parametrize("lead", [SAMPLE_LEAD, MINIMAL_LEAD], ids=["full", "minimal"])
def test_every_example_template_renders_for_the_full_and_the_minimal_lead(
    name: str, lead: dict[str, str]
) -> None:
    rendered = EmailTemplates(EXAMPLES).render(
        name,
        lead=lead,
        offer=SAMPLE_OFFER if lead is SAMPLE_LEAD else None,
        journey=("doors", "Doors"),
        stage=("nurturing", "Nurturing"),
        unsubscribe_url="https://example.com/u/1",
    )
    assert rendered.subject and "\n" not in rendered.subject
    assert "https://example.com/u/1" in rendered.html
    assert rendered.text.strip()


def test_the_example_folder_passes_the_check() -> None:
    assert check_templates(EXAMPLES, []) == []


def test_html_escapes_a_trait_but_subject_and_text_keep_it_as_written(tmp_path: Path) -> None:
    write(
        tmp_path,
        "hello",
        "{% block subject %}Hi {{ lead.first_name }}{% endblock %}"
        "{% block html %}<p>Hi {{ lead.first_name }}</p>{% endblock %}"
        "{% block text %}Hi {{ lead.first_name }}{% endblock %}",
    )
    rendered = render(tmp_path, "hello", first_name="<script>O'Brien")
    assert "&lt;script&gt;O&#39;Brien" in rendered.html
    assert "<script>" not in rendered.html
    assert rendered.subject == "Hi <script>O'Brien"
    assert rendered.text == "Hi <script>O'Brien\n"


def test_subject_is_one_line_whatever_the_trait_holds(tmp_path: Path) -> None:
    write(
        tmp_path,
        "hello",
        "{% block subject %}Hi\n  {{ lead.first_name }}{% endblock %}"
        "{% block html %}{% endblock %}",
    )
    rendered = render(tmp_path, "hello", first_name="Ada\r\nBcc: all@example.com")
    assert rendered.subject == "Hi Ada Bcc: all@example.com"


def test_a_trait_without_default_is_undefined_for_a_lead_who_lacks_it(tmp_path: Path) -> None:
    write(
        tmp_path,
        "hello",
        "{% block subject %}Hi {{ lead.city | default('there') }}{% endblock %}"
        "{% block html %}{{ lead.city }}{% endblock %}",
    )
    assert render(tmp_path, "hello", city="Oslo").subject == "Hi Oslo"
    with pytest.raises(Exception, match=r"'lead\.city' is undefined"):
        render(tmp_path, "hello")


def test_a_dot_finds_what_jinja_finds_a_trait_an_item_or_a_dicts_own_method(
    tmp_path: Path,
) -> None:
    """`a.b` prefers an attribute to an item, as Jinja documents: a dict's `items` is
    its method even when it holds an item so named; traits are items only."""
    write(
        tmp_path,
        "hello",
        '{% block subject %}{% set d = {"color": "red", "items": "listed"} %}'
        "{{ d.color }} {{ d.items is callable }} {{ d['items'] }} {{ lead.items }}"
        " {{ lead.address.city }} {{ d.missing is undefined }}{% endblock %}"
        "{% block html %}x{% endblock %}",
    )

    rendered = render(tmp_path, "hello", items="two doors", address={"city": "Oslo"})

    assert rendered.subject == "red True listed two doors Oslo True"


@pytest.mark.parametrize(
    "expression",
    [
        "{{ lead.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ lead.__init__.__globals__ }}",
        "{{ journey.__getitem__.__globals__ }}",
    ],
)
def test_the_sandbox_refuses_python_internals(tmp_path: Path, expression: str) -> None:
    write(
        tmp_path,
        "evil",
        "{% block subject %}x{% endblock %}\n{% block html %}\n"
        f"{expression}\n{{% endblock %}}",
    )
    with pytest.raises(SecurityError):
        render(tmp_path, "evil")
    [error] = check_templates(tmp_path, ["evil"])
    assert (error.file, error.line) == (tmp_path / "evil.j2", 3)
    assert error.message.startswith("unsafe: access to attribute '__")


def test_check_reports_an_undefined_variable_at_its_file_and_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        "typo",
        "{% block subject %}Hello{% endblock %}\n{% block html %}\n<p>{{ lead.fist_name }}</p>\n"
        "{% endblock %}",
    )
    assert [str(e) for e in check_templates(tmp_path, ["typo"])] == [
        f"{tmp_path / 'typo.j2'}:3: undefined: lead.fist_name"
    ]


def test_check_reports_an_offer_used_without_a_guard(tmp_path: Path) -> None:
    write(
        tmp_path,
        "deal",
        "{% block subject %}Your code {{ offer.code }}{% endblock %}{% block html %}{% endblock %}",
    )
    [error] = check_templates(tmp_path, ["deal"])
    assert error.line == 1
    assert "guard with {% if offer %}" in error.message


def test_check_reports_an_error_inside_a_partial_at_the_partial_line(tmp_path: Path) -> None:
    write(tmp_path, "_layout", "<html>\n{% block html %}{% endblock %}\n{{ lead.nope }}\n</html>")
    write(
        tmp_path,
        "child",
        '{% extends "_layout.j2" %}'
        "{% block subject %}x{% endblock %}{% block html %}y{% endblock %}",
    )
    assert [(e.file.name, e.line) for e in check_templates(tmp_path, [])] == [("_layout.j2", 3)]


def test_check_reports_a_syntax_error_at_its_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "broken", "{% block subject %}x{% endblock %}\n\n{% block html %}{% if %}")
    [error] = check_templates(tmp_path, ["broken"])
    assert (error.file, error.line) == (tmp_path / "broken.j2", 3)
    assert error.message.startswith("syntax error: ")


def test_check_reports_a_missing_subject_block(tmp_path: Path) -> None:
    write(tmp_path, "untitled", "{% block html %}<p>Hi</p>{% endblock %}")
    assert [e.message for e in check_templates(tmp_path, [])] == ["missing block 'subject'"]


def test_partials_are_not_emails(tmp_path: Path) -> None:
    write(tmp_path, "_layout", "{{ undefined_everywhere }}")
    write(tmp_path, "hello", "{% block subject %}x{% endblock %}{% block html %}{% endblock %}")
    assert EmailTemplates(tmp_path).names() == ["hello"]
    with pytest.raises(Exception, match="partial"):
        render(tmp_path, "_layout")


def test_text_is_derived_from_the_html_when_the_template_has_no_text_block(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        "_layout",
        "<html><head><title>{{ self.subject() }}</title></head><body>{% block html %}{% endblock %}"
        '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p></body></html>',
    )
    write(
        tmp_path,
        "hello",
        '{% extends "_layout.j2" %}{% block subject %}x{% endblock %}'
        "{% block html %}<p>Hi {{ lead.email }}</p>"
        '<p>See <a href="https://doors.example/catalog">the catalog</a>.</p>{% endblock %}',
    )
    assert render(tmp_path, "hello").text == (
        "Hi ada@example.com\n\nSee the catalog (https://doors.example/catalog).\n\n"
        "Unsubscribe (https://example.com/u/1)\n"
    )
