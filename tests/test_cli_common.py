"""The command line's shared pieces (`collective.cli.common`) and the shape of the CLI package."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
from rich.console import Console

from collective.cli import EXIT_USER_ERROR, build_parser, common

CLI = Path(common.__file__).parent


def test_the_exit_codes_are_one_definition_shared_by_the_package():
    assert EXIT_USER_ERROR == common.EXIT_USER_ERROR == 2
    assert common.EXIT_INTERRUPTED == 130


@pytest.mark.parametrize("module", ["run", "sweep", "hostile", "validate", "live", "distributed", "controllers", "common"])
def test_no_subcommand_module_imports_another_or_the_package(module):
    tree = ast.parse((CLI / f"{module}.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    from_cli = {name for name in imported if name == "collective.cli" or name.startswith("collective.cli.")}
    assert from_cli <= {"collective.cli.common"}


def test_the_parser_lists_the_subcommands_in_the_order_of_the_help():
    parser = build_parser()
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert list(sub.choices) == ["run", "sweep", "hostile", "validate", "schema", "watch", "report", "node", "broker", "reach", "game"]


@pytest.mark.parametrize("text", ["1", "16"])
def test_threads_takes_a_whole_number_of_at_least_one(text):
    assert common.threads_arg(text) == int(text)


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5", ""])
def test_threads_refuses_anything_else(text):
    with pytest.raises(argparse.ArgumentTypeError, match="whole number >= 1"):
        common.threads_arg(text)


def test_the_model_cache_is_the_cache_dir_option_when_given(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLECTIVE_CACHE", str(tmp_path / "env"))
    assert common.model_cache_dir(argparse.Namespace(cache_dir=str(tmp_path / "given"))) == tmp_path / "given"


def test_the_model_cache_otherwise_follows_collective_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLECTIVE_CACHE", str(tmp_path / "env"))
    assert common.model_cache_dir(argparse.Namespace(cache_dir=None)) == tmp_path / "env" / "models"
    assert common.model_cache_dir(argparse.Namespace()) == tmp_path / "env" / "models"  # a command without the option
    assert common.model_pool(argparse.Namespace()).cache_dir == tmp_path / "env" / "models"


def test_the_progress_bar_shows_the_label_the_fields_and_optionally_the_time_left():
    console = Console(file=None, width=100, color_system=None)
    full = common.progress_bar(console, "rounds", fields=("nll",))
    short = common.progress_bar(console, "GCG {task.description}", time_left=False, disable=True)
    assert len(full.columns) == 6 and len(short.columns) == 4
    assert full.live.transient and short.disable


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0 s"), (89, "89 s"), (90, "1.5 min"), (600, "10.0 min")])
def test_durations_read_in_seconds_then_minutes(seconds, text):
    assert common.minutes(seconds) == text
