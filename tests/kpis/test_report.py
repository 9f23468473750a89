"""The report's arithmetic: quantiles from the time histogram, statuses against targets,
and per-stage figures from moves. Pure: no database."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from engine.kpis.report import Targets, quantile, stage_figures, status
from engine.kpis.rollup import bucket_bounds, bucket_of
from tests.worker.conftest import FUNNEL, write_funnel


def histogram(times: list[float]) -> list[tuple[int, int, float]]:
    buckets: dict[int, list[float]] = defaultdict(list)
    for seconds in times:
        buckets[bucket_of(seconds)].append(seconds)
    return sorted((bucket, len(values), sum(values)) for bucket, values in buckets.items())


@given(st.floats(min_value=0, max_value=10 * 365 * 86_400, allow_nan=False))
def test_a_time_falls_within_its_bucket(seconds: float) -> None:
    low, high = bucket_bounds(bucket_of(seconds))
    assert low <= seconds < high or math.isclose(seconds, low)


@given(st.lists(st.floats(min_value=0.5, max_value=90 * 86_400), min_size=1, max_size=200))
def test_quantiles_are_within_a_bucket_of_the_true_ones(times: list[float]) -> None:
    ordered = sorted(times)
    for q in (0.5, 0.9):
        true = ordered[max(1, math.ceil(q * len(ordered))) - 1]
        found = quantile(histogram(times), q)
        assert found is not None
        low, high = bucket_bounds(bucket_of(true))
        assert low * 0.999 <= found <= high * 1.001, (q, true, found)


def test_a_quantile_of_equal_times_is_exact() -> None:
    # A timeout moves everyone after the same time: the figure is that time, not a bucket.
    assert quantile(histogram([7200.0] * 9 + [60.0]), 0.5) == 7200.0
    assert quantile(histogram([7200.0] * 9 + [60.0]), 0.9) == 7200.0
    assert quantile([], 0.5) is None


def test_status_is_the_worst_verdict_of_the_targets_with_figures() -> None:
    targets = Targets(conversion=0.5, median_time_s=3600, p90_time_s=None)
    assert status(targets, 0.5, 3600, None) == "ok"
    assert status(targets, 0.45, 3000, None) == "warn"  # within 20% of the conversion
    assert status(targets, 0.39, 3000, None) == "bad"
    assert status(targets, 0.9, 4000, None) == "warn"  # 11% slower than the target
    assert status(targets, 0.9, 5000, None) == "bad"
    assert status(targets, None, None, None) == "none"  # nothing to judge yet
    assert status(Targets(), 0.1, 99_999, None) == "none"  # nothing to judge against


def test_stage_figures_from_moves(tmp_path: Path) -> None:
    funnel = write_funnel(tmp_path, FUNNEL).sources[0].journey
    moves = {
        ("", "visitor"): 4,
        ("visitor", "interested"): 1,
        ("visitor", "retarget"): 2,
        ("visitor", ""): 1,
        ("retarget", "lost"): 1,
        ("interested", "customer"): 1,
        ("", "gone_stage"): 1,  # a stage of an older version
    }
    figures = {f.stage: f for f in stage_figures(funnel, moves, {})}

    visitor = figures["visitor"]
    assert (visitor.entered, visitor.current) == (4, 0)
    assert visitor.exited_to == {"exit": 1, "interested": 1, "retarget": 2}
    assert visitor.conversion == 3 / 4  # on to two non-terminal stages; leaving is not
    assert figures["retarget"].conversion == 0.0  # lost is terminal
    assert figures["retarget"].current == 1
    assert (figures["lost"].entered, figures["lost"].current) == (1, 1)
    assert figures["interested"].conversion == 1.0  # customer: the goal's stage
    assert figures["customer"].status == "none"
    assert list(figures)[-1] == "gone_stage"
    assert figures["gone_stage"].phase is None
