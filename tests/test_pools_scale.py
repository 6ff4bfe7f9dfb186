"""The pools cost time and memory linear in the members (issue 12): they give the numbers of
the former quadratic implementation (kept below as the reference), and no tensor they make
grows faster than N * K * T."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from collective.lm.predictions import TokenPredictions
from collective.run import pools
from collective.run.pools import PooledPrediction, pool_linear, pool_log

# ---------------------------------------------------------------------------------------------
# Reference: the candidate pools as they were before issue 12 (O(N^2 K T): every member's
# log q_i looked up at every candidate of the union), copied verbatim but for the names.


def reference_candidate_logprobs(
    topk_ids: torch.Tensor, listed_logq: torch.Tensor, log_share: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    t, n, k = topk_ids.shape
    cand = topk_ids.reshape(t, n * k)
    sorted_ids, order = topk_ids.sort(dim=-1)
    sorted_ids = sorted_ids.contiguous()
    sorted_logq = listed_logq.gather(-1, order)
    query = cand.unsqueeze(1).expand(t, n, n * k).contiguous()  # (t, M, C)
    pos = torch.searchsorted(sorted_ids, query).clamp_(max=k - 1)
    found = sorted_ids.gather(-1, pos) == query
    logq = torch.where(found, sorted_logq.gather(-1, pos), log_share.unsqueeze(-1))
    return cand, logq


def reference_candidate_chunks(
    sub: TokenPredictions, tail: pools.RecordedTail
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    step = max(1, (1 << 22) // (sub.n_members * sub.n_members * int(sub.topk_ids.shape[-1])))
    listed = tail.listed(sub.topk_logprobs.float())
    for start in range(0, sub.n_positions, step):
        sl = slice(start, start + step)
        cand, cand_logq = reference_candidate_logprobs(
            sub.topk_ids[:, sl].transpose(0, 1), listed[:, sl].transpose(0, 1), tail.log_share[:, sl].transpose(0, 1)
        )
        yield sl, cand, cand_logq


def reference_distinct(cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sorted_cand, order = cand.sort(dim=1, stable=True)
    first = torch.ones_like(sorted_cand, dtype=torch.bool)
    first[:, 1:] = sorted_cand[:, 1:] != sorted_cand[:, :-1]
    return sorted_cand, order, first


def reference_top1(
    cand: torch.Tensor, score: torch.Tensor, unlisted: torch.Tensor, raised: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    best = score.argmax(dim=1, keepdim=True)
    listed = cand.gather(1, best).squeeze(1)
    sorted_cand, _, first = reference_distinct(cand)
    rank = first.cumsum(dim=1) - 1
    n_listed = first.sum(dim=1)
    gap = torch.where(first & (sorted_cand != rank), rank, n_listed.unsqueeze(1))
    lowest_unlisted = gap.min(dim=1).values
    wins = raised & (n_listed < vocab_size) & (unlisted > score.gather(1, best).squeeze(1))
    return torch.where(wins, lowest_unlisted, listed)


def reference_pool_linear(preds: TokenPredictions, weights: torch.Tensor, present: torch.Tensor | None) -> PooledPrediction:
    sub, w, w_full = pools._present_members(preds, weights, present)
    terms = torch.where(w > 0, sub.target_logprob.float().transpose(0, 1) + torch.log(w), -math.inf)
    tail = pools.recorded_tail(sub.topk_logprobs, sub.vocab_size)
    unlisted = (w * tail.log_share.transpose(0, 1).exp()).sum(dim=1)
    raised = pools._raised(tail, w)
    top1 = torch.empty(preds.n_positions, dtype=torch.long)
    for sl, cand, cand_logq in reference_candidate_chunks(sub, tail):
        mixture = (w[sl].unsqueeze(-1) * cand_logq.exp()).sum(dim=1)
        top1[sl] = reference_top1(cand, mixture, unlisted[sl], raised[sl], sub.vocab_size)
    return PooledPrediction(torch.logsumexp(terms, dim=1), top1, w_full)


def reference_pool_log(
    preds: TokenPredictions, weights: torch.Tensor, targets: torch.Tensor, present: torch.Tensor | None
) -> PooledPrediction:
    sub, w, w_full = pools._present_members(preds, weights, present)
    positive = w > 0
    tail = pools.recorded_tail(sub.topk_logprobs, sub.vocab_size)
    numerator = pools._weighted_sum(pools._target_logq(sub, tail, targets), w, positive)
    unlisted = pools._weighted_sum(tail.log_share.transpose(0, 1), w, positive)
    raised = pools._raised(tail, w)
    log_norm = torch.empty(preds.n_positions)
    top1 = torch.empty(preds.n_positions, dtype=torch.long)
    for sl, cand, cand_logq in reference_candidate_chunks(sub, tail):
        score = pools._weighted_sum(cand_logq, w[sl].unsqueeze(-1), positive[sl].unsqueeze(-1))
        top1[sl] = reference_top1(cand, score, unlisted[sl], raised[sl], sub.vocab_size)
        _, order, first = reference_distinct(cand)
        union_score = torch.where(first, score.gather(1, order), -math.inf)
        n_unlisted = (sub.vocab_size - first.sum(dim=1)).double()
        unlisted_term = (unlisted[sl].double() + torch.log(n_unlisted)).float()
        log_norm[sl] = torch.logsumexp(torch.cat([union_score, unlisted_term.unsqueeze(1)], dim=1), dim=1)
    return PooledPrediction(numerator - log_norm, top1, w_full)


# ---------------------------------------------------------------------------------------------


def random_members(n: int, k: int, t: int, vocab: int, seed: int) -> tuple[TokenPredictions, torch.Tensor]:
    """N members listing ids from a pool of 2K + 3 (so that lists overlap), with exact ties
    (member 1 repeats member 0; some equal probabilities within a list), one member whose
    top-K hold all its mass (its tail raised), a last position of members certain of
    different tokens, and realized tokens half outside every list."""
    g = torch.Generator().manual_seed(seed)
    pool_size = min(vocab, 2 * k + 3)
    ids = torch.stack([torch.randperm(pool_size, generator=g)[:k] for _ in range(n * t)]).view(n, t, k)
    mass = torch.rand(n, t, 1, generator=g) * 0.9 + 0.05  # the top-K's total
    probs = torch.rand(n, t, k, generator=g).sort(dim=-1, descending=True).values
    probs[..., 1::3] = probs[..., ::3][..., : probs[..., 1::3].shape[-1]]  # equal neighbours
    probs = probs.sort(dim=-1, descending=True).values
    probs = probs / probs.sum(-1, keepdim=True) * mass
    if n > 1:
        ids[1], probs[1] = ids[0], probs[0]
    probs[-1] = probs[-1] / probs[-1].sum(-1, keepdim=True)  # all its mass listed
    if k >= 2 and t >= 5:
        # the last position: every member certain of one of two tokens, the other at e^-69:
        # every tail raised, and the log pool's top-1 a token no member lists
        ids[:, -1] = ids[0, -1].clone()
        ids[1::2, -1, :2] = ids[0, -1, :2].flip(0).clone()
        probs[:, -1] = torch.tensor([1.0, math.exp(-69.0)] + [math.exp(-80.0)] * (k - 2))
    targets = torch.where(
        torch.arange(t) % 2 == 0, torch.randint(pool_size, max(vocab, pool_size + 1), (t,), generator=g), ids[0, :, 0]
    ).clamp(max=vocab - 1)
    listed = ids == targets.view(1, t, 1)
    tail_share = ((1 - mass.squeeze(-1)).clamp(min=1e-7) / max(vocab - k, 1)).log()
    target_logprob = torch.where(listed.any(-1), (probs.log() * listed).sum(-1), tail_share)
    return TokenPredictions(target_logprob.float(), ids, probs.log().float(), vocab), targets


def all_pools(
    preds: TokenPredictions, targets: torch.Tensor, present: torch.Tensor | None, seed: int
) -> dict[str, tuple[Callable[..., PooledPrediction], Callable[..., PooledPrediction], tuple]]:
    n, t = preds.n_members, preds.n_positions
    g = torch.Generator().manual_seed(seed)
    weighted = torch.rand(t, n, generator=g) + 0.05
    if n > 1:  # some zero weights; member 0 (always present) keeps a positive one
        weighted[:, n // 2] = torch.where(torch.arange(t) % 2 == 0, 0.0, weighted[:, n // 2])
    uniform = torch.full((n,), 1.0 / n)
    return {
        "mean": (pool_linear, reference_pool_linear, (preds, uniform, present)),
        "weighted": (pool_linear, reference_pool_linear, (preds, weighted, present)),
        "logpool": (pool_log, reference_pool_log, (preds, uniform, targets, present)),
        "logpool-weighted": (pool_log, reference_pool_log, (preds, weighted, targets, present)),
    }


@pytest.mark.parametrize("vocab_is_k", [False, True], ids=["k<v", "k=v"])
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_the_linear_time_pools_equal_the_former_quadratic_ones(n, k, t, vocab_is_k):
    vocab = k if vocab_is_k else 4 * k + 10
    preds, targets = random_members(n, k, t, vocab, seed=100 * n + 10 * k + t)
    masks = [None] if n == 1 else [None, torch.arange(n) % 3 != 1]
    for present in masks:
        for name, (new, old, args) in all_pools(preds, targets, present, seed=n + k + t).items():
            got, want = new(*args), old(*args)
            assert torch.equal(got.top1, want.top1), name
            diff = (got.target_logprob - want.target_logprob).abs().max().item()
            assert diff <= 1e-6 * max(1.0, want.target_logprob.abs().max().item()), (name, diff)
            assert torch.equal(got.weights, want.weights), name


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(x, torch.Tensor):
                self.most = max(self.most, x.numel())
        return out


@pytest.mark.parametrize("pool", ["linear", "log"])
def test_no_tensor_of_a_pool_grows_faster_than_members_times_candidates_times_positions(pool):
    k, t = 4, 3
    for n in [4, 16, 64]:
        preds, targets = random_members(n, k, t, vocab=50, seed=n)
        weights = torch.full((n,), 1.0 / n)
        with LargestTensor() as largest:
            pool_linear(preds, weights) if pool == "linear" else pool_log(preds, weights, targets)
        # the largest is a (T, N*K + 1) table of the union's candidates; the former pools made
        # (T, N, N*K) ones, 64 times too large at N = 64
        assert largest.most <= 2 * n * k * t, (n, largest.most)


@pytest.mark.parametrize("n", [3, 17])
def test_the_log_pool_keeps_the_former_gradient_with_respect_to_the_listed_log_probabilities(n):
    """A controller's objective differentiates the log pool through one member's record."""
    preds, targets = random_members(n, 4, 5, vocab=26, seed=n)
    grads = []
    for pool in (pool_log, reference_pool_log):
        listed = preds.topk_logprobs.clone().requires_grad_(True)
        record = TokenPredictions(preds.target_logprob, preds.topk_ids, listed, preds.vocab_size)
        pool(record, torch.full((n,), 1.0 / n), targets, None).target_logprob.sum().backward()
        grads.append(listed.grad)
    assert grads[0] is not None and grads[1] is not None
    assert torch.isfinite(grads[0]).all()
    assert (grads[0] - grads[1]).abs().max().item() < 1e-6
