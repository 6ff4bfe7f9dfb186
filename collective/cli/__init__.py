"""`collective`: the command line. Thin: parse, load, call the library, render.

Every user mistake ends in a one-paragraph message and a non-zero exit (2), never a
traceback; Ctrl-C exits 130 and leaves the run folder marked incomplete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from collective.scenario import ScenarioError, load_scenario, scenario_json_schema

log = logging.getLogger("collective")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _user_errors() -> tuple[type[BaseException], ...]:
    from collective.lm.corpus import CorpusError
    from collective.lm.models import ModelLoadError, TokenizerMismatchError
    from collective.run.runner import RunError

    errors: list[type[BaseException]] = [ScenarioError, RunError, ModelLoadError, TokenizerMismatchError, CorpusError]
    try:
        from topologies import TopologyError

        errors.append(TopologyError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _setup_logging(verbose: int) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(show_path=False)])
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")


def _pool(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from collective.lm.models import ModelPool, default_cache_dir

    cache = Path(args.cache_dir) if getattr(args, "cache_dir", None) else default_cache_dir(os.environ)
    return ModelPool(cache_dir=cache)


# ---------------------------------------------------------------------------- run


def _progress_bar(console: Console, total: int):  # type: ignore[no-untyped-def]
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[nll]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("rounds", total=total, nll="")

    def tick(event):  # type: ignore[no-untyped-def]
        progress.update(
            task,
            advance=1,
            description=f"round {event.round_index + 1}/{total} ({event.phase})",
            nll=f"collective {event.nll_collective:.3f} silent {event.nll_silent:.3f} nats/tok",
        )

    return progress, tick


def _plain_lines(console: Console, total: int):  # type: ignore[no-untyped-def]
    from collective.live.dashboard import round_line

    def line(event):  # type: ignore[no-untyped-def]
        console.print(round_line(event, total), highlight=False, soft_wrap=True)

    return line


def _controls(args: argparse.Namespace, prepared, console: Console) -> list[dict]:  # type: ignore[no-untyped-def]
    """Reuse prompts from an earlier run, or search the gcg controllers on the train part."""
    from collective.run.control import load_controls, search_controls
    from collective.run.runner import needs_search

    if args.controllers_from:
        prepared.control_ids.update(load_controls(Path(args.controllers_from), prepared.scenario))
        console.print(f"control prompts from {args.controllers_from}")
        return []
    if not needs_search(prepared.scenario):
        return []
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("[bold]GCG {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=args.quiet,
    ) as progress:
        tasks: dict[str, TaskID] = {}
        plain = not console.is_terminal and not args.quiet  # no bar off a terminal: a line per quarter
        began = time.perf_counter()

        def tick(node_id: str, step: int, total: int) -> None:
            if node_id not in tasks:
                tasks[node_id] = progress.add_task(f"node {node_id}", total=total)
            progress.update(tasks[node_id], completed=step, total=total)
            if plain and step > 0 and (step == total or step % max(1, total // 4) == 0):
                console.print(
                    f"GCG node {node_id}: step {step}/{total} ({time.perf_counter() - began:.0f} s)", highlight=False
                )

        searches = search_controls(prepared, progress=tick)
    decode = prepared.tokenizer.decode  # type: ignore[attr-defined]
    for found in searches:
        console.print(
            f"control for {found.node_id} ({found.objective}): {decode(found.control_ids)!r} "
            f"train loss {found.initial_loss:.3f} -> {found.loss:.3f} nats/token in {found.wall_seconds:.0f} s",
            highlight=False,
        )
    return [found.__dict__ for found in searches]


THREADS_HELP = (
    "torch CPU threads (default: torch's choice, one per core); 1 is far faster when other jobs share the "
    "cores (with one other job on 2 cores we saw a run's rounds take 26x longer with 2 threads than alone)"
)


def threads_arg(text: str) -> int:
    """argparse type of --threads: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from collective.report.report_view import report_table
    from collective.run.rundir import default_run_dir, run_id_for
    from collective.run.runner import prepare, run_prepared, run_start_event

    set_threads(args.threads)
    scenario = load_scenario(args.scenario)
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    run_dir = Path(args.out) if args.out else default_run_dir(scenario.name)
    with console.status(f"loading models and corpus for {scenario.name} ..."):
        prepared = prepare(scenario, _pool(args), base_dir=Path.cwd())
    searches = _controls(args, prepared, console)
    total = scenario.evaluation.warmup_rounds + scenario.eval_rounds
    live = console.is_terminal if args.live is None else args.live
    console.print(f"run folder: {run_dir}")
    with contextlib.ExitStack() as stack:
        executor = None
        runtime = "embedded"
        if args.bus and args.bus != "memory":
            from collective.distributed.coordinator import connect_executor

            executor = stack.enter_context(
                connect_executor(prepared, args.bus, run_id=run_id_for(run_dir), console=console, join_timeout=args.join_timeout)
            )
            runtime = "mqtt"
        if args.quiet:
            on_event = None
        elif live and console.is_terminal:
            from collective.live.display import LiveDisplay

            display = stack.enter_context(LiveDisplay(run_start_event(prepared, run_id_for(run_dir), runtime), console))
            on_event = display.update
        elif console.is_terminal:
            progress, on_event = _progress_bar(console, total)
            stack.enter_context(progress)
        else:
            on_event = _plain_lines(console, total)
        result = run_prepared(
            prepared, run_dir, executor=executor, runtime=runtime, on_event=on_event, control_searches=searches
        )
    if result.report is None:
        console.print(f"[yellow]stopped early; {run_dir} is marked incomplete[/]")
        return 1
    console.print(report_table(result.report))
    console.print(f"wrote {run_dir}/report.json, report.md, events.jsonl")
    return 0


# ---------------------------------------------------------------------------- validate, schema


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    failures = 0
    for path in args.files:
        try:
            scenario = load_scenario(path)
            from collective.run.runner import build_graph

            build_graph(scenario)
            if args.deep:
                from collective.run.runner import prepare

                prepare(scenario, _pool(args), base_dir=Path.cwd())
            console.print(f"[green]ok[/] {path}: {len(scenario.nodes)} nodes, {scenario.eval_rounds} eval rounds", highlight=False)
        except _user_errors() as exc:
            failures += 1
            message = str(exc)
            if not message.startswith(str(path)):
                message = f"{path}: {message}"
            console.print(f"[red]invalid[/] {message}", highlight=False)
    return EXIT_USER_ERROR if failures else 0


def cmd_schema(args: argparse.Namespace, console: Console) -> int:
    sys.stdout.write(json.dumps(scenario_json_schema(), indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collective",
        description="Simulate a collective of small language models talking over a low-bandwidth text bus, "
        "and measure whether it predicts the next token better than its members.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--cache-dir", help="model cache folder (default $COLLECTIVE_CACHE/models or ~/.cache/collective/models)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario and print the evaluation report")
    run.add_argument("scenario", help="scenario YAML file (see scenarios/)")
    run.add_argument("--out", help="run folder (default runs/<timestamp>-<name>/)")
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--threads", type=threads_arg, metavar="N", help=THREADS_HELP)
    run.add_argument("--controllers-from", metavar="RUN_DIR", help="reuse the control prompts an earlier run found (its controls.json)")
    run.add_argument("--live", dest="live", action="store_true", default=None, help="full-screen live view (default when stdout is a terminal)")
    run.add_argument("--no-live", dest="live", action="store_false", help="a progress bar (terminal) or plain lines instead of the live view")
    run.add_argument("--bus", metavar="URL", help="memory (default) or mqtt://user:pass@host:1883 / mqtts://... for a distributed run")
    run.add_argument("--join-timeout", type=float, default=300.0, help="seconds to wait for every node to join (distributed)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check scenario files; non-zero exit on any problem")
    validate.add_argument("files", nargs="+")
    validate.add_argument("--deep", action="store_true", help="also load models, tokenizers and corpus (slower)")
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the scenario JSON Schema (for editors)")
    schema.set_defaults(func=cmd_schema)
    from collective.cli import live; live.register(sub)  # noqa: E702, I001
    from collective.cli import distributed as distributed_cli; distributed_cli.register(sub)  # noqa: E702, I001
    from collective.cli import controllers; controllers.register(sub)  # noqa: E702, I001
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))  # pipes and files: no wrapped tables
    try:
        return int(args.func(args, console) or 0)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: any run folder is marked INCOMPLETE and holds no report")
        return EXIT_INTERRUPTED
    except _user_errors() as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
