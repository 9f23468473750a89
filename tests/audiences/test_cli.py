"""`cjm audiences export`: an audience the worker filled from real events, written to a file
as Meta pages, a Google Customer Match CSV or the clear CSV, in full or since a cursor."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from engine.cli import app
from engine.clock import ManualClock
from engine.journey import JourneySet
from tests.worker.conftest import START, Engine, start_engine, write_funnel

META_SCHEMA = ["EMAIL", "PHONE", "FN", "LN", "CT", "ST", "ZIP", "COUNTRY"]
HEX_OR_EMPTY = re.compile(r"([0-9a-f]{64})?")

# Traits as tracking sends them: the first email untrimmed and mixed case.
TRAITS = {
    "user-1": {
        "email": "Shopper@Example.com ",
        "phone": "+1 415 555 0100",
        "country": "US",
        "zip": "94110",
    },
    "user-2": {"email": "reader@example.net", "phone": "+44 20 7946 0000", "country": "GB"},
    "user-3": {"email": "buyer@example.org", "country": "FR"},
}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def journeys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JourneySet:
    """The funnel (audiences visitors and abandoners) in CJM_JOURNEYS_DIR."""
    folder = tmp_path / "journeys"
    folder.mkdir()
    monkeypatch.setenv("CJM_JOURNEYS_DIR", str(folder))
    return write_funnel(folder)


async def _send(
    database_url: str,
    journeys: JourneySet,
    messages: list[tuple[Any, dict[str, Any]]],
    after: timedelta = timedelta(0),
) -> dict[str, int]:
    """Messages in, the worker applies them; lead ids by user id. No audience upkeep runs
    here: the membership changes are left unnumbered, for the export to number."""
    clock = ManualClock(START + after)
    engine = Engine(await start_engine(database_url, journeys, clock), clock)
    try:
        for type_, payload in messages:
            await engine.send(type_, **payload)
        await engine.run()
        return {user: await engine.lead_id(user_id=user) for user in TRAITS}
    finally:
        await engine.runtime.stop()


@pytest.fixture
def leads(
    journeys: JourneySet, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, int]:
    """Three leads who browsed the catalog: the funnel put them in `visitors`."""
    monkeypatch.setenv("CJM_DATABASE_URL", database_url)
    messages: list[tuple[Any, dict[str, Any]]] = []
    for user, traits in TRAITS.items():
        messages.append(("identify", {"userId": user, "traits": traits}))
        messages.append(("page", {"userId": user, "properties": {"path": "/catalog/doors"}}))
    return asyncio.run(_send(database_url, journeys, messages))


def export(*args: str) -> Result:
    return CliRunner().invoke(app, ["audiences", "export", *args])


def summary(text: str, target: str) -> tuple[int, str]:
    """The rows and the next cursor an export says it wrote to `target`."""
    wrote, cursor = text.splitlines()[-2:]
    match = re.fullmatch(rf"wrote (\d+) rows? to {re.escape(target)}", wrote)
    assert match, text
    assert cursor.startswith("next cursor: "), text
    return int(match.group(1)), cursor.removeprefix("next cursor: ")


def test_meta_export_writes_pages_of_hashed_members_as_json_lines(
    leads: dict[str, int], tmp_path: Path
) -> None:
    out = tmp_path / "visitors.jsonl"
    result = export("visitors", "--format", "meta", "-o", str(out), "--limit", "2")
    assert result.exit_code == 0, result.stderr
    rows, cursor = summary(result.stdout, str(out))
    pages = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(page["op"], len(page["data"]), page["has_more"]) for page in pages] == [
        ("add", 2, True),
        ("add", 1, False),
    ]
    assert all(page["schema"] == META_SCHEMA for page in pages)
    data = [row for page in pages for row in page["data"]]
    assert rows == len(data) == 3
    assert all(len(row) == 8 for row in data)
    assert all(HEX_OR_EMPTY.fullmatch(value) for row in data for value in row)
    (first,) = [row for row in data if row[0] == sha256("shopper@example.com")]
    assert first[META_SCHEMA.index("COUNTRY")] == sha256("us")
    assert pages[-1]["next_cursor"] == cursor


def test_google_export_has_the_customer_match_header(leads: dict[str, int], tmp_path: Path) -> None:
    out = tmp_path / "visitors.csv"
    result = export("visitors", "--format", "google", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "Email,Phone,First Name,Last Name,Country,Zip"
    assert summary(result.stdout, str(out))[0] == len(lines) - 1 == 3
    assert sha256("shopper@example.com") in {row[0] for row in csv.reader(lines[1:])}


def test_an_export_since_a_cursor_has_only_the_lead_who_left(
    leads: dict[str, int], journeys: JourneySet, database_url: str, tmp_path: Path
) -> None:
    full = tmp_path / "full.csv"
    result = export("visitors", "--format", "csv", "-o", str(full))
    assert result.exit_code == 0, result.stderr
    rows, cursor = summary(result.stdout, str(full))
    with full.open(newline="") as file:
        assert sorted((row["lead_id"], row["op"]) for row in csv.DictReader(file)) == sorted(
            (str(lead), "add") for lead in leads.values()
        )
    assert rows == 3

    # user-2 opts out: the funnel's exit takes it out of its audiences.
    opted_out = ("track", {"userId": "user-2", "event": "opted_out"})
    asyncio.run(_send(database_url, journeys, [opted_out], after=timedelta(minutes=1)))

    since = tmp_path / "since.csv"
    result = export("visitors", "--format", "csv", "-o", str(since), "--cursor", cursor)
    assert result.exit_code == 0, result.stderr
    with since.open(newline="") as file:
        changed = [(row["lead_id"], row["op"], row["email"]) for row in csv.DictReader(file)]
    assert changed == [(str(leads["user-2"]), "remove", "reader@example.net")]
    assert summary(result.stdout, str(since))[0] == 1

    pages = tmp_path / "since.jsonl"
    result = export("visitors", "--format", "meta", "-o", str(pages), "--cursor", cursor)
    assert result.exit_code == 0, result.stderr
    (page,) = [json.loads(line) for line in pages.read_text().splitlines()]
    assert (page["op"], page["has_more"]) == ("remove", False)
    assert [row[0] for row in page["data"]] == [sha256("reader@example.net")]


def test_an_export_to_standard_output_says_what_it_wrote_on_standard_error(
    leads: dict[str, int],
) -> None:
    result = export("visitors", "--format", "google", "-o", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Email,Phone,First Name,Last Name,Country,Zip"
    assert len(result.stdout.splitlines()) == 4
    assert summary(result.stderr, "standard output")[0] == 3


def test_an_unknown_audience_exits_1_naming_the_known_ones(
    journeys: JourneySet, tmp_path: Path
) -> None:
    result = export("buyers", "--format", "meta", "-o", str(tmp_path / "out.jsonl"))
    assert (result.exit_code, result.stdout) == (1, "")
    assert "no audience 'buyers'" in result.stderr
    assert "there are: abandoners, visitors" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_bad_cursor_exits_1(journeys: JourneySet, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    result = export("visitors", "--format", "csv", "-o", str(out), "--cursor", "not-a-cursor")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.startswith("--cursor: not a cursor")
    assert not out.exists()


def test_an_output_that_cannot_be_written_exits_1(
    journeys: JourneySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cjm.db").touch()
    monkeypatch.setenv("CJM_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'cjm.db'}")
    out = tmp_path / "no-such-folder" / "out.csv"
    result = export("visitors", "--format", "csv", "-o", str(out))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"cannot write {out}: No such file or directory\n"


def test_a_database_never_migrated_exits_1_leaving_no_file(
    journeys: JourneySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty.db").touch()
    monkeypatch.setenv("CJM_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    out = tmp_path / "out.csv"
    result = export("visitors", "--format", "csv", "-o", str(out))
    assert (result.exit_code, result.stdout) == (1, "")
    assert "run `cjm db upgrade`" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty.db", "journeys"]


def test_a_missing_database_file_exits_1_and_creates_none(
    journeys: JourneySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'missing.db'}"
    monkeypatch.setenv("CJM_DATABASE_URL", url)
    result = export("visitors", "--format", "meta", "-o", str(tmp_path / "out.jsonl"))
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"no database at {url}: is CJM_DATABASE_URL right?\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["journeys"]
