"""Aggregators: how the members' next-token predictions become the collective's.

Data flow, once per round: the engine (or the distributed coordinator) hands a
`TokenPredictions` record of N members over the round's T positions to an `Aggregator`;
the aggregator picks per-position weights (uniform, one-hot, or learned online from past
losses only: `collective.run.online_weights`), pools the members with a linear pool
(mixture) or a geometric pool (normalized product of experts: `collective.run.pools`),
and returns a `PooledPrediction`. The evaluator turns that into metrics
(`collective.evaluate.metrics`).

A `readout` of an absent member has no prediction: its rows are NaN (top1 = -1) unless the
aggregator was built with `on_absent="raise"`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch

from collective.lm.predictions import TokenPredictions
from collective.run.online_weights import HedgeWeights, OnlineWeights, PerplexityWeights
from collective.run.pools import (
    PooledPrediction,
    pool_linear,
    pool_log,
    readout,
    recorded_tail,
    uniform_weights,
)

AGGREGATOR_KINDS = ("mean", "logpool", "weighted", "readout")
WEIGHT_METHODS = ("hedge", "perplexity")


class Aggregator:
    """Turns each round's member predictions into the collective's; owns any online state.

    kind: "mean" (uniform linear pool), "logpool" (uniform geometric pool), "weighted"
    (linear pool with online weights), "readout" (member `readout_index`'s own prediction).
    Call `pool` once per round, in stream order: a weighted aggregator learns from each
    round's member losses after choosing that round's weights.
    """

    def __init__(
        self,
        kind: str,
        n_members: int,
        *,
        readout_index: int | None = None,
        online: OnlineWeights | None = None,
        on_absent: Literal["nan", "raise"] = "nan",
    ) -> None:
        if kind not in AGGREGATOR_KINDS:
            raise ValueError(f"unknown aggregator {kind!r}; expected one of {AGGREGATOR_KINDS}")
        if n_members < 1:
            raise ValueError("an aggregator needs at least one member")
        if kind == "readout" and (readout_index is None or not 0 <= readout_index < n_members):
            raise ValueError(
                f"readout needs readout_index in [0, {n_members}), got {readout_index!r}"
            )
        if kind == "weighted" and online is None:
            raise ValueError("a weighted aggregator needs online weights")
        if on_absent not in ("nan", "raise"):
            raise ValueError(f"on_absent must be 'nan' or 'raise', got {on_absent!r}")
        self.kind = kind
        self.n_members = n_members
        self.readout_index = readout_index
        self.online = online
        self.on_absent = on_absent

    @torch.no_grad()
    def pool(
        self,
        preds: TokenPredictions,
        present: torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
    ) -> PooledPrediction:
        """Pool one round. preds: N members at T positions; present: optional (N,) bool;
        targets: (T,) the realized tokens, which a logpool needs (its NLL is that of the
        recorded distributions, `collective.run.pools`)."""
        if preds.n_members != self.n_members:
            raise ValueError(f"aggregator built for {self.n_members} members got {preds.n_members}")
        if present is not None:
            present = torch.as_tensor(present, dtype=torch.bool)
        uniform = uniform_weights(self.n_members)
        if self.kind == "mean":
            return pool_linear(preds, uniform, present)
        if self.kind == "logpool":
            if targets is None:
                raise ValueError("a logpool aggregator needs the round's targets to pool")
            return pool_log(preds, uniform, targets, present)
        if self.kind == "weighted":
            assert self.online is not None
            weights = self.online.step(-preds.target_logprob, present)  # (T, N)
            return pool_linear(preds, weights, present)
        assert self.readout_index is not None
        if present is not None and not bool(present[self.readout_index]):
            if self.on_absent == "raise":
                raise ValueError(f"readout member {self.readout_index} is absent from this round")
            t = preds.n_positions
            return PooledPrediction(
                torch.full((t,), math.nan),
                torch.full((t,), -1, dtype=torch.long),
                torch.zeros(t, self.n_members),
            )
        return readout(preds, self.readout_index)

    def reset(self) -> None:
        """Forget all online state (back to the state of a new aggregator)."""
        if self.online is not None:
            self.online.reset()

    def clone(self) -> Aggregator:
        """An independent copy, state included (a clone of an unused aggregator is fresh)."""
        return copy.deepcopy(self)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (floats and lists) for the coordinator of a distributed run."""
        return {
            "kind": self.kind,
            "online": None if self.online is None else self.online.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"state of a {state.get('kind')!r} aggregator, this is {self.kind!r}")
        if self.online is not None:
            self.online.load_state_dict(state["online"])


def make_aggregator(
    kind: str,
    n_members: int,
    *,
    readout_index: int | None = None,
    method: str = "hedge",
    eta: float = 1.0,
    temperature: float = 1.0,
    window_tokens: int = 512,
    on_absent: Literal["nan", "raise"] = "nan",
) -> Aggregator:
    """Build an aggregator of `kind` ("mean", "logpool", "weighted", "readout").

    method ("hedge" or "perplexity"), eta, temperature and window_tokens configure the
    online weights of "weighted"; readout_index names the member of "readout".
    """
    online: OnlineWeights | None = None
    if kind == "weighted":
        if method == "hedge":
            online = HedgeWeights(n_members, eta)
        elif method == "perplexity":
            online = PerplexityWeights(n_members, temperature, window_tokens)
        else:
            raise ValueError(f"unknown weight method {method!r}; expected one of {WEIGHT_METHODS}")
    return Aggregator(
        kind, n_members, readout_index=readout_index, online=online, on_absent=on_absent
    )


__all__ = [
    "AGGREGATOR_KINDS",
    "Aggregator",
    "HedgeWeights",
    "OnlineWeights",
    "PerplexityWeights",
    "PooledPrediction",
    "make_aggregator",
    "pool_linear",
    "pool_log",
    "readout",
    "recorded_tail",
    "uniform_weights",
]
