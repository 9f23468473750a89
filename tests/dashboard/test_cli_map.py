"""`cjm map`: the map as a standalone SVG or HTML file, from the YAML or with the figures."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from engine.cli import app
from engine.db.database import Database
from engine.journey import load_journeys
from engine.kpis.report import Period, read_kpis
from tests.dashboard.conftest import (
    ROOT,
    doors_traffic,
    example_engine,
    map_of,
    moves,
    stage_cards,
    texts,
)

DOORS = load_journeys([ROOT / "journeys"])["doors"]


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CJM_JOURNEYS_DIR", str(ROOT / "journeys"))


def cjm_map(*args: str) -> Result:
    # Wide enough that a usage error's box does not wrap its message.
    return CliRunner().invoke(app, ["map", *args], env={"COLUMNS": "250"})


@pytest.fixture
def doors_database(database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """CJM_DATABASE_URL holds the doors traffic of the dashboard tests; its KPI report."""

    async def fill() -> dict[str, Any]:
        async with example_engine(database_url) as engine:
            await doors_traffic(engine)
        db = Database(database_url)
        try:
            return (await read_kpis(db, DOORS, Period())).model_dump(mode="json")
        finally:
            await db.close()

    monkeypatch.setenv("CJM_DATABASE_URL", database_url)
    return asyncio.run(fill())


def test_a_journey_id_becomes_a_valid_svg_file_of_its_stages(tmp_path: Path) -> None:
    output = tmp_path / "map.svg"

    result = cjm_map("doors", "-o", str(output))

    assert result.exit_code == 0, result.output
    assert result.output == f"map of doors v1 written to {output}\n"
    text = output.read_text(encoding="utf-8")
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<svg ')
    svg = ET.fromstring(text)
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    cards = stage_cards(svg)
    assert list(cards) == [
        "first_contact",
        "retargeting",
        "lost",
        "landing",
        "nurturing",
        "cooling",
        "customer",
    ]
    assert {card.get("data-status") for card in cards.values()} == {"none"}
    assert all(arrow.get("data-count") is None for arrow in moves(svg).values())


def test_a_journey_file_can_be_drawn_by_its_path(tmp_path: Path) -> None:
    output = tmp_path / "map.svg"

    result = cjm_map(str(ROOT / "journeys" / "subscription_box.yaml"), "-o", str(output))

    assert result.exit_code == 0, result.output
    assert ET.fromstring(output.read_text()).get("data-journey") == "subscription_box"


def test_an_html_file_is_a_standalone_page_with_the_map(tmp_path: Path) -> None:
    output = tmp_path / "map.html"

    result = cjm_map("doors", "-o", str(output))

    assert result.exit_code == 0, result.output
    page = output.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert "<style>" in page
    assert "<script" not in page
    assert "<link" not in page
    assert "Log out" not in page
    assert set(stage_cards(map_of(page))) == {stage.id for stage in DOORS.stages}


@pytest.mark.parametrize("name", ["map.png", "map", "map.svg.txt"])
def test_another_suffix_is_refused_with_exit_2_and_nothing_written(
    tmp_path: Path, name: str
) -> None:
    result = cjm_map("doors", "-o", str(tmp_path / name))

    assert result.exit_code == 2
    assert "neither .svg nor .html" in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_journey_is_named_with_the_known_ones(tmp_path: Path) -> None:
    result = cjm_map("windows", "-o", str(tmp_path / "map.svg"))

    assert result.exit_code == 1
    assert "no journey 'windows'; there are: b2b_trial, doors, subscription_box" in result.output


def test_a_period_without_kpis_is_refused_with_exit_2(tmp_path: Path) -> None:
    result = cjm_map("doors", "-o", str(tmp_path / "map.svg"), "--from", "2026-11-01")

    assert result.exit_code == 2
    assert "add --kpis" in result.output


def test_with_kpis_the_map_shows_the_figures_of_the_database(
    tmp_path: Path, doors_database: dict[str, Any]
) -> None:
    output = tmp_path / "map.svg"

    result = cjm_map("doors", "-o", str(output), "--kpis")

    assert result.exit_code == 0, result.output
    assert result.output == f"map of doors v1 with its figures written to {output}\n"
    svg = ET.fromstring(output.read_text())
    cards, arrows = stage_cards(svg), moves(svg)
    for stage in doors_database["stages"]:
        card = cards[stage["stage"]]
        assert card.get("data-status") == stage["status"]
        assert f"entered {stage['entered']} · now {stage['current']}" in texts(card)
        for target, count in stage["exited_to"].items():
            assert arrows[(stage["stage"], target)].get("data-count") == str(count)
    assert "L 5 leads · C 20.0% · P 990 · Q 1.00 · revenue 990 · the start to today" in texts(svg)


def test_with_kpis_and_a_period_only_leads_that_entered_in_it_count(
    tmp_path: Path, doors_database: dict[str, Any]
) -> None:
    output = tmp_path / "map.html"

    result = cjm_map(
        "doors", "-o", str(output), "--kpis", "--from", "2026-11-03", "--to", "2026-11-30"
    )

    assert result.exit_code == 0, result.output
    page = output.read_text()
    assert 'data-figure="leads">0<' in page
    assert "2026-11-03 to 2026-11-30" in page


def test_the_file_is_replaced_whole(tmp_path: Path) -> None:
    output = tmp_path / "map.svg"
    output.write_text("an older map")

    result = cjm_map("doors", "-o", str(output))

    assert result.exit_code == 0, result.output
    assert ET.fromstring(output.read_text()).get("data-journey") == "doors"
    assert [path.name for path in tmp_path.iterdir()] == ["map.svg"]


def test_a_folder_in_the_way_is_reported(tmp_path: Path) -> None:
    (tmp_path / "map.svg").mkdir()

    result = cjm_map("doors", "-o", str(tmp_path / "map.svg"))

    assert result.exit_code == 1
    assert "it is a folder" in result.output
