"""Round-engine benchmark: the batched engine against the baseline a competent user writes.

Every engine runs the same scenario through the same `RoundEngine` (same views, bus,
pooling and evaluator); only the code that computes the members' rows and messages and the
full-view reference differs:

- batched (ours): `EmbeddedExecutor` -> `compute_rounds`: per round, every node sharing the
  model in left-padded teacher-forced passes bucketed by length (`scoring._chunks`: the
  grouping with the fewest padded tokens plus a cost per pass; identical sequences scored
  once: with no control prompt a node's isolated and plain rows are the same sequence),
  messages decoded together from the scoring passes' KV caches (joined into one batch; each
  row stops at its own budget, on packed linear weights: `collective.lm.decoding`); the
  reference in one pass.
- fair baseline: per node and per row (plain, isolated, in collective), one unbatched
  teacher-forced forward pass over the row's context and the round (`logits_to_keep`, no
  deduplication), then Hugging Face `generate` (greedy, its own KV cache) for the message
  from [context][round][speak prompt]; the reference in one forward pass.
- position loop (`--position-loop`, off by default; the old "naive" baseline): per node, row
  and position of the round, one forward pass of the context up to that position (full
  logits), messages decoded without a KV cache (one full forward per token).
- limits: the machine's rate for the scoring work alone, one forward pass over every row's
  sequence of every round (each node's three rows and the reference) in a single left-padded
  batch, no generation, no pooling ("every row", the fair baseline's work); and the
  distinct sequences only (the batched engine's work: it scores identical rows once), in
  one batch per sequence length so that nothing is padding ("distinct rows").

"Tokens scored" counts one (row, position) prediction: rounds x (3 x nodes + 1) x round
tokens, the same for every engine and limit (a deduplicated row is delivered as a copy); "of
a limit" is the limit's time over the engine's. Each engine first runs one round to warm
up, then the whole scenario `--repeats` times (interleaved, so that load hits all alike);
the table gives medians of wall and CPU time.
The script checks that the fair baseline (and the position loop) give the batched engine's
NLLs (every member row and the reference, per token; the report rows) within the dtype's
tolerance and the same messages; it exits 1 otherwise.

    python bench/rounds.py --threads 2                 # SmolLM2-135M, float32, 4 nodes: ~3 min
    python bench/rounds.py --threads 1 --eval-rounds 1 --repeats 1    # a smoke test
    python bench/rounds.py --threads 2 --position-loop --repeats 1     # + the loop: ~13 min
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from collective.evaluate.evaluator import build_report
from collective.lm.codec import start_token, stop_ids
from collective.lm.models import LoadedModel, ModelPool
from collective.lm.predictions import TokenPredictions, predictions_from_logits
from collective.lm.scoring import ScoreItem
from collective.records import Report
from collective.run.bus import InMemoryBus
from collective.run.engine import EmbeddedExecutor, RoundEngine
from collective.run.node import NodeRoundRequest, NodeRoundResult
from collective.run.runner import Prepared, prepare
from collective.scenario import GenerateMessage, RelayMessage, Scenario, parse_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.round_work import (  # noqa: E402
    DISTINCT,
    EVERY,
    WITH_MESSAGES,
    engine_padding,
    limit_pass,
    padded_share,
    time_limits,
)

ROWS = ("collective", "isolated", "plain")
TOLERANCE = {"float32": 1e-4, "float16": 0.25, "bfloat16": 0.25}  # max |delta log p| per token, nats
Scorer = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int], TokenPredictions]


SPEAK_PROMPT = "\n<|im_start|>user\nIn one line, what is the text above about?<|im_end|>\n<|im_start|>assistant\n"


def node_view(index: int, view_tokens: int, round_tokens: int) -> dict[str, Any]:
    """The quickstart's views, generalised so that no two nodes see the same thing: even nodes
    a window of view_tokens, view_tokens - 24, ...; odd nodes a delayed window (view_tokens +
    16 j tokens ending round_tokens + 16 j before the round, j = index // 2)."""
    step = index // 2
    if index % 2 == 0:
        return {"kind": "window", "tokens": max(8, view_tokens - 24 * step)}
    return {"kind": "lagged", "tokens": view_tokens + 16 * step, "lag": round_tokens + 16 * step}


def build_scenario(args: argparse.Namespace) -> Scenario:
    """The quickstart's ring (4 nodes: the same views and speak prompt), messages decoded greedily."""
    message: dict[str, Any] = {"policy": args.message}
    if args.message == "generate":
        message |= {"speak_prompt": SPEAK_PROMPT, "sampling": "greedy"}
    views = [node_view(i, args.view_tokens, args.round_tokens) for i in range(args.nodes)]
    reach = max(args.context_tokens, *(view["tokens"] + view.get("lag", 0) for view in views))  # tokens before a round
    return parse_scenario(
        {
            "name": "bench-rounds",
            "seed": args.seed,
            "corpus": {
                "source": "builtin:pydoc",
                "train_tokens": args.warmup_rounds * args.round_tokens + reach,
                "eval_tokens": args.eval_rounds * args.round_tokens,
                "offset_tokens": 1000,
            },
            "models": {"lm": {"ref": args.model, "dtype": args.dtype, "device": "cpu"}},
            "node_defaults": {"model": "lm", "message": message},
            "nodes": [{"id": f"n{i}", "view": view} for i, view in enumerate(views)],
            "topology": {"kind": "ring"},
            "bus": {"round_tokens": args.round_tokens, "max_message_tokens": args.message_tokens, "max_message_bytes": 8 * args.message_tokens},
            "evaluation": {"context_tokens": args.context_tokens, "warmup_rounds": args.warmup_rounds},
        },
        source="bench",
    )


# ---------------------------------------------------------------------------- the baselines


@torch.no_grad()
def score_once(model: torch.nn.Module, context: torch.Tensor, round_inputs: torch.Tensor,
               targets: torch.Tensor, top_k: int) -> TokenPredictions:
    """The fair baseline's scoring: one unbatched teacher-forced pass. (1, R, K)"""
    ids = torch.cat([context, round_inputs[:-1]]).unsqueeze(0)  # (1, C + R - 1)
    logits = model(input_ids=ids, logits_to_keep=len(targets), use_cache=False).logits  # (1, R, V)
    return predictions_from_logits(logits, targets, top_k)


@torch.no_grad()
def score_positions(model: torch.nn.Module, context: torch.Tensor, round_inputs: torch.Tensor,
                    targets: torch.Tensor, top_k: int) -> TokenPredictions:
    """The position loop: one unbatched forward per position t, context + round_inputs[:t]. (1, R, K)"""
    logits = []
    for t in range(len(targets)):
        ids = torch.cat([context, round_inputs[:t]]).unsqueeze(0)  # (1, C + t)
        logits.append(model(input_ids=ids, use_cache=False).logits[0, -1].float())  # (V,)
    return predictions_from_logits(torch.stack(logits).unsqueeze(0), targets, top_k)


@torch.no_grad()
def hf_generate(model: Any, prompt: torch.Tensor, max_new_tokens: int, stop: list[int], pad_id: int) -> list[int]:
    """The fair baseline's message: Hugging Face `generate`, greedy, with its KV cache."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad_id)
    out = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         generation_config=config)
    new = out[0, len(prompt):].tolist()
    return next((new[:i] for i, t in enumerate(new) if t in stop), new)


@torch.no_grad()
def uncached_generate(model: Any, prompt: torch.Tensor, max_new_tokens: int, stop: list[int], pad_id: int) -> list[int]:
    """The position loop's message: greedy, one full forward of the prompt and what was written per token."""
    new: list[int] = []
    for _ in range(max_new_tokens):
        ids = torch.cat([prompt, torch.tensor(new, dtype=torch.long)]).unsqueeze(0)
        chosen = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        if chosen in stop:
            break
        new.append(chosen)
    return new


class LoopExecutor:
    """The executor contract computed one node and one row at a time (`scorer` for the rows,
    `speaker` for a generated message). Keeps every sequence it scores in `work`."""

    def __init__(self, scenario: Scenario, models: dict[str, LoadedModel], bus: InMemoryBus,
                 scorer: Scorer, speaker: Callable[..., list[int]]) -> None:
        self.scenario, self.models, self.bus = scenario, models, bus
        self.scorer, self.speaker = scorer, speaker
        self.work: list[ScoreItem] = []
        self.spoken: list[tuple[int, torch.Tensor, int]] = []  # (work index of its collective row, prompt, decode steps)

    def score(self, model: torch.nn.Module, context: torch.Tensor, round_inputs: torch.Tensor,
              targets: torch.Tensor) -> TokenPredictions:
        self.work.append(ScoreItem(context, round_inputs, targets))
        return self.scorer(model, context, round_inputs, targets, self.scenario.evaluation.top_k)

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        results: dict[str, NodeRoundResult | None] = {}
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
            scored = {row: self.score(lm.model, contexts[row], request.round_inputs, request.targets) for row in ROWS}
            results[request.node_id] = NodeRoundResult(
                node_id=request.node_id, round_index=round_index, collective=scored["collective"],
                isolated=scored["isolated"], plain=scored["plain"],
                message_text=self._message(lm, request, contexts["collective"]), inbox_tokens=len(inbox),
            )
        for request in requests:  # send after every node has read its inbox, as the engine does
            result = results[request.node_id]
            if result is not None and result.message_text is not None:
                result.messages = self.bus.send(request.node_id, result.message_text, round_index)
        return results

    def _message(self, lm: LoadedModel, request: NodeRoundRequest, context: torch.Tensor) -> str | None:
        tok: Any = lm.tokenizer
        spec = request.message
        if isinstance(spec, RelayMessage):
            seen = torch.cat([request.prefix_ids, request.round_inputs])
            return tok.decode(seen[len(seen) - min(len(seen), request.message_tokens) :].tolist(), skip_special_tokens=True)
        if not isinstance(spec, GenerateMessage):
            return None
        if spec.sampling != "greedy":
            raise SystemExit("bench/rounds.py: the baselines decode greedily; the scenario must use sampling: greedy")
        speak = tok.encode(spec.speak_prompt, add_special_tokens=False) if spec.speak_prompt else []
        prompt = torch.cat([context, request.round_inputs, torch.tensor(speak, dtype=torch.long)])
        cap = min(spec.max_tokens or request.message_tokens, request.message_tokens)
        new = self.speaker(lm.model, prompt, cap, stop_ids(tok), start_token(tok))
        # its rows were just scored, collective first; a batched decode needs one forward per new
        # token after the first (the prompt's pass gives it), and one more to choose a stop token
        self.spoken.append((len(self.work) - len(ROWS), prompt, len(new) - (len(new) == cap)))
        return tok.decode(new, skip_special_tokens=True)


# ---------------------------------------------------------------------------- running and timing


@dataclass
class Recorded:
    """What one run of an engine produced: per (round, node, row) target log-probs, the
    messages, the reference per round start, and its wall and CPU time."""

    logprobs: dict[tuple[int, str, str], torch.Tensor] = field(default_factory=dict)
    messages: dict[tuple[int, str], str | None] = field(default_factory=dict)
    reference: dict[int, torch.Tensor] = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: float = 0.0
    report: Report | None = None
    work: list[ScoreItem] = field(default_factory=list)
    spoken: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)


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


ENGINES: dict[str, tuple[Scorer, Callable[..., list[int]]] | None] = {
    "batched": None,
    "fair": (score_once, hf_generate),
    "position loop": (score_positions, uncached_generate),
}


def run_engine(prepared: Prepared, name: str, rounds: int | None = None) -> Recorded:
    """A run of the scenario with engine `name` (a key of ENGINES): every round and the
    report, or only the first `rounds` rounds (a warm-up) and no report."""
    scenario = prepared.scenario
    record = Recorded()
    bus = InMemoryBus(prepared.graph, scenario.bus, prepared.tokenizer, scenario.seed)  # type: ignore[arg-type]
    loop = ENGINES[name]
    executor: Any = EmbeddedExecutor(scenario, prepared.models, bus) if loop is None else LoopExecutor(
        scenario, prepared.models, bus, *loop)
    engine = RoundEngine.from_prepared(prepared, Recording(executor, record), "bench")
    batched_reference = engine._reference

    def reference(start: int, targets: torch.Tensor) -> TokenPredictions:
        if loop is None:
            preds = batched_reference(start, targets)
        else:
            seen = engine.observer.reference(start)
            context = torch.cat([torch.tensor([start_token(engine.reference.tokenizer)]), seen.prefix_ids])
            preds = executor.score(engine.reference.model, context, seen.round_inputs, targets)
        record.reference[start] = preds.target_logprob[0].clone()
        return preds

    engine._reference = reference  # type: ignore[method-assign]
    wall, cpu = time.perf_counter(), time.process_time()
    result = engine.run(should_stop=None if rounds is None else lambda: len(record.messages) >= rounds * len(scenario.nodes))
    record.wall_s, record.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    record.report = None if rounds is not None else build_report(scenario, result, run_id="bench")
    record.work = [] if loop is None else executor.work
    record.spoken = [] if loop is None else executor.spoken
    return record


def compare(batched: Recorded, other: Recorded, n_rounds: int, node_ids: list[str]) -> dict[str, Any]:
    """Max |delta log p| per row kind; message-dependent rows up to the first differing message."""
    diverged = next(
        (r for r in range(n_rounds) if any(batched.messages[(r, n)] != other.messages[(r, n)] for n in node_ids)), None
    )
    same_inbox_rounds = n_rounds if diverged is None else diverged + 1  # round d still read matching inboxes

    def max_diff(row: str, rounds: int) -> float:
        keys = [(r, n, row) for r in range(rounds) for n in node_ids]
        return max((float((batched.logprobs[k] - other.logprobs[k]).abs().max()) for k in keys), default=0.0)

    out = {
        "plain": max_diff("plain", n_rounds),
        "isolated": max_diff("isolated", n_rounds),
        "collective": max_diff("collective", same_inbox_rounds),
        "reference": max(float((batched.reference[s] - other.reference[s]).abs().max()) for s in batched.reference),
        "messages_equal": sum(batched.messages[k] == other.messages[k] for k in batched.messages),
        "messages": len(batched.messages),
        "diverged_round": diverged,
        "compared_collective_rounds": same_inbox_rounds,
    }
    assert batched.report is not None and other.report is not None
    rows = {(r.row, r.node_id): r.nll for r in other.report.rows}
    kinds = ["member_plain", "member_isolated", "ensemble_silent", "reference"]
    if diverged is None:
        kinds += ["member_collective", "collective"]
    out["report_rows"] = max(abs(r.nll - rows[(r.row, r.node_id)]) for r in batched.report.rows if r.row in kinds)
    return out


def agreement(name: str, batched: Recorded, other: Recorded, scenario: Scenario, dtype: str) -> bool:
    """Print how `other` agrees with the batched engine; True when within the dtype's tolerance."""
    n_rounds = scenario.evaluation.warmup_rounds + scenario.eval_rounds
    diff = compare(batched, other, n_rounds, scenario.node_ids)
    tolerance = TOLERANCE[dtype]
    worst = max(diff["plain"], diff["isolated"], diff["collective"], diff["reference"])
    ok = worst <= tolerance and math.isfinite(worst)
    if dtype == "float32" and any(isinstance(n.message, GenerateMessage) for n in scenario.nodes):
        ok = ok and diff["diverged_round"] is None
    print(f"{name} vs batched, max |delta log p| per token (nats): plain {diff['plain']:.2e}, isolated "
          f"{diff['isolated']:.2e}, in collective {diff['collective']:.2e} (rounds 1..{diff['compared_collective_rounds']}), "
          f"reference {diff['reference']:.2e}; report rows {diff['report_rows']:.2e}; messages identical "
          f"{diff['messages_equal']}/{diff['messages']}"
          + ("" if diff["diverged_round"] is None else f" (first difference in round {diff['diverged_round'] + 1})")
          + f": {'SAME' if ok else 'DIFFERENT'} (tolerance {tolerance:g} nats/token for {dtype})")
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model alias, HF id or local folder")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--eval-rounds", type=int, default=2)
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--round-tokens", type=int, default=32)
    parser.add_argument("--view-tokens", type=int, default=48, help="the first node's window (the quickstart's 48)")
    parser.add_argument("--context-tokens", type=int, default=128, help="the full-view reference's context")
    parser.add_argument("--message", default="generate", choices=["generate", "relay", "silent"])
    parser.add_argument("--message-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each engine, after one warm-up run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--position-loop", action="store_true", help="also time the per-position loop (slow)")
    return parser.parse_args(argv)


def timing_table(runs: dict[str, list[Recorded]], limits: dict[str, list[tuple[float, float]]], scored: int,
                 n_rounds: int) -> None:
    """Median wall and CPU seconds per run, tokens scored per second, and the share of each limit
    (the limit's time over the engine's, for the same tokens scored)."""
    limit_wall = {name: statistics.median(w for w, _ in timed) for name, timed in limits.items()}
    batched_wall = statistics.median(r.wall_s for r in runs["batched"])
    shares = " | ".join(f"of {name}" for name in limits)
    print(f"\n| engine | s/run wall | s/round wall | s/run cpu | tokens scored/s | {shares} | time vs batched |")
    print("| --- | ---: | ---: | ---: | ---: | " + "---: | " * len(limits) + "---: |")

    def line(name: str, wall: float, cpu: float) -> None:
        share = " | ".join(f"{100 * lw / wall:.0f}%" for lw in limit_wall.values())
        print(f"| {name} | {wall:.2f} | {wall / n_rounds:.2f} | {cpu:.2f} | {scored / wall:.0f} | {share} | "
              f"{wall / batched_wall:.2f}x |")

    for name, records in runs.items():
        line(name, statistics.median(r.wall_s for r in records), statistics.median(r.cpu_s for r in records))
    for name, timed in limits.items():
        line(name, limit_wall[name], statistics.median(c for _, c in timed))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scenario = build_scenario(args)
    began = time.perf_counter()
    prepared = prepare(scenario, ModelPool(), base_dir=Path.cwd())
    n_rounds = scenario.evaluation.warmup_rounds + scenario.eval_rounds
    rows_per_round = 3 * args.nodes + 1
    scored = n_rounds * rows_per_round * args.round_tokens
    print(f"{args.model}, {args.dtype}, torch {torch.__version__} on {torch.get_num_threads()} threads "
          f"({os.cpu_count()} cores), loaded in {time.perf_counter() - began:.1f} s; {args.nodes} nodes on a ring, "
          f"{n_rounds} rounds ({args.warmup_rounds} warm-up) of {args.round_tokens} tokens, views {args.view_tokens}, "
          f"reference context {args.context_tokens}, messages {args.message} <= {args.message_tokens} tokens; "
          f"{rows_per_round} rows a round, {scored} tokens scored a run; a 1-round warm-up, then {args.repeats} timed runs each")
    names = ["batched", "fair"] + (["position loop"] if args.position_loop else [])
    lm = prepared.models[scenario.reference_model]
    pad_id = start_token(lm.tokenizer)
    for name in names:  # warm-up: the first round of each engine, and a limit pass over its work
        record = run_engine(prepared, name, rounds=1)
        print(f"  warm-up {name} (1 round): {record.wall_s:.2f} s wall, {record.cpu_s:.2f} s cpu", flush=True)
    limit_pass(lm.model, record.work, pad_id)  # the last engine is a loop: it kept its work
    runs: dict[str, list[Recorded]] = {name: [] for name in names}
    limits: dict[str, list[tuple[float, float]]] = {EVERY: [], DISTINCT: [], WITH_MESSAGES: []}
    for repeat in range(1, args.repeats + 1):  # interleaved, so that load hits every engine alike
        for name in names:
            runs[name].append(record := run_engine(prepared, name))
            print(f"  run {repeat} {name}: {record.wall_s:.2f} s wall, {record.cpu_s:.2f} s cpu", flush=True)
        work, steps = time_limits(lm.model, runs["fair"][-1].work, runs["fair"][-1].spoken, n_rounds, pad_id, limits)
    assert len(work[EVERY]) == n_rounds * rows_per_round
    lengths = {len(item.input_ids()) for item in work[DISTINCT]}
    print(f"limits, no generation, no pooling: every row, one left-padded forward pass over {len(work[EVERY])} "
          f"sequences ({100 * padded_share(work[EVERY]):.0f}% of it padding); distinct rows, the {len(work[DISTINCT])} "
          f"distinct ones in {len(lengths)} batches of equal length (no padding); distinct rows + messages, the same "
          f"with each speaker's row extended by its speak prompt, plus {steps} decode steps a run at the time of reading "
          f"every weight once")
    one, bucketed = engine_padding(work[EVERY], n_rounds, args.nodes)
    print(f"the batched engine's scoring passes: {100 * bucketed:.0f}% of their tokens are padding, bucketed by length "
          f"(one pass per kind of row and round, before issue 24: {100 * one:.0f}%)")
    timing_table(runs, limits, scored, n_rounds)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    batched = runs["batched"][-1]
    agree = [agreement(name, batched, runs[name][-1], scenario, args.dtype) for name in names[1:]]
    return 0 if all(agree) else 1


if __name__ == "__main__":
    sys.exit(main())
