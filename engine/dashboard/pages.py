"""The dashboard's HTML: Jinja2 templates shipped in this package, escaping everything.

Journey files and the database hold text that people typed (stage names, objections,
traits): every value is escaped on the way into a page, and the only markup let
through unescaped is the map's SVG, which ElementTree wrote and escaped itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from engine.dashboard.map import (
    JourneyMap,
    format_money,
    format_share,
    render_svg,
)
from engine.journey.model import format_duration

_pages = Environment(
    loader=PackageLoader("engine.dashboard", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def mask_email(address: str | None) -> str:
    """Enough of an address to tell two apart on a screen, not to write to: a…@example.com."""
    if not address:
        return "—"
    local, at, domain = address.partition("@")
    return f"{local[:1]}…{at}{domain}"


def _moment(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_pages.filters.update(
    share=format_share,
    money=format_money,
    duration=format_duration,
    moment=_moment,
    masked=mask_email,
)


def render(template: str, **context: Any) -> str:
    return _pages.get_template(template).render(**context)


def map_svg(journey_map: JourneyMap, *, stage_links: str | None = None) -> Markup:
    """The map's SVG, to be placed in a page as is (it escaped its own texts)."""
    return Markup(render_svg(journey_map, stage_links=stage_links))


def map_page(journey_map: JourneyMap) -> str:
    """The map as one standalone HTML page: the figures, the sources and the drawing,
    with its styles inline and nothing to fetch."""
    return render("map.html", journey_map=journey_map, svg=map_svg(journey_map))
