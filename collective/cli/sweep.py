"""`collective sweep`: one scenario over a grid of `--set` overrides and seeds.

Each cell (one combination of values and one seed) runs through `prepare` and
`run_prepared`, as `collective run` does, into its own folder under --out, with one model
pool so weights load once. A cell whose folder holds a finished report is skipped, so a
sweep resumes where it stopped; a folder marked INCOMPLETE (Ctrl-C, a failure) is rerun.
At the end summary.csv and summary.json hold every cell and the mean over seeds, and
gain_vs_bandwidth.png draws the mean gains against the bytes sent, one line per policy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from rich.console import Console

from collective.cli.common import (
    add_threads_option,
    minutes,
    model_pool,
    parse_seeds,
    progress_bar,
    set_threads,
)

if TYPE_CHECKING:
    from collective.evaluate.sweep import Cell, CellSummary
    from collective.run.prepared import Prepared


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sweep = sub.add_parser("sweep", help="run a scenario over a grid of overrides and seeds, and summarize")
    sweep.set_defaults(func=cmd_sweep)
    sweep.add_argument("scenario", help="scenario YAML file (see scenarios/)")
    sweep.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="PATH=v1,v2",
        help="a scenario key (dotted, e.g. bus.max_message_tokens; a number indexes a list) and the values to try; "
        "repeat for a grid. Setting a `policy` or `kind` to another value replaces the mapping it is in",
    )
    sweep.add_argument("--seeds", default=None, help="comma-separated seeds (default: the scenario's seed)")
    sweep.add_argument("--out", required=True, help="sweep folder: one run folder per cell, and the summary")
    add_threads_option(sweep)


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from collective.evaluate.sweep import expand_grid, parse_set
    from collective.scenario import ScenarioError, load_scenario

    set_threads(args.threads)
    base = load_scenario(args.scenario)  # the file itself must be valid first
    data = yaml.safe_load(Path(args.scenario).read_text(encoding="utf-8"))
    if not isinstance(data, dict):  # pragma: no cover - load_scenario already refused it
        raise ScenarioError(f"{args.scenario}: expected a YAML mapping")
    overrides = [parse_set(text) for text in args.sets]
    cells = expand_grid(data, overrides, parse_seeds(args.seeds, base.seed), source=args.scenario, base_dir=Path(args.scenario).parent)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"sweep of {len(cells)} cell(s) into {out}")
    summaries = _run_cells(cells, out, args, console)
    _write_summary(out, summaries)
    console.print(f"wrote {out}/summary.csv, summary.json and gain_vs_bandwidth.png")
    return 0


def _run_cells(cells: list[Cell], out: Path, args: argparse.Namespace, console: Console) -> list[CellSummary]:
    """Run every unfinished cell; the summaries of all cells, in grid order."""
    from collective.evaluate.sweep import read_cell
    from collective.run.rundir import is_complete
    from collective.run.runner import RunError, prepare

    pool = model_pool(args)
    started = time.monotonic()
    with progress_bar(console, "cells", fields=("cell",), disable=not console.is_terminal) as progress:
        task = progress.add_task("cells", total=len(cells), cell="")
        for index, cell in enumerate(cells):
            folder = out / cell.folder_name
            progress.update(task, cell=cell.folder_name)
            if is_complete(folder):
                line = f"cell {index + 1}/{len(cells)} {cell.folder_name}: already finished, skipped"
            else:
                (folder / "report.json").unlink(missing_ok=True)  # a run killed after writing it
                try:
                    prepared = prepare(cell.scenario, pool, base_dir=Path(args.scenario).parent)
                except RunError as exc:  # name the file and the cell, as collective run names the file
                    raise RunError(f"{args.scenario} ({cell.combination}, seed {cell.seed}): {exc}") from None
                _run_cell(prepared, folder)
                line = f"cell {index + 1}/{len(cells)} {cell.folder_name}: done ({minutes(time.monotonic() - started)} so far)"
            progress.advance(task)
            if not console.is_terminal:
                console.print(line, highlight=False)
    return [read_cell(cell, out / cell.folder_name) for cell in cells]


def _run_cell(prepared: Prepared, folder: Path) -> None:
    """One cell as `collective run` does it: its controllers searched on the train part
    first (their prompts and searches go into the cell's controls.json), then the rounds."""
    from collective.run.control import search_controls
    from collective.run.runner import needs_search, run_prepared

    searches = search_controls(prepared) if needs_search(prepared.scenario) else []
    run_prepared(prepared, folder, control_searches=searches)


def _write_summary(out: Path, summaries: list[CellSummary]) -> None:
    from collective.evaluate.sweep import summary_csv, summary_json
    from collective.report.sweep_plot import SWEEP_PLOT, plot_gain_vs_bandwidth
    from collective.run.rundir import write_atomic

    write_atomic(out / "summary.csv", summary_csv(summaries))
    write_atomic(out / "summary.json", json.dumps(summary_json(summaries), indent=2) + "\n")
    plot_gain_vs_bandwidth(summaries, out / SWEEP_PLOT)
