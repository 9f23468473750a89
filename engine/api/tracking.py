"""The Segment-compatible tracking routes: /v1/track, page, screen, identify, alias, batch.

The hot path. Each call's raw body is read as it arrives (the size limit is enforced
while reading, and a signature covers the exact bytes), the write key checked, the
messages parsed with `engine.ingest.messages`, and 200 answered only once the inbox
has committed them (`answer_call`). The app answers these POSTs before FastAPI's
routing (TrackingCors, TrackingCalls); the FastAPI routes give the same answers and
document them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
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


class Answer(NamedTuple):
    """What a tracking call is answered: a status and a JSON body, maybe headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


class Refused(Exception):
    """A request answered with an error: raised from wherever the fault is found."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, body)
        self.answer = Answer(status, body, headers)

    @classmethod
    def because(cls, status: int, reason: str, headers: dict[str, str] | None = None) -> Refused:
        return cls(status, {"success": False, "error": reason}, headers)


STORED = Answer(200, {"success": True})


def tracking_router(runtime: AppRuntime) -> APIRouter:
    """The tracking routes as FastAPI knows them, for the OpenAPI document and for an app
    without TrackingCors in front; with it, POSTs are answered before FastAPI's routing
    (TrackingCalls), by the same `answer_call`."""
    router = APIRouter(tags=["tracking"])
    for type_ in MESSAGE_TYPES:
        router.add_api_route(
            f"/v1/{type_}",
            _endpoint(runtime, type_),
            methods=["POST"],
            name=type_,
            summary=f"Record a Segment {type_} call",
            response_model=schemas.Accepted,
            responses=_error_responses(MAX_MESSAGE_BYTES),
            openapi_extra=_request_doc(type_),
        )
    router.add_api_route(
        "/v1/batch",
        _endpoint(runtime, "batch"),
        methods=["POST"],
        name="batch",
        summary="Record several calls; a bad message is rejected alone",
        response_model=schemas.BatchAccepted,
        responses=_error_responses(MAX_BATCH_BYTES),
        openapi_extra=_request_doc("batch"),
    )
    return router


def _endpoint(runtime: AppRuntime, call: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            raw = await read_body(request.headers, request.stream(), body_limit(call))
        except Refused as refused:
            return json_response(*refused.answer)
        return json_response(*await answer_call(runtime, call, request.headers, raw))

    return endpoint


def json_response(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def body_limit(call: str) -> int:
    return MAX_BATCH_BYTES if call == "batch" else MAX_MESSAGE_BYTES


async def answer_call(runtime: AppRuntime, call: str, headers: Headers, raw: bytes) -> Answer:
    """The answer to a tracking call (`call`: a message type, or "batch") whose body is
    `raw`: 200 only once its messages are committed."""
    try:
        payload, call_id = _authorized_payload(raw, headers, runtime)
        if call == "batch":
            return await _store_batch(runtime, payload, call_id)
        try:
            message = parse_message(
                payload, cast(MessageType, call), runtime.clock.now(), call_id=call_id
            )
        except InvalidMessage as error:
            raise Refused.because(400, error.reason) from None
        await _store(runtime, [message])
    except Refused as refused:
        return refused.answer
    return STORED


async def _store_batch(runtime: AppRuntime, payload: object, call_id: str | None) -> Answer:
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
        raise Refused(400, {"success": False, "error": reason, "accepted": 0, "rejected": rejected})
    await _store(runtime, batch.messages)
    return Answer(200, {"success": True, "accepted": len(batch.messages), "rejected": rejected})


def _authorized_payload(
    raw: bytes, headers: Headers, runtime: AppRuntime
) -> tuple[object, str | None]:
    """The parsed body of a caller holding the write key, and the id of a signed call
    (see `signed_call_id`).

    The body is parsed before the key is checked because analytics.js puts the key
    in it; a malformed body is still answered 401, not 400, to a caller without a key.
    """
    try:
        payload = parse_json(raw)
        malformed = None
    except InvalidMessage as error:
        payload, malformed = None, error
    failure = write_key_failure(
        headers,
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
    return payload, signed_call_id(headers, raw)


async def read_body(headers: Headers, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The raw body, refused as soon as it is known to exceed `limit` bytes."""
    too_large = Refused.because(413, f"request body exceeds the {limit // KB} KB limit")
    declared = headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


async def _store(runtime: AppRuntime, messages: list[Message]) -> None:
    try:
        await runtime.inbox.accept(messages)
    except InboxOverloaded:
        # Logged by the inbox once per overload, not once per refused request.
        raise Refused.because(503, "overloaded: retry later", RETRY_AFTER) from None
    except Exception:
        log.exception("tracking: %d messages could not be stored", len(messages))
        raise Refused.because(503, "storage unavailable: retry later", RETRY_AFTER) from None


class TrackingCalls:
    """POSTs to the tracking routes answered straight from ASGI, by `answer_call` as the
    routes would: the hot path skips FastAPI's routing, request and response objects,
    about a third of the CPU a call took. Anything else goes on to `app`."""

    def __init__(self, app: ASGIApp, runtime: AppRuntime) -> None:
        self._app = app
        self._runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        call = scope["path"].removeprefix("/v1/")
        headers = Headers(scope=scope)
        try:
            raw = await read_body(headers, _received(receive), body_limit(call))
        except Refused as refused:
            answer = refused.answer
        else:
            answer = await answer_call(self._runtime, call, headers, raw)
        body = orjson.dumps(answer.body)
        fields = [
            *(
                (name.lower().encode(), value.encode())
                for name, value in (answer.headers or {}).items()
            ),
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
        ]
        await send({"type": "http.response.start", "status": answer.status, "headers": fields})
        await send({"type": "http.response.body", "body": body})


async def _received(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks as the server hands them over (as Starlette's request
    stream gives them)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


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
    """The tracking routes: CORS, since websites post to them from any origin, and
    their POSTs answered by TrackingCalls.

    The admin routes get no CORS headers, so a web page elsewhere cannot use an
    admin key a browser may hold.
    """

    def __init__(self, app: ASGIApp, runtime: AppRuntime) -> None:
        self._app = app
        self._cors = CORSMiddleware(
            TrackingCalls(app, runtime),
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
