"""Who may see the dashboard: a browser session opened with the admin key, or the key
itself as a bearer token (scripts).

A session is a cookie sealed with the server's stored link-signing secret under a
purpose of its own, so no email token opens it and no session opens an email link.
It holds its expiry and a fingerprint of the admin key's stored digest: changing the
admin key (`cjm keys rotate admin`, or CJM_ADMIN_KEY) ends every session at once,
with nothing stored per session. HttpOnly keeps it from scripts, SameSite=Strict from
other sites' forms (the only state-changing request is logging out), Path from the
API's routes.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from datetime import timedelta
from typing import TYPE_CHECKING

from fastapi import Request, Response

from channels.email.tokens import BadToken

if TYPE_CHECKING:
    from engine.api.app import AppRuntime

COOKIE = "cjm_session"
COOKIE_PATH = "/dashboard"
PURPOSE = "dashboard-session"
LIFETIME = timedelta(hours=12)
LOGIN = "/dashboard/login"
HOME = "/dashboard"
# Where a login may send the browser on: a dashboard page of this server, never another
# site (`//evil.example`, `/\evil.example`).
_DASHBOARD_PATH = re.compile(r"/dashboard(?:[/?][A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?")


def open_session(runtime: AppRuntime, response: Response, request: Request) -> None:
    """Set the session cookie on `response`: valid for LIFETIME, for this admin key."""
    expires = runtime.clock.now() + LIFETIME
    token = runtime.links.sealer.seal(
        PURPOSE, {"exp": int(expires.timestamp()), "key": runtime.keys.fingerprint("admin")}
    )
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(LIFETIME.total_seconds()),
        path=COOKIE_PATH,
        secure=secure_cookies(request),
        httponly=True,
        samesite="strict",
    )


def close_session(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, secure=secure_cookies(request), httponly=True, samesite="strict"
    )


def has_session(runtime: AppRuntime, request: Request) -> bool:
    """Whether the request carries an unexpired session opened with the current admin key."""
    token = request.cookies.get(COOKIE)
    if not token:
        return False
    try:
        payload = runtime.links.sealer.open(PURPOSE, token)
    except BadToken:
        return False
    expires, key = payload.get("exp"), payload.get("key")
    if not isinstance(expires, int) or not isinstance(key, str):
        return False
    if runtime.clock.now().timestamp() >= expires:
        return False
    return hmac.compare_digest(key, runtime.keys.fingerprint("admin"))


def secure_cookies(request: Request) -> bool:
    """Mark the cookie Secure over HTTPS, and on a loopback host, where browsers keep
    Secure cookies over plain HTTP too; elsewhere over HTTP it would be dropped."""
    if request.url.scheme == "https":
        return True
    host = (request.url.hostname or "").strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def safe_next(value: str | None) -> str:
    """The dashboard page to go to after logging in: the one asked for when it is a
    dashboard page, else the journeys list."""
    if value and _DASHBOARD_PATH.fullmatch(value):
        return value
    return HOME
