"""The evaluator's math: per-round statistics, row summaries, paired bootstrap CIs, verdict.

Data flow: each round, every row of the report (a member, the silent ensemble, the
collective, the reference) turns its predictions on the round's eval tokens into
`RoundStats` for that round (sums, so that rounds add up); the rounds of a row are
concatenated; `summarize` gives the row's point metrics and `block_bootstrap` /
`gains` give paired confidence intervals by resampling whole rounds (neighbouring tokens
are correlated, rounds much less so), with the SAME resampled rounds for every row.
`verdict` writes the one-line answer.

Shapes: T positions, R rounds, B bootstrap resamples.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from collective.lm.predictions import TokenPredictions
from collective.run.pools import PooledPrediction

LN2 = math.log(2.0)

Row = TypeVar("Row", bound=Hashable)  # what names a row: the evaluator's RowKey, a test's string


@dataclass(frozen=True)
class RoundStats:
    """Sufficient statistics of one row, per round.

    nll_sum: (R,) float64, summed NLL in nats over the round's scored tokens.
    n_tokens: (R,) int64, tokens scored (a position without prediction is not scored).
    n_correct: (R,) int64, scored tokens whose top-1 prediction was the realized token.
    n_bytes: (R,) int64, UTF-8 bytes of the scored tokens.
    n_missing: (R,) int64, positions with no prediction (a readout node that missed a round).
    """

    nll_sum: torch.Tensor
    n_tokens: torch.Tensor
    n_correct: torch.Tensor
    n_bytes: torch.Tensor
    n_missing: torch.Tensor

    @property
    def n_rounds(self) -> int:
        return int(self.nll_sum.shape[0])

    @staticmethod
    def empty() -> RoundStats:
        """Zero rounds."""
        ints = torch.zeros(0, dtype=torch.long)
        return RoundStats(torch.zeros(0, dtype=torch.float64), ints, ints, ints, ints)

    @staticmethod
    def concat(parts: Sequence[RoundStats]) -> RoundStats:
        """The rounds of `parts`, in order."""
        if not parts:
            return RoundStats.empty()
        return RoundStats(
            torch.cat([p.nll_sum for p in parts]),
            torch.cat([p.n_tokens for p in parts]),
            torch.cat([p.n_correct for p in parts]),
            torch.cat([p.n_bytes for p in parts]),
            torch.cat([p.n_missing for p in parts]),
        )


def round_stats(
    target_logprob: torch.Tensor,
    top1: torch.Tensor,
    targets: torch.Tensor,
    token_bytes: torch.Tensor,
    round_tokens: int | None = None,
) -> RoundStats:
    """Statistics of consecutive rounds of `round_tokens` positions (default: one round).

    target_logprob: (T,) log p(y_t), NaN where there is no prediction. top1: (T,) predicted
    tokens. targets: (T,) realized tokens. token_bytes: (T,) UTF-8 length of each realized
    token. A last, shorter round is kept as is.
    """
    n_positions = int(target_logprob.shape[0])
    for name, tensor in (("top1", top1), ("targets", targets), ("token_bytes", token_bytes)):
        if tuple(tensor.shape) != (n_positions,):
            raise ValueError(f"{name} must have shape ({n_positions},), got {tuple(tensor.shape)}")
    step = n_positions if round_tokens is None else int(round_tokens)
    if step < 1:
        if n_positions == 0:
            return RoundStats.empty()
        raise ValueError(f"round_tokens must be >= 1, got {round_tokens}")
    missing = torch.isnan(target_logprob)  # (T,)
    scored = ~missing
    nll = torch.where(scored, -target_logprob.double(), torch.zeros((), dtype=torch.float64))
    correct = scored & (top1.long() == targets.long())
    nbytes = torch.where(scored, token_bytes.long(), torch.zeros((), dtype=torch.long))
    starts = list(range(0, n_positions, step))

    def per_round(values: torch.Tensor) -> torch.Tensor:
        return torch.stack([values[s : s + step].sum() for s in starts]) if starts else values[:0]

    return RoundStats(
        per_round(nll),
        per_round(scored.long()),
        per_round(correct.long()),
        per_round(nbytes),
        per_round(missing.long()),
    )


def pooled_round_stats(
    pooled: PooledPrediction, targets: torch.Tensor, token_bytes: torch.Tensor
) -> RoundStats:
    """One round of a pooled row (ensemble, collective). targets, token_bytes: (T,)."""
    return round_stats(pooled.target_logprob, pooled.top1, targets, token_bytes)


def member_round_stats(
    preds: TokenPredictions, member: int, targets: torch.Tensor, token_bytes: torch.Tensor
) -> RoundStats:
    """One round of member `member` of `preds` (its own top-1 is its first candidate)."""
    return round_stats(
        preds.target_logprob[member], preds.topk_ids[member, :, 0], targets, token_bytes
    )


@dataclass(frozen=True)
class RowSummary:
    """Point metrics of one row over all its rounds.

    nll: mean NLL in nats per scored token; ppl: exp(nll); bits_per_byte: total NLL in bits
    over total UTF-8 bytes; top1_accuracy: fraction of scored tokens predicted exactly;
    n_tokens: tokens scored; n_missing: positions that had no prediction.
    """

    nll: float
    ppl: float
    bits_per_byte: float
    top1_accuracy: float
    n_tokens: int
    n_missing: int = 0


def summarize(stats: RoundStats) -> RowSummary:
    """Pool the rounds of one row into its metrics (NaN where nothing was scored)."""
    nll_total = float(stats.nll_sum.sum())
    n_tokens = int(stats.n_tokens.sum())
    n_bytes = int(stats.n_bytes.sum())
    nll = nll_total / n_tokens if n_tokens else math.nan
    return RowSummary(
        nll=nll,
        ppl=math.exp(nll) if n_tokens else math.nan,
        bits_per_byte=nll_total / LN2 / n_bytes if n_bytes else math.nan,
        top1_accuracy=int(stats.n_correct.sum()) / n_tokens if n_tokens else math.nan,
        n_tokens=n_tokens,
        n_missing=int(stats.n_missing.sum()),
    )


@dataclass(frozen=True)
class Estimate:
    """A point value with its percentile confidence interval [low, high] (NaN: none)."""

    value: float
    low: float
    high: float
    confidence: float = 0.95

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


@dataclass(frozen=True)
class BootstrapResult(Generic[Row]):
    """Paired block-bootstrap intervals.

    nll: per row, mean NLL (nats/token) with CI. differences: per requested (a, b), the
    paired difference NLL_a - NLL_b with CI. block_rounds: the block length used.
    degenerate: True when there were too few rounds to resample (CIs are NaN).
    """

    nll: dict[Row, Estimate]
    differences: dict[tuple[Row, Row], Estimate]
    n_boot: int
    block_rounds: int
    degenerate: bool


def _resample_counts(
    n_rounds: int, block_rounds: int, n_boot: int, generator: torch.Generator
) -> torch.Tensor:
    """How often each round appears in each circular-block resample: (B, R) float64."""
    n_blocks = math.ceil(n_rounds / block_rounds)
    starts = torch.randint(0, n_rounds, (n_boot, n_blocks, 1), generator=generator)
    index = (starts + torch.arange(block_rounds)) % n_rounds  # (B, n_blocks, block)
    index = index.reshape(n_boot, n_blocks * block_rounds)[:, :n_rounds]  # (B, R)
    counts = torch.zeros(n_boot, n_rounds, dtype=torch.float64)
    return counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))


def _percentile_estimate(value: float, samples: torch.Tensor | None, confidence: float) -> Estimate:
    """`value` with the percentile interval of its bootstrap `samples` (B,) (None: no interval)."""
    if samples is None:
        return Estimate(value, math.nan, math.nan, confidence)
    alpha = (1.0 - confidence) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    low, high = torch.nanquantile(samples, q).tolist()
    return Estimate(value, low, high, confidence)


@torch.no_grad()
def block_bootstrap(
    rows: Mapping[Row, RoundStats],
    *,
    generator: torch.Generator,
    differences: Sequence[tuple[Row, Row]] = (),
    block_rounds: int = 1,
    n_boot: int = 2000,
    confidence: float = 0.95,
) -> BootstrapResult[Row]:
    """Paired circular block bootstrap over rounds, percentile CIs.

    rows: row -> RoundStats, all with the same R rounds (the same eval tokens).
    Each resample draws ceil(R / b) blocks of b consecutive whole rounds with replacement,
    each block starting at a uniformly random round and wrapping around the end (circular
    moving blocks, so every round is equally likely to be drawn), and keeps the first R
    rounds. The same resamples serve every row, so differences between rows are paired.
    A row's mean NLL is the ratio estimator sum(nll_sum) / sum(n_tokens) of the resample.
    b is `block_rounds` capped at R - 1 (a block of all R rounds would only rotate them).
    With fewer than 2 rounds nothing can be resampled: the CIs are NaN and `degenerate`
    is set; point values are still given.
    """
    if not rows:
        raise ValueError("block_bootstrap needs at least one row")
    if block_rounds < 1 or n_boot < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("need block_rounds >= 1, n_boot >= 1 and 0 < confidence < 1")
    names = list(rows)
    n_rounds = {rows[name].n_rounds for name in names}
    if len(n_rounds) != 1:
        raise ValueError(f"rows must cover the same rounds, got round counts {sorted(n_rounds)}")
    for a, b in differences:
        if a not in rows or b not in rows:
            raise ValueError(f"difference ({a!r}, {b!r}) names a row that is not given")
    n_r = n_rounds.pop()
    nll_sum = torch.stack([rows[name].nll_sum.double() for name in names])  # (rows, R)
    n_tokens = torch.stack([rows[name].n_tokens.double() for name in names])  # (rows, R)
    point = nll_sum.sum(1) / n_tokens.sum(1)  # (rows,) NaN for a row with no token
    degenerate = n_r < 2
    block = max(1, min(block_rounds, n_r - 1))
    samples: torch.Tensor | None = None
    if not degenerate:
        counts = _resample_counts(n_r, block, n_boot, generator)  # (B, R)
        samples = (counts @ nll_sum.T) / (counts @ n_tokens.T)  # (B, rows)
    col = {name: j for j, name in enumerate(names)}
    nll = {
        name: _percentile_estimate(
            float(point[col[name]]), None if samples is None else samples[:, col[name]], confidence
        )
        for name in names
    }
    diffs = {
        (a, b): _percentile_estimate(
            float(point[col[a]] - point[col[b]]),
            None if samples is None else samples[:, col[a]] - samples[:, col[b]],
            confidence,
        )
        for a, b in differences
    }
    return BootstrapResult(nll, diffs, n_boot, block, degenerate)


@dataclass(frozen=True)
class Gains(Generic[Row]):
    """The headline numbers, nats/token, each with a paired CI.

    collective_gain: NLL(best isolated member) - NLL(collective); > 0: the collective wins.
    communication_gain: NLL(silent ensemble) - NLL(collective); > 0: messages helped.
    best_member: the isolated row with the lowest NLL on the full eval (chosen on the same
    data the gain is measured on, and held fixed across resamples).
    """

    collective_gain: Estimate
    communication_gain: Estimate
    best_member: Row
    bootstrap: BootstrapResult[Row]


def gains(
    rows: Mapping[Row, RoundStats], *, isolated: Sequence[Row], silent: Row, collective: Row,
    generator: torch.Generator, block_rounds: int = 1, n_boot: int = 2000, confidence: float = 0.95,
) -> Gains[Row]:
    """Collective gain and communication gain with paired block-bootstrap CIs.

    rows: row -> RoundStats over the same rounds; isolated: the isolated member rows;
    silent, collective: those rows. Picking the best member on
    the eval data itself favours the member (its NLL is the minimum of several noisy
    values), so the collective gain is, if anything, understated.
    """
    if not isolated:
        raise ValueError("gains needs at least one isolated member row")
    best = min(isolated, key=lambda name: summarize(rows[name]).nll)
    result = block_bootstrap(
        rows,
        generator=generator,
        differences=[(best, collective), (silent, collective)],
        block_rounds=block_rounds,
        n_boot=n_boot,
        confidence=confidence,
    )
    return Gains(
        result.differences[(best, collective)],
        result.differences[(silent, collective)],
        best,
        result,
    )


def _ci_text(estimate: Estimate) -> str:
    level = f"{estimate.confidence:.0%} CI"
    if not estimate.has_interval:
        return f"no {level}: too few rounds"
    return f"{level} {estimate.low:+.3f} to {estimate.high:+.3f}"


def verdict(
    collective_gain: Estimate, communication_gain: Estimate, best_member: str | None = None
) -> str:
    """One honest line: does the collective beat its best member, did communication matter.

    A gain whose CI lies entirely above 0 is a win, entirely below 0 a loss, otherwise not
    distinguishable (also when there is no CI). Numbers are nats/token.
    """
    best = "its best member" if best_member is None else f"its best member ({best_member})"
    g = collective_gain
    if g.has_interval and g.low > 0:
        first = f"The collective beats {best} by {g.value:.3f} nats/token ({_ci_text(g)})"
    elif g.has_interval and g.high < 0:
        first = f"The collective is worse than {best} by {-g.value:.3f} nats/token ({_ci_text(g)})"
    else:
        first = (
            f"The collective is not distinguishable from {best} "
            f"(gain {g.value:+.3f} nats/token, {_ci_text(g)})"
        )
    c = communication_gain
    if c.has_interval and c.low > 0:
        second = (
            f"communication mattered: {c.value:.3f} nats/token better than the silent "
            f"ensemble ({_ci_text(c)})"
        )
    elif c.has_interval and c.high < 0:
        second = (
            f"communication hurt: {-c.value:.3f} nats/token worse than the silent "
            f"ensemble ({_ci_text(c)})"
        )
    else:
        second = (
            f"communication made no measurable difference over the silent ensemble "
            f"(gain {c.value:+.3f} nats/token, {_ci_text(c)})"
        )
    return f"{first}; {second}."


__all__ = [
    "BootstrapResult",
    "Estimate",
    "Gains",
    "RoundStats",
    "RowSummary",
    "block_bootstrap",
    "gains",
    "member_round_stats",
    "pooled_round_stats",
    "round_stats",
    "summarize",
    "verdict",
]
