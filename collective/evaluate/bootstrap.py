"""The paired circular block bootstrap over whole eval rounds: every CI of a report.

Data flow: the evaluator hands every row's per-round `RoundStats` (all over the same R eval
rounds) to `block_bootstrap`, with the pairs of rows whose differences it wants (the
gains). ONE set of resamples (`resample_counts`: how often each round is drawn in each
resample) serves every row and every difference, so the rows' CIs and the gains' CIs come
from the same resampled blocks, and differences are paired.

Every estimate is a ratio estimator: in a resample, a row's NLL is the sum of its NLL over
the sum of its scored tokens, so a round with more scored tokens weighs more. A difference
between two rows is computed on the rounds that BOTH rows scored: a member that missed
rounds is compared with the collective on the rounds it was there for, not on others.

Block length: unless the scenario sets `evaluation.block_rounds`, b = ceil(R^(1/3)) rounds,
the n^(1/3) growth rate that is optimal for block-bootstrap variance and distribution
estimates (Hall, Horowitz & Jing 1995), with constant 1; b is capped at R - 1.

Shapes: R rounds, B resamples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic

import torch

from collective.evaluate.metrics import Estimate, RoundStats, Row

BLOCK_RULE = "ceil(R^(1/3))"


def rule_of_thumb_block(n_rounds: int) -> int:
    """ceil(R^(1/3)): the smallest b >= 1 with b**3 >= R (in integers: 27 gives 3, not 4)."""
    block = 1
    while block**3 < n_rounds:
        block += 1
    return block


@dataclass(frozen=True)
class BlockChoice:
    """The block length used and, in words, why."""

    block_rounds: int
    rule: str


def choose_block(n_rounds: int, requested: int | None = None) -> BlockChoice:
    """`requested` (the scenario's `block_rounds`), or the rule of thumb when None; capped at
    R - 1 (a block of all R rounds would only rotate them) and at least 1."""
    if requested is not None and requested < 1:
        raise ValueError(f"block_rounds must be >= 1, got {requested}")
    if requested is None:
        block = rule_of_thumb_block(n_rounds)
        rule = f"{BLOCK_RULE} for R = {n_rounds} eval rounds"
    else:
        block, rule = requested, "evaluation.block_rounds"
    cap = max(1, n_rounds - 1)
    if block > cap:
        block, rule = cap, f"{rule}, capped at R - 1 = {cap}"
    return BlockChoice(block, rule)


def resample_counts(
    n_rounds: int, block_rounds: int, n_boot: int, generator: torch.Generator
) -> torch.Tensor:
    """How often each round appears in each circular-block resample: (B, R) float64.

    Each resample draws ceil(R / b) blocks of b consecutive rounds, each starting at a
    uniformly random round and wrapping around the end (so every round is equally likely
    to be drawn), and keeps the first R rounds.
    """
    n_blocks = math.ceil(n_rounds / block_rounds)
    starts = torch.randint(0, n_rounds, (n_boot, n_blocks, 1), generator=generator)
    index = (starts + torch.arange(block_rounds)) % n_rounds  # (B, n_blocks, b)
    index = index.reshape(n_boot, n_blocks * block_rounds)[:, :n_rounds]  # (B, R)
    counts = torch.zeros(n_boot, n_rounds, dtype=torch.float64)
    return counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float64))


@dataclass(frozen=True)
class BootstrapResult(Generic[Row]):
    """Paired block-bootstrap intervals, all from one set of resamples.

    nll: per row, mean NLL (nats/token) with CI; its `n_rounds` is the rounds it scored.
    differences: per requested (a, b), NLL_a - NLL_b on the rounds both scored, with CI;
    `n_rounds` is that shared count. block_rounds, block_rule: the block length and why.
    degenerate: True when there were too few rounds to resample (every CI is NaN).
    """

    nll: dict[Row, Estimate]
    differences: dict[tuple[Row, Row], Estimate]
    n_boot: int
    block_rounds: int
    block_rule: str
    degenerate: bool


def _ratio(counts: torch.Tensor | None, stats: RoundStats, rounds: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """The ratio estimator on the rounds in `rounds` (R,) bool: its point value and, given
    resample counts (B, R), its value in every resample (B,) (NaN where no such round was drawn)."""
    nll = torch.where(rounds, stats.nll_sum.double(), 0.0)  # (R,)
    tokens = torch.where(rounds, stats.n_tokens.double(), 0.0)  # (R,)
    total = float(tokens.sum())
    point = float(nll.sum()) / total if total else math.nan
    return point, None if counts is None else (counts @ nll) / (counts @ tokens)


def _percentile(value: float, samples: torch.Tensor | None, confidence: float, n_rounds: int) -> Estimate:
    """`value` with the percentile interval of its bootstrap `samples` (B,); none from fewer
    than 2 rounds (a single round resamples to itself: a zero-width interval that means nothing)."""
    if samples is None or n_rounds < 2 or bool(torch.isnan(samples).all()):
        return Estimate(value, math.nan, math.nan, confidence, n_rounds)
    alpha = (1.0 - confidence) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    low, high = torch.nanquantile(samples, q).tolist()
    return Estimate(value, low, high, confidence, n_rounds)


def _difference(counts: torch.Tensor | None, a: RoundStats, b: RoundStats, confidence: float) -> Estimate:
    """NLL_a - NLL_b on the rounds both scored, paired through the same resamples."""
    shared = a.scored_rounds & b.scored_rounds  # (R,)
    point_a, samples_a = _ratio(counts, a, shared)
    point_b, samples_b = _ratio(counts, b, shared)
    samples = None if samples_a is None or samples_b is None else samples_a - samples_b
    return _percentile(point_a - point_b, samples, confidence, int(shared.sum()))


@torch.no_grad()
def block_bootstrap(
    rows: Mapping[Row, RoundStats],
    *,
    generator: torch.Generator,
    differences: Sequence[tuple[Row, Row]] = (),
    block_rounds: int | None = None,
    n_boot: int = 2000,
    confidence: float = 0.95,
) -> BootstrapResult[Row]:
    """Paired circular block bootstrap over rounds, percentile CIs (see the module docstring).

    rows: row -> RoundStats, all over the same R rounds. block_rounds: None for the rule of
    thumb. With fewer than 2 rounds nothing can be resampled: the CIs are NaN and
    `degenerate` is set; point values are still given.
    """
    if not rows:
        raise ValueError("block_bootstrap needs at least one row")
    if n_boot < 1 or not 0.0 < confidence < 1.0:
        raise ValueError("need n_boot >= 1 and 0 < confidence < 1")
    round_counts = {stats.n_rounds for stats in rows.values()}
    if len(round_counts) != 1:
        raise ValueError(f"rows must cover the same rounds, got round counts {sorted(round_counts)}")
    for a, b in differences:
        if a not in rows or b not in rows:
            raise ValueError(f"difference ({a!r}, {b!r}) names a row that is not given")
    n_rounds = round_counts.pop()
    block = choose_block(n_rounds, block_rounds)
    degenerate = n_rounds < 2
    counts = None if degenerate else resample_counts(n_rounds, block.block_rounds, n_boot, generator)
    nll = {}
    for name, stats in rows.items():
        point, samples = _ratio(counts, stats, stats.scored_rounds)
        nll[name] = _percentile(point, samples, confidence, int(stats.scored_rounds.sum()))
    diffs = {(a, b): _difference(counts, rows[a], rows[b], confidence) for a, b in differences}
    return BootstrapResult(nll, diffs, n_boot, block.block_rounds, block.rule, degenerate)


__all__ = [
    "BLOCK_RULE",
    "BlockChoice",
    "BootstrapResult",
    "block_bootstrap",
    "choose_block",
    "resample_counts",
    "rule_of_thumb_block",
]
