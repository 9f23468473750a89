"""The dashboard: journeys, each drawn as its map with its figures, the leads in a stage.

Server-rendered pages with inline styles and inline SVG: no script, nothing fetched from
elsewhere, no build step. A browser logs in with the admin key once (a session cookie,
see `session.py`); a script sends the key as a bearer token instead.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as FastApiPath
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from channels.audiences.store import audience_sizes
from engine.api.auth import ADMIN_CHALLENGE
from engine.api.leads import lead_detail, select_identities
from engine.dashboard.map import lay_out
from engine.dashboard.pages import map_svg, render
from engine.dashboard.queries import (
    count_leads_in_stage,
    select_leads_in_stage,
    select_recent_emails,
)
from engine.dashboard.session import (
    HOME,
    LOGIN,
    close_session,
    has_session,
    open_session,
    safe_next,
)
from engine.db.queries import select_survivors
from engine.ingest.identity import USER
from engine.journey.model import Journey
from engine.kpis.report import Period, read_kpis

if TYPE_CHECKING:
    from engine.api.app import AppRuntime

RECENT_EMAILS = 20
STAGE_LEADS = 200
# A login form is a key and a page address: anything longer is not one.
MAX_FORM_BYTES = 4096
# Pages hold only inline styles and inline SVG: a policy that allows nothing else keeps an
# injected tag from loading or running anything, should escaping ever miss one.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class RequireViewer:
    """A route dependency: a session cookie, or the admin key as a bearer token.

    A browser without a session is sent to the login page (303); a wrong bearer token is
    a 401, as on the admin API, so that a script learns its key is wrong.
    """

    def __init__(self, runtime: AppRuntime) -> None:
        self._runtime = runtime

    async def __call__(self, request: Request) -> None:
        authorization = request.headers.get("authorization")
        if authorization is not None:
            scheme, _, key = authorization.partition(" ")
            if scheme.lower() == "bearer" and self._runtime.keys.is_admin_key(key.strip()):
                return
            raise HTTPException(401, "invalid admin key", ADMIN_CHALLENGE)
        if has_session(self._runtime, request):
            return
        asked = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise HTTPException(303, "log in first", {"Location": f"{LOGIN}?next={quote(asked)}"})


def dashboard_router(runtime: AppRuntime) -> APIRouter:
    router = APIRouter(prefix="/dashboard", include_in_schema=False)
    viewer = [Depends(RequireViewer(runtime))]

    @router.get("/login")
    async def login_form(
        asked: Annotated[str | None, Query(alias="next", max_length=2000)] = None,
    ) -> HTMLResponse:
        return _page("login.html", next=safe_next(asked), error=None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await _read_form(request)
        key = form.get("key", "").strip()
        goal = safe_next(form.get("next"))
        if not key or not runtime.keys.is_admin_key(key):
            return _page("login.html", 401, next=goal, error="That is not the admin key.")
        response = RedirectResponse(goal, status_code=303)
        open_session(runtime, response, request)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        response = RedirectResponse(LOGIN, status_code=303)
        close_session(response, request)
        return response

    @router.get("", dependencies=viewer)
    async def journeys() -> HTMLResponse:
        book = runtime.book
        rows = [
            {
                "journey": journey,
                "retired": journey.id in book.retired,
                "totals": (await read_kpis(runtime.db, journey, Period())).totals,
            }
            for journey in book.current.values()
        ]
        return _page("journeys.html", rows=rows)

    @router.get("/journeys/{journey_id}", dependencies=viewer)
    async def journey_page(request: Request, journey_id: str) -> HTMLResponse:
        journey = runtime.book.current.get(journey_id)
        if journey is None:
            return _problem(404, "No such journey", f"No journey has the id {journey_id!r}.")
        try:
            period = _period(request.query_params.get("from"), request.query_params.get("to"))
        except ValueError as error:
            return _problem(400, "Not a period", str(error))
        report = (await read_kpis(runtime.db, journey, period)).model_dump(mode="json")
        drawn = lay_out(journey, report)
        async with runtime.db.read() as connection:
            sizes = await audience_sizes(connection)
            recent = await select_recent_emails(connection, journey.id, RECENT_EMAILS)
        return _page(
            "journey.html",
            journey=journey,
            period=period,
            journey_map=drawn,
            svg=map_svg(drawn, stage_links=f"{HOME}/journeys/{journey.id}/stages/"),
            audience_sizes=sizes,
            offers=_offer_rows(journey, report["offers"]),
            templates=_template_rows(journey, report["emails"]),
            recent_emails=recent,
        )

    @router.get("/journeys/{journey_id}/stages/{stage_id}", dependencies=viewer)
    async def stage_page(journey_id: str, stage_id: str) -> HTMLResponse:
        journey = runtime.book.current.get(journey_id)
        stage = journey.stage_by_id.get(stage_id) if journey is not None else None
        if journey is None or stage is None:
            return _problem(
                404, "No such stage", f"No journey {journey_id!r} with a stage {stage_id!r}."
            )
        async with runtime.db.read() as connection:
            found = await select_leads_in_stage(connection, journey.id, stage.id, STAGE_LEADS)
            total = await count_leads_in_stage(connection, journey.id, stage.id)
            ids_of = await select_identities(connection, [row.lead_id for row in found])
        rows = []
        for row in found:
            user_ids = [identity.value for identity in ids_of[row.lead_id] if identity.kind == USER]
            # The newest user id, as the admin API names a lead.
            rows.append({**row._asdict(), "user_id": user_ids[-1] if user_ids else None})
        return _page("stage.html", journey=journey, stage=stage, leads=rows, total=total)

    @router.get("/leads/{lead_id}", dependencies=viewer)
    async def lead_page(lead_id: Annotated[int, FastApiPath(ge=1, le=2**63 - 1)]) -> HTMLResponse:
        async with runtime.db.read() as connection:
            lead = (await select_survivors(connection, [lead_id])).get(lead_id)
            if lead is None:
                return _problem(404, "No such lead", f"No lead has the id {lead_id}.")
            detail = await lead_detail(connection, lead, runtime.book)
        return _page("lead.html", lead=detail, document=detail.model_dump_json(indent=2))

    return router


def _page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(render(template, **context), status_code=status, headers=PAGE_HEADERS)


def _problem(status: int, title: str, message: str) -> HTMLResponse:
    return _page("problem.html", status, title=title, message=message)


def _period(start: str | None, end: str | None) -> Period:
    """The period of the `from` and `to` fields, whole UTC days; an empty field leaves
    that end open. ValueError says what is wrong."""
    try:
        period = Period(
            start=date.fromisoformat(start) if start else None,
            end=date.fromisoformat(end) if end else None,
        )
    except ValueError:
        raise ValueError("Write the days of the period as YYYY-MM-DD.") from None
    if period.start is not None and period.end is not None and period.start > period.end:
        raise ValueError("The period ends before it starts.")
    return period


def _offer_rows(journey: Journey, figures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every offer of the journey, granted yet or not, and any an older version granted."""
    by_name = {row["offer"]: row for row in figures}
    zero = {"granted": 0, "redeemed": 0, "expired": 0, "refused": 0}
    rows = []
    for name in [*journey.offers, *sorted(by_name.keys() - journey.offers.keys())]:
        offer = journey.offers.get(name)
        title = offer.title if offer is not None else "—"
        rows.append({**zero, **by_name.get(name, {}), "offer": name, "title": title})
    return rows


def _template_rows(journey: Journey, figures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every template the journey sends, sent yet or not, and any an older version sent."""
    by_name = {row["template"]: row for row in figures}
    zero = {"sent": 0, "opened": 0, "clicked": 0, "unsubscribed": 0, "bounced": 0}
    return [
        {**zero, **by_name.get(name, {}), "template": name}
        for name in sorted(journey.templates | by_name.keys())
    ]


async def _read_form(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (the first value of each); a body larger than any login
    form is refused before it is read whole."""
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise HTTPException(415, "send the login form (application/x-www-form-urlencoded)")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "the form is too large")
    try:
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    except ValueError:
        raise HTTPException(400, "too many form fields") from None
    return {name: values[0] for name, values in fields.items()}
