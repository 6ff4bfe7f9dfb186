"""Several runs side by side: seed sweeps and ablations.

`compare_reports(reports)` lines up the runs' report rows (matched by row kind and node)
and their two gains, and, across the runs, gives each the mean and a 95% t-interval
(`mean_ci`): for a seed sweep that is the spread of the result over seeds, which each
run's own CIs (paired over the eval rounds inside one run, the method its report names)
do not show. `comparison_table` and `comparison_markdown` render it. Runs scored per token and
runs scored per byte (several tokenizers, `Report.unit`) are not compared: their NLLs and gains
are in different units (`UnitMismatchError`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text

from collective.evaluate.tdist import t_critical
from collective.records import PARTIAL_MARK, ROW_TITLES, Report, Unit, nll_unit
from collective.scenario_errors import RunError

MAX_RUN_COLUMNS = 6

LineKey = tuple[str, str | None]  # a line of the comparison: a report row (kind, node id) or a gain (name, None)


class UnitMismatchError(RunError):
    """Reports scored per token and per byte given together; the message names the runs of each."""


@dataclass(frozen=True)
class Spread:
    """Mean of one number across runs and its t interval (95% unless asked; NaN bounds with one run)."""

    values: tuple[float, ...]
    mean: float
    low: float
    high: float

    @property
    def n(self) -> int:
        return len(self.values)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Spread:
    """The mean of the finite values and its t interval (n - 1 degrees of freedom)."""
    finite = tuple(v for v in values if math.isfinite(v))
    if not finite:
        return Spread((), math.nan, math.nan, math.nan)
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return Spread(finite, mean, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    half = t_critical(len(finite) - 1, confidence) * sd / math.sqrt(len(finite))
    return Spread(finite, mean, mean - half, mean + half)


@dataclass(frozen=True)
class ComparedRow:
    label: str
    key: LineKey
    values: tuple[float | None, ...]  # one per run; None where that run has no such row
    spread: Spread
    partial: tuple[bool, ...] = ()  # per run: the row was scored on fewer than all eval rounds


@dataclass(frozen=True)
class Comparison:
    labels: tuple[str, ...]  # one per run
    scenarios: tuple[str, ...]
    rows: tuple[ComparedRow, ...]  # NLL rows (nats per unit)
    gains: tuple[ComparedRow, ...]  # collective gain, communication gain
    interval_methods: tuple[str, ...] = ()  # how the runs' own CIs were computed: each distinct one, in run order
    unit: Unit = "token"  # every run's: a token, or a byte of the text (several tokenizers)

    @property
    def seed_sweep(self) -> bool:
        """All runs of one scenario: the across-run spread is a spread over seeds."""
        return len(set(self.scenarios)) == 1


def _row_label(kind: str, node_id: str | None) -> str:
    title = ROW_TITLES.get(kind, kind)
    return f"{title} [{node_id}]" if node_id else title


def run_labels(reports: Sequence[Report]) -> tuple[str, ...]:
    """'seed N' for a seed sweep, 'scenario sN' when scenarios differ; run ids if those clash."""
    if len({r.scenario for r in reports}) == 1:
        labels = [f"seed {r.seed}" for r in reports]
    else:
        labels = [f"{r.scenario} s{r.seed}" for r in reports]
    return tuple(labels) if len(set(labels)) == len(labels) else tuple(r.run_id for r in reports)


def check_one_unit(reports: Sequence[Report], labels: Sequence[str]) -> Unit:
    """The unit every report is scored in; a UnitMismatchError naming the runs of each unit when
    some are per token and some per byte (their NLLs and gains cannot be set side by side)."""
    by_unit: dict[Unit, list[str]] = {}
    for report, label in zip(reports, labels):
        by_unit.setdefault(report.unit, []).append(label)
    if len(by_unit) > 1:
        runs = "; ".join(f"per {unit} ({nll_unit(unit)}): {', '.join(names)}" for unit, names in by_unit.items())
        raise UnitMismatchError(
            f"cannot compare these runs: their NLLs and gains are in different units ({runs}); a run whose nodes have "
            "different tokenizers is scored per byte of the text. Compare runs of one unit, or read each report's "
            "bits/byte column, which every report gives"
        )
    return reports[0].unit


def compare_reports(reports: Sequence[Report], labels: Sequence[str] | None = None) -> Comparison:
    if not reports:
        raise ValueError("compare_reports needs at least one report")
    names = tuple(labels) if labels is not None else run_labels(reports)
    unit = check_one_unit(reports, names)
    keys: list[LineKey] = []
    for report in reports:
        for row in report.rows:
            if (row.row, row.node_id) not in keys:
                keys.append((row.row, row.node_id))
    rows = []
    for kind, node_id in keys:
        values: list[float | None] = []
        partial: list[bool] = []
        for report in reports:
            try:
                row = report.row(kind, node_id)
            except KeyError:
                values.append(None)
                partial.append(False)
                continue
            values.append(row.nll)
            partial.append(report.is_partial(row))
        spread = mean_ci([v for v in values if v is not None])
        rows.append(ComparedRow(_row_label(kind, node_id), (kind, node_id), tuple(values), spread, tuple(partial)))
    gains = []
    for name in ("collective_gain", "communication_gain"):
        gain_values = tuple(getattr(r, name).value for r in reports)
        gains.append(ComparedRow(name.replace("_", " "), (name, None), gain_values, mean_ci(gain_values)))
    return Comparison(
        labels=names,
        scenarios=tuple(r.scenario for r in reports),
        rows=tuple(rows),
        gains=tuple(gains),
        interval_methods=tuple(dict.fromkeys(r.interval_text() for r in reports)),
        unit=unit,
    )


def _num(value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _cells(row: ComparedRow, signed: bool) -> list[str]:
    """One cell per run; a value from a partial row is marked with PARTIAL_MARK."""
    marks = row.partial or (False,) * len(row.values)
    return [_num(v, signed) + (PARTIAL_MARK if mark else "") for v, mark in zip(row.values, marks)]


def _partial_note(comparison: Comparison) -> str:
    if not any(any(row.partial) for row in comparison.rows):
        return ""
    return f"{PARTIAL_MARK} scored on fewer than all eval rounds of that run (a node missed rounds)"


def _range_text(spread: Spread, signed: bool = False) -> str:
    if not math.isfinite(spread.low):
        return "n/a"
    return f"{_num(spread.low, signed)} .. {_num(spread.high, signed)}"


def gain_summary(row: ComparedRow, unit: Unit = "token") -> str:
    """'collective gain: mean +0.120 nats/token (95% CI -0.030 .. +0.270 across 5 runs), positive in 4 of 5'."""
    finite = [v for v in row.values if v is not None and math.isfinite(v)]
    positive = sum(v > 0 for v in finite)
    return (
        f"{row.label}: mean {_num(row.spread.mean, True)} {nll_unit(unit)} "
        f"(95% CI {_range_text(row.spread, True)} across {len(finite)} runs), positive in {positive} of {len(finite)}"
    )


def comparison_table(comparison: Comparison) -> Group:
    """Rows by runs (up to MAX_RUN_COLUMNS runs shown one by one), then mean and 95% CI across runs."""
    per_run = len(comparison.labels) <= MAX_RUN_COLUMNS
    scope = "seeds" if comparison.seed_sweep else "runs"
    title = (
        f"{comparison.scenarios[0]}: {len(comparison.labels)} seeds"
        if comparison.seed_sweep
        else f"{len(comparison.labels)} runs: " + ", ".join(dict.fromkeys(comparison.scenarios))
    )
    table = Table(title=title + f" (NLL in {nll_unit(comparison.unit)})", title_justify="left")
    table.add_column("row", no_wrap=True)
    if per_run:
        for label in comparison.labels:
            table.add_column(label, justify="right", no_wrap=True)
    else:
        table.add_column("min", justify="right")
        table.add_column("max", justify="right")
    table.add_column(f"mean over {scope}", justify="right", no_wrap=True)
    table.add_column("95% CI", justify="right", no_wrap=True)
    for index, row in enumerate((*comparison.rows, *comparison.gains)):
        signed = row in comparison.gains
        if per_run:
            cells = _cells(row, signed)
        else:
            finite = row.spread.values
            cells = [_num(min(finite), signed), _num(max(finite), signed)] if finite else ["-", "-"]
        style = "bold" if row.key[0] in ("collective", "collective_gain", "communication_gain") else None
        table.add_row(
            Text(row.label), *cells, _num(row.spread.mean, signed), _range_text(row.spread, signed),
            style=style, end_section=index == len(comparison.rows) - 1,
        )
    lines = [Text(gain_summary(gain, comparison.unit)) for gain in comparison.gains]
    if note := _partial_note(comparison):
        lines.append(Text(note))
    methods = "; ".join(comparison.interval_methods)
    lines.append(Text(f"each run's own CIs ({methods}): collective report RUN_DIR", style="dim"))
    return Group(table, *lines)


def comparison_markdown(comparison: Comparison) -> str:
    head = ["row", *comparison.labels, "mean", "95% CI"]
    out = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for row in (*comparison.rows, *comparison.gains):
        signed = row in comparison.gains
        cells = _cells(row, signed)
        out.append(
            "| " + " | ".join([row.label, *cells, _num(row.spread.mean, signed), _range_text(row.spread, signed)]) + " |"
        )
    out += ["", *(f"- {gain_summary(gain, comparison.unit)}" for gain in comparison.gains)]
    if note := _partial_note(comparison):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"
