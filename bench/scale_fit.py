"""bench/scale.py's fits, pure: how a measure grows with the node count N.

A measure per round with a fixed cost (a) and a cost per node (b) is fitted as a + b*N by
least squares over every repeat; its growth at scale is read from the log-log slope of the
top segment (the two largest N), not from one exponent through all points, which mixes
the fixed cost into the slope. tests/test_scale.py checks them on hand-made numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LinearFit:
    """value = intercept + slope * N, least squares; intercept in the value's unit (the fixed
    cost per round), slope in that unit per node. NaN with fewer than two distinct N."""

    intercept: float
    slope: float


def linear_fit(nodes: list[int], values: list[float]) -> LinearFit:
    """Least squares of `values` on `nodes` (several values per node count: repeats)."""
    points = [(float(n), v) for n, v in zip(nodes, values) if math.isfinite(v)]
    if len({x for x, _ in points}) < 2:
        return LinearFit(math.nan, math.nan)
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return LinearFit(mean_y - slope * mean_x, slope)


def segment_exponent(n_low: int, value_low: float, n_high: int, value_high: float) -> float:
    """The slope of log(value) on log(N) between two node counts (nan unless both values > 0)."""
    if value_low <= 0 or value_high <= 0 or n_low <= 0 or n_high <= n_low:
        return math.nan
    return math.log(value_high / value_low) / math.log(n_high / n_low)


def segment_exponents(nodes: list[int], values: list[float]) -> list[tuple[int, int, float]]:
    """(N_low, N_high, exponent) for each pair of neighbouring node counts, in order."""
    order = sorted(zip(nodes, values))
    return [(n0, n1, segment_exponent(n0, v0, n1, v1)) for (n0, v0), (n1, v1) in zip(order, order[1:])]


def top_segment_range(low: tuple[int, list[float]], high: tuple[int, list[float]]) -> tuple[float, float]:
    """The top segment's exponent over every pair of a repeat at the lower and one at the higher
    node count: its min and max (the spread the repeats allow)."""
    found = [segment_exponent(low[0], a, high[0], b) for a in low[1] for b in high[1]]
    found = [e for e in found if math.isfinite(e)]
    return (min(found), max(found)) if found else (math.nan, math.nan)



def growth(
    points: list[dict[str, Any]], configs: Sequence[str], fitted: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per configuration and fitted measure: the a + b*N fit over every repeat, each segment's
    exponent (medians) and the top segment's range over the repeats."""
    fits: dict[str, dict[str, dict[str, Any]]] = {}
    for config in configs:
        mine = sorted((p for p in points if p["config"] == config), key=lambda p: p["nodes"])
        fits[config] = {}
        for name in fitted:
            every = [(p["nodes"], r[name]) for p in mine for r in p["repeats"]]
            line = linear_fit([n for n, _ in every], [v for _, v in every])
            segments = segment_exponents([p["nodes"] for p in mine], [p[name] for p in mine])
            top = (
                top_segment_range((mine[-2]["nodes"], [r[name] for r in mine[-2]["repeats"]]),
                                  (mine[-1]["nodes"], [r[name] for r in mine[-1]["repeats"]]))
                if len(mine) > 1 else (math.nan, math.nan)
            )
            fits[config][name] = {"a": line.intercept, "b": line.slope, "segments": segments, "top_range": top}
    return fits
