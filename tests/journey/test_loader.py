"""Loading journey files: YAML 1.2 scalars, shape errors as `file:line: message`, and sets."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from engine.journey import (
    Journey,
    JourneyError,
    JourneyErrors,
    load_journey_file,
    load_journey_text,
    load_journeys,
)
from engine.journey.model import AfterTimeout, OnEvent
from engine.journey.yaml_lines import YamlError, load

# The example of SPEC section 2, with the one description that contains a comma quoted.
DOORS = """\
id: doors                       # unique, [a-z0-9_]+
name: Entry doors — search visitors
version: 1
segment:
  name: Homeowners choosing an entry door
  jobs: ["protect my home", "look good from the street"]   # jobs to be done (docs only)
entry:                          # when a lead enters (at the first stage)
  on: page                      # an event name; `page` = Segment page calls
  where: {properties.path: {startswith: /catalog}}
  reentry: never                # never | always | "after 30d"
exit:                           # leave at once from any stage
  - on: email.unsubscribed
goal:                           # the deal: counted for C, P, Q
  on: order_completed
  value: properties.revenue
stages:
  - id: first_contact
    name: First contact
    phase: awareness            # awareness | consideration | purchase | retention | loyalty
    touchpoints: [google_ads, catalog_site]
    objections: ["is the quality good?", "prices elsewhere?"]
    emotions: [curious]         # docs only, drawn on the map
    kpi: {conversion: 0.25, median_time: 1d}    # targets, used to colour the map
    on_enter:
      - audience.add: site_visitors
    transitions:
      - on: page
        where: {context.campaign.source: facebook}
        to: landing
      - after: 2h               # a timeout: fires if no other transition happened first
        to: retargeting
  - id: retargeting
    phase: awareness
    on_enter: [{audience.add: catalog_abandoners}]
    transitions:
      - {on: page, where: {properties.path: {startswith: /landing}}, to: landing}
      - {after: 14d, to: lost}
  - id: landing
    phase: consideration
    on_enter: [{audience.remove: catalog_abandoners}]
    transitions:
      - {on: catalog_requested, to: nurturing}
  - id: nurturing
    phase: consideration
    on_enter:
      - sequence.start: door_tips
      - offer.grant: free_install
    transitions:
      - {on: order_completed, to: customer}
      - {on: offer.expired, where: {properties.offer: free_install}, to: cooling}
  - id: cooling
    phase: consideration
    transitions: [{on: order_completed, to: customer}, {after: 30d, to: lost}]
  - id: customer
    phase: purchase
    on_enter:
      - email.send: order_thanks
      - audience.remove: [site_visitors, catalog_abandoners]
  - id: lost
    phase: awareness
    terminal: true              # the lead leaves the journey here
sequences:
  door_tips:
    stop_on: [order_completed]  # leaving the journey also stops it
    window: {from: "09:00", to: "20:00", days: [mon, tue, wed, thu, fri, sat]}
    steps:
      - email: catalog
      - wait: 2d
      - email: choosing_fittings
      - wait: 2d
      - email: locks_and_alarms
offers:
  free_install:
    title: Free installation and an intercom as a gift
    expires: {after: 5d}        # or {at: "2026-12-31T23:59:59+03:00"}
    code: "DOORS-{6}"           # unique per lead; {N} = N random unambiguous characters
audiences:
  site_visitors: {description: Everyone who saw the catalog}
  catalog_abandoners: {description: "Saw the catalog, did not come back"}
"""

DOORS_TEMPLATES = ("catalog", "choosing_fittings", "locks_and_alarms", "order_thanks")


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(*paths: Path, templates_dir: Path | None = None) -> list[str]:
    with pytest.raises(JourneyErrors) as raised:
        load_journeys(paths, templates_dir)
    return [str(error) for error in raised.value.errors]


def minimal(stage_lines: str = "phase: awareness\n") -> str:
    """A one-stage journey; `stage_lines` complete its stage, from line 6 on."""
    head = "id: demo\nname: Demo\nentry: {on: page}\nstages:\n  - id: first\n"
    return head + textwrap.indent(textwrap.dedent(stage_lines), "    ")


# --- YAML scalars and structure ------------------------------------------------------------------


def test_on_is_a_key_not_a_boolean() -> None:
    value, _ = load("on: page\nOn: visit\n")
    assert value == {"on": "page", "On": "visit"}


def test_yes_no_on_off_are_strings() -> None:
    value, _ = load("a: [yes, no, on, off, y, n]\n")
    assert value == {"a": ["yes", "no", "on", "off", "y", "n"]}


def test_only_true_and_false_are_booleans_in_any_case() -> None:
    value, _ = load("a: [true, False, TRUE, tRuE]\n")
    assert value == {"a": [True, False, True, True]}


def test_clock_times_stay_strings() -> None:
    value, _ = load("from: 09:00\nto: 20:30\n")
    assert value == {"from": "09:00", "to": "20:30"}


def test_timestamps_stay_strings() -> None:
    value, _ = load("at: 2026-12-31T23:59:59+03:00\nday: 2026-12-31\n")
    assert value == {"at": "2026-12-31T23:59:59+03:00", "day": "2026-12-31"}


def test_numbers_and_null_are_read_as_usual() -> None:
    value, _ = load("a: [1, -2, 0x1f, 0o17, 1.5, 1e3, .inf, ~, null, '3']\nb:\n")
    assert value == {"a": [1, -2, 31, 15, 1.5, 1000.0, float("inf"), None, None, "3"], "b": None}


def test_each_value_records_the_line_of_its_key_or_list_item() -> None:
    _, lines = load("# a comment\nid: demo\nstages:\n  - id: first\n    phase: awareness\n")
    assert lines.table == {
        (): 2,
        ("id",): 2,
        ("stages",): 3,
        ("stages", 0): 4,
        ("stages", 0, "id"): 4,
        ("stages", 0, "phase"): 5,
    }


def test_duplicate_key_is_an_error_on_the_line_of_the_second() -> None:
    with pytest.raises(YamlError) as raised:
        load("id: a\nname: A\nid: b\n")
    assert str(raised.value) == "line 3: duplicate key 'id' (first on line 1)"


def test_python_tags_are_refused() -> None:
    with pytest.raises(YamlError) as raised:
        load("id: a\nname: !!python/object/apply:os.system [ls]\n")
    assert str(raised.value) == "line 2: unsupported tag !!python/object/apply:os.system"


def test_aliases_are_refused_on_their_line() -> None:
    with pytest.raises(YamlError) as raised:
        load("a: &where {event: page}\nb:\n  - *where\n")
    assert str(raised.value) == "line 3: aliases (*name) are not supported: write the value out"


def test_duplicate_key_in_a_journey_file_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", minimal() + "    phase: consideration\n")
    assert errors_of(path) == [f"{path}:7: duplicate key 'phase' (first on line 6)"]


def test_yaml_syntax_error_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page
        stages: []
        """,
    )
    assert errors_of(path) == [
        f"{path}:4: bad YAML: while parsing a flow mapping, expected ',' or '}}', but got ':'"
    ]


def test_empty_file_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", "# nothing yet\n")
    assert errors_of(path) == [f"{path}:1: empty file: a journey needs id, name, entry, stages"]


# --- shape errors, worded for the marketer -------------------------------------------------------


def test_unknown_key_lists_the_keys_expected_there(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        minimal(
            """\
            phase: awareness
            transitions:
              - on: page
                wher: {properties.path: /landing}
                to: first
        """
        ),
    )
    assert errors_of(path) == [f"{path}:9: unknown key 'wher' (expected one of: on, where, to)"]


def test_unknown_key_in_a_matcher_lists_the_operators(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry:
          on: page
          where: {properties.path: {startwith: /catalog}}
        stages: [{id: first, phase: awareness}]
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: unknown key 'startwith' (expected one of: eq, ne, in, not_in, gt, gte, lt, "
        "lte, startswith, endswith, contains, exists)"
    ]


def test_missing_key_is_reported_on_the_line_of_its_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", minimal("name: First\n"))
    assert errors_of(path) == [f"{path}:5: missing key 'phase'"]


def test_bad_phase_lists_the_phases(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", minimal("phase: awarness\n"))
    assert errors_of(path) == [
        f"{path}:6: bad phase 'awarness': expected one of awareness, consideration, purchase, "
        "retention, loyalty"
    ]


def test_bad_weekday_in_a_list_names_the_list(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        minimal()
        + textwrap.dedent(
            """\
            sequences:
              tips:
                window: {from: "09:00", to: "20:00", days: [mon, tuesday]}
                steps: [{wait: 1d}]
            """
        ),
    )
    assert errors_of(path) == [
        f"{path}:9: bad value 'tuesday' in days: expected one of mon, tue, wed, thu, fri, sat, sun"
    ]


def test_window_that_closes_when_it_opens_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        minimal()
        + textwrap.dedent(
            """\
            sequences:
              tips:
                window: {from: "09:00", to: "09:00"}
                steps: [{wait: 1d}]
            """
        ),
    )
    assert errors_of(path) == [
        f"{path}:9: a window opens and closes at different times, not both at 09:00; "
        'past midnight is fine, like from: "20:00", to: "08:00"'
    ]


def test_unknown_action_lists_the_actions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        minimal(
            """\
            phase: awareness
            on_enter:
              - audience.ad: visitors
        """
        ),
    )
    assert errors_of(path) == [
        f"{path}:8: unknown action 'audience.ad' (expected one of: audience.add, "
        "audience.remove, email.send, sequence.start, sequence.stop, offer.grant, trait.set)"
    ]


def test_bad_duration_is_reported_on_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        minimal(
            """\
            phase: awareness
            transitions:
              - {after: 2 hours, to: first}
        """
        ),
    )
    assert errors_of(path) == [
        f"{path}:8: bad duration '2 hours': write an integer and one unit of s, m, h, d, w "
        "(like 2h)"
    ]


@pytest.mark.parametrize("duration", ["3000000d", "99999999999w", "9999999999999999999s"])
def test_a_duration_beyond_ten_years_is_reported_not_crashed_on(
    tmp_path: Path, duration: str
) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        minimal(
            f"""\
            phase: awareness
            transitions:
              - {{after: {duration}, to: first}}
        """
        ),
    )
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:8: bad duration '{duration}'")


def test_bad_name_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", minimal().replace("id: demo", "id: Entry-Doors"))
    assert errors_of(path) == [
        f"{path}:1: bad name 'Entry-Doors': use only a-z, 0-9 and _ (like first_contact)"
    ]


def test_wrong_type_for_a_where_value_is_one_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry:
          on: page
          where:
            properties.path: [/a, /b]
        stages: [{id: first, phase: awareness}]
        """,
    )
    assert errors_of(path) == [
        f"{path}:6: properties.path: expected text, a number or true/false, got a list"
    ]


def test_list_whose_items_failed_is_not_also_reported_as_empty(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        minimal()
        + textwrap.dedent(
            """\
            sequences:
              tips:
                steps:
                  - send: catalog
            """
        ),
    )
    assert errors_of(path) == [
        f"{path}:10: a sequence step is `email: <template>` or `wait: <duration>`"
    ]


def test_empty_stage_list_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", "id: demo\nname: Demo\nentry: {on: page}\nstages: []\n")
    assert errors_of(path) == [f"{path}:4: stages: needs at least 1 item"]


def test_several_errors_in_one_file_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        nmae: Demo
        entry: {on: page}
        stages:
          - id: first
            phase: awarness
          - id: second
            phase: purchase
            terminal: maybe
        """,
    )
    assert errors_of(path) == [
        f"{path}:1: missing key 'name'",
        f"{path}:2: unknown key 'nmae' (expected one of: id, name, version, description, "
        "segment, entry, exit, goal, stages, sequences, offers, audiences)",
        f"{path}:6: bad phase 'awarness': expected one of awareness, consideration, purchase, "
        "retention, loyalty",
        f"{path}:9: terminal: expected true/false, got 'maybe'",
    ]


def test_errors_of_two_files_are_sorted_by_file_then_line(tmp_path: Path) -> None:
    second = write(tmp_path, "b.yaml", minimal("phase: awarness\n") + "colour: red\n")
    first = write(tmp_path, "a.yaml", minimal() + "colour: blue\n")
    errors = errors_of(second, first)
    assert [error.split(": ")[0] for error in errors] == [
        f"{first}:7",
        f"{second}:6",
        f"{second}:7",
    ]


# --- loading sets of files -----------------------------------------------------------------------


def test_spec_example_loads_without_errors(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    for name in DOORS_TEMPLATES:
        (templates / f"{name}.j2").touch()
    path = write(tmp_path, "doors.yaml", DOORS)

    journeys = load_journeys([path], templates)

    doors = journeys["doors"]
    assert [stage.id for stage in doors.stages] == [
        "first_contact",
        "retargeting",
        "landing",
        "nurturing",
        "cooling",
        "customer",
        "lost",
    ]
    assert doors.sequences["door_tips"].window is not None
    assert doors.sequences["door_tips"].window.from_ == "09:00"
    assert doors.first_stage.transitions == (
        OnEvent(on="page", where={"context.campaign.source": "facebook"}, to="landing"),
        AfterTimeout(after=timedelta(hours=2), to="retargeting"),
    )


def test_spec_example_with_its_unquoted_comma_is_an_unknown_key(tmp_path: Path) -> None:
    quoted = '{description: "Saw the catalog, did not come back"}'
    path = write(
        tmp_path,
        "doors.yaml",
        DOORS.replace(quoted, "{description: Saw the catalog, did not come back}"),
    )
    assert errors_of(path) == [
        f"{path}:79: unknown key 'did not come back' (expected one of: description, ttl)"
    ]


def test_journey_set_keeps_file_order_path_and_source_text(tmp_path: Path) -> None:
    second = write(tmp_path, "b.yaml", minimal().replace("id: demo", "id: second"))
    first = write(tmp_path, "a.yaml", minimal().replace("id: demo", "id: first"))

    journeys = load_journeys([second, first])

    assert journeys.ids == ("second", "first")
    assert [journey.id for journey in journeys] == ["second", "first"]
    assert len(journeys) == 2 and "first" in journeys and "third" not in journeys
    assert journeys.source("first").path == first
    assert journeys.source("first").text == first.read_text(encoding="utf-8")


def test_directory_gives_its_yaml_files_sorted_and_not_nested_ones(tmp_path: Path) -> None:
    write(tmp_path, "b.yml", minimal().replace("id: demo", "id: from_yml"))
    write(tmp_path, "a.yaml", minimal().replace("id: demo", "id: from_yaml"))
    write(tmp_path, "notes.txt", "not a journey")
    (tmp_path / "drafts").mkdir()
    write(tmp_path / "drafts", "c.yaml", "not: a journey")

    assert load_journeys([tmp_path]).ids == ("from_yaml", "from_yml")


def test_a_file_given_twice_is_loaded_once(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", minimal())
    assert load_journeys([tmp_path, path]).ids == ("demo",)


def test_missing_path_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    assert errors_of(path) == [f"{path}:1: no such file or directory"]


def test_journey_text_names_its_origin_in_errors() -> None:
    with pytest.raises(JourneyErrors) as raised:
        load_journey_text(minimal("phase: awarness\n"), Path("stored/demo@3.yaml"))
    assert raised.value.errors == [
        JourneyError(
            Path("stored/demo@3.yaml"),
            6,
            "bad phase 'awarness': expected one of awareness, consideration, purchase, "
            "retention, loyalty",
        )
    ]


def test_journey_file_loads_one_journey(tmp_path: Path) -> None:
    journey = load_journey_file(write(tmp_path, "demo.yaml", minimal()))
    assert isinstance(journey, Journey) and journey.id == "demo"


def test_journey_errors_message_is_one_error_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, "demo.yaml", minimal("phase: awarness\n") + "colour: red\n")
    with pytest.raises(JourneyErrors) as raised:
        load_journeys([path])
    assert str(raised.value).splitlines() == [str(error) for error in raised.value.errors]
