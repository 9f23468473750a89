"""Checks that need the whole map or all journeys, each error on the line to fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.journey import JourneyErrors, load_journeys


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(*paths: Path, templates_dir: Path | None = None) -> list[str]:
    with pytest.raises(JourneyErrors) as raised:
        load_journeys(paths, templates_dir)
    return [str(error) for error in raised.value.errors]


def templates(directory: Path, *names: str) -> Path:
    folder = directory / "templates" / "emails"
    folder.mkdir(parents=True)
    for name in names:
        (folder / f"{name}.j2").write_text("{% block subject %}Hi{% endblock %}")
    return folder


# --- stages and transitions ----------------------------------------------------------------------


def test_unknown_stage_in_to_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first_contact
            phase: awareness
            transitions: [{on: page, to: landing}]
          - id: landing
            phase: consideration
            transitions:
              - after: 2d
                to: landng
        """,
    )
    assert errors_of(path) == [
        f"{path}:12: stage 'landing': transition to unknown stage 'landng' "
        "(stages: first_contact, landing)"
    ]


def test_duplicate_stage_id_is_reported_on_the_second(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first
            phase: awareness
            transitions: [{on: page, to: second}]
          - id: second
            phase: consideration
          - id: second
            phase: purchase
        """,
    )
    assert errors_of(path) == [f"{path}:10: duplicate stage id 'second' (first on line 8)"]


def test_stage_no_transition_reaches_is_unreachable(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first_contact
            phase: awareness
            transitions: [{after: 1d, to: lost}]
          - id: cooling
            phase: consideration
            transitions: [{after: 30d, to: lost}]
          - id: lost
            phase: awareness
            terminal: true
        """,
    )
    assert errors_of(path) == [f"{path}:8: stage 'cooling' is unreachable from 'first_contact'"]


def test_stage_reached_through_other_stages_is_reachable(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - {id: a, phase: awareness, transitions: [{on: page, to: b}]}
          - {id: c, phase: purchase}
          - {id: b, phase: consideration, transitions: [{after: 1d, to: c}, {on: x, to: a}]}
        """,
    )
    assert load_journeys([path]).ids == ("demo",)


def test_terminal_stage_with_transitions_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first
            phase: awareness
            transitions: [{after: 14d, to: lost}]
          - id: lost
            phase: awareness
            terminal: true
            transitions: [{on: page, to: first}]
        """,
    )
    assert errors_of(path) == [
        f"{path}:11: stage 'lost' is terminal (leads leave the journey there) but has transitions"
    ]


# --- names declared in the journey ---------------------------------------------------------------


def test_unknown_audience_is_reported_on_its_list_item(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first
            phase: awareness
            on_enter:
              - audience.remove:
                  - site_visitors
                  - catalog_abandoner
        audiences:
          site_visitors: {}
          catalog_abandoners: {}
        """,
    )
    assert errors_of(path) == [
        f"{path}:10: unknown audience 'catalog_abandoner' "
        "(audiences: site_visitors, catalog_abandoners)"
    ]


def test_unknown_sequence_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first
            phase: awareness
            on_enter:
              - sequence.start: door_tips
              - sequence.stop: door_tip
        sequences:
          door_tips:
            steps: [{wait: 1d}]
        """,
    )
    assert errors_of(path) == [f"{path}:9: unknown sequence 'door_tip' (sequences: door_tips)"]


def test_unknown_offer_when_none_is_declared_says_so(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first
            phase: awareness
            on_enter: [{offer.grant: free_install}]
        """,
    )
    assert errors_of(path) == [
        f"{path}:7: unknown offer 'free_install' (this journey declares no offers)"
    ]


def test_unused_sequence_and_offer_are_not_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages: [{id: first, phase: awareness}]
        sequences:
          door_tips: {steps: [{wait: 1d}]}
        offers:
          free_install: {title: Free installation, expires: {after: 5d}, code: "DOORS-{6}"}
        """,
    )
    assert load_journeys([path]).ids == ("demo",)


# --- templates -----------------------------------------------------------------------------------


def test_unknown_template_in_email_send_is_reported(tmp_path: Path) -> None:
    emails = templates(tmp_path, "order_thanks")
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first
            phase: purchase
            on_enter:
              - email.send: order_thanks
              - email.send: order_thnaks
        """,
    )
    assert errors_of(path, templates_dir=emails) == [
        f"{path}:9: unknown template 'order_thnaks' (no {emails}/order_thnaks.j2)"
    ]


def test_unknown_template_in_a_sequence_step_is_reported(tmp_path: Path) -> None:
    emails = templates(tmp_path, "catalog")
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first
            phase: consideration
            on_enter: [{sequence.start: door_tips}]
        sequences:
          door_tips:
            steps:
              - email: catalog
              - wait: 2d
              - email: catalg
        """,
    )
    assert errors_of(path, templates_dir=emails) == [
        f"{path}:13: unknown template 'catalg' (no {emails}/catalg.j2)"
    ]


def test_templates_are_not_checked_without_a_templates_dir(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages: [{id: first, phase: purchase, on_enter: [{email.send: order_thanks}]}]
        """,
    )
    assert load_journeys([path]).ids == ("demo",)


# --- across journeys -----------------------------------------------------------------------------


def test_journey_id_used_twice_is_reported_on_the_second_file(tmp_path: Path) -> None:
    journey = """\
        id: doors
        name: Doors
        entry: {on: page}
        stages: [{id: first, phase: awareness}]
        """
    first = write(tmp_path, "a.yaml", journey)
    second = write(tmp_path, "b.yaml", "# a copy\n" + textwrap.dedent(journey))
    assert errors_of(tmp_path) == [f"{second}:2: journey id 'doors' is already used by {first}"]


def test_audience_declared_by_two_journeys_is_reported_on_the_second(tmp_path: Path) -> None:
    first = write(
        tmp_path,
        "doors.yaml",
        """\
        id: doors
        name: Doors
        entry: {on: page}
        stages: [{id: first, phase: awareness}]
        audiences:
          site_visitors: {}
        """,
    )
    second = write(
        tmp_path,
        "windows.yaml",
        """\
        id: windows
        name: Windows
        entry: {on: page}
        stages: [{id: first, phase: awareness}]
        audiences:
          buyers: {}
          site_visitors: {description: Everyone who saw the windows}
        """,
    )
    assert errors_of(first, second) == [
        f"{second}:7: audience 'site_visitors' is already declared by journey 'doors' ({first})"
    ]


def test_several_map_errors_in_one_file_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "demo.yaml",
        """\
        id: demo
        name: Demo
        entry: {on: page}
        stages:
          - id: first
            phase: awareness
            on_enter: [{audience.add: visitors}]
            transitions: [{on: page, to: secnd}]
          - id: second
            phase: consideration
        """,
    )
    assert errors_of(path) == [
        f"{path}:7: unknown audience 'visitors' (this journey declares no audiences)",
        f"{path}:8: stage 'first': transition to unknown stage 'secnd' (stages: first, second)",
        f"{path}:9: stage 'second' is unreachable from 'first'",
    ]


def test_map_errors_of_one_file_and_shape_errors_of_another_are_reported_together(
    tmp_path: Path,
) -> None:
    broken = write(tmp_path, "a.yaml", "id: a\nname: A\nentry: {on: page}\n")
    unreachable = write(
        tmp_path,
        "b.yaml",
        """\
        id: b
        name: B
        entry: {on: page}
        stages: [{id: first, phase: awareness}, {id: second, phase: purchase}]
        """,
    )
    assert errors_of(tmp_path) == [
        f"{broken}:1: missing key 'stages'",
        f"{unreachable}:4: stage 'second' is unreachable from 'first'",
    ]
