"""The report as people read it: the terminal table at 80 columns and wider, partial rows
marked in the table, report.md, the comparison and the plots, and reports of older versions."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from rich.console import Console

from collective.cli import main
from collective.evaluate.compare import compare_reports, comparison_markdown
from collective.records import Gain, Interval, Report
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


def test_only_a_report_older_than_version_6_says_its_cis_are_a_block_bootstrap():
    old = quickstart()
    assert "95% CIs from a paired block bootstrap over rounds (blocks of 1 rounds, 2000 resamples)" in report_markdown(old)
    method = "studentized ratio estimator (as in report 6)"
    new = old.model_copy(update={"schema_version": 6, "interval_method": method, "block_rounds": None, "n_boot": None})
    assert f"95% CIs paired over rounds: {method}." in report_markdown(new) and "bootstrap" not in report_markdown(new)
    unnamed = new.model_copy(update={"interval_method": ""})  # a version 6 report must not fall back to the bootstrap
    assert "bootstrap" not in report_markdown(unnamed) and "method not recorded" in report_markdown(unnamed)


def test_a_linear_pools_top1_is_labelled_approximate_and_a_logpools_is_not():
    mean = quickstart()
    assert mean.aggregator == "mean"
    assert "recorded top-K mixture, approximate" in report_markdown(mean)
    assert any("approximate" in line for line in render(mean, 120))
    logpool = mean.model_copy(update={"aggregator": "logpool"})
    assert "approximate" not in report_markdown(logpool)
    assert not any("approximate" in line for line in render(logpool, 120))


def test_a_version_3_report_reads_without_controller_gains_and_renders_none(tmp_path, capsys):
    data = json.loads(with_partial_node(quickstart()).model_dump_json())
    data.pop("controller_gains", None)  # what version 3 wrote
    run = tmp_path / "v3-run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(data), encoding="utf-8")
    report = Report.model_validate_json((run / "report.json").read_text(encoding="utf-8"))
    assert report.schema_version == 3 and report.controller_gains == {}
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "communication gain" in out and "controller gain" not in out
    assert "controller gain" not in report_markdown(report)


# ---------------------------------------------------------------------------- controller gains


def with_controller_gains(report: Report) -> Report:
    """Nodes a and c prompted: a's prompt helps it, c's makes no difference."""
    helps = Gain(value=0.0423, ci=Interval(low=0.0121, high=0.0712), versus="plain member (no prompt)", n_rounds=10)
    none = Gain(value=-2e-7, ci=Interval(low=-3e-7, high=-1e-7), versus="plain member (no prompt)", n_rounds=10)
    return report.model_copy(update={"controller_gains": {"a": helps, "c": none}, "schema_version": 4})


def test_controller_gains_are_shown_beside_the_other_gains_in_the_table_and_in_report_md():
    report = with_controller_gains(quickstart())
    for width in (80, 140):
        text = " ".join(" ".join(render(report, width)).split())
        assert text.index("communication gain") < text.index("controller gain a") < text.index("controller gain c")
        assert ("controller gain a +0.042 nats/token (95% CI +0.012 .. +0.071) vs plain member (no prompt): "
                "the prompt helps its node") in text
        assert "controller gain c +0.000 nats/token" in text and "no measurable effect, equal within float tolerance" in text
        assert "controller gain b" not in text
    markdown = report_markdown(report)
    assert ("- controller gain a: +0.042 nats/token (95% CI +0.012 .. +0.071) vs plain member (no prompt): "
            "the prompt helps its node") in markdown
    assert markdown.index("- communication gain:") < markdown.index("- controller gain a:")
    assert Report.model_validate_json(report.model_dump_json()) == report
