from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from collective.evaluate.metrics import (
    RoundStats,
    member_round_stats,
    members_round_stats,
    pooled_round_stats,
    round_stats,
    summarize,
)
from collective.lm.predictions import predictions_from_logits
from collective.run.aggregate import make_aggregator


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


@pytest.mark.parametrize("n_positions", [1, 8, 33])
def test_all_members_at_once_give_each_member_s_own_stats_to_the_bit(n_positions):
    """The book scores every member row of a round in one go; each must equal the row scored
    alone (`member_round_stats`), missing rows (None) and missing positions (NaN) included."""
    g = torch.Generator().manual_seed(n_positions)
    logits = torch.randn(5, n_positions, 40, generator=g) * 3
    targets = torch.randint(0, 40, (n_positions,), generator=g)
    token_bytes = torch.randint(1, 4, (n_positions,), generator=g)
    rows = [predictions_from_logits(logits[i : i + 1], targets, top_k=4) for i in range(5)]
    rows[2].target_logprob[0, 0] = float("nan")  # a position with no prediction
    with_none = [rows[0], None, rows[2], rows[3], None, rows[4]]
    together = members_round_stats(with_none, targets, token_bytes)
    nan_row = predictions_from_logits(logits[:1], targets, top_k=4)
    nan_row.target_logprob[:] = float("nan")
    for preds, got in zip(with_none, together):
        alone = member_round_stats(preds if preds is not None else nan_row, 0, targets, token_bytes)
        for name in ("nll_sum", "n_tokens", "n_correct", "n_bytes", "n_missing"):
            assert torch.equal(getattr(got, name), getattr(alone, name)), name
            assert getattr(got, name).dtype == getattr(alone, name).dtype, name


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


def test_a_row_is_complete_only_when_every_position_of_every_round_was_scored():
    targets = torch.tensor([1, 2, 3, 4])
    ones = torch.ones(4, dtype=torch.long)
    full = round_stats(torch.full((4,), -1.0), targets, targets, ones, round_tokens=2)
    one_missing = round_stats(torch.tensor([-1.0, float("nan"), -1.0, -1.0]), targets, targets, ones, round_tokens=2)
    round_missing = round_stats(torch.tensor([float("nan")] * 2 + [-1.0] * 2), targets, targets, ones, round_tokens=2)
    assert full.complete and not one_missing.complete and not round_missing.complete
    assert one_missing.scored_rounds.tolist() == [True, True]
    assert round_missing.scored_rounds.tolist() == [False, True]
