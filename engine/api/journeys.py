"""The journeys this process runs, as the admin API shows them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException

from engine.api.schemas import JourneySummary, SegmentSummary, StageSummary
from engine.journey.model import Journey
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

    return router


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
