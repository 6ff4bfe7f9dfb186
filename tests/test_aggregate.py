from __future__ import annotations

import math

import pytest
import torch

from collective.lm.predictions import TokenPredictions, predictions_from_logits
from collective.run import pools
from collective.run.aggregate import (
    HedgeWeights,
    PerplexityWeights,
    make_aggregator,
    pool_linear,
    pool_log,
    recorded_tail,
)
from collective.run.pools import MIN_TAIL_MASS


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


def dense_recorded(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(N, T, V) float64 log q_i: each member's top-k probabilities as they are, the rest of
    its mass spread evenly over its other V - k tokens (the pools' recorded distribution,
    built densely from the full logits, independently of the pools' candidate code)."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)  # (N, T, V)
    top, ids = logprobs.topk(k, dim=-1)  # (N, T, k)
    tail = 1 - top.exp().sum(-1, keepdim=True)  # (N, T, 1), well above the minimum here
    q = (tail / (logits.shape[-1] - k)).expand_as(logprobs).clone()
    q.scatter_(-1, ids, top.exp())
    return q.log()


def every_token_as_target(logits: torch.Tensor, k: int) -> tuple[TokenPredictions, torch.Tensor]:
    """The members' records with each position repeated V times, realized token 0..V-1, so
    that a pool's target log-probabilities at a position are its whole distribution:
    record (N, T*V) and targets (T*V,)."""
    vocab = logits.shape[-1]
    targets = torch.arange(vocab).repeat(logits.shape[1])  # (T*V,)
    return predictions_from_logits(logits.repeat_interleave(vocab, dim=1), targets, top_k=k), targets


# Float32 log-probabilities of up to ~30 nats carry ~2e-6 nats of rounding each; the pools
# add a few such terms, so 1e-5 nats bounds rounding and nothing else (the old logpool was
# off by up to several nats on single tokens of these members).
EXACT_NATS = 1e-5


def test_a_top_k_that_holds_all_the_mass_leaves_the_minimum_tail_with_a_finite_gradient():
    # member 0's top-K holds all its mass: its tail is raised to the minimum and its top-K
    # scaled down so that q_0 still sums to 1; member 1 keeps its own tail.
    logprobs = torch.log(torch.tensor([[1.0, 0.0], [0.5, 0.25]])).requires_grad_(True)  # (N=2, K=2)
    tail = recorded_tail(logprobs, 4)
    assert tail.raised.tolist() == [True, False]
    q0 = torch.cat([tail.listed(logprobs)[0].exp(), tail.log_share[0].exp().expand(2)])  # (V,)
    assert q0.sum().item() == pytest.approx(1.0, abs=1e-7)
    assert q0[2].item() == pytest.approx(MIN_TAIL_MASS / 2, rel=1e-5)
    assert tail.log_scale[1].item() == 0.0
    (tail.log_share.sum() + tail.log_scale.sum()).backward()
    assert torch.isfinite(logprobs.grad).all()


def test_the_tail_share_spreads_the_mass_left_outside_the_top_k_evenly():
    logprobs = torch.log(torch.tensor([[0.5, 0.3]]))  # (1, K=2), tail 0.2 over V - K = 8 tokens
    assert torch.allclose(recorded_tail(logprobs, 10).log_share, torch.log(torch.tensor([0.025])))
    assert recorded_tail(logprobs, 2).log_share.item() == -math.inf


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
    pooled = pool(preds, torch.tensor(weights)) if pool is pool_linear else pool(preds, torch.tensor(weights), targets)
    expected = formula(logits, torch.tensor(weights))  # (T, V) log-probabilities
    assert torch.allclose(pooled.target_logprob, at(expected, targets), atol=1e-5)
    assert torch.equal(pooled.top1, expected.argmax(-1))


def test_the_log_pool_is_exactly_the_normalized_product_of_the_recorded_distributions():
    """Against a dense product of experts of the same recorded members, K < V, every token
    of the vocabulary taken as the realized one (listed by all, some or none of the members)."""
    logits = random_logits(3, 12, 90, seed=11)
    weights = torch.tensor([0.5, 0.2, 0.3])
    preds, targets = every_token_as_target(logits, k=6)
    pooled = pool_log(preds, weights, targets).target_logprob.view(12, 90).double()  # (T, V)
    dense = (dense_recorded(logits, 6) * weights.double()[:, None, None]).sum(0).log_softmax(-1)  # (T, V)
    listed_by = (preds.topk_ids == targets.view(1, -1, 1)).any(-1).sum(0)  # (T*V,) members listing y
    assert set(listed_by.tolist()) >= {0, 1, 2}  # unlisted, listed by one, listed by some
    assert (pooled - dense).abs().max().item() < EXACT_NATS
    assert (pooled.exp().sum(-1) - 1).abs().max().item() < EXACT_NATS  # a distribution over all V


def test_a_linear_pool_is_exactly_the_mixture_of_the_full_distributions_with_any_weights():
    """Per-position weights as a weighted (Hedge) pool uses them, one member absent."""
    logits = random_logits(3, 10, 70, seed=12)
    g = torch.Generator().manual_seed(13)
    weights = torch.rand(10, 3, generator=g)  # (T, N), renormalized over the present members
    present = torch.tensor([True, False, True])
    preds, targets = every_token_as_target(logits, k=5)
    pooled = pool_linear(preds, weights.repeat_interleave(70, dim=0), present)
    kept = weights.double() * present.double()
    kept = kept / kept.sum(1, keepdim=True)  # (T, N)
    dense = (torch.softmax(logits.double(), -1) * kept.transpose(0, 1).unsqueeze(-1)).sum(0)  # (T, V)
    got = pooled.target_logprob.view(10, 70).double()
    assert (got - dense.log()).abs().max().item() < EXACT_NATS
    assert (got.exp().sum(-1) - 1).abs().max().item() < EXACT_NATS


@pytest.mark.parametrize("kind", ["linear", "log"])
def test_pooled_top1_is_the_argmax_of_the_dense_pool_even_where_no_member_lists_it(kind):
    """Random members (K < V), then one position where two members are certain of
    different tokens: their tails are raised to the minimum, and the product of experts
    then puts the most mass on the tokens neither lists (the lowest of them is the top-1)."""
    v, k = 40, 2
    logits = torch.cat([random_logits(2, 30, v, seed=14), torch.full((2, 1, v), -80.0)], dim=1)  # (N, T=31, V)
    logits[0, 30, 7], logits[0, 30, 3] = 0.0, -69.0  # member 0: token 7 certain, token 3 at e^-69
    logits[1, 30, 3], logits[1, 30, 7] = 0.0, -69.0  # member 1: the other way round
    logits[:, 30, 0] = -75.0  # token 0 is nobody's top-2 but is the lowest unlisted id
    targets = random_targets(31, v)
    preds = predictions_from_logits(logits, targets, top_k=k)
    weights = torch.tensor([0.5, 0.5])
    q = dense_recorded(logits, k).exp()  # (N, T, V), an even tail: only position 30 is raised
    q[:, 30] = torch.tensor([[MIN_TAIL_MASS / (v - k)]], dtype=torch.float64).expand(2, v).clone()
    q[0, 30, 7], q[0, 30, 3] = 1.0, math.exp(-69.0)
    q[1, 30, 3], q[1, 30, 7] = 1.0, math.exp(-69.0)
    if kind == "linear":
        top1, dense = pool_linear(preds, weights).top1, (q * 0.5).sum(0)
    else:
        top1, dense = pool_log(preds, weights, targets).top1, (q.log() * 0.5).sum(0)
    assert torch.equal(top1[:30], dense[:30].argmax(-1))
    # position 30: the mixture ties 7 and 3 (7 is listed first); the product's maximum is
    # shared by every unlisted token, and 0 is the lowest of them
    assert dense[30].max() > dense[30, 7] if kind == "log" else dense[30, 7] == dense[30].max()
    assert top1[30].item() == (7 if kind == "linear" else 0)


def test_top1_ties_go_to_the_token_listed_first():
    # V = 6, K = 2: member 0 lists tokens 4 and 1 at 0.3 each, member 1 lists 1 and 4 at
    # 0.3 each: every pool ties 4 and 1, and member 0 listed 4 first.
    preds = TokenPredictions(
        target_logprob=torch.log(torch.tensor([[0.1], [0.1]])),
        topk_ids=torch.tensor([[[4, 1]], [[1, 4]]]),
        topk_logprobs=torch.log(torch.tensor([[[0.3, 0.3]], [[0.3, 0.3]]])),
        vocab_size=6,
    )
    halves = torch.tensor([0.5, 0.5])
    assert pool_linear(preds, halves).top1.tolist() == [4]
    assert pool_log(preds, halves, torch.tensor([0])).top1.tolist() == [4]
    assert pool_linear(preds, torch.tensor([0.3, 0.7])).top1.tolist() == [4]  # weights do not reorder a tie


def test_linear_pool_top1_uses_tail_shares_for_candidates_a_member_does_not_list():
    # V = 4, K = 1. Member 0: token 0 at 0.4, tail 0.6 -> 0.2 each; member 1: token 1 at 0.3,
    # tail 0.7 -> 0.7 / 3 each. Mixture: token 0 = 0.4 + 0.233, token 1 = 0.2 + 0.3.
    preds = listing_one_token(4, [(0, 0.4), (1, 0.3)], target_probs=[0.4, 0.3])
    assert pool_linear(preds, torch.tensor([0.5, 0.5])).top1.tolist() == [0]
    assert pool_linear(preds, torch.tensor([0.1, 0.9])).top1.tolist() == [1]


def test_log_pool_of_identical_members_is_their_recorded_distribution():
    logits = random_logits(1, 40, 300)
    targets = random_targets(40, 300)
    one = predictions_from_logits(logits, targets, top_k=16)
    pooled = pool_log(TokenPredictions.stack([one, one, one]), torch.full((3,), 1 / 3), targets)
    recorded = at(dense_recorded(logits, 16)[0], targets)  # (T,) log q(y): p(y) if listed, else the tail share
    listed = (one.topk_ids[0] == targets.unsqueeze(-1)).any(-1)
    assert 0 < int(listed.sum()) < len(targets)  # both kinds of realized token occur
    assert torch.allclose(pooled.target_logprob.double(), recorded, atol=1e-5)
    assert torch.equal(pooled.top1, one.topk_ids[0, :, 0])


def test_log_pool_normalizer_counts_tokens_outside_the_union_with_their_tail_shares():
    # V = 4, K = 1, two members both listing token 0 at 0.7 (tail 0.1 per other token):
    # identical members, so the pool is the member even though K < V.
    preds = listing_one_token(4, [(0, 0.7), (0, 0.7)], target_probs=[0.1, 0.1])
    pooled = pool_log(preds, torch.tensor([0.5, 0.5]), torch.tensor([2]))
    assert pooled.target_logprob.item() == pytest.approx(math.log(0.1), abs=1e-6)


def test_pools_work_in_chunks_of_positions(monkeypatch):
    logits = random_logits(3, 37, 60, seed=5)
    targets = random_targets(37, 60)
    preds = predictions_from_logits(logits, targets, top_k=7)
    weights = torch.tensor([0.2, 0.3, 0.5])
    whole_linear, whole_log = pool_linear(preds, weights), pool_log(preds, weights, targets)
    monkeypatch.setattr(pools, "_CHUNK_ELEMENTS", 3 * 3 * 7 * 4)  # 12 positions a chunk
    assert torch.equal(pool_linear(preds, weights).top1, whole_linear.top1)
    chunked = pool_log(preds, weights, targets)
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
    logpooled = pool_log(garbage, torch.full((3,), 1 / 3), targets, present)
    assert torch.allclose(
        logpooled.target_logprob, pool_log(preds.select([0, 2]), torch.ones(2) / 2, targets).target_logprob
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
    targets = random_targets(12, 20)
    preds = predictions_from_logits(random_logits(3, 12, 20), targets, top_k=4)
    uniform = torch.ones(3) / 3
    mean = make_aggregator("mean", 3).pool(preds)
    assert torch.equal(mean.target_logprob, pool_linear(preds, uniform).target_logprob)
    logpool = make_aggregator("logpool", 3).pool(preds, targets=targets)
    assert torch.equal(logpool.target_logprob, pool_log(preds, uniform, targets).target_logprob)
    with pytest.raises(ValueError, match="logpool aggregator needs the round's targets"):
        make_aggregator("logpool", 3).pool(preds)


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
