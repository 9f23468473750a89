"""/healthz: the process answers and its database does too (for load balancers);
/metrics: Prometheus's view of this process and of the work waiting in the database."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from engine.api.schemas import Health
from engine.metrics import render

if TYPE_CHECKING:
    from engine.api.app import AppRuntime

log = logging.getLogger(__name__)


def health_router(runtime: AppRuntime) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get(
        "/healthz",
        response_model=Health,
        summary="Liveness and database reachability",
        responses={503: {"model": Health, "description": "The database does not answer."}},
    )
    async def healthz() -> Health | JSONResponse:
        try:
            async with runtime.db.read() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception:
            log.exception("healthz: the database does not answer")
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return Health(status="ok")

    @router.get(
        "/metrics",
        summary="Prometheus metrics (text exposition format)",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def metrics() -> Response:
        body = await render(runtime.db, runtime.clock.now())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
