"""A sweep's summary as people read it: a rich table for the terminal, Markdown for a file.

Both are pure functions of the `summary.json` that `collective sweep` writes (schema 1):
one row per cell and one per combination's mean over seeds, each with the communication
and collective gains, their 95% CIs, and the bytes actually delivered per link and round.
Gains are in nats/token, or nats/byte for cells whose nodes have different tokenizers (a cell's
`unit`; absent in older summaries: token); a sweep of both marks its per-byte cells.
A paired comparison of two cells (`collective report SWEEP --paired A B`,
`collective.evaluate.paired`) renders as `paired_table` / `paired_markdown`.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from collective.evaluate.metrics import Estimate
from collective.evaluate.paired import PairedComparison, summary_line
from collective.records import nll_unit

BYTE_MARK = " (per byte)"


def _units(summary: dict[str, Any]) -> set[str]:
    return {cell.get("unit", "token") for cell in [*summary.get("cells", []), *summary.get("means", [])]}


def _rows(summary: dict[str, Any]) -> list[list[str]]:
    mixed = len(_units(summary)) > 1
    rows = []
    for cell in [*summary.get("cells", []), *summary.get("means", [])]:
        seed = "mean" if cell["seed"] is None else str(cell["seed"])
        mark = BYTE_MARK if mixed and cell.get("unit") == "byte" else ""
        rows.append([cell["combination"] + mark, seed, _gain(cell["communication_gain"]), _gain(cell["collective_gain"]),
                     f"{cell['bytes_per_link_round']:.1f}"])
    return rows


def gain_units(summary: dict[str, Any]) -> str:
    """'nats/token', 'nats/byte', or for a sweep of both 'nats/token (nats/byte where marked (per byte))'."""
    units = _units(summary)
    if len(units) > 1:
        return f"nats/token (nats/byte where marked{BYTE_MARK})"
    return f"nats/{units.pop()}" if units else "nats/token"


def _gain(gain: dict[str, Any]) -> str:
    low, high = gain["ci"]
    return f"{gain['value']:+.3f} [{low:+.3f}, {high:+.3f}]"


MEAN_NOTE = (
    "Mean rows: the mean of the seeds' gains, in brackets the mean of the seeds' CI ends, which is "
    "not a confidence interval of the mean (it ignores how much the seeds differ)."
)
HEADERS = ("cell", "seed", "communication gain [95% CI]", "collective gain [95% CI]", "bytes/link/round")


def sweep_table(summary: dict[str, Any]) -> Table:
    """Every cell, then each combination's mean over seeds (its CI the mean of the seeds' ends)."""
    table = Table(
        title=f"sweep: gains in {gain_units(summary)}; mean rows average the seeds' CI ends (not a CI of the mean)",
        title_justify="left",
    )
    for header in HEADERS:
        table.add_column(header, justify="left" if header == "cell" else "right")
    for row in _rows(summary):
        table.add_row(*row, style="bold" if row[1] == "mean" else None)
    return table


def sweep_markdown(summary: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "| --- |" + " ---: |" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(summary)]
    if summary.get("means"):
        lines += ["", MEAN_NOTE]
    return "\n".join(lines) + "\n"


PAIRED_HEADERS = ("pair", "rounds", "NLL A", "NLL B", "A - B", "CI of A - B")


def _interval(estimate: Estimate) -> str:
    if not (math.isfinite(estimate.low) and math.isfinite(estimate.high)):
        return "n/a"
    return f"{estimate.low:+.3f} .. {estimate.high:+.3f}"


def _paired_rows(comparison: PairedComparison) -> list[list[str]]:
    rows = [
        [f"seed {p.seed}", str(p.difference.n_rounds), f"{p.nll_a.value:.3f}", f"{p.nll_b.value:.3f}",
         f"{p.difference.value:+.3f}", _interval(p.difference)]
        for p in comparison.pairs
    ]
    spread = comparison.over_seeds
    over = f"{spread.low:+.3f} .. {spread.high:+.3f}" if math.isfinite(spread.low) else "n/a (one pair)"
    rows.append([f"mean over {spread.n}", "", "", "", f"{spread.mean:+.3f}", f"{over} (t, {spread.n - 1} df)"])
    return rows


def paired_title(comparison: PairedComparison) -> str:
    return (
        f"paired: A = {comparison.label_a}, B = {comparison.label_b}; collective NLL in {nll_unit(comparison.unit)} on the rounds both "
        f"scored, {100 * comparison.confidence:g}% intervals (A - B < 0: A predicts better)"
    )


def paired_table(comparison: PairedComparison) -> Group:
    """One row per pair (seed), then the mean over pairs with its t interval; the summary line."""
    table = Table(title=paired_title(comparison), title_justify="left")
    for header in PAIRED_HEADERS:
        table.add_column(header, justify="left" if header == "pair" else "right", no_wrap=True)
    rows = _paired_rows(comparison)
    for index, row in enumerate(rows):
        table.add_row(*row, style="bold" if index == len(rows) - 1 else None)
    return Group(table, Text(summary_line(comparison)))


def paired_markdown(comparison: PairedComparison) -> str:
    lines = [paired_title(comparison), "", "| " + " | ".join(PAIRED_HEADERS) + " |", "| --- |" + " ---: |" * (len(PAIRED_HEADERS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in _paired_rows(comparison)]
    lines += ["", f"- {summary_line(comparison)}"]
    return "\n".join(lines) + "\n"
