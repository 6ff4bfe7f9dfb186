"""Aggregators: how the members' next-token predictions become the collective's.

Data flow, once per round: the engine (or the distributed coordinator) hands a
`TokenPredictions` record of N members over the round's T positions to an `Aggregator`;
the aggregator picks per-position weights (uniform, one-hot, or learned online from past
losses only), pools the members with a linear pool (mixture) or a geometric pool
(normalized product of experts), and returns a `PooledPrediction`: the pool's
log-probability of the realized token and its argmax token at each position. The
evaluator turns that into metrics (`collective.evaluate.metrics`).

The pools work from the compact record alone: a member's probability for a token outside
its top-K is its uniform tail share, (1 - sum of its top-K probabilities) / (V - K).

Members that missed a round (a distributed node past its deadline) are left out of that
round by a `present: (N,) bool` mask: the weights are renormalized over the present
members. A `readout` of an absent member has no prediction: its rows are NaN (top1 = -1)
unless the aggregator was built with `on_absent="raise"`.

Shapes: N members, T positions, K top-K candidates, V vocabulary size, C = N*K
candidates of the union (with repeats).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from collective.lm.predictions import TokenPredictions

# Upper bound on the elements of one (chunk, N, C) temporary of the candidate pools:
# 4M float32 = 16 MB, so that the handful of such temporaries stays well under 100 MB
# even for N = 64 members with K = 64 candidates each.
_CHUNK_ELEMENTS = 1 << 22

AGGREGATOR_KINDS = ("mean", "logpool", "weighted", "readout")
WEIGHT_METHODS = ("hedge", "perplexity")


@dataclass(frozen=True)
class PooledPrediction:
    """The pooled (collective) prediction at T positions.

    target_logprob: (T,) float32, log p(y_t) of the realized token under the pool.
    top1: (T,) int64, the pool's most likely token (-1 where there is no prediction).
    weights: (T, N) float32 member weights used at each position (0 for absent members),
        or None.
    """

    target_logprob: torch.Tensor
    top1: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def n_positions(self) -> int:
        return int(self.target_logprob.shape[0])


# ---------------------------------------------------------------------------
# Pools (pure functions)


def log_tail_share(topk_logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Log of the probability a member gives each token outside its top-K.

    topk_logprobs: (..., K) -> (...) float32; -inf when the top-K holds all the mass
    (always when K == V).
    """
    k = int(topk_logprobs.shape[-1])
    if k >= vocab_size:
        return torch.full(topk_logprobs.shape[:-1], -math.inf)
    covered = torch.logsumexp(topk_logprobs.double(), dim=-1).clamp(max=0.0)  # log sum p_topk
    tail = -torch.expm1(covered)  # 1 - sum p_topk, accurate when the sum is close to 1
    return (torch.log(tail) - math.log(vocab_size - k)).float()


def _present_index(present: torch.Tensor | None, n_members: int) -> list[int]:
    if present is None:
        return list(range(n_members))
    if present.shape != (n_members,):
        raise ValueError(f"present mask must have shape ({n_members},), got {tuple(present.shape)}")
    index = [i for i in range(n_members) if bool(present[i])]
    if not index:
        raise ValueError("no member is present: there is nothing to pool")
    return index


def _normalized_weights(
    weights: torch.Tensor, n_members: int, n_positions: int, index: list[int]
) -> torch.Tensor:
    """Weights (N,) or (T, N) -> (T, N) float32, zero off `index`, rows summing to 1."""
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.dim() == 1:
        weights = weights.unsqueeze(0).expand(n_positions, -1)
    if weights.shape != (n_positions, n_members):
        raise ValueError(
            f"weights must have shape ({n_members},) or ({n_positions}, {n_members}), "
            f"got {tuple(weights.shape)}"
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    mask = torch.zeros(n_members, dtype=torch.bool)
    mask[index] = True
    kept = torch.where(mask, weights, torch.zeros(()))  # (T, N)
    total = kept.sum(dim=1, keepdim=True)  # (T, 1)
    if bool((total <= 0).any()):
        raise ValueError("at some position the present members' weights sum to zero")
    return kept / total


def _candidate_logprobs(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, log_share: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's log-probability for every candidate of the union of top-K lists.

    topk_ids, topk_logprobs: (t, N, K); log_share: (t, N).
    Returns cand: (t, C) ids, member 0's list first, each list most likely first (repeats
    kept), and logprob: (t, N, C), member i's log p_i(cand) (its tail share when the
    candidate is not in its top-K).
    """
    t, n, k = topk_ids.shape
    cand = topk_ids.reshape(t, n * k)  # (t, C), a copy when topk_ids is a transposed view
    sorted_ids, order = topk_ids.sort(dim=-1)  # (t, N, K)
    sorted_ids = sorted_ids.contiguous()
    sorted_logprobs = topk_logprobs.gather(-1, order)  # (t, N, K)
    query = cand.unsqueeze(1).expand(t, n, n * k).contiguous()  # (t, N, C)
    pos = torch.searchsorted(sorted_ids, query).clamp_(max=k - 1)  # (t, N, C)
    found = sorted_ids.gather(-1, pos) == query
    logprob = torch.where(found, sorted_logprobs.gather(-1, pos), log_share.unsqueeze(-1))
    return cand, logprob


def _chunk_positions(n_members: int, k: int) -> int:
    return max(1, _CHUNK_ELEMENTS // (n_members * n_members * k))


def _select(preds: TokenPredictions, index: list[int]) -> TokenPredictions:
    return preds if index == list(range(preds.n_members)) else preds.select(index)


@torch.no_grad()
def pool_linear(
    preds: TokenPredictions, weights: torch.Tensor, present: torch.Tensor | None = None
) -> PooledPrediction:
    """Linear pool (mixture): p(v) = sum_i w_i p_i(v).

    preds: N members at T positions. weights: (N,) or (T, N), non-negative; they are
    renormalized over the present members. present: optional (N,) bool.

    The target log-probability is exact (logsumexp of log p_i(y) + log w_i). top1 is the
    argmax of the mixture over the union of the members' top-K candidates (a member
    contributes its tail share for a candidate outside its own top-K); no token outside
    the union can beat it, since a top-K probability is at least the tail share. Ties go to
    the earliest candidate in member order, so a pool of one member returns its own top-1.
    """
    n, t_total = preds.n_members, preds.n_positions
    index = _present_index(present, n)
    w_full = _normalized_weights(weights, n, t_total, index)  # (T, N)
    sub = _select(preds, index)
    w = w_full[:, index]  # (T, M)
    logprob = sub.target_logprob.float().transpose(0, 1)  # (T, M)
    terms = torch.where(w > 0, logprob + torch.log(w), -math.inf)  # zero weight: no term
    target_logprob = torch.logsumexp(terms, dim=1)  # (T,)

    m, k = sub.n_members, int(sub.topk_ids.shape[-1])
    log_share = log_tail_share(sub.topk_logprobs, sub.vocab_size)  # (M, T)
    top1 = torch.empty(t_total, dtype=torch.long)
    step = _chunk_positions(m, k)
    for start in range(0, t_total, step):
        sl = slice(start, start + step)
        cand, cand_logprob = _candidate_logprobs(
            sub.topk_ids[:, sl].transpose(0, 1),  # (t, M, K)
            sub.topk_logprobs[:, sl].float().transpose(0, 1),
            log_share[:, sl].transpose(0, 1),  # (t, M)
        )
        mixture = (w[sl].unsqueeze(-1) * cand_logprob.exp()).sum(dim=1)  # (t, C)
        top1[sl] = cand.gather(1, mixture.argmax(dim=1, keepdim=True)).squeeze(1)
    return PooledPrediction(target_logprob, top1, w_full)


@torch.no_grad()
def pool_log(
    preds: TokenPredictions, weights: torch.Tensor, present: torch.Tensor | None = None
) -> PooledPrediction:
    """Geometric pool (normalized product of experts): p(v) ∝ prod_i p_i(v)^{w_i}.

    preds: N members at T positions. weights: (N,) or (T, N) exponents, renormalized to
    sum to 1 over the present members. present: optional (N,) bool.

    The log-normalizer runs over the full vocabulary as the record describes it: each
    distinct candidate of the union of top-K lists gets its members' probabilities (the
    tail share where a member does not list it), and each of the V - |union| other tokens
    gets prod_i share_i^{w_i}. This is exact when the members' top-K lists hold all of their
    mass (K = V, or the tail really is spread uniformly) and an approximation otherwise.
    The numerator uses each member's exact log p_i(y), so the pooled probability of a
    realized token outside a member's top-K is slightly inconsistent with the normalizer
    in the approximate case. Pooling identical members returns that member (up to rounding).
    """
    n, t_total = preds.n_members, preds.n_positions
    index = _present_index(present, n)
    w_full = _normalized_weights(weights, n, t_total, index)  # (T, N)
    sub = _select(preds, index)
    w = w_full[:, index]  # (T, M)
    positive = w > 0

    def weighted_sum(logprob: torch.Tensor, weight: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        # sum_i w_i log p_i, where a zero weight contributes nothing (not 0 * -inf = NaN).
        return torch.where(on, weight * logprob, torch.zeros(())).sum(dim=1)

    numerator = weighted_sum(sub.target_logprob.float().transpose(0, 1), w, positive)  # (T,)

    m, k, vocab = sub.n_members, int(sub.topk_ids.shape[-1]), sub.vocab_size
    log_share = log_tail_share(sub.topk_logprobs, vocab).transpose(0, 1)  # (T, M)
    outside = weighted_sum(log_share, w, positive)  # (T,) log score of a token outside the union
    log_norm = torch.empty(t_total)
    top1 = torch.empty(t_total, dtype=torch.long)
    step = _chunk_positions(m, k)
    for start in range(0, t_total, step):
        sl = slice(start, start + step)
        cand, cand_logprob = _candidate_logprobs(
            sub.topk_ids[:, sl].transpose(0, 1),  # (t, M, K)
            sub.topk_logprobs[:, sl].float().transpose(0, 1),
            log_share[sl],  # (t, M)
        )
        score = weighted_sum(
            cand_logprob, w[sl].unsqueeze(-1), positive[sl].unsqueeze(-1)
        )  # (t, C)
        top1[sl] = cand.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)
        # Count each distinct candidate once.
        sorted_cand, order = cand.sort(dim=1, stable=True)  # (t, C)
        first = torch.ones_like(sorted_cand, dtype=torch.bool)
        first[:, 1:] = sorted_cand[:, 1:] != sorted_cand[:, :-1]
        union_score = torch.where(first, score.gather(1, order), -math.inf)  # (t, C)
        n_outside = (vocab - first.sum(dim=1)).double()  # (t,)
        outside_term = (outside[sl].double() + torch.log(n_outside)).float()  # -inf if none
        log_norm[sl] = torch.logsumexp(
            torch.cat([union_score, outside_term.unsqueeze(1)], dim=1), dim=1
        )
    return PooledPrediction(numerator - log_norm, top1, w_full)


def readout(preds: TokenPredictions, member: int) -> PooledPrediction:
    """One member's own prediction as the pool: (T,) rows of member `member`."""
    weights = torch.zeros(preds.n_positions, preds.n_members)
    weights[:, member] = 1.0
    return PooledPrediction(
        preds.target_logprob[member].float().clone(), preds.topk_ids[member, :, 0].clone(), weights
    )


# ---------------------------------------------------------------------------
# Online weights (past losses only)


def _fill_absent(losses: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Losses (N, T) as float64, absent rows replaced by the present members' mean loss."""
    losses = losses.double()
    if present is None:
        return losses
    index = _present_index(present, losses.shape[0])
    filled = losses.clone()
    mean_present = losses[index].mean(dim=0)  # (T,)
    absent = [i for i in range(losses.shape[0]) if i not in index]
    filled[absent] = mean_present
    return filled


def _check_losses(losses: torch.Tensor, n_members: int, present: torch.Tensor | None) -> None:
    if losses.dim() != 2 or losses.shape[0] != n_members:
        raise ValueError(f"losses must have shape ({n_members}, T), got {tuple(losses.shape)}")
    index = _present_index(present, n_members)
    if not bool(torch.isfinite(losses[index]).all()):
        raise ValueError("online weights need finite losses of the present members")


class OnlineWeights(Protocol):
    """Per-position member weights that depend only on losses at earlier positions."""

    n_members: int

    def step(self, losses: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor: ...

    def reset(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class HedgeWeights:
    """Hedge (exponential weights) on cumulative per-token losses.

    The weight of member i at position t is softmax_i(-eta * L_i(<t)), where L_i(<t) is its
    total loss (NLL, nats) over all earlier positions of all earlier rounds. With eta = 1
    and log loss this is the Bayesian mixture, whose regret to the best member is at most
    ln N nats in total. A member absent from a round is charged the present members' mean
    loss at each of its positions, so it neither gains nor loses standing while away.
    """

    def __init__(self, n_members: int, eta: float = 1.0) -> None:
        if n_members < 1 or eta < 0:
            raise ValueError("HedgeWeights needs n_members >= 1 and eta >= 0")
        self.n_members = n_members
        self.eta = float(eta)
        self._cumulative = torch.zeros(n_members, dtype=torch.float64)  # (N,) nats

    def step(self, losses: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Weights for this round, then learn from its losses.

        losses: (N, T) per-token NLL in nats. Returns (T, N) float32 weights, row t using
        only losses before position t.
        """
        _check_losses(losses, self.n_members, present)
        filled = _fill_absent(losses, present)  # (N, T)
        # Exclusive prefix sums by shifting (not cumsum - loss, whose rounding would let the
        # loss at t leak into the weight at t).
        before = torch.zeros_like(filled)  # (N, T)
        before[:, 1:] = filled.cumsum(dim=1)[:, :-1]
        cumulative = self._cumulative.unsqueeze(1) + before  # (N, T)
        weights = torch.softmax(-self.eta * cumulative, dim=0).transpose(0, 1)  # (T, N)
        total = self._cumulative + filled.sum(dim=1)
        self._cumulative = total - total.min()  # the softmax only sees differences
        return weights.float().contiguous()

    def reset(self) -> None:
        self._cumulative = torch.zeros(self.n_members, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": "hedge",
            "n_members": self.n_members,
            "eta": self.eta,
            "cumulative_loss": [float(x) for x in self._cumulative],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != "hedge" or int(state["n_members"]) != self.n_members:
            raise ValueError(f"not a Hedge state for {self.n_members} members: {state!r}")
        self.eta = float(state["eta"])
        self._cumulative = torch.tensor(state["cumulative_loss"], dtype=torch.float64)


class PerplexityWeights:
    """PackLLM-style weights: softmax over members of -(mean NLL over a trailing window) / τ.

    The weight of member i at position t uses its mean NLL over its last `window_tokens`
    scored positions before t (earlier rounds included). Weights are uniform before any
    loss is seen; a member with no loss yet (others having some) is given the mean of the
    others' window means. An absent member's window is left as it was.
    """

    def __init__(self, n_members: int, temperature: float = 1.0, window_tokens: int = 512) -> None:
        if n_members < 1 or temperature <= 0 or window_tokens < 1:
            raise ValueError(
                "PerplexityWeights needs n_members >= 1, temperature > 0 and window_tokens >= 1"
            )
        self.n_members = n_members
        self.temperature = float(temperature)
        self.window_tokens = int(window_tokens)
        self._history: list[list[float]] = [[] for _ in range(n_members)]

    def step(self, losses: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Weights for this round, then learn from its losses.

        losses: (N, T) per-token NLL in nats. Returns (T, N) float32 weights, row t using
        only losses before position t.
        """
        _check_losses(losses, self.n_members, present)
        index = set(_present_index(present, self.n_members))
        n_positions = int(losses.shape[1])
        window = self.window_tokens
        means = torch.full((self.n_members, n_positions), math.nan, dtype=torch.float64)
        for i in range(self.n_members):
            past = torch.tensor(self._history[i], dtype=torch.float64)  # (h,)
            if i not in index:
                if len(past):
                    means[i] = past.mean()
                continue
            h = len(past)
            seq = torch.cat([past, losses[i].double()])  # (h + T,)
            prefix = torch.cat([torch.zeros(1, dtype=torch.float64), seq.cumsum(0)])  # (h+T+1,)
            end = torch.arange(h, h + n_positions)  # (T,) positions < end are in the past
            begin = (end - window).clamp(min=0)
            count = (end - begin).double()
            means[i] = (prefix[end] - prefix[begin]) / count  # NaN where count == 0
            self._history[i] = seq[-window:].tolist()
        seen = ~torch.isnan(means)  # (N, T)
        any_seen = seen.any(dim=0)  # (T,)
        neutral = torch.where(seen, means, torch.zeros(())).sum(0) / seen.sum(0).clamp(min=1)
        means = torch.where(seen, means, neutral)  # unseen members: the others' mean
        logits = torch.where(any_seen, -means / self.temperature, torch.zeros(()))  # uniform
        return torch.softmax(logits, dim=0).transpose(0, 1).float().contiguous()  # (T, N)

    def reset(self) -> None:
        self._history = [[] for _ in range(self.n_members)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": "perplexity",
            "n_members": self.n_members,
            "temperature": self.temperature,
            "window_tokens": self.window_tokens,
            "history": [list(h) for h in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != "perplexity" or int(state["n_members"]) != self.n_members:
            raise ValueError(f"not a perplexity state for {self.n_members} members: {state!r}")
        self.temperature = float(state["temperature"])
        self.window_tokens = int(state["window_tokens"])
        self._history = [[float(x) for x in h][-self.window_tokens :] for h in state["history"]]


# ---------------------------------------------------------------------------
# Aggregator front


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

    def pool(
        self, preds: TokenPredictions, present: torch.Tensor | None = None
    ) -> PooledPrediction:
        """Pool one round. preds: N members at T positions; present: optional (N,) bool."""
        if preds.n_members != self.n_members:
            raise ValueError(f"aggregator built for {self.n_members} members got {preds.n_members}")
        if present is not None:
            present = torch.as_tensor(present, dtype=torch.bool)
        uniform = uniform_weights(self.n_members)
        if self.kind == "mean":
            return pool_linear(preds, uniform, present)
        if self.kind == "logpool":
            return pool_log(preds, uniform, present)
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


def uniform_weights(n_members: int) -> torch.Tensor:
    """(N,) equal weights."""
    return torch.full((n_members,), 1.0 / n_members)


__all__ = [
    "AGGREGATOR_KINDS",
    "Aggregator",
    "HedgeWeights",
    "OnlineWeights",
    "PerplexityWeights",
    "PooledPrediction",
    "log_tail_share",
    "make_aggregator",
    "pool_linear",
    "pool_log",
    "readout",
    "uniform_weights",
]
