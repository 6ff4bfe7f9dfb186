"""What the subcommands share: exit codes, user errors and how they are printed (to stderr,
user text never read as Rich markup), logging, the thread option, --seeds, output folders,
the model pool and the progress bar.

Each subcommand module (run, validate, live, distributed, controllers) imports from here and
from the library, never from another subcommand module or from `collective.cli` itself, so
the CLI's imports point one way: `collective.cli` -> subcommand modules -> this module.
Heavy imports (torch, transformers) wait until a function that needs them runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

if TYPE_CHECKING:
    from collective.lm.models import ModelPool

EXIT_USER_ERROR = 2  # a user mistake: one paragraph says what to do
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


# ---------------------------------------------------------------------------- errors, logging


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is meant for the user: printed as one line, never a traceback."""
    from collective.lm.corpus import CorpusError
    from collective.lm.models import ModelLoadError, TokenizerMismatchError
    from collective.run.runner import RunError
    from collective.scenario import ScenarioError

    errors: list[type[BaseException]] = [ScenarioError, RunError, ModelLoadError, TokenizerMismatchError, CorpusError]
    try:
        from topologies import TopologyError

        errors.append(TopologyError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def error_console(console: Console) -> Console:
    """The console errors and warnings go to: stderr, as wide as `console` (results stay on stdout)."""
    return Console(stderr=True, width=console.width if not console.is_terminal else None)


def print_error(console: Console, message: str, *, label: str = "error:", style: str = "red") -> None:
    """`label message` on stderr; the message is printed as written (brackets in a value,
    a path or a host-file example are text, not Rich markup)."""
    error_console(console).print(Text.assemble((label, style), " ", message), highlight=False, soft_wrap=True)


def setup_logging(verbose: int) -> None:
    """Rich log lines on stderr at WARNING (-v INFO, -vv DEBUG); Hugging Face's own chatter silenced."""
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = RichHandler(show_path=False, console=Console(stderr=True), markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler])
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")


# ---------------------------------------------------------------------------- threads


THREADS_HELP = (
    "torch CPU threads (default: torch's choice, one per core); 1 is far faster when other jobs share the "
    "cores (with one other job on 2 cores we saw a run's rounds take 26x longer with 2 threads than alone)"
)


def threads_arg(text: str) -> int:
    """argparse type of --threads: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """The --threads N option of the commands that run models in this process."""
    parser.add_argument("--threads", type=threads_arg, metavar="N", help=THREADS_HELP)


def set_threads(threads: int | None) -> None:
    """torch's CPU thread count, when the user chose one (None: torch's own choice)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- seeds


def parse_seeds(text: str | None, default: int) -> list[int]:
    """--seeds 0,1,2 (None: the scenario's own seed)."""
    from collective.scenario import ScenarioError

    if text is None:
        return [default]
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ScenarioError(f"--seeds {text!r}: expected comma-separated whole numbers, e.g. 0,1,2") from None
    repeated = [seed for index, seed in enumerate(seeds) if seed in seeds[:index]]
    if repeated:
        raise ScenarioError(f"--seeds {text!r}: seed {repeated[0]} is given twice; give each seed once")
    return seeds


# ---------------------------------------------------------------------------- output folders


def output_folder(path: str, option: str, *, make: bool = True) -> Path:
    """The folder `path`, made if needed (with `make`); a ScenarioError naming `option`
    when it is a file or lies under one (or cannot be made)."""
    from collective.scenario import ScenarioError

    folder = Path(path)
    for above in [folder, *folder.parents]:
        if above.exists() and not above.is_dir():
            where = "is a file" if above == folder else f"lies under {above}, which is a file"
            raise ScenarioError(f"{option} {path}: {where}; give a folder (it is made if missing)")
    try:
        if make:
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScenarioError(f"{option} {path}: cannot make this folder ({exc.strerror})") from None
    return folder


# ---------------------------------------------------------------------------- models


def model_cache_dir(args: argparse.Namespace) -> Path:
    """--cache-dir, else $COLLECTIVE_CACHE/models, else ~/.cache/collective/models.

    The library never reads the environment; this is where the CLI hands it `os.environ`.
    """
    from collective.lm.models import default_cache_dir

    given = getattr(args, "cache_dir", None)
    return Path(given) if given else default_cache_dir(os.environ)


def model_pool(args: argparse.Namespace) -> ModelPool:
    """A model pool that caches downloads in `model_cache_dir(args)`."""
    from collective.lm.models import ModelPool

    return ModelPool(cache_dir=model_cache_dir(args))


# ---------------------------------------------------------------------------- progress


def progress_bar(
    console: Console, label: str, *, fields: tuple[str, ...] = (), time_left: bool = True, disable: bool = False
) -> Progress:
    """A transient bar: `label` (may use {task.description}), bar, done/total, each of the
    task's `fields`, time elapsed and, with `time_left`, the time remaining."""
    columns: list[ProgressColumn] = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{{task.fields[{name}]}}") for name in fields]
    columns.append(TimeElapsedColumn())
    if time_left:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=True, disable=disable)


def minutes(seconds: float) -> str:
    """A duration for a plain progress line: seconds below 90, else minutes."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
