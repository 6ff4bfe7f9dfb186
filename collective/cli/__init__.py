"""`collective`: the command line. Thin: parse, load, call the library, render.

This module only builds the parser and runs a command. Each subcommand lives in its own
module with a `register(subparsers)` and its `cmd_*` functions (run, validate, live,
distributed, controllers, sweep, hostile); what they share is in `common`. Imports point one way:
this module -> subcommand modules -> common, and no subcommand imports another.

Every user mistake ends in a one-paragraph message on stderr (results go to stdout) and a
non-zero exit (2), never a traceback; Ctrl-C exits 130 and leaves the run folder marked incomplete.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from collective.cli import controllers, distributed, hostile, live, run, sweep, validate
from collective.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    print_error,
    setup_logging,
    user_errors,
)

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collective",
        description="Simulate a collective of small language models talking over a low-bandwidth text bus, "
        "and measure whether it predicts the next token better than its members.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--cache-dir", help="model cache folder (default $COLLECTIVE_CACHE/models or ~/.cache/collective/models)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (run, sweep, hostile, validate, live, distributed, controllers):  # the order of `collective --help`
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))  # pipes and files: no wrapped tables
    try:
        return int(args.func(args, console) or 0)
    except KeyboardInterrupt:
        print_error(console, "any run folder is marked INCOMPLETE and holds no report", label="interrupted:", style="yellow")
        return EXIT_INTERRUPTED
    except user_errors() as exc:
        print_error(console, str(exc))
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
