"""The pools: how N members' predictions at T positions become one prediction.

Pure functions on the compact `TokenPredictions` record: `pool_linear` (a mixture),
`pool_log` (a normalized product of experts) and `readout` (one member's own prediction),
each returning a `PooledPrediction`: the pool's log-probability of the realized token and
its argmax token at each position. The `Aggregator` (`collective.run.aggregate`) chooses
the weights; a collective controller's objective (`collective.run.control`) calls the same
pools with one member's record built from its live log-probabilities, so the pools keep
autograd (the aggregator itself runs them without).

A member's probability for a token outside its top-K is its uniform tail share,
(1 - sum of its top-K probabilities) / (V - K). Members that missed a round are left out
by a `present: (N,) bool` mask: the weights are renormalized over the present members.

Shapes: N members, T positions, K top-K candidates, V vocabulary size, C = N*K
candidates of the union (with repeats).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from collective.lm.predictions import TokenPredictions

# Upper bound on the elements of one (chunk, N, C) temporary of the candidate pools:
# 4M float32 = 16 MB, so that the handful of such temporaries stays well under 100 MB
# even for N = 64 members with K = 64 candidates each.
_CHUNK_ELEMENTS = 1 << 22


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
    # -inf where the top-K holds all the mass, written so that autograd (a controller's
    # objective) gets a zero gradient there rather than NaN from log(0)
    has_tail = tail > 0
    log_tail = torch.where(has_tail, torch.log(torch.where(has_tail, tail, torch.ones_like(tail))), -math.inf)
    return (log_tail - math.log(vocab_size - k)).float()


def present_index(present: torch.Tensor | None, n_members: int) -> list[int]:
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


def _present_members(
    preds: TokenPredictions, weights: torch.Tensor, present: torch.Tensor | None
) -> tuple[TokenPredictions, torch.Tensor, torch.Tensor]:
    """The present members' record (M members), their weights (T, M) and every member's
    weights (T, N) (0 for an absent one), renormalized over the present members."""
    index = present_index(present, preds.n_members)
    w_full = _normalized_weights(weights, preds.n_members, preds.n_positions, index)  # (T, N)
    sub = preds if index == list(range(preds.n_members)) else preds.select(index)
    return sub, w_full[:, index], w_full


def _candidate_chunks(
    sub: TokenPredictions, log_share: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """The union of the members' top-K lists, a chunk of positions at a time (memory bound):
    (positions, cand (t, C), logprob (t, M, C)) as `_candidate_logprobs` gives them.
    log_share: (T, M) each member's tail share."""
    step = _chunk_positions(sub.n_members, int(sub.topk_ids.shape[-1]))
    for start in range(0, sub.n_positions, step):
        sl = slice(start, start + step)
        cand, cand_logprob = _candidate_logprobs(
            sub.topk_ids[:, sl].transpose(0, 1),  # (t, M, K)
            sub.topk_logprobs[:, sl].float().transpose(0, 1),
            log_share[sl],  # (t, M)
        )
        yield sl, cand, cand_logprob


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
    sub, w, w_full = _present_members(preds, weights, present)  # w: (T, M)
    logprob = sub.target_logprob.float().transpose(0, 1)  # (T, M)
    terms = torch.where(w > 0, logprob + torch.log(w), -math.inf)  # zero weight: no term
    target_logprob = torch.logsumexp(terms, dim=1)  # (T,)

    log_share = log_tail_share(sub.topk_logprobs, sub.vocab_size).transpose(0, 1)  # (T, M)
    top1 = torch.empty(preds.n_positions, dtype=torch.long)
    for sl, cand, cand_logprob in _candidate_chunks(sub, log_share):
        mixture = (w[sl].unsqueeze(-1) * cand_logprob.exp()).sum(dim=1)  # (t, C)
        top1[sl] = cand.gather(1, mixture.argmax(dim=1, keepdim=True)).squeeze(1)
    return PooledPrediction(target_logprob, top1, w_full)


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
    sub, w, w_full = _present_members(preds, weights, present)  # w: (T, M)
    positive = w > 0

    def weighted_sum(logprob: torch.Tensor, weight: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        # sum_i w_i log p_i, where a zero weight contributes nothing (not 0 * -inf = NaN).
        return torch.where(on, weight * logprob, torch.zeros(())).sum(dim=1)

    numerator = weighted_sum(sub.target_logprob.float().transpose(0, 1), w, positive)  # (T,)

    vocab = sub.vocab_size
    log_share = log_tail_share(sub.topk_logprobs, vocab).transpose(0, 1)  # (T, M)
    outside = weighted_sum(log_share, w, positive)  # (T,) log score of a token outside the union
    log_norm = torch.empty(preds.n_positions)
    top1 = torch.empty(preds.n_positions, dtype=torch.long)
    for sl, cand, cand_logprob in _candidate_chunks(sub, log_share):
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


def uniform_weights(n_members: int) -> torch.Tensor:
    """(N,) equal weights."""
    return torch.full((n_members,), 1.0 / n_members)
