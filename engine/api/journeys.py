"""The journeys this process runs, as the admin API shows them."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from engine.api.schemas import JourneySummary, SegmentSummary, StageSummary
from engine.journey.model import Journey
from engine.kpis.report import JourneyKpis, Period, read_kpis
from engine.machine.book import JourneyBook

if TYPE_CHECKING:
    from engine.api.app import AppRuntime


def journeys_router(runtime: AppRuntime) -> APIRouter:
    router = APIRouter(tags=["journeys"])

    @router.get("/v1/journeys", summary="The loaded journeys")
    async def list_journeys() -> list[JourneySummary]:
        book = runtime.book
        return [summarize(journey, book) for journey in book.current.values()]

    @router.get(
        "/v1/journeys/{journey_id}",
        summary="One journey, as its file defines it",
        responses={404: {"description": "No journey has this id."}},
    )
    async def get_journey(journey_id: str) -> dict[str, Any]:
        journey = runtime.book.current.get(journey_id)
        if journey is None:
            raise HTTPException(404, f"no journey {journey_id!r}")
        return journey.model_dump(mode="json", by_alias=True)

    @router.get(
        "/v1/journeys/{journey_id}/kpis",
        summary="The journey's KPIs for the leads that entered in a period",
        responses={
            400: {"description": "A bad `from` or `to`."},
            404: {"description": "No journey has this id."},
        },
    )
    async def get_kpis(
        journey_id: str,
        start: Annotated[
            str | None,
            Query(
                alias="from",
                description="First UTC day (YYYY-MM-DD, or a time: its UTC day), included.",
            ),
        ] = None,
        end: Annotated[
            str | None,
            Query(alias="to", description="Last UTC day, included."),
        ] = None,
    ) -> JourneyKpis:
        journey = runtime.book.current.get(journey_id)
        if journey is None:
            raise HTTPException(404, f"no journey {journey_id!r}")
        period = Period(_day("from", start), _day("to", end))
        if period.start and period.end and period.start > period.end:
            raise HTTPException(400, "`from` is after `to`")
        return await read_kpis(runtime.db, journey, period)

    return router


def _day(name: str, value: str | None) -> date | None:
    """A UTC day from YYYY-MM-DD, or from an ISO 8601 time (the UTC day it falls on)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return date.fromisoformat(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(
            400, f"`{name}`: expected a day (YYYY-MM-DD) or an ISO 8601 time, got {text[:40]!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).date()


def summarize(journey: Journey, book: JourneyBook) -> JourneySummary:
    segment = journey.segment
    return JourneySummary(
        id=journey.id,
        name=journey.name,
        version=journey.version,
        versions=sorted(version for (id_, version) in book.versions if id_ == journey.id),
        retired=journey.id in book.retired,
        segment=None
        if segment is None
        else SegmentSummary(
            name=segment.name, description=segment.description, jobs=list(segment.jobs)
        ),
        stages=[
            StageSummary(id=stage.id, name=stage.title, phase=stage.phase, terminal=stage.terminal)
            for stage in journey.stages
        ],
    )
