"""`collective validate` and `collective schema`: check scenario files, print their JSON Schema.

validate loads each file and builds its topology, which also checks that every `bus.links`
override names one of its links (with --deep it loads the models, tokenizers and corpus too); every bad file gets one line naming the file, and the exit code is 2 when any
file is bad. schema prints the scenario JSON Schema for editors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from collective.cli.common import EXIT_USER_ERROR, model_pool, print_error, user_errors
from collective.scenario import load_scenario, scenario_json_schema


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `validate` and `schema` subcommands to the main parser's subparsers."""
    validate = sub.add_parser("validate", help="check scenario files; non-zero exit on any problem")
    validate.add_argument("files", nargs="+")
    validate.add_argument("--deep", action="store_true", help="also load models, tokenizers and corpus (slower)")
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the scenario JSON Schema (for editors)")
    schema.set_defaults(func=cmd_schema)


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    failures = 0
    for path in args.files:
        try:
            scenario = load_scenario(path)
            from collective.run.runner import build_graph

            build_graph(scenario)
            if args.deep:
                from collective.run.runner import prepare

                prepare(scenario, model_pool(args), base_dir=Path.cwd())
            console.print(Text.assemble(("ok", "green"), f" {path}: {len(scenario.nodes)} nodes, {scenario.eval_rounds} eval rounds"), highlight=False)
        except user_errors() as exc:
            failures += 1
            message = str(exc)
            if not message.startswith(str(path)):
                message = f"{path}: {message}"
            print_error(console, message, label="invalid")
    return EXIT_USER_ERROR if failures else 0


def cmd_schema(args: argparse.Namespace, console: Console) -> int:
    sys.stdout.write(json.dumps(scenario_json_schema(), indent=2) + "\n")
    return 0
