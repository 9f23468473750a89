"""Fixtures and a virtual-clock driver for the pure core.

`Driver` plays the shell the way the database does between `advance()` calls: it
stores `Outcome.timers`, deletes `Outcome.fired` and every timer of the enrollments
in `Outcome.cancelled`, and hands the stored timers due by `until` to the next call.
No database, no clock: time is whatever the test says.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from engine.journey.model import Journey
from engine.machine.book import JourneyBook
from engine.machine.lead import JourneyEffect, Lead, LeadEvent, Outcome, PendingTimer, advance
from engine.machine.values import Effect, Enrollment, Event, Transitioned

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday morning

E = TypeVar("E", bound=Effect)


def at(**delta: float) -> datetime:
    """`T0` moved by a timedelta's keywords: `at(hours=2)`."""
    return T0 + timedelta(**delta)


# The SPEC's "entry doors" map, as the dict its YAML file reads into.
DOORS_SPEC: dict[str, Any] = {
    "id": "doors",
    "name": "Entry doors — search visitors",
    "version": 1,
    "segment": {
        "name": "Homeowners choosing an entry door",
        "jobs": ["protect my home", "look good from the street"],
    },
    "entry": {
        "on": "page",
        "where": {"properties.path": {"startswith": "/catalog"}},
        "reentry": "never",
    },
    "exit": [{"on": "email.unsubscribed"}],
    "goal": {"on": "order_completed", "value": "properties.revenue"},
    "stages": [
        {
            "id": "first_contact",
            "name": "First contact",
            "phase": "awareness",
            "touchpoints": ["google_ads", "catalog_site"],
            "objections": ["is the quality good?", "prices elsewhere?"],
            "emotions": ["curious"],
            "kpi": {"conversion": 0.25, "median_time": "1d"},
            "on_enter": [{"audience.add": "site_visitors"}],
            "transitions": [
                {
                    "on": "page",
                    "where": {"context.campaign.source": "facebook"},
                    "to": "landing",
                },
                {"after": "2h", "to": "retargeting"},
            ],
        },
        {
            "id": "retargeting",
            "phase": "awareness",
            "on_enter": [{"audience.add": "catalog_abandoners"}],
            "transitions": [
                {
                    "on": "page",
                    "where": {"properties.path": {"startswith": "/landing"}},
                    "to": "landing",
                },
                {"after": "14d", "to": "lost"},
            ],
        },
        {
            "id": "landing",
            "phase": "consideration",
            "on_enter": [{"audience.remove": "catalog_abandoners"}],
            "transitions": [{"on": "catalog_requested", "to": "nurturing"}],
        },
        {
            "id": "nurturing",
            "phase": "consideration",
            "on_enter": [{"sequence.start": "door_tips"}, {"offer.grant": "free_install"}],
            "transitions": [
                {"on": "order_completed", "to": "customer"},
                {
                    "on": "offer.expired",
                    "where": {"properties.offer": "free_install"},
                    "to": "cooling",
                },
            ],
        },
        {
            "id": "cooling",
            "phase": "consideration",
            "transitions": [
                {"on": "order_completed", "to": "customer"},
                {"after": "30d", "to": "lost"},
            ],
        },
        {
            "id": "customer",
            "phase": "purchase",
            "on_enter": [
                {"email.send": "order_thanks"},
                {"audience.remove": ["site_visitors", "catalog_abandoners"]},
            ],
        },
        {"id": "lost", "phase": "awareness", "terminal": True},
    ],
    "sequences": {
        "door_tips": {
            "stop_on": ["order_completed"],
            "window": {
                "from": "09:00",
                "to": "20:00",
                "days": ["mon", "tue", "wed", "thu", "fri", "sat"],
            },
            "steps": [
                {"email": "catalog"},
                {"wait": "2d"},
                {"email": "choosing_fittings"},
                {"wait": "2d"},
                {"email": "locks_and_alarms"},
            ],
        }
    },
    "offers": {
        "free_install": {
            "title": "Free installation and an intercom as a gift",
            "expires": {"after": "5d"},
            "code": "DOORS-{6}",
        }
    },
    "audiences": {
        "site_visitors": {"description": "Everyone who saw the catalog"},
        "catalog_abandoners": {"description": "Saw the catalog, did not come back"},
    },
}

CATALOG = {"path": "/catalog/steel"}  # properties of a page view that enters `doors`
FACEBOOK = {"campaign": {"source": "facebook"}}  # context of a visit from a facebook ad


def doors(**changes: Any) -> Journey:
    """The doors journey, with top-level keys replaced by `changes`."""
    spec = copy.deepcopy(DOORS_SPEC)
    spec.update(changes)
    return Journey.model_validate(spec)


def doors_stages(**stages: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The doors stages with some replaced (a mapping) or removed (None), by stage id."""
    found: list[dict[str, Any]] = []
    for stage in copy.deepcopy(DOORS_SPEC["stages"]):
        if stage["id"] not in stages:
            found.append(stage)
        elif (replacement := stages[stage["id"]]) is not None:
            found.append({"id": stage["id"], "phase": stage["phase"], **replacement})
    return found


def journey(
    stages: Sequence[Mapping[str, Any]],
    *,
    id: str = "j",
    entry: Mapping[str, Any] | None = None,
    **more: Any,
) -> Journey:
    """A small journey: `stages` given as dicts without `phase` (awareness by default)."""
    return Journey.model_validate(
        {
            "id": id,
            "name": id.capitalize(),
            "entry": entry or {"on": "go"},
            "stages": [{"phase": "awareness", **stage} for stage in stages],
            **more,
        }
    )


def event(
    name: str,
    when: datetime = T0,
    *,
    properties: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    traits: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    late: bool = False,
) -> Event:
    """An event as `step()` takes it."""
    return Event(
        name=name,
        timestamp=when,
        message_id=message_id or f"{name}@{when.isoformat()}",
        properties=properties or {},
        context=context or {},
        traits=traits or {},
        late=late,
    )


def of_type(effects: Iterable[Effect], kind: type[E]) -> list[E]:
    return [effect for effect in effects if isinstance(effect, kind)]


def only(effects: Iterable[Effect], kind: type[E]) -> E:
    (found,) = of_type(effects, kind)
    return found


TimerOrder = Callable[[list[PendingTimer]], list[PendingTimer]]


def by_due_time(timers: list[PendingTimer]) -> list[PendingTimer]:
    return sorted(timers, key=lambda timer: (timer.due_at, timer.id or 0))


@dataclass
class Driver:
    """One lead driven through `advance()` on a virtual clock, timers kept like the database."""

    book: JourneyBook
    lead: Lead = field(default_factory=lambda: Lead({}, None, {}))
    timer_order: TimerOrder = by_due_time  # the order the "database" returns due timers in
    keep_cancelled: bool = False  # a sloppy database: void timers stay and come due again
    stored: dict[int, PendingTimer] = field(default_factory=dict)
    log: list[JourneyEffect] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    _seq: int = 0
    _timer_id: int = 0

    @classmethod
    def of(cls, *journeys: Journey, **options: Any) -> Driver:
        return cls(JourneyBook.of(journeys), **options)

    def event(
        self,
        name: str,
        when: datetime,
        *,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        traits: Mapping[str, Any] | None = None,
        message_id: str | None = None,
    ) -> LeadEvent:
        """A new inbox message; its arrival number comes from this driver."""
        self._seq += 1
        return LeadEvent(
            seq=self._seq,
            name=name,
            timestamp=when,
            message_id=message_id or f"m{self._seq}",
            properties=properties or {},
            context=context or {},
            traits=traits or {},
        )

    def send(self, name: str, when: datetime, **fields: Any) -> Outcome:
        """Deliver one event, as the worker would on its arrival at `when`."""
        return self.deliver([self.event(name, when, **fields)], until=when)

    def deliver(self, events: Sequence[LeadEvent], until: datetime | None = None) -> Outcome:
        """One `advance` call: `events`, and the stored timers due by `until`."""
        if until is None:
            until = max(event.timestamp for event in events)
        due = self.timer_order([timer for timer in self.stored.values() if timer.due_at <= until])
        outcome = advance(self.book, self.lead, events, due, until)
        self._store(outcome)
        return outcome

    def run_until(self, until: datetime) -> Outcome:
        """The timer sweep: fire what is due by `until`."""
        return self.deliver([], until)

    def _store(self, outcome: Outcome) -> None:
        for timer_id in outcome.fired:
            del self.stored[timer_id]
        for timer_id, timer in list(self.stored.items()):
            if (timer.journey_id, timer.entry_no) in outcome.cancelled and not self.keep_cancelled:
                del self.stored[timer_id]
        for timer in outcome.timers:
            self._timer_id += 1
            self.stored[self._timer_id] = replace(timer, id=self._timer_id)
        self.lead = outcome.lead
        self.log.extend(outcome.effects)
        self.outcomes.append(outcome)

    # --- what happened ------------------------------------------------------------------------

    def enrollment(self, journey_id: str) -> Enrollment:
        return self.lead.enrollments[journey_id]

    def stage(self, journey_id: str) -> str:
        return self.enrollment(journey_id).stage

    def effects(self, journey_id: str | None = None) -> list[Effect]:
        return [
            item.effect for item in self.log if journey_id is None or item.journey_id == journey_id
        ]

    def history(self, journey_id: str, entry_no: int | None = None) -> list[Transitioned]:
        return [
            item.effect
            for item in self.log
            if item.journey_id == journey_id
            and (entry_no is None or item.entry_no == entry_no)
            and isinstance(item.effect, Transitioned)
        ]

    def path(self, journey_id: str) -> list[str | None]:
        """The stages the lead went to in `journey_id`, in order (None: left the journey)."""
        return [line.to_stage for line in self.history(journey_id)]

    def pending(self) -> list[tuple[str, str, datetime]]:
        """Stored timers as (journey, stage, due), soonest first."""
        return sorted(
            ((t.journey_id, t.stage, t.due_at) for t in self.stored.values()),
            key=lambda row: row[2],
        )
