"""The evaluator on hand-made per-round statistics: rows, gains, paired CIs, the verdict."""

from __future__ import annotations

import math

import pytest
import torch

from collective.evaluate.book import RoundBook
from collective.evaluate.evaluator import build_report, describe_aggregator
from collective.evaluate.metrics import RoundStats
from collective.records import Report
from collective.run.engine import EngineResult
from collective.scenario import parse_scenario
from tests.test_scenario import _base

ROUND = 4
BYTES_PER_TOKEN = 3


def _scenario(**changes):
    """Two relay nodes a and b of one model, rounds of ROUND tokens (test_scenario's base)."""
    hand = {
        "name": "hand", "seed": 1, "models": {"m": "x"}, "corpus": {"train_tokens": 64, "eval_tokens": 64},
        "node_defaults": {"model": "m", "view": {"kind": "window", "tokens": 4}, "message": {"policy": "relay"}},
        "bus": {"round_tokens": ROUND}, "evaluation": {"context_tokens": 8, "n_boot": 500},
    }
    return parse_scenario(_base(**{**hand, **changes}))


def _stats(nll_per_token: list[float], correct: list[int] | None = None) -> RoundStats:
    """One row over len(nll_per_token) rounds of ROUND tokens, each token with that NLL."""
    n = len(nll_per_token)
    return RoundStats(
        nll_sum=torch.tensor(nll_per_token, dtype=torch.float64) * ROUND,
        n_tokens=torch.full((n,), ROUND, dtype=torch.long),
        n_correct=torch.tensor(correct or [0] * n, dtype=torch.long),
        n_bytes=torch.full((n,), ROUND * BYTES_PER_TOKEN, dtype=torch.long),
        n_missing=torch.zeros(n, dtype=torch.long),
    )


def _result(rows: dict[tuple[str, str | None], list[float]], missed=None, wall=2.0) -> EngineResult:
    n_rounds = len(next(iter(rows.values())))
    book = RoundBook.from_rounds({key: [_stats([v]) for v in values] for key, values in rows.items()})
    return EngineResult(
        book=book,
        rounds_done=n_rounds + 2,
        eval_rounds_done=n_rounds,
        missed_rounds=missed or {"a": 0, "b": 0},
        messages_sent=10,
        messages_dropped=2,
        messages_truncated=3,
        wall_seconds=wall,
        eval_tokens=n_rounds * ROUND,
        eval_bytes=n_rounds * ROUND * BYTES_PER_TOKEN,
    )


NOISE = [0.3, -0.2, 0.5, 0.0, -0.4, 0.1, 0.2, -0.3]


def _rows(a=3.0, b=2.5, collective=2.0, silent=2.2, reference=1.5) -> dict:
    """Rows with per-round noise shared by every row (so paired differences are constant)."""
    out = {}
    for kind in ("member_plain", "member_isolated", "member_collective"):
        out[(kind, "a")] = [a + e for e in NOISE]
        out[(kind, "b")] = [b + e for e in NOISE]
    out[("ensemble_silent", None)] = [silent + e for e in NOISE]
    out[("collective", None)] = [collective + e for e in NOISE]
    out[("reference", None)] = [reference + e for e in NOISE]
    return out


def test_each_row_is_the_token_weighted_mean_of_its_rounds():
    report = build_report(_scenario(), _result(_rows()), run_id="r")
    mean_noise = sum(NOISE) / len(NOISE)
    assert report.row("member_plain", "a").nll == pytest.approx(3.0 + mean_noise)
    assert report.row("collective").nll == pytest.approx(2.0 + mean_noise)
    row = report.row("reference")
    assert row.perplexity == pytest.approx(math.exp(row.nll))
    assert row.bits_per_byte == pytest.approx(row.nll / math.log(2) / BYTES_PER_TOKEN)
    assert row.n_tokens == len(NOISE) * ROUND


def test_gains_are_differences_against_the_best_isolated_member_and_the_silent_ensemble():
    report = build_report(_scenario(), _result(_rows()), run_id="r")
    assert report.best_member == "b"
    assert report.collective_gain.value == pytest.approx(0.5)
    assert report.communication_gain.value == pytest.approx(0.2)
    # the noise is shared by every row, so the paired differences do not vary at all
    assert report.collective_gain.ci.low == pytest.approx(0.5) and report.collective_gain.ci.high == pytest.approx(0.5)
    assert report.communication_gain.ci.low == pytest.approx(0.2)
    assert report.verdict.startswith("The collective beats its best member (b) by 0.500 nats/token")
    assert "communication mattered" in report.verdict
    assert report.collective_gain.versus == "best isolated member (b)"


def test_a_collective_worse_than_its_members_is_reported_as_a_loss():
    report = build_report(_scenario(), _result(_rows(collective=4.0)), run_id="r")
    assert report.collective_gain.value == pytest.approx(-1.5)
    assert report.verdict.startswith("The collective is worse than its best member (b)")
    assert "communication hurt" in report.verdict


def test_unpaired_noise_widens_the_interval():
    rows = _rows()
    rows[("collective", None)] = [2.0 + e for e in reversed(NOISE)]
    report = build_report(_scenario(), _result(rows), run_id="r")
    ci = report.communication_gain.ci
    assert ci.low < report.communication_gain.value < ci.high
    assert ci.high - ci.low > 0.1


def test_the_bootstrap_is_seeded_by_the_scenario_seed():
    rows = _rows()
    rows[("collective", None)] = [2.0 + e for e in reversed(NOISE)]
    first = build_report(_scenario(), _result(rows), run_id="r")
    again = build_report(_scenario(), _result(rows), run_id="r")
    other = build_report(_scenario(seed=2), _result(rows), run_id="r")
    assert first.communication_gain == again.communication_gain
    assert first.communication_gain.ci != other.communication_gain.ci


def test_rows_come_out_in_report_order_whatever_the_books_order():
    rows = dict(reversed(list(_rows().items())))
    report = build_report(_scenario(), _result(rows), run_id="r")
    assert [(r.row, r.node_id) for r in report.rows] == [
        ("member_plain", "a"), ("member_plain", "b"), ("member_isolated", "a"), ("member_isolated", "b"),
        ("member_collective", "a"), ("member_collective", "b"), ("ensemble_silent", None), ("collective", None),
        ("reference", None),
    ]
    assert [r.model for r in report.rows] == ["m"] * 6 + [None, None, "m"]


def test_the_report_carries_counts_timing_and_only_nonzero_misses():
    report = build_report(_scenario(), _result(_rows(), missed={"a": 0, "b": 2}, wall=4.0), run_id="r",
                          control_prompts={"a": "be brief"})
    assert report.missed_rounds == {"b": 2}
    assert (report.messages_sent, report.messages_dropped, report.messages_truncated) == (10, 2, 3)
    assert report.tokens_per_second == pytest.approx(len(NOISE) * ROUND / 4.0)
    assert report.control_prompts == {"a": "be brief"}
    assert (report.n_eval_rounds, report.round_tokens, report.n_boot) == (len(NOISE), ROUND, 500)
    assert Report.model_validate_json(report.model_dump_json()) == report


def test_a_one_round_report_without_intervals_survives_json():
    rows = {key: values[:1] for key, values in _rows().items()}
    report = build_report(_scenario(), _result(rows), run_id="r")
    assert math.isnan(report.collective_gain.ci.low)
    assert "too few rounds" in report.verdict
    assert Report.model_validate_json(report.model_dump_json()).n_eval_rounds == 1


def test_aggregators_are_described_in_a_few_words():
    assert describe_aggregator(_scenario()) == "mean"
    assert describe_aggregator(_scenario(aggregator={"kind": "readout", "node": "b"})) == "readout: b"
    assert describe_aggregator(_scenario(aggregator={"kind": "weighted", "method": "perplexity"})) == "weighted (perplexity)"
