from __future__ import annotations

import math

import pytest
import torch

from collective.lm.predictions import TokenPredictions, predictions_from_logits
from collective.run import pools
from collective.run.aggregate import (
    HedgeWeights,
    PerplexityWeights,
    log_tail_share,
    make_aggregator,
    pool_linear,
    pool_log,
)


def random_logits(n: int, t: int, v: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, v, generator=g) * scale  # (N, T, V)


def random_targets(t: int, v: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, v, (t,), generator=g)


def listing_one_token(vocab_size: int, listed: list[tuple[int, float]], target_probs: list[float]) -> TokenPredictions:
    """Members at one position with K = 1: member i lists token listed[i][0] at probability
    listed[i][1] and gives the realized token target_probs[i]."""
    return TokenPredictions(
        target_logprob=torch.log(torch.tensor([[p] for p in target_probs])),
        topk_ids=torch.tensor([[[token]] for token, _ in listed]),
        topk_logprobs=torch.log(torch.tensor([[[p]] for _, p in listed])),
        vocab_size=vocab_size,
    )


def at(tensor: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(T, V) values at the (T,) targets."""
    return tensor.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def test_a_tail_share_of_nothing_has_a_zero_gradient_not_nan():
    # member 0's top-K holds all its mass (tail -inf), member 1's does not
    logprobs = torch.log(torch.tensor([[1.0, 0.0], [0.5, 0.25]])).requires_grad_(True)  # (N=2, K=2)
    share = log_tail_share(logprobs, 4)
    assert share[0].item() == -math.inf and math.isfinite(share[1].item())
    (share[1] + torch.where(torch.isinf(share), 0.0, share).sum()).backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0].abs().sum() == 0


def test_tail_share_spreads_the_mass_left_outside_the_top_k_evenly():
    logprobs = torch.log(torch.tensor([[0.5, 0.3]]))  # (1, K=2), tail 0.2 over V - K = 8 tokens
    assert torch.allclose(log_tail_share(logprobs, 10), torch.log(torch.tensor([0.025])))
    assert log_tail_share(logprobs, 2).item() == -math.inf


def test_linear_pool_of_one_member_is_that_member():
    targets = random_targets(40, 300)
    preds = predictions_from_logits(random_logits(1, 40, 300), targets, top_k=16)
    pooled = pool_linear(preds, torch.ones(1))
    assert torch.equal(pooled.target_logprob, preds.target_logprob[0])
    assert torch.equal(pooled.top1, preds.topk_ids[0, :, 0])


def test_linear_pool_target_logprob_matches_a_hand_computed_mixture_of_two_members():
    logits = random_logits(2, 30, 50)
    targets = random_targets(30, 50)
    preds = predictions_from_logits(logits, targets, top_k=5)
    pooled = pool_linear(preds, torch.tensor([0.25, 0.75]))
    probs = torch.softmax(logits, dim=-1)  # (2, T, V)
    mixture = 0.25 * probs[0] + 0.75 * probs[1]  # (T, V)
    assert torch.allclose(pooled.target_logprob, at(mixture, targets).log(), atol=1e-5)


def _mixture(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(T, V) log of sum_i w_i p_i, from (N, T, V) logits."""
    return (torch.softmax(logits, dim=-1) * weights[:, None, None]).sum(0).log()


def _product_of_experts(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(T, V) log of prod_i p_i^w_i, normalized, from (N, T, V) logits."""
    return (torch.log_softmax(logits, -1) * weights[:, None, None]).sum(0).log_softmax(-1)


@pytest.mark.parametrize(
    "pool, formula, seed, weights",
    [(pool_linear, _mixture, 3, [0.2, 0.3, 0.5]), (pool_log, _product_of_experts, 4, [0.5, 0.2, 0.3])],
    ids=["linear", "log"],
)
def test_a_pool_equals_its_full_vocabulary_formula_when_k_equals_v(pool, formula, seed, weights):
    logits = random_logits(3, 50, 40, seed=seed)
    targets = random_targets(50, 40)
    preds = predictions_from_logits(logits, targets, top_k=40)
    pooled = pool(preds, torch.tensor(weights))
    expected = formula(logits, torch.tensor(weights))  # (T, V) log-probabilities
    assert torch.allclose(pooled.target_logprob, at(expected, targets), atol=1e-5)
    assert torch.equal(pooled.top1, expected.argmax(-1))


def test_linear_pool_top1_uses_tail_shares_for_candidates_a_member_does_not_list():
    # V = 4, K = 1. Member 0: token 0 at 0.4, tail 0.6 -> 0.2 each; member 1: token 1 at 0.3,
    # tail 0.7 -> 0.7 / 3 each. Mixture: token 0 = 0.4 + 0.233, token 1 = 0.2 + 0.3.
    preds = listing_one_token(4, [(0, 0.4), (1, 0.3)], target_probs=[0.4, 0.3])
    assert pool_linear(preds, torch.tensor([0.5, 0.5])).top1.tolist() == [0]
    assert pool_linear(preds, torch.tensor([0.1, 0.9])).top1.tolist() == [1]


def test_log_pool_of_identical_members_is_that_member():
    one = predictions_from_logits(random_logits(1, 40, 300), random_targets(40, 300), top_k=16)
    three = TokenPredictions.stack([one, one, one])
    pooled = pool_log(three, torch.full((3,), 1 / 3))
    assert torch.allclose(pooled.target_logprob, one.target_logprob[0], atol=1e-5)
    assert torch.equal(pooled.top1, one.topk_ids[0, :, 0])




def test_log_pool_normalizer_counts_tokens_outside_the_union_with_their_tail_shares():
    # V = 4, K = 1, two members both listing token 0 at 0.7 (tail 0.1 per other token):
    # identical members, so the pool is the member even though K < V.
    preds = listing_one_token(4, [(0, 0.7), (0, 0.7)], target_probs=[0.1, 0.1])
    pooled = pool_log(preds, torch.tensor([0.5, 0.5]))
    assert pooled.target_logprob.item() == pytest.approx(math.log(0.1), abs=1e-6)


def test_pools_work_in_chunks_of_positions(monkeypatch):
    logits = random_logits(3, 37, 60, seed=5)
    preds = predictions_from_logits(logits, random_targets(37, 60), top_k=7)
    weights = torch.tensor([0.2, 0.3, 0.5])
    whole_linear, whole_log = pool_linear(preds, weights), pool_log(preds, weights)
    monkeypatch.setattr(pools, "_CHUNK_ELEMENTS", 3 * 3 * 7 * 4)  # 4 positions a chunk
    assert torch.equal(pool_linear(preds, weights).top1, whole_linear.top1)
    chunked = pool_log(preds, weights)
    assert torch.equal(chunked.top1, whole_log.top1)
    assert torch.allclose(chunked.target_logprob, whole_log.target_logprob)


def test_absent_members_are_left_out_and_the_weights_renormalized():
    logits = random_logits(3, 20, 30, seed=6)
    targets = random_targets(20, 30)
    preds = predictions_from_logits(logits, targets, top_k=30)
    garbage = TokenPredictions(
        preds.target_logprob.clone().index_fill_(0, torch.tensor([1]), math.nan),
        preds.topk_ids,
        preds.topk_logprobs,
        preds.vocab_size,
    )
    present = torch.tensor([True, False, True])
    pooled = pool_linear(garbage, torch.tensor([0.2, 0.3, 0.5]), present)
    alone = pool_linear(preds.select([0, 2]), torch.tensor([0.2, 0.5]))
    assert torch.allclose(pooled.target_logprob, alone.target_logprob)
    assert torch.equal(pooled.top1, alone.top1)
    assert pooled.weights is not None
    assert torch.allclose(pooled.weights[0], torch.tensor([2 / 7, 0.0, 5 / 7]))
    logpooled = pool_log(garbage, torch.full((3,), 1 / 3), present)
    assert torch.allclose(
        logpooled.target_logprob, pool_log(preds.select([0, 2]), torch.ones(2) / 2).target_logprob
    )


def test_pooling_with_no_member_present_is_an_error():
    preds = predictions_from_logits(random_logits(2, 4, 10), random_targets(4, 10), top_k=3)
    with pytest.raises(ValueError, match="no member is present"):
        pool_linear(preds, torch.ones(2) / 2, torch.tensor([False, False]))


def test_hedge_weights_at_a_position_ignore_losses_at_and_after_it():
    hedge_a, hedge_b = HedgeWeights(3, eta=0.5), HedgeWeights(3, eta=0.5)
    g = torch.Generator().manual_seed(7)
    first_round = torch.rand(3, 10, generator=g) * 5
    hedge_a.step(first_round)
    hedge_b.step(first_round)
    losses = torch.rand(3, 12, generator=g) * 5
    changed = losses.clone()
    changed[:, 6:] = torch.rand(3, 6, generator=g) * 50
    weights_a, weights_b = hedge_a.step(losses), hedge_b.step(changed)
    assert torch.equal(weights_a[:7], weights_b[:7])
    assert not torch.equal(weights_a[7:], weights_b[7:])


def test_hedge_moves_weight_to_the_better_member_across_rounds():
    hedge = HedgeWeights(2, eta=1.0)
    losses = torch.tensor([[1.0] * 8, [2.0] * 8])  # member 0 is better by 1 nat per token
    weights = hedge.step(losses)
    assert torch.equal(weights[0], torch.tensor([0.5, 0.5]))  # nothing seen yet
    assert torch.allclose(weights[3], torch.softmax(torch.tensor([-3.0, -6.0]), 0))
    later = hedge.step(losses)
    assert later[0, 0] > weights[-1, 0] > 0.5


def test_hedge_state_survives_a_round_trip_through_plain_data():
    hedge = HedgeWeights(2, eta=0.3)
    hedge.step(torch.tensor([[1.0, 2.0], [3.0, 0.5]]))
    state = hedge.state_dict()
    assert all(isinstance(x, float) for x in state["cumulative_loss"])
    restored = HedgeWeights(2)
    restored.load_state_dict(state)
    losses = torch.tensor([[0.7, 0.1, 2.0], [0.2, 0.9, 1.0]])
    assert torch.equal(restored.step(losses), hedge.step(losses))


def test_hedge_charges_an_absent_member_the_present_members_mean_loss():
    hedge = HedgeWeights(3, eta=1.0)
    losses = torch.tensor([[1.0, 1.0], [math.nan, math.nan], [3.0, 3.0]])
    hedge.step(losses, torch.tensor([True, False, True]))
    assert hedge.state_dict()["cumulative_loss"] == [0.0, 2.0, 4.0]


def test_perplexity_weights_are_uniform_before_any_loss_and_then_favour_low_window_nll():
    weights = PerplexityWeights(2, temperature=0.5, window_tokens=2)
    out = weights.step(torch.tensor([[1.0, 1.0, 4.0, 4.0], [2.0, 2.0, 2.0, 2.0]]))
    assert torch.equal(out[0], torch.tensor([0.5, 0.5]))
    # position 1: means 1 vs 2; position 3: window (1, 4) -> 2.5 vs 2.
    assert torch.allclose(out[1], torch.softmax(torch.tensor([-2.0, -4.0]), 0))
    assert torch.allclose(out[3], torch.softmax(torch.tensor([-5.0, -4.0]), 0))
    # the next round starts from the trailing window (4, 4) vs (2, 2)
    nxt = weights.step(torch.zeros(2, 1))
    assert torch.allclose(nxt[0], torch.softmax(torch.tensor([-8.0, -4.0]), 0))


def test_perplexity_weights_are_past_only_and_serializable():
    a, b = PerplexityWeights(3, 1.0, 5), PerplexityWeights(3, 1.0, 5)
    g = torch.Generator().manual_seed(8)
    losses = torch.rand(3, 9, generator=g)
    changed = losses.clone()
    changed[:, 4:] += 10
    assert torch.equal(a.step(losses)[:5], b.step(changed)[:5])
    restored = PerplexityWeights(3)
    restored.load_state_dict(a.state_dict())
    assert torch.equal(restored.step(losses), a.step(losses))


def test_a_state_of_another_method_or_size_is_refused():
    with pytest.raises(ValueError, match="not a perplexity state for 3 members"):
        PerplexityWeights(3).load_state_dict(HedgeWeights(3).state_dict())
    with pytest.raises(ValueError, match="not a hedge state for 2 members"):
        HedgeWeights(2).load_state_dict(HedgeWeights(3).state_dict())


def test_mean_and_logpool_aggregators_are_the_uniform_pools():
    preds = predictions_from_logits(random_logits(3, 12, 20), random_targets(12, 20), top_k=4)
    uniform = torch.ones(3) / 3
    mean = make_aggregator("mean", 3).pool(preds)
    assert torch.equal(mean.target_logprob, pool_linear(preds, uniform).target_logprob)
    logpool = make_aggregator("logpool", 3).pool(preds)
    assert torch.equal(logpool.target_logprob, pool_log(preds, uniform).target_logprob)


def test_readout_aggregator_returns_the_chosen_member_and_nan_when_it_is_absent():
    preds = predictions_from_logits(random_logits(3, 12, 20), random_targets(12, 20), top_k=4)
    agg = make_aggregator("readout", 3, readout_index=2)
    out = agg.pool(preds)
    assert torch.equal(out.target_logprob, preds.target_logprob[2])
    assert torch.equal(out.top1, preds.topk_ids[2, :, 0])
    absent = agg.pool(preds, torch.tensor([True, True, False]))
    assert bool(absent.target_logprob.isnan().all()) and bool((absent.top1 == -1).all())
    strict = make_aggregator("readout", 3, readout_index=2, on_absent="raise")
    with pytest.raises(ValueError, match="readout member 2 is absent"):
        strict.pool(preds, torch.tensor([True, True, False]))


def test_weighted_aggregator_learns_across_rounds_and_clones_and_resets_independently():
    logits = random_logits(2, 16, 20, seed=9)
    logits[1] = logits[1] / 100  # member 1 is nearly uniform: worse
    targets = random_targets(16, 20)
    logits[0].scatter_(1, targets.unsqueeze(1), 20.0)  # member 0 is nearly always right
    preds = predictions_from_logits(logits, targets, top_k=4)
    agg = make_aggregator("weighted", 2, method="hedge", eta=1.0)
    fresh = agg.clone()
    first = agg.pool(preds)
    assert first.weights is not None and first.weights[0, 0] == 0.5
    second = agg.pool(preds)
    assert second.weights is not None and second.weights[0, 0] > 0.99
    assert torch.equal(fresh.pool(preds).target_logprob, first.target_logprob)
    restored = make_aggregator("weighted", 2)
    restored.load_state_dict(agg.state_dict())
    assert torch.equal(restored.pool(preds).target_logprob, agg.clone().pool(preds).target_logprob)
    agg.reset()
    assert torch.equal(agg.pool(preds).target_logprob, first.target_logprob)
    perplexity = make_aggregator("weighted", 2, method="perplexity", window_tokens=8)
    perplexity.pool(preds)
    later = perplexity.pool(preds).weights
    assert later is not None and later[0, 0] > 0.9


def test_bad_aggregator_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown aggregator"):
        make_aggregator("median", 2)
    with pytest.raises(ValueError, match="readout_index"):
        make_aggregator("readout", 2, readout_index=5)
    with pytest.raises(ValueError, match="unknown weight method"):
        make_aggregator("weighted", 2, method="vote")
    preds = predictions_from_logits(random_logits(3, 4, 10), random_targets(4, 10), top_k=3)
    with pytest.raises(ValueError, match="built for 2 members got 3"):
        make_aggregator("mean", 2).pool(preds)
