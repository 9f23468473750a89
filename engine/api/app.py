"""The HTTP application: tracking, admin, health and dashboard routes over one runtime.

The app owns nothing: the runtime (settings, database, clock, keys, inbox, journey
book) is built by whoever serves it (`cjm serve`, a test) and started and stopped
by the app's lifespan, so one process can hold the API beside its worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import Receive, Scope, Send

from channels.audiences.routes import audiences_router
from channels.email.links import Links
from channels.email.routes import email_router
from channels.offers.routes import offers_router
from engine.api.auth import RequireAdmin
from engine.api.health import health_router
from engine.api.journeys import journeys_router
from engine.api.leads import leads_router
from engine.api.schemas import Problem
from engine.api.tracking import TrackingCors, tracking_components, tracking_router
from engine.clock import Clock
from engine.config import Settings
from engine.dashboard.routes import dashboard_router
from engine.db.database import Database
from engine.ingest.inbox import Inbox
from engine.keys import ApiKeys
from engine.machine.book import JourneyBook


class AppRuntime(Protocol):
    """What the routes use; read-only attributes so frozen dataclasses qualify."""

    @property
    def settings(self) -> Settings: ...

    @property
    def db(self) -> Database: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def keys(self) -> ApiKeys: ...

    @property
    def inbox(self) -> Inbox: ...

    @property
    def book(self) -> JourneyBook: ...

    @property
    def links(self) -> Links: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# Documented on every admin route, so that clients (and schema checks) expect it.
ADMIN_REFUSAL: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or wrong admin key."}
}


class TrackingFirst(FastAPI):
    """The app, with the tracking routes' calls taken in front of FastAPI's own stack.

    A tracking POST is answered by TrackingCors (CORS, then TrackingCalls) before the
    middleware FastAPI wraps every request in (server errors, telemetry, body limits),
    which took about 6% of the CPU of a call to pass through. Everything else,
    the lifespan included, goes through FastAPI as usual. An error in a tracking call
    is then answered 500 by the server, as ServerErrorMiddleware would.
    """

    def __init__(self, runtime: AppRuntime, **settings: Any) -> None:
        super().__init__(**settings)
        self._front = TrackingCors(self._fastapi, runtime=runtime)

    async def _fastapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._front(scope, receive, send)


def create_app(runtime: AppRuntime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    admin_only = [Depends(RequireAdmin(runtime))]
    app = TrackingFirst(
        runtime,
        title="cjm",
        summary="Customer journey maps that run.",
        description="Segment-compatible tracking (write key), the admin API (admin key) and "
        "the public email links (signed tokens).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(tracking_router(runtime))
    for admin_router in (
        journeys_router(runtime),
        leads_router(runtime),
        offers_router(runtime),
        audiences_router(runtime),
    ):
        app.include_router(admin_router, dependencies=admin_only, responses=ADMIN_REFUSAL)
    app.include_router(health_router(runtime))
    app.include_router(email_router(runtime))
    app.include_router(dashboard_router(runtime))

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the tracking schemas, which no route parameter declares."""
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            components = document.setdefault("components", {})
            for section, entries in tracking_components().items():
                components.setdefault(section, {}).update(entries)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
