"""Configuration from the environment (the CJM_* variables of the SPEC)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from channels.email.message import only_mailbox
from channels.email.pacing import FrequencyCap, load_zone

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./cjm.db"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    journeys_dir: Path = Path("journeys")
    templates_dir: Path = Path("templates/emails")
    smtp_url: str | None = None
    email_from: str = "cjm <cjm@localhost>"
    base_url: str = "http://127.0.0.1:8000"
    write_key: str | None = None
    admin_key: str | None = None
    signing_secret: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    default_timezone: str = "UTC"
    default_region: str | None = None
    frequency_cap: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(f"CJM_{name}", "").strip()
            return value or None

        port = get("PORT")
        if port is not None and not port.isdigit():
            raise ValueError(f"CJM_PORT must be a port number, not {port!r}")
        host = get("HOST") or cls.host
        port_number = int(port) if port else cls.port
        # Checked here so a typo stops the start with its variable's name, not a later send.
        default_timezone = get("DEFAULT_TIMEZONE") or cls.default_timezone
        try:
            load_zone(default_timezone)
        except ValueError as error:
            raise ValueError(f"CJM_DEFAULT_TIMEZONE: {error}") from None
        frequency_cap = get("FREQUENCY_CAP")
        if frequency_cap is not None:
            try:
                FrequencyCap.parse(frequency_cap)
            except ValueError as error:
                raise ValueError(f"CJM_FREQUENCY_CAP: {error}") from None
        email_from = get("EMAIL_FROM") or cls.email_from
        try:
            only_mailbox(email_from)
        except ValueError:
            raise ValueError(
                f"CJM_EMAIL_FROM must name one address, as in 'Shop <news@shop.example>',"
                f" not {email_from!r}"
            ) from None
        return cls(
            database_url=get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            journeys_dir=Path(get("JOURNEYS_DIR") or "journeys"),
            templates_dir=Path(get("TEMPLATES_DIR") or "templates/emails"),
            smtp_url=get("SMTP_URL"),
            email_from=email_from,
            base_url=(get("BASE_URL") or _local_url(host, port_number)).rstrip("/"),
            write_key=get("WRITE_KEY"),
            admin_key=get("ADMIN_KEY"),
            signing_secret=get("SIGNING_SECRET"),
            host=host,
            port=port_number,
            default_timezone=default_timezone,
            default_region=get("DEFAULT_REGION"),
            frequency_cap=frequency_cap,
        )

    @property
    def insecure_links(self) -> bool:
        """Whether email links would point at a plain-HTTP address on another machine: mail
        providers expect the one-click unsubscribe URL to be HTTPS (RFC 8058)."""
        parts = urlsplit(self.base_url)
        return parts.scheme != "https" and parts.hostname not in LOCAL_HOSTS


def _local_url(host: str, port: int) -> str:
    """Email links when CJM_BASE_URL is unset: this server as its own machine reaches it."""
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in reachable:  # an IPv6 address
        reachable = f"[{reachable}]"
    return f"http://{reachable}:{port}"
