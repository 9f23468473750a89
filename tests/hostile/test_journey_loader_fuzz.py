"""Whatever a journey file holds, the loader answers with a journey or with its own
errors (`file:line: message`), never with another exception: a typo, a paste of the
wrong file or a hostile upload must be reported, not crash `cjm validate` or a start."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.journey.loader import load_journey_file, load_journey_text, load_journeys
from engine.journey.validate import JourneyErrors

FUZZ = settings(max_examples=150, derandomize=True, deadline=None)
ORIGIN = Path("journeys/fuzzed.yaml")

# What YAML is made of, so that generated text reaches the parser's corners, not just
# its first error.
YAML_PIECES = st.sampled_from(
    [
        "\n",
        "  ",
        "- ",
        ": ",
        "? ",
        "[",
        "]",
        "{",
        "}",
        ", ",
        "&a ",
        "*a",
        "!!str ",
        "!!int ",
        "!!float ",
        "!!map ",
        "!!python/object:os.system ",
        "!tag ",
        "|\n",
        ">\n",
        "'",
        '"',
        "#",
        "%YAML 1.2\n",
        "---\n",
        "...\n",
        "~",
        "null",
        "yes",
        "on",
        "09:00",
        "0x1F",
        "0o17",
        "1e400",
        ".inf",
        ".nan",
        "9" * 5000,
        "\t",
        "\x00",
        "\x85",
        "\ufeff",
        "id",
        "name",
        "version",
        "entry",
        "stages",
        "transitions",
        "to",
        "after",
        "where",
        "on_enter",
        "phase",
        "terminal",
        "email.send",
        "audience.add",
        "2h",
        "-1d",
        "doors",
    ]
)
YAMLISH_TEXT = st.lists(YAML_PIECES | st.text(max_size=8), max_size=60).map("".join)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["first_contact", "2h", "awareness", "page", "lost", "customer"])
)
KEYS = st.sampled_from(
    [
        "id",
        "name",
        "version",
        "segment",
        "entry",
        "on",
        "where",
        "stages",
        "transitions",
        "to",
        "after",
        "at",
        "phase",
        "terminal",
        "on_enter",
        "goal",
        "targets",
        "sequences",
        "offers",
        "audiences",
        "steps",
        "wait",
        "email",
        "properties.path",
        "startswith",
    ]
) | st.text(max_size=10)
NESTED = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=40,
)


def loads_or_reports(text: str, origin: Path = ORIGIN) -> None:
    """The loader's only outcomes: a journey, or errors that each name the file and a
    line of it."""
    try:
        load_journey_text(text, origin)
    except JourneyErrors as refused:
        assert refused.errors
        last_line = text.count("\n") + 1
        for error in refused.errors:
            assert error.file == origin
            assert 1 <= error.line <= last_line
            assert error.message


@FUZZ
@given(YAMLISH_TEXT)
def test_any_yaml_like_text_gets_a_journey_or_located_errors(text: str) -> None:
    loads_or_reports(text)


@FUZZ
@given(st.text())
def test_any_text_at_all_gets_a_journey_or_located_errors(text: str) -> None:
    loads_or_reports(text)


@FUZZ
@given(NESTED)
def test_any_nested_structure_gets_a_journey_or_located_errors(document: Any) -> None:
    loads_or_reports(yaml.safe_dump(document, allow_unicode=True))


@pytest.mark.parametrize(
    "text",
    [
        "stages: " + "[" * 10_000,
        "stages: " + "{a: " * 10_000,
        "stages:\n" + "".join("  " * level + "- \n" for level in range(2_000)),
        "entry:\n" + "".join("  " * (level + 1) + f"k{level}:\n" for level in range(2_000)),
    ],
    ids=["flow lists", "flow mappings", "block lists", "block mappings"],
)
def test_a_document_nested_thousands_deep_is_refused_at_a_line(text: str) -> None:
    with pytest.raises(JourneyErrors) as refused:
        load_journey_text(text, ORIGIN)
    (error,) = refused.value.errors
    assert error.file == ORIGIN
    assert "nested more than" in error.message
    assert 1 <= error.line <= text.count("\n") + 1


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.binary(max_size=300), YAMLISH_TEXT)
def test_files_of_any_bytes_get_errors_naming_the_file(data: bytes, text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        raw = Path(directory) / "raw.yaml"
        raw.write_bytes(data)
        written = Path(directory) / "written.yml"
        written.write_text(text, encoding="utf-8", newline="")
        for path in (raw, written):
            try:
                load_journey_file(path)
            except JourneyErrors as refused:
                assert all(error.file == path and error.line >= 1 for error in refused.errors)
        try:
            load_journeys([Path(directory)])
        except JourneyErrors as refused:
            assert {error.file for error in refused.errors} <= {raw, written}
