"""An embedded run in which the executor reports a node missing for some rounds (as a volunteer
that missed its deadline): partial rows are counted and marked, the best member is chosen
among the members scored on every round, and each gain pairs the rounds its sides share."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from collective.evaluate.book import RowKey
from collective.evaluate.metrics import RoundStats, summarize
from collective.records import REPORT_SCHEMA_VERSION, Report
from collective.report.plots import gains_plot_labels
from collective.report.report_view import report_markdown, report_table
from collective.run.engine import Executor, Results
from collective.run.node import NodeRoundRequest
from tests.test_engine import EVAL_ROUNDS, ROUND, run, scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DROPPED = "b"
MISSED = {3, 4}  # round indices (2 warm-up rounds first): eval rounds 1 and 2


class MissingNode:
    """The embedded executor, except that `node_id` is not asked in `rounds` and is reported
    missing (None), as the distributed executor reports a node that missed its deadline."""

    def __init__(self, inner: Executor, node_id: str, rounds: set[int]) -> None:
        self.inner, self.node_id, self.rounds = inner, node_id, rounds

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> Results:
        if round_index not in self.rounds:
            return self.inner.run_round(round_index, requests)
        results = self.inner.run_round(round_index, [r for r in requests if r.node_id != self.node_id])
        results[self.node_id] = None
        return results


_runs: dict[str, tuple[Report, dict[RowKey, RoundStats]]] = {}


def partial_run(tiny_lm, tiny_tok, aggregator: dict) -> tuple[Report, dict[RowKey, RoundStats]]:
    key = str(aggregator)
    if key not in _runs:
        report, _, result = run(tiny_lm, tiny_tok, scenario(aggregator=aggregator), lambda inner: MissingNode(inner, DROPPED, MISSED))
        _runs[key] = (report, result.book.stats())
    return _runs[key]


def ratio_on(stats: RoundStats, rounds: torch.Tensor) -> float:
    return float(stats.nll_sum[rounds].sum() / stats.n_tokens[rounds].sum())


def test_the_missing_nodes_rows_are_counted_over_the_rounds_it_served(tiny_lm, tiny_tok):
    report, _ = partial_run(tiny_lm, tiny_tok, {"kind": "mean"})
    served = EVAL_ROUNDS - len(MISSED)
    for kind in ("member_plain", "member_isolated", "member_collective"):
        row = report.row(kind, DROPPED)
        assert (row.n_rounds, row.n_tokens) == (served, served * ROUND) and report.is_partial(row)
        assert report.row(kind, "a").n_rounds == EVAL_ROUNDS and not report.is_partial(report.row(kind, "a"))
    assert report.partial_members == [DROPPED] and report.missed_rounds == {DROPPED: len(MISSED)}
    assert report.schema_version == REPORT_SCHEMA_VERSION


def test_the_best_member_is_the_best_of_the_members_scored_on_every_round(tiny_lm, tiny_tok):
    report, stats = partial_run(tiny_lm, tiny_tok, {"kind": "mean"})
    complete = {row.node_id: row.nll for row in report.rows if row.row == "member_isolated" and row.node_id != DROPPED}
    best = min(complete, key=complete.__getitem__)
    # the missing node scores lowest on the rounds it served: a plain min() would pick it
    assert report.row("member_isolated", DROPPED).nll < complete[best]
    assert report.best_member == best
    assert report.best_member_rule.endswith(f"not eligible: {DROPPED} (missed {len(MISSED)} of {EVAL_ROUNDS})")
    expected = summarize(stats[RowKey("member_isolated", best)]).nll - summarize(stats[RowKey("collective")]).nll
    assert report.collective_gain.value == pytest.approx(expected) and report.collective_gain.n_rounds == EVAL_ROUNDS
    assert f"Missed eval rounds: {DROPPED} {len(MISSED)} of {EVAL_ROUNDS}" in report.verdict


def test_the_table_report_md_and_plot_mark_the_partial_rows(tiny_lm, tiny_tok):
    report, _ = partial_run(tiny_lm, tiny_tok, {"kind": "mean"})
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(report_table(report))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert f"isolated {DROPPED}*" in text and "isolated a*" not in text
    assert f"{DROPPED} 3/5 rounds (24/40 tokens)" in " ".join(text.split())
    markdown = report_markdown(report)
    assert f"| member, isolated [{DROPPED}]* | tiny |" in markdown and "| 3/5 rounds |" in markdown
    assert f"member, isolated [{DROPPED}]* (3/5 rounds)" in gains_plot_labels(report, report.rows)


def test_a_collective_that_reads_out_the_missing_node_is_compared_on_the_rounds_it_has(tiny_lm, tiny_tok):
    report, stats = partial_run(tiny_lm, tiny_tok, {"kind": "readout", "node": DROPPED})
    collective = stats[RowKey("collective")]
    assert report.row("collective").n_rounds == EVAL_ROUNDS - len(MISSED) and report.is_partial(report.row("collective"))
    shared = collective.scored_rounds  # the best member was scored on every round
    best = stats[RowKey("member_isolated", report.best_member)]
    assert report.collective_gain.value == pytest.approx(ratio_on(best, shared) - ratio_on(collective, shared))
    assert report.collective_gain.n_rounds == EVAL_ROUNDS - len(MISSED)
    # unpaired (the member over all rounds, the collective over its own) would be another number
    assert report.collective_gain.value != pytest.approx(summarize(best).nll - summarize(collective).nll, abs=1e-4)
    assert f"collective gain: 3 of {EVAL_ROUNDS} rounds" in report.verdict
