"""The report as people read it: the terminal table at 80 columns and wider, partial rows
marked in the table, report.md, the comparison and the plots, and reports of older versions."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from rich.console import Console

from collective.cli import main
from collective.evaluate.compare import compare_reports, comparison_markdown
from collective.records import Report
from collective.report.plots import gains_plot_labels, plot_gains
from collective.report.report_view import report_markdown, report_table, row_label
from tests.test_plots import assert_real_png

V2_REPORT = Path(__file__).parent / "data" / "report-v2.json"  # the quickstart's report, as version 2 wrote it


def quickstart(model: str = "smollm2-135m") -> Report:
    """The quickstart's report (4 nodes, 10 rounds), with a full model name."""
    report = Report.model_validate_json(V2_REPORT.read_text(encoding="utf-8"))
    return report.model_copy(update={"rows": [row.model_copy(update={"model": row.model and model}) for row in report.rows]})


def with_partial_node(report: Report, node_id: str = "d", rounds: int = 3) -> Report:
    """`node_id` scored on `rounds` of the report's rounds (as a node that missed the others)."""
    per_round = report.n_eval_tokens // report.n_eval_rounds
    rows = [
        row.model_copy(update={"n_tokens": rounds * per_round, "n_rounds": rounds}) if row.node_id == node_id
        else row.model_copy(update={"n_rounds": report.n_eval_rounds})
        for row in report.rows
    ]
    return report.model_copy(update={"rows": rows, "schema_version": 3, "partial_members": [node_id],
                                      "missed_rounds": {node_id: report.n_eval_rounds - rounds}})


def render(report: Report, width: int) -> list[str]:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(report_table(report))
    return console.file.getvalue().splitlines()  # type: ignore[attr-defined]


def assert_one_line_per_row(report: Report, lines: list[str], short: bool) -> None:
    for row in report.rows:
        label = row_label(report, row, short=short)
        found = [line for line in lines if line.strip("│┃ ").startswith(label + " ") and f" {row.nll:.3f} " in line]
        assert len(found) == 1, (label, found)
        assert f"{row.nll_ci.low:.3f}" in found[0] and f"{row.nll_ci.high:.3f}" in found[0]


# ---------------------------------------------------------------------------- the terminal table


def test_at_80_columns_each_row_is_one_line_and_no_line_is_wider():
    for report in (quickstart(), with_partial_node(quickstart())):
        lines = render(report, 80)
        assert max(len(line) for line in lines) <= 80
        assert_one_line_per_row(report, lines, short=True)
        assert "ppl" not in "\n".join(lines)  # dropped first


def test_a_wide_terminal_gets_the_full_labels_and_perplexity():
    report = quickstart()
    lines = render(report, 120)
    assert_one_line_per_row(report, lines, short=False)
    assert any("member, in collective [d]" in line and "37.32" in line for line in lines)


def test_a_very_narrow_terminal_still_keeps_each_row_on_one_line():
    report = quickstart()
    lines = render(report, 50)
    assert max(len(line) for line in lines) <= 50
    table = [line for line in lines if line.strip().startswith(("plain", "isolated", "in coll.", "silent", "collective  ", "reference"))]
    assert len(table) == len(report.rows)


def test_partial_rows_are_marked_and_explained_in_the_table():
    report = with_partial_node(quickstart())
    text = "\n".join(render(report, 140))
    assert "member, isolated [d]* " in text and "isolated [a]*" not in text
    assert "3/10 rounds" in text and "10/10 rounds" in text  # the wide table's `scored` column
    assert "partial rows, scored on fewer than all eval rounds: d 3/10 rounds (96/320 tokens)" in " ".join(text.split())


# ---------------------------------------------------------------------------- report.md, comparison, plots


def test_report_md_marks_partial_rows_and_gives_every_rows_coverage():
    report = with_partial_node(quickstart())
    text = report_markdown(report)
    assert "| member, isolated [d]* | smollm2-135m |" in text and "| 3/10 rounds |" in text
    assert "| member, isolated [a] | smollm2-135m |" in text and "| 10/10 rounds |" in text
    assert "d 3/10 rounds (96/320 tokens)" in text


def test_a_comparison_marks_values_from_partial_rows():
    comparison = compare_reports([quickstart(), with_partial_node(quickstart())])
    text = comparison_markdown(comparison)
    assert "| member, isolated [d] | 3.579 | 3.579* |" in text
    assert "scored on fewer than all eval rounds" in text


def test_the_gains_plot_labels_partial_rows_with_their_rounds(tmp_path):
    report = with_partial_node(quickstart())
    labels = gains_plot_labels(report, report.rows)
    assert "member, isolated [d]* (3/10 rounds)" in labels and "member, isolated [a]" in labels
    assert_real_png(plot_gains(report, tmp_path / "gains.png"))


# ---------------------------------------------------------------------------- older reports


def test_a_version_2_report_reads_and_renders_with_its_token_counts(tmp_path, capsys):
    report = Report.model_validate_json(V2_REPORT.read_text(encoding="utf-8"))
    assert report.schema_version == 2 and report.rows[0].n_rounds is None and report.block_rule == ""
    assert report.coverage(report.rows[0]) == "320/320 tokens"
    run = tmp_path / "old-run"
    run.mkdir()
    shutil.copy(V2_REPORT, run / "report.json")
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "collective gain" in out and "not distinguishable" in out
    assert main(["report", str(run), "--markdown"]) == 0
    assert "| 320/320 tokens |" in capsys.readouterr().out


def test_a_linear_pools_top1_is_labelled_approximate_and_a_logpools_is_not():
    mean = quickstart()
    assert mean.aggregator == "mean"
    assert "recorded top-K mixture, approximate" in report_markdown(mean)
    assert any("approximate" in line for line in render(mean, 120))
    logpool = mean.model_copy(update={"aggregator": "logpool"})
    assert "approximate" not in report_markdown(logpool)
    assert not any("approximate" in line for line in render(logpool, 120))
