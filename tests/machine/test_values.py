"""The core's values, and the core as it runs: compiled, from its current source.

The values are immutable, made from their fields in order, and compared, hashed and
shown by them, as frozen dataclasses are. The core runs compiled by mypyc (setup.py),
and a build older than its source is refused rather than run.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import subprocess
import sys
from datetime import timedelta
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import pytest

import engine
import engine.machine
from engine.machine import lead, plan, step, values

from .support import T0

VALUES: list[type] = [
    values.Enrollment,
    values.Event,
    values.TimerFired,
    values.Cause,
    values.Transitioned,
    values.StartTimer,
    values.CancelTimers,
    values.AddToAudience,
    values.RemoveFromAudience,
    values.SetTrait,
    values.ChannelAction,
    values.ReachGoal,
    values.Step,
    lead.LeadEvent,
    lead.PendingTimer,
    lead.Lead,
    lead.JourneyEffect,
    lead.Outcome,
]
HOLDING_DICTS = (values.Event, lead.LeadEvent, lead.Lead, lead.Outcome)  # so unhashable

SAMPLES: dict[str, Any] = {
    "journey_id": "j",
    "version": 3,
    "entry_no": 2,
    "stage": "s",
    "state": "active",
    "epoch": 4,
    "entered_at": T0,
    "stage_entered_at": T0 + timedelta(hours=1),
    "ended_at": T0 + timedelta(hours=2),
    "sequences": ("tips",),
    "name": "page",
    "timestamp": T0,
    "message_id": "m1",
    "properties": {"v": 1},
    "context": {"c": 2},
    "traits": {"t": 3},
    "late": True,
    "transition": 1,
    "due_at": T0 + timedelta(days=1),
    "kind": "event",
    "event": "page",
    "after": "2h",
    "detail": "why",
    "from_stage": "a",
    "to_stage": "b",
    "at": T0,
    "since": T0 - timedelta(hours=1),
    "action": "email.send",
    "target": "hello",
    "key": "4.0",
    "value": 12.5,
    "enrollment": None,
    "effects": (),
    "id": 7,
    "cause": values.Cause("event", event="page"),
    "effect": values.AddToAudience("fans"),
    "watermark": T0,
    "enrollments": {},
    "lead": lead.Lead({}, None, {}),
    "changed": (),
    "fired": (3,),
    "cancelled": frozenset({("j", 1)}),
    "timers": (),
    "audience": "fans",
    "seq": 5,
}
# Another value for the first field of each class.
OTHERS: dict[str, Any] = {
    "journey_id": "k",
    "name": "identify",
    "kind": "timer",
    "from_stage": "b",
    "stage": "t",
    "audience": "others",
    "action": "offer.grant",
    "message_id": "m2",
    "enrollment": values.Enrollment("j", 1, 1, "s", "active", 1, T0, T0),
    "seq": 6,
    "traits": {"t": 4},
    "lead": lead.Lead({"t": 4}, T0, {}),
}


def _sample(cls: type) -> tuple[list[str], dict[str, Any]]:
    names = [field.name for field in dataclasses.fields(cls)]
    return names, {name: SAMPLES[name] for name in names}


@pytest.mark.parametrize("cls", VALUES, ids=lambda cls: cls.__name__)
def test_a_value_is_made_of_its_fields_in_order_and_compared_by_them(cls: type) -> None:
    names, samples = _sample(cls)
    assert list(inspect.signature(cls).parameters) == names

    made = cls(*samples.values())

    assert [getattr(made, name) for name in names] == list(samples.values())
    assert made == cls(**samples)
    if cls not in HOLDING_DICTS:
        assert hash(made) == hash(cls(**samples))
    fields = ", ".join(f"{name}={value!r}" for name, value in samples.items())
    assert repr(made) == f"{cls.__name__}({fields})"


@pytest.mark.parametrize("cls", VALUES, ids=lambda cls: cls.__name__)
def test_a_value_is_changed_only_into_a_new_one(cls: type) -> None:
    names, samples = _sample(cls)
    made = cls(**samples)
    if not names:
        with pytest.raises(AttributeError):
            made.anything = 1
        return

    with pytest.raises(AttributeError):
        setattr(made, names[0], samples[names[0]])
    changed = dataclasses.replace(made, **{names[0]: OTHERS[names[0]]})

    assert getattr(changed, names[0]) == OTHERS[names[0]]
    assert changed != made
    assert getattr(made, names[0]) == samples[names[0]]


def test_values_of_different_classes_with_equal_fields_differ() -> None:
    assert values.AddToAudience("fans") != values.RemoveFromAudience("fans")
    assert values.CancelTimers() == values.CancelTimers()


def test_the_core_runs_compiled() -> None:
    assert engine.machine.COMPILED
    for module in (values, plan, step, lead):
        assert module.__file__ is not None
        assert module.__file__.endswith(tuple(EXTENSION_SUFFIXES)), module.__file__


def _import_core(package: Path) -> subprocess.CompletedProcess[str]:
    """Import the core from a copy of the package, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", "import engine.machine; print(engine.machine.COMPILED)"],
        cwd=package.parent,
        env={"PYTHONPATH": str(package.parent), "PATH": ""},
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_compiled_module_whose_source_changed_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(Path(engine.__file__).parent, copy)
    assert _import_core(copy).stdout.strip() == "True"

    with (copy / "machine" / "step.py").open("a") as source:
        source.write("# edited\n")
    imported = _import_core(copy)

    assert imported.returncode != 0
    assert "engine/machine/step.py changed since it was compiled" in imported.stderr


def test_a_core_without_a_build_runs_from_its_source(tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(Path(engine.__file__).parent, copy)
    for suffix in EXTENSION_SUFFIXES:
        for built in (copy / "machine").glob(f"*{suffix}"):
            built.unlink()

    assert _import_core(copy).stdout.strip() == "False"
