"""A sweep's summary as people read it: a rich table for the terminal, Markdown for a file.

Both are pure functions of the `summary.json` that `collective sweep` writes (schema 1):
one row per cell and one per combination's mean over seeds, each with the communication
and collective gains, their 95% CIs, and the bytes actually delivered per link and round.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for cell in [*summary.get("cells", []), *summary.get("means", [])]:
        seed = "mean" if cell["seed"] is None else str(cell["seed"])
        rows.append([cell["combination"], seed, _gain(cell["communication_gain"]), _gain(cell["collective_gain"]),
                     f"{cell['bytes_per_link_round']:.1f}"])
    return rows


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
        title="sweep: gains in nats/token; mean rows average the seeds' CI ends (not a CI of the mean)", title_justify="left"
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
