"""Reports for the view tests: the quickstart's (version 2, from tests/data) with every optional
section filled in (a partial node, controller gains, searched messages, a yardstick), and the
same report as a byte-unit run (several tokenizers) would write it."""

from __future__ import annotations

import io
import math

from rich.console import Console

from collective.records import (
    Gain,
    Interval,
    MessageSearchSummary,
    Report,
    RowReport,
    YardstickGap,
)
from collective.report.report_view import report_markdown, report_table
from tests.test_report_view import quickstart, with_controller_gains, with_partial_node

WIDTHS = (50, 80, 140)


def full_token_report() -> Report:
    """The quickstart's report (token unit) with a partial node, controller gains, a searched
    message summary and a yardstick row with its gap."""
    report = with_controller_gains(with_partial_node(quickstart()))
    reference = report.row("reference")
    yardstick = RowReport(
        row="yardstick", model="big", nll=3.1, nll_ci=Interval(low=3.0, high=3.2), perplexity=math.exp(3.1),
        bits_per_byte=1.05, top1=0.31, n_tokens=reference.n_tokens - 20, n_rounds=report.n_eval_rounds,
    )
    gap = YardstickGap(
        model="big", best_member="a", share=0.25, share_ci=Interval(low=0.05, high=0.45), gap_bits_per_byte=0.2,
        gap_ci=Interval(low=0.1, high=0.3), closed_bits_per_byte=0.05, closed_ci=Interval(low=0.01, high=0.09),
        n_rounds=report.n_eval_rounds,
    )
    searches = {"b": MessageSearchSummary(messages=10, mean_before=4.2, mean_after=3.9, mean_tokens=8.0, seconds=1.5)}
    return report.model_copy(
        update={"rows": [*report.rows, yardstick], "yardstick": gap, "message_searches": searches, "schema_version": 7}
    )


def as_byte_report(report: Report, verdict: str = "") -> Report:
    """`report` as a byte-unit run would write it: the same rows, each scored on the eval bytes
    (n_tokens: the bytes of the rounds it scored), every row with its rounds."""
    bytes_per_round = report.eval_bytes // report.n_eval_rounds
    rows = [
        row.model_copy(update={"n_tokens": (row.n_rounds or report.n_eval_rounds) * bytes_per_round,
                               "n_rounds": row.n_rounds or report.n_eval_rounds})
        for row in report.rows
    ]
    return report.model_copy(update={"rows": rows, "unit": "byte", "schema_version": 8, "verdict": verdict or report.verdict})


def renderings(report: Report) -> str:
    """The report as the terminal shows it at each of WIDTHS, then its report.md."""
    parts = []
    for width in WIDTHS:
        console = Console(file=io.StringIO(), width=width, color_system=None)
        console.print(report_table(report))
        parts.append(f"=== terminal, {width} columns\n" + console.file.getvalue())  # type: ignore[attr-defined]
    parts.append("=== report.md\n" + report_markdown(report))
    return "\n".join(parts)


__all__ = ["Gain", "as_byte_report", "full_token_report", "renderings"]
