"""The report as people read it: a rich table for the terminal, Markdown for the folder.

Both are pure functions of a `Report`.
"""

from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from collective.records import ROW_TITLES, Gain, Report, RowReport


def _label(row: RowReport) -> str:
    title = ROW_TITLES[row.row]
    return f"{title} [{row.node_id}]" if row.node_id else title


def _ci(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    return f"{low:.3f} .. {high:.3f}"


def _gain(gain: Gain) -> str:
    return f"{gain.value:+.3f} nats/token (95% CI {_ci(gain.ci.low, gain.ci.high)}) vs {gain.versus}"


def report_table(report: Report) -> Group:
    table = Table(
        title=f"{report.scenario}: {report.n_eval_tokens} eval tokens in {report.n_eval_rounds} rounds "
        f"(seed {report.seed}, aggregator {report.aggregator})",
        title_justify="left",
    )
    table.add_column("row")
    table.add_column("model")
    table.add_column("NLL nats/tok", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column("ppl", justify="right")
    table.add_column("bits/byte", justify="right")
    table.add_column("top-1", justify="right")
    for row in report.rows:
        style = "bold" if row.row == "collective" else None
        table.add_row(
            Text(_label(row)),  # a Text: "[a]" in a plain string would be read as rich markup
            Text(row.model or ""),
            f"{row.nll:.3f}",
            _ci(row.nll_ci.low, row.nll_ci.high),
            f"{row.perplexity:.2f}",
            f"{row.bits_per_byte:.3f}",
            f"{row.top1:.1%}",
            style=style,
        )
    lines = [
        Text(f"collective gain     {_gain(report.collective_gain)}"),
        Text(f"communication gain  {_gain(report.communication_gain)}"),
    ]
    if report.missed_rounds:
        missed = ", ".join(f"{k}: {v}" for k, v in report.missed_rounds.items())
        lines.append(Text(f"missed rounds       {missed}"))
    if report.rejected_envelopes:
        lines.append(Text(f"dropped envelopes   {_rejected(report.rejected_envelopes)}"))
    lines.append(Text(report.verdict, style="bold"))
    return Group(table, *lines)


def _rejected(rejected: dict[str, dict[str, int]]) -> str:
    """`coordinator 2 (spoofed 1, wrong_run 1); b 1 (malformed 1)`."""
    return "; ".join(
        f"{who} {sum(counts.values())} ({', '.join(f'{reason} {n}' for reason, n in sorted(counts.items()))})"
        for who, counts in rejected.items()
    )


def report_markdown(report: Report, images: list[tuple[str, str]] | None = None) -> str:
    out = [
        f"# {report.scenario}",
        "",
        f"Run `{report.run_id}`, seed {report.seed}, {report.runtime} runtime, aggregator {report.aggregator}; "
        f"{report.n_eval_tokens} eval tokens ({report.eval_bytes} bytes) in {report.n_eval_rounds} rounds of "
        f"{report.round_tokens}; 95% CIs from a paired block bootstrap over rounds "
        f"(blocks of {report.block_rounds}, {report.n_boot} resamples).",
        "",
        f"**{report.verdict}**",
        "",
        "| row | model | NLL (nats/token) | 95% CI | perplexity | bits/byte | top-1 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report.rows:
        out.append(
            f"| {_label(row)} | {row.model or ''} | {row.nll:.4f} | {_ci(row.nll_ci.low, row.nll_ci.high)} | "
            f"{row.perplexity:.3f} | {row.bits_per_byte:.4f} | {row.top1:.2%} |"
        )
    out += [
        "",
        f"- collective gain: {_gain(report.collective_gain)}",
        f"- communication gain: {_gain(report.communication_gain)}",
        f"- messages: {report.messages_sent} sent, {report.messages_dropped} dropped, "
        f"{report.messages_truncated} cut to the budget",
        f"- wall time {report.wall_seconds:.1f} s ({report.tokens_per_second:.1f} eval tokens/s)",
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
