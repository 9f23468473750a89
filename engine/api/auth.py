"""Who may call: the write key for tracking, the admin key for everything else.

Tracking clients prove the write key in one of three ways, the first present
deciding: HTTP Basic (Segment's server libraries), a signature of the raw body
(server-to-server calls that should not carry the key itself), or a `writeKey`
field in the body (analytics.js, which cannot always set headers).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

from fastapi import HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers

from engine.keys import ApiKeys

if TYPE_CHECKING:
    from engine.api.app import AppRuntime

SIGNATURE_HEADER = "X-CJM-Signature"
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
MAX_SIGNATURE_SKEW_S = 300
WRITE_CHALLENGE = {"WWW-Authenticate": 'Basic realm="cjm"'}
ADMIN_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="cjm"'}

ADMIN_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="adminKey",
    description="The admin key: `Authorization: Bearer <admin key>`.",
)


def write_key_failure(
    headers: Headers,
    raw_body: bytes,
    body_write_key: object,
    *,
    keys: ApiKeys,
    signing_secret: str | None,
    now: datetime,
) -> str | None:
    """Why the caller has not shown the write key, or None when it has."""
    authorization = headers.get("authorization")
    if authorization is not None:
        return _basic_failure(authorization, keys)
    signature = headers.get(SIGNATURE_HEADER)
    if signature is not None:
        return signature_failure(signature, raw_body, signing_secret, now)
    if isinstance(body_write_key, str) and body_write_key:
        return None if keys.is_write_key(body_write_key) else "invalid write key"
    return "missing write key: send HTTP Basic with the write key as user name"


def signed_call_id(headers: Headers, raw_body: bytes) -> str | None:
    """For a call that `write_key_failure` let in by its signature: an id that every
    replay of it shares (the signed time and body are the same), or None for a call let
    in otherwise. Its messages that carry no `messageId` take theirs from it, so a
    replay inside the allowed skew is deduplicated as a client's retry is."""
    header = headers.get(SIGNATURE_HEADER)
    if header is None or headers.get("authorization") is not None:
        return None
    fields = [part.strip().partition("=") for part in header.split(",")]
    sent_at = next((value for name, _, value in fields if name == "t"), "")
    return "sig-" + hashlib.sha256(sent_at.encode() + b"." + raw_body).hexdigest()[:32]


def _basic_failure(authorization: str, keys: ApiKeys) -> str | None:
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return "use HTTP Basic with the write key as user name and an empty password"
    try:
        user, _, _password = (
            base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        )
    except (binascii.Error, UnicodeDecodeError):
        return "malformed HTTP Basic credentials"
    return None if keys.is_write_key(user) else "invalid write key"


def signature_failure(
    header: str, raw_body: bytes, signing_secret: str | None, now: datetime
) -> str | None:
    """Check `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.

    The time is signed with the body so a captured request cannot be replayed
    beyond the allowed skew; several `v1` are accepted so a secret can be rotated.
    """
    if signing_secret is None:
        return "signed requests are not enabled here: send the write key"
    fields = [part.strip().partition("=") for part in header.split(",")]
    sent_at = next((value for name, _, value in fields if name == "t"), "")
    signatures = [value for name, _, value in fields if name == "v1"]
    if not _UNIX_SECONDS.fullmatch(sent_at) or not signatures:
        return f"malformed {SIGNATURE_HEADER}: expected t=<unix seconds>,v1=<hex HMAC-SHA256>"
    if abs(now.timestamp() - int(sent_at)) > MAX_SIGNATURE_SKEW_S:
        return f"signature time is more than {MAX_SIGNATURE_SKEW_S} s from the server's clock"
    expected = hmac.new(
        signing_secret.encode(), sent_at.encode() + b"." + raw_body, hashlib.sha256
    ).hexdigest()
    for signature in signatures:
        if hmac.compare_digest(expected.encode(), signature.encode("latin-1")):
            return None
    return "signature does not match the body"


class RequireAdmin:
    """A route dependency: the caller must hold the admin key (declared for OpenAPI).

    The keys are read from the runtime at each call: a runtime may load them only
    when it starts, after the app was built.
    """

    def __init__(self, runtime: AppRuntime) -> None:
        self._runtime = runtime

    async def __call__(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_BEARER)]
    ) -> None:
        if credentials is None:
            raise HTTPException(
                401, "missing admin key: send Authorization: Bearer <admin key>", ADMIN_CHALLENGE
            )
        if not self._runtime.keys.is_admin_key(credentials.credentials):
            raise HTTPException(401, "invalid admin key", ADMIN_CHALLENGE)
