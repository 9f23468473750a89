"""Transitions per second of the pure core, beside the `transitions` library on the same map.

`step()` is the engine's inner loop: the worker, `cjm simulate` and the property tests
all run it. A general-purpose state machine library is the floor to hold it against:
if a pure function over frozen values were much slower than a library that mutates
a model in place, the design would be costing speed that the worker then lacks.

Both machines run the doors journey's stage graph on the same inputs. Each of N leads
opens the catalog from a search ad (enters `first_contact`), views another catalog
page (no move: the `where` fails), comes back from a Facebook ad (`landing`), requests
the catalog (`nurturing`) and orders (`customer`): five inputs, four moves.

- cjm: `step()` once per input, the pure unit (one input, one enrollment: the new
  value and its effects). `advance()` per lead, what the worker calls (the lead's
  events merged with its timers, effects tagged with their journey), is shown too.
- transitions: the same graph as a `Machine`, `conditions=` for the `where` clauses
  and `on_enter` callbacks that record the effects of entering a stage, as cjm emits
  them. The baseline is the fastest setup its documentation gives for many models:
  one machine shared by every lead (`model=None`, events triggered through
  `machine.events`). A `Machine` per lead, its usual use, is measured on a sample.

The leads run in blocks that alternate between the machines, so that both see the same
background load. Moves are counted, and every lead must end in the same stage on both.
Both run under the garbage collector settings of `cjm serve` and `cjm worker`
(`engine.runtime.tune_garbage_collector`, applied once everything is loaded), the
settings the core runs with in production. The core runs as installed: compiled to C
by mypyc (setup.py), or interpreted where its build was deleted; the table says which.

Run: `.venv/bin/python bench/step.py [--leads N]` (default 100000; about a minute).
"""

from __future__ import annotations

import argparse
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from typing import Any, cast

from harness import ROOT, Figure, Stopwatch, report
from transitions import EventData, Machine

from engine.journey import load_journeys
from engine.journey.model import AfterTimeout, Journey, OnEvent, Stage
from engine.machine import COMPILED
from engine.machine.book import JourneyBook
from engine.machine.lead import Lead, LeadEvent, advance
from engine.machine.step import step
from engine.machine.values import Enrollment, Event, Transitioned
from engine.runtime import tune_garbage_collector

START = datetime(2026, 8, 1, 9, tzinfo=UTC)
BLOCK = 500  # leads per turn of each machine, their outputs kept until counted: a worker batch
PER_LEAD_SAMPLE = 5_000  # a Machine per lead costs about 1 ms to build: a sample is enough
ALLOCATION_LEADS = 1_000
# The transitions machine's states besides the stages: before entering, after an exit rule.
OUTSIDE, EXITED = "outside", "exited"
TIMEOUT = "timeout"  # the trigger a due timer fires

GOOGLE = {"campaign": {"source": "google"}}
FACEBOOK = {"campaign": {"source": "facebook"}}
NO_TRAITS: dict[str, Any] = {}


def lead_inputs(n: int) -> tuple[Event, ...]:
    """The five inputs of lead n, five seconds apart."""
    at = START + timedelta(milliseconds=n)

    def event(k: int, name: str, properties: dict[str, Any], context: dict[str, Any]) -> Event:
        return Event(
            name, at + timedelta(seconds=5 * k), f"m{n}.{k}", properties, context, NO_TRAITS
        )

    return (
        event(0, "page", {"path": "/catalog/steel"}, GOOGLE),
        event(1, "page", {"path": "/catalog/oak"}, GOOGLE),
        event(2, "page", {"path": "/landing/free-install"}, FACEBOOK),
        event(3, "catalog_requested", {"format": "pdf", "form": "landing"}, {}),
        event(4, "order_completed", {"revenue": 1290, "order_id": f"o-{n}"}, {}),
    )


def as_lead_events(inputs: Sequence[Event]) -> list[LeadEvent]:
    """The same inputs as the worker hands them to `advance()`."""
    return [
        LeadEvent(seq, e.name, e.timestamp, e.message_id, e.properties, e.context)
        for seq, e in enumerate(inputs)
    ]


# --- the doors map in `transitions` --------------------------------------------------------------


def _event(data: EventData) -> Event:
    return cast("tuple[Event]", data.args)[0]


def _from_catalog(data: EventData) -> bool:
    path = _event(data).properties.get("path")
    return isinstance(path, str) and path.startswith("/catalog")


def _from_facebook(data: EventData) -> bool:
    campaign = _event(data).context.get("campaign")
    return isinstance(campaign, dict) and campaign.get("source") == "facebook"


def _to_landing(data: EventData) -> bool:
    path = _event(data).properties.get("path")
    return isinstance(path, str) and path.startswith("/landing")


def _free_install(data: EventData) -> bool:
    return _event(data).properties.get("offer") == "free_install"


def doors_transitions(journey: Journey) -> list[dict[str, Any]]:
    """The doors map written out for `transitions`, as a developer using it would."""
    active = [stage.id for stage in journey.stages if not stage.terminal]
    moves: list[tuple[str, str | list[str], str, Callable[[EventData], bool] | None]] = [
        ("page", OUTSIDE, "first_contact", _from_catalog),
        ("page", "first_contact", "landing", _from_facebook),
        ("catalog_requested", "first_contact", "nurturing", None),
        (TIMEOUT, "first_contact", "retargeting", None),
        ("page", "retargeting", "landing", _to_landing),
        ("catalog_requested", "retargeting", "nurturing", None),
        (TIMEOUT, "retargeting", "lost", None),
        ("catalog_requested", "landing", "nurturing", None),
        (TIMEOUT, "landing", "retargeting", None),
        ("order_completed", "nurturing", "customer", None),
        ("offer.expired", "nurturing", "cooling", _free_install),
        ("order_completed", "cooling", "customer", None),
        (TIMEOUT, "cooling", "lost", None),
        ("email.unsubscribed", active, EXITED, None),
    ]
    return [
        {"trigger": trigger, "source": source, "dest": dest, "conditions": condition}
        for trigger, source, dest, condition in moves
    ]


def journey_edges(journey: Journey) -> set[tuple[str, str, str]]:
    """(trigger, source, destination) of every move the journey allows."""
    edges = {(journey.entry.on, OUTSIDE, journey.first_stage.id)}
    for stage in journey.stages:
        for transition in stage.transitions:
            if isinstance(transition, OnEvent):
                edges.add((transition.on, stage.id, transition.to))
            elif isinstance(transition, AfterTimeout):
                edges.add((TIMEOUT, stage.id, transition.to))
        if not stage.terminal:
            edges.update((rule.on, stage.id, EXITED) for rule in journey.exit)
    return edges


def table_edges(table: Sequence[dict[str, Any]]) -> set[tuple[str, str, str]]:
    edges: set[tuple[str, str, str]] = set()
    for row in table:
        sources = [row["source"]] if isinstance(row["source"], str) else row["source"]
        edges.update((row["trigger"], source, row["dest"]) for source in sources)
    return edges


def _recorder(stage: Stage) -> Callable[[EventData], None]:
    """The on_enter callback of `stage`: a record per effect cjm emits on entering it (the
    history line, each action, each timer started), dated by the input."""
    actions: list[tuple[str, str]] = []
    for action in stage.on_enter:
        ((kind, value),) = action.model_dump(by_alias=True).items()
        targets = value if isinstance(value, tuple) else (value,)
        actions.extend((kind, str(target)) for target in targets)
    timeouts = [(index, timeout.after) for index, timeout in stage.timeouts]

    def on_enter(data: EventData) -> None:
        at = _event(data).timestamp
        effects: list[tuple[Any, ...]] = data.model.effects  # type: ignore[attr-defined]
        effects.append(("moved", data.transition.source if data.transition else None, stage.id, at))
        effects.extend((kind, target, at) for kind, target in actions)
        effects.extend(("timer", index, at + after) for index, after in timeouts)

    return on_enter


def doors_machine(journey: Journey) -> dict[str, Any]:
    """The `Machine` arguments of the doors map, built once for every machine made of it."""
    table = doors_transitions(journey)
    assert table_edges(table) == journey_edges(journey), "the map differs from doors.yaml"
    states: list[Any] = [OUTSIDE, EXITED]
    states.extend({"name": stage.id, "on_enter": _recorder(stage)} for stage in journey.stages)
    return {
        "states": states,
        "transitions": table,
        "auto_transitions": False,  # no `to_<stage>()` per model: less to build, same moves
        "ignore_invalid_triggers": True,  # an event a stage does not listen to is no error
        "send_event": True,  # callbacks get the EventData, hence the model and the input
    }


class DoorsLead:
    """A lead as `transitions` keeps it: the state on the object, effect records beside it."""

    def __init__(self) -> None:
        self.state = OUTSIDE
        self.effects: list[tuple[Any, ...]] = []


# --- the runs ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One machine over the leads: time spent, moves made, effects, and each final stage."""

    seconds: float = 0.0
    moves: int = 0
    effects: int = 0
    stages: list[str] = field(default_factory=list)


def run_step(journey: Journey, leads: Sequence[Sequence[Event]], run: Run) -> list[Any]:
    """`step()` per input; returns each lead's final enrollment and effects."""
    kept: list[Any] = []
    with Stopwatch() as watch:
        for inputs in leads:
            enrollment: Enrollment | None = None
            effects: list[Any] = []
            for event in inputs:
                result = step(journey, enrollment, event, event.timestamp)
                enrollment = result.enrollment
                effects.extend(result.effects)
            assert enrollment is not None
            kept.append((enrollment, effects))
    run.seconds += watch.seconds
    for enrollment, effects in kept:
        run.moves += sum(isinstance(effect, Transitioned) for effect in effects)
        run.effects += len(effects)
        run.stages.append(enrollment.stage)
    return kept


def run_advance(book: JourneyBook, leads: Sequence[Sequence[LeadEvent]], run: Run) -> list[Any]:
    """`advance()` per lead, all its events at once; returns each lead's outcome."""
    fresh = Lead({}, None, {})
    with Stopwatch() as watch:
        kept = [advance(book, fresh, events, (), events[-1].timestamp) for events in leads]
    run.seconds += watch.seconds
    for outcome in kept:
        run.moves += sum(isinstance(item.effect, Transitioned) for item in outcome.effects)
        run.effects += len(outcome.effects)
        run.stages.append(outcome.lead.enrollments["doors"].stage)
    return kept


def run_shared(machine: Machine, leads: Sequence[Sequence[Event]], run: Run) -> list[Any]:
    """One `transitions` machine for every lead; returns each lead's model."""
    triggers = machine.events
    kept: list[DoorsLead] = []
    moves = 0
    with Stopwatch() as watch:
        for inputs in leads:
            lead = DoorsLead()
            for event in inputs:
                moves += triggers[event.name].trigger(lead, event)
            kept.append(lead)
    run.seconds += watch.seconds
    run.moves += moves
    for lead in kept:
        run.effects += len(lead.effects)
        run.stages.append(lead.state)
    return kept


def run_per_lead(config: dict[str, Any], leads: Sequence[Sequence[Event]], run: Run) -> float:
    """A `transitions` Machine per lead, built before the clock starts; the build time."""
    models = [DoorsLead() for _ in leads]
    with Stopwatch() as build:
        for model in models:
            Machine(model=model, initial=OUTSIDE, **config)
    moves = 0
    with Stopwatch() as watch:
        for model, inputs in zip(models, leads, strict=True):
            for event in inputs:
                moves += model.trigger(event.name, event)  # type: ignore[attr-defined]
    run.seconds += watch.seconds
    run.moves += moves
    for model in models:
        run.effects += len(model.effects)
        run.stages.append(model.state)
    return build.seconds


def blocks(leads: int) -> Iterator[list[tuple[Event, ...]]]:
    for first in range(0, leads, BLOCK):
        yield [lead_inputs(n) for n in range(first, min(first + BLOCK, leads))]


def allocated_kib(run: Callable[[], object]) -> float:
    """Peak traced memory of `run`, what it returns kept alive as a worker batch keeps its
    outcomes until it writes them."""
    tracemalloc.start()
    try:
        kept = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=100_000)
    args = parser.parse_args()
    journey = load_journeys([ROOT / "journeys" / "doors.yaml"]).sources[0].journey
    book = JourneyBook.of([journey])
    config = doors_machine(journey)
    # As the `transitions` documentation has it for many models: no model of its own.
    shared = Machine(model=None, initial=None, **config)
    tune_garbage_collector()
    stepped, advanced, baseline, per_lead = Run(), Run(), Run(), Run()
    built_seconds = 0.0
    for block in blocks(args.leads):
        run_step(journey, block, stepped)
        run_advance(book, [as_lead_events(inputs) for inputs in block], advanced)
        run_shared(shared, block, baseline)
        if len(per_lead.stages) < PER_LEAD_SAMPLE:
            sample = block[: PER_LEAD_SAMPLE - len(per_lead.stages)]
            built_seconds += run_per_lead(config, sample, per_lead)

    assert stepped.stages == advanced.stages == baseline.stages, "a lead ended elsewhere"
    assert per_lead.stages == baseline.stages[: len(per_lead.stages)], "a lead ended elsewhere"
    assert set(stepped.stages) == {"customer"}, set(stepped.stages)
    assert stepped.moves == advanced.moves == baseline.moves == 4 * args.leads
    assert per_lead.moves == 4 * len(per_lead.stages)

    few = [lead_inputs(n) for n in range(ALLOCATION_LEADS)]
    few_events = [as_lead_events(inputs) for inputs in few]
    memory = {
        "step": allocated_kib(lambda: run_step(journey, few, Run())),
        "advance": allocated_kib(lambda: run_advance(book, few_events, Run())),
        "shared": allocated_kib(lambda: run_shared(shared, few, Run())),
    }

    def rate(run: Run) -> float:
        return run.moves / run.seconds

    base = rate(baseline)
    sampled = len(per_lead.stages)
    core = "compiled" if COMPILED else "interpreted"
    figures = [
        Figure(
            f"step(), {core}, {args.leads:,} leads x 5 inputs",
            rate(stepped),
            "moves/s",
            base,
            f"transitions {version('transitions')}, one Machine shared by all leads",
            ">= 5x transitions",
            rate(stepped) >= 5 * base,
        ),
        Figure(
            "step(), against a Machine per lead",
            rate(stepped),
            "moves/s",
            rate(per_lead),
            f"transitions, a Machine per lead ({sampled:,} leads; "
            f"{built_seconds / sampled * 1e6:,.0f} us to build each, not timed)",
        ),
        Figure("advance() per lead (worker's call)", rate(advanced), "moves/s", base),
        Figure(
            f"step(), traced peak, {ALLOCATION_LEADS:,} leads",
            memory["step"],
            "KiB",
            memory["shared"],
            "transitions, shared Machine (final states and effects kept by both)",
        ),
        Figure(
            f"advance(), traced peak, {ALLOCATION_LEADS:,} leads",
            memory["advance"],
            "KiB",
            memory["shared"],
        ),
    ]
    notes = {
        "core": core,
        "inputs_per_lead": 5,
        "moves_per_lead": 4,
        "effects_per_lead": {
            "step": stepped.effects / args.leads,
            "advance": advanced.effects / args.leads,
            "transitions_records": baseline.effects / args.leads,
        },
    }
    report("step", figures, notes)


if __name__ == "__main__":
    main()
