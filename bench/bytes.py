"""What scoring in bytes costs a round (issue 20): the byte-unit path against the token-unit path
on the same same-tokenizer collective, and a mixed collective's cost per node and round.

- same tokenizer: `scenarios/mixed-models.yaml` with every node on SmolLM2-135M, run once with
  `evaluation.unit: token` (rows over the stream's tokens, top-64 kept) and once with `unit: byte`
  (every row the next-byte distribution at each byte of the round, `collective.lm.byte_rows`);
  same views, relays, rounds. A round's time is the whole engine round: the members' rows and
  messages (`EmbeddedExecutor.run_round`), the pools and the full-view reference.
- mixed: the scenario as shipped (2 SmolLM2 + 2 Gemma 3 270M nodes); each model's call of
  `compute_rounds` is timed, and divided by its nodes.

Rounds alternate between the two runs (token round r, byte round r, ...), so that load hits both
alike; the first round of each is a warm-up and not counted; medians over the rest.

    python bench/bytes.py --threads 1 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import collective.run.engine as engine_module
from collective.lm.models import ModelPool
from collective.run.engine import EmbeddedExecutor, RoundEngine
from collective.run.runner import prepare
from collective.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[1]


def engine_for(data: dict[str, Any], pool: ModelPool) -> RoundEngine:
    scenario = parse_scenario(data, base_dir=ROOT / "scenarios")
    prepared = prepare(scenario, pool, base_dir=ROOT / "scenarios")
    return RoundEngine.from_prepared(prepared, EmbeddedExecutor.from_prepared(prepared), "bench")


def one_round(engine: RoundEngine, r: int) -> float:
    began = time.perf_counter()
    start = engine.round_start(r)
    targets, _ = engine._targets(start)
    results = engine.executor.run_round(r, engine.requests(r))
    engine.pool(start, targets, results)
    return time.perf_counter() - began


def base(rounds: int) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "scenarios" / "mixed-models.yaml").read_text(encoding="utf-8"))
    data["corpus"]["eval_tokens"] = 16 * rounds
    data["evaluation"]["warmup_rounds"] = 0
    return data


def same_tokenizer(args: argparse.Namespace, pool: ModelPool) -> None:
    data = base(args.rounds)
    for node in data["nodes"]:
        node["model"] = "smol"
    engines = {}
    for unit in ("token", "byte"):
        cell = {**data, "evaluation": {**data["evaluation"], "unit": unit}}
        engines[unit] = engine_for(cell, pool)
    times: dict[str, list[float]] = {"token": [], "byte": []}
    for r in range(args.rounds):
        for unit, engine in engines.items():
            times[unit].append(one_round(engine, r))
    token, byte = (statistics.median(times[u][1:]) for u in ("token", "byte"))
    bytes_per_round = statistics.mean(len(engines["byte"].byte_mode.text(engines["byte"].observer.targets(engines["byte"].round_start(r))))  # type: ignore[union-attr]
                                      for r in range(args.rounds))
    print(f"same tokenizer (4 x SmolLM2-135M, 16 stream tokens = {bytes_per_round:.1f} bytes a round, relays):")
    print(f"  token unit   {token:.2f} s a round (median of {args.rounds - 1})")
    print(f"  byte unit    {byte:.2f} s a round")
    print(f"  byte / token {byte / token:.2f}x: the byte path adds {byte - token:.2f} s, {(byte - token) / byte:.0%} of a byte round")


def mixed(args: argparse.Namespace, pool: ModelPool) -> None:
    engine = engine_for(base(args.rounds), pool)
    per_model: dict[str, list[float]] = {}
    inner = engine_module.compute_rounds

    def timed(model: torch.nn.Module, tokenizer: Any, requests: list[Any], **kw: Any) -> Any:
        began = time.perf_counter()
        out = inner(model, tokenizer, requests, **kw)
        alias = engine.scenario.node(requests[0].node_id).model
        per_model.setdefault(alias, []).append((time.perf_counter() - began) / len(requests))
        return out

    engine_module.compute_rounds = timed  # type: ignore[assignment]
    try:
        rounds = [one_round(engine, r) for r in range(args.rounds)]
    finally:
        engine_module.compute_rounds = inner
    print("mixed (2 SmolLM2-135M + 2 Gemma 3 270M nodes, byte unit, relays):")
    print(f"  a round      {statistics.median(rounds[1:]):.2f} s (median of {args.rounds - 1})")
    for alias, values in per_model.items():
        print(f"  {alias:6s} node  {statistics.median(values[1:]):.2f} s a node and round (its three rows, its message)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pool = ModelPool()
    print(f"torch threads {torch.get_num_threads()}, {args.rounds} rounds each, first one a warm-up")
    same_tokenizer(args, pool)
    mixed(args, pool)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
