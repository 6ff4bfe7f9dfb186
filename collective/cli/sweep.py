"""`collective sweep`: one scenario over a grid of `--set` overrides and seeds.

Each cell (one combination of values and one seed) runs through `prepare` and
`run_prepared`, as `collective run` does, into its own folder under --out, with one model
pool so weights load once. Before any cell runs, the grid's size is printed (a grid over
--max-cells needs --yes) and every cell is validated and checked as far as it can be without
a model (graph, out-links, link overrides, speakers). A cell whose folder holds a finished
run of the same scenario and seed is skipped, so a sweep resumes where it stopped; a
finished run of anything else is refused, naming the cell and what differs; a folder
marked INCOMPLETE (Ctrl-C, a failure) is rerun. At the end summary.csv and summary.json
hold every cell and the mean over seeds, and gain_vs_bandwidth.png draws the mean gains
against the bytes sent, one line per policy; a finished cell that cannot be read back is
named, left out of the summary, and the exit code is 2.
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
    EXIT_USER_ERROR,
    add_threads_option,
    minutes,
    model_pool,
    output_folder,
    parse_seeds,
    print_error,
    progress_bar,
    set_threads,
)

if TYPE_CHECKING:
    from collective.evaluate.sweep import Cell, CellSummary


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sweep = sub.add_parser("sweep", help="run a scenario over a grid of overrides and seeds, and summarize")
    sweep.set_defaults(func=cmd_sweep)
    sweep.add_argument("scenario", help="scenario YAML file (see scenarios/)")
    sweep.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="PATH=v1,v2",
        help="a scenario key (dotted, e.g. bus.max_message_tokens; a number indexes a list) and the values to try, "
        "each read as YAML and split at commas outside brackets (a list is one value: exclude=[a,b],[c] tries two "
        "lists); repeat for a grid (each path once). Setting a `policy` or `kind` to another value replaces the "
        "mapping it is in, whatever the order of the --set options. The seed is set by --seeds, not --set",
    )
    sweep.add_argument("--seeds", default=None, help="comma-separated seeds, each once (default: the scenario's seed)")
    sweep.add_argument("--out", required=True, help="sweep folder: one run folder per cell, and the summary")
    sweep.add_argument(
        "--max-cells", type=int, default=MAX_CELLS, metavar="N",
        help=f"refuse a grid of more than N cells unless --yes is given (default {MAX_CELLS})",
    )
    sweep.add_argument("--yes", action="store_true", help="run a grid larger than --max-cells")
    add_threads_option(sweep)


MAX_CELLS = 1000  # a larger grid needs --yes: validating it alone takes minutes


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from collective.evaluate.sweep import check_grid, expand_grid, grid_size, parse_set
    from collective.scenario import ScenarioError, load_scenario

    set_threads(args.threads)
    base = load_scenario(args.scenario)  # the file itself must be valid first
    data = yaml.safe_load(Path(args.scenario).read_text(encoding="utf-8"))
    if not isinstance(data, dict):  # pragma: no cover - load_scenario already refused it
        raise ScenarioError(f"{args.scenario}: expected a YAML mapping")
    overrides = [parse_set(text) for text in args.sets]
    seeds = parse_seeds(args.seeds, base.seed)
    check_grid(overrides, seeds)
    size = grid_size(overrides, seeds)
    console.print(f"sweep of {size} cell(s) into {args.out}", highlight=False)
    if size > args.max_cells and not args.yes:
        raise ScenarioError(
            f"the grid has {size} cells, more than --max-cells {args.max_cells}: give --yes to run it (each cell is a "
            "whole run), or fewer values"
        )
    output_folder(args.out, "--out", make=False)  # a file there is refused before the grid is built
    cells = expand_grid(data, overrides, seeds, source=args.scenario, base_dir=Path(args.scenario).parent)
    check_cells(cells, args.scenario)
    out = output_folder(args.out, "--out")
    summaries, broken = _run_cells(cells, out, args, console)
    _write_summary(out, summaries)
    console.print(f"wrote {out}/summary.csv, summary.json and gain_vs_bandwidth.png", highlight=False)
    if broken:
        print_error(
            console, f"{len(broken)} finished cell(s) could not be read back and are left out of the summary: "
            + "; ".join(broken) + ". Delete those folders and run the sweep again to rerun them",
        )
        return EXIT_USER_ERROR
    return 0


def check_cells(cells: list[Cell], source: str) -> None:
    """Every check that needs no model, on every cell, before the first runs: the graph,
    link overrides, searched messages' out-links and budgets, speakers."""
    from collective.run.runner import RunError, build_graph

    for cell in cells:
        try:
            build_graph(cell.scenario)
        except RunError as exc:
            raise RunError(f"{source} ({cell.combination}, seed {cell.seed}): {exc}") from None


def _run_cells(cells: list[Cell], out: Path, args: argparse.Namespace, console: Console) -> tuple[list[CellSummary], list[str]]:
    """Run every unfinished cell; the summaries of the cells that read back whole, in grid
    order, and one line per cell that did not."""
    from collective.evaluate.sweep import BrokenCell, cell_folder, read_cell
    from collective.run.runner import RunError, prepare, search_and_run

    pool = model_pool(args)
    started = time.monotonic()
    with progress_bar(console, "cells", fields=("cell",), disable=not console.is_terminal) as progress:
        task = progress.add_task("cells", total=len(cells), cell="")
        for index, cell in enumerate(cells):
            folder = _reusable_folder(cell, out, args.scenario)
            progress.update(task, cell=cell.folder_name)
            if folder is not None:
                line = f"cell {index + 1}/{len(cells)} {folder.name}: already finished, skipped"
            else:
                folder = out / cell.folder_name
                (folder / "report.json").unlink(missing_ok=True)  # a run killed after writing it
                try:
                    prepared = prepare(cell.scenario, pool, base_dir=Path(args.scenario).parent)
                except RunError as exc:  # name the file and the cell, as collective run names the file
                    raise RunError(f"{args.scenario} ({cell.combination}, seed {cell.seed}): {exc}") from None
                search_and_run(prepared, folder)
                line = f"cell {index + 1}/{len(cells)} {cell.folder_name}: done ({minutes(time.monotonic() - started)} so far)"
            progress.advance(task)
            if not console.is_terminal:
                console.print(line, highlight=False, markup=False)
    summaries, broken = [], []
    for cell in cells:
        try:
            summaries.append(read_cell(cell, cell_folder(out, cell)))
        except BrokenCell as exc:
            broken.append(f"cell {cell.combination}, seed {cell.seed}: {exc}")
    return summaries, broken


def _reusable_folder(cell: Cell, out: Path, source: str) -> Path | None:
    """The folder of a finished run of exactly this cell (its own, or the one an older
    sweep named it by), None when there is none; a finished run of another scenario in
    the cell's folder is a RunError naming the cell and what differs."""
    from collective.evaluate.sweep import reuse_difference
    from collective.run.rundir import is_complete
    from collective.run.runner import RunError

    own, legacy = out / cell.folder_name, out / cell.legacy_folder_name
    if is_complete(own):
        difference = reuse_difference(cell, own)
        if difference is None:
            return own
        raise RunError(
            f"{source} ({cell.combination}, seed {cell.seed}): {own} holds a finished run of another scenario "
            f"({difference}); sweep into another --out, or delete that folder to rerun the cell"
        )
    if legacy != own and not own.exists() and is_complete(legacy) and reuse_difference(cell, legacy) is None:
        return legacy  # named by an older sweep; a run of another cell there is not this cell's
    return None


def _write_summary(out: Path, summaries: list[CellSummary]) -> None:
    from collective.evaluate.sweep import summary_csv, summary_json
    from collective.report.sweep_plot import SWEEP_PLOT, plot_gain_vs_bandwidth
    from collective.run.rundir import write_atomic

    write_atomic(out / "summary.csv", summary_csv(summaries))
    write_atomic(out / "summary.json", json.dumps(summary_json(summaries), indent=2) + "\n")
    plot_gain_vs_bandwidth(summaries, out / SWEEP_PLOT)
