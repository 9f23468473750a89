"""The rules that tie a journey's values together, and journeys to each other.

The model checks each value on its own. What needs the whole map is checked
here: every `to` names a stage, every stage can be reached from the first, every
audience, sequence, offer and template an action names exists, and journey ids
and audience names (which are global) are used once across all files. Each
error points at the line to fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.journey.model import (
    ACTION_KINDS,
    Action,
    AudienceAdd,
    AudienceRemove,
    EmailSend,
    EmailStep,
    Journey,
    OfferGrant,
    SequenceStart,
    SequenceStop,
)
from engine.journey.yaml_lines import Lines, YamlPath

_ACTION_KEYS = {model: key for key, model in ACTION_KINDS.items()}


@dataclass(frozen=True, order=True)
class JourneyError:
    """One thing to fix in a journey file, and the line to fix it on."""

    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class JourneyErrors(Exception):
    """Every error found at once, sorted by file and line: a journey with any is refused."""

    def __init__(self, errors: Iterable[JourneyError]) -> None:
        self.errors = sorted(errors)
        super().__init__("\n".join(str(error) for error in self.errors))


@dataclass(frozen=True)
class ParsedJourney:
    """A journey of the right shape, with the file and the lines it was read from."""

    file: Path
    journey: Journey
    lines: Lines

    def error(self, path: YamlPath, message: str) -> JourneyError:
        return JourneyError(self.file, self.lines.line_of(path), message)


def check_journey(parsed: ParsedJourney, templates_dir: Path | None) -> list[JourneyError]:
    """Everything wrong with one journey as a whole; templates only when `templates_dir`
    is given."""
    return [
        *_duplicate_stages(parsed),
        *_transitions(parsed),
        *_unreachable_stages(parsed),
        *_unknown_names(parsed, templates_dir),
    ]


def check_across(parsed: Sequence[ParsedJourney]) -> list[JourneyError]:
    """Journey ids and audience names used twice; the later file is the one in error."""
    errors: list[JourneyError] = []
    by_id: dict[str, ParsedJourney] = {}
    by_audience: dict[str, ParsedJourney] = {}
    for item in parsed:
        journey_id = item.journey.id
        first = by_id.setdefault(journey_id, item)
        if first is not item:
            message = f"journey id '{journey_id}' is already used by {first.file}"
            errors.append(item.error(("id",), message))
        for name in item.journey.audiences:
            owner = by_audience.setdefault(name, item)
            if owner is not item:
                message = (
                    f"audience '{name}' is already declared by journey "
                    f"'{owner.journey.id}' ({owner.file})"
                )
                errors.append(item.error(("audiences", name), message))
    return errors


def _duplicate_stages(parsed: ParsedJourney) -> Iterator[JourneyError]:
    first_index: dict[str, int] = {}
    for index, stage in enumerate(parsed.journey.stages):
        first = first_index.setdefault(stage.id, index)
        if first != index:
            line = parsed.lines.line_of(("stages", first, "id"))
            yield parsed.error(
                ("stages", index, "id"), f"duplicate stage id '{stage.id}' (first on line {line})"
            )


def _transitions(parsed: ParsedJourney) -> Iterator[JourneyError]:
    journey = parsed.journey
    known = ", ".join(dict.fromkeys(stage.id for stage in journey.stages))
    for index, stage in enumerate(journey.stages):
        if stage.terminal and stage.transitions:
            yield parsed.error(
                ("stages", index, "transitions"),
                f"stage '{stage.id}' is terminal (leads leave the journey there) "
                "but has transitions",
            )
        for number, transition in enumerate(stage.transitions):
            if transition.to not in journey.stage_by_id:
                yield parsed.error(
                    ("stages", index, "transitions", number, "to"),
                    f"stage '{stage.id}': transition to unknown stage '{transition.to}' "
                    f"(stages: {known})",
                )


def _unreachable_stages(parsed: ParsedJourney) -> Iterator[JourneyError]:
    stages = parsed.journey.stages
    targets: dict[str, set[str]] = {}
    for stage in stages:
        targets.setdefault(stage.id, set()).update(t.to for t in stage.transitions)
    start = stages[0].id
    reached = {start}
    pending = [start]
    while pending:
        for target in targets.get(pending.pop(), ()):
            if target not in reached:
                reached.add(target)
                pending.append(target)
    for index, stage in enumerate(stages):
        if stage.id not in reached:
            reached.add(stage.id)  # report a repeated id once
            yield parsed.error(
                ("stages", index, "id"), f"stage '{stage.id}' is unreachable from '{start}'"
            )


def _unknown_names(parsed: ParsedJourney, templates_dir: Path | None) -> Iterator[JourneyError]:
    journey = parsed.journey
    declared: Mapping[str, Mapping[str, object]] = {
        "audience": journey.audiences,
        "sequence": journey.sequences,
        "offer": journey.offers,
    }
    for path, kind, name in _references(journey):
        if kind == "template":
            if templates_dir is not None and not (templates_dir / f"{name}.j2").is_file():
                yield parsed.error(
                    path, f"unknown template '{name}' (no {templates_dir / name}.j2)"
                )
        elif name not in declared[kind]:
            names = ", ".join(declared[kind])
            known = f"{kind}s: {names}" if names else f"this journey declares no {kind}s"
            yield parsed.error(path, f"unknown {kind} '{name}' ({known})")


def _references(journey: Journey) -> Iterator[tuple[YamlPath, str, str]]:
    """Every audience, sequence, offer and template the journey names, with its path."""
    for index, stage in enumerate(journey.stages):
        for number, action in enumerate(stage.on_enter):
            path = ("stages", index, "on_enter", number, _ACTION_KEYS[type(action)])
            yield from _action_references(path, action)
    for name, sequence in journey.sequences.items():
        for number, step in enumerate(sequence.steps):
            if isinstance(step, EmailStep):
                yield ("sequences", name, "steps", number, "email"), "template", step.email


def _action_references(path: YamlPath, action: Action) -> Iterator[tuple[YamlPath, str, str]]:
    match action:
        case AudienceAdd(audiences=names) | AudienceRemove(audiences=names):
            for number, name in enumerate(names):
                yield (*path, number), "audience", name
        case SequenceStart(sequence=name) | SequenceStop(sequence=name):
            yield path, "sequence", name
        case OfferGrant(offer=name):
            yield path, "offer", name
        case EmailSend(template=name):
            yield path, "template", name
