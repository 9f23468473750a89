"""Settings from the environment: defaults, and a bad value stops the start with its name."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.config import Settings


def test_timezone_and_frequency_cap_default_to_utc_and_no_cap() -> None:
    settings = Settings.from_env({})

    assert settings.default_timezone == "UTC"
    assert settings.frequency_cap is None


def test_good_timezone_and_frequency_cap_are_kept_as_written() -> None:
    settings = Settings.from_env(
        {"CJM_DEFAULT_TIMEZONE": " Europe/Moscow ", "CJM_FREQUENCY_CAP": "3/1d"}
    )

    assert settings.default_timezone == "Europe/Moscow"
    assert settings.frequency_cap == "3/1d"


@pytest.mark.parametrize("zone", ["Mars/Olympus", "europe/moscow", "../etc/passwd", "+03:00"])
def test_unknown_default_timezone_is_refused_with_the_variable_name(zone: str) -> None:
    with pytest.raises(
        ValueError, match=r"^CJM_DEFAULT_TIMEZONE: unknown timezone .*Europe/Berlin"
    ):
        Settings.from_env({"CJM_DEFAULT_TIMEZONE": zone})


@pytest.mark.parametrize("cap", ["3", "3 a day", "0/1d", "3/0d", "3/1y"])
def test_bad_frequency_cap_is_refused_with_the_variable_name(cap: str) -> None:
    with pytest.raises(ValueError, match=r"^CJM_FREQUENCY_CAP: bad frequency cap"):
        Settings.from_env({"CJM_FREQUENCY_CAP": cap})


@pytest.mark.parametrize(
    "sender", ["Portal Doors", "a@x.example, b@y.example", "team: a@x.example;", "news@"]
)
def test_a_sender_that_is_not_one_address_is_refused_with_the_variable_name(sender: str) -> None:
    with pytest.raises(ValueError, match=r"^CJM_EMAIL_FROM must name one address"):
        Settings.from_env({"CJM_EMAIL_FROM": sender})


@pytest.mark.parametrize("sender", ["news@shop.example", "Shop Ünited <news@shop.example>"])
def test_a_sender_with_or_without_a_name_is_kept_as_written(sender: str) -> None:
    assert Settings.from_env({"CJM_EMAIL_FROM": sender}).email_from == sender


def test_the_cli_reports_a_bad_frequency_cap_as_a_clean_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CJM_FREQUENCY_CAP", "3 a day")

    result = CliRunner().invoke(app, ["validate"])

    assert result.exit_code == 1
    assert result.output == (
        "CJM_FREQUENCY_CAP: bad frequency cap '3 a day': write a count, a slash and a duration, "
        "like 3/1d (at most 3 emails a day)\n"
    )


def test_email_links_default_to_this_server_on_its_port() -> None:
    assert Settings.from_env({"CJM_PORT": "8123"}).base_url == "http://127.0.0.1:8123"
    assert Settings.from_env({"CJM_HOST": "0.0.0.0"}).base_url == "http://127.0.0.1:8000"
    assert Settings.from_env({"CJM_HOST": "::1"}).base_url == "http://[::1]:8000"
    written = Settings.from_env({"CJM_BASE_URL": "https://cjm.example.com/", "CJM_PORT": "9"})
    assert written.base_url == "https://cjm.example.com"


@pytest.mark.parametrize(
    ("base_url", "insecure"),
    [
        ("https://cjm.example.com", False),
        ("http://127.0.0.1:8000", False),
        ("http://localhost:8000", False),
        ("http://cjm.example.com", True),
        ("http://10.0.0.5:8000", True),
    ],
)
def test_plain_http_links_to_another_machine_are_flagged(base_url: str, insecure: bool) -> None:
    assert Settings.from_env({"CJM_BASE_URL": base_url}).insecure_links is insecure
