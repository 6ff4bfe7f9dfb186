"""Paired confidence intervals over whole eval rounds: every CI of a report.

Data flow: the evaluator hands every row's per-round `RoundStats` (all over the same R eval
rounds) to `paired_intervals`, with the pairs of rows whose differences it wants (the
gains). Other callers pass their own rows the same way: `collective hostile` (variants of
a run), `evaluate/paired.py` (two sweep cells on the same eval tokens). `gap_share` is the
evaluator's share of the gap to the yardstick (a ratio of two differences, in bits/byte).

Every estimate is a ratio estimator: a row's NLL is the sum of its NLL over the sum of its
scored tokens, so a round with more scored tokens weighs more. A difference between two
rows is computed on the rounds that BOTH rows scored, so that it is paired (rounds a row
missed are left out and its other rounds taken as consecutive).

The interval (chosen by measurement, `bench/coverage.py`, table in scenarios/README.md):
a studentized interval on the ratio estimator's linearised per-round residuals
  z_r = (nll_sum_r - theta * n_tokens_r) / mean(n_tokens)    (a row; a difference: z_a - z_b),
with a one-lag Newey-West variance V = gamma_0 + gamma_1 (Bartlett weight 1/2, never
negative) and half-width c(R) * sqrt(V / R). Neighbouring rounds are correlated (the same
stretch of text, messages that carry over), and a variance from R <= 32 rounds is itself
noisy, so c(R) is not a normal or t quantile: it is the Monte Carlo quantile of |pivot|
under a stationary Gaussian AR(1) series with lag-1 autocorrelation `CALIBRATION_PHI` = 0.5
of length R (`critical_value`, a fixed-seed generator, cached per R and level: the same
value on every run). So the interval holds its level for lag-1 autocorrelation up to 0.5
and is conservative on independent rounds. With fewer than `MIN_ROUNDS` rounds none is
given (NaN ends): measured, it would still cover, but with a width set by the calibration
model's tails (c(3) = 12.3) rather than by the data.

Shapes: R rounds, M Monte Carlo series.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic

import torch

from collective.evaluate.metrics import Estimate, RoundStats, Row

CALIBRATION_PHI = 0.5  # lag-1 autocorrelation the critical values are calibrated at
CALIBRATION_SERIES = 100_000  # Monte Carlo series per (R, level): the quantile's relative error is about 0.5%
CALIBRATION_SEED = 20_231_019  # fixed: c(R) is a constant of the method, not of a run
CALIBRATION_MAX_ROUNDS = 256  # above it c(R) is c(256), 2% above its limit 1.96 sqrt(2) (slightly conservative)
MIN_ROUNDS = 4  # fewer rounds: no interval (bench/coverage.py: see scenarios/README.md)
METHOD = (
    f"studentized ratio estimator, one-lag Newey-West variance, critical value calibrated on "
    f"AR(1) rounds with phi {CALIBRATION_PHI} (holds its level for lag-1 autocorrelation up to "
    f"{CALIBRATION_PHI}; conservative on independent rounds); no interval below {MIN_ROUNDS} rounds"
)
TOO_FEW_ROUNDS = "too few eval rounds for an interval that holds its level"


def lag1_variance(residuals: torch.Tensor) -> torch.Tensor:
    """One-lag Newey-West long-run variance of centred series: gamma_0 + gamma_1, each the
    sum of products over R (Bartlett weight 1/2 on lag 1 and -1), never negative.

    residuals: (..., R) centred (mean 0 along the last axis). Returns (...)."""
    n_rounds = residuals.shape[-1]
    gamma0 = (residuals * residuals).sum(-1) / n_rounds
    gamma1 = (residuals[..., 1:] * residuals[..., :-1]).sum(-1) / n_rounds
    return (gamma0 + gamma1).clamp_min(0.0)


def ar1_series(n_series: int, n_rounds: int, phi: float, generator: torch.Generator) -> torch.Tensor:
    """(M, R) stationary Gaussian AR(1) series, unit innovations, mean 0, float64."""
    noise = torch.randn(n_rounds, n_series, generator=generator, dtype=torch.float64)  # (R, M): rows contiguous
    series = torch.empty_like(noise)
    series[0] = noise[0] / math.sqrt(1.0 - phi**2)
    for r in range(1, n_rounds):
        torch.add(noise[r], series[r - 1], alpha=phi, out=series[r])
    return series.T


def pivots(series: torch.Tensor) -> torch.Tensor:
    """|mean| / sqrt(lag1_variance / R) of each series (M, R) around its true mean 0: (M,)."""
    n_rounds = series.shape[-1]
    mean = series.mean(-1)  # (M,)
    variance = lag1_variance(series - mean[:, None])
    return mean.abs() / (variance / n_rounds).sqrt()


def critical_value(n_rounds: int, confidence: float = 0.95) -> float:
    """c(R): the `confidence` quantile of |pivot| over Gaussian AR(1) series (phi
    `CALIBRATION_PHI`) of min(R, CALIBRATION_MAX_ROUNDS) rounds, from a fixed seed."""
    if n_rounds < 2 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need R >= 2 and 0 < confidence < 1, got R = {n_rounds}, confidence = {confidence}")
    return _calibrated(min(n_rounds, CALIBRATION_MAX_ROUNDS), confidence)


@functools.cache
def _calibrated(n_rounds: int, confidence: float) -> float:
    generator = torch.Generator().manual_seed(CALIBRATION_SEED + n_rounds)
    chunk = max(1, 4_000_000 // n_rounds)  # series per draw: bounded memory
    parts, left = [], CALIBRATION_SERIES
    while left > 0:
        size = min(chunk, left)
        parts.append(pivots(ar1_series(size, n_rounds, CALIBRATION_PHI, generator).contiguous()))
        left -= size
    values = torch.cat(parts).nan_to_num(nan=math.inf)  # a zero variance (never in practice): no bound
    return float(torch.quantile(values, confidence))


def ratio_residuals(sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The ratio estimator theta = sum(sums) / sum(counts) of K rounds and its linearised
    residuals z_r = (sums_r - theta * counts_r) / mean(counts): (K,). NaN theta and no
    residuals when nothing was counted. sums, counts: (K,) float64."""
    total = float(counts.sum())
    if not total:
        return math.nan, sums[:0]
    theta = float(sums.sum()) / total
    return theta, (sums - theta * counts) / counts.mean()


def linearised(stats: RoundStats, rounds: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The ratio estimator of a row's NLL per token on the rounds in `rounds` (R,) bool and
    its residuals there (`ratio_residuals`), for the K kept rounds in order."""
    return ratio_residuals(stats.nll_sum.double()[rounds], stats.n_tokens.double()[rounds])


def studentized(value: float, residuals: torch.Tensor, confidence: float) -> Estimate:
    """`value` with the calibrated interval value -/+ c(K) sqrt(V / K) from its K residuals
    (K,); no interval (NaN ends) below MIN_ROUNDS or for a NaN value."""
    n_rounds = int(residuals.shape[0])
    if n_rounds < MIN_ROUNDS or math.isnan(value):
        return Estimate(value, math.nan, math.nan, confidence, n_rounds)
    half = critical_value(n_rounds, confidence) * math.sqrt(float(lag1_variance(residuals)) / n_rounds)
    return Estimate(value, value - half, value + half, confidence, n_rounds)


@dataclass(frozen=True)
class PairedIntervals(Generic[Row]):
    """Every row's and every requested difference's interval (see the module docstring).

    nll: per row, mean NLL (nats/token) with CI; its `n_rounds` is the rounds it scored.
    differences: per requested (a, b), NLL_a - NLL_b on the rounds both scored, with CI;
    `n_rounds` is that shared count. degenerate: fewer than MIN_ROUNDS eval rounds (no CI
    at all). method: the interval in words, for reports.
    """

    nll: dict[Row, Estimate]
    differences: dict[tuple[Row, Row], Estimate]
    degenerate: bool
    method: str = METHOD


def difference(a: RoundStats, b: RoundStats, confidence: float = 0.95) -> Estimate:
    """NLL_a - NLL_b on the rounds both scored, with the paired interval of their residuals'
    difference (the linearisation of a difference of two ratio estimators)."""
    shared = a.scored_rounds & b.scored_rounds  # (R,)
    value_a, z_a = linearised(a, shared)
    value_b, z_b = linearised(b, shared)
    return studentized(value_a - value_b, z_a - z_b, confidence)


def paired_intervals(
    rows: Mapping[Row, RoundStats], *, differences: Sequence[tuple[Row, Row]] = (), confidence: float = 0.95
) -> PairedIntervals[Row]:
    """Each row's NLL and each (a, b) difference with its calibrated CI.

    rows: row -> RoundStats, all over the same R rounds (a row may have rounds with no
    scored token: it is scored on the others). Deterministic: no generator is needed.
    """
    if not rows:
        raise ValueError("paired_intervals needs at least one row")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"need 0 < confidence < 1, got {confidence}")
    round_counts = {stats.n_rounds for stats in rows.values()}
    if len(round_counts) != 1:
        raise ValueError(f"rows must cover the same rounds, got round counts {sorted(round_counts)}")
    for a, b in differences:
        if a not in rows or b not in rows:
            raise ValueError(f"difference ({a!r}, {b!r}) names a row that is not given")
    nll = {name: studentized(*linearised(stats, stats.scored_rounds), confidence) for name, stats in rows.items()}
    diffs = {(a, b): difference(rows[a], rows[b], confidence) for a, b in differences}
    return PairedIntervals(nll, diffs, degenerate=round_counts.pop() < MIN_ROUNDS)


@dataclass(frozen=True)
class GapShare:
    """How much of the gap between a best member and a yardstick a collective closes, in bits/byte.

    share: (bpb_best - bpb_collective) / (bpb_best - bpb_yardstick) with its CI (NaN value and
    ends when undefined). gap: bpb_best - bpb_yardstick; closed: bpb_best - bpb_collective, each
    with its paired CI. defined: the yardstick is better than the best member (the gap's CI lies
    above 0, or, with no CI, its value is above 0); else the share means nothing.
    """

    share: Estimate
    gap: Estimate
    closed: Estimate
    defined: bool


def _per_byte(stats: RoundStats, rounds: torch.Tensor) -> tuple[float, torch.Tensor]:
    """`linearised` in bits per byte: theta = sum nll / ln 2 / sum bytes on the kept rounds."""
    return ratio_residuals(stats.nll_sum.double()[rounds] / math.log(2.0), stats.n_bytes.double()[rounds])


def gap_share(best: RoundStats, collective: RoundStats, yardstick: RoundStats, confidence: float = 0.95) -> GapShare:
    """The share of the best member's gap to the yardstick that the collective closes, on the
    rounds all three scored, in bits/byte (comparable across tokenizers).

    Each row's bits/byte is a ratio estimator theta_X = sum bits_X / sum bytes_X with residuals
    z_X (`_per_byte`). N = theta_B - theta_C (residuals z_B - z_C), D = theta_B - theta_Y
    (z_B - z_Y); the delta method linearises S = N / D to z_S = (z_N - S z_D) / D, whose mean is
    S_hat - S to first order, and `studentized` gives its interval with the same calibrated
    c(R) as every other CI. Undefined (NaN) when the yardstick is not better than the best member.
    """
    shared = best.scored_rounds & collective.scored_rounds & yardstick.scored_rounds  # (R,)
    theta_b, z_b = _per_byte(best, shared)
    theta_c, z_c = _per_byte(collective, shared)
    theta_y, z_y = _per_byte(yardstick, shared)
    closed = studentized(theta_b - theta_c, z_b - z_c, confidence)
    gap = studentized(theta_b - theta_y, z_b - z_y, confidence)
    defined = gap.value > 0 and (gap.low > 0 if gap.has_interval else True)
    if not defined:
        return GapShare(Estimate(math.nan, math.nan, math.nan, confidence, gap.n_rounds), gap, closed, False)
    share = closed.value / gap.value
    residuals = ((z_b - z_c) - share * (z_b - z_y)) / gap.value  # (K,)
    return GapShare(studentized(share, residuals, confidence), gap, closed, True)


__all__ = [
    "CALIBRATION_PHI",
    "GapShare",
    "METHOD",
    "MIN_ROUNDS",
    "TOO_FEW_ROUNDS",
    "PairedIntervals",
    "ar1_series",
    "critical_value",
    "difference",
    "gap_share",
    "lag1_variance",
    "linearised",
    "paired_intervals",
    "pivots",
    "studentized",
]
