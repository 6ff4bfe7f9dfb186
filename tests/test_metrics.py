from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from collective.evaluate.metrics import (
    Estimate,
    RoundStats,
    block_bootstrap,
    gains,
    member_round_stats,
    pooled_round_stats,
    round_stats,
    summarize,
    verdict,
)
from collective.lm.predictions import predictions_from_logits
from collective.run.aggregate import make_aggregator


def make_stats(nll_per_round: list[float], tokens: int = 10) -> RoundStats:
    r = len(nll_per_round)
    count = torch.full((r,), tokens, dtype=torch.long)
    return RoundStats(
        torch.tensor(nll_per_round, dtype=torch.float64) * tokens,
        count,
        torch.zeros(r, dtype=torch.long),
        count * 4,
        torch.zeros(r, dtype=torch.long),
    )


def test_member_nll_equals_cross_entropy_on_its_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 24, 50, generator=g) * 2  # (N, T, V)
    targets = torch.randint(0, 50, (24,), generator=g)
    preds = predictions_from_logits(logits, targets, top_k=5)
    token_bytes = torch.ones(24, dtype=torch.long)
    for member in range(2):
        summary = summarize(member_round_stats(preds, member, targets, token_bytes))
        expected = F.cross_entropy(logits[member], targets).item()
        assert summary.nll == pytest.approx(expected, rel=1e-6)
        assert summary.ppl == pytest.approx(math.exp(expected), rel=1e-6)
        accuracy = (logits[member].argmax(-1) == targets).float().mean().item()
        assert summary.top1_accuracy == pytest.approx(accuracy)


def test_bits_per_byte_is_total_nll_in_bits_over_total_bytes():
    target_logprob = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.5]))
    top1 = torch.tensor([1, 2, 0, 4])
    targets = torch.tensor([1, 0, 0, 3])
    token_bytes = torch.tensor([1, 2, 3, 2])
    stats = round_stats(target_logprob, top1, targets, token_bytes, round_tokens=2)
    assert stats.n_rounds == 2
    assert stats.n_tokens.tolist() == [2, 2] and stats.n_correct.tolist() == [1, 1]
    summary = summarize(stats)
    assert summary.bits_per_byte == pytest.approx((1 + 2 + 3 + 1) / 8)
    assert summary.nll == pytest.approx((1 + 2 + 3 + 1) * math.log(2) / 4)
    assert summary.top1_accuracy == 0.5 and summary.n_tokens == 4


def test_positions_without_prediction_are_counted_as_missing_not_scored():
    agg = make_aggregator("readout", 2, readout_index=1)
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 10, (5,), generator=g)
    preds = predictions_from_logits(torch.randn(2, 5, 10, generator=g), targets, top_k=3)
    token_bytes = torch.ones(5, dtype=torch.long)
    rounds = RoundStats.concat(
        [
            pooled_round_stats(agg.pool(preds), targets, token_bytes),
            pooled_round_stats(agg.pool(preds, torch.tensor([True, False])), targets, token_bytes),
        ]
    )
    assert rounds.n_tokens.tolist() == [5, 0] and rounds.n_missing.tolist() == [0, 5]
    summary = summarize(rounds)
    assert summary.n_missing == 5
    assert summary.nll == pytest.approx(-preds.target_logprob[1].double().mean().item())


def test_bootstrap_ci_covers_the_true_mean_for_iid_rounds_in_most_seeds():
    covered = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        per_round = 2.0 + torch.randn(60, generator=g, dtype=torch.float64) * 0.5
        result = block_bootstrap(
            {"row": make_stats(per_round.tolist())}, generator=g, block_rounds=1, n_boot=400
        )
        ci = result.nll["row"]
        covered += ci.low <= 2.0 <= ci.high
    assert covered >= 34  # 95% nominal; a binomial(40, 0.95) falls below 34 rarely


def test_bootstrap_is_deterministic_for_a_fixed_seed_and_varies_with_it():
    rows = {"a": make_stats([1.0, 2.0, 1.5, 3.0, 2.2]), "b": make_stats([1.1, 1.0, 2.5, 2.0, 2.1])}

    def run(seed: int):
        return block_bootstrap(
            rows,
            generator=torch.Generator().manual_seed(seed),
            differences=[("a", "b")],
            block_rounds=2,
            n_boot=300,
        )

    assert run(3) == run(3)
    assert run(3).nll["a"] != run(4).nll["a"]
    assert run(3).block_rounds == 2


def test_gain_ci_of_identical_rows_is_exactly_zero():
    row = make_stats([1.0, 2.0, 1.5, 3.0, 2.2, 0.7])
    result = block_bootstrap(
        {"a": row, "b": row},
        generator=torch.Generator().manual_seed(0),
        differences=[("a", "b")],
        block_rounds=2,
        n_boot=200,
    )
    assert result.differences[("a", "b")] == Estimate(0.0, 0.0, 0.0)


def test_one_round_gives_point_values_without_confidence_intervals():
    result = block_bootstrap(
        {"a": make_stats([2.0]), "b": make_stats([1.5])},
        generator=torch.Generator().manual_seed(0),
        differences=[("a", "b")],
    )
    assert result.degenerate
    gain = result.differences[("a", "b")]
    assert gain.value == pytest.approx(0.5) and not gain.has_interval


def test_block_bootstrap_ratio_estimator_weighs_rounds_by_their_tokens():
    rows = {
        "a": RoundStats(
            torch.tensor([10.0, 1.0], dtype=torch.float64),
            torch.tensor([10, 1]),
            torch.zeros(2, dtype=torch.long),
            torch.tensor([10, 1]),
            torch.zeros(2, dtype=torch.long),
        )
    }
    result = block_bootstrap(rows, generator=torch.Generator().manual_seed(0), n_boot=50)
    assert result.nll["a"].value == pytest.approx(1.0)
    assert result.nll["a"].low == pytest.approx(1.0) and result.nll["a"].high == pytest.approx(1.0)


def test_gains_pick_the_best_isolated_member_and_pair_the_differences():
    rows = {
        "m0": make_stats([3.0, 3.1, 2.9, 3.0, 3.2, 2.8]),
        "m1": make_stats([2.5, 2.6, 2.4, 2.5, 2.7, 2.3]),
        "silent": make_stats([2.4, 2.5, 2.3, 2.4, 2.6, 2.2]),
        "collective": make_stats([2.0, 2.1, 1.9, 2.0, 2.2, 1.8]),
    }
    result = gains(
        rows,
        isolated=["m0", "m1"],
        silent="silent",
        collective="collective",
        generator=torch.Generator().manual_seed(0),
        n_boot=200,
    )
    assert result.best_member == "m1"
    # every round differs by the same amount, so the paired CI is the point
    assert result.collective_gain.value == pytest.approx(0.5)
    assert result.collective_gain.low == pytest.approx(0.5)
    assert result.collective_gain.high == pytest.approx(0.5)
    assert result.communication_gain.value == pytest.approx(0.4)


def test_verdict_says_the_collective_wins_when_the_whole_ci_is_above_zero():
    line = verdict(Estimate(0.12, 0.05, 0.2), Estimate(0.08, 0.02, 0.13), best_member="node 2")
    assert line == (
        "The collective beats its best member (node 2) by 0.120 nats/token "
        "(95% CI +0.050 to +0.200); communication mattered: 0.080 nats/token better than "
        "the silent ensemble (95% CI +0.020 to +0.130)."
    )


def test_verdict_says_the_collective_is_worse_when_the_whole_ci_is_below_zero():
    line = verdict(Estimate(-0.3, -0.4, -0.2), Estimate(-0.1, -0.15, -0.05))
    assert line.startswith("The collective is worse than its best member by 0.300 nats/token")
    assert "communication hurt: 0.100 nats/token worse than the silent ensemble" in line


def test_verdict_says_not_distinguishable_when_the_ci_straddles_zero_or_is_missing():
    line = verdict(Estimate(0.01, -0.05, 0.07), Estimate(0.0, math.nan, math.nan))
    assert line.startswith(
        "The collective is not distinguishable from its best member (gain +0.010 nats/token"
    )
    assert "communication made no measurable difference" in line
    assert "no 95% CI: too few rounds" in line
