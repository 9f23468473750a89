"""The audiences admin API: what audiences there are, and their exports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from channels.audiences.export import META_PAGE, BadCursor, Cursor, csv_export, meta_page
from channels.audiences.store import audience_sizes
from engine.journey.model import Journey

if TYPE_CHECKING:
    from engine.api.app import AppRuntime

NEXT_CURSOR = "X-CJM-Next-Cursor"


class AudienceSummary(BaseModel):
    name: str
    journey: str
    description: str | None
    ttl_s: float | None
    size: int


def audiences_router(runtime: AppRuntime) -> APIRouter:
    router = APIRouter(tags=["audiences"])

    def owner(name: str) -> Journey:
        for journey in runtime.book.current.values():
            if name in journey.audiences:
                return journey
        raise HTTPException(404, f"no audience {name!r}")

    @router.get("/v1/audiences", summary="Every audience of the loaded journeys, with its size")
    async def list_audiences() -> list[AudienceSummary]:
        async with runtime.db.read() as connection:
            sizes = await audience_sizes(connection)
        return [
            AudienceSummary(
                name=name,
                journey=journey.id,
                description=audience.description,
                ttl_s=audience.ttl.total_seconds() if audience.ttl is not None else None,
                size=sizes.get(name, 0),
            )
            for journey in runtime.book.current.values()
            for name, audience in journey.audiences.items()
        ]

    @router.get(
        "/v1/audiences/{name}/export",
        summary="An audience for an ad platform: full, or the changes since a cursor",
        description=(
            "`meta`: one JSON page of Meta's Custom Audience payload (hashed; one `op` a page, "
            "at most 10,000 rows); follow `next_cursor` while `has_more`, and keep the last "
            "one for the next sync. `google`: Google Customer Match CSV of the adds (or, "
            "with `op=remove`, of the removes). `csv`: the clear list with an `op` column. "
            f"The CSV formats stream the whole range; the cursor to sync on from is in the "
            f"`{NEXT_CURSOR}` header."
        ),
        responses={
            200: {"content": {"application/json": {}, "text/csv": {}}},
            400: {"description": "The cursor is not one this server gave."},
            404: {"description": "No loaded journey has this audience."},
        },
    )
    async def export(
        name: str,
        format: Literal["meta", "google", "csv"] = "meta",
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=META_PAGE)] = META_PAGE,
        op: Literal["add", "remove"] = "add",
    ) -> Any:
        owner(name)
        try:
            position = Cursor.decode(cursor) if cursor else Cursor()
        except BadCursor as error:
            raise HTTPException(400, str(error)) from None
        region = runtime.settings.default_region
        if format == "meta":
            page = await meta_page(runtime.db, name, position, limit, region)
            # Its rows are JSON already: spliced, not encoded again row by row.
            return Response(page.json(), media_type="application/json")
        result = await csv_export(
            runtime.db,
            name,
            position,
            google=format == "google",
            ops=[op] if format == "google" else ["add", "remove"],
            region=region,
        )
        filename = f"{name}-{format}.csv"
        return StreamingResponse(
            result.lines,
            media_type="text/csv; charset=utf-8",
            headers={
                NEXT_CURSOR: result.next_cursor,
                "Content-Disposition": f'attachment; filename="{filename}"',
            },
        )

    return router
