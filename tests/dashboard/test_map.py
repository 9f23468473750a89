"""The map's layout and SVG, from a journey alone or with a KPI report: pure, no database."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from engine.dashboard.map import lay_out, render_svg
from engine.dashboard.pages import map_page
from engine.journey import Journey, load_journeys
from tests.dashboard.conftest import ROOT, SVG, map_of, moves, stage_cards, texts

EXAMPLES = load_journeys([ROOT / "journeys"])
DOORS = EXAMPLES["doors"]

ESCAPES = Journey.model_validate(
    {
        "id": "escapes",
        "name": 'Tags <b>& quotes"',
        "entry": {"on": "page"},
        "stages": [
            {
                "id": "start",
                "name": "<script>x</script>",
                "phase": "awareness",
                "objections": ["is 5 < 6 & 7 > 6?"],
                "transitions": [{"on": "x", "to": "end"}],
            },
            {"id": "end", "phase": "purchase", "terminal": True},
        ],
    }
)


def stage_report(stage: str, **figures: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "entered": 0,
        "current": 0,
        "exited_to": {},
        "conversion": None,
        "median_time_s": None,
        "p90_time_s": None,
        "status": "none",
        **figures,
    }


def totals(leads: int = 0, **figures: float) -> dict[str, Any]:
    return {
        "leads": leads,
        "customers": 0,
        "goals": 0,
        "conversion": 0.0,
        "average_value": 0.0,
        "purchases_per_customer": 0.0,
        "revenue": 0.0,
        **figures,
    }


# A report in the shape GET /v1/journeys/doors/kpis answers, made up for the drawing.
DOORS_REPORT: dict[str, Any] = {
    "journey": "doors",
    "version": 1,
    "from": "2026-11-01",
    "to": "2026-11-22",
    "totals": totals(10, customers=2, goals=3, conversion=0.2, revenue=3870.0),
    "by_source": {"google": totals(7), "(none)": totals(3)},
    "stages": [
        stage_report(
            "first_contact",
            entered=10,
            current=1,
            exited_to={"nurturing": 4, "retargeting": 3, "landing": 1, "exit": 1},
            conversion=0.8,
            status="ok",
        ),
        stage_report("retargeting", entered=3, current=3, status="bad", conversion=0.0),
        stage_report("landing", entered=1, exited_to={"nurturing": 1}, status="warn"),
        stage_report("nurturing", entered=5, current=3, exited_to={"customer": 2}),
    ],
    "emails": [],
    "offers": [],
}


def svg_of(journey: Journey, report: dict[str, Any] | None = None) -> ET.Element:
    return ET.fromstring(render_svg(lay_out(journey, report)))


@pytest.mark.parametrize("journey", list(EXAMPLES), ids=lambda journey: journey.id)
def test_every_stage_is_a_card_with_its_touchpoints_objections_and_emotions(
    journey: Journey,
) -> None:
    cards = stage_cards(svg_of(journey))

    assert set(cards) == {stage.id for stage in journey.stages}
    for stage in journey.stages:
        shown = texts(cards[stage.id])
        assert stage.title in shown
        for words in (*stage.touchpoints, *stage.emotions):
            assert words in shown
        for objection in stage.objections:
            assert f"“{objection}”" in shown


def test_columns_follow_the_phases_from_awareness_to_loyalty() -> None:
    journey = EXAMPLES["subscription_box"]
    journey_map = lay_out(journey)

    phases = [band.phase for band in journey_map.phases]
    lefts = [card.x for card in journey_map.cards]

    assert phases == ["awareness", "consideration", "purchase", "retention", "loyalty"]
    assert lefts == sorted(lefts)
    assert [card.stage.phase for card in journey_map.cards] == sorted(
        (card.stage.phase for card in journey_map.cards), key=phases.index
    )


def test_only_the_phases_a_journey_uses_get_a_column() -> None:
    assert [band.phase for band in lay_out(DOORS).phases] == [
        "awareness",
        "consideration",
        "purchase",
    ]


def test_without_figures_every_stage_is_grey_and_arrows_carry_no_counts() -> None:
    svg = svg_of(DOORS)

    assert {card.get("data-status") for card in stage_cards(svg).values()} == {"none"}
    assert all(arrow.get("data-count") is None for arrow in moves(svg).values())
    assert not any("entered" in text for text in texts(svg))


def test_each_rule_of_the_yaml_is_an_arrow_and_each_stage_an_exit_can_end_too() -> None:
    drawn = set(moves(svg_of(DOORS)))

    rules = {
        (stage.id, transition.to) for stage in DOORS.stages for transition in stage.transitions
    }
    exits = {(stage.id, "exit") for stage in DOORS.stages if not stage.terminal}
    assert drawn == rules | exits


def test_arrows_are_labelled_with_how_many_leads_took_them() -> None:
    arrows = moves(svg_of(DOORS, DOORS_REPORT))

    assert arrows[("first_contact", "nurturing")].get("data-count") == "4"
    assert "4 · catalog_requested" in texts(arrows[("first_contact", "nurturing")])
    assert arrows[("first_contact", "retargeting")].get("data-count") == "3"
    assert "3 · after 2h" in texts(arrows[("first_contact", "retargeting")])
    assert arrows[("first_contact", "exit")].get("data-count") == "1"
    assert arrows[("cooling", "lost")].get("data-count") == "0"


def test_cards_are_coloured_by_their_kpi_status_and_show_entered_and_current() -> None:
    cards = stage_cards(svg_of(DOORS, DOORS_REPORT))

    statuses = {stage: card.get("data-status") for stage, card in cards.items()}
    assert statuses == {
        "first_contact": "ok",
        "retargeting": "bad",
        "landing": "warn",
        "nurturing": "none",
        "cooling": "none",
        "customer": "none",
        "lost": "none",
    }
    first = cards["first_contact"]
    assert (first.get("data-entered"), first.get("data-current")) == ("10", "1")
    assert "entered 10 · now 1" in texts(first)
    assert "conversion 80.0% · target 25.0%" in texts(first)
    fills = {next(card.iter(f"{SVG}rect")).get("fill") for card in cards.values()}
    assert len(fills) == 4


def test_a_move_no_rule_makes_is_drawn_when_leads_took_it() -> None:
    report = {**DOORS_REPORT, "stages": [stage_report("landing", exited_to={"customer": 2})]}

    arrow = moves(svg_of(DOORS, report))[("landing", "customer")]

    assert arrow.get("data-count") == "2"


def test_the_headline_gives_l_c_p_q_and_revenue_for_the_period() -> None:
    headline = texts(svg_of(DOORS, DOORS_REPORT))[2]

    assert headline == (
        "L 10 leads · C 20.0% · P 0 · Q 0.00 · revenue 3,870 · 2026-11-01 to 2026-11-22"
    )


def test_text_from_the_yaml_is_escaped_and_comes_back_intact() -> None:
    markup = render_svg(lay_out(ESCAPES))
    svg = ET.fromstring(markup)

    assert "<script>" not in markup
    assert "<script>x</script>" in texts(stage_cards(svg)["start"])
    assert "“is 5 < 6 & 7 > 6?”" in texts(svg)


def test_the_html_page_is_standalone_and_escapes_the_yaml() -> None:
    page = map_page(lay_out(ESCAPES))

    assert page.startswith("<!doctype html>")
    assert "<script" not in page
    assert "&lt;b&gt;&amp; quotes&#34;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert stage_cards(map_of(page)).keys() == {"start", "end"}


def test_the_html_page_with_figures_has_the_totals_and_the_sources() -> None:
    page = map_page(lay_out(DOORS, DOORS_REPORT))

    assert 'data-figure="leads">10<' in page
    assert 'data-figure="conversion">20.0%<' in page
    assert 'data-figure="revenue">3,870<' in page
    assert 'data-source="google"' in page
    assert 'data-source="(none)"' in page


def test_a_stage_that_loops_to_itself_gets_an_arrow_above_its_card() -> None:
    journey = Journey.model_validate(
        {
            "id": "loop",
            "name": "Reminders until an answer",
            "entry": {"on": "page"},
            "stages": [
                {
                    "id": "waiting",
                    "phase": "consideration",
                    "transitions": [{"after": "1d", "to": "waiting"}, {"on": "x", "to": "done"}],
                },
                {"id": "done", "phase": "purchase", "terminal": True},
            ],
        }
    )

    journey_map = lay_out(journey)

    (loop,) = [arrow for arrow in journey_map.arrows if arrow.source == arrow.target]
    card = journey_map.cards[0]
    assert all(y <= card.y for _, y in loop.points)
    assert card.x < loop.points[0][0] < loop.points[-1][0] < card.x + card.width
