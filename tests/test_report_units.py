"""Byte-unit reports (a collective of several tokenizers, issue 20): every row is scored per
byte of the eval text, the report says nats/byte and its verdict bits/byte; a token-unit
report renders exactly as before, and reports of version 7 still read as token-unit ones."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from collective.cli import main
from collective.evaluate.book import EngineResult
from collective.evaluate.evaluator import build_report
from collective.evaluate.gains import verdict
from collective.evaluate.metrics import Estimate
from collective.records import REPORT_SCHEMA_VERSION, Report
from collective.report.report_view import report_markdown
from tests.report_fixtures import as_byte_report, full_token_report, renderings
from tests.test_evaluator import _result, _rows, _scenario
from tests.test_report_view import quickstart

TOKEN_RENDERED = Path(__file__).parent / "data" / "report-token-rendered.txt"  # as the views rendered before byte units
LN2 = math.log(2.0)


def _byte_result() -> EngineResult:
    """The evaluator tests' result as a byte-mode run's engine returns it (unit byte)."""
    return dataclasses.replace(_result(_rows()), unit="byte")


# ---------------------------------------------------------------------------- token reports: unchanged


def test_a_token_report_renders_exactly_as_before_byte_units_at_every_width_and_in_markdown():
    expected = TOKEN_RENDERED.read_text(encoding="utf-8")
    assert renderings(quickstart()) + renderings(full_token_report()) == expected


def test_a_version_7_report_reads_as_a_token_report_and_renders_as_it_did(tmp_path, capsys):
    data = json.loads(full_token_report().model_dump_json())
    assert data.pop("unit") == "token"  # what version 7 wrote: no unit
    report = Report.model_validate_json(json.dumps(data))
    assert report.schema_version == 7 and report.unit == "token" and REPORT_SCHEMA_VERSION == 8
    assert renderings(report) in TOKEN_RENDERED.read_text(encoding="utf-8")
    run = tmp_path / "v7-run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(data), encoding="utf-8")
    assert main(["report", str(run), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| NLL (nats/token) |" in out and "nats/byte" not in out


# ---------------------------------------------------------------------------- byte reports


def test_a_byte_report_gives_its_nlls_and_gains_in_nats_per_byte_and_counts_bytes():
    report = as_byte_report(full_token_report())
    text = renderings(report)
    assert "NLL nats/byte" in text and "| NLL (nats/byte) |" in text and "NLL nats/tok" not in text
    assert "collective gain     -0.073 nats/byte (95% CI" in text and "- communication gain: -0.102 nats/byte" in text
    assert "controller gain a   +0.042 nats/byte" in text
    assert "quickstart: 1400 eval bytes in 10 rounds" in text and "1400 eval bytes in 10 rounds of 32 stream tokens" in text
    assert "eval tokens" not in text and "eval bytes/s" in text
    assert "every row is scored on each next byte of the eval text" in " ".join(text.split())
    assert "d 3/10 rounds (420/1400 bytes)" in text
    # the yardstick is scored per byte like every row: no note that its NLL counts its own tokens
    assert "yardstick row" not in text and "- yardstick: the collective closes 25%" in text
    # a searched message's objective is per token of its sender's model whatever the report's unit
    lines = [line for line in report_markdown(report).splitlines() if "nats/token" in line]
    assert lines and all(line.startswith(("- messages of b:", "**")) for line in lines)  # "**": the fixture's verdict


def test_a_byte_report_marks_rows_partial_by_rounds_not_by_the_token_count():
    report = as_byte_report(full_token_report())
    assert report.row("member_isolated", "a").n_tokens > report.n_eval_tokens  # bytes outnumber tokens
    assert not report.is_partial(report.row("member_isolated", "a"))
    assert report.is_partial(report.row("member_isolated", "d"))


def test_the_verdict_of_a_byte_run_speaks_in_bits_per_byte():
    gain = Estimate(0.1 * LN2, 0.05 * LN2, 0.15 * LN2, n_rounds=8)
    loss = Estimate(-0.2 * LN2, -0.3 * LN2, -0.1 * LN2, n_rounds=8)
    text = verdict(gain, loss, "a", unit="byte")
    assert text == (
        "The collective beats its best member (a) by 0.100 bits/byte (95% CI +0.050 to +0.150); communication hurt: "
        "0.200 bits/byte worse than the silent ensemble (95% CI -0.300 to -0.100)."
    )
    assert verdict(gain, loss, "a").startswith("The collective beats its best member (a) by 0.069 nats/token (95% CI +0.035 to +0.104)")


def test_a_byte_verdict_reads_a_float_tie_on_the_nats_not_on_the_larger_bits():
    tiny = Estimate(8e-6, 7e-6, 9e-6, n_rounds=8)  # within TIE_NATS (1e-5) in nats, above it in bits
    text = verdict(tiny, tiny, "a", unit="byte")
    assert "not distinguishable from its best member (a): equal within float tolerance" in text
    assert "no measurable difference over the silent ensemble, equal within float tolerance" in text


def test_build_report_takes_the_unit_from_the_engine_result_and_its_verdict_speaks_bits():
    token = build_report(_scenario(), _result(_rows()), run_id="r")
    byte = build_report(_scenario(), _byte_result(), run_id="r")
    assert token.unit == "token" and byte.unit == "byte"
    assert [row.nll for row in byte.rows] == [row.nll for row in token.rows]  # the same numbers, in another unit
    bits = byte.collective_gain.value / LN2
    assert byte.verdict.startswith(f"The collective beats its best member (b) by {bits:.3f} bits/byte (95% CI ")
    assert "nats/token" not in byte.verdict and "bits/byte" not in token.verdict
    assert token.verdict.startswith(f"The collective beats its best member (b) by {token.collective_gain.value:.3f} nats/token")
    assert Report.model_validate_json(byte.model_dump_json()) == byte
    markdown = report_markdown(byte)
    assert "| NLL (nats/byte) |" in markdown and f"**{byte.verdict}**" in markdown


def test_a_byte_report_does_not_call_its_pooled_top1_approximate():
    token = full_token_report()  # a mean pool over recorded top-K tokens: approximate top-1
    assert token.aggregator == "mean" and "approximate where tail mass decides" in renderings(token)
    assert "approximate" not in renderings(as_byte_report(token))  # all 256 byte values recorded: exact
