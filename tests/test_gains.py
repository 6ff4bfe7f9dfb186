"""The headline gains and the verdict: the best member among members scored on every round,
ties within float tolerance, missed rounds in words, every interval the paired one of
`intervals.py` (recomputed with plain loops), none below MIN_ROUNDS."""

from __future__ import annotations

import math

import pytest
import torch

from collective.evaluate.gains import (
    RULE_ANY,
    RULE_COMPLETE,
    RULE_NONE,
    choose_best_member,
    controller_effect,
    gains,
    missed_rounds_note,
    verdict,
)
from collective.evaluate.metrics import Estimate, RoundStats, member_round_stats, pooled_round_stats
from collective.lm.predictions import predictions_from_logits
from collective.run.aggregate import make_aggregator
from tests.test_intervals import loop_interval, stats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROUNDS = 6
FULL = [10] * ROUNDS


def _gains(rows: dict[str, RoundStats], isolated: list[str]):
    return gains(rows, isolated=isolated, silent="silent", collective="collective")


def _sums(row: RoundStats) -> tuple[list[float], list[float]]:
    return row.nll_sum.tolist(), row.n_tokens.double().tolist()


def _pooled() -> dict[str, RoundStats]:
    return {"silent": stats([2.4, 2.5, 2.3, 2.4, 2.6, 2.2], FULL), "collective": stats([2.0, 2.3, 1.7, 2.1, 2.2, 1.6], FULL)}


# ---------------------------------------------------------------------------- the best member


def test_a_member_that_missed_every_round_is_never_the_best_member():
    rows = {"m0": stats([0.0] * ROUNDS, [0] * ROUNDS), "m1": stats([3.0] * ROUNDS, FULL), "m2": stats([2.5] * ROUNDS, FULL)}
    result = _gains({**rows, **_pooled()}, ["m0", "m1", "m2"])
    assert result.best_member == "m2"
    assert math.isfinite(result.collective_gain.value)


def test_the_best_member_is_chosen_among_members_scored_on_every_round():
    # m1 has the lowest NLL, but on the 3 easy rounds it was there for
    rows = {"m0": stats([3.0] * ROUNDS, FULL), "m1": stats([1.0] * ROUNDS, [10, 10, 10, 0, 0, 0])}
    assert choose_best_member(rows, ["m0", "m1"]) == ("m0", RULE_COMPLETE)


def test_without_a_complete_member_the_rule_falls_back_and_says_so():
    rows = {"m0": stats([3.0] * ROUNDS, [10, 0, 10, 10, 10, 10]), "m1": stats([2.0] * ROUNDS, [0, 10, 10, 10, 10, 10])}
    assert choose_best_member(rows, ["m0", "m1"]) == ("m1", RULE_ANY)
    none = {"m0": stats([0.0] * ROUNDS, [0] * ROUNDS)}
    assert choose_best_member(none, ["m0"]) == (None, RULE_NONE)
    result = _gains({**none, **_pooled()}, ["m0"])
    assert result.best_member is None and math.isnan(result.collective_gain.value)


def test_a_partial_best_member_is_compared_with_the_collective_on_shared_rounds_only():
    rows = {"m0": stats([2.5, 2.5, 2.5, 9.0, 9.0, 9.0], [10, 10, 10, 0, 0, 0]), **_pooled()}
    result = _gains(rows, ["m0"])
    shared = (2.0 + 2.3 + 1.7) / 3
    assert result.collective_gain.value == pytest.approx(2.5 - shared)
    assert result.collective_gain.n_rounds == 3 and result.communication_gain.n_rounds == ROUNDS


# ---------------------------------------------------------------------------- the intervals


def test_every_row_and_both_gains_are_the_paired_intervals_recomputed_by_loops():
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(ROUNDS, generator=g, dtype=torch.float64)
    tokens = torch.randint(5, 30, (ROUNDS,), generator=g).tolist()
    rows = {
        "m0": stats((3.0 + noise).tolist(), tokens),
        "m1": stats((2.7 + noise + 0.2 * torch.randn(ROUNDS, generator=g)).tolist(), tokens),
        "silent": stats((2.5 + noise).tolist(), tokens),
        "collective": stats((2.3 + noise.flip(0)).tolist(), tokens),
    }
    result = _gains(rows, ["m0", "m1"])
    for name, row in rows.items():
        found = result.intervals.nll[name]
        assert (found.value, found.low, found.high) == pytest.approx(loop_interval(*_sums(row)), rel=1e-10)
    for gain, side in ((result.collective_gain, rows[str(result.best_member)]), (result.communication_gain, rows["silent"])):
        expected = loop_interval(*_sums(side), _sums(rows["collective"]))
        assert (gain.value, gain.low, gain.high) == pytest.approx(expected, rel=1e-10)
        assert gain.n_rounds == ROUNDS


def test_below_min_rounds_the_gains_have_no_interval_and_the_verdict_says_why():
    rows = {"m0": stats([3.0, 2.9, 3.1], [10] * 3), "silent": stats([2.5, 2.4, 2.6], [10] * 3),
            "collective": stats([2.0, 2.1, 1.9], [10] * 3)}
    result = _gains(rows, ["m0"])
    assert result.collective_gain.value == pytest.approx(1.0) and not result.collective_gain.has_interval
    line = verdict(result.collective_gain, result.communication_gain, "m0")
    assert line.startswith("The collective is not distinguishable from its best member (m0) (gain +1.000 nats/token, "
                           "no 95% CI: too few eval rounds for an interval that holds its level (3 rounds; it needs 4))")


# ---------------------------------------------------------------------------- the verdict


def test_a_collective_of_identical_silent_members_is_not_distinguishable_from_them():
    """Pooling identical float32 members leaves ~1e-7 nats/token of rounding, all of one
    sign: the CI lies below 0, yet this is a tie, not a loss."""
    g = torch.Generator().manual_seed(0)
    pool = make_aggregator("mean", 3)
    member, pooled = [], []
    for _ in range(8):
        logits = (torch.randn(1, 16, 50, generator=g) * 3).expand(3, 16, 50)  # (N, T, V) three identical members
        targets = torch.randint(0, 50, (16,), generator=g)
        preds = predictions_from_logits(logits.contiguous(), targets, top_k=8)
        member.append(member_round_stats(preds, 0, targets, torch.ones(16, dtype=torch.long)))
        pooled.append(pooled_round_stats(pool.pool(preds), targets, torch.ones(16, dtype=torch.long)))
    rows = {"n0": RoundStats.concat(member), "n1": RoundStats.concat(member)}
    rows |= {"silent": RoundStats.concat(pooled), "collective": RoundStats.concat(pooled)}
    result = _gains(rows, ["n0", "n1"])
    assert abs(result.collective_gain.value) < 1e-5
    line = verdict(result.collective_gain, result.communication_gain, "n0")
    assert line.startswith("The collective is not distinguishable from its best member (n0): equal within float tolerance")
    assert "-0.000" not in line and "worse" not in line


def test_a_gain_within_float_tolerance_is_a_tie_whatever_its_sign():
    line = verdict(Estimate(-2e-7, -3e-7, -1e-7), Estimate(3e-8, 1e-8, 5e-8), best_member="n0")
    assert line == (
        "The collective is not distinguishable from its best member (n0): equal within float tolerance "
        "(gain +0.000 nats/token, 95% CI +0.000 to +0.000); communication made no measurable difference "
        "over the silent ensemble, equal within float tolerance (gain +0.000 nats/token, 95% CI +0.000 to +0.000)."
    )


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
    assert line.startswith("The collective is not distinguishable from its best member (gain +0.010 nats/token")
    assert "communication made no measurable difference" in line
    assert "no 95% CI: too few eval rounds for an interval that holds its level" in line


def test_the_verdict_names_missed_rounds_and_the_rounds_each_gain_pairs():
    note = missed_rounds_note(
        {"a": 0, "d": 7}, 10, Estimate(0.1, 0.0, 0.2, n_rounds=10), Estimate(0.1, 0.0, 0.2, n_rounds=10), RULE_COMPLETE
    )
    assert note == (
        "Missed eval rounds: d 7 of 10; each gain pairs the rounds both its sides were scored on "
        "(collective gain: 10 of 10 rounds, communication gain: 10 of 10 rounds), and the best member "
        "is chosen among the members scored on every round."
    )
    assert missed_rounds_note({"a": 0}, 10, Estimate(0, 0, 0), Estimate(0, 0, 0), RULE_COMPLETE) == ""
    line = verdict(Estimate(0.12, 0.05, 0.2), Estimate(0.08, 0.02, 0.13), "a", note)
    assert line.endswith("ensemble (95% CI +0.020 to +0.130). " + note)


# ---------------------------------------------------------------------------- controller gains


def test_a_controller_gain_is_plain_minus_isolated_paired_and_changes_no_other_number():
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(ROUNDS, generator=g, dtype=torch.float64)
    tokens = torch.randint(5, 30, (ROUNDS,), generator=g).tolist()
    rows = {
        "p0": stats((3.0 + noise + 0.1 * torch.randn(ROUNDS, generator=g)).tolist(), tokens),  # m0 without its prompt
        "m0": stats((2.8 + noise).tolist(), tokens),
        "m1": stats((2.9 + noise).tolist(), tokens),
        "silent": stats((2.5 + noise).tolist(), tokens),
        "collective": stats((2.3 + noise.flip(0)).tolist(), tokens),
    }
    result = gains(rows, isolated=["m0", "m1"], silent="silent", collective="collective", controlled=[("p0", "m0")])
    gain = result.controller_gains["m0"]
    assert list(result.controller_gains) == ["m0"]
    assert (gain.value, gain.low, gain.high) == pytest.approx(loop_interval(*_sums(rows["p0"]), _sums(rows["m0"])), rel=1e-10)
    assert gain.value > 0 and gain.n_rounds == ROUNDS
    without = _gains(rows, ["m0", "m1"])
    assert (without.collective_gain, without.communication_gain) == (result.collective_gain, result.communication_gain)
    assert without.intervals.nll == result.intervals.nll and without.controller_gains == {}


def test_a_controller_gain_reads_in_words_with_the_verdicts_float_tolerance():
    assert controller_effect(Estimate(0.1, 0.05, 0.2)) == "the prompt helps its node"
    assert controller_effect(Estimate(-0.1, -0.2, -0.05)) == "the prompt hurts its node"
    assert controller_effect(Estimate(0.01, -0.05, 0.07)) == "no measurable effect"
    # a prompt with no effect: ~1e-7 of rounding, all of one sign, is a tie, not a loss
    assert controller_effect(Estimate(-2e-7, -3e-7, -1e-7)) == "no measurable effect, equal within float tolerance"
    assert controller_effect(Estimate(0.2, math.nan, math.nan)) == "no measurable effect"
