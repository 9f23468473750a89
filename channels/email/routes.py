"""The public email endpoints: open pixel, click redirect, one-click unsubscribe.

They take no key: the signed token in the path is the whole authorisation, and
everything they act on (the email, the lead, a click's destination) comes from it.
Each request writes in one transaction, and what it records is an internal event
keyed by the fact, so mail scanners and impatient readers can repeat any request.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Response
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from channels.audiences.store import remove_lead
from channels.email.links import CLICK, OPEN, UNSUBSCRIBE
from channels.email.sequences import stop_lead_runs
from channels.email.tokens import BadToken
from engine.db.queries import select_survivors, upsert
from engine.db.schema import emails, leads, suppressions
from engine.ingest.internal import emit
from engine.kpis.rollup import bump_email, day_of

if TYPE_CHECKING:
    from engine.api.app import AppRuntime

# The smallest transparent GIF: 1x1, one transparent colour.
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
# Every answer is personal to one email: never cached, never indexed, and no Referer
# carries a token to the next site.
PRIVATE = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
}
# The pages load nothing from anywhere: no tracking of the reader, nothing to break.
PAGE_HEADERS = {
    **PRIVATE,
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}
REDIRECT_SCHEMES = frozenset({"http", "https"})

STYLE = "body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}"
CONFIRM_BODY = """\
<h1>Unsubscribe?</h1>
<p>You will no longer receive these emails.</p>
<form method="post">
<button type="submit" name="List-Unsubscribe" value="One-Click">Unsubscribe</button>
</form>"""
DONE_BODY = "<h1>You are unsubscribed</h1>\n<p>You will not receive these emails again.</p>"
NOT_FOUND_BODY = "<h1>Link not found</h1>\n<p>This link is not valid.</p>"


@dataclass(frozen=True)
class Sealed:
    """What a valid token names."""

    email_id: int
    lead_id: int
    url: str | None = None


def email_router(runtime: AppRuntime) -> APIRouter:
    router = APIRouter(tags=["email"])

    def unseal(purpose: str, token: str) -> Sealed:
        # runtime.links is read per request: the runtime loads it when it starts.
        payload = runtime.links.sealer.open(purpose, token)
        email_id, lead_id, url = payload.get("email"), payload.get("lead"), payload.get("url")
        if not isinstance(email_id, int) or not isinstance(lead_id, int):
            raise BadToken("unexpected payload")
        if purpose == CLICK and not isinstance(url, str):
            raise BadToken("unexpected payload")
        return Sealed(email_id, lead_id, url if isinstance(url, str) else None)

    @router.get(
        "/e/open/{token}",
        summary="Open pixel: a 1x1 GIF that records the first open",
        response_class=Response,
        responses={200: {"content": {"image/gif": {}}}},
    )
    async def opened(token: str) -> Response:
        """Answers the same GIF whatever the token: an image request is no place to
        tell a scanner which tokens are valid."""
        try:
            sealed = unseal(OPEN, token)
        except BadToken:
            return _pixel()
        async with runtime.db.write() as connection:
            email = await _email(connection, sealed.email_id)
            if await _lead_exists(connection, sealed.lead_id):
                await _count_first(connection, sealed.email_id, "opened", runtime.clock.now())
                properties: dict[str, Any] = {"email": sealed.email_id}
                if email is not None:
                    properties["template"] = email.template
                await emit(
                    connection,
                    lead_id=sealed.lead_id,
                    name="email.opened",
                    properties=properties,
                    at=runtime.clock.now(),
                    key=f"email.opened:{sealed.email_id}",
                )
        return _pixel()

    @router.get(
        "/e/click/{token}",
        summary="Tracked link: redirects to the URL sealed in the token",
        response_class=Response,
        responses={302: {"description": "To the sealed URL"}, 404: {}, 400: {}},
    )
    async def clicked(token: str) -> Response:
        """Redirects only where the token says, so the endpoint is no open redirect."""
        try:
            sealed = unseal(CLICK, token)
        except BadToken:
            return _page(404, "Link not found", NOT_FOUND_BODY)
        assert sealed.url is not None
        if not _redirectable(sealed.url):
            return _page(400, "Link not usable", "<h1>This link cannot be followed</h1>")
        digest = hashlib.sha256(sealed.url.encode()).hexdigest()[:16]
        async with runtime.db.write() as connection:
            if await _lead_exists(connection, sealed.lead_id):
                await _count_first(connection, sealed.email_id, "clicked", runtime.clock.now())
                await emit(
                    connection,
                    lead_id=sealed.lead_id,
                    name="email.clicked",
                    properties={"email": sealed.email_id, "url": sealed.url},
                    at=runtime.clock.now(),
                    key=f"email.clicked:{sealed.email_id}:{digest}",
                )
        return Response(status_code=302, headers={**PRIVATE, "Location": sealed.url})

    @router.get(
        "/e/unsubscribe/{token}",
        summary="Unsubscribe confirmation page; changes nothing",
        response_class=Response,
        responses={200: {"content": {"text/html": {}}}, 404: {}},
    )
    async def confirm(token: str) -> Response:
        """Only asks: mail scanners follow every GET, and must not unsubscribe anyone
        (RFC 8058). The page's button POSTs back to this same URL."""
        try:
            unseal(UNSUBSCRIBE, token)
        except BadToken:
            return _page(404, "Link not found", NOT_FOUND_BODY)
        return _page(200, "Unsubscribe", CONFIRM_BODY)

    @router.post(
        "/e/unsubscribe/{token}",
        summary="One-click unsubscribe (RFC 8058): suppresses the address at once",
        response_class=Response,
        responses={200: {"content": {"text/html": {}}}, 404: {}},
    )
    async def unsubscribe(token: str) -> Response:
        """Any POST unsubscribes, whatever its body: scanners do not POST, and mail
        clients send `List-Unsubscribe=One-Click` in more than one encoding."""
        try:
            sealed = unseal(UNSUBSCRIBE, token)
        except BadToken:
            return _page(404, "Link not found", NOT_FOUND_BODY)
        now = runtime.clock.now()
        async with runtime.db.write() as connection:
            lead = (await select_survivors(connection, [sealed.lead_id])).get(sealed.lead_id)
            if lead is not None:
                # The rest of every nurture sequence of the lead, in every journey, and
                # its ads: an unsubscribed person leaves the retargeting audiences too.
                await stop_lead_runs(connection, [lead.id], "unsubscribed", now)
                await remove_lead(connection, lead.id, now)
            email = await _email(connection, sealed.email_id)
            address = email.to_address if email is not None else None
            address = address or (lead.email if lead is not None else None)
            if address:
                row = {
                    "email": address.lower(),
                    "reason": "unsubscribed",
                    "lead_id": sealed.lead_id,
                    "created_at": now,
                }
                await connection.execute(
                    upsert(connection, suppressions).on_conflict_do_nothing(), [row]
                )
            if await _lead_exists(connection, sealed.lead_id):
                await _count_first(connection, sealed.email_id, "unsubscribed", now)
                await emit(
                    connection,
                    lead_id=sealed.lead_id,
                    name="email.unsubscribed",
                    properties={"email": sealed.email_id},
                    at=now,
                    key=f"email.unsubscribed:{sealed.lead_id}:{sealed.email_id}",
                )
        return _page(200, "Unsubscribed", DONE_BODY)

    return router


def _redirectable(url: str) -> bool:
    """An absolute http(s) URL that can go in a header as it is."""
    if not url.isprintable() or not url.isascii() or " " in url:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in REDIRECT_SCHEMES and bool(parts.netloc)


async def _email(connection: AsyncConnection, email_id: int) -> Any:
    query = select(emails.c.template, emails.c.to_address).where(emails.c.id == email_id)
    return (await connection.execute(query)).first()


async def _count_first(
    connection: AsyncConnection, email_id: int, what: str, now: datetime
) -> None:
    """Record the email's first open, click or unsubscribe, and count it in the KPIs of
    the day it was sent: a reader who comes back is not counted again."""
    column = emails.c[f"{what}_at"]
    first = (
        await connection.execute(
            update(emails)
            .where(emails.c.id == email_id, column.is_(None), emails.c.sent_at.is_not(None))
            .values({column: now})
            .returning(emails.c.journey_id, emails.c.template, emails.c.sent_at)
        )
    ).first()
    if first is not None:
        await bump_email(connection, first.journey_id, day_of(first.sent_at), first.template, what)


async def _lead_exists(connection: AsyncConnection, lead_id: int) -> bool:
    """Events are recorded only for a lead that exists (one for an unknown lead would
    wait in the inbox forever) and was not erased (its old emails' links must not bring
    new data about the person back)."""
    found = await connection.scalar(
        select(leads.c.id).where(leads.c.id == lead_id, leads.c.erased_at.is_(None))
    )
    return found is not None


def _pixel() -> Response:
    return Response(PIXEL, media_type="image/gif", headers=PRIVATE)


def _page(status: int, title: str, body: str) -> Response:
    """A small self-contained HTML page; its parts are constants, so nothing needs escaping."""
    html = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{title}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
    return Response(html, status, headers=PAGE_HEADERS, media_type="text/html")
