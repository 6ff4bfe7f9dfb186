"""Where a run's time goes: the split of a scenario's rounds into scoring, decoding, the
reference pass, pools and bookkeeping, plus loading and the report.

Runs the scenario end to end as `collective run` does (prepare, rounds, report.json, plots),
with wall-clock timers wrapped around the library functions that do each part of a round:

- scoring, rows without the bus: `score_items` from `collective.run.node` (isolated/plain rows)
- scoring, speakers' rows: `score_and_speak` minus its decoding (the teacher-forced pass over
  the collective rows and the prefill of the speak prompt onto its KV cache)
- decoding: `collective.lm.decoding.decode` (one token a step for every speaking row)
- reference: `score_items` from `collective.run.engine` (the full-view reference pass)
- inboxes (firewalls) and message search: `_read_inboxes` and `_searched` of `collective.run.node`
- pools: `RoundEngine.pool` minus the reference pass
- bookkeeping: the rest of the round loop (requests, views, bus, book, events)

    python bench/profile_round.py scenarios/quickstart.yaml --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import collective.lm.decoding as decoding
import collective.run.engine as engine_mod
import collective.run.node as node_mod
from collective.lm.models import ModelPool
from collective.run.runner import prepare, run_prepared
from collective.scenario import load_scenario

SPENT: defaultdict[str, float] = defaultdict(float)


def timed(owner: Any, name: str, label: str) -> None:
    """Replace owner.name by a wrapper that adds its wall time to SPENT[label]."""
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - began

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    timed(node_mod, "score_items", "scoring, rows without the bus")
    timed(node_mod, "score_and_speak", "score_and_speak")
    timed(decoding, "decode", "decoding")
    timed(engine_mod, "score_items", "reference pass")
    timed(node_mod, "_read_inboxes", "inboxes (firewalls)")
    timed(node_mod, "_searched", "message search")
    timed(engine_mod.RoundEngine, "pool", "pool")
    timed(engine_mod.RoundEngine, "run", "rounds")
    began = time.perf_counter()
    scenario = load_scenario(Path(args.scenario))
    prepared = prepare(scenario, ModelPool(), base_dir=Path.cwd())
    loaded = time.perf_counter() - began
    rounds = scenario.evaluation.warmup_rounds + scenario.eval_rounds
    with tempfile.TemporaryDirectory() as tmp:
        run_prepared(prepared, Path(args.out or Path(tmp) / "run"))
    total = time.perf_counter() - began
    split = {
        "scoring, rows without the bus": SPENT["scoring, rows without the bus"],
        "scoring, speakers' rows + speak prefill": SPENT["score_and_speak"] - SPENT["decoding"],
        "decoding (messages)": SPENT["decoding"],
        "reference pass": SPENT["reference pass"],
        "inboxes (firewalls)": SPENT["inboxes (firewalls)"],
        "message search": SPENT["message search"],
        "pools": SPENT["pool"] - SPENT["reference pass"],
    }
    split["bookkeeping (views, bus, book, events)"] = SPENT["rounds"] - sum(split.values())
    print(f"{scenario.name}: {rounds} rounds on {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; wall {total:.1f} s = load {loaded:.1f} s + rounds "
          f"{SPENT['rounds']:.1f} s + report {total - loaded - SPENT['rounds']:.1f} s")
    print("\n| part of a round | s/round | share |\n| --- | ---: | ---: |")
    for label, seconds in split.items():
        print(f"| {label} | {seconds / rounds:.3f} | {100 * seconds / SPENT['rounds']:.0f}% |")
    print(f"| all | {SPENT['rounds'] / rounds:.3f} | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
