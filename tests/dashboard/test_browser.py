"""The dashboard in a real browser: headless Chromium logs in through the form and reads
the map of a real `cjm serve` that tracking calls filled, figure for figure against the
KPI API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from engine.dashboard.map import STATUS_COLOURS
from tests.conftest import IN_CI
from tests.dashboard.conftest import FACEBOOK, GOOGLE, ROOT
from tests.e2e.conftest import ADMIN_KEY, Server, start_server, stop_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's Chromium, driven by Playwright (`make test` installs it when missing)."""
    if not CHROMIUM.exists():
        message = f"no {CHROMIUM}: apt-get install chromium (make test does as root)"
        if IN_CI:
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """`cjm serve` with the example journeys on a new SQLite file."""
    started = start_server(
        {
            "CJM_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cjm.db'}",
            "CJM_JOURNEYS_DIR": str(ROOT / "journeys"),
            "CJM_TEMPLATES_DIR": str(ROOT / "templates" / "emails"),
        },
        tmp_path / "serve.log",
        cwd=tmp_path,
    )
    try:
        yield started
    finally:
        stop_server(started)


def send(server: Server, path: str, payload: dict[str, Any]) -> None:
    response = server.track(path, payload)
    assert response.status_code == 200, response.text


def doors_traffic(server: Server) -> None:
    """Ann orders; Dee downloads the catalog; Cy comes back from social; Bob and Eve browse."""
    for user, context in (("ann", GOOGLE), ("bob", GOOGLE), ("cy", FACEBOOK), ("dee", GOOGLE)):
        send(
            server,
            "/v1/page",
            {"userId": user, "properties": {"path": "/catalog/a"}, "context": context},
        )
    send(server, "/v1/page", {"userId": "eve", "properties": {"path": "/catalog/b"}})
    send(server, "/v1/page", {"userId": "cy", "properties": {"path": "/x"}, "context": FACEBOOK})
    for user in ("ann", "dee"):
        send(server, "/v1/identify", {"userId": user, "traits": {"email": f"{user}@example.com"}})
        send(server, "/v1/track", {"userId": user, "event": "catalog_requested"})
    send(
        server,
        "/v1/track",
        {"userId": "ann", "event": "order_completed", "properties": {"revenue": 1290}},
    )


def settled_kpis(server: Server) -> dict[str, Any]:
    """The doors KPI answer once every move above is applied (Ann's order comes last)
    and the stages' figures stay the same."""
    deadline = time.monotonic() + 20
    previous: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        report = server.admin("/v1/journeys/doors/kpis").json()
        entered = {stage["stage"]: stage["entered"] for stage in report["stages"]}
        done = entered.get("customer") == 1 and entered.get("landing") == 1
        if done and previous is not None and report["stages"] == previous["stages"]:
            return dict(report)
        previous = report
        time.sleep(0.2)
    raise AssertionError(f"the events were not applied in time; last answer: {previous}")


def log_in(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/dashboard")
    assert page.url == f"{server.url}/dashboard/login?next=/dashboard"
    page.fill("input[name=key]", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/dashboard")


def test_the_map_in_a_browser_shows_what_the_kpi_api_answers(
    browser: Browser, server: Server
) -> None:
    doors_traffic(server)
    report = settled_kpis(server)
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()

    log_in(page, server)
    (cookie,) = context.cookies()
    page.click("a[href='/dashboard/journeys/doors']")
    page.wait_for_url(f"{server.url}/dashboard/journeys/doors")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-doors.png"), full_page=True)
    cards = page.eval_on_selector_all(
        "g.stage",
        """cards => cards.map(card => ({
            stage: card.dataset.stage,
            status: card.dataset.status,
            entered: card.dataset.entered,
            current: card.dataset.current,
            fill: card.querySelector('rect').getAttribute('fill'),
            text: card.textContent,
        }))""",
    )
    arrows = page.eval_on_selector_all(
        "g.move",
        """arrows => arrows.map(arrow => ({
            from: arrow.dataset.from, to: arrow.dataset.to, count: arrow.dataset.count,
            label: arrow.querySelector('text.count')?.textContent ?? '',
        }))""",
    )

    assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == (
        "cjm_session",
        True,
        "Strict",
    )
    assert cookie["secure"] is True
    shown = {card["stage"]: card for card in cards}
    assert list(shown) == [
        "first_contact",
        "retargeting",
        "lost",
        "landing",
        "nurturing",
        "cooling",
        "customer",
    ]
    drawn = {(arrow["from"], arrow["to"]): arrow for arrow in arrows}
    for stage in report["stages"]:
        card = shown[stage["stage"]]
        assert card["status"] == stage["status"]
        assert card["fill"] == STATUS_COLOURS[stage["status"]][0]
        assert (card["entered"], card["current"]) == (str(stage["entered"]), str(stage["current"]))
        assert f"entered {stage['entered']} · now {stage['current']}" in card["text"]
        for target, count in stage["exited_to"].items():
            arrow = drawn[(stage["stage"], target)]
            assert arrow["count"] == str(count)
            assert arrow["label"].startswith(f"{count} ")
    assert {card["status"] for card in cards} >= {"ok", "bad", "none"}
    assert page.inner_text("[data-figure=leads]") == str(report["totals"]["leads"])
    # Nothing moved while the browser read the page (emails may still go out meanwhile).
    later = settled_kpis(server)
    assert (later["stages"], later["totals"]) == (report["stages"], report["totals"])

    page.click("g.stage[data-stage=nurturing]")
    page.wait_for_url(f"{server.url}/dashboard/journeys/doors/stages/nurturing")
    rows = page.eval_on_selector_all(
        "table.leads tbody tr", "rows => rows.map(row => row.innerText.split('\\t'))"
    )
    assert [(row[1], row[2]) for row in rows] == [("dee", "d…@example.com")]

    page.click("button:has-text('Log out')")
    page.wait_for_url(f"{server.url}/dashboard/login")
    assert context.cookies() == []
    context.close()
