"""Who sees the dashboard: a browser logged in with the admin key, or a script sending it."""

from __future__ import annotations

from datetime import timedelta

import httpx

from engine.keys import ApiKeys
from engine.runtime import Runtime
from tests.dashboard.conftest import ADMIN_KEY, BEARER, example_engine
from tests.worker.conftest import Engine, app_client

JOURNEY_PAGE = "/dashboard/journeys/doors"


async def log_in(
    client: httpx.AsyncClient, key: str = ADMIN_KEY, goal: str = "", *, origin: str = ""
) -> httpx.Response:
    """Send the login form, to the client's server or to `origin` (scheme and host)."""
    return await client.post(f"{origin}/dashboard/login", data={"key": key, "next": goal})


def cookie_attributes(response: httpx.Response) -> list[str]:
    (header,) = response.headers.get_list("set-cookie")
    return [part.strip().lower() for part in header.split(";")]


async def test_the_login_page_asks_for_the_admin_key(examples: Engine) -> None:
    async with app_client(examples.runtime) as client:
        response = await client.get("/dashboard/login")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<input id="key" name="key" type="password"' in response.text
    assert "<script" not in response.text


async def test_a_page_without_a_session_redirects_to_the_login_page(examples: Engine) -> None:
    async with app_client(examples.runtime) as client:
        response = await client.get(JOURNEY_PAGE + "?from=2026-11-01")

    assert response.status_code == 303
    assert response.headers["location"] == (
        "/dashboard/login?next=/dashboard/journeys/doors%3Ffrom%3D2026-11-01"
    )


async def test_a_wrong_key_shows_the_form_again_with_401(examples: Engine) -> None:
    async with app_client(examples.runtime) as client:
        response = await log_in(client, "ak_not_the_key")

    assert response.status_code == 401
    assert "That is not the admin key." in response.text
    assert '<input id="key" name="key"' in response.text
    assert "set-cookie" not in response.headers


async def test_the_write_key_does_not_log_in(examples: Engine) -> None:
    async with app_client(examples.runtime) as client:
        response = await log_in(client, examples.runtime.settings.write_key or "")

    assert response.status_code == 401


async def test_the_admin_key_sets_an_httponly_samesite_strict_cookie_for_12_hours(
    examples: Engine,
) -> None:
    async with app_client(examples.runtime) as client:
        response = await log_in(client)

    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard"
    attributes = cookie_attributes(response)
    assert attributes[0].startswith("cjm_session=")
    assert {"httponly", "samesite=strict", "path=/dashboard", "max-age=43200"} <= set(attributes)
    # Plain HTTP to another machine: a Secure cookie would never come back.
    assert "secure" not in attributes


async def test_the_cookie_is_secure_on_127_0_0_1_where_browsers_keep_it_over_http(
    examples: Engine,
) -> None:
    async with app_client(examples.runtime) as client:
        response = await log_in(client, origin="http://127.0.0.1:8000")

    assert "secure" in cookie_attributes(response)


async def test_the_cookie_is_secure_over_https(examples: Engine) -> None:
    async with app_client(examples.runtime) as client:
        response = await log_in(client, origin="https://cjm.example.com")

    assert "secure" in cookie_attributes(response)


async def test_a_session_opens_every_page_and_login_returns_to_the_page_asked_for(
    examples: Engine,
) -> None:
    async with app_client(examples.runtime) as client:
        logged_in = await log_in(client, goal=JOURNEY_PAGE)
        page = await client.get(JOURNEY_PAGE)
        home = await client.get("/dashboard")

    assert logged_in.headers["location"] == JOURNEY_PAGE
    assert page.status_code == 200
    assert home.status_code == 200


async def test_login_never_sends_the_browser_to_another_site(examples: Engine) -> None:
    async with app_client(examples.runtime) as client:
        for elsewhere in ("//evil.example/x", "https://evil.example", "/\\evil.example", "/v1/x"):
            response = await log_in(client, goal=elsewhere)
            assert response.headers["location"] == "/dashboard", elsewhere
        form = await client.get("/dashboard/login", params={"next": "//evil.example"})

    assert 'name="next" value="/dashboard"' in form.text


async def test_the_admin_key_as_a_bearer_token_opens_the_pages(examples: Engine) -> None:
    async with app_client(examples.runtime, headers=BEARER) as client:
        response = await client.get(JOURNEY_PAGE)

    assert response.status_code == 200


async def test_a_wrong_bearer_token_is_refused_401(examples: Engine) -> None:
    async with app_client(examples.runtime, headers={"Authorization": "Bearer ak_no"}) as client:
        response = await client.get(JOURNEY_PAGE)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="cjm"'


async def test_a_session_ends_after_12_hours(examples: Engine) -> None:
    async with app_client(examples.runtime) as client:
        await log_in(client)
        examples.clock.advance(timedelta(hours=11, minutes=59))
        before = await client.get("/dashboard")
        examples.clock.advance(timedelta(minutes=1))
        after = await client.get("/dashboard")

    assert before.status_code == 200
    assert after.status_code == 303


async def test_logging_out_ends_the_session(examples: Engine) -> None:
    async with app_client(examples.runtime) as client:
        await log_in(client)
        response = await client.post("/dashboard/logout")
        after = await client.get("/dashboard")

    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/login"
    assert "max-age=0" in cookie_attributes(response)
    assert after.status_code == 303


async def test_a_cookie_not_sealed_as_a_session_is_refused(examples: Engine) -> None:
    runtime = examples.runtime
    payload = {"exp": 2**40, "key": runtime.keys.fingerprint("admin")}
    # Sealed with the server's secret, for an email link rather than a session.
    click_token = runtime.links.sealer.seal("click", payload)
    async with app_client(runtime) as client:
        for forged in (click_token, "garbage", click_token.replace(".", "x.", 1)):
            client.cookies.set("cjm_session", forged, domain="cjm.test", path="/dashboard")
            response = await client.get("/dashboard")
            assert response.status_code == 303, forged


async def test_rotating_the_admin_key_ends_every_session(database_url: str) -> None:
    async with example_engine(database_url, admin_key=None) as engine:
        runtime: Runtime = engine.runtime
        first_key = runtime.generated_keys["admin"]
        async with app_client(runtime) as client:
            await log_in(client, first_key)
            before = await client.get("/dashboard")
            # `cjm keys rotate admin` in another process; this one takes it up.
            elsewhere, _ = await ApiKeys.load(runtime.db, runtime.settings)
            new_key = await elsewhere.rotate(runtime.db, "admin")
            await runtime.keys.refresh(runtime.db)
            after = await client.get("/dashboard")
            with_old_key = await log_in(client, first_key)
            with_new_key = await log_in(client, new_key)
            again = await client.get("/dashboard")

    assert before.status_code == 200
    assert after.status_code == 303
    assert with_old_key.status_code == 401
    assert with_new_key.status_code == 303
    assert again.status_code == 200


async def session_of(database_url: str, admin_key: str) -> str:
    """A session cookie from a server started with CJM_ADMIN_KEY=`admin_key`, then stopped."""
    async with (
        example_engine(database_url, admin_key=admin_key) as engine,
        app_client(engine.runtime) as client,
    ):
        await log_in(client, admin_key)
        return client.cookies["cjm_session"]


async def status_with(database_url: str, admin_key: str, cookie: str) -> int:
    """What a server started with CJM_ADMIN_KEY=`admin_key` answers the cookie."""
    async with (
        example_engine(database_url, admin_key=admin_key) as engine,
        app_client(engine.runtime) as client,
    ):
        client.cookies.set("cjm_session", cookie, domain="cjm.test", path="/dashboard")
        return (await client.get("/dashboard")).status_code


async def test_a_new_cjm_admin_key_ends_the_sessions_of_the_old_one(database_url: str) -> None:
    cookie = await session_of(database_url, "ak_before")

    assert await status_with(database_url, "ak_after", cookie) == 303


async def test_a_session_survives_a_restart_with_the_same_key(database_url: str) -> None:
    cookie = await session_of(database_url, ADMIN_KEY)

    assert await status_with(database_url, ADMIN_KEY, cookie) == 200
