"""A journey drawn as a customer journey map: what the dashboard shows and `cjm map` writes.

Stages are cards in columns grouped by phase (awareness → loyalty), with their
touchpoints, objections and emotions; arrows are the moves between stages and out of
the journey, labelled with how many leads took them; each card is coloured by its KPI
status. Pure: a journey and, optionally, its KPI report in; a layout, then SVG, out.
The report is read in the shape `GET /v1/journeys/{id}/kpis` answers, so the page, a
file and the API agree by construction.

The geometry is computed here rather than left to a browser so that a standalone SVG
looks the same in any viewer: text is wrapped by an estimate of its width, and arrows
run in lanes above the row of cards (moves back) and below it (moves on).
"""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from engine.journey.model import (
    PHASES,
    AfterTimeout,
    ExitRule,
    Journey,
    Matcher,
    OnEvent,
    Stage,
    StageKpi,
    format_duration,
)

T = TypeVar("T")

SVG_NAMESPACE = "http://www.w3.org/2000/svg"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
EXIT = "exit"  # the key of `exited_to` counting the leads that left the journey from a stage

Status = Literal["ok", "warn", "bad", "none"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "bad", "none")
# (fill, stroke) of a stage card by KPI status.
STATUS_COLOURS: Mapping[str, tuple[str, str]] = {
    "ok": ("#e8f5e9", "#2e7d32"),
    "warn": ("#fff8e1", "#f9a825"),
    "bad": ("#ffebee", "#c62828"),
    "none": ("#f5f5f5", "#9e9e9e"),
}
STATUS_MEANINGS: Mapping[str, str] = {
    "ok": "on target",
    "warn": "near target",
    "bad": "off target",
    "none": "no target or no data",
}
PHASE_COLOURS: Mapping[str, str] = {
    "awareness": "#e3f2fd",
    "consideration": "#ede7f6",
    "purchase": "#e8f5e9",
    "retention": "#fff3e0",
    "loyalty": "#fce4ec",
}
INK, MUTED, EDGE, EDGE_UNUSED = "#212121", "#616161", "#546e7a", "#b0bec5"

MARGIN = 24
CARD_WIDTH = 220
COLUMN_GAP = 64
CARD_PADDING = 12
LANE_SPACING = 22
PHASE_BAND_HEIGHT = 26
CHIP_HEIGHT = 16
LINE_HEIGHT = 1.3
# Average glyph widths of a sans-serif face, as a share of the font size: on the wide
# side, so that wrapped text stays inside its card in any common font.
GLYPH_WIDTH = 0.6
BOLD_GLYPH_WIDTH = 0.64


@dataclass(frozen=True)
class Style:
    size: float
    bold: bool = False
    colour: str = INK
    italic: bool = False


STYLES: Mapping[str, Style] = {
    "title": Style(16, bold=True),
    "subtitle": Style(11.5, colour=MUTED),
    "headline": Style(12.5, bold=True),
    "stage": Style(13, bold=True),
    "meta": Style(10, colour=MUTED),
    "figures": Style(12, bold=True),
    "kpi": Style(10.5),
    "section": Style(9, bold=True, colour=MUTED),
    "objection": Style(11, italic=True),
    "chip": Style(10),
    "label": Style(10, bold=True),
}


# --- the KPI report, as the API answers it ------------------------------------------------------


@dataclass(frozen=True)
class StageFigures:
    entered: int
    current: int
    exited_to: Mapping[str, int]
    conversion: float | None
    median_time_s: float | None
    p90_time_s: float | None
    status: Status


@dataclass(frozen=True)
class Totals:
    leads: int
    customers: int
    conversion: float
    average_value: float
    purchases_per_customer: float
    revenue: float


@dataclass(frozen=True)
class Figures:
    """What the map shows of a KPI report (the JSON of `GET /v1/journeys/{id}/kpis`)."""

    start: str | None
    end: str | None
    totals: Totals
    by_source: Mapping[str, Totals]
    stages: Mapping[str, StageFigures]

    @classmethod
    def of(cls, report: Mapping[str, Any]) -> Figures:
        return cls(
            start=report.get("from"),
            end=report.get("to"),
            totals=_totals(report["totals"]),
            by_source={str(name): _totals(item) for name, item in report["by_source"].items()},
            stages={str(item["stage"]): _stage_figures(item) for item in report["stages"]},
        )

    def taken(self, source: str, target: str) -> int:
        """How many leads moved from stage `source` to `target` (or EXIT)."""
        stage = self.stages.get(source)
        return stage.exited_to.get(target, 0) if stage is not None else 0


def _totals(item: Mapping[str, Any]) -> Totals:
    return Totals(
        leads=int(item["leads"]),
        customers=int(item["customers"]),
        conversion=float(item["conversion"]),
        average_value=float(item["average_value"]),
        purchases_per_customer=float(item["purchases_per_customer"]),
        revenue=float(item["revenue"]),
    )


def _stage_figures(item: Mapping[str, Any]) -> StageFigures:
    def optional(name: str) -> float | None:
        value = item.get(name)
        return None if value is None else float(value)

    status = item.get("status")
    return StageFigures(
        entered=int(item["entered"]),
        current=int(item["current"]),
        exited_to={str(target): int(count) for target, count in item["exited_to"].items()},
        conversion=optional("conversion"),
        median_time_s=optional("median_time_s"),
        p90_time_s=optional("p90_time_s"),
        status=status if status in STATUSES else "none",
    )


# --- the layout -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paragraph:
    """One piece of text, wrapped into lines; `style` names its look in STYLES."""

    x: float
    y: float
    lines: tuple[str, ...]
    style: str


@dataclass(frozen=True)
class Chip:
    x: float
    y: float
    width: float
    text: str


@dataclass(frozen=True)
class Card:
    stage: Stage
    status: Status
    figures: StageFigures | None
    x: float
    y: float
    width: float
    height: float
    paragraphs: tuple[Paragraph, ...]
    chips: tuple[Chip, ...]


@dataclass(frozen=True)
class Arrow:
    """A move from one stage to another, or out of the journey (`target` EXIT)."""

    source: str
    target: str
    # Each rule making the move, in full, for a tooltip.
    rules: tuple[str, ...]
    count: int | None
    points: tuple[tuple[float, float], ...]
    label: str
    label_at: tuple[float, float]
    # Only timeouts make this move: drawn dashed.
    timeout_only: bool
    width: float


@dataclass(frozen=True)
class PhaseBand:
    phase: str
    x: float
    y: float
    width: float


@dataclass(frozen=True)
class ExitBar:
    """Where the arrows out of the journey end."""

    x: float
    y: float
    width: float
    text: str


@dataclass(frozen=True)
class JourneyMap:
    journey: Journey
    figures: Figures | None
    width: float
    height: float
    header: tuple[Paragraph, ...]
    phases: tuple[PhaseBand, ...]
    cards: tuple[Card, ...]
    arrows: tuple[Arrow, ...]
    exit_bar: ExitBar | None


@dataclass(frozen=True)
class _Move:
    source: str
    target: str
    triggers: tuple[str, ...]
    rules: tuple[str, ...]
    timeout_only: bool
    count: int | None


def lay_out(journey: Journey, report: Mapping[str, Any] | None = None) -> JourneyMap:
    """The map of `journey`; with its KPI report, the figures and colours too."""
    figures = Figures.of(report) if report is not None else None
    ordered = sorted(journey.stages, key=lambda stage: PHASES.index(stage.phase))
    column = {stage.id: index for index, stage in enumerate(ordered)}

    def card_x(stage_id: str) -> float:
        return MARGIN + column[stage_id] * (CARD_WIDTH + COLUMN_GAP)

    header = _header(journey, figures)
    phases_y = header[-1].y + 20
    moves = _moves(journey, figures)
    exits = _exits(journey, figures)
    ports = _ports(moves, exits, column, card_x)
    forward = [move for move in moves if column[move.target] > column[move.source]]
    backward = [move for move in moves if column[move.target] <= column[move.source]]
    top_lanes = _lanes(backward, ports)
    bottom_lanes = _lanes(forward, ports)

    cards_top = phases_y + PHASE_BAND_HEIGHT + 16
    if top_lanes:
        cards_top += (max(top_lanes.values()) + 1) * LANE_SPACING + 10
    contents = [_card_contents(stage, figures, card_x(stage.id), cards_top) for stage in ordered]
    card_height = max(height for _, _, height in contents)
    cards_bottom = cards_top + card_height
    bottom = cards_bottom + 10 + (max(bottom_lanes.values(), default=-1) + 1) * LANE_SPACING

    largest = max((move.count or 0 for move in [*moves, *exits]), default=0)
    arrows: list[Arrow] = []
    for move in backward:
        lane_y = cards_top - 16 - top_lanes[move] * LANE_SPACING
        start, end = ports[(move, "out")], ports[(move, "in")]
        points = ((start, cards_top), (start, lane_y), (end, lane_y), (end, cards_top - 1))
        arrows.append(_arrow(move, points, ((start + end) / 2, lane_y), largest))
    for move in forward:
        lane_y = cards_bottom + 16 + bottom_lanes[move] * LANE_SPACING
        start, end = ports[(move, "out")], ports[(move, "in")]
        points = ((start, cards_bottom), (start, lane_y), (end, lane_y), (end, cards_bottom + 1))
        arrows.append(_arrow(move, points, ((start + end) / 2, lane_y), largest))

    columns_width = len(ordered) * (CARD_WIDTH + COLUMN_GAP) - COLUMN_GAP
    exit_bar = None
    if exits:
        bar_y = bottom + 34
        on = ", ".join(rule.on for rule in journey.exit)
        text = f"Left the journey (on {on})" if on else "Left the journey"
        exit_bar = ExitBar(MARGIN, bar_y, columns_width, text)
        for move in exits:
            x = ports[(move, "out")]
            label_at = (x + 6 + _text_width(_label(move), STYLES["label"]) / 2, bar_y - 12)
            arrows.append(_arrow(move, ((x, cards_bottom), (x, bar_y - 1)), label_at, largest))
        bottom = bar_y + 24

    cards = []
    for stage, (paragraphs, chips, _) in zip(ordered, contents, strict=True):
        stage_figures = figures.stages.get(stage.id) if figures is not None else None
        cards.append(
            Card(
                stage=stage,
                status=stage_figures.status if stage_figures is not None else "none",
                figures=stage_figures,
                x=card_x(stage.id),
                y=cards_top,
                width=CARD_WIDTH,
                height=card_height,
                paragraphs=tuple(paragraphs),
                chips=tuple(chips),
            )
        )
    header_width = max(_text_width(line, STYLES[p.style]) for p in header for line in p.lines)
    legend_width = _legend_width() + MARGIN if figures is not None else 0
    return JourneyMap(
        journey=journey,
        figures=figures,
        width=MARGIN * 2 + max(columns_width, header_width + legend_width),
        height=bottom + MARGIN,
        header=header,
        phases=_phase_bands(ordered, card_x, phases_y),
        cards=tuple(cards),
        arrows=tuple(arrows),
        exit_bar=exit_bar,
    )


def _moves(journey: Journey, figures: Figures | None) -> list[_Move]:
    """One move per (stage, next stage): the rules making it, and how many leads took it."""
    rules: dict[tuple[str, str], list[OnEvent | AfterTimeout]] = {}
    for stage in journey.stages:
        for transition in stage.transitions:
            rules.setdefault((stage.id, transition.to), []).append(transition)
    if figures is not None:
        # Moves no rule of this version makes (leads on an older one) are drawn too: every
        # lead counted is on the map.
        for source, stage_figures in figures.stages.items():
            for target, count in stage_figures.exited_to.items():
                known = source in journey.stage_by_id and target in journey.stage_by_id
                if known and count and (source, target) not in rules:
                    rules[(source, target)] = []
    return [
        _Move(
            source=source,
            target=target,
            triggers=tuple(_trigger(rule) for rule in made_by) or ("other",),
            rules=tuple(_rule_text(rule) for rule in made_by) or ("a rule of another version",),
            timeout_only=bool(made_by) and all(isinstance(r, AfterTimeout) for r in made_by),
            count=figures.taken(source, target) if figures is not None else None,
        )
        for (source, target), made_by in rules.items()
    ]


def _exits(journey: Journey, figures: Figures | None) -> list[_Move]:
    """A way out of the journey from each stage an exit rule can end the run in, and from
    any stage the figures saw leads leave from (a merge ends a run too)."""
    moves = []
    for stage in journey.stages:
        count = figures.taken(stage.id, EXIT) if figures is not None else None
        if (journey.exit and not stage.terminal) or count:
            moves.append(
                _Move(
                    source=stage.id,
                    target=EXIT,
                    triggers=tuple(rule.on for rule in journey.exit),
                    rules=tuple(_rule_text(rule) for rule in journey.exit) or ("a merge",),
                    timeout_only=False,
                    count=count,
                )
            )
    return moves


def _trigger(rule: OnEvent | AfterTimeout) -> str:
    if isinstance(rule, AfterTimeout):
        return f"after {format_duration(rule.after)}"
    return rule.on


def _rule_text(rule: OnEvent | AfterTimeout | ExitRule) -> str:
    if isinstance(rule, AfterTimeout):
        return f"after {format_duration(rule.after)} in the stage"
    conditions = [
        f"{path} {value.operator} {value.operand!r}"
        if isinstance(value, Matcher)
        else f"{path} = {value!r}"
        for path, value in (rule.where or {}).items()
    ]
    return rule.on + (f" where {' and '.join(conditions)}" if conditions else "")


def _ports(
    moves: Sequence[_Move],
    exits: Sequence[_Move],
    column: Mapping[str, int],
    card_x: Callable[[str], float],
) -> dict[tuple[_Move, str], float]:
    """Where each arrow leaves ("out") and enters ("in") its cards, spread along their
    edges in the order that keeps arrows in nested lanes from crossing at a card.

    Below a card (moves on): arrows coming from the left, nearest first; the way out of
    the journey; arrows leaving to the right, farthest first. Above (moves back): arrows
    leaving to the left, nearest first; arrows coming from the right, farthest first.
    """
    below: dict[str, list[tuple[tuple[int, int], _Move, str]]] = {}
    above: dict[str, list[tuple[tuple[int, int], _Move, str]]] = {}
    for move in moves:
        span = column[move.target] - column[move.source]
        if span > 0:
            below.setdefault(move.target, []).append(((0, span), move, "in"))
            below.setdefault(move.source, []).append(((2, -span), move, "out"))
        else:
            above.setdefault(move.source, []).append(((0, -span), move, "out"))
            above.setdefault(move.target, []).append(((1, span), move, "in"))
    for move in exits:
        below.setdefault(move.source, []).append(((1, 0), move, "out"))
    ports: dict[tuple[_Move, str], float] = {}
    for side in (below, above):
        for stage_id, users in side.items():
            users.sort(key=lambda user: user[0])
            step = CARD_WIDTH / (len(users) + 1)
            for index, (_, move, end) in enumerate(users):
                ports[(move, end)] = card_x(stage_id) + step * (index + 1)
    return ports


def _lanes(moves: Sequence[_Move], ports: Mapping[tuple[_Move, str], float]) -> dict[_Move, int]:
    """A lane for each arrow: shorter arrows nearer the cards, and never two arrows that
    would overlap (with their labels) in one lane."""
    taken: list[list[tuple[float, float]]] = []
    lanes: dict[_Move, int] = {}

    def extent(move: _Move) -> tuple[float, float]:
        start, end = ports[(move, "out")], ports[(move, "in")]
        middle, half = (start + end) / 2, _text_width(_label(move), STYLES["label"]) / 2 + 6
        return min(start, end, middle - half) - 6, max(start, end, middle + half) + 6

    for move in sorted(moves, key=lambda m: abs(ports[(m, "in")] - ports[(m, "out")])):
        low, high = extent(move)
        lane = next(
            (
                index
                for index, spans in enumerate(taken)
                if all(high < start or low > end for start, end in spans)
            ),
            len(taken),
        )
        if lane == len(taken):
            taken.append([])
        taken[lane].append((low, high))
        lanes[move] = lane
    return lanes


def _label(move: _Move) -> str:
    triggers = " / ".join(move.triggers) if move.target != EXIT else ""
    if move.count is None:
        return triggers
    return f"{move.count:,} · {triggers}" if triggers else f"{move.count:,}"


def _arrow(
    move: _Move,
    points: tuple[tuple[float, float], ...],
    label_at: tuple[float, float],
    largest: int,
) -> Arrow:
    return Arrow(
        source=move.source,
        target=move.target,
        rules=move.rules,
        count=move.count,
        points=points,
        label=_label(move),
        label_at=label_at,
        timeout_only=move.timeout_only,
        # Thicker for the roads more leads took.
        width=1.5 + 3.5 * move.count / largest if move.count and largest else 1.5,
    )


def _phase_bands(
    ordered: Sequence[Stage], card_x: Callable[[str], float], y: float
) -> tuple[PhaseBand, ...]:
    bands: list[PhaseBand] = []
    for stage in ordered:
        x = card_x(stage.id)
        if bands and bands[-1].phase == stage.phase:
            bands[-1] = replace(bands[-1], width=x + CARD_WIDTH - bands[-1].x)
        else:
            bands.append(PhaseBand(stage.phase, x, y, CARD_WIDTH))
    return tuple(bands)


# --- what the texts say -------------------------------------------------------------------------


def _text_width(text: str, style: Style) -> float:
    return len(text) * style.size * (BOLD_GLYPH_WIDTH if style.bold else GLYPH_WIDTH)


def _wrap(text: str, style: Style, width: float) -> tuple[str, ...]:
    per_char = style.size * (BOLD_GLYPH_WIDTH if style.bold else GLYPH_WIDTH)
    return tuple(textwrap.wrap(text, width=max(int(width / per_char), 8))) or ("",)


def _header(journey: Journey, figures: Figures | None) -> tuple[Paragraph, ...]:
    subtitle = f"{journey.id} v{journey.version}"
    if journey.segment is not None:
        subtitle += f" · {journey.segment.name}"
    paragraphs = [
        Paragraph(MARGIN, MARGIN + 14, (journey.name,), "title"),
        Paragraph(MARGIN, MARGIN + 32, (subtitle,), "subtitle"),
    ]
    if figures is not None:
        totals = figures.totals
        period = f"{figures.start or 'the start'} to {figures.end or 'today'}"
        headline = (
            f"L {totals.leads:,} leads · C {format_share(totals.conversion)} · "
            f"P {format_money(totals.average_value)} · Q {totals.purchases_per_customer:.2f} · "
            f"revenue {format_money(totals.revenue)} · {period}"
        )
        paragraphs.append(Paragraph(MARGIN, MARGIN + 54, (headline,), "headline"))
    return tuple(paragraphs)


def _card_contents(
    stage: Stage, figures: Figures | None, left: float, top: float
) -> tuple[list[Paragraph], list[Chip], float]:
    """A card's texts and chips for a card at (left, top), and the height they need."""
    inner = CARD_WIDTH - 2 * CARD_PADDING
    paragraphs: list[Paragraph] = []
    chips: list[Chip] = []
    y = top + CARD_PADDING + 8

    def add(text: str, style_name: str, gap: float = 0) -> None:
        nonlocal y
        style = STYLES[style_name]
        y += gap
        lines = _wrap(text, style, inner)
        paragraphs.append(Paragraph(left + CARD_PADDING, y + style.size * 0.8, lines, style_name))
        y += len(lines) * style.size * LINE_HEIGHT

    def add_chips(words: Iterable[str]) -> None:
        nonlocal y
        style = STYLES["chip"]
        x = 0.0
        y += 2
        for word in words:
            text = word
            if _text_width(text, style) + 12 > inner:
                text = text[: max(int((inner - 12) / (style.size * GLYPH_WIDTH)) - 1, 1)] + "…"
            width = _text_width(text, style) + 12
            if x and x + width > inner:
                x = 0
                y += CHIP_HEIGHT + 4
            chips.append(Chip(left + CARD_PADDING + x, y, width, text))
            x += width + 4
        y += CHIP_HEIGHT + 2

    add(stage.title, "stage")
    add(stage.id + (" · terminal" if stage.terminal else ""), "meta", 1)
    stage_figures = figures.stages.get(stage.id) if figures is not None else None
    if figures is not None:
        entered = stage_figures.entered if stage_figures is not None else 0
        current = stage_figures.current if stage_figures is not None else 0
        add(f"entered {entered:,} · now {current:,}", "figures", 6)
    for line in _kpi_lines(stage, stage_figures):
        add(line, "kpi", 2)
    if stage.touchpoints:
        add("TOUCHPOINTS", "section", 8)
        add_chips(stage.touchpoints)
    if stage.objections:
        add("OBJECTIONS", "section", 8)
        for objection in stage.objections:
            add(f"“{objection}”", "objection", 2)
    if stage.emotions:
        add("EMOTIONS", "section", 8)
        add_chips(stage.emotions)
    return paragraphs, chips, y + CARD_PADDING - top


def _kpi_lines(stage: Stage, figures: StageFigures | None) -> list[str]:
    """Each measure the stage has a figure or a target for: `measured · target`."""
    target = stage.kpi or StageKpi()
    measures = (
        (
            "conversion",
            _shown(figures.conversion if figures else None, format_share),
            _shown(target.conversion, format_share),
        ),
        (
            "median time",
            _shown(figures.median_time_s if figures else None, format_seconds),
            # A time target as the YAML spells it: 1d, not 24h.
            _shown(target.median_time, format_duration),
        ),
        (
            "p90 time",
            _shown(figures.p90_time_s if figures else None, format_seconds),
            _shown(target.p90_time, format_duration),
        ),
    )
    lines = []
    for name, measured, wanted in measures:
        if measured is not None and wanted is not None:
            lines.append(f"{name} {measured} · target {wanted}")
        elif measured is not None:
            lines.append(f"{name} {measured}")
        elif wanted is not None:
            lines.append(f"{name} target {wanted}")
    return lines


def _shown(value: T | None, show: Callable[[T], str]) -> str | None:
    return None if value is None else show(value)


def format_share(value: float) -> str:
    return f"{value:.1%}"


def format_money(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def format_seconds(seconds: float) -> str:
    """A time in the largest unit that keeps it readable: 45s, 12m, 3.5h, 2.1d."""
    if 0 < seconds < 1:
        return "<1s"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f}".removesuffix(".0") + "h"
    return f"{seconds / 86400:.1f}".removesuffix(".0") + "d"


# --- SVG ----------------------------------------------------------------------------------------


def render_svg(journey_map: JourneyMap, *, stage_links: str | None = None) -> str:
    """The map as one standalone SVG document: no script, nothing fetched.

    With `stage_links`, a URL prefix, each card links to `<prefix><stage id>`.
    """
    width, height = _n(journey_map.width), _n(journey_map.height)
    root = ET.Element("svg")
    _set(
        root,
        xmlns=SVG_NAMESPACE,
        viewBox=f"0 0 {width} {height}",
        width=width,
        height=height,
        font_family=FONT,
        role="img",
        class_="journey-map",
        data_journey=journey_map.journey.id,
    )
    _add(root, "title", f"{journey_map.journey.name}: customer journey map")
    _add(root, "rect", width="100%", height="100%", fill="#ffffff")
    for paragraph in journey_map.header:
        _paragraph(root, paragraph)
    if journey_map.figures is not None:
        _legend(root, journey_map.width - MARGIN, MARGIN + 4)
    for band in journey_map.phases:
        group = _add(root, "g", class_="phase", data_phase=band.phase)
        _add(group, "rect", x=band.x, y=band.y, width=band.width, height=PHASE_BAND_HEIGHT)
        _set(group[-1], rx=4, fill=PHASE_COLOURS[band.phase])
        _add(group, "text", band.phase.upper(), x=band.x + band.width / 2, y=band.y + 17)
        _set(group[-1], text_anchor="middle", font_size=12, font_weight=700, letter_spacing="1")
    if journey_map.exit_bar is not None:
        bar = journey_map.exit_bar
        group = _add(root, "g", class_="exit-bar")
        _add(group, "rect", x=bar.x, y=bar.y, width=bar.width, height=24, rx=4)
        _set(group[-1], fill="#eceff1", stroke=EDGE_UNUSED)
        _add(group, "text", bar.text, x=bar.x + 10, y=bar.y + 16, font_size=11, fill=MUTED)
    for card in journey_map.cards:
        _card(root, card, stage_links)
    for arrow in journey_map.arrows:
        _arrow_element(root, arrow)
    return ET.tostring(root, encoding="unicode")


def _n(value: float) -> str:
    """A number, short: 12 rather than 12.0, 12.5 rather than 12.500000001."""
    return f"{value:.1f}".removesuffix(".0")


def _set(element: ET.Element, **attributes: str | float) -> None:
    """Set SVG attributes given as keywords: `font_size` is font-size, `class_` is class."""
    for name, value in attributes.items():
        key = name.removesuffix("_").replace("_", "-")
        element.set(key, value if isinstance(value, str) else _n(value))


def _add(
    parent: ET.Element, tag: str, text: str | None = None, **attributes: str | float
) -> ET.Element:
    element = ET.SubElement(parent, tag)
    _set(element, **attributes)
    element.text = text
    return element


def _paragraph(parent: ET.Element, paragraph: Paragraph) -> None:
    style = STYLES[paragraph.style]
    text = _add(parent, "text", x=paragraph.x, y=paragraph.y, font_size=style.size)
    _set(text, fill=style.colour, class_=paragraph.style)
    if style.bold:
        _set(text, font_weight=700)
    if style.italic:
        _set(text, font_style="italic")
    if paragraph.style == "section":
        _set(text, letter_spacing="0.8")
    if len(paragraph.lines) == 1:
        text.text = paragraph.lines[0]
        return
    for index, line in enumerate(paragraph.lines):
        _add(text, "tspan", line, x=paragraph.x, dy=0 if index == 0 else style.size * LINE_HEIGHT)


def _legend_width() -> float:
    return sum(_text_width(STATUS_MEANINGS[s], STYLES["meta"]) + 22 for s in STATUSES)


def _legend(parent: ET.Element, right: float, y: float) -> None:
    group = _add(parent, "g", class_="legend")
    x = right
    for status in reversed(STATUSES):
        meaning = STATUS_MEANINGS[status]
        x -= _text_width(meaning, STYLES["meta"]) + 22
        fill, stroke = STATUS_COLOURS[status]
        _add(group, "rect", x=x, y=y, width=12, height=12, rx=2, fill=fill, stroke=stroke)
        _set(group[-1], stroke_width=2)
        _add(group, "text", meaning, x=x + 16, y=y + 10, font_size=10, fill=MUTED)


def _card(parent: ET.Element, card: Card, stage_links: str | None) -> None:
    holder = parent
    if stage_links is not None:
        holder = _add(parent, "a", href=stage_links + card.stage.id)
    group = _add(holder, "g", class_="stage", data_stage=card.stage.id, data_status=card.status)
    _set(group, data_phase=card.stage.phase)
    if card.figures is not None:
        _set(group, data_entered=str(card.figures.entered), data_current=str(card.figures.current))
    _add(group, "title", f"{card.stage.title}: {card.stage.description or card.stage.id}")
    fill, stroke = STATUS_COLOURS[card.status]
    _add(group, "rect", x=card.x, y=card.y, width=card.width, height=card.height, rx=8)
    _set(group[-1], fill=fill, stroke=stroke, stroke_width=2)
    if card.stage.terminal:
        _set(group[-1], stroke_dasharray="6 4")
    _add(group, "rect", x=card.x + 1, y=card.y + 1, width=card.width - 2, height=6, rx=3)
    _set(group[-1], fill=stroke)
    for chip in card.chips:
        _add(group, "rect", x=chip.x, y=chip.y, width=chip.width, height=CHIP_HEIGHT, rx=8)
        _set(group[-1], fill="#ffffff", stroke="#cfd8dc")
        _add(group, "text", chip.text, x=chip.x + 6, y=chip.y + 11.5, class_="chip")
        _set(group[-1], font_size=STYLES["chip"].size, fill=INK)
    for paragraph in card.paragraphs:
        _paragraph(group, paragraph)


def _arrow_element(parent: ET.Element, arrow: Arrow) -> None:
    group = _add(parent, "g", class_="move", data_from=arrow.source, data_to=arrow.target)
    if arrow.count is not None:
        _set(group, data_count=str(arrow.count))
    counted = f"{arrow.count:,} leads: " if arrow.count is not None else ""
    rules = "; ".join(arrow.rules)
    _add(group, "title", f"{counted}{arrow.source} → {arrow.target} on {rules}")
    colour = EDGE_UNUSED if arrow.count == 0 else EDGE
    path = " ".join(
        f"{'M' if index == 0 else 'L'}{_n(x)},{_n(y)}" for index, (x, y) in enumerate(arrow.points)
    )
    _add(group, "path", d=path, fill="none", stroke=colour, stroke_width=arrow.width)
    _set(group[-1], stroke_linejoin="round")
    if arrow.timeout_only:
        _set(group[-1], stroke_dasharray="5 4")
    (x, y), (_, before) = arrow.points[-1], arrow.points[-2]
    back = y - 8 if y > before else y + 8  # the head points down into a card, or up
    head = f"{_n(x)},{_n(y)} {_n(x - 4.5)},{_n(back)} {_n(x + 4.5)},{_n(back)}"
    _add(group, "polygon", points=head, fill=colour)
    if arrow.label:
        label_x, label_y = arrow.label_at
        width = _text_width(arrow.label, STYLES["label"]) + 8
        _add(group, "rect", x=label_x - width / 2, y=label_y - 8, width=width, height=16, rx=3)
        _set(group[-1], fill="#ffffff", stroke=colour, stroke_width=0.75)
        _add(group, "text", arrow.label, x=label_x, y=label_y + 3.5, class_="count")
        _set(group[-1], text_anchor="middle", font_size=10, font_weight=700, fill=INK)
