"""Signed tokens for the public email links: open pixel, click redirect, unsubscribe.

Those endpoints take no key, so everything they act on comes from the token, and the
token must be impossible to forge or alter: otherwise anyone could unsubscribe other
people, inflate opens, or turn the click redirect into an open redirect. A token is
`base64url(compact JSON) "." base64url(HMAC-SHA256(secret, purpose "." body))`, the MAC
truncated to 128 bits (still far beyond guessing, and links stay short).

The purpose is inside the MAC, so a token minted for one endpoint is refused by the
others. Tokens never expire: an unsubscribe link must keep working for as long as the
email sits in an inbox, and so should its links.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping

import orjson

MAC_BYTES = 16
MAX_TOKEN_LENGTH = 2048  # refused before any decoding: no work for an attacker's megabytes
MIN_SECRET_BYTES = 16
# base64.urlsafe_b64decode silently drops characters outside its alphabet, so the
# alphabet is checked first: one token, one spelling.
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")

Payload = dict[str, str | int]


class BadToken(Exception):
    """A token that was forged, altered, truncated, minted for another purpose, or garbage.

    Deliberately says nothing about which: the endpoints answer all of them alike.
    """


class Sealer:
    """Seals small payloads into URL-safe tokens and opens them again."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the token secret needs at least {MIN_SECRET_BYTES} bytes")
        # Keyed once: each seal copies it rather than hashing the key again.
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def seal(self, purpose: str, payload: Mapping[str, str | int]) -> str:
        body = _encode(orjson.dumps(dict(payload), option=orjson.OPT_SORT_KEYS))
        return f"{body}.{self._sign(purpose, body)}"

    def open(self, purpose: str, token: str) -> Payload:
        """The payload sealed in `token` for `purpose`, or BadToken."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise BadToken("token too long")
        body, dot, signature = token.partition(".")
        if not dot or not _BASE64URL.fullmatch(body) or not _BASE64URL.fullmatch(signature):
            raise BadToken("malformed token")
        # Compared as text, not as decoded bytes: a second spelling of the same MAC
        # (different unused trailing bits) is refused too.
        if not hmac.compare_digest(signature, self._sign(purpose, body)):
            raise BadToken("bad signature")
        try:
            payload = json.loads(_decode(body))
        except (binascii.Error, UnicodeDecodeError, ValueError) as error:
            raise BadToken("undecodable payload") from error
        if not isinstance(payload, dict) or not all(
            isinstance(value, str | int) for value in payload.values()
        ):
            raise BadToken("unexpected payload")
        return payload

    def _sign(self, purpose: str, body: str) -> str:
        mac = self._mac.copy()
        mac.update(f"{purpose}.{body}".encode())
        return _encode(mac.digest()[:MAC_BYTES])


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
