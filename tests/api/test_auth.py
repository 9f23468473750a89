"""Who may call: the write key (Basic, signature or body) for tracking, the admin key for admin."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
from datetime import timedelta

import httpx
import orjson
import pytest

from tests.api.conftest import ADMIN, NOW, SIGNING_SECRET, WRITE, WRITE_KEY, Runtime

TRACK = orjson.dumps({"userId": "u1", "event": "x"})


def signed(body: bytes, *, at: int, secret: str = SIGNING_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-CJM-Signature": f"t={at},v1={digest}", "Content-Type": "application/json"}


def assert_unauthorized(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401
    assert response.json() == {"success": False, "error": reason}
    assert response.headers["www-authenticate"] == 'Basic realm="cjm"'


async def test_a_call_without_a_key_is_refused_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/track", content=TRACK)
    assert_unauthorized(
        response, "missing write key: send HTTP Basic with the write key as user name"
    )


async def test_a_call_with_a_wrong_key_is_refused_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/track", content=TRACK, auth=httpx.BasicAuth("wk_nope", ""))
    assert_unauthorized(response, "invalid write key")


async def test_malformed_basic_credentials_are_refused_401(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/track", content=TRACK, headers={"Authorization": "Basic not-base64!"}
    )
    assert_unauthorized(response, "malformed HTTP Basic credentials")


async def test_the_admin_key_does_not_open_tracking(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/track", content=TRACK, headers=ADMIN)
    assert_unauthorized(
        response, "use HTTP Basic with the write key as user name and an empty password"
    )


async def test_malformed_json_without_a_key_is_refused_401_not_400(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/track", content=b"{oops")
    assert response.status_code == 401


async def test_basic_with_the_write_key_as_user_name_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    token = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    response = await client.post(
        "/v1/track", content=TRACK, headers={"Authorization": f"Basic {token}"}
    )
    assert response.status_code == 200


async def test_a_write_key_in_the_body_is_accepted(client: httpx.AsyncClient) -> None:
    body = {"writeKey": WRITE_KEY, "anonymousId": "a1", "properties": {"path": "/"}}
    response = await client.post("/v1/page", json=body)
    assert response.status_code == 200


async def test_a_batch_with_its_write_key_in_the_body_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    body = {"writeKey": WRITE_KEY, "batch": [{"type": "page", "anonymousId": "a1"}]}
    response = await client.post("/v1/batch", json=body)
    assert response.status_code == 200


async def test_a_wrong_write_key_in_the_body_is_refused_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/page", json={"writeKey": "wk_nope", "anonymousId": "a1"})
    assert_unauthorized(response, "invalid write key")


async def test_a_good_signature_is_accepted(client: httpx.AsyncClient) -> None:
    at = int(NOW.timestamp())
    response = await client.post("/v1/track", content=TRACK, headers=signed(TRACK, at=at))
    assert response.status_code == 200


async def test_a_signature_with_the_wrong_secret_is_refused_401(client: httpx.AsyncClient) -> None:
    headers = signed(TRACK, at=int(NOW.timestamp()), secret="another secret")
    response = await client.post("/v1/track", content=TRACK, headers=headers)
    assert_unauthorized(response, "signature does not match the body")


async def test_a_signature_of_another_body_is_refused_401(client: httpx.AsyncClient) -> None:
    headers = signed(b'{"userId": "u2", "event": "x"}', at=int(NOW.timestamp()))
    response = await client.post("/v1/track", content=TRACK, headers=headers)
    assert_unauthorized(response, "signature does not match the body")


@pytest.mark.parametrize("skew", [timedelta(seconds=-301), timedelta(seconds=301)])
async def test_a_signature_more_than_300_s_off_is_refused_401(
    client: httpx.AsyncClient, skew: timedelta
) -> None:
    headers = signed(TRACK, at=int((NOW + skew).timestamp()))
    response = await client.post("/v1/track", content=TRACK, headers=headers)
    assert_unauthorized(response, "signature time is more than 300 s from the server's clock")


async def test_a_signature_300_s_old_is_still_accepted(client: httpx.AsyncClient) -> None:
    headers = signed(TRACK, at=int(NOW.timestamp()) - 300)
    response = await client.post("/v1/track", content=TRACK, headers=headers)
    assert response.status_code == 200


async def test_a_malformed_signature_header_is_refused_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/track", content=TRACK, headers={"X-CJM-Signature": "v1=ab"})
    assert_unauthorized(
        response, "malformed X-CJM-Signature: expected t=<unix seconds>,v1=<hex HMAC-SHA256>"
    )


async def test_signatures_are_refused_when_no_secret_is_configured(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    runtime.settings = dataclasses.replace(runtime.settings, signing_secret=None)
    headers = signed(TRACK, at=int(NOW.timestamp()))
    response = await client.post("/v1/track", content=TRACK, headers=headers)
    assert_unauthorized(response, "signed requests are not enabled here: send the write key")


async def test_admin_routes_refuse_a_call_without_a_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/journeys")
    assert response.status_code == 401
    assert response.json() == {
        "detail": "missing admin key: send Authorization: Bearer <admin key>"
    }
    assert response.headers["www-authenticate"] == 'Bearer realm="cjm"'


async def test_admin_routes_refuse_the_write_key_as_bearer(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/leads", headers={"Authorization": f"Bearer {WRITE_KEY}"})
    assert response.status_code == 401
    assert response.json() == {"detail": "invalid admin key"}


async def test_admin_routes_refuse_the_write_key_as_basic(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/leads", auth=WRITE)
    assert response.status_code == 401


async def test_admin_routes_accept_the_admin_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/leads", headers=ADMIN)
    assert response.status_code == 200


@pytest.mark.parametrize(
    "time_field",
    ["\u00b2", "1" + "0" * 400, "9" * 5000],
    ids=["superscript digit", "400 digits", "5000 digits"],
)
async def test_a_signature_time_that_is_not_unix_seconds_is_refused_401(
    client: httpx.AsyncClient, time_field: str
) -> None:
    header = f"t={time_field},v1=00".encode("latin-1")
    response = await client.post("/v1/track", content=TRACK, headers={"X-CJM-Signature": header})
    assert_unauthorized(
        response, "malformed X-CJM-Signature: expected t=<unix seconds>,v1=<hex HMAC-SHA256>"
    )
