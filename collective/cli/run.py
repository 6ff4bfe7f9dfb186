"""`collective run`: load a scenario, search (or reuse) the control prompts it asks for, run
its rounds in this process or over an MQTT broker, and print the evaluation report.

Thin: parse, load, call `collective.run.runner`, render. How the rounds are shown depends
on where the output goes: the full-screen live view on a terminal (default), a progress bar
(--no-live), or one plain line per round when the output is a file or a pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import Progress, TaskID

from collective.cli.common import (
    add_threads_option,
    model_pool,
    print_error,
    progress_bar,
    set_threads,
)
from collective.scenario import load_scenario

if TYPE_CHECKING:
    from collective.records import ControlSearch, RoundEvent, Runtime
    from collective.run.prepared import Prepared

OnRound = Callable[["RoundEvent"], None]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `run` subcommand to the main parser's subparsers."""
    run = sub.add_parser("run", help="run a scenario and print the evaluation report")
    run.add_argument("scenario", help="scenario YAML file (see scenarios/)")
    run.add_argument("--out", help="run folder (default runs/<timestamp>-<name>/)")
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    add_threads_option(run)
    run.add_argument("--controllers-from", metavar="RUN_DIR", help="reuse the control prompts an earlier run found (its controls.json)")
    run.add_argument("--live", dest="live", action="store_true", default=None, help="full-screen live view (default when stdout is a terminal)")
    run.add_argument("--no-live", dest="live", action="store_false", help="a progress bar (terminal) or plain lines instead of the live view")
    run.add_argument("--bus", metavar="URL", help="memory (default) or mqtt://user:pass@host:1883 / mqtts://... for a distributed run")
    run.add_argument("--join-timeout", type=float, default=300.0, help="seconds to wait for every node to join (distributed)")
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from collective.report.report_view import report_table
    from collective.run.rundir import default_run_dir, run_id_for
    from collective.run.runner import RunError, prepare, run_prepared

    set_threads(args.threads)
    scenario = load_scenario(args.scenario)
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    run_dir = Path(args.out) if args.out else default_run_dir(scenario.name)
    with console.status(f"loading models and corpus for {scenario.name} ..."):
        try:
            prepared = prepare(scenario, model_pool(args), base_dir=Path.cwd())
        except RunError as exc:  # name the file, as validation errors do
            raise RunError(f"{args.scenario}: {exc}") from None
    searches = _controls(args, prepared, console)
    console.print(f"run folder: {run_dir}")
    with contextlib.ExitStack() as stack:
        executor = None
        runtime: Runtime = "embedded"
        if args.bus and args.bus != "memory":
            executor = stack.enter_context(_mqtt_executor(prepared, args, run_id_for(run_dir), console))
            runtime = "mqtt"
        on_event = _round_display(stack, args, prepared, run_id_for(run_dir), runtime, console)
        result = run_prepared(
            prepared, run_dir, executor=executor, runtime=runtime, on_event=on_event, control_searches=searches
        )
    if result.report is None:
        print_error(console, f"{run_dir} is marked incomplete", label="stopped early:", style="yellow")
        return 1
    console.print(report_table(result.report))
    console.print(f"wrote {run_dir}/report.json, report.md, events.jsonl")
    return 0


def _mqtt_executor(
    prepared: Prepared, args: argparse.Namespace, run_id: str, console: Console
) -> contextlib.AbstractContextManager[Any]:
    """The one call into the distributed coordinator: publish the run on --bus, wait for its nodes."""
    from collective.distributed.coordinator import connect_executor

    def say(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    return connect_executor(prepared, args.bus, run_id=run_id, on_status=say, join_timeout=args.join_timeout)


# ---------------------------------------------------------------------------- showing the rounds


def _round_display(
    stack: contextlib.ExitStack, args: argparse.Namespace, prepared: Prepared, run_id: str, runtime: Runtime,
    console: Console,
) -> OnRound | None:
    """What shows each round: nothing (--quiet), the live view, a progress bar or a plain line."""
    from collective.run.runner import run_start_event

    total = prepared.scenario.evaluation.warmup_rounds + prepared.scenario.eval_rounds
    live = console.is_terminal if args.live is None else args.live
    if args.quiet:
        return None
    if live and console.is_terminal:
        from collective.live.display import LiveDisplay

        display = stack.enter_context(LiveDisplay(run_start_event(prepared, run_id, runtime), console))
        on_event: OnRound = display.update
        return on_event
    if console.is_terminal:
        progress, tick = _round_progress(console, total)
        stack.enter_context(progress)
        return tick
    return _round_lines(console, total)


def _round_progress(console: Console, total: int) -> tuple[Progress, OnRound]:
    """A progress bar over the rounds, with the latest round's collective and silent NLL."""
    progress = progress_bar(console, "{task.description}", fields=("nll",))
    task = progress.add_task("rounds", total=total, nll="")

    def tick(event: RoundEvent) -> None:
        progress.update(
            task,
            advance=1,
            description=f"round {event.round_index + 1}/{total} ({event.phase})",
            nll=f"collective {event.nll_collective:.3f} silent {event.nll_silent:.3f} nats/{'byte' if event.unit == 'byte' else 'tok'}",
        )

    return progress, tick


def _round_lines(console: Console, total: int) -> OnRound:
    """One plain line per round, for output that is not a terminal (a file, a pipe)."""
    from collective.live.dashboard import round_line

    def line(event: RoundEvent) -> None:
        console.print(round_line(event, total), highlight=False, soft_wrap=True)

    return line


# ---------------------------------------------------------------------------- control prompts


def _controls(args: argparse.Namespace, prepared: Prepared, console: Console) -> list[ControlSearch]:
    """Reuse prompts from an earlier run, or search the gcg controllers on the train part."""
    from collective.run.control import load_controls, search_controls
    from collective.run.runner import needs_search

    if args.controllers_from:
        prepared.control_ids.update(load_controls(Path(args.controllers_from), prepared.scenario))
        console.print(f"control prompts from {args.controllers_from}")
        return []
    if not needs_search(prepared.scenario):
        return []
    with progress_bar(console, "GCG {task.description}", time_left=False, disable=args.quiet) as progress:
        tick = _search_ticker(progress, console, plain=not console.is_terminal and not args.quiet)
        searches = search_controls(prepared, progress=tick)
    for found in searches:
        held_out = "" if found.validation_loss is None else (
            f", validation {found.initial_validation_loss:.3f} -> {found.validation_loss:.3f}"
            + ("" if found.stopped_at_step is None else f" (stopped after step {found.stopped_at_step})")
        )
        console.print(
            f"control for {found.node_id} ({found.objective}): {prepared.node_tokenizer(found.node_id).decode(found.control_ids)!r} "
            f"train loss {found.initial_loss:.3f} -> {found.loss:.3f}{held_out} nats/token in {found.wall_seconds:.0f} s",
            highlight=False,
        )
    return searches


def _search_ticker(progress: Progress, console: Console, *, plain: bool) -> Callable[[str, int, int], None]:
    """The GCG progress callback: a bar per node, and with `plain` (no bar off a terminal) a
    line per quarter of each node's steps."""
    tasks: dict[str, TaskID] = {}
    began = time.perf_counter()

    def tick(node_id: str, step: int, total: int) -> None:
        if node_id not in tasks:
            tasks[node_id] = progress.add_task(f"node {node_id}", total=total)
        progress.update(tasks[node_id], completed=step, total=total)
        if plain and step > 0 and (step == total or step % max(1, total // 4) == 0):
            console.print(
                f"GCG node {node_id}: step {step}/{total} ({time.perf_counter() - began:.0f} s)", highlight=False
            )

    return tick
