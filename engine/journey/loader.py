"""Journey files in; a JourneySet out, or every error of every file at once.

A marketer fixing a map wants the whole list in one go, each error as
`file:line: message` in words they use (keys, stages, phases), not pydantic's
locations and type names. So the YAML is read with the line of every value,
pydantic's errors are mapped back onto those lines and reworded, and the
checks that need the whole map (validate.py) run on each journey that has the
right shape, then across all of them.
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, Tag, ValidationError
from pydantic_core import ErrorDetails

from engine.journey.model import ACTION_KINDS, NAME_PATTERN, Journey
from engine.journey.validate import (
    JourneyError,
    JourneyErrors,
    ParsedJourney,
    check_across,
    check_journey,
)
from engine.journey.yaml_lines import Lines, YamlError, YamlPath, load

SUFFIXES = (".yaml", ".yml")

_DATETIME = "a date and time like 2026-12-31T23:59:59+03:00"
# What a value should have been, by pydantic error type, in the marketer's words.
_EXPECTED = {
    "string_type": "text",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true/false",
    "bool_parsing": "true/false",
    "dict_type": "a mapping (key: value)",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "list_type": "a list",
    "tuple_type": "a list",
    "datetime_type": _DATETIME,
    "datetime_parsing": _DATETIME,
    "datetime_from_date_parsing": _DATETIME,
}
# Discriminator errors whose message, written in model.py, is already the whole story.
_SELF_EXPLAINED = ("unknown_action", "bad_transition", "bad_step")


@dataclass(frozen=True)
class JourneySource:
    """A loaded journey with the file and exact text it came from (the text is what a
    stored version keeps)."""

    journey: Journey
    path: Path
    text: str


@dataclass(frozen=True)
class JourneySet:
    """Valid journeys in the order their files were given, looked up by id."""

    sources: tuple[JourneySource, ...] = ()

    @cached_property
    def _by_id(self) -> Mapping[str, JourneySource]:
        return {source.journey.id: source for source in self.sources}

    def __iter__(self) -> Iterator[Journey]:
        return (source.journey for source in self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __contains__(self, journey_id: object) -> bool:
        return journey_id in self._by_id

    def __getitem__(self, journey_id: str) -> Journey:
        return self._by_id[journey_id].journey

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(source.journey.id for source in self.sources)

    def source(self, journey_id: str) -> JourneySource:
        return self._by_id[journey_id]


def load_journeys(paths: Iterable[Path], templates_dir: Path | None = None) -> JourneySet:
    """Load journey files and directories (their *.yaml and *.yml, not recursive); raise
    JourneyErrors with every error of every file if any."""
    errors: list[JourneyError] = []
    loaded: list[tuple[ParsedJourney, str]] = []
    for file in _journey_files(paths, errors):
        try:
            text = _read(file)
            parsed = _parse(text, file)
        except JourneyErrors as found:
            errors.extend(found.errors)
            continue
        errors.extend(check_journey(parsed, templates_dir))
        loaded.append((parsed, text))
    errors.extend(check_across([parsed for parsed, _ in loaded]))
    if errors:
        raise JourneyErrors(errors)
    return JourneySet(tuple(JourneySource(p.journey, p.file, text) for p, text in loaded))


def load_journey_file(path: Path, templates_dir: Path | None = None) -> Journey:
    """One journey file on its own; raises JourneyErrors."""
    return load_journey_text(_read(path), path, templates_dir)


def load_journey_text(text: str, origin: Path, templates_dir: Path | None = None) -> Journey:
    """One journey from its YAML text, e.g. a stored version; `origin` names it in errors.
    Raises JourneyErrors."""
    parsed = _parse(text, origin)
    errors = check_journey(parsed, templates_dir)
    if errors:
        raise JourneyErrors(errors)
    return parsed.journey


def _journey_files(paths: Iterable[Path], errors: list[JourneyError]) -> Iterator[Path]:
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        elif path.exists():
            files = [path]
        else:
            errors.append(JourneyError(path, 1, "no such file or directory"))
            continue
        for file in files:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                yield file


def _read(file: Path) -> str:
    try:
        data = file.read_bytes()
    except OSError as error:
        raise JourneyErrors([JourneyError(file, 1, f"cannot read: {error.strerror}")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise JourneyErrors([JourneyError(file, line, "not UTF-8 text")]) from None


def _parse(text: str, file: Path) -> ParsedJourney:
    try:
        data, lines = load(text)
    except YamlError as error:
        raise JourneyErrors([JourneyError(file, error.line, error.message)]) from None
    if data is None:
        required = ", ".join(n for n, f in Journey.model_fields.items() if f.is_required())
        raise JourneyErrors([JourneyError(file, 1, f"empty file: a journey needs {required}")])
    try:
        journey = Journey.model_validate(data)
    except ValidationError as error:
        raise JourneyErrors(_explain(error, file, lines)) from None
    return ParsedJourney(file, journey, lines)


def _explain(error: ValidationError, file: Path, lines: Lines) -> list[JourneyError]:
    """Pydantic's errors as `file:line: message`; the errors a union reports for each of
    its alternatives about one value become one error."""
    messages: dict[tuple[int, str], None] = {}
    expected: dict[YamlPath, tuple[list[str], object]] = {}
    for detail in error.errors(include_url=False):
        if _spurious(detail):
            continue
        path = _yaml_path(detail["loc"], lines)
        noun = _EXPECTED.get(detail["type"])
        if noun is None:
            messages[lines.line_of(path), _message(detail, path)] = None
        else:
            expected.setdefault(path, ([], detail["input"]))[0].append(noun)
    for path, (nouns, value) in expected.items():
        message = f"{_name(path)}: expected {_either(nouns)}, got {_describe(value)}"
        messages[lines.line_of(path), message] = None
    return [JourneyError(file, line, message) for line, message in messages]


def _spurious(detail: ErrorDetails) -> bool:
    """Pydantic adds 'should have at least 1 item' to a list whose items all failed."""
    value = detail["input"]
    minimum = detail.get("ctx", {}).get("min_length", 0)
    return detail["type"] == "too_short" and isinstance(value, Sized) and len(value) >= minimum


def _yaml_path(loc: tuple[int | str, ...], lines: Lines) -> YamlPath:
    """The path written in the file for a pydantic location, which also holds union tags
    ('on', 'matcher', 'audience.add') and '[key]' that are not keys of the file."""
    path: YamlPath = ()
    for index, part in enumerate(loc):
        step = (*path, part)
        if step not in lines:
            continue
        following = loc[index + 1 : index + 2]
        if following and (*path, *following) in lines and (*step, *following) not in lines:
            continue  # a union tag that is also a key here, like a transition's `on`
        path = step
    return path


def _message(detail: ErrorDetails, path: YamlPath) -> str:
    kind, loc, value = detail["type"], detail["loc"], detail["input"]
    ctx = detail.get("ctx", {})
    name = _name(path)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        known = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return f"unknown key '{loc[-1]}'{known}"
    if kind == "missing":
        return f"missing key '{loc[-1]}'"
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
        subject = f"value {value!r} in {name}" if isinstance(loc[-1], int) else f"{name} {value!r}"
        return f"bad {subject}: expected one of {choices}"
    if kind == "unknown_action" and isinstance(value, dict) and len(value) == 1:
        (action,) = value
        return f"unknown action '{action}' (expected one of: {', '.join(ACTION_KINDS)})"
    if kind in _SELF_EXPLAINED:
        return detail["msg"]
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == NAME_PATTERN:
        return f"bad name {value!r}: use only a-z, 0-9 and _ (like first_contact)"
    if kind == "too_short":
        minimum = ctx["min_length"]
        return f"{name}: needs at least {minimum} item{'' if minimum == 1 else 's'}"
    message = detail["msg"]
    return f"{name}: {message[:1].lower()}{message[1:]}"


def _name(path: YamlPath) -> str:
    """The key a value was written under, to name it in a message."""
    keys = [part for part in path if isinstance(part, str)]
    return keys[-1] if keys else "the journey"


def _either(nouns: list[str]) -> str:
    unique = list(dict.fromkeys(nouns))
    if "a number" in unique and "a whole number" in unique:
        unique.remove("a whole number")
    return unique[0] if len(unique) == 1 else f"{', '.join(unique[:-1])} or {unique[-1]}"


def _describe(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys of the model pydantic was validating at `loc`, found by following the
    location through the model's type annotations."""
    annotation: Any = Journey
    for part in loc:
        annotation = _inner(annotation, part)
    model = _strip(annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [field.alias or name for name, field in model.model_fields.items()]
    return []


def _inner(annotation: Any, part: int | str) -> Any:
    """The annotation of the value at `part` inside a value of `annotation`."""
    annotation = _strip(annotation)
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = annotation.model_fields.items()
        return next((f.annotation for n, f in fields if part in (n, f.alias)), None)
    if origin in (Union, types.UnionType):
        return next((m for m in get_args(annotation) if _tag(m) == part), None)
    if origin in (tuple, list):
        return get_args(annotation)[0]
    if origin is dict:
        return get_args(annotation)[0 if part == "[key]" else 1]
    return None


def _strip(annotation: Any) -> Any:
    """Without `Annotated[...]` and `| None`, which add no step to a location."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        if get_origin(annotation) in (Union, types.UnionType):
            members = [m for m in get_args(annotation) if m is not type(None)]
            if len(members) == 1:
                annotation = members[0]
                continue
        return annotation


def _tag(member: Any) -> str | None:
    if get_origin(member) is Annotated:
        tags = [meta.tag for meta in get_args(member)[1:] if isinstance(meta, Tag)]
        return tags[0] if tags else None
    return None
