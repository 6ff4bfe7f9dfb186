"""`collective run`'s round display: what shows each round, chosen by --quiet, --live and the terminal."""

from __future__ import annotations

import argparse
import contextlib
import io
from types import SimpleNamespace

from rich.console import Console

from collective.cli.run import _round_display, _round_progress
from collective.records import RoundEvent

# the display reads only the round counts from the prepared run
PREPARED = SimpleNamespace(scenario=SimpleNamespace(evaluation=SimpleNamespace(warmup_rounds=1), eval_rounds=2))


def _event(round_index: int) -> RoundEvent:
    return RoundEvent(
        run_id="r", round_index=round_index, phase="warmup" if round_index == 0 else "eval", start_token=0,
        n_tokens=8, nodes=[], messages=[], nll_collective=2.5, nll_silent=2.75, nll_reference=2.0,
        wall_seconds=0.5, elapsed_seconds=1.0,
    )


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, color_system=None, force_terminal=terminal), out


def _args(quiet: bool = False, live: bool | None = None) -> argparse.Namespace:
    return argparse.Namespace(quiet=quiet, live=live)


def test_quiet_shows_nothing():
    console, _ = _console(terminal=True)
    with contextlib.ExitStack() as stack:
        assert _round_display(stack, _args(quiet=True), PREPARED, "r", "embedded", console) is None  # type: ignore[arg-type]


def test_off_a_terminal_each_round_is_one_plain_line():
    console, out = _console(terminal=False)
    with contextlib.ExitStack() as stack:
        on_event = _round_display(stack, _args(), PREPARED, "r", "embedded", console)  # type: ignore[arg-type]
        assert on_event is not None
        on_event(_event(0))
        on_event(_event(1))
    assert out.getvalue().splitlines() == [
        "round 1/3 warmup collective=2.5000 silent=2.7500 reference=2.0000 wall=0.50s",
        "round 2/3 eval collective=2.5000 silent=2.7500 reference=2.0000 wall=0.50s",
    ]


def test_no_live_on_a_terminal_is_a_progress_bar_with_the_latest_nlls():
    console, _ = _console(terminal=True)
    progress, tick = _round_progress(console, 3)
    with progress:
        tick(_event(0))
    task = progress.tasks[0]
    assert (task.completed, task.total) == (1, 3)
    assert task.description == "round 1/3 (warmup)"
    assert task.fields["nll"] == "collective 2.500 silent 2.750 nats/tok"


def test_the_display_keeps_the_bar_running_until_the_run_ends():
    console, out = _console(terminal=True)
    with contextlib.ExitStack() as stack:
        on_event = _round_display(stack, _args(live=False), PREPARED, "r", "embedded", console)  # type: ignore[arg-type]
        assert on_event is not None and console._live_stack  # the bar is live while the rounds run
        on_event(_event(0))
    assert not console._live_stack
    assert "wall=" not in out.getvalue()  # a bar, not the plain lines
