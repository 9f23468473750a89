"""The dashboard's pages over the example journeys, with leads moved by real events."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from engine.journey import load_journeys
from tests.dashboard.conftest import (
    ROOT,
    doors_traffic,
    map_of,
    moves,
    request_catalog,
    stage_cards,
    texts,
    visit,
)
from tests.worker.conftest import Engine

EXAMPLES = load_journeys([ROOT / "journeys"])


async def kpis(client: httpx.AsyncClient, journey: str, **period: str) -> dict[str, Any]:
    response = await client.get(f"/v1/journeys/{journey}/kpis", params=period)
    assert response.status_code == 200
    return dict(response.json())


async def test_the_journeys_list_shows_each_journey_with_its_leads_and_conversion(
    examples: Engine, dashboard: httpx.AsyncClient
) -> None:
    await doors_traffic(examples)

    page = (await dashboard.get("/dashboard")).text

    for journey in EXAMPLES:
        assert f'<tr data-journey="{journey.id}">' in page
        assert f'href="/dashboard/journeys/{journey.id}"' in page
        assert journey.name in page
    doors_row = page.split('<tr data-journey="doors">')[1].split("</tr>")[0]
    cells = [cell.split(">", 1)[1] for cell in doors_row.split("</td>")[:-1]]
    assert cells[2:] == ["1", "7", "5", "1", "20.0%"]


@pytest.mark.parametrize("journey", list(EXAMPLES), ids=lambda journey: journey.id)
async def test_the_journey_page_draws_every_stage_with_its_touchpoints_and_objections(
    dashboard: httpx.AsyncClient, journey: Any
) -> None:
    response = await dashboard.get(f"/dashboard/journeys/{journey.id}")

    assert response.status_code == 200
    cards = stage_cards(map_of(response.text))
    assert set(cards) == {stage.id for stage in journey.stages}
    for stage in journey.stages:
        shown = texts(cards[stage.id])
        assert stage.title in shown
        assert set(stage.touchpoints) <= set(shown)
        assert {f"“{objection}”" for objection in stage.objections} <= set(shown)


async def test_the_map_shows_the_figures_colours_and_counts_of_the_kpi_report(
    examples: Engine, dashboard: httpx.AsyncClient
) -> None:
    await doors_traffic(examples)

    report = await kpis(dashboard, "doors")
    svg = map_of((await dashboard.get("/dashboard/journeys/doors")).text)

    cards = stage_cards(svg)
    arrows = moves(svg)
    for stage in report["stages"]:
        card = cards[stage["stage"]]
        assert card.get("data-status") == stage["status"]
        assert card.get("data-entered") == str(stage["entered"])
        assert card.get("data-current") == str(stage["current"])
        assert f"entered {stage['entered']} · now {stage['current']}" in texts(card)
        for target, count in stage["exited_to"].items():
            assert arrows[(stage["stage"], target)].get("data-count") == str(count)
    assert cards["first_contact"].get("data-current") == "2"
    assert arrows[("first_contact", "nurturing")].get("data-count") == "1"
    assert arrows[("first_contact", "retargeting")].get("data-count") == "1"
    assert arrows[("first_contact", "landing")].get("data-count") == "1"


async def test_the_page_gives_the_totals_and_the_split_by_source(
    examples: Engine, dashboard: httpx.AsyncClient
) -> None:
    await doors_traffic(examples)

    page = (await dashboard.get("/dashboard/journeys/doors")).text

    assert 'data-figure="leads">5<' in page
    assert 'data-figure="conversion">20.0%<' in page
    assert 'data-figure="average_value">990<' in page
    assert 'data-figure="revenue">990<' in page
    google = page.split('<tr data-source="google">')[1].split("</tr>")[0]
    assert '<td class="n">4</td>' in google
    assert '<tr data-source="facebook">' in page


async def test_a_period_limits_the_figures_to_the_leads_that_entered_in_it(
    examples: Engine, dashboard: httpx.AsyncClient
) -> None:
    await doors_traffic(examples)

    that_day = await dashboard.get("/dashboard/journeys/doors?from=2026-11-02&to=2026-11-02")
    later = await dashboard.get("/dashboard/journeys/doors?from=2026-11-03&to=")

    assert 'data-figure="leads">5<' in that_day.text
    assert 'value="2026-11-02"' in that_day.text
    assert 'data-figure="leads">0<' in later.text
    assert stage_cards(map_of(later.text))["first_contact"].get("data-entered") == "0"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("from=yesterday", "Write the days of the period as YYYY-MM-DD."),
        ("from=2026-11-05&to=2026-11-01", "The period ends before it starts."),
    ],
)
async def test_a_period_that_is_not_one_is_explained_with_400(
    dashboard: httpx.AsyncClient, query: str, reason: str
) -> None:
    response = await dashboard.get(f"/dashboard/journeys/doors?{query}")

    assert response.status_code == 400
    assert reason in response.text


async def test_the_page_lists_audiences_offers_and_emails_by_template(
    examples: Engine, dashboard: httpx.AsyncClient
) -> None:
    await doors_traffic(examples)
    await examples.runtime.email.run_once()

    page = (await dashboard.get("/dashboard/journeys/doors")).text

    visitors = page.split('<tr data-audience="site_visitors">')[1].split("</tr>")[0]
    assert visitors.endswith('<td class="n">4</td>\n    ')
    offer = page.split('<tr data-offer="free_install">')[1].split("</tr>")[0]
    assert "Free installation and an intercom as a gift" in offer
    assert '<td class="n">1</td>' in offer
    thanks = page.split('<tr data-template="order_thanks">')[1].split("</tr>")[0]
    assert thanks.startswith('\n      <td>order_thanks</td>\n      <td class="n">1</td>')
    assert '<tr data-template="locks_and_alarms">' in page


async def test_recent_emails_are_listed_with_their_address_masked(
    examples: Engine, dashboard: httpx.AsyncClient
) -> None:
    await doors_traffic(examples)
    await visit(examples, "fay")
    await request_catalog(examples, "fay", "fay@example.com")
    await examples.run()
    await examples.runtime.email.run_once()

    page = (await dashboard.get("/dashboard/journeys/doors")).text

    recent = page.split('<table class="emails">')[1].split("</table>")[0]
    rows = recent.split("<tr>")[2:]
    assert [row.split("<td>")[2].split("<")[0] for row in rows] == ["catalog", "order_thanks"]
    assert "<td>f…@example.com</td>" in rows[0]
    assert "<td>a…@example.com</td>" in rows[1]
    assert "ann@example.com" not in page
    assert "fay@example.com" not in page


async def test_the_stage_page_lists_the_leads_in_it_newest_first(
    examples: Engine, dashboard: httpx.AsyncClient
) -> None:
    await doors_traffic(examples)
    eve, bob = await examples.lead_id("eve"), await examples.lead_id("bob")

    response = await dashboard.get("/dashboard/journeys/doors/stages/first_contact")

    assert response.status_code == 200
    rows = response.text.split("<tbody>")[1].split("</tbody>")[0].split("<tr ")[1:]
    assert [row.split('"')[1] for row in rows] == [str(eve), str(bob)]
    assert f'href="/dashboard/leads/{bob}"' in rows[1]
    assert "<td>bob</td>" in rows[1]
    assert "<td>b…@example.com</td>" in rows[1]
    assert "bob@example.com" not in response.text
    assert "2026-11-02 12:02:00 UTC" in rows[0]


async def test_a_stage_card_links_to_its_stage_page(dashboard: httpx.AsyncClient) -> None:
    page = (await dashboard.get("/dashboard/journeys/doors")).text

    assert '<a href="/dashboard/journeys/doors/stages/nurturing"><g class="stage"' in page


async def test_values_from_the_database_are_escaped(
    examples: Engine, dashboard: httpx.AsyncClient
) -> None:
    await visit(examples, "<img src=x onerror=alert(1)>")
    await examples.run()

    page = (await dashboard.get("/dashboard/journeys/doors/stages/first_contact")).text

    assert "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


async def test_pages_forbid_scripts_and_framing(dashboard: httpx.AsyncClient) -> None:
    response = await dashboard.get("/dashboard/journeys/doors")

    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "<script" not in response.text
    assert response.headers["cache-control"] == "no-store"


async def test_the_lead_page_shows_the_lead_as_the_api_does(
    examples: Engine, dashboard: httpx.AsyncClient
) -> None:
    await doors_traffic(examples)
    bob = await examples.lead_id("bob")

    page = (await dashboard.get(f"/dashboard/leads/{bob}")).text
    detail = (await dashboard.get(f"/v1/leads/{bob}")).json()

    assert f"<h1>Lead {bob}</h1>" in page
    assert "&#34;stage&#34;: &#34;first_contact&#34;" in page
    assert detail["journeys"][0]["stage"] == "first_contact"


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/journeys/nope",
        "/dashboard/journeys/doors/stages/nope",
        "/dashboard/journeys/nope/stages/first_contact",
        "/dashboard/leads/999",
    ],
)
async def test_what_does_not_exist_is_a_404_page(dashboard: httpx.AsyncClient, path: str) -> None:
    response = await dashboard.get(path)

    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
