"""The optimized core against the plain one it replaced (tests/machine/reference.py).

Random journeys and random lives of a lead, as in test_properties; every call made to
both, with the same lead, events and due timers, must return equal values, effect by
effect in the same order, with equal reprs (so the same classes and the same fields).
A new version of the maps may come into force mid-life, moving the runs it can.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from engine.journey.model import Journey
from engine.machine.book import JourneyBook
from engine.machine.lead import Lead, LeadEvent, Outcome, PendingTimer, advance
from engine.machine.step import leave, step, upgrade
from engine.machine.values import Cause, Enrollment, Event, Step, TimerFired

from .reference import reference_advance, reference_leave, reference_step, reference_upgrade
from .support import T0
from .test_properties import SETTINGS, SWEEP, Life, journeys, lives, random_chunks


def same(found: Step | Outcome, expected: Step | Outcome) -> None:
    assert found == expected
    assert repr(found) == repr(expected)


def both(function: Callable[..., Step], reference: Callable[..., Step], *args: Any) -> Step | None:
    """What `function` and its `reference` return for `args`, checked the same; None when
    both raised the same error (a timer naming a transition its stage lacks)."""
    try:
        expected = reference(*args)
    except (KeyError, IndexError) as error:
        try:
            function(*args)
        except type(error) as raised:
            assert raised.args == error.args
            return None
        raise AssertionError(f"no {error!r}") from None
    found = function(*args)
    same(found, expected)
    return found


def next_version(journey: Journey, other: Journey) -> Journey:
    """`other`'s map as version 2 of `journey`: the stages both have keep their runs."""
    spec = other.model_dump(by_alias=True, exclude_unset=True)
    return Journey.model_validate({**spec, "id": journey.id, "version": journey.version + 1})


@st.composite
def versions(draw: st.DrawFn, life: Life) -> tuple[Journey, ...]:
    return tuple(next_version(journey, draw(journeys(journey.id))) for journey in life.journeys)


class Twins:
    """One lead driven through `advance` and `reference_advance` side by side."""

    def __init__(self, book: JourneyBook, rng: random.Random) -> None:
        self.book = book
        self.rng = rng
        self.lead = Lead({}, None, {})
        self.stored: dict[int, PendingTimer] = {}
        self.ids = 0

    def deliver(self, events: list[LeadEvent], until: datetime) -> None:
        due = [timer for timer in self.stored.values() if timer.due_at <= until]
        self.rng.shuffle(due)  # the database hands them in any order
        expected = reference_advance(self.book, self.lead, events, due, until)
        found = advance(self.book, self.lead, events, due, until)
        same(found, expected)
        for timer_id in found.fired:
            del self.stored[timer_id]
        for timer_id, timer in list(self.stored.items()):
            if (timer.journey_id, timer.entry_no) in found.cancelled:
                del self.stored[timer_id]
        for timer in found.timers:
            self.ids += 1
            self.stored[self.ids] = replace(timer, id=self.ids)
        self.lead = found.lead


@SETTINGS
@given(st.data(), lives(), st.randoms(use_true_random=False))
def test_advance_matches_the_reference(data: st.DataObject, life: Life, rng: random.Random) -> None:
    events = life.events()
    twins = Twins(life.book, rng)
    upgraded = data.draw(st.integers(0, len(events)))  # how many events before version 2
    start = 0
    for size in random_chunks(len(events), rng):
        if start <= upgraded < start + size:
            twins.book = upgraded_book(life, data.draw(versions(life)), data.draw(st.booleans()))
        chunk = events[start : start + size]
        twins.deliver(chunk, chunk[-1].timestamp + timedelta(seconds=rng.choice([0, 0, 90, 7200])))
        start += size
    if upgraded == len(events):  # only the timers left to fire see version 2
        twins.book = upgraded_book(life, data.draw(versions(life)), data.draw(st.booleans()))
    twins.deliver([], events[-1].timestamp + SWEEP)


def upgraded_book(life: Life, new: tuple[Journey, ...], retire_one: bool) -> JourneyBook:
    """Version 2 of every journey current, version 1 kept; perhaps the first retired."""
    versions = {(j.id, j.version): j for j in (*life.journeys, *new)}
    retired = frozenset([new[0].id]) if retire_one else frozenset()
    return JourneyBook({j.id: j for j in new}, versions, retired)


# --- step, upgrade and leave, one call at a time -------------------------------------------------

INPUT_NAMES = ("a", "b", "c", "x", "buy", "identify")


@st.composite
def inputs(draw: st.DrawFn, journey: Journey, enrollment: Enrollment | None, at: datetime) -> Any:
    """An event, or a timer: often of the lead's current stage, sometimes stale."""
    if enrollment is not None and draw(st.booleans()):
        stage = journey.stage_by_id.get(enrollment.stage)
        count = len(stage.transitions) if stage is not None else 1
        return TimerFired(
            journey.id,
            enrollment.entry_no + draw(st.sampled_from([0, 0, 0, -1])),
            draw(st.sampled_from([enrollment.stage, enrollment.stage, "s0"])),
            enrollment.epoch + draw(st.sampled_from([0, 0, 0, -1])),
            draw(st.integers(-1, max(count - 1, 0))),
            at - timedelta(seconds=draw(st.integers(0, 3600))),
        )
    return Event(
        name=draw(st.sampled_from(INPUT_NAMES)),
        timestamp=at - timedelta(seconds=draw(st.sampled_from([0, 0, 30]))),
        message_id=f"m{draw(st.integers(0, 99))}",
        properties=draw(st.sampled_from([{}, {"v": 0}, {"v": 2}, {"v": "2"}, {"v": None}])),
        context=draw(st.sampled_from([{}, {"campaign": {"source": "x"}}, {"campaign": 3}])),
        traits=draw(st.sampled_from([{}, {"tier": "gold"}, {"tier": "basic"}])),
        late=draw(st.booleans()),
    )


@SETTINGS
@given(st.data(), lives())
def test_step_upgrade_and_leave_match_the_reference(data: st.DataObject, life: Life) -> None:
    journey = life.journeys[0]
    newer = data.draw(versions(life))[0]
    enrollment: Enrollment | None = None
    at = T0
    for _ in range(data.draw(st.integers(1, 25))):
        at += timedelta(seconds=data.draw(st.sampled_from([0, 60, 7200, 86400 * 2])))
        on = journey
        if enrollment is not None and enrollment.version == newer.version:
            on = newer
        given = data.draw(inputs(on, enrollment, at))
        found = both(step, reference_step, on, enrollment, given, at)
        if found is None:
            continue
        enrollment = found.enrollment
        if enrollment is not None and enrollment.active and data.draw(st.booleans()):
            if data.draw(st.booleans()):
                found = both(upgrade, reference_upgrade, newer, enrollment, at)
            else:
                cause = Cause("merge", detail="merged into another lead")
                found = both(leave, reference_leave, enrollment, at, cause)
            assert found is not None
            enrollment = found.enrollment
