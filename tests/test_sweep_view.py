"""The sweep summary as a table and as Markdown (collective.report.sweep_view)."""

from __future__ import annotations

import io

from rich.console import Console

from collective.report.sweep_view import sweep_markdown, sweep_table


def _cell(combination: str, seed: int | None, comm: float, bytes_sent: float) -> dict:
    return {
        "combination": combination, "overrides": {}, "seed": seed,
        "communication_gain": {"value": comm, "ci": [comm - 0.1, comm + 0.1]},
        "collective_gain": {"value": -0.5, "ci": [-0.7, -0.3]},
        "bytes_per_link_round": bytes_sent,
    }


SUMMARY = {
    "schema_version": 1,
    "cells": [_cell("policy=relay", 0, 0.12, 40.0), _cell("policy=relay", 1, 0.08, 42.0)],
    "means": [_cell("policy=relay", None, 0.10, 41.0)],
}


def test_the_markdown_has_each_cell_and_the_mean_with_signed_gains_and_cis():
    lines = sweep_markdown(SUMMARY).splitlines()
    assert lines[0].startswith("| cell | seed | communication gain")
    assert "| policy=relay | 0 | +0.120 [+0.020, +0.220] | -0.500 [-0.700, -0.300] | 40.0 |" in lines
    assert "| policy=relay | mean | +0.100 [+0.000, +0.200] | -0.500 [-0.700, -0.300] | 41.0 |" in lines
    assert len(lines) == 2 + 3 + 2
    assert lines[-1].startswith("Mean rows:") and "not a confidence interval" in lines[-1]


def test_the_table_fits_100_columns_and_names_every_seed():
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(sweep_table(SUMMARY))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "+0.080" in text and "mean" in text and "42.0" in text


def _title(summary: dict) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(sweep_table(summary))
    return console.file.getvalue().splitlines()[0]  # type: ignore[attr-defined]


def test_a_sweep_of_byte_cells_gives_its_gains_in_nats_per_byte_and_an_older_summary_in_nats_per_token():
    assert _title(SUMMARY).startswith("sweep: gains in nats/token;")  # no unit: a summary before byte units
    byte = {key: [{**cell, "unit": "byte"} for cell in cells] if isinstance(cells, list) else cells for key, cells in SUMMARY.items()}
    assert _title(byte).startswith("sweep: gains in nats/byte;")
    assert "(per byte)" not in sweep_markdown(byte)  # one unit: nothing to mark


def test_a_sweep_of_token_and_byte_cells_marks_the_per_byte_ones():
    mixed = {**SUMMARY, "cells": [SUMMARY["cells"][0], {**_cell("models=mixed", 0, 0.05, 40.0), "unit": "byte"}]}
    assert _title(mixed).startswith("sweep: gains in nats/token (nats/byte where marked (per byte));")
    lines = sweep_markdown(mixed).splitlines()
    assert any(line.startswith("| models=mixed (per byte) | 0 | +0.050") for line in lines)
    assert any(line.startswith("| policy=relay | 0 | +0.120") for line in lines)
