"""The Segment-compatible tracking routes: /v1/track, page, screen, identify, alias, batch.

The hot path. Each route reads the raw body itself (the size limit is enforced
while reading, and a signature covers the exact bytes), checks the write key,
parses with `engine.ingest.messages`, and answers 200 only once the inbox has
committed the messages.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.api import schemas
from engine.api.auth import (
    SIGNATURE_HEADER,
    WRITE_CHALLENGE,
    signed_call_id,
    write_key_failure,
)
from engine.ingest.inbox import InboxOverloaded
from engine.ingest.messages import (
    KB,
    MAX_BATCH_BYTES,
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    InvalidMessage,
    Message,
    MessageType,
    parse_batch,
    parse_json,
    parse_message,
)

if TYPE_CHECKING:
    from engine.api.app import AppRuntime

log = logging.getLogger(__name__)

CALL_MODELS: dict[str, type[BaseModel]] = {
    "track": schemas.TrackCall,
    "page": schemas.PageCall,
    "screen": schemas.ScreenCall,
    "identify": schemas.IdentifyCall,
    "alias": schemas.AliasCall,
    "batch": schemas.BatchCall,
}
TRACKING_PATHS = frozenset(f"/v1/{call}" for call in CALL_MODELS)
RETRY_AFTER = {"Retry-After": "1"}


class Refused(Exception):
    """A request answered with an error: raised from wherever the fault is found."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = headers

    @classmethod
    def because(cls, status: int, reason: str, headers: dict[str, str] | None = None) -> Refused:
        return cls(status, {"success": False, "error": reason}, headers)

    def response(self) -> Response:
        return json_response(self.status, self.body, self.headers)


def json_response(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def tracking_router(runtime: AppRuntime) -> APIRouter:
    router = APIRouter(tags=["tracking"])
    for type_ in MESSAGE_TYPES:
        router.add_api_route(
            f"/v1/{type_}",
            _single_endpoint(runtime, type_),
            methods=["POST"],
            name=type_,
            summary=f"Record a Segment {type_} call",
            response_model=schemas.Accepted,
            responses=_error_responses(MAX_MESSAGE_BYTES),
            openapi_extra=_request_doc(type_),
        )
    router.add_api_route(
        "/v1/batch",
        _batch_endpoint(runtime),
        methods=["POST"],
        name="batch",
        summary="Record several calls; a bad message is rejected alone",
        response_model=schemas.BatchAccepted,
        responses=_error_responses(MAX_BATCH_BYTES),
        openapi_extra=_request_doc("batch"),
    )
    return router


def _single_endpoint(
    runtime: AppRuntime, type_: MessageType
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            payload, call_id = await _authorized_payload(request, runtime, MAX_MESSAGE_BYTES)
            try:
                message = parse_message(payload, type_, runtime.clock.now(), call_id=call_id)
            except InvalidMessage as error:
                raise Refused.because(400, error.reason) from None
            await _store(runtime, [message])
        except Refused as refused:
            return refused.response()
        return json_response(200, {"success": True})

    return endpoint


def _batch_endpoint(runtime: AppRuntime) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            payload, call_id = await _authorized_payload(request, runtime, MAX_BATCH_BYTES)
            try:
                batch = parse_batch(payload, runtime.clock.now(), call_id=call_id)
            except InvalidMessage as error:
                raise Refused.because(400, error.reason) from None
            rejected = [
                {"index": item.index, "messageId": item.message_id, "error": item.error}
                for item in batch.rejected
            ]
            if not batch.messages:
                reason = "every message of the batch was rejected"
                body = {"success": False, "error": reason, "accepted": 0, "rejected": rejected}
                raise Refused(400, body)
            await _store(runtime, batch.messages)
        except Refused as refused:
            return refused.response()
        answer = {"success": True, "accepted": len(batch.messages), "rejected": rejected}
        return json_response(200, answer)

    return endpoint


async def _authorized_payload(
    request: Request, runtime: AppRuntime, limit: int
) -> tuple[object, str | None]:
    """The parsed body of a caller holding the write key, and the id of a signed call
    (see `signed_call_id`).

    The body is parsed before the key is checked because analytics.js puts the key
    in it; a malformed body is still answered 401, not 400, to a caller without a key.
    """
    raw = await read_body(request, limit)
    try:
        payload = parse_json(raw)
        malformed = None
    except InvalidMessage as error:
        payload, malformed = None, error
    failure = write_key_failure(
        request.headers,
        raw,
        payload.get("writeKey") if isinstance(payload, dict) else None,
        keys=runtime.keys,
        signing_secret=runtime.settings.signing_secret,
        now=runtime.clock.now(),
    )
    if failure is not None:
        raise Refused.because(401, failure, WRITE_CHALLENGE)
    if malformed is not None:
        raise Refused.because(400, malformed.reason)
    return payload, signed_call_id(request.headers, raw)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused as soon as it is known to exceed `limit` bytes."""
    too_large = Refused.because(413, f"request body exceeds the {limit // KB} KB limit")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _store(runtime: AppRuntime, messages: list[Message]) -> None:
    try:
        await runtime.inbox.accept(messages)
    except InboxOverloaded:
        # Logged by the inbox once per overload, not once per refused request.
        raise Refused.because(503, "overloaded: retry later", RETRY_AFTER) from None
    except Exception:
        log.exception("tracking: %d messages could not be stored", len(messages))
        raise Refused.because(503, "storage unavailable: retry later", RETRY_AFTER) from None


# --- documentation and browsers ------------------------------------------------------------------


def _error_responses(limit: int) -> dict[int | str, dict[str, Any]]:
    def error(description: str) -> dict[str, Any]:
        return {"model": schemas.TrackingError, "description": description}

    return {
        400: error(
            "Malformed JSON, a missing id or a field of the wrong type: `error` says which."
        ),
        401: error("Missing or wrong write key or signature."),
        413: error(f"The body is larger than {limit // KB} KB."),
        503: error(
            "The messages could not be stored, or the server is overloaded: none was "
            "stored; retry after `Retry-After` seconds."
        ),
    }


def _request_doc(call: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{CALL_MODELS[call].__name__}"}
                }
            },
        },
        "security": [{"writeKey": []}, {"signature": []}],
    }


def tracking_components() -> dict[str, dict[str, Any]]:
    """The request schemas and security schemes the tracking routes refer to."""
    _, definitions = models_json_schema(
        [(model, "validation") for model in CALL_MODELS.values()],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "schemas": definitions["$defs"],
        "securitySchemes": {
            "writeKey": {
                "type": "http",
                "scheme": "basic",
                "description": "The write key as user name, an empty password. "
                "A `writeKey` field in the body is accepted too.",
            },
            "signature": {
                "type": "apiKey",
                "in": "header",
                "name": SIGNATURE_HEADER,
                "description": 't=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>,'
                " when CJM_SIGNING_SECRET is set; at most 300 s of skew.",
            },
        },
    }


class TrackingCors:
    """CORS for the tracking routes only: websites post to them from any origin.

    The admin routes get no CORS headers, so a web page elsewhere cannot use an
    admin key a browser may hold.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._cors = CORSMiddleware(
            app,
            allow_origins=["*"],
            allow_methods=["POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", SIGNATURE_HEADER],
            max_age=86_400,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in TRACKING_PATHS:
            await self._cors(scope, receive, send)
        else:
            await self._app(scope, receive, send)
