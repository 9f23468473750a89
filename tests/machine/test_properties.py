"""Properties of the machine on random journeys and random lives of a lead.

Journeys are generated valid (every stage reachable from the first, terminal stages
without transitions, every `to` a stage); a lead's life is a list of events with
gaps from nothing to days, so timeouts fall before, between and on events.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.journey.model import AfterTimeout, Journey, OnEvent, Stage, TraitSet, format_duration
from engine.machine.book import JourneyBook
from engine.machine.lead import JourneyEffect, LeadEvent, PendingTimer
from engine.machine.values import ChannelAction, ReachGoal, StartTimer, Transitioned

from .support import T0, Driver

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EVENTS = ("a", "b", "c")  # what stages listen to; journeys enter on "a" or "b"
EXIT, GOAL, IDENTIFY = "x", "buy", "identify"
DURATIONS = ("90s", "30m", "2h", "1d", "3d")
REENTRY = ("never", "always", "after 2h", "after 1d")
SWEEP = timedelta(days=7)  # after the last event: every timeout still possible has fired
WHERES: tuple[dict[str, Any] | None, ...] = (  # no condition half of the time
    None,
    None,
    None,
    None,
    {"properties.v": {"gt": 1}},
    {"properties.v": 2},
    {"properties.v": {"exists": False}},
    {"traits.tier": "gold"},
)
ACTIONS: tuple[dict[str, Any], ...] = (
    {"audience.add": "fans"},
    {"audience.remove": "fans"},
    {"email.send": "hello"},
    {"sequence.start": "tips"},
    {"sequence.stop": "tips"},
    {"offer.grant": "gift"},
    {"trait.set": {"tier": "gold"}},
    {"trait.set": {"tier": "basic"}},
)


# --- journeys ------------------------------------------------------------------------------------


@cache
def transitions(to: str, back: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A move to `to`; one going `back` to an earlier stage or itself waits a day or more,
    so that loops of timeouts stay few in the weeks a test covers."""
    on_event = st.builds(
        lambda on, where: {"on": on, "to": to, **({"where": where} if where else {})},
        st.sampled_from(EVENTS),
        st.sampled_from(WHERES),
    )
    durations = [d for d in DURATIONS if not back or d.endswith("d")]
    timeout = st.builds(lambda after: {"after": after, "to": to}, st.sampled_from(durations))
    return st.one_of(on_event, timeout)


@cache
def below(count: int) -> st.SearchStrategy[int]:
    return st.integers(0, count - 1)


SOMETIMES = st.sampled_from([False, False, True])
ON_ENTER = st.lists(st.sampled_from(ACTIONS), max_size=3)
SHUFFLES = st.randoms(use_true_random=False)


def own_audience(action: dict[str, Any], journey_id: str) -> dict[str, Any]:
    """Audience names are global: each journey has its own."""
    (kind, _target) = next(iter(action.items()))
    return {kind: f"fans_{journey_id}"} if kind.startswith("audience.") else action


@st.composite
def journeys(draw: st.DrawFn, journey_id: str) -> Journey:
    count = draw(st.integers(1, 5))
    ids = [f"s{i}" for i in range(count)]
    terminal = [count == 1 and draw(st.booleans())]
    terminal += [draw(SOMETIMES) for _ in range(1, count)]
    moves: list[list[dict[str, Any]]] = [[] for _ in ids]
    for index in range(1, count):  # a tree from the first stage: every stage is reachable
        parents = [i for i in range(index) if not terminal[i]]
        parent = parents[draw(below(len(parents)))]
        moves[parent].append(draw(transitions(ids[index], False)))
    shuffle = draw(SHUFFLES).shuffle
    for index in range(count):
        if not terminal[index]:
            targets = draw(st.lists(below(count), max_size=2))
            moves[index] += [draw(transitions(ids[t], t <= index)) for t in targets]
            shuffle(moves[index])
    stages = []
    for index, stage_id in enumerate(ids):
        stage: dict[str, Any] = {
            "id": stage_id,
            "phase": "awareness",
            "on_enter": [own_audience(action, journey_id) for action in draw(ON_ENTER)],
        }
        if terminal[index]:
            stage["terminal"] = True
        else:
            stage["transitions"] = moves[index]
        stages.append(stage)
    entry: dict[str, Any] = {
        "on": draw(st.sampled_from(EVENTS[:2])),
        "reentry": draw(st.sampled_from(REENTRY)),
    }
    if where := draw(st.sampled_from(WHERES)):
        entry["where"] = where
    spec: dict[str, Any] = {
        "id": journey_id,
        "name": journey_id,
        "entry": entry,
        "stages": stages,
        "audiences": {f"fans_{journey_id}": {}},
        "sequences": {"tips": {"steps": [{"email": "hello"}]}},
        "offers": {"gift": {"title": "A gift", "expires": {"after": "5d"}, "code": "G-{6}"}},
    }
    if draw(st.booleans()):
        spec["exit"] = [
            {"on": EXIT, **({"where": w} if (w := draw(st.sampled_from(WHERES))) else {})}
        ]
    if draw(st.booleans()):
        spec["goal"] = {"on": GOAL, "value": "properties.v"}
    return Journey.model_validate(spec)


def check_valid(journey: Journey) -> None:
    """What the validator demands of a map, so the generator never strays."""
    reached, pending = {journey.first_stage.id}, [journey.first_stage]
    while pending:
        for transition in pending.pop().transitions:
            if transition.to not in reached:
                reached.add(transition.to)
                pending.append(journey.stage(transition.to))
    assert reached == set(journey.stage_by_id)
    assert all(not stage.transitions for stage in journey.stages if stage.terminal)


@dataclass(frozen=True)
class Happening:
    name: str
    gap: int  # seconds since the previous event
    properties: dict[str, Any]
    traits: dict[str, Any]


GAPS = st.one_of(
    st.just(0),
    st.integers(1, 120),
    st.sampled_from([90, 1800, 7200, 86400, 3 * 86400]),  # exactly on a timeout
    st.integers(120, 3 * 86400),
)
HAPPENINGS = st.builds(
    Happening,
    name=st.sampled_from((*EVENTS, *EVENTS, EXIT, EXIT, GOAL, IDENTIFY)),
    gap=GAPS,
    properties=st.sampled_from([{}, {"v": 0}, {"v": 1}, {"v": 2}, {"v": 3}]),
    traits=st.one_of(
        st.just({}), st.builds(lambda t: {"tier": t}, st.sampled_from(["gold", "basic"]))
    ),
)


@dataclass(frozen=True)
class Life:
    journeys: tuple[Journey, ...]
    happenings: tuple[Happening, ...]

    @property
    def book(self) -> JourneyBook:
        return JourneyBook.of(self.journeys)

    def events(self) -> list[LeadEvent]:
        found, when = [], T0
        for seq, happening in enumerate(self.happenings, start=1):
            when += timedelta(seconds=happening.gap)
            traits = happening.traits if happening.name == IDENTIFY else {}
            found.append(
                LeadEvent(
                    seq, happening.name, when, f"m{seq}", dict(happening.properties), {}, traits
                )
            )
        return found


@st.composite
def lives(draw: st.DrawFn) -> Life:
    count = draw(st.integers(1, 2))
    found = tuple(draw(journeys(f"j{index}")) for index in range(count))
    return Life(found, tuple(draw(st.lists(HAPPENINGS, min_size=4, max_size=14))))


# --- running a life ------------------------------------------------------------------------------


def reversed_order(timers: list[PendingTimer]) -> list[PendingTimer]:
    return sorted(timers, key=lambda timer: (timer.due_at, timer.id or 0), reverse=True)


def run(
    life: Life,
    chunks: Sequence[int] | None = None,
    order: Callable[[list[PendingTimer]], list[PendingTimer]] | None = None,
) -> Driver:
    """The lead's life through `advance`: all events in one call unless cut into `chunks`
    (their sizes), then a sweep long after the last event."""
    driver = Driver(life.book) if order is None else Driver(life.book, timer_order=order)
    events = life.events()
    sizes = list(chunks) if chunks is not None else [len(events)]
    start = 0
    for size in sizes:
        driver.deliver(events[start : start + size])
        start += size
    assert start == len(events)
    driver.run_until(events[-1].timestamp + SWEEP)
    return driver


def enrollment_logs(log: Sequence[JourneyEffect]) -> dict[tuple[str, int], list[JourneyEffect]]:
    found: dict[tuple[str, int], list[JourneyEffect]] = defaultdict(list)
    for item in log:
        found[(item.journey_id, item.entry_no)].append(item)
    return found


# --- (a) one stage at a time, history a chain ----------------------------------------------------


@SETTINGS
@given(lives())
def test_generated_journeys_are_valid(life: Life) -> None:
    for journey in life.journeys:
        check_valid(journey)


@SETTINGS
@given(lives())
def test_lead_is_in_one_stage_per_enrollment_and_history_is_a_chain(life: Life) -> None:
    driver = Driver(life.book)
    events = life.events()
    for event in events:  # checked after every call, as the database would see it
        driver.deliver([event])
        check_enrollments(life, driver)
    driver.run_until(events[-1].timestamp + SWEEP)
    check_enrollments(life, driver)


def check_enrollments(life: Life, driver: Driver) -> None:
    by_id = {journey.id: journey for journey in life.journeys}
    logs = enrollment_logs(driver.log)
    reached = driver.lead.watermark
    assert reached is not None
    for journey_id, enrollment in driver.lead.enrollments.items():
        journey = by_id[journey_id]
        stage = journey.stage(enrollment.stage)
        # the database holds exactly the timeouts of the stage the lead is in, none void
        assert {
            (t.entry_no, t.stage, t.epoch, t.transition, t.due_at)
            for t in driver.stored.values()
            if t.journey_id == journey_id
        } == {
            (enrollment.entry_no, stage.id, enrollment.epoch, index, timer_due)
            for index, timeout in stage.timeouts
            if enrollment.active
            and (timer_due := enrollment.stage_entered_at + timeout.after) > reached
        }
        assert enrollment.active == (enrollment.state == "active")
        assert (enrollment.ended_at is None) == enrollment.active
        if enrollment.active:
            assert not stage.terminal
        assert sorted(entry for j, entry in logs if j == journey_id) == list(
            range(1, enrollment.entry_no + 1)
        )
        for entry_no in range(1, enrollment.entry_no + 1):
            lines = [
                i.effect for i in logs[(journey_id, entry_no)] if isinstance(i.effect, Transitioned)
            ]
            assert lines[0].from_stage is None
            assert lines[0].cause.kind == "entry"
            for previous, line in pairwise(lines):
                assert previous.to_stage is not None  # nothing after leaving the journey
                assert line.from_stage == previous.to_stage
                assert line.at >= previous.at
            last = lines[-1]
            if entry_no < enrollment.entry_no:  # an earlier run: it ended
                assert last.to_stage is None or journey.stage(last.to_stage).terminal
            elif enrollment.state == "exited":
                assert (last.from_stage, last.to_stage) == (enrollment.stage, None)
            else:
                assert last.to_stage == enrollment.stage
                assert stage.terminal == (enrollment.state == "completed")


# --- (b) timers of a left stage never fire -------------------------------------------------------


@SETTINGS
@given(lives())
def test_timers_of_a_left_stage_never_fire(life: Life) -> None:
    by_id = {journey.id: journey for journey in life.journeys}
    driver = run(life, chunks=[1] * len(life.happenings))
    for (journey_id, _), items in enrollment_logs(driver.log).items():
        journey = by_id[journey_id]
        started: list[StartTimer] = []  # by the last move of this enrollment
        for item in items:
            effect = item.effect
            if isinstance(effect, StartTimer):
                started.append(effect)
            elif isinstance(effect, Transitioned):
                if effect.cause.kind == "timer":
                    assert any(fits(journey, timer, effect) for timer in started), (
                        f"{effect} fired by no timer of the stage it left"
                    )
                    assert effect.at == effect.cause.timestamp  # fired when due, not later
                started = []


def fits(journey: Journey, timer: StartTimer, line: Transitioned) -> bool:
    """`line` is what `timer`, started on the last move, would do."""
    transition = journey.stage(timer.stage).transitions[timer.transition]
    return (
        isinstance(transition, AfterTimeout)
        and timer.stage == line.from_stage
        and timer.due_at == line.cause.timestamp
        and transition.to == line.to_stage
        and format_duration(transition.after) == line.cause.after
    )


@SETTINGS
@given(lives())
def test_void_timers_handed_in_again_change_nothing(life: Life) -> None:
    exact = run(life, chunks=[1] * len(life.happenings))
    sloppy = Driver(life.book, keep_cancelled=True)  # every timer ever started comes due
    events = life.events()
    for event in events:
        sloppy.deliver([event])
    sloppy.run_until(end := events[-1].timestamp + SWEEP)

    assert sloppy.log == exact.log
    assert sloppy.lead == exact.lead
    assert all(timer.due_at > end for timer in sloppy.stored.values())  # consumed when due


# --- (c) and (d): the same life, however it is cut -----------------------------------------------


@SETTINGS
@given(lives())
def test_replaying_the_same_events_gives_the_same_history_and_effects(life: Life) -> None:
    first, second = run(life), run(life)

    assert first.log == second.log
    assert first.lead == second.lead
    assert first.outcomes == second.outcomes


@SETTINGS
@given(lives(), st.randoms(use_true_random=False))
def test_batching_does_not_change_what_happens(life: Life, rng: random.Random) -> None:
    whole = run(life)
    one_by_one = run(life, chunks=[1] * len(life.happenings))
    chunked = run(life, chunks=random_chunks(len(life.happenings), rng), order=reversed_order)

    for other in (one_by_one, chunked):
        assert other.log == whole.log
        assert other.lead == whole.lead
        assert stored(other) == stored(whole)


def random_chunks(count: int, rng: random.Random) -> list[int]:
    sizes = []
    while count:
        size = rng.randint(1, count)
        sizes.append(size)
        count -= size
    return sizes


def stored(driver: Driver) -> set[tuple[Any, ...]]:
    return {timer_row(timer) for timer in driver.stored.values()}


def timer_row(timer: PendingTimer) -> tuple[Any, ...]:
    return (
        timer.journey_id,
        timer.entry_no,
        timer.stage,
        timer.epoch,
        timer.transition,
        timer.due_at,
    )


# --- (e) an on_enter action runs once per stage entry --------------------------------------------


@SETTINGS
@given(lives())
def test_channel_action_keys_are_unique_within_an_enrollment(life: Life) -> None:
    driver = run(life, chunks=[1] * len(life.happenings))
    for items in enrollment_logs(driver.log).values():
        keys = [item.effect.key for item in items if isinstance(item.effect, ChannelAction)]
        assert len(keys) == len(set(keys))


@SETTINGS
@given(lives())
def test_on_enter_channel_actions_run_once_per_stage_entry(life: Life) -> None:
    by_id = {journey.id: journey for journey in life.journeys}
    driver = run(life, chunks=[1] * len(life.happenings))
    for (journey_id, _), items in enrollment_logs(driver.log).items():
        for line, actions in moves_and_their_actions(items):
            if line.to_stage is None:  # left the journey: it only stops what runs
                expected = []
            else:
                stage = by_id[journey_id].stage(line.to_stage)
                expected = [
                    (kind, target)
                    for action in stage.on_enter
                    for kind, target in action.model_dump(by_alias=True).items()
                    if kind in ("email.send", "sequence.start", "sequence.stop", "offer.grant")
                ]
            assert actions[: len(expected)] == expected
            assert all(kind == "sequence.stop" for kind, _ in actions[len(expected) :])


def moves_and_their_actions(
    items: Sequence[JourneyEffect],
) -> Iterator[tuple[Transitioned, list[tuple[str, str]]]]:
    """Each history line with the channel actions of the same step that follow it."""
    line: Transitioned | None = None
    actions: list[tuple[str, str]] = []
    for item in items:
        if isinstance(item.effect, Transitioned):
            if line is not None:
                yield line, actions
            line, actions = item.effect, []
        elif isinstance(item.effect, ChannelAction):
            actions.append((item.effect.action, item.effect.target))
    if line is not None:
        yield line, actions


# --- (f) the machine agrees with a plain reading of the rules ------------------------------------


@SETTINGS
@given(lives())
def test_machine_agrees_with_a_naive_interpreter(life: Life) -> None:
    driver = run(life, chunks=[1] * len(life.happenings))
    expected = Reference(life).lines_and_goals()

    lines = [
        (item.journey_id, item.entry_no, e.from_stage, e.to_stage, e.at, e.cause.kind)
        for item in driver.log
        if isinstance(e := item.effect, Transitioned)
    ]
    goals = [
        (item.journey_id, item.entry_no, e.message_id, e.value)
        for item in driver.log
        if isinstance(e := item.effect, ReachGoal)
    ]
    assert (lines, goals) == expected


@dataclass
class RefRun:
    entry_no: int
    stage: str
    entered_at: datetime
    stage_entered_at: datetime
    state: str = "active"


@dataclass
class Reference:
    """The rules of SPEC section 2 read as literally as possible, with no timers table,
    epochs or batching: before each event, fire every timeout due by then (earliest
    first; same instant: by journey id, then the first listed), then give the event to
    each journey in id order, all of them seeing the traits it arrived with."""

    life: Life
    traits: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, RefRun] = field(default_factory=dict)
    lines: list[tuple[Any, ...]] = field(default_factory=list)
    goals: list[tuple[Any, ...]] = field(default_factory=list)

    def lines_and_goals(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        events = self.life.events()
        for event in events:
            self.fire_until(event.timestamp)
            self.deliver(event)
        self.fire_until(events[-1].timestamp + SWEEP)
        return self.lines, self.goals

    def journeys(self) -> Iterator[Journey]:
        return iter(sorted(self.life.journeys, key=lambda j: j.id))

    def fire_until(self, until: datetime) -> None:
        while True:
            due = [
                (run.stage_entered_at + timeout.after, journey.id, index, timeout.to)
                for journey in self.journeys()
                if (run := self.runs.get(journey.id)) and run.state == "active"
                for index, timeout in journey.stage(run.stage).timeouts
            ]
            if not due or min(due)[0] > until:
                return
            when, journey_id, _, to = min(due)
            journey = next(j for j in self.journeys() if j.id == journey_id)
            self.move(journey, to, when, "timer")

    def move(self, journey: Journey, to: str, when: datetime, kind: str) -> None:
        run = self.runs[journey.id]
        self.lines.append((journey.id, run.entry_no, run.stage, to, when, kind))
        run.stage, run.stage_entered_at = to, when
        self.enter(journey.stage(to), run)

    def enter(self, stage: Stage, run: RefRun) -> None:
        for action in stage.on_enter:
            if isinstance(action, TraitSet):
                self.traits.update(action.traits)
        if stage.terminal:
            run.state = "completed"

    def deliver(self, event: LeadEvent) -> None:
        self.traits.update(event.traits)
        view = {
            "event": event.name,
            "properties": event.properties,
            "context": {},
            "traits": dict(self.traits),
        }
        when = event.timestamp
        for journey in self.journeys():
            run = self.runs.get(journey.id)
            goal = (
                journey.goal is not None
                and journey.goal.on == event.name
                and journey.goal.condition(view)
            )
            if run is None or run.state != "active":
                if self.may_enter(journey, run, event.name, view, when):
                    run = RefRun(
                        (run.entry_no if run else 0) + 1, journey.first_stage.id, when, when
                    )
                    self.runs[journey.id] = run
                    self.lines.append((journey.id, run.entry_no, None, run.stage, when, "entry"))
                    self.enter(journey.first_stage, run)
                if run is not None and goal:
                    self.goals.append(
                        (journey.id, run.entry_no, event.message_id, goal_value(event))
                    )
                continue
            if goal:
                self.goals.append((journey.id, run.entry_no, event.message_id, goal_value(event)))
            if any(rule.on == event.name and rule.condition(view) for rule in journey.exit):
                self.lines.append((journey.id, run.entry_no, run.stage, None, when, "exit"))
                run.state = "exited"
                continue
            for transition in journey.stage(run.stage).transitions:
                if (
                    isinstance(transition, OnEvent)
                    and transition.on == event.name
                    and transition.condition(view)
                ):
                    self.move(journey, transition.to, when, "event")
                    break

    @staticmethod
    def may_enter(
        journey: Journey, run: RefRun | None, name: str, view: dict[str, Any], when: datetime
    ) -> bool:
        if journey.entry.on != name or not journey.entry.condition(view):
            return False
        if run is None:
            return True
        policy = journey.entry.reentry
        if policy == "never":
            return False
        if policy == "always":
            return True
        wait = {"after 2h": timedelta(hours=2), "after 1d": timedelta(days=1)}[policy]
        return when >= run.entered_at + wait


def goal_value(event: LeadEvent) -> float | None:
    value = event.properties.get("v")
    return None if value is None else float(value)
