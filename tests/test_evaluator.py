"""The evaluator on hand-made per-round statistics: rows, gains, paired CIs, the verdict."""

from __future__ import annotations

import math

import pytest
import torch

from collective.evaluate.book import EngineResult, RoundBook
from collective.evaluate.evaluator import build_report, describe_aggregator
from collective.evaluate.intervals import METHOD
from collective.evaluate.metrics import RoundStats
from collective.records import MEMBER_ROWS, Report
from collective.report.report_view import report_markdown
from collective.scenario import parse_scenario
from tests.test_intervals import loop_interval
from tests.test_scenario import _base

ROUND = 4
BYTES_PER_TOKEN = 3


def _scenario(**changes):
    """Two relay nodes a and b of one model, rounds of ROUND tokens (test_scenario's base)."""
    hand = {
        "name": "hand", "seed": 1, "models": {"m": "x"}, "corpus": {"train_tokens": 64, "eval_tokens": 64},
        "node_defaults": {"model": "m", "view": {"kind": "window", "tokens": 4}, "message": {"policy": "relay"}},
        "bus": {"round_tokens": ROUND}, "evaluation": {"context_tokens": 8},
    }
    return parse_scenario(_base(**{**hand, **changes}))


TOKENS = [4, 2, 4, 3, 4, 1, 4, 4]  # scored tokens per round: unequal, as when rounds lose positions
SHARED = [0.3, -0.2, 0.5, 0.0, -0.4, 0.1, 0.2, -0.3]  # per-round difficulty every row shares


def _stats(nll_per_token: list[float], tokens: list[int] | None = None) -> RoundStats:
    """One row over len(nll_per_token) rounds, round r scoring tokens[r] tokens at that NLL each."""
    n = len(nll_per_token)
    count = torch.tensor(tokens or TOKENS[:n], dtype=torch.long)
    return RoundStats(
        nll_sum=torch.tensor(nll_per_token, dtype=torch.float64) * count,
        n_tokens=count,
        n_correct=torch.zeros(n, dtype=torch.long),
        n_bytes=count * BYTES_PER_TOKEN,
        n_missing=torch.zeros(n, dtype=torch.long),
    )


def _result(rows: dict[tuple[str, str | None], list[float]], missed=None, wall=2.0) -> EngineResult:
    n_rounds = len(next(iter(rows.values())))
    book = RoundBook.from_rounds({key: [_stats([v], [TOKENS[r]]) for r, v in enumerate(values)] for key, values in rows.items()})
    return EngineResult(
        book=book,
        rounds_done=n_rounds + 2,
        eval_rounds_done=n_rounds,
        missed_rounds=missed or {"a": 0, "b": 0},
        messages_sent=10,
        messages_dropped=2,
        messages_truncated=3,
        wall_seconds=wall,
        eval_tokens=sum(TOKENS[:n_rounds]),
        eval_bytes=sum(TOKENS[:n_rounds]) * BYTES_PER_TOKEN,
    )


def _own_noise(key: tuple[str, str | None]) -> list[float]:
    """Each row's own small per-round noise (seeded by its name): differences between rows vary
    from round to round, so no CI collapses to a point."""
    g = torch.Generator().manual_seed(sum(map(ord, f"{key}")))
    return (0.05 * torch.randn(len(SHARED), generator=g, dtype=torch.float64)).tolist()


def _rows(a=3.0, b=2.5, collective=2.0, silent=2.2, reference=1.5) -> dict:
    """Rows = level + SHARED difficulty + the row's own small noise."""
    levels = {(kind, node): level for kind in MEMBER_ROWS for node, level in (("a", a), ("b", b))}
    levels |= {("ensemble_silent", None): silent, ("collective", None): collective, ("reference", None): reference}
    return {key: [level + s + e for s, e in zip(SHARED, _own_noise(key))] for key, level in levels.items()}


def _ratio(values: list[float], counts: list[float] | None = None) -> float:
    """The ratio estimator by hand: sum of NLL over sum of tokens, round r drawn counts[r] times."""
    counts = counts or [1.0] * len(values)
    return sum(c * v * t for c, v, t in zip(counts, values, TOKENS)) / sum(c * t for c, t in zip(counts, TOKENS))


def _sums(values: list[float]) -> tuple[list[float], list[float]]:
    """A row's per-round summed NLL and tokens, by hand."""
    return [v * t for v, t in zip(values, TOKENS)], [float(t) for t in TOKENS]


def test_each_row_is_the_token_weighted_mean_of_its_rounds():
    rows = _rows()
    report = build_report(_scenario(), _result(rows), run_id="r")
    for key in (("member_plain", "a"), ("collective", None)):
        assert report.row(*key).nll == pytest.approx(_ratio(rows[key]))
        assert report.row(*key).nll != pytest.approx(sum(rows[key]) / len(rows[key]), abs=1e-3)  # not a mean of means
    row = report.row("reference")
    assert row.perplexity == pytest.approx(math.exp(row.nll))
    assert row.bits_per_byte == pytest.approx(row.nll / math.log(2) / BYTES_PER_TOKEN)
    assert row.n_tokens == sum(TOKENS) and row.n_rounds == len(TOKENS)


def test_row_cis_and_gains_are_the_paired_intervals_recomputed_by_hand():
    rows = _rows()
    report = build_report(_scenario(), _result(rows), run_id="r")
    assert report.best_member == "b" and report.interval_method == METHOD
    assert report.block_rounds is None and report.n_boot is None and report.schema_version >= 6
    for key in (("member_isolated", "b"), ("ensemble_silent", None), ("collective", None)):
        _, low, high = loop_interval(*_sums(rows[key]))
        assert (report.row(*key).nll_ci.low, report.row(*key).nll_ci.high) == pytest.approx((low, high), rel=1e-9)
    for gain, side in ((report.collective_gain, ("member_isolated", "b")), (report.communication_gain, ("ensemble_silent", None))):
        assert gain.value == pytest.approx(_ratio(rows[side]) - _ratio(rows[("collective", None)]))
        expected = loop_interval(*_sums(rows[side]), _sums(rows[("collective", None)]))
        assert (gain.value, gain.ci.low, gain.ci.high) == pytest.approx(expected, rel=1e-9)
        assert gain.n_rounds == len(TOKENS)
    # paired: the shared difficulty cancels, so a gain's CI is far narrower than a row's
    collective_ci = report.row("collective").nll_ci
    assert 0 < report.collective_gain.ci.high - report.collective_gain.ci.low < 0.4 * (collective_ci.high - collective_ci.low)


def test_gains_are_differences_against_the_best_isolated_member_and_the_silent_ensemble():
    report = build_report(_scenario(), _result(_rows()), run_id="r")
    assert report.collective_gain.value == pytest.approx(0.5, abs=0.05)
    assert report.communication_gain.value == pytest.approx(0.2, abs=0.05)
    assert report.collective_gain.ci.low > 0.3 and report.communication_gain.ci.low > 0.02  # wider since report 6
    assert report.verdict.startswith("The collective beats its best member (b) by 0.")
    assert "communication mattered" in report.verdict and "Missed" not in report.verdict
    assert report.collective_gain.versus == "best isolated member (b)"
    assert report.best_member_rule == "lowest NLL among the isolated members scored on every eval round"


def test_a_collective_worse_than_its_members_is_reported_as_a_loss():
    report = build_report(_scenario(), _result(_rows(collective=4.0)), run_id="r")
    assert report.collective_gain.value == pytest.approx(-1.5, abs=0.05)
    assert report.verdict.startswith("The collective is worse than its best member (b)")
    assert "communication hurt" in report.verdict


def test_unpaired_noise_widens_the_interval():
    rows = _rows()
    rows[("collective", None)] = [2.0 + e for e in reversed(SHARED)]
    report = build_report(_scenario(), _result(rows), run_id="r")
    ci = report.communication_gain.ci
    assert ci.low < report.communication_gain.value < ci.high
    assert ci.high - ci.low > 0.1


def test_the_intervals_do_not_depend_on_the_seed_or_the_old_bootstrap_settings():
    rows = _rows()
    first = build_report(_scenario(), _result(rows), run_id="r")
    other = build_report(_scenario(seed=2, evaluation={"context_tokens": 8, "n_boot": 100, "block_rounds": 1}), _result(rows), run_id="r")
    assert first.communication_gain == other.communication_gain and first.rows == other.rows


def test_a_partial_member_is_one_with_a_row_the_report_marks_partial_whatever_it_missed():
    """One definition: a node whose plain row lost a position of one round (no round missed)
    is a partial member, as its row is marked partial; a node with complete rows is not."""
    rows = _rows()
    result = _result(rows)
    tokens = {key: list(TOKENS) for key in rows}
    tokens[("member_plain", "a")][3] -= 1
    result.book = RoundBook.from_rounds(
        {key: [_stats([v], [tokens[key][r]]) for r, v in enumerate(values)] for key, values in rows.items()}
    )
    report = build_report(_scenario(), result, run_id="r")
    marked = [(row.row, row.node_id) for row in report.rows if report.is_partial(row)]
    assert marked == [("member_plain", "a")] and report.row("member_plain", "a").n_rounds == len(TOKENS)
    assert report.partial_members == report.partial_nodes() == ["a"]


def test_a_member_that_missed_rounds_is_marked_left_out_of_the_best_member_and_named_in_the_verdict():
    rows = _rows(a=2.0, b=2.5, collective=2.3)  # a, the lowest NLL, misses rounds 2 and 5
    result = _result(rows, missed={"a": 2, "b": 0})
    result.book = RoundBook.from_rounds(
        {key: [_stats([v], [0 if key[1] == "a" and r in (2, 5) else TOKENS[r]]) for r, v in enumerate(values)] for key, values in rows.items()}
    )
    report = build_report(_scenario(), result, run_id="r")
    assert report.best_member == "b" and report.partial_members == ["a"]
    assert report.best_member_rule.endswith("not eligible: a (missed 2 of 8)")
    assert report.row("member_isolated", "a").n_rounds == 6 and report.is_partial(report.row("member_isolated", "a"))
    assert report.row("member_isolated", "a").n_tokens == sum(TOKENS) - TOKENS[2] - TOKENS[5]
    assert "Missed eval rounds: a 2 of 8" in report.verdict
    assert report.collective_gain.n_rounds == 8


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
    assert report.tokens_per_second == pytest.approx(sum(TOKENS) / 4.0)
    assert report.control_prompts == {"a": "be brief"}
    assert (report.n_eval_rounds, report.round_tokens) == (len(TOKENS), ROUND)
    assert Report.model_validate_json(report.model_dump_json()) == report


def test_a_report_of_fewer_than_4_rounds_gives_no_interval_and_says_why_and_survives_json():
    for n_rounds in (1, 3):
        rows = {key: values[:n_rounds] for key, values in _rows().items()}
        report = build_report(_scenario(), _result(rows), run_id="r")
        assert math.isnan(report.collective_gain.ci.low) and math.isnan(report.row("collective").nll_ci.high)
        assert "no 95% CI: too few eval rounds for an interval that holds its level" in report.verdict
        assert Report.model_validate_json(report.model_dump_json()).n_eval_rounds == n_rounds
    text = report_markdown(report)  # 3 rounds
    assert f"95% CIs paired over rounds: {METHOD}." in text and "bootstrap" not in text
    assert "- collective gain: +" in text and "(no 95% CI: too few eval rounds for an interval that holds its level)" in text
    rows = {key: values[:4] for key, values in _rows().items()}
    assert not math.isnan(build_report(_scenario(), _result(rows), run_id="r").collective_gain.ci.low)


def test_aggregators_are_described_in_a_few_words():
    assert describe_aggregator(_scenario()) == "mean"
    assert describe_aggregator(_scenario(aggregator={"kind": "readout", "node": "b"})) == "readout: b"
    assert describe_aggregator(_scenario(aggregator={"kind": "weighted", "method": "perplexity"})) == "weighted (perplexity)"


def test_each_prompted_node_gets_a_controller_gain_plain_minus_isolated_paired():
    rows = _rows()
    rows[("member_isolated", "a")] = [v - 0.3 for v in rows[("member_isolated", "a")]]  # a's prompt helps it
    plain, isolated = rows[("member_plain", "a")], rows[("member_isolated", "a")]
    report = build_report(_scenario(), _result(rows), run_id="r", control_prompts={"a": "be brief"})
    assert list(report.controller_gains) == ["a"]  # b has no prompt: no controller gain
    gain = report.controller_gains["a"]
    assert gain.value == pytest.approx(_ratio(plain) - _ratio(isolated))
    _, low, high = loop_interval(*_sums(plain), _sums(isolated))
    assert (gain.ci.low, gain.ci.high) == pytest.approx((low, high), rel=1e-9)
    assert gain.ci.low > 0 and gain.n_rounds == len(TOKENS) and gain.versus == "plain member (no prompt)"
    # the other numbers are those of the same report without prompts
    unprompted = build_report(_scenario(), _result(rows), run_id="r")
    assert unprompted.controller_gains == {}
    assert (unprompted.collective_gain, unprompted.communication_gain, unprompted.rows) == (
        report.collective_gain, report.communication_gain, report.rows)
    assert Report.model_validate_json(report.model_dump_json()) == report
