"""The KPI report of one journey for a period: read from the roll-ups, never the history.

For the leads that entered in the period (their cohort: the UTC day a lead first
entered the journey): L leads, C conversion (customers / leads), P average goal value,
Q goals per customer, revenue = L·C·P·Q; the same by first-touch source; per stage:
entered, current, exited_to, conversion, median and p90 time in stage, and a status
against the stage's targets. Emails count by the day they were sent, offers by the day
their codes were granted, so a rate (opened / sent, redeemed / granted) is of the same
emails or codes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.database import Database
from engine.db.schema import kpi_cohorts, kpi_emails, kpi_moves, kpi_offers, kpi_stage_times
from engine.journey.model import Journey, OnEvent, Stage
from engine.kpis.rollup import EMAIL_COUNTERS, OFFER_COUNTERS, OUTSIDE, day_number

# The `by_source` key of leads whose first touch carried no campaign source.
NO_SOURCE = "(none)"
# The `exited_to` key of leaving the journey from a stage.
EXIT = "exit"
# Within this share of a target a stage is `warn`, beyond it `bad`.
WARN_MARGIN = 0.2

Status = Literal["ok", "warn", "bad", "none"]


@dataclass(frozen=True)
class Period:
    """Whole UTC days, both ends included; None leaves that end open."""

    start: date | None = None
    end: date | None = None


class Figures(BaseModel):
    leads: int
    customers: int
    goals: int
    conversion: float
    average_value: float
    purchases_per_customer: float
    revenue: float


class Targets(BaseModel):
    conversion: float | None = None
    median_time_s: float | None = None
    p90_time_s: float | None = None


class StageFigures(BaseModel):
    stage: str
    name: str
    phase: str | None  # None for a stage only an older version of the map has
    terminal: bool
    entered: int
    current: int
    exited_to: dict[str, int]
    conversion: float | None  # None before anyone entered
    median_time_s: float | None  # None before anyone left
    p90_time_s: float | None
    targets: Targets
    status: Status


class EmailFigures(BaseModel):
    template: str
    sent: int
    opened: int
    clicked: int
    unsubscribed: int
    bounced: int


class OfferFigures(BaseModel):
    offer: str
    granted: int
    redeemed: int
    expired: int
    refused: int


class JourneyKpis(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True, populate_by_name=True)

    journey: str
    version: int
    start: date | None = Field(alias="from")
    end: date | None = Field(alias="to")
    totals: Figures
    by_source: dict[str, Figures]
    stages: list[StageFigures]
    emails: list[EmailFigures]
    offers: list[OfferFigures]


async def read_kpis(db: Database, journey: Journey, period: Period) -> JourneyKpis:
    async with db.read() as connection:
        return await journey_kpis(connection, journey, period)


async def journey_kpis(
    connection: AsyncConnection, journey: Journey, period: Period
) -> JourneyKpis:
    cohorts = await _sums(connection, kpi_cohorts, journey.id, period, ("source",), COHORT_SUMS)
    # A source whose leads all moved to an earlier first touch sums to nothing.
    cohorts = {key: counts for key, counts in cohorts.items() if any(counts)}
    moves = await _sums(
        connection, kpi_moves, journey.id, period, ("from_stage", "to_stage"), ("leads",)
    )
    times = await _sums(
        connection, kpi_stage_times, journey.id, period, ("stage", "bucket"), ("leads", "seconds")
    )
    emails = await _sums(connection, kpi_emails, journey.id, period, ("template",), EMAIL_COUNTERS)
    offers = await _sums(connection, kpi_offers, journey.id, period, ("offer",), OFFER_COUNTERS)
    by_source = {
        source or NO_SOURCE: _figures(*counts)
        for (source,), counts in sorted(cohorts.items(), key=lambda item: (-item[1][0], item[0]))
    }
    total = [sum(counts[i] for counts in cohorts.values()) for i in range(len(COHORT_SUMS))]
    return JourneyKpis(
        journey=journey.id,
        version=journey.version,
        start=period.start,
        end=period.end,
        totals=_figures(*total),
        by_source=by_source,
        stages=stage_figures(
            journey,
            {(source, to): int(counts[0]) for (source, to), counts in moves.items()},
            {(stage, int(bucket)): (int(n), s) for (stage, bucket), (n, s) in times.items()},
        ),
        emails=[
            EmailFigures(template=template, **_ints(EMAIL_COUNTERS, counts))
            for (template,), counts in sorted(emails.items())
        ],
        offers=[
            OfferFigures(offer=offer, **_ints(OFFER_COUNTERS, counts))
            for (offer,), counts in sorted(offers.items())
        ],
    )


COHORT_SUMS = ("leads", "customers", "goals", "value")


def _figures(leads: float, customers: float, goals: float, value: float) -> Figures:
    return Figures(
        leads=int(leads),
        customers=int(customers),
        goals=int(goals),
        conversion=customers / leads if leads else 0.0,
        average_value=value / goals if goals else 0.0,
        purchases_per_customer=goals / customers if customers else 0.0,
        # L·C·P·Q is the goal value summed; summed, it carries no rounding of the product.
        revenue=value,
    )


def _ints(names: Sequence[str], counts: Sequence[float]) -> dict[str, int]:
    return {name: int(count) for name, count in zip(names, counts, strict=True)}


def stage_figures(
    journey: Journey,
    moves: Mapping[tuple[str, str], int],
    times: Mapping[tuple[str, int], tuple[int, float]],
) -> list[StageFigures]:
    """Per stage, from the moves (from, to: "" outside the journey) and the time-in-stage
    histogram ((stage, bucket): (leads, seconds)). Stages only an older version of the
    map has come last, so that every move is shown somewhere."""
    entered: dict[str, int] = defaultdict(int)
    exited: dict[str, dict[str, int]] = defaultdict(dict)
    for (source, to), count in moves.items():
        if to != OUTSIDE:
            entered[to] += count
        if source != OUTSIDE:
            exited[source][to or EXIT] = exited[source].get(to or EXIT, 0) + count
    histograms: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for (timed, bucket), (count, seconds) in times.items():
        histograms[timed].append((bucket, count, seconds))
    known = {stage.id for stage in journey.stages}
    retired = sorted((set(entered) | set(exited)) - known)
    onward = _onward_stages(journey)
    found: list[StageFigures] = []
    for stage_id in [stage.id for stage in journey.stages] + retired:
        stage = journey.stage_by_id.get(stage_id)
        came = entered.get(stage_id, 0)
        left = exited.get(stage_id, {})
        histogram = sorted(histograms.get(stage_id, []))
        moved_on = sum(count for to, count in left.items() if to in onward)
        conversion = moved_on / came if came else None
        median = quantile(histogram, 0.5)
        p90 = quantile(histogram, 0.9)
        targets = _targets(stage)
        found.append(
            StageFigures(
                stage=stage_id,
                name=stage.title if stage is not None else stage_id,
                phase=stage.phase if stage is not None else None,
                terminal=stage.terminal if stage is not None else False,
                entered=came,
                current=max(came - sum(left.values()), 0),
                exited_to=dict(sorted(left.items())),
                conversion=conversion,
                median_time_s=median,
                p90_time_s=p90,
                targets=targets,
                status=status(targets, conversion, median, p90) if came else "none",
            )
        )
    return found


def _onward_stages(journey: Journey) -> set[str]:
    """Where moving on counts as converting: a stage that is not the end of the road
    (terminal), or one the goal itself leads to."""
    goal_event = journey.goal.on if journey.goal is not None else None
    reached_by_goal = {
        transition.to
        for stage in journey.stages
        for transition in stage.transitions
        if isinstance(transition, OnEvent) and transition.on == goal_event
    }
    return {stage.id for stage in journey.stages if not stage.terminal} | reached_by_goal


def _targets(stage: Stage | None) -> Targets:
    kpi = stage.kpi if stage is not None else None
    if kpi is None:
        return Targets()
    return Targets(
        conversion=kpi.conversion,
        median_time_s=_seconds(kpi.median_time),
        p90_time_s=_seconds(kpi.p90_time),
    )


def _seconds(duration: timedelta | None) -> float | None:
    return None if duration is None else duration.total_seconds()


def quantile(histogram: Sequence[tuple[int, int, float]], q: float) -> float | None:
    """The q-quantile (nearest rank) of a histogram of (bucket, count, seconds summed),
    sorted by bucket: the mean of the bucket holding it, exact when its times are equal."""
    total = sum(count for _, count, _ in histogram)
    if total <= 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for _, count, seconds in histogram:
        seen += count
        if count > 0 and seen >= rank:
            return seconds / count
    return None


def status(
    targets: Targets, conversion: float | None, median: float | None, p90: float | None
) -> Status:
    """ok when every target with a figure is met, warn when one misses by up to
    WARN_MARGIN, bad beyond; none when there is no target or no figure to judge."""
    verdicts: list[Status] = []
    if targets.conversion is not None and conversion is not None:
        verdicts.append(_at_least(conversion, targets.conversion))
    for actual, target in ((median, targets.median_time_s), (p90, targets.p90_time_s)):
        if target is not None and actual is not None:
            verdicts.append(_at_most(actual, target))
    if not verdicts:
        return "none"
    if "bad" in verdicts:
        return "bad"
    return "warn" if "warn" in verdicts else "ok"


def _at_least(actual: float, target: float) -> Status:
    if actual >= target:
        return "ok"
    return "warn" if actual >= target * (1 - WARN_MARGIN) else "bad"


def _at_most(actual: float, target: float) -> Status:
    if actual <= target:
        return "ok"
    return "warn" if actual <= target * (1 + WARN_MARGIN) else "bad"


async def _sums(
    connection: AsyncConnection,
    table: Table,
    journey_id: str,
    period: Period,
    keys: Sequence[str],
    counters: Sequence[str],
) -> dict[tuple[Any, ...], list[float]]:
    """The counters summed over the period's days and the shards, by `keys`."""
    query = select(
        *(table.c[key] for key in keys), *(func.sum(table.c[name]) for name in counters)
    ).where(table.c.journey_id == journey_id)
    if period.start is not None:
        query = query.where(table.c.day >= day_number(period.start))
    if period.end is not None:
        query = query.where(table.c.day <= day_number(period.end))
    query = query.group_by(*(table.c[key] for key in keys))
    width = len(keys)
    return {
        tuple(row[:width]): [float(value or 0) for value in row[width:]]
        for row in await connection.execute(query)
    }
