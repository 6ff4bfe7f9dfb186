"""The pools: how N members' predictions at T positions become one prediction.

Pure functions on the compact `TokenPredictions` record: `pool_linear` (a mixture),
`pool_log` (a normalized product of experts) and `readout` (one member's own prediction),
each returning a `PooledPrediction`: the pool's log-probability of the realized token and
its argmax token at each position. The `Aggregator` (`collective.run.aggregate`) chooses
the weights; a collective controller's objective (`collective.run.control`) calls the same
pools with one member's record built from its live log-probabilities, so the pools keep
autograd (the aggregator itself runs them without).

What a member's record says about its whole distribution (`scenarios/README.md`, aggregator):
its *recorded distribution* q_i gives each of its top-K tokens its recorded probability and
spreads the rest of its mass, the tail 1 - sum(top-K), uniformly over the V - K tokens
outside its top-K. The tail is at least `MIN_TAIL_MASS` (the top-K are then scaled so that
q_i still sums to 1), so that q_i gives every token a positive probability.

- `pool_linear`: the NLL is that of the mixture sum_i w_i p_i of the members' full
  distributions (exact: it needs only each p_i(y), which the record holds); top-1 is the
  argmax of the mixture of the recorded distributions sum_i w_i q_i.
- `pool_log`: the pool is prod_i q_i^{w_i} / Z over the whole vocabulary; both its NLL and
  its top-1 are exact for that distribution (the full p_i is not at hand in every runtime,
  and the product needs every token's probability).
- top-1 ties go to the token listed first (members in node order, each member's list most
  likely first); a token no member lists is the top-1 only when it is strictly more likely
  than every listed one, and then it is the lowest such token id.

Members that missed a round are left out by a `present: (N,) bool` mask: the weights are
renormalized over the present members.

Time and memory are linear in the members: each member's listed probabilities are added
to the slots of the distinct ids of the union (`_Union`), never compared with every other
member's list.

Shapes: N members (M present), T positions, K top-K candidates, V vocabulary size,
C = M*K candidates of the union (with repeats).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from collective.lm.predictions import TokenPredictions
from collective.outcomes import PooledPrediction

# Upper bound on the elements of one (chunk, C) temporary of the candidate pools: 1M
# float64 = 8 MB, so that the handful of such temporaries stays well under 100 MB; at
# N = 256 members with K = 64 candidates each a chunk is 64 positions.
_CHUNK_ELEMENTS = 1 << 20

# The least tail mass of a recorded distribution: float32's epsilon, the finest mass that
# float32 top-K log-probabilities resolve next to 1. Without it a member whose top-K seems
# to hold all its mass would give the realized token probability 0 under the log pool.
MIN_TAIL_MASS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class RecordedTail:
    """A member's recorded distribution q_i beyond its top-K list, per position.

    log_share: (...) float32, log q_i(v) of each token v outside the top-K (-inf when K >= V).
    log_scale: (...) float32, log q_i(v) - log p_i(v) for a top-K token v: 0 unless the
        tail was raised to `MIN_TAIL_MASS`, which scales the top-K down.
    raised: (...) bool, where the tail was raised. Only there can a listed token be less
        likely than the share, so only there can a token no member lists be a pool's top-1.
    """

    log_share: torch.Tensor
    log_scale: torch.Tensor
    raised: torch.Tensor

    def listed(self, topk_logprobs: torch.Tensor) -> torch.Tensor:
        """(..., K) log q_i of the top-K tokens."""
        return topk_logprobs + self.log_scale.unsqueeze(-1)


def recorded_tail(topk_logprobs: torch.Tensor, vocab_size: int) -> RecordedTail:
    """The recorded distribution's tail from the top-K log-probabilities (..., K).

    Keeps autograd, finite everywhere: where the tail is raised it is a constant, and the
    gradient reaches the top-K only through the scaling.
    """
    k = int(topk_logprobs.shape[-1])
    shape = topk_logprobs.shape[:-1]
    if k >= vocab_size:
        return RecordedTail(torch.full(shape, -math.inf), torch.zeros(shape), torch.zeros(shape, dtype=torch.bool))
    covered = torch.logsumexp(topk_logprobs.double(), dim=-1)  # log sum p_topk
    tail = -torch.expm1(covered)  # 1 - sum p_topk, accurate when the sum is close to 1
    raised = tail < MIN_TAIL_MASS
    kept_tail = torch.where(raised, torch.full_like(tail, MIN_TAIL_MASS), tail)
    # log(sum p_topk + MIN_TAIL_MASS) where the tail is raised, written so that autograd
    # never meets log of a non-positive number on the branch it discards
    log_total = torch.where(raised, torch.logaddexp(covered, torch.full_like(covered, math.log(MIN_TAIL_MASS))), 0.0)
    log_share = torch.log(kept_tail) - math.log(vocab_size - k) - log_total
    return RecordedTail(log_share.float(), (-log_total).float(), raised)


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


@dataclass(frozen=True)
class _Union:
    """The union of the members' top-K lists at t positions, each distinct id once.

    cand: (t, C) the listed ids, member 0's list first, each list most likely first
        (repeats kept): the order of the top-1 tie rule.
    group: (t, C) int64, the rank of each entry's id among the row's distinct ids (ascending),
        the slot its member's probability is added to.
    n_distinct: (t,) the number of distinct ids.
    lowest_unlisted: (t,) the lowest id that no member lists (n_distinct when that is
        0 .. n_distinct - 1 all listed).
    """

    cand: torch.Tensor
    group: torch.Tensor
    n_distinct: torch.Tensor
    lowest_unlisted: torch.Tensor

    @staticmethod
    def of(cand: torch.Tensor) -> _Union:
        sorted_cand, order = cand.sort(dim=1, stable=True)
        first = torch.ones_like(sorted_cand, dtype=torch.bool)
        first[:, 1:] = sorted_cand[:, 1:] != sorted_cand[:, :-1]
        rank = first.cumsum(dim=1) - 1  # (t, C) in sorted order
        group = torch.empty_like(rank).scatter_(1, order, rank)  # (t, C) in list order
        n_distinct = first.sum(dim=1)
        # the lowest unlisted id is the first distinct rank whose id is not the rank itself
        gap = torch.where(first & (sorted_cand != rank), rank, n_distinct.unsqueeze(1))
        return _Union(cand, group, n_distinct, gap.min(dim=1).values)

    def scores(self, base: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
        """(t, C) float64 score of each distinct id (slot = its rank; slots from n_distinct
        on are unused): base (t,) plus the excesses (t, C) of the entries listing it, added
        in list order (member order: the CPU's scatter_add adds in index order), so that ids
        with equal members' values score equal."""
        return torch.zeros_like(excess).scatter_add(1, self.group, excess) + base.unsqueeze(1)

    def top1(self, scores: torch.Tensor, unlisted: torch.Tensor, raised: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The pool's argmax token under the module's tie rule.

        scores: (t, C) as `scores` gives them (any increasing function of the probability);
        unlisted: (t,) the same score of every token outside the union; raised: (t,) bool,
        whether a weighted member's tail was raised there (elsewhere an unlisted token is
        never more likely than a listed one, and a float tie must not say so).
        """
        entry = scores.gather(1, self.group)  # (t, C) each listed entry's score
        best = entry.argmax(dim=1, keepdim=True)  # (t, 1), the first of equal maxima
        listed = self.cand.gather(1, best).squeeze(1)
        wins = raised & (self.n_distinct < vocab_size) & (unlisted > entry.gather(1, best).squeeze(1))
        return torch.where(wins, self.lowest_unlisted, listed)

    def log_normalizer(self, scores: torch.Tensor, unlisted: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """(t,) float64 log of the sum of exp(score) over the whole vocabulary: each distinct
        id once, and unlisted (t,) for each of the other V - n_distinct tokens."""
        slot = torch.arange(scores.shape[1]).unsqueeze(0)  # (1, C)
        union = torch.where(slot < self.n_distinct.unsqueeze(1), scores, -math.inf)  # (t, C)
        rest = unlisted + torch.log((vocab_size - self.n_distinct).double())  # (t,) -inf if none
        return torch.logsumexp(torch.cat([union, rest.unsqueeze(1)], dim=1), dim=1)


def _chunk_positions(n_members: int, k: int) -> int:
    return max(1, _CHUNK_ELEMENTS // (n_members * k))


def _present_members(
    preds: TokenPredictions, weights: torch.Tensor, present: torch.Tensor | None
) -> tuple[TokenPredictions, torch.Tensor, torch.Tensor]:
    """The present members' record (M members), their weights (T, M) and every member's
    weights (T, N) (0 for an absent one), renormalized over the present members."""
    index = present_index(present, preds.n_members)
    w_full = _normalized_weights(weights, preds.n_members, preds.n_positions, index)  # (T, N)
    sub = preds if index == list(range(preds.n_members)) else preds.select(index)
    return sub, w_full[:, index], w_full


def _candidate_chunks(sub: TokenPredictions, tail: RecordedTail) -> Iterator[tuple[slice, _Union, torch.Tensor]]:
    """The union of the members' top-K lists, a chunk of positions at a time (memory bound):
    (positions, union, listed (t, M, K) the members' log q_i of their own top-K).
    tail: the members' recorded tails, (M, T)."""
    step = _chunk_positions(sub.n_members, int(sub.topk_ids.shape[-1]))
    listed = tail.listed(sub.topk_logprobs.float())  # (M, T, K)
    for start in range(0, sub.n_positions, step):
        sl = slice(start, start + step)
        ids = sub.topk_ids[:, sl].transpose(0, 1)  # (t, M, K)
        yield sl, _Union.of(ids.reshape(ids.shape[0], -1)), listed[:, sl].transpose(0, 1)


def pool_linear(
    preds: TokenPredictions, weights: torch.Tensor, present: torch.Tensor | None = None
) -> PooledPrediction:
    """Linear pool (mixture): p(v) = sum_i w_i p_i(v).

    preds: N members at T positions. weights: (N,) or (T, N), non-negative; they are
    renormalized over the present members. present: optional (N,) bool.

    The target log-probability is exact for the mixture of the members' full distributions
    (logsumexp of log p_i(y) + log w_i). top1 is the exact argmax of the mixture of their
    recorded distributions, sum_i w_i q_i (module docstring), so a pool of one member
    returns its own top-1.
    """
    sub, w, w_full = _present_members(preds, weights, present)  # w: (T, M)
    logprob = sub.target_logprob.float().transpose(0, 1)  # (T, M)
    terms = torch.where(w > 0, logprob + torch.log(w), -math.inf)  # zero weight: no term
    target_logprob = torch.logsumexp(terms, dim=1)  # (T,)

    tail = recorded_tail(sub.topk_logprobs, sub.vocab_size)  # (M, T)
    share = tail.log_share.double().exp().transpose(0, 1)  # (T, M) q_i of a token off its top-K
    w64 = w.double()
    unlisted = (w64 * share).sum(dim=1)  # (T,) q-mixture off the union
    raised = _raised(tail, w)
    top1 = torch.empty(preds.n_positions, dtype=torch.long)
    for sl, union, listed in _candidate_chunks(sub, tail):
        # a member listing v adds w_i (q_i(v) - share_i) to the mixture's value off the union
        excess = w64[sl].unsqueeze(-1) * (listed.double().exp() - share[sl].unsqueeze(-1))  # (t, M, K)
        mixture = union.scores(unlisted[sl], excess.flatten(1))
        top1[sl] = union.top1(mixture, unlisted[sl], raised[sl], sub.vocab_size)
    return PooledPrediction(target_logprob, top1, w_full)


def _raised(tail: RecordedTail, w: torch.Tensor) -> torch.Tensor:
    """(T,) bool: a member with a positive weight (w: (T, M)) had its tail raised there."""
    return (tail.raised.transpose(0, 1) & (w > 0)).any(dim=1)


def _weighted_sum(logq: torch.Tensor, weight: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """sum_i w_i log q_i over dim 1, where a zero weight adds nothing (not 0 * -inf = NaN)."""
    return torch.where(on, weight * logq, torch.zeros(())).sum(dim=1)


def _target_logq(sub: TokenPredictions, tail: RecordedTail, targets: torch.Tensor) -> torch.Tensor:
    """(T, M) each member's log q_i(y_t): its listed value when y_t is in its top-K, else its
    tail share. targets: (T,)."""
    if targets.shape != (sub.n_positions,):
        raise ValueError(f"targets must have shape ({sub.n_positions},), got {tuple(targets.shape)}")
    hit = sub.topk_ids == targets.to(sub.topk_ids.device).view(1, -1, 1)  # (M, T, K)
    slot = hit.long().argmax(dim=-1, keepdim=True)  # (M, T, 1), the slot of y_t (0 when absent)
    listed = tail.listed(sub.topk_logprobs.float()).gather(-1, slot).squeeze(-1)  # (M, T)
    return torch.where(hit.any(dim=-1), listed, tail.log_share).transpose(0, 1)


def pool_log(
    preds: TokenPredictions,
    weights: torch.Tensor,
    targets: torch.Tensor,
    present: torch.Tensor | None = None,
) -> PooledPrediction:
    """Geometric pool (normalized product of experts) of the recorded distributions:
    p(v) = prod_i q_i(v)^{w_i} / Z, Z summing over the whole vocabulary.

    preds: N members at T positions. weights: (N,) or (T, N) exponents, renormalized to
    sum to 1 over the present members. targets: (T,) the realized tokens. present:
    optional (N,) bool.

    Exact for that distribution: each distinct candidate of the union of top-K lists gets
    its members' q_i (a tail share where a member does not list it), each of the V - |union|
    other tokens gets prod_i share_i^{w_i}, and the realized token's q_i come from the same
    record (its listed value, or the member's tail share), not from p_i(y). With K = V it is
    the product of the members' full distributions; pooling identical members returns their
    recorded distribution (up to rounding).
    """
    sub, w, w_full = _present_members(preds, weights, present)  # w: (T, M)
    positive, w64 = w > 0, w.double()
    tail = recorded_tail(sub.topk_logprobs, sub.vocab_size)  # (M, T)
    numerator = _weighted_sum(_target_logq(sub, tail, targets).double(), w64, positive)  # (T,)
    share = tail.log_share.double().transpose(0, 1)  # (T, M)
    unlisted = _weighted_sum(share, w64, positive)  # (T,) log score off the union, -inf if K = V
    base = _weighted_sum(share.nan_to_num(neginf=0.0), w64, positive)  # finite stand-in: K = V lists all
    raised = _raised(tail, w)
    log_norm = torch.empty(preds.n_positions, dtype=torch.float64)
    top1 = torch.empty(preds.n_positions, dtype=torch.long)
    for sl, union, listed in _candidate_chunks(sub, tail):
        # a member listing v adds w_i (log q_i(v) - log share_i) to the score off the union
        gap = w64[sl].unsqueeze(-1) * (listed.double() - share[sl].nan_to_num(neginf=0.0).unsqueeze(-1))
        score = union.scores(base[sl], torch.where(positive[sl].unsqueeze(-1), gap, 0.0).flatten(1))  # (t, C)
        top1[sl] = union.top1(score, unlisted[sl], raised[sl], sub.vocab_size)
        log_norm[sl] = union.log_normalizer(score, unlisted[sl], sub.vocab_size)
    return PooledPrediction((numerator - log_norm).float(), top1, w_full)


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
