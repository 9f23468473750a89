"""/healthz: the process answers and its database does too (for load balancers)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from engine.api.schemas import Health

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

    return router
