"""Several runs side by side: rows lined up, mean and t-interval across runs, and the CLI."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from rich.console import Console

from collective.cli import main
from collective.evaluate.compare import (
    compare_reports,
    comparison_markdown,
    comparison_table,
    mean_ci,
)
from collective.evaluate.intervals import METHOD
from collective.records import Gain, Interval, Report, RowReport


def make_report(seed: int, collective_nll: float, scenario: str = "sweep", nodes: tuple[str, ...] = ("a", "b")) -> Report:
    def row(kind: str, nll: float, node_id: str | None = None) -> RowReport:
        return RowReport(
            row=kind, node_id=node_id, model="smol" if node_id else None, nll=nll,  # type: ignore[arg-type]
            nll_ci=Interval(low=nll - 0.1, high=nll + 0.1), perplexity=math.exp(nll), bits_per_byte=1.0,
            top1=0.3, n_tokens=320,
        )

    rows = [row("member_isolated", 3.5 + 0.1 * i, node) for i, node in enumerate(nodes)]
    rows += [row("member_collective", 3.45 + 0.1 * i - 0.03 * (i % 3), node) for i, node in enumerate(nodes)]
    rows += [row("ensemble_silent", 3.4), row("collective", collective_nll), row("reference", 3.0)]
    return Report(
        run_id=f"run-{seed}", scenario=scenario, seed=seed, aggregator="mean", n_eval_tokens=320, n_eval_rounds=10,
        round_tokens=32, eval_bytes=1200, rows=rows, best_member="a",
        collective_gain=Gain(value=3.5 - collective_nll, ci=Interval(low=-0.1, high=0.3), versus="best isolated member (a)"),
        communication_gain=Gain(value=3.4 - collective_nll, ci=Interval(low=-0.2, high=0.2), versus="silent ensemble"),
        verdict="made up",
    )


def test_mean_ci_matches_a_hand_computed_t_interval():
    spread = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729749464 * 1.0 / math.sqrt(3)  # scipy.stats.t.ppf(0.975, 2)
    assert spread.mean == pytest.approx(2.0)
    assert (spread.low, spread.high) == pytest.approx((2.0 - half, 2.0 + half))


def test_one_value_has_a_mean_but_no_interval():
    spread = mean_ci([1.5])
    assert spread.mean == 1.5 and math.isnan(spread.low)


def test_the_interval_uses_the_exact_t_quantile_between_table_entries():
    """The old table used the next lower df's quantile between entries: at 11 runs (df 10)
    it was exact, at 12 runs (df 11) 2.228 instead of 2.201."""
    values = [float(v % 5) for v in range(12)]
    spread = mean_ci(values)
    mean = sum(values) / 12
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 11)
    half = 2.200985160091639 * sd / math.sqrt(12)  # scipy.stats.t.ppf(0.975, 11)
    assert (spread.low, spread.high) == pytest.approx((mean - half, mean + half), abs=1e-9)


def test_rows_are_matched_by_kind_and_node_across_runs():
    reports = [make_report(0, 3.3), make_report(1, 3.2, nodes=("a", "b", "c"))]
    comparison = compare_reports(reports)
    by_label = {row.label: row for row in comparison.rows}
    assert by_label["collective"].values == (3.3, 3.2)
    assert by_label["member, isolated [c]"].values == (None, pytest.approx(3.7))
    assert comparison.labels == ("seed 0", "seed 1") and comparison.seed_sweep


def test_gains_are_averaged_across_seeds():
    comparison = compare_reports([make_report(s, 3.3 - 0.1 * s) for s in range(4)])
    collective_gain = comparison.gains[0]
    assert collective_gain.label == "collective gain"
    assert collective_gain.spread.mean == pytest.approx(sum(0.2 + 0.1 * s for s in range(4)) / 4)


def test_the_comparison_table_shows_each_seed_and_the_mean_and_ci():
    comparison = compare_reports([make_report(s, 3.3 - 0.1 * s) for s in range(3)])
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(comparison_table(comparison))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "seed 0" in text and "seed 2" in text and "mean over seeds" in text
    assert "collective gain: mean +0.300" in text and "positive in 3 of 3" in text


def test_the_comparison_names_the_runs_own_interval_method_and_a_bootstrap_only_for_an_older_report():
    new = [make_report(s, 3.3 - 0.1 * s).model_copy(update={"interval_method": METHOD}) for s in range(2)]
    old = make_report(2, 3.1).model_copy(update={"schema_version": 5, "interval_method": "", "block_rounds": 2, "n_boot": 200})

    def table(reports: list[Report]) -> str:
        console = Console(file=io.StringIO(), width=1000, color_system=None)
        console.print(comparison_table(compare_reports(reports)))
        return console.file.getvalue()  # type: ignore[attr-defined]

    text = table(new)
    assert f"each run's own CIs (95% CIs paired over rounds: {METHOD}): collective report RUN_DIR" in text
    assert "bootstrap" not in text
    mixed = table([*new, old])  # each distinct method once, the older report's bootstrap with its blocks
    assert f"(95% CIs paired over rounds: {METHOD}; 95% CIs from a paired block bootstrap over rounds (blocks of 2 rounds, 200 resamples))" in mixed


def test_many_runs_are_summarised_by_min_max_mean_and_ci():
    comparison = compare_reports([make_report(s, 3.3) for s in range(10)])
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(comparison_table(comparison))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "seed 9" not in text and "min" in text and "max" in text


def test_runs_of_different_scenarios_are_labelled_by_scenario():
    comparison = compare_reports([make_report(0, 3.3, scenario="ring"), make_report(0, 3.2, scenario="star")])
    assert comparison.labels == ("ring s0", "star s0") and not comparison.seed_sweep


def test_the_markdown_comparison_has_one_line_per_row_and_gain():
    comparison = compare_reports([make_report(0, 3.3), make_report(1, 3.1)])
    text = comparison_markdown(comparison)
    assert "| collective | 3.300 | 3.100 | 3.200 |" in text
    assert text.count("\n| ") == len(comparison.rows) + len(comparison.gains) + 1


# ---------------------------------------------------------------------------- collective report


def save(folder: Path, report: Report) -> Path:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(report.model_dump_json(indent=2), encoding="utf-8")
    return folder


def test_report_of_one_run_prints_its_table(tmp_path, capsys):
    run = save(tmp_path / "r0", make_report(0, 3.3))
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "collective gain" in out and "made up" in out
    assert "[a]" in out and "[b]" in out  # node ids survive rich markup


def test_report_of_several_runs_compares_them(tmp_path, capsys):
    runs = [str(save(tmp_path / f"r{s}", make_report(s, 3.3 - 0.05 * s))) for s in range(3)]
    assert main(["report", *runs, "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| row | seed 0 | seed 1 | seed 2 | mean | 95% CI |" in out


def test_report_of_an_unfinished_run_says_why_it_has_no_report(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "INCOMPLETE").write_text("interrupted by Ctrl-C before the last round\n", encoding="utf-8")
    assert main(["report", str(run)]) == 2
    assert "interrupted by Ctrl-C" in capsys.readouterr().err


def test_one_report_shows_dropped_envelopes_by_who_dropped_them_and_why():
    from collective.report.report_view import report_markdown, report_table

    report = make_report(0, 3.3).model_copy(
        update={"rejected_envelopes": {"coordinator": {"spoofed": 2, "wrong_run": 1}, "b": {"malformed": 1}}}
    )
    console = Console(file=io.StringIO(), width=140)
    console.print(report_table(report))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "dropped envelopes   coordinator 3 (spoofed 2, wrong_run 1); b 1 (malformed 1)" in text
    assert "coordinator 3 (spoofed 2, wrong_run 1); b 1 (malformed 1)" in report_markdown(report)
    again = Report.model_validate_json(report.model_dump_json())
    assert again.rejected_envelopes == report.rejected_envelopes
    quiet = Console(file=io.StringIO(), width=140)
    quiet.print(report_table(make_report(0, 3.3)))
    assert "dropped envelopes" not in quiet.file.getvalue()  # type: ignore[attr-defined]
    assert "dropped envelopes" not in report_markdown(make_report(0, 3.3))


def test_a_version_1_report_without_rejected_envelopes_still_reads():
    data = make_report(0, 3.3).model_dump(mode="json")
    data["schema_version"] = 1
    del data["rejected_envelopes"]
    old = Report.model_validate(data)
    assert old.rejected_envelopes == {} and old.schema_version == 1


# ---------------------------------------------------------------------------- units (issue 20)


def as_bytes(report: Report) -> Report:
    """The same report as a run of several tokenizers writes it: every NLL per byte."""
    return report.model_copy(update={"unit": "byte"})


def test_reports_in_nats_per_token_and_nats_per_byte_are_not_compared():
    from collective.evaluate.compare import UnitMismatchError

    reports = [make_report(0, 3.3), as_bytes(make_report(1, 3.2)), make_report(2, 3.1)]
    with pytest.raises(UnitMismatchError, match=r"different units \(per token \(nats/token\): seed 0, seed 2; per byte \(nats/byte\): seed 1\)"):
        compare_reports(reports)


def test_the_cli_refuses_a_mixed_comparison_in_one_line_naming_the_runs(tmp_path, capsys):
    runs = [str(save(tmp_path / "t", make_report(0, 3.3))), str(save(tmp_path / "b", as_bytes(make_report(1, 3.2))))]
    assert main(["report", *runs]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot compare these runs" in err and "per byte (nats/byte): seed 1" in err and "Traceback" not in err


def test_byte_reports_compare_with_each_other_in_nats_per_byte():
    comparison = compare_reports([as_bytes(make_report(s, 3.3 - 0.05 * s)) for s in range(3)])
    assert comparison.unit == "byte"
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(comparison_table(comparison))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "(NLL in nats/byte)" in text and "collective gain: mean +0.250 nats/byte" in text and "nats/token" not in text
    assert "- communication gain: mean +0.150 nats/byte" in comparison_markdown(comparison)
    token = compare_reports([make_report(s, 3.3 - 0.05 * s) for s in range(3)])
    assert token.unit == "token" and "nats/byte" not in comparison_markdown(token)
