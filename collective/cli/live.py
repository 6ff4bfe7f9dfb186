"""`collective watch` and `collective report`: the run records seen again.

Thin like the rest of the CLI: parse, read the run folder(s), call the library, render.
`register(subparsers)` adds both commands to the main parser. User mistakes (no such
folder, no report yet, an unreadable events file, a broker that cannot be reached or has
no such run) print one paragraph and exit 2. `watch --broker URL --run RUN_ID` reads a
distributed run's records from its broker (`collective.distributed.subscribe_events`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console

from collective.cli.common import EXIT_USER_ERROR, print_error
from collective.records import Report, RunRecord

BROKER_START_TIMEOUT_S = 30.0  # watch --broker: how long to wait for any sign of the run


class WatchError(Exception):
    """Something the user asked of watch/report cannot be done; the message says why."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `watch` and `report` subcommands; each one's --help description is its docstring."""
    watch = subparsers.add_parser(
        "watch",
        help="replay a run from its folder (following it while it runs), or attach to a distributed run, in the live view",
        description=cmd_watch.__doc__,
    )
    watch.add_argument("run_dir", nargs="?", help="run folder (holds events.jsonl)")
    watch.add_argument("--speed", type=float, default=5.0, help="replay pace as a multiple of the run's round times (0: no pauses; default 5; --broker shows rounds as they come)")
    watch.add_argument("--follow", dest="follow", action="store_true", default=None, help="keep reading as the run writes (default while the folder is INCOMPLETE)")
    watch.add_argument("--no-follow", dest="follow", action="store_false", help="show what the file holds now and stop")
    watch.add_argument(
        "--idle-timeout",
        type=float,
        help="stop following after this many seconds without a new event; with --broker also how long to wait "
        f"for the run to show up (default {BROKER_START_TIMEOUT_S:g} s)",
    )
    watch.add_argument("--live", dest="live", action="store_true", default=None, help="full-screen view (default on a terminal)")
    watch.add_argument("--no-live", dest="live", action="store_false", help="one plain line per round")
    watch.add_argument(
        "--broker",
        metavar="URL",
        help="attach read-only to a distributed run through its MQTT broker: mqtt://watcher:PASSWORD@host:1883 "
        "or mqtts://...:8883 (?ca=FILE)",
    )
    watch.add_argument("--run", dest="run_id", metavar="RUN_ID", help="the distributed run to attach to (with --broker): the name of the coordinator's run folder")
    watch.set_defaults(func=cmd_watch)

    report = subparsers.add_parser(
        "report", help="print a run's report again, compare several runs side by side, or summarize a sweep folder",
        description=cmd_report.__doc__
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--markdown", action="store_true", help="print Markdown instead of a table")
    report.add_argument(
        "--paired", nargs="*", metavar="CELL",
        help="compare two runs on their shared eval rounds (A - B of the collective NLL, per seed and over seeds): "
        "with a sweep folder, name two cells as PATH=VALUE[,PATH=VALUE] (e.g. --paired "
        "node_defaults.message.policy=relay node_defaults.message.policy=shuffle), paired by seed; with run "
        "folders, give them as A B [A B ...] (each two one pair) and --paired alone",
    )
    report.set_defaults(func=cmd_report)


# ---------------------------------------------------------------------------- watch


def _broker_events(url: str, run_id: str, idle_timeout: float | None, console: Console) -> Iterator[RunRecord]:
    """The distributed run's records from its broker; broker trouble becomes a WatchError."""
    try:
        from collective.distributed import subscribe_events
        from collective.distributed.mqtt import DistributedError, parse_broker_url
    except ImportError as exc:  # pragma: no cover - aiomqtt is a dependency
        raise WatchError(f"watch --broker needs the distributed runtime, which does not import here ({exc})") from None
    try:
        events = subscribe_events(
            url, run_id, start_timeout=idle_timeout or BROKER_START_TIMEOUT_S, idle_timeout=idle_timeout
        )
    except DistributedError as exc:
        raise WatchError(f"cannot watch run {run_id}: {exc}") from None
    console.print(
        f"watching run {run_id} on {parse_broker_url(url).display()} (Ctrl-C stops watching, not the run)",
        highlight=False,
        soft_wrap=True,
    )
    return _as_watch_errors(events, DistributedError)


def _as_watch_errors(events: Iterator[RunRecord], errors: type[Exception]) -> Iterator[RunRecord]:
    try:
        yield from events
    except errors as exc:
        raise WatchError(str(exc)) from None


def cmd_watch(args: argparse.Namespace, console: Console) -> int:
    """Show a run's events in the live view: a finished run is replayed at --speed times its own
    pace, a running one is followed as it writes events.jsonl. With --broker URL --run RUN_ID it
    attaches read-only to a distributed run through its MQTT broker: the run's start record, then
    each round as the coordinator finishes it, until the run ends (with `collective broker`, log in
    as the watcher user)."""
    from collective.live.display import watch
    from collective.live.replay import ReplayError, run_events, run_is_going

    events: Iterable[RunRecord] = ()
    speed = max(0.0, args.speed)
    try:
        if args.broker:
            if not args.run_id:
                raise WatchError("watch --broker URL needs --run RUN_ID (the coordinator prints it)")
            events = _broker_events(args.broker, args.run_id, args.idle_timeout, console)
            run_dir = None
            speed = 0.0  # live records come at the run's own pace
        else:
            if not args.run_dir:
                raise WatchError("watch needs a run folder (or --broker URL --run RUN_ID)")
            run_dir = Path(args.run_dir)
            if not (run_dir / "events.jsonl").exists() and not run_is_going(run_dir):
                raise WatchError(f"{run_dir}: no events.jsonl here; is this a run folder?")
            events = run_events(run_dir, follow=args.follow, idle_timeout=args.idle_timeout)
        try:
            state = watch(events, console, speed=speed, live=args.live)
        except KeyboardInterrupt:
            console.print("stopped watching (the run itself goes on)")
            return 0
    except (WatchError, ReplayError) as exc:
        print_error(console, str(exc))
        return EXIT_USER_ERROR
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # a broker subscription disconnects
    if run_dir is not None and (run_dir / "report.json").exists():
        from collective.report.report_view import report_table

        console.print(report_table(Report.model_validate_json((run_dir / "report.json").read_text(encoding="utf-8"))))
    elif state.end is None:
        console.print(f"[yellow]the run has not ended[/] ({state.rounds_done} rounds so far)", highlight=False)
    return 0


# ---------------------------------------------------------------------------- report


def _is_sweep(folder: Path) -> bool:
    """A `collective sweep` folder: its summary.json and no report of its own."""
    return (folder / "summary.json").exists() and not (folder / "report.json").exists()


def _sweep_report(folder: Path, markdown: bool, console: Console) -> int:
    import json

    from collective.report.sweep_view import sweep_markdown, sweep_table

    path = folder / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WatchError(f"{path}: not a whole sweep summary ({str(exc).splitlines()[0]}); run the sweep again to rewrite it") from None
    if not isinstance(summary, dict) or not summary.get("cells"):
        raise WatchError(f"{path}: the summary holds no cells; run the sweep again to rewrite it")
    if markdown:
        console.out(sweep_markdown(summary), highlight=False)
    else:
        console.print(sweep_table(summary))
    return 0


def _paired_report(args: argparse.Namespace, console: Console) -> int:
    """`--paired`: two cells of a sweep folder, or run folders two by two; A - B per pair and over pairs.
    Runs that do not share their eval tokens and seed are refused (a PairingError, exit 2)."""
    from collective.evaluate.paired import compare_cells, read_cell_run, sweep_pairs
    from collective.report.sweep_view import paired_markdown, paired_table

    folders = [Path(path) for path in args.run_dirs]
    if len(folders) == 1 and _is_sweep(folders[0]):
        if len(args.paired) != 2:
            raise WatchError(f"report {folders[0]} --paired needs two cells (PATH=VALUE[,PATH=VALUE]), got {len(args.paired)}")
        label_a, label_b = args.paired
        pairs = sweep_pairs(folders[0], label_a, label_b)
    else:
        if args.paired or len(folders) % 2:
            raise WatchError("report RUN_A RUN_B [RUN_A RUN_B ...] --paired takes run folders two by two (and --paired alone)")
        pairs = [(read_cell_run(a), read_cell_run(b)) for a, b in zip(folders[::2], folders[1::2])]
        label_a, label_b = folders[0].name, folders[1].name
    comparison = compare_cells(pairs, label_a=label_a, label_b=label_b)
    if args.markdown:
        console.out(paired_markdown(comparison), highlight=False)
    else:
        console.print(paired_table(comparison))
    return 0


def _load_report(run_dir: Path) -> Report:
    """The report.json of a run folder; a missing or unreadable one is a WatchError that says why."""
    from pydantic import ValidationError

    from collective.records import INCOMPLETE

    path = run_dir / "report.json"
    if not path.exists():
        why = ""
        if (run_dir / INCOMPLETE).exists():
            why = ": " + (run_dir / INCOMPLETE).read_text(encoding="utf-8").strip()
        elif not run_dir.is_dir():
            why = ": no such folder"
        raise WatchError(f"{run_dir} has no report.json{why}")
    try:
        return Report.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise WatchError(f"{path}: not a report this collective reads ({exc.errors()[0]['msg']})") from None


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """One folder: its report table. Several: every row and both gains side by side, with the
    mean and a 95% t-interval across the runs (for seed sweeps and ablations). A `collective
    sweep` folder: its summary, cell by cell and the mean over seeds."""
    from collective.evaluate.compare import compare_reports, comparison_markdown, comparison_table
    from collective.report.report_view import report_markdown, report_table

    if args.paired is not None:
        try:
            return _paired_report(args, console)
        except WatchError as exc:
            print_error(console, str(exc))
            return EXIT_USER_ERROR
    try:
        if len(args.run_dirs) == 1 and _is_sweep(Path(args.run_dirs[0])):
            return _sweep_report(Path(args.run_dirs[0]), args.markdown, console)
        reports = [_load_report(Path(path)) for path in args.run_dirs]
    except WatchError as exc:
        print_error(console, str(exc))
        return EXIT_USER_ERROR
    if len(reports) == 1:
        if args.markdown:
            console.out(report_markdown(reports[0]), highlight=False)
        else:
            console.print(report_table(reports[0]))
        return 0
    comparison = compare_reports(reports)
    if args.markdown:
        console.out(comparison_markdown(comparison), highlight=False)
    else:
        console.print(comparison_table(comparison))
    return 0
