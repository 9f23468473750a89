"""Lead data, audience exports, KPIs and the dashboard are the admin's alone: every
route of the app that is not public by design refuses a caller without the admin key,
including one holding the write key. The routes are read from the app itself, so a
route added later is checked without anyone remembering to list it here."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from starlette.routing import BaseRoute

from engine.api.app import create_app
from engine.config import Settings
from engine.dashboard.session import HOME
from engine.db.schema import leads
from engine.runtime import Runtime as EngineRuntime
from tests.api.conftest import ADMIN_KEY, WRITE_KEY, Runtime
from tests.api.test_leads import add_lead

# Public by design (SPEC section 4): tracking takes the write key, email links carry
# their own signed tokens, health and metrics hold no personal data, the documents
# describe the API, and the dashboard's login and logout are how the admin key gets in.
PUBLIC = re.compile(
    r"^(/v1/(track|page|screen|identify|alias|batch)|/e/(open|click|unsubscribe)/\{token\}"
    r"|/healthz|/metrics|/openapi\.json|/docs|/docs/oauth2-redirect|/redoc"
    r"|/dashboard/(login|logout))$"
)
ADMIN_ONLY_EXAMPLES = {
    ("GET", "/v1/leads"),
    ("GET", "/v1/leads/{lead_id}"),
    ("DELETE", "/v1/leads/{lead_id}"),
    ("GET", "/v1/audiences"),
    ("GET", "/v1/audiences/{name}/export"),
    ("GET", "/dashboard/leads/{lead_id}"),
}
BASIC_WRITE_KEY = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
PATH_VALUES = {"lead_id": "1", "journey_id": "doors", "stage_id": "first_contact"}
NOT_THE_ADMIN: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "no key": ({}, {}),
    "the write key as HTTP Basic": ({"Authorization": f"Basic {BASIC_WRITE_KEY}"}, {}),
    "the write key as a bearer token": ({"Authorization": f"Bearer {WRITE_KEY}"}, {}),
    "a wrong admin key": ({"Authorization": f"Bearer {ADMIN_KEY}x"}, {}),
    "the admin key in the query": ({}, {"key": ADMIN_KEY, "admin_key": ADMIN_KEY}),
}


def served(routes: Iterable[BaseRoute | Any]) -> Iterator[tuple[str, str]]:
    """(method, path) of every route the app answers. FastAPI keeps an included router
    whole and resolves its routes per request, so those are walked too."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:
            yield from served(contexts())
            continue
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                yield method, route.path


def admin_only_routes() -> list[tuple[str, str]]:
    app = create_app(EngineRuntime(Settings()))  # building the routes does no I/O
    return sorted({(m, p) for m, p in served(app.routes) if not PUBLIC.match(p)})


ROUTES = [pytest.param(method, path, id=f"{method} {path}") for method, path in admin_only_routes()]


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    """SQLite only: the guard answers before any query, whatever the database."""
    return sqlite_database_url


def test_the_routes_checked_include_every_kind_of_personal_data() -> None:
    assert set(admin_only_routes()) >= ADMIN_ONLY_EXAMPLES


def url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda name: PATH_VALUES.get(name.group(1), "x"), path)


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_a_caller_without_the_admin_key_is_refused(
    client: httpx.AsyncClient, runtime: Runtime, method: str, path: str
) -> None:
    await add_lead(runtime.db, email="ada@example.com")  # lead 1: what a leak would show
    for caller, (headers, params) in NOT_THE_ADMIN.items():
        answer = await client.request(method, url(path), headers=headers, params=params)
        if path.startswith("/dashboard") and "Authorization" not in headers:
            # A browser without a session is sent to log in, and is shown nothing.
            assert answer.status_code == 303, caller
            assert answer.headers["location"].startswith("/dashboard/login"), caller
        else:
            assert answer.status_code in (401, 403), caller
        assert "ada@example.com" not in answer.text


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_the_admin_key_gets_past_the_guard(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    answer = await client.request(
        method, url(path), headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )

    assert answer.status_code not in (303, 401, 403)
    assert answer.status_code < 500


@pytest.mark.parametrize(
    "asked",
    [
        "https://evil.example/dashboard",
        "//evil.example/dashboard",
        "/\\evil.example",
        "/dashboard@evil.example",
        "javascript:alert(1)//dashboard",
        "/dashboard\r\nSet-Cookie: stolen=1",
    ],
)
async def test_logging_in_never_redirects_off_the_dashboard(
    client: httpx.AsyncClient, asked: str
) -> None:
    answer = await client.post("/dashboard/login", data={"key": ADMIN_KEY, "next": asked})

    assert answer.status_code == 303
    assert answer.headers["location"] == HOME  # where a next that is not a dashboard page leads
    assert "stolen" not in answer.headers.get("set-cookie", "")


async def test_dashboard_pages_show_markup_from_urls_and_leads_as_text(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    script = "<script>alert(1)</script>"
    lead_id = await add_lead(runtime.db, email="ada@example.com")
    async with runtime.db.write() as connection:
        await connection.execute(
            update(leads).where(leads.c.id == lead_id).values(traits={"first_name": script})
        )
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    pages = [
        await client.get(f"/dashboard/journeys/{script}", headers=admin),
        await client.get(f"/dashboard/journeys/doors/stages/{script}", headers=admin),
        await client.get("/dashboard/journeys/doors", params={"from": script}, headers=admin),
        await client.get(f"/dashboard/leads/{lead_id}", headers=admin),
    ]

    assert [page.status_code for page in pages] == [404, 404, 400, 200]
    for page in pages:
        assert script not in page.text
    assert "&lt;script&gt;" in pages[3].text
