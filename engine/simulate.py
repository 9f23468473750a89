"""`cjm simulate`: a dry run of one journey on a virtual clock, with no database or network.

A marketer wants to see what a map does before leads meet it: which stages a lead
passes, which emails go out when, what the KPIs would look like. This runs recorded
Segment messages through the very pure core the worker runs (`advance()` over a
`JourneyBook`), so what the simulation shows is what the engine would do. The shell's
I/O is replaced by data: timers wait in a list instead of a table, and the channels
(emails, sequences, offers, audiences) are recorded with their times instead of
carried out. The clock jumps from one due moment to the next, so a journey that waits
for weeks runs in milliseconds.

Simplified on purpose, and said so in the report: sequence emails go out at their
start plus the waits (no sending windows, no frequency caps); an identify with both
ids ties the anonymousId to the userId's lead from its first event (other merges and
aliases are not simulated); offer codes are `SIM-<offer>-<n>` and only the lead that
holds a code can redeem it.
"""

from __future__ import annotations

import heapq
import itertools
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast

from engine.ingest.messages import InvalidMessage, Message, MessageType, parse_message
from engine.journey.model import EmailStep, Journey, WaitStep
from engine.machine.book import JourneyBook
from engine.machine.lead import JourneyEffect, Lead, LeadEvent, PendingTimer, advance
from engine.machine.values import (
    AddToAudience,
    ChannelAction,
    Enrollment,
    ReachGoal,
    RemoveFromAudience,
    Transitioned,
)

# How long after the last event the clock may run on: long enough for any sensible
# chain of waits, short enough that a journey looping on timeouts still ends.
DEFAULT_HORIZON = timedelta(days=400)

SIMPLIFICATIONS = (
    "sequence emails are sent at their start plus the waits: sending windows and "
    "frequency caps are ignored",
    "an identify carrying userId and anonymousId makes them one lead from the first "
    "event; other merges and aliases are not simulated",
    "offer codes are SIM-<offer>-<n>; a coupon redeems only a code its own lead holds",
)

SIMULATED_TYPES: tuple[MessageType, ...] = ("track", "page", "screen", "identify")

# `parse_message` clamps times in the future to the moment of receipt; a replay has no
# such moment, so receipt is put beyond any timestamp a file can hold.
_RECEIVED_NEVER = datetime(9999, 1, 1, tzinfo=UTC)


class BadEvents(ValueError):
    """Lines of an events file that are not messages, each as `file:line: reason`."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


def read_events(path: Path) -> list[Message]:
    """The messages of a JSON Lines file, one Segment message a line (blank lines skipped).

    Raises `BadEvents` naming every bad line, so a file is fixed in one go.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BadEvents([f"{path}: cannot read: {error}"]) from None
    messages: list[Message] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages.append(_message(line))
        except InvalidMessage as error:
            problems.append(f"{path}:{number}: {error.reason}")
    if problems:
        raise BadEvents(problems)
    return messages


def _message(line: str) -> Message:
    try:
        payload = json.loads(line)
    except ValueError as error:
        raise InvalidMessage(f"not valid JSON: {error}") from None
    return message_of(payload)


def message_of(payload: object) -> Message:
    """One message from what a JSON Lines line holds, checked as a recorded one is; the
    synthetic traffic of `engine.traffic` goes through here too."""
    if not isinstance(payload, dict):
        raise InvalidMessage("a message must be a JSON object")
    type_ = payload.get("type")
    if type_ not in SIMULATED_TYPES:
        raise InvalidMessage("`type` must be one of " + ", ".join(SIMULATED_TYPES))
    if payload.get("timestamp") is None:
        raise InvalidMessage("a simulated message needs a `timestamp`")
    # Clock skew correction compares sentAt with the receipt, which a replay does not have.
    payload = {key: value for key, value in payload.items() if key != "sentAt"}
    return parse_message(payload, cast(MessageType, type_), _RECEIVED_NEVER)


# --- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathStep:
    entry_no: int
    at: datetime
    from_stage: str | None  # None: the lead entered the journey
    to_stage: str | None  # None: the lead left the journey
    cause: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SimulatedEmail:
    entry_no: int
    at: datetime
    template: str
    sequence: str | None = None  # None: an `email.send`


@dataclass(frozen=True, slots=True)
class AudienceChange:
    at: datetime
    audience: str
    added: bool


@dataclass(slots=True)
class SimulatedOffer:
    offer: str
    code: str
    entry_no: int
    granted_at: datetime
    expires_at: datetime
    status: Literal["granted", "redeemed", "expired"] = "granted"
    ended_at: datetime | None = None  # when it was redeemed or expired


@dataclass(frozen=True, slots=True)
class Goal:
    entry_no: int
    at: datetime
    value: float | None


@dataclass(slots=True)
class LeadReport:
    """What happened to one simulated lead in the journey."""

    lead: str  # "user:<userId>" or "anon:<anonymousId>"
    path: list[PathStep] = field(default_factory=list)
    emails: list[SimulatedEmail] = field(default_factory=list)
    audiences: list[AudienceChange] = field(default_factory=list)
    offers: list[SimulatedOffer] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    runs: list[Enrollment] = field(default_factory=list)  # each run's final state
    traits: Mapping[str, Any] = field(default_factory=dict)
    pending: int = 0  # timers and channel work left beyond the horizon


@dataclass(frozen=True, slots=True)
class StageFigures:
    stage: str
    entered: int
    exited_to: Mapping[str, int]  # next stage, or "exit" for leaving the journey
    current: int  # runs still there at the end (active, or ended in this terminal stage)


@dataclass(frozen=True, slots=True)
class Kpis:
    leads: int  # L: entries into the journey (runs)
    customers: int  # runs with at least one goal
    goals: int
    conversion: float  # C
    average_value: float  # P
    purchases_per_customer: float  # Q
    revenue: float  # L·C·P·Q, the total goal value
    stages: tuple[StageFigures, ...]


@dataclass(frozen=True, slots=True)
class Report:
    journey_id: str
    version: int
    lead_count: int
    leads: tuple[LeadReport, ...]  # empty when the leads were not kept (see `simulate`)
    kpis: Kpis
    started_at: datetime | None
    ended_at: datetime | None
    wall_seconds: float

    def as_dict(self, *, leads: bool = True) -> dict[str, Any]:
        """The report as JSON; without `leads`, only the totals and KPIs (for large runs)."""
        report = {
            "journey": self.journey_id,
            "version": self.version,
            "virtual_time": {
                "from": _iso(self.started_at),
                "to": _iso(self.ended_at),
                "seconds": self.virtual_seconds,
            },
            "wall_seconds": round(self.wall_seconds, 6),
            "simplifications": list(SIMPLIFICATIONS),
            "lead_count": self.lead_count,
            "leads": [_lead_dict(lead) for lead in self.leads],
            "kpis": _kpis_dict(self.kpis),
        }
        if not leads:
            del report["leads"]
        return report

    @property
    def virtual_seconds(self) -> float:
        if self.started_at is None or self.ended_at is None:
            return 0.0
        return (self.ended_at - self.started_at).total_seconds()

    def as_text(self, *, paths: bool = True) -> str:
        """The report for a reader; without `paths`, the leads' paths are left out."""
        return "\n".join(_text_lines(self, paths)) + "\n"


# --- the simulation ------------------------------------------------------------------------------


def simulate(
    journey: Journey,
    messages: Sequence[Message] = (),
    *,
    synthetic: Iterable[Sequence[Message]] = (),
    keep_leads: bool = True,
    horizon: timedelta = DEFAULT_HORIZON,
) -> Report:
    """Run `messages` through `journey` on a virtual clock; the clock stops when nothing is
    left to happen, or `horizon` after the last message.

    `synthetic` adds leads after the recorded ones, one lead's messages at a time (see
    `engine.traffic`): each is generated, simulated and counted in turn. Leads never affect
    each other, so without `keep_leads` a lead's result is folded into the KPIs and dropped
    as soon as it is simulated: memory stays flat however many leads there are, and the
    report's `leads` is empty.
    """
    started = time.perf_counter()
    book = JourneyBook.of([journey])
    codes: Counter[str] = Counter()  # codes granted per offer, for unique SIM codes
    tally = KpiTally(journey)
    kept: list[LeadReport] = []
    count = 0
    first: datetime | None = None
    reached: datetime | None = None
    for lead_key, lead_messages in _leads(messages, synthetic):
        earliest = min(message.timestamp for message in lead_messages)
        latest = max(message.timestamp for message in lead_messages)
        run = _LeadRun(book, journey, lead_key, codes)
        run.play(lead_messages, latest + horizon)
        result = run.report()
        tally.add(result)
        if keep_leads:
            kept.append(result)
        count += 1
        first = earliest if first is None else min(first, earliest)
        reached = run.reached if reached is None else max(reached, run.reached)
    return Report(
        journey_id=journey.id,
        version=journey.version,
        lead_count=count,
        leads=tuple(kept),
        kpis=tally.kpis(),
        started_at=first,
        ended_at=reached,
        wall_seconds=time.perf_counter() - started,
    )


def _leads(
    messages: Sequence[Message], synthetic: Iterable[Sequence[Message]]
) -> Iterator[tuple[str, list[Message]]]:
    """(lead key, its messages): the recorded leads in order of their first message, then
    the synthetic ones as they come, each grouped on its own."""
    yield from _by_lead(messages).items()
    for lead_messages in synthetic:
        yield from _by_lead(lead_messages).items()


def _by_lead(messages: Sequence[Message]) -> dict[str, list[Message]]:
    """Messages grouped per lead, leads in order of their first message."""
    tied = {
        message.anonymous_id: message.user_id
        for message in messages
        if message.type == "identify" and message.user_id and message.anonymous_id
    }
    grouped: dict[str, list[Message]] = {}
    for message in messages:
        user_id = message.user_id or tied.get(message.anonymous_id or "")
        key = f"user:{user_id}" if user_id else f"anon:{message.anonymous_id}"
        grouped.setdefault(key, []).append(message)
    return grouped


@dataclass(frozen=True, slots=True)
class _SendEmail:
    journey_id: str
    entry_no: int
    template: str
    sequence: str | None


@dataclass(frozen=True, slots=True)
class _ExpireOffer:
    code: str


@dataclass(order=True)
class _Due:
    """Something that happens to the lead at `at`: an event to apply, or channel work."""

    at: datetime
    order: int  # arrival: file order for messages, then creation order for internal work
    item: LeadEvent | _SendEmail | _ExpireOffer = field(compare=False)
    void: bool = field(default=False, compare=False)
    external: bool = field(default=False, compare=False)


class _LeadRun:
    """One lead on its own virtual clock: leads never affect each other in a journey."""

    def __init__(
        self, book: JourneyBook, journey: Journey, lead_key: str, codes: Counter[str]
    ) -> None:
        self.book = book
        self.journey = journey
        self.codes = codes
        self.lead = Lead({}, None, {})
        self.timers: list[PendingTimer] = []
        self.timer_ids = itertools.count(1)
        self.queue: list[_Due] = []
        self.order = itertools.count()
        self.sequences: dict[tuple[int, str], list[_Due]] = {}  # running, by entry and name
        self.expiries: dict[str, _Due] = {}
        self.runs: dict[int, Enrollment] = {}
        self.result = LeadReport(lead_key)
        self.reached: datetime = datetime.min.replace(tzinfo=UTC)

    def play(self, messages: Sequence[Message], until: datetime) -> None:
        """Apply the messages in time order (ties: file order) with everything they set off,
        up to `until`."""
        for message in messages:
            self._push(message.timestamp, _lead_event(next(self.order), message), external=True)
        while True:
            next_timer = min((timer.due_at for timer in self.timers), default=None)
            next_due = self.queue[0].at if self.queue else None
            if next_timer is not None and (next_due is None or next_timer <= next_due):
                # A timeout before an event of the same instant, as the core orders them.
                if next_timer > until:
                    break
                due = [timer for timer in self.timers if timer.due_at == next_timer]
                self._advance([], due, next_timer)
            elif next_due is not None:
                if next_due > until:
                    break
                self._happen(heapq.heappop(self.queue))
            else:
                break
        self.result.pending = len(self.timers) + sum(not due.void for due in self.queue)

    def report(self) -> LeadReport:
        self.result.runs = [self.runs[entry_no] for entry_no in sorted(self.runs)]
        self.result.traits = dict(self.lead.traits)
        return self.result

    def _push(
        self, at: datetime, item: LeadEvent | _SendEmail | _ExpireOffer, external: bool = False
    ) -> _Due:
        due = _Due(at, next(self.order), item, external=external)
        heapq.heappush(self.queue, due)
        return due

    def _happen(self, due: _Due) -> None:
        if due.void:
            return
        item = due.item
        if isinstance(item, LeadEvent):
            self._advance([item], [], due.at)
            if due.external:
                self._redeem_coupon(item)
        elif isinstance(item, _SendEmail):
            self._send(item, due.at)
        else:
            self._expire(item.code, due.at)

    def _advance(
        self, events: Sequence[LeadEvent], timers: Sequence[PendingTimer], until: datetime
    ) -> None:
        """One step of the clock through the pure core, then the shell's part in memory."""
        outcome = advance(self.book, self.lead, events, timers, until)
        self.lead = outcome.lead
        self.reached = max(self.reached, until)
        fired = set(outcome.fired)
        self.timers = [
            timer
            for timer in self.timers
            if timer.id not in fired and (timer.journey_id, timer.entry_no) not in outcome.cancelled
        ]
        # Ids make the timers "stored", so the core reports them back as fired.
        self.timers.extend(replace(timer, id=next(self.timer_ids)) for timer in outcome.timers)
        for enrollment in outcome.changed:
            self.runs[enrollment.entry_no] = enrollment
        for effect in outcome.effects:
            self._carry_out(effect)

    def _carry_out(self, item: JourneyEffect) -> None:
        effect = item.effect
        if isinstance(effect, Transitioned):
            step = PathStep(
                item.entry_no, item.at, effect.from_stage, effect.to_stage, effect.cause.as_dict()
            )
            self.result.path.append(step)
        elif isinstance(effect, ReachGoal):
            self.result.goals.append(Goal(item.entry_no, effect.at, effect.value))
        elif isinstance(effect, AddToAudience | RemoveFromAudience):
            added = isinstance(effect, AddToAudience)
            self.result.audiences.append(AudienceChange(item.at, effect.audience, added))
        elif isinstance(effect, ChannelAction):
            self._channel(item, effect)

    def _channel(self, item: JourneyEffect, action: ChannelAction) -> None:
        if action.action == "email.send":
            self._push(item.at, _SendEmail(item.journey_id, item.entry_no, action.target, None))
        elif action.action == "sequence.start":
            self._start_sequence(item, action.target)
        elif action.action == "sequence.stop":
            for due in self.sequences.pop((item.entry_no, action.target), []):
                due.void = True
        else:
            self._grant(item, action.target)

    def _start_sequence(self, item: JourneyEffect, name: str) -> None:
        key = (item.entry_no, name)
        if key in self.sequences:
            return  # already running in this run: the channel starts a sequence once
        at = item.at
        scheduled: list[_Due] = []
        for step in self.journey.sequences[name].steps:
            if isinstance(step, WaitStep):
                at += step.wait
            elif isinstance(step, EmailStep):
                email = _SendEmail(item.journey_id, item.entry_no, step.email, name)
                scheduled.append(self._push(at, email))
        self.sequences[key] = scheduled

    def _send(self, email: _SendEmail, at: datetime) -> None:
        self.result.emails.append(
            SimulatedEmail(email.entry_no, at, email.template, email.sequence)
        )
        properties = {"template": email.template, "journey": email.journey_id}
        self._internal("email.sent", at, properties, f"{email.template}:{at.isoformat()}")

    def _grant(self, item: JourneyEffect, name: str) -> None:
        held = any(
            offer.offer == name and offer.status == "granted" for offer in self.result.offers
        )
        if held:
            return  # granting again gives the same code while it can still be used
        self.codes[name] += 1
        code = f"SIM-{name}-{self.codes[name]}"
        expires = self.journey.offers[name].expires
        expires_at = expires.at or item.at + (expires.after or timedelta(0))
        self.result.offers.append(
            SimulatedOffer(name, code, item.entry_no, item.at, expires_at.astimezone(UTC))
        )
        properties = {
            "offer": name,
            "code": code,
            "journey": item.journey_id,
            "expires_at": expires_at.isoformat(),
        }
        self._internal("offer.granted", item.at, properties, code)
        self.expiries[code] = self._push(expires_at, _ExpireOffer(code))

    def _redeem_coupon(self, event: LeadEvent) -> None:
        """A tracked coupon redeems the lead's code if it was still valid at that time."""
        coupon = event.properties.get("coupon")
        if not isinstance(coupon, str):
            return
        for offer in self.result.offers:
            if offer.code == coupon.strip() and offer.status == "granted":
                if event.timestamp >= offer.expires_at:
                    return  # a redemption at or after expiry is refused
                offer.status, offer.ended_at = "redeemed", event.timestamp
                self.expiries.pop(offer.code).void = True
                self._internal("offer.redeemed", event.timestamp, self._offer_facts(offer), coupon)

    def _expire(self, code: str, at: datetime) -> None:
        self.expiries.pop(code, None)
        for offer in self.result.offers:
            if offer.code == code and offer.status == "granted":
                offer.status, offer.ended_at = "expired", at
                self._internal("offer.expired", at, self._offer_facts(offer), code)

    def _offer_facts(self, offer: SimulatedOffer) -> dict[str, Any]:
        return {"offer": offer.offer, "code": offer.code, "journey": self.journey.id}

    def _internal(self, name: str, at: datetime, properties: Mapping[str, Any], key: str) -> None:
        """What a channel reports back into the inbox: applied like any event of the lead."""
        event = LeadEvent(
            seq=next(self.order),
            name=name,
            timestamp=at,
            message_id=f"sim:{name}:{key}",
            properties=dict(properties),
        )
        self._push(at, event)


def _lead_event(seq: int, message: Message) -> LeadEvent:
    """The message as the machine reads it; mirrors the worker's `_lead_event`, which
    reads it back from a database row."""
    return LeadEvent(
        seq=seq,
        name=message.name,
        timestamp=message.timestamp,
        message_id=message.message_id,
        properties=message.properties,
        context=message.context,
        traits=message.traits,
    )


# --- KPIs ----------------------------------------------------------------------------------------


class KpiTally:
    """The KPIs of the leads added so far; a lead is added as soon as it is simulated, so
    its details need not be kept to count it."""

    def __init__(self, journey: Journey) -> None:
        self.stages = tuple(stage.id for stage in journey.stages)
        self.leads = 0  # L: leads that entered, once however often they came back
        self.customers = 0  # leads with at least one goal
        self.goals = 0
        self.value: float = 0  # the goal values' sum, as `sum` gives it (0 without goals)
        self.entered: Counter[str] = Counter()
        self.exited_to: dict[str, Counter[str]] = {stage: Counter() for stage in self.stages}
        self.current: Counter[str] = Counter()  # runs still in a stage at the end

    def add(self, lead: LeadReport) -> None:
        # As the server's KPIs count: one person is one lead, a customer once.
        self.leads += 1 if lead.runs else 0
        self.customers += 1 if lead.goals else 0
        self.goals += len(lead.goals)
        for goal in lead.goals:
            self.value += goal.value or 0.0
        for step in lead.path:
            if step.to_stage is not None and step.to_stage != step.from_stage:
                self.entered[step.to_stage] += 1
            if step.from_stage is not None and step.to_stage != step.from_stage:
                self.exited_to[step.from_stage][step.to_stage or "exit"] += 1
        self.current.update(run.stage for run in lead.runs if run.state != "exited")

    def kpis(self) -> Kpis:
        stages = tuple(
            StageFigures(
                stage, self.entered[stage], dict(self.exited_to[stage]), self.current[stage]
            )
            for stage in self.stages
        )
        return Kpis(
            leads=self.leads,
            customers=self.customers,
            goals=self.goals,
            conversion=self.customers / self.leads if self.leads else 0.0,
            average_value=self.value / self.goals if self.goals else 0.0,
            purchases_per_customer=self.goals / self.customers if self.customers else 0.0,
            revenue=self.value,
            stages=stages,
        )


# --- output --------------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _lead_dict(lead: LeadReport) -> dict[str, Any]:
    return {
        "lead": lead.lead,
        "path": [
            {
                "entry_no": step.entry_no,
                "at": _iso(step.at),
                "from": step.from_stage,
                "to": step.to_stage,
                "cause": dict(step.cause),
            }
            for step in lead.path
        ],
        "emails": [
            {
                "entry_no": email.entry_no,
                "at": _iso(email.at),
                "template": email.template,
                "sequence": email.sequence,
            }
            for email in lead.emails
        ],
        "audiences": [
            {"at": _iso(change.at), "audience": change.audience, "added": change.added}
            for change in lead.audiences
        ],
        "offers": [
            {
                "offer": offer.offer,
                "code": offer.code,
                "entry_no": offer.entry_no,
                "granted_at": _iso(offer.granted_at),
                "expires_at": _iso(offer.expires_at),
                "status": offer.status,
                "ended_at": _iso(offer.ended_at),
            }
            for offer in lead.offers
        ],
        "goals": [
            {"entry_no": goal.entry_no, "at": _iso(goal.at), "value": goal.value}
            for goal in lead.goals
        ],
        "runs": [
            {"entry_no": run.entry_no, "stage": run.stage, "state": run.state} for run in lead.runs
        ],
        "traits": dict(lead.traits),
        "pending_beyond_horizon": lead.pending,
    }


def _kpis_dict(kpis: Kpis) -> dict[str, Any]:
    return {
        "totals": {
            "leads": kpis.leads,
            "customers": kpis.customers,
            "goals": kpis.goals,
            "conversion": kpis.conversion,
            "average_value": kpis.average_value,
            "purchases_per_customer": kpis.purchases_per_customer,
            "revenue": kpis.revenue,
        },
        "stages": [
            {
                "stage": figures.stage,
                "entered": figures.entered,
                "exited_to": dict(figures.exited_to),
                "current": figures.current,
            }
            for figures in kpis.stages
        ],
    }


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _cause_text(cause: Mapping[str, Any]) -> str:
    detail = cause.get("event") or (f"after {cause['after']}" if "after" in cause else None)
    return f"{cause['type']}: {detail}" if detail else str(cause["type"])


def _text_lines(report: Report, paths: bool) -> Iterator[str]:
    span = timedelta(seconds=report.virtual_seconds)
    start = _when(report.started_at) if report.started_at else "-"
    end = _when(report.ended_at) if report.ended_at else "-"
    yield f"simulation of {report.journey_id} v{report.version}: {report.lead_count} leads"
    yield f"virtual time: {start} .. {end} UTC ({span}), wall time {report.wall_seconds:.3f}s"
    for note in SIMPLIFICATIONS:
        yield f"note: {note}"
    if paths:
        for lead in report.leads:
            yield from _lead_lines(lead)
    else:
        yield f"paths of the {report.lead_count} leads not shown (--paths shows them)"
    yield from _kpi_lines(report.kpis)


def _lead_lines(lead: LeadReport) -> Iterator[str]:
    yield ""
    yield f"lead {lead.lead}"
    for step in lead.path:
        move = f"{step.from_stage or '(enter)'} -> {step.to_stage or '(leave)'}"
        yield f"  {_when(step.at)}  run {step.entry_no}  {move}  ({_cause_text(step.cause)})"
    for email in lead.emails:
        source = f"sequence {email.sequence}" if email.sequence else "email.send"
        yield f"  {_when(email.at)}  email {email.template}  ({source})"
    for change in lead.audiences:
        yield f"  {_when(change.at)}  audience {'+' if change.added else '-'}{change.audience}"
    for offer in lead.offers:
        ended = f", {offer.status} {_when(offer.ended_at)}" if offer.ended_at else ""
        yield (
            f"  {_when(offer.granted_at)}  offer {offer.offer} code {offer.code}, "
            f"expires {_when(offer.expires_at)}{ended}"
        )
    for goal in lead.goals:
        yield f"  {_when(goal.at)}  goal, value {goal.value}"
    for run in lead.runs:
        yield f"  run {run.entry_no} ends {run.state} in {run.stage}"
    if lead.pending:
        yield f"  {lead.pending} timers or channel steps left beyond the horizon"


def _kpi_lines(kpis: Kpis) -> Iterator[str]:
    yield ""
    yield "KPIs"
    yield f"  leads (L)                  {kpis.leads}"
    yield f"  customers                  {kpis.customers}"
    yield f"  conversion (C)             {kpis.conversion:.2%}"
    yield f"  average value (P)          {kpis.average_value:.2f}"
    yield f"  purchases/customer (Q)     {kpis.purchases_per_customer:.2f}"
    yield f"  revenue                    {kpis.revenue:.2f}"
    width = max(len("stage"), *(len(figures.stage) for figures in kpis.stages))
    yield ""
    yield f"  {'stage':<{width}}  entered  current  exited to"
    for figures in kpis.stages:
        exits = ", ".join(f"{to} {count}" for to, count in sorted(figures.exited_to.items()))
        line = f"  {figures.stage:<{width}}  {figures.entered:>7}  {figures.current:>7}  {exits}"
        yield line.rstrip()
