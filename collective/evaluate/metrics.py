"""The evaluator's per-round statistics and row summaries.

Data flow: each round, every row of the report (a member, the silent ensemble, the
collective, the reference) turns its predictions on the round's eval tokens into
`RoundStats` for that round (sums, so that rounds add up); the rounds of a row are
concatenated; `summarize` gives the row's point metrics. Confidence intervals are
`intervals.py`'s, the gains and the verdict `gains.py`'s; both hand back `Estimate`s.

Shapes: T positions, R rounds.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from collective.lm.predictions import TokenPredictions
from collective.outcomes import PooledPrediction

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

    @property
    def scored_rounds(self) -> torch.Tensor:
        """(R,) bool: the rounds in which at least one token was scored."""
        return self.n_tokens > 0

    @property
    def complete(self) -> bool:
        """Scored on every position of every round (nothing missed)."""
        return self.n_rounds > 0 and bool(self.scored_rounds.all()) and not bool(self.n_missing.any())

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


def members_round_stats(
    preds: Sequence[TokenPredictions | None], targets: torch.Tensor, token_bytes: torch.Tensor
) -> list[RoundStats]:
    """One round of each member row of `preds` (None: no prediction, every position missing),
    the same numbers as `member_round_stats` member by member, computed for all N rows at once
    (a handful of tensor operations per round instead of a score per row: the book of a
    collective of hundreds of nodes is otherwise most of the coordinator's CPU)."""
    if not preds:
        return []
    n_positions = len(targets)
    nan = torch.full((n_positions,), float("nan"))
    logprob = torch.stack([nan if p is None else p.target_logprob[0].float() for p in preds])  # (N, T)
    top1 = torch.stack([targets.long() if p is None else p.topk_ids[0, :, 0].long() for p in preds])  # (N, T)
    missing = torch.isnan(logprob)
    scored = ~missing
    nll = torch.where(scored, -logprob.double(), torch.zeros((), dtype=torch.float64)).sum(dim=1)
    correct = (scored & (top1 == targets.long())).long().sum(dim=1)
    nbytes = torch.where(scored, token_bytes.long(), torch.zeros((), dtype=torch.long)).sum(dim=1)
    n_scored, n_missing = scored.long().sum(dim=1), missing.long().sum(dim=1)
    return [
        RoundStats(nll[i : i + 1], n_scored[i : i + 1], correct[i : i + 1], nbytes[i : i + 1], n_missing[i : i + 1])
        for i in range(len(preds))
    ]


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
    """A point value with its confidence interval [low, high] (NaN: none, e.g. too few rounds
    for one that holds its level), and the number of rounds it was computed on (None: not given)."""

    value: float
    low: float
    high: float
    confidence: float = 0.95
    n_rounds: int | None = None

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


__all__ = [
    "Estimate",
    "Row",
    "RoundStats",
    "RowSummary",
    "member_round_stats",
    "members_round_stats",
    "pooled_round_stats",
    "round_stats",
    "summarize",
]
