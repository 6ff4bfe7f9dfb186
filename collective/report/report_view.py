"""The report as people read it: a rich table for the terminal, Markdown for the folder.

Both are pure functions of a `Report` (of any schema version). The terminal table picks
its layout from the width it is given: the full one when it fits, else a compact one
(short row labels, the CI on one line, no perplexity), dropping the model and then the
bits-per-byte column until every row fits on one line. A row scored on fewer than all
eval rounds (a node missed some) is marked `*` and explained under the table. Under the
table come the gains: collective, communication, and each prompted node's controller gain
(plain minus isolated), read in words with the verdict's float tolerance, then what each
receiver's firewall did and cost. A run with a yardstick has its row (NLL per token of the
yardstick's own tokenizer: rows compare in bits/byte) and the line "the collective closes X%
of the gap between its best member and the yardstick", with its CI. A byte-unit report (a
collective of several tokenizers, `Report.unit`) says so: every NLL, gain and perplexity is
per byte of the eval text (nats/byte), and its verdict reads the gains in bits/byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from rich import box
from rich.console import Console, ConsoleOptions, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from collective.evaluate.gains import controller_effect
from collective.evaluate.intervals import TOO_FEW_ROUNDS
from collective.evaluate.metrics import Estimate
from collective.records import (
    PARTIAL_MARK,
    ROW_TITLES,
    FilterFit,
    FilterReport,
    Gain,
    Report,
    RowReport,
    Unit,
    nll_unit,
)

SHORT_TITLES: dict[str, str] = {
    "member_plain": "plain",
    "member_isolated": "isolated",
    "member_collective": "in coll.",
    "ensemble_silent": "silent ens.",
    "collective": "collective",
    "reference": "reference",
    "yardstick": "yardstick",
}


def _label(row: RowReport, short: bool = False) -> str:
    if short:
        title = SHORT_TITLES[row.row]
        return f"{title} {row.node_id}" if row.node_id else title
    title = ROW_TITLES[row.row]
    return f"{title} [{row.node_id}]" if row.node_id else title


def row_label(report: Report, row: RowReport, short: bool = False) -> str:
    """The row's label, marked when the row is partial (scored on fewer than all eval rounds)."""
    return _label(row, short) + (PARTIAL_MARK if report.is_partial(row) else "")


def _signed(value: float) -> str:
    text = f"{value:+.3f}"
    return "+0.000" if text == "-0.000" else text


def _ci(low: float, high: float, signed: bool = False, sep: str = " .. ") -> str:
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    if signed:
        return f"{_signed(low)}{sep}{_signed(high)}"
    return f"{low:.3f}{sep}{high:.3f}"


def _gain(gain: Gain, n_rounds: int, unit: Unit = "token") -> str:
    shared = "" if gain.n_rounds is None or gain.n_rounds == n_rounds else f", on {gain.n_rounds}/{n_rounds} shared rounds"
    per = nll_unit(unit)
    if math.isnan(gain.ci.low) or math.isnan(gain.ci.high):
        return f"{_signed(gain.value)} {per} (no 95% CI: {TOO_FEW_ROUNDS}) vs {gain.versus}{shared}"
    return f"{_signed(gain.value)} {per} (95% CI {_ci(gain.ci.low, gain.ci.high, signed=True)}) vs {gain.versus}{shared}"


BYTE_UNIT_NOTE = (
    "a byte-unit run (models with different tokenizers, or evaluation.unit: byte): every row is scored on each "
    "next byte of the eval text (NLL in nats/byte, perplexity per byte, top-1 over bytes; bits/byte = NLL / ln 2)"
)


def unit_lines(report: Report) -> list[tuple[str, str]]:
    """(label, text): what a byte-unit report's numbers count; none for a token-unit one."""
    return [("unit", BYTE_UNIT_NOTE)] if report.unit == "byte" else []


def eval_size(report: Report) -> str:
    """'320 eval tokens' or, for a byte-unit report, '1400 eval bytes'."""
    return f"{report.eval_bytes} eval bytes" if report.unit == "byte" else f"{report.n_eval_tokens} eval tokens"


def yardstick_lines(report: Report) -> list[tuple[str, str]]:
    """(label, text): the share of the gap to the yardstick the collective closes (bits/byte),
    and what the yardstick row's NLL counts; none without a yardstick (or before report 7)."""
    gap = report.yardstick
    if gap is None:
        return []
    size = f"gap {gap.gap_bits_per_byte:.3f} bits/byte ({_ci(gap.gap_ci.low, gap.gap_ci.high, signed=True)})"
    if gap.share is None:
        text = f"the share of the gap closed is undefined: the yardstick is not measurably better than the best member ({size})"
    else:
        interval = "no 95% CI" if math.isnan(gap.share_ci.low) else f"95% CI {gap.share_ci.low:.0%} to {gap.share_ci.high:.0%}"
        text = (
            f"the collective closes {gap.share:.0%} of the gap between its best member ({gap.best_member}) and the "
            f"yardstick ({interval}; {size}, on {gap.n_rounds} rounds)"
        )
    if report.unit == "byte":  # every row, the yardstick's too, is per byte of the same text
        return [("yardstick", text)]
    row = next((r for r in report.rows if r.row == "yardstick"), None)
    count = "" if row is None else f" ({row.n_tokens} of its tokens for the {report.eval_bytes} eval bytes)"
    return [
        ("yardstick", text),
        ("yardstick row", f"NLL per token of the yardstick's own tokenizer{count}; rows compare in bits/byte"),
    ]


def controller_lines(report: Report) -> list[tuple[str, str]]:
    """(label, text) per prompted node: its controller gain and what it means."""
    n = report.n_eval_rounds
    return [
        (f"controller gain {node_id}", f"{_gain(gain, n, report.unit)}: {controller_effect(_estimate(gain))}")
        for node_id, gain in report.controller_gains.items()
    ]


def message_search_lines(report: Report) -> list[tuple[str, str]]:
    """(label, text) per node that searched its messages: the objective before and after."""
    return [
        (
            f"messages of {node_id}",
            f"searched: objective {found.mean_before:.3f} -> {found.mean_after:.3f} nats/token (mean over "
            f"{found.messages} rounds, {found.mean_tokens:.1f} tokens, {found.seconds:.1f} s of search)",
        )
        for node_id, found in report.message_searches.items()
    ]


def held_out_text(fit: FilterFit) -> str:
    """`; held out: 3.1% of 64 above it (128 distinct train windows, 64 asked for each half)`,
    empty for a fit recorded before held-out messages were."""
    if fit.held_out_messages is None:
        return ""
    rate = "-" if fit.held_out_drop_rate is None else f"{fit.held_out_drop_rate:.1%}"
    return (
        f"; held out: {rate} of {fit.held_out_messages} above it ({fit.windows_available} distinct train windows, "
        f"{fit.requested_messages} asked for each half)"
    )


def _filter_text(found: FilterReport) -> str:
    """`perplexity (whole message; threshold 5.210, fitted on 64 benign train messages at 5%
    false drops, 4.7% above it): dropped 3, rewrote 0`."""
    details = [found.setting] if found.setting else []
    if found.threshold is not None:
        fit = found.fit
        how = (
            f"fitted on {fit.benign_messages} benign train messages of {fit.mean_tokens:.1f} tokens at "
            f"{fit.false_drop_rate:.0%} false drops, {fit.fit_drop_rate:.1%} above it{held_out_text(fit)}"
            if fit is not None else "given"
        )
        details.append(f"threshold {found.threshold:.3f} nats/token, {how}")
    return f"{found.filter} ({'; '.join(details)}): dropped {found.dropped}, rewrote {found.rewritten}"


def firewall_lines(report: Report) -> list[tuple[str, str]]:
    """(label, text) per receiver with a firewall: what it read, dropped and rewrote, what it
    cost, and each filter with its threshold."""
    return [
        (
            f"firewall of {node_id}",
            f"{found.messages_read} messages read, {found.messages_dropped} dropped, {found.messages_rewritten} "
            f"rewritten; {1000 * found.seconds_per_message:.2f} ms a message, {found.round_share:.1%} of the round "
            f"time; " + "; ".join(_filter_text(f) for f in found.filters),
        )
        for node_id, found in report.firewalls.items()
    ]


def _estimate(gain: Gain) -> Estimate:
    return Estimate(gain.value, gain.ci.low, gain.ci.high, n_rounds=gain.n_rounds)


def partial_note(report: Report) -> str:
    """'* partial rows: d 3/10 rounds (96/320 tokens); ...' ('' when every row is complete)."""
    partial = [row for row in report.rows if report.is_partial(row)]
    if not partial:
        return ""
    seen: dict[str, str] = {}
    for row in partial:
        who = row.node_id or _label(row)
        scored = f"{row.n_tokens}/{report.eval_bytes} bytes" if report.unit == "byte" else f"{row.n_tokens}/{report.n_eval_tokens} tokens"
        seen.setdefault(who, f"{who} {report.coverage(row)} ({scored})")
    return (
        f"{PARTIAL_MARK} partial rows, scored on fewer than all eval rounds: {'; '.join(seen.values())}. "
        "Each gain pairs the rounds both its sides were scored on."
    )


# ---------------------------------------------------------------------------- terminal


@dataclass(frozen=True)
class _Layout:
    short: bool  # short labels, CI on one line, no perplexity, a light box
    model: bool = True
    bits: bool = True


LAYOUTS = (_Layout(False), _Layout(True), _Layout(True, model=False), _Layout(True, model=False, bits=False))


def _table(report: Report, layout: _Layout) -> Table:
    partial = any(report.is_partial(row) for row in report.rows)
    title = (
        f"{report.scenario}: {eval_size(report)} in {report.n_eval_rounds} rounds "
        f"(seed {report.seed}, aggregator {report.aggregator})"
    )
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD if layout.short else box.HEAVY_HEAD)
    columns = [("row", "left"), ("model", "left")] if layout.model else [("row", "left")]
    full_nll = "NLL nats/byte" if report.unit == "byte" else "NLL nats/tok"
    columns += [("NLL", "right"), ("95% CI", "right")] if layout.short else [(full_nll, "right"), ("95% CI", "right")]
    columns += [] if layout.short else [("ppl", "right")]
    columns += [("bits/byte", "right")] if layout.bits else []
    columns += [("top-1", "right")]
    columns += [("scored", "right")] if partial and not layout.short else []
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=layout.short)  # type: ignore[arg-type]
    for row in report.rows:
        cells: list[RenderableType] = [Text(row_label(report, row, layout.short))]  # Text: "[a]" is not markup
        cells += [Text(row.model or "")] if layout.model else []
        cells += [f"{row.nll:.3f}", _ci(row.nll_ci.low, row.nll_ci.high, sep=".." if layout.short else " .. ")]
        cells += [] if layout.short else [f"{row.perplexity:.2f}"]
        cells += [f"{row.bits_per_byte:.3f}"] if layout.bits else []
        cells += [f"{row.top1:.1%}"]
        cells += [report.coverage(row)] if partial and not layout.short else []
        table.add_row(*cells, style="bold" if row.row == "collective" else None)
    return table


def pooled_top1_note(report: Report) -> str:
    """Where a pooled row's top-1 is approximate, say so ('' where it is exact).

    A linear pool's NLL is exact, but its top-1 is the argmax of the mixture of the members'
    *recorded* (top-K plus uniform tail) distributions: the full distributions are not at
    hand in every runtime (scenarios/README.md, aggregator). A byte-unit run records all 256
    byte values: its pooled top-1 is exact."""
    if report.unit == "byte" or not (report.aggregator == "mean" or report.aggregator.startswith("weighted")):
        return ""
    return (
        "top-1 of the pooled rows (ensemble, collective) is the argmax of the members' recorded "
        "top-K mixture, approximate where tail mass decides; their NLL is exact"
    )


def _footer(report: Report) -> list[Text]:
    n = report.n_eval_rounds
    lines = [
        Text(f"collective gain     {_gain(report.collective_gain, n, report.unit)}"),
        Text(f"communication gain  {_gain(report.communication_gain, n, report.unit)}"),
    ]
    extra = unit_lines(report) + yardstick_lines(report) + controller_lines(report) + message_search_lines(report) + firewall_lines(report)
    lines += [Text(f"{label:<19} {text}") for label, text in extra]
    if note := pooled_top1_note(report):
        lines.append(Text(note))
    if note := partial_note(report):
        lines.append(Text(note))
    if report.missed_rounds:
        missed = ", ".join(f"{k}: {v}" for k, v in report.missed_rounds.items())
        lines.append(Text(f"missed rounds       {missed}"))
    if report.rejected_envelopes:
        lines.append(Text(f"dropped envelopes   {_rejected(report.rejected_envelopes)}"))
    lines.append(Text(report.verdict, style="bold"))
    return lines


class ReportTable:
    """The report for the terminal: the widest layout that fits the width it is given
    (each row on one line), then the gains, the partial rows and the verdict."""

    def __init__(self, report: Report) -> None:
        self.report = report

    def table(self, console: Console, options: ConsoleOptions) -> Table:
        tables = [_table(self.report, layout) for layout in LAYOUTS]
        unbounded = options.update_width(10_000)  # a table's natural width, not the one it is squeezed to
        for table in tables:
            if Measurement.get(console, unbounded, table).maximum <= options.max_width:
                return table
        return tables[-1]  # narrower still: cells are cut with an ellipsis, rows stay one line

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[RenderableType]:
        yield self.table(console, options)
        yield from _footer(self.report)


def report_table(report: Report) -> ReportTable:
    return ReportTable(report)


def _rejected(rejected: dict[str, dict[str, int]]) -> str:
    """`coordinator 2 (spoofed 1, wrong_run 1); b 1 (malformed 1)`."""
    return "; ".join(
        f"{who} {sum(counts.values())} ({', '.join(f'{reason} {n}' for reason, n in sorted(counts.items()))})"
        for who, counts in rejected.items()
    )


# ---------------------------------------------------------------------------- markdown


def _markdown_size(report: Report) -> str:
    """'320 eval tokens (1400 bytes)', or for a byte-unit report '1400 eval bytes'."""
    return eval_size(report) if report.unit == "byte" else f"{report.n_eval_tokens} eval tokens ({report.eval_bytes} bytes)"


def _rate(report: Report) -> str:
    """'1.9 eval tokens/s', or for a byte-unit report the eval bytes per second."""
    if report.unit == "byte":
        return f"{report.eval_bytes / report.wall_seconds if report.wall_seconds > 0 else 0.0:.1f} eval bytes/s"
    return f"{report.tokens_per_second:.1f} eval tokens/s"


def report_markdown(report: Report, images: list[tuple[str, str]] | None = None) -> str:
    n = report.n_eval_rounds
    out = [
        f"# {report.scenario}",
        "",
        f"Run `{report.run_id}`, seed {report.seed}, {report.runtime} runtime, aggregator {report.aggregator}; "
        f"{_markdown_size(report)} in {n} rounds of {report.round_tokens}{' stream tokens' if report.unit == 'byte' else ''}; "
        f"{report.interval_text()}.",
        "",
        f"**{report.verdict}**",
        "",
        f"| row | model | NLL ({nll_unit(report.unit)}) | 95% CI | perplexity | bits/byte | top-1 | scored |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report.rows:
        out.append(
            f"| {row_label(report, row)} | {row.model or ''} | {row.nll:.4f} | {_ci(row.nll_ci.low, row.nll_ci.high)} | "
            f"{row.perplexity:.3f} | {row.bits_per_byte:.4f} | {row.top1:.2%} | {report.coverage(row)} |"
        )
    if note := partial_note(report):
        out += ["", note]
    out += [
        "",
        f"- collective gain: {_gain(report.collective_gain, n, report.unit)}",
        f"- communication gain: {_gain(report.communication_gain, n, report.unit)}",
    ]
    extra = unit_lines(report) + yardstick_lines(report) + controller_lines(report) + message_search_lines(report) + firewall_lines(report)
    out += [f"- {label}: {text}" for label, text in extra]
    if report.best_member_rule:
        out.append(f"- best member: {report.best_member or 'none'} ({report.best_member_rule})")
    if note := pooled_top1_note(report):
        out.append(f"- {note}")
    out += [
        f"- messages: {report.messages_sent} sent, {report.messages_dropped} dropped, "
        f"{report.messages_truncated} cut to the budget",
        f"- wall time {report.wall_seconds:.1f} s ({_rate(report)})",
    ]
    if report.missed_rounds:
        out.append("- missed rounds: " + ", ".join(f"{k} {v}" for k, v in report.missed_rounds.items()))
    if report.rejected_envelopes:
        out.append(f"- dropped envelopes (invalid, spoofed, oversized ...): {_rejected(report.rejected_envelopes)}")
    if report.control_prompts:
        out += ["", "## Control prompts", ""]
        out += [f"- `{node}`: `{text!r}`" for node, text in report.control_prompts.items()]
    for title, name in images or []:
        out += ["", f"## {title}", "", f"![{title}]({name})"]
    return "\n".join(out) + "\n"
