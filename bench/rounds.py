"""Round-engine benchmark: the batched engine against a naive per-node, per-position loop.

Both run the same scenario through the same `RoundEngine` (same views, bus, pooling and
evaluator); only the executor that computes the members' predictions and messages
differs:

- batched: `EmbeddedExecutor` -> `compute_rounds`: per round, every node sharing the
  model in one left-padded teacher-forced pass (deduplicated), messages decoded together
  with a KV cache; the full-view reference in one pass.
- naive: for each node, each of its three rows (plain, isolated, in collective) and each
  position of the round, one forward pass of that node's context up to that position,
  no batching, no deduplication, no KV cache (messages decode one full forward per
  token); the reference likewise, one forward per position.

The script checks that both give the same NLLs (every member row and the reference, per
token; the pooled rows per round) and prints the speed ratio. Rows that depend on
messages are compared up to the first round in which a message differs (bf16 greedy
decoding may pick another token when two are within rounding of each other; float32
should agree everywhere).

    python bench/rounds.py                         # SmolLM2-135M, float32, 4 nodes
    python bench/rounds.py --dtype bfloat16 --eval-rounds 1 --threads 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from collective.evaluate.evaluator import build_report
from collective.lm.models import LoadedModel, ModelPool
from collective.lm.predictions import TokenPredictions, predictions_from_logits
from collective.records import Report
from collective.run.bus import InMemoryBus
from collective.run.engine import EmbeddedExecutor, RoundEngine
from collective.run.node import NodeRoundRequest, NodeRoundResult, start_token
from collective.run.runner import Prepared, prepare
from collective.scenario import GenerateMessage, RelayMessage, Scenario, parse_scenario
from collective.seeding import generator

ROWS = ("collective", "isolated", "plain")
TOLERANCE = {"float32": 1e-3, "float16": 0.25, "bfloat16": 0.25}  # max |delta NLL| per token, nats


def build_scenario(args: argparse.Namespace) -> Scenario:
    """A quickstart-like ring: alternating window / lagged views, generated messages."""
    lagged = {"kind": "lagged", "tokens": args.view_tokens, "lag": args.round_tokens}
    return parse_scenario(
        {
            "name": "bench-rounds",
            "seed": args.seed,
            "corpus": {
                "source": "builtin:pydoc",
                "train_tokens": args.warmup_rounds * args.round_tokens + max(args.context_tokens, args.view_tokens + args.round_tokens),
                "eval_tokens": args.eval_rounds * args.round_tokens,
                "offset_tokens": 1000,
            },
            "models": {"lm": {"ref": args.model, "dtype": args.dtype, "device": "cpu"}},
            "node_defaults": {
                "model": "lm",
                "view": {"kind": "window", "tokens": args.view_tokens},
                "message": {"policy": args.message, **({"speak_prompt": "\nIn short:"} if args.message == "generate" else {})},
            },
            "nodes": {"count": args.nodes, "overrides": {f"n{i}": {"view": lagged} for i in range(1, args.nodes, 2)}},
            "topology": {"kind": "ring"},
            "bus": {"round_tokens": args.round_tokens, "max_message_tokens": args.message_tokens, "max_message_bytes": 8 * args.message_tokens},
            "evaluation": {"context_tokens": args.context_tokens, "warmup_rounds": args.warmup_rounds, "n_boot": 200},
        },
        source="bench",
    )


# ---------------------------------------------------------------------------- the naive loop


@torch.no_grad()
def score_positions(model: torch.nn.Module, context: torch.Tensor, round_inputs: torch.Tensor,
                    targets: torch.Tensor, top_k: int) -> TokenPredictions:
    """One unbatched forward per position t: context + round_inputs[:t] -> p(targets[t]). (1, R, K)"""
    device = next(model.parameters()).device
    logits = []
    for t in range(len(targets)):
        ids = torch.cat([context, round_inputs[:t]]).unsqueeze(0).to(device)  # (1, C + t)
        logits.append(model(input_ids=ids, use_cache=False).logits[0, -1].float().cpu())  # (V,)
    return predictions_from_logits(torch.stack(logits).unsqueeze(0), targets, top_k)


@torch.no_grad()
def naive_generate(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, stop_ids: set[int],
                   gen: torch.Generator | None, temperature: float) -> list[int]:
    """Decode without a KV cache: one full forward of the prompt and what was written, per token."""
    device = next(model.parameters()).device
    new: list[int] = []
    for _ in range(max_new_tokens):
        ids = torch.cat([prompt, torch.tensor(new, dtype=torch.long)]).unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float().cpu()
        if gen is None:
            chosen = int(logits.argmax())
        else:
            chosen = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen))
        if chosen in stop_ids:
            break
        new.append(chosen)
    return new


class NaiveExecutor:
    """The same contract as EmbeddedExecutor, computed the slow, obvious way."""

    def __init__(self, scenario: Scenario, models: dict[str, LoadedModel], bus: InMemoryBus) -> None:
        self.scenario, self.models, self.bus = scenario, models, bus

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        results: dict[str, NodeRoundResult | None] = {}
        top_k = self.scenario.evaluation.top_k
        for request in requests:
            lm = self.models[self.scenario.node(request.node_id).model]
            tok: Any = lm.tokenizer
            bos = torch.tensor([start_token(tok)])
            control = torch.tensor(request.control_ids, dtype=torch.long)
            inbox_text = self.bus.render_inbox(request.node_id, round_index)
            inbox = torch.tensor(tok.encode(inbox_text, add_special_tokens=False) if inbox_text else [], dtype=torch.long)
            contexts = {
                "collective": torch.cat([bos, control, inbox, request.prefix_ids]),
                "isolated": torch.cat([bos, control, request.prefix_ids]),
                "plain": torch.cat([bos, request.prefix_ids]),
            }
            scored = {row: score_positions(lm.model, contexts[row], request.round_inputs, request.targets, top_k) for row in ROWS}
            results[request.node_id] = NodeRoundResult(
                node_id=request.node_id,
                round_index=round_index,
                collective=scored["collective"],
                isolated=scored["isolated"],
                plain=scored["plain"],
                message_text=self._message(lm, request, contexts["collective"]),
                inbox_tokens=len(inbox),
            )
        for request in requests:  # send after every node has read its inbox, as the engine does
            result = results[request.node_id]
            if result is not None and result.message_text is not None:
                result.messages = self.bus.send(request.node_id, result.message_text, round_index)
        return results

    @staticmethod
    def _message(lm: LoadedModel, request: NodeRoundRequest, context: torch.Tensor) -> str | None:
        tok: Any = lm.tokenizer
        spec = request.message
        if isinstance(spec, RelayMessage):
            seen = torch.cat([request.prefix_ids, request.round_inputs])
            return tok.decode(seen[len(seen) - min(len(seen), request.message_tokens) :].tolist(), skip_special_tokens=True)
        if not isinstance(spec, GenerateMessage):
            return None
        speak = tok.encode(spec.speak_prompt, add_special_tokens=False) if spec.speak_prompt else []
        prompt = torch.cat([context, request.round_inputs, torch.tensor(speak, dtype=torch.long)])
        gen = generator(request.seed, "speak", request.node_id, request.round_index) if spec.sampling == "sample" else None
        cap = min(spec.max_tokens or request.message_tokens, request.message_tokens)
        stop = {int(t) for t in (tok.eos_token_id, tok.bos_token_id) if t is not None}
        return tok.decode(naive_generate(lm.model, prompt, cap, stop, gen, spec.temperature), skip_special_tokens=True)


class NaiveReferenceEngine(RoundEngine):
    """The round engine with the full-view reference scored one position at a time."""

    def _reference(self, start: int, targets: torch.Tensor) -> TokenPredictions:
        seen = self.observer.reference(start)
        context = torch.cat([torch.tensor([start_token(self.reference.tokenizer)]), seen.prefix_ids])
        return score_positions(self.reference.model, context, seen.round_inputs, targets, self.scenario.evaluation.top_k)


# ---------------------------------------------------------------------------- running and comparing


@dataclass
class Recorded:
    """What one engine produced: per (round, node, row) target log-probs, and the messages."""

    logprobs: dict[tuple[int, str, str], torch.Tensor] = field(default_factory=dict)
    messages: dict[tuple[int, str], str | None] = field(default_factory=dict)
    reference: dict[int, torch.Tensor] = field(default_factory=dict)
    wall_seconds: float = 0.0
    report: Report | None = None


class Recording:
    """Wraps an executor and keeps what it returned."""

    def __init__(self, inner: Any, record: Recorded) -> None:
        self.inner, self.record = inner, record

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        results = self.inner.run_round(round_index, requests)
        for node_id, result in results.items():
            assert result is not None
            for row in ROWS:
                self.record.logprobs[(round_index, node_id, row)] = getattr(result, row).target_logprob[0].clone()
            self.record.messages[(round_index, node_id)] = result.message_text
        return results


def run_engine(prepared: Prepared, naive: bool) -> Recorded:
    scenario = prepared.scenario
    record = Recorded()
    bus = InMemoryBus(prepared.graph, scenario.bus, prepared.tokenizer, scenario.seed)  # type: ignore[arg-type]
    models = prepared.models
    executor = (NaiveExecutor if naive else EmbeddedExecutor)(scenario, models, bus)
    engine_class = NaiveReferenceEngine if naive else RoundEngine
    engine = engine_class.from_prepared(prepared, Recording(executor, record), "bench")
    original = engine._reference

    def keep_reference(start: int, targets: torch.Tensor) -> TokenPredictions:
        preds = original(start, targets)
        record.reference[start] = preds.target_logprob[0].clone()
        return preds

    engine._reference = keep_reference  # type: ignore[method-assign]
    began = time.perf_counter()
    result = engine.run(
        on_event=lambda e: print(f"  {'naive' if naive else 'batched'} round {e.round_index + 1}/{engine.total_rounds}"
                                 f" {e.wall_seconds:6.2f} s", flush=True)
    )
    record.wall_seconds = time.perf_counter() - began
    record.report = build_report(scenario, result, run_id="bench")
    return record


def compare(batched: Recorded, naive: Recorded, n_rounds: int, node_ids: list[str]) -> dict[str, Any]:
    """Max |delta log p| per row kind; message-dependent rows up to the first differing message."""
    diverged = next(
        (r for r in range(n_rounds) if any(batched.messages[(r, n)] != naive.messages[(r, n)] for n in node_ids)), None
    )
    same_inbox_rounds = n_rounds if diverged is None else diverged + 1  # round d still read matching inboxes

    def max_diff(keys: list[tuple[int, str, str]]) -> float:
        return max((float((batched.logprobs[k] - naive.logprobs[k]).abs().max()) for k in keys), default=0.0)

    out = {
        "plain": max_diff([(r, n, "plain") for r in range(n_rounds) for n in node_ids]),
        "isolated": max_diff([(r, n, "isolated") for r in range(n_rounds) for n in node_ids]),
        "collective": max_diff([(r, n, "collective") for r in range(same_inbox_rounds) for n in node_ids]),
        "reference": max(float((batched.reference[s] - naive.reference[s]).abs().max()) for s in batched.reference),
        "messages_equal": sum(batched.messages[k] == naive.messages[k] for k in batched.messages),
        "messages": len(batched.messages),
        "diverged_round": diverged,
        "compared_collective_rounds": same_inbox_rounds,
    }
    assert batched.report is not None and naive.report is not None
    rows = {(r.row, r.node_id): r.nll for r in naive.report.rows}
    kinds = ["member_plain", "member_isolated", "ensemble_silent", "reference"]
    if diverged is None:
        kinds += ["member_collective", "collective"]
    out["report_rows"] = max(abs(r.nll - rows[(r.row, r.node_id)]) for r in batched.report.rows if r.row in kinds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model alias, HF id or local folder")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--eval-rounds", type=int, default=2)
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--round-tokens", type=int, default=16)
    parser.add_argument("--view-tokens", type=int, default=32, help="window / lagged view length")
    parser.add_argument("--context-tokens", type=int, default=64, help="the full-view reference's context")
    parser.add_argument("--message", default="generate", choices=["generate", "relay", "silent"])
    parser.add_argument("--message-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-naive", action="store_true", help="time the batched engine only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    scenario = build_scenario(args)
    began = time.perf_counter()
    prepared = prepare(scenario, ModelPool(), base_dir=Path.cwd())
    n_rounds = scenario.evaluation.warmup_rounds + scenario.eval_rounds
    print(f"{args.model} ({args.dtype}, {torch.get_num_threads()} threads), loaded in {time.perf_counter() - began:.1f} s; "
          f"{args.nodes} nodes on a ring, {n_rounds} rounds ({scenario.evaluation.warmup_rounds} warm-up) of "
          f"{args.round_tokens} tokens, views {args.view_tokens}, messages {args.message} <= {args.message_tokens} tokens")

    batched = run_engine(prepared, naive=False)
    scored_tokens = n_rounds * args.round_tokens
    print(f"batched: {batched.wall_seconds:8.2f} s  ({batched.wall_seconds / n_rounds:.2f} s/round, "
          f"{scored_tokens / batched.wall_seconds:.1f} stream tokens/s)")
    if args.skip_naive:
        return 0
    naive = run_engine(prepared, naive=True)
    print(f"naive:   {naive.wall_seconds:8.2f} s  ({naive.wall_seconds / n_rounds:.2f} s/round, "
          f"{scored_tokens / naive.wall_seconds:.1f} stream tokens/s)")
    print(f"speed ratio (naive / batched): {naive.wall_seconds / batched.wall_seconds:.1f}x")

    diff = compare(batched, naive, n_rounds, scenario.node_ids)
    tolerance = TOLERANCE[args.dtype]
    print(f"max |delta log p| per token (nats): plain {diff['plain']:.2e}, isolated {diff['isolated']:.2e}, "
          f"in collective {diff['collective']:.2e} (rounds 1..{diff['compared_collective_rounds']}), "
          f"reference {diff['reference']:.2e}; report rows {diff['report_rows']:.2e}")
    print(f"messages identical: {diff['messages_equal']}/{diff['messages']}"
          + ("" if diff["diverged_round"] is None else f" (first difference in round {diff['diverged_round'] + 1})"))
    worst = max(diff["plain"], diff["isolated"], diff["collective"], diff["reference"])
    ok = worst <= tolerance and math.isfinite(worst)
    if args.dtype == "float32" and args.message != "silent":
        ok = ok and diff["diverged_round"] is None
    print(f"{'SAME' if ok else 'DIFFERENT'} NLLs (tolerance {tolerance:g} nats/token for {args.dtype})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
