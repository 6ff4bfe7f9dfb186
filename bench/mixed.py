"""The heterogeneous-collective experiment (issue 20): SmolLM2-135M and Gemma 3 270M nodes,
scored in bits/byte, against their best member and a bigger yardstick.

For each text and each view set, one byte-unit run of `scenarios/mixed-models.yaml` (its
nodes, bus and relays; the views and text replaced) computes every node's rows once per round,
then pools them three ways side by side on the same rows: mean, weighted (Hedge) and logpool,
for the silent ensemble (isolated rows: no messages) and the collective (rows in collective:
the relays read). Every figure is the evaluator's: bits/byte of each row, the paired interval of
(best isolated member - pooled row) and, with a yardstick, the share of the best member's gap
to it that the pooled row closes (`intervals.gap_share`), each with the calibrated 95% CI.

    python bench/mixed.py --threads 1 --yardstick /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        --wikitext ../shared/data/wikitext-2-raw/wiki.test.raw --eval-rounds 32 --out docs/mixed.json

View sets: `full` (every node sees the last 48 tokens, the reference's view cut to 48),
`window` (a, c: the last 48; b, d: the last 16), `lagged` (a, c: the last 48; b, d: 48 tokens
ending 32 before the round). Texts: Python's documentation (builtin:pydoc) and WikiText-2 test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import torch
import yaml

from collective.evaluate.book import RoundBook, RowKey
from collective.evaluate.gains import gains
from collective.evaluate.intervals import gap_share
from collective.evaluate.metrics import LN2, summarize
from collective.lm.models import ModelPool
from collective.run.aggregate import make_aggregator
from collective.run.engine import EmbeddedExecutor, RoundEngine
from collective.run.runner import prepare
from collective.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[1]


class PoolSpec(TypedDict):
    """make_aggregator's keywords for one pool (typed, so that `**spec` is checked per key)."""

    kind: str
    method: NotRequired[str]


POOLS: dict[str, PoolSpec] = {"mean": {"kind": "mean"}, "hedge": {"kind": "weighted", "method": "hedge"}, "logpool": {"kind": "logpool"}}
VIEWS: dict[str, list[dict[str, Any]]] = {
    "full": [{"kind": "full"}] * 4,
    "window": [{"kind": "window", "tokens": 48}, {"kind": "window", "tokens": 16}] * 2,
    "lagged": [{"kind": "window", "tokens": 48}, {"kind": "lagged", "tokens": 48, "lag": 32}] * 2,
}


def scenario_data(text: str, views: str, args: argparse.Namespace) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "scenarios" / "mixed-models.yaml").read_text(encoding="utf-8"))
    data["name"] = f"mixed-{text}-{views}"
    for node, view in zip(data["nodes"], VIEWS[views], strict=True):
        node["view"] = view
    data["corpus"] = {"source": "builtin:pydoc", "train_tokens": 256, "eval_tokens": 16 * args.eval_rounds}
    if text == "wikitext":
        data["corpus"] |= {"source": "wikitext2", "path": str(args.wikitext), "offset_tokens": args.wiki_offset}
    data["evaluation"] |= {"context_tokens": 48 if views == "full" else 96}
    if args.yardstick:
        data["evaluation"]["yardstick"] = str(args.yardstick)
    return data


def run_cell(text: str, views: str, args: argparse.Namespace, pool: ModelPool) -> dict[str, Any]:
    scenario = parse_scenario(scenario_data(text, views, args), base_dir=ROOT / "scenarios")
    prepared = prepare(scenario, pool, base_dir=ROOT / "scenarios")
    engine = RoundEngine.from_prepared(prepared, EmbeddedExecutor.from_prepared(prepared), "bench")
    n = len(scenario.nodes)
    pools = {name: (make_aggregator(n_members=n, **spec), make_aggregator(n_members=n, **spec)) for name, spec in POOLS.items()}
    books = {name: RoundBook(scenario.node_ids, yardstick=prepared.yardstick is not None) for name in POOLS}
    began = time.perf_counter()
    for r in range(engine.total_rounds):
        start = engine.round_start(r)
        targets, token_bytes = engine._targets(start)
        results = engine.executor.run_round(r, engine.requests(r))
        reference = engine._reference(start, targets)
        yard = engine._yardstick(start, token_bytes) if engine.phase(r) == "eval" else None
        for name, (silent_pool, collective_pool) in pools.items():
            silent = silent_pool.pool(*engine._members(results, "isolated"), targets=targets)
            collective = collective_pool.pool(*engine._members(results, "collective"), targets=targets)
            if engine.phase(r) == "eval":
                books[name].add_round(results, silent=silent, collective=collective, reference=reference,
                                      targets=targets, token_bytes=token_bytes, yardstick=yard)
        print(f"  {text}/{views} round {r + 1}/{engine.total_rounds} {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return {"text": text, "views": views, "wall_seconds": time.perf_counter() - began, "pools": {
        name: summarize_book(book, scenario.node_ids, models={n.id: n.model for n in scenario.nodes}) for name, book in books.items()
    }}


def _est(e: Any, scale: float = 1.0) -> dict[str, float]:
    return {"value": e.value * scale, "low": e.low * scale, "high": e.high * scale}


def summarize_book(book: RoundBook, node_ids: list[str], models: dict[str, str]) -> dict[str, Any]:
    """bits/byte of every row; per pooled row its gain over the best isolated member in bits/byte
    (paired CI) and the share of the gap to the yardstick it closes."""
    stats = book.stats()
    isolated = [RowKey("member_isolated", n) for n in node_ids]
    rows = {f"{k.kind}:{k.node_id or ''}": summarize(s).bits_per_byte for k, s in stats.items()}
    out: dict[str, Any] = {"bits_per_byte": rows, "models": models, "rounds": int(stats[RowKey("collective")].n_rounds)}
    for pooled in ("ensemble_silent", "collective"):
        head = gains(stats, isolated=isolated, silent=RowKey("ensemble_silent"), collective=RowKey(pooled))
        best = head.best_member
        entry: dict[str, Any] = {"best_member": best.node_id if best else None,
                                 "gain_bits_per_byte": _est(head.collective_gain, 1 / LN2)}
        if pooled == "collective":
            entry["communication_gain_bits_per_byte"] = _est(head.communication_gain, 1 / LN2)
        if RowKey("yardstick") in stats and best is not None:
            found = gap_share(stats[best], stats[RowKey(pooled)], stats[RowKey("yardstick")])
            entry["gap_share"] = _est(found.share) if found.defined else None
            entry["gap_bits_per_byte"] = _est(found.gap)
        out[pooled] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--yardstick", type=Path, default=None, help="a bigger model (ref, folder or .gguf)")
    parser.add_argument("--wikitext", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")
    parser.add_argument("--wiki-offset", type=int, default=20_000, help="stream tokens skipped at the start of WikiText")
    parser.add_argument("--eval-rounds", type=int, default=16)
    parser.add_argument("--texts", default="pydoc,wikitext")
    parser.add_argument("--views", default="full,window,lagged")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of every cell (written after each)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pool = ModelPool()
    cells = json.loads(args.out.read_text()) if args.out.is_file() else []
    done = {(c["text"], c["views"]) for c in cells}
    for text in args.texts.split(","):
        for views in args.views.split(","):
            if (text, views) in done:
                continue
            cells.append(run_cell(text, views, args, pool))
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(cells, indent=1), encoding="utf-8")
            tmp.replace(args.out)
            print_cell(cells[-1])
    return 0


def print_cell(cell: dict[str, Any]) -> None:
    print(f"\n{cell['text']} / {cell['views']} ({cell['wall_seconds']:.0f} s)")
    for name, summary in cell["pools"].items():
        bpb = summary["bits_per_byte"]
        members = ", ".join(f"{k.split(':')[1]} {v:.3f}" for k, v in bpb.items() if k.startswith("member_isolated"))
        line = f"  {name:8s} members [{members}] ref {bpb['reference:']:.3f}"
        if "yardstick:" in bpb:
            line += f" yardstick {bpb['yardstick:']:.3f}"
        for pooled in ("ensemble_silent", "collective"):
            entry = summary[pooled]
            g = entry["gain_bits_per_byte"]
            line += f"\n    {pooled:15s} {bpb[pooled + ':']:.3f} bpb, gain vs best ({entry['best_member']}) {g['value']:+.3f} ({g['low']:+.3f}, {g['high']:+.3f})"
            share = entry.get("gap_share")
            if share is not None:
                line += f", closes {share['value']:.0%} ({share['low']:.0%}, {share['high']:.0%}) of the gap"
        print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
