"""Benchmark: the batched message search over all nodes of a round against node by node.

The tasks are those of one round of searched messages: N nodes, each writing a message of
k tokens about the last `--span-tokens` tokens it read (consecutive stretches of Python's
pydoc text), for `--readers` readers each: reader j reads
[bos][its own context (`--context-tokens`)][message]["\n" + span] and scores the span.
Every node starts from the filler " x x x ..." (k tokens) with its own seed.

- batched: `search_messages` over all N tasks (one gradient pass and one scoring pass per
  step for every node, packed into batches of `--batch-tokens` padded tokens);
- node by node: `search_messages` called once per task, the same settings;
- limit: the machine's rate for the scoring work alone, one no-grad forward pass of a
  (B, L) batch of rows as long as the candidates' ([bos][context][message]["\n"][span]),
  B = batch_tokens // L, logits only at the span's positions, as the search computes them.

"Scored tokens" are the tokens the candidates put through forward passes (every row's
real tokens, the search's `scored_tokens`); the search's rate divides them by its whole
time (gradients, sampling, filters included), and "of the limit" compares that rate to the
limit's. Each engine first runs once with one step to warm up, then `--repeats` times
(interleaved, so that load hits all alike); the table gives medians of wall and CPU time.
The script checks that both ways return the same messages (float32: a different message
only where the losses agree within 1e-5) and exits 1 otherwise.

    python bench/messages.py --threads 2                   # SmolLM2-135M, 4 nodes
    python bench/messages.py --model tiny --threads 1      # a quick run on a tiny random model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from controllers.filters import allowed_token_mask
from controllers.messages import (
    MessagePart,
    MessageSearchConfig,
    MessageSearchResult,
    MessageTask,
    search_messages,
)
from controllers.objectives import default_prefix_ids, encode

REPO = Path(__file__).resolve().parent.parent


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, tokenizer, description)."""
    if args.model == "tiny":
        sys.path.insert(0, str(REPO))  # tests/tiny.py builds the tiny model and tokenizer
        from tests.tiny import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_llama(len(tokenizer)), tokenizer, "tiny random Llama (2 layers, d=32), float32"
    from collective.lm.models import load_model

    loaded = load_model("smollm2-135m", device="cpu", dtype=args.dtype)
    return loaded.model, loaded.tokenizer, f"SmolLM2-135M {args.dtype}"


def build_tasks(tokenizer: Any, args: argparse.Namespace) -> list[MessageTask]:
    """One task per node (see the module docstring)."""
    from pydoc_data.topics import topics

    stream = encode(tokenizer, "\n".join(topics[key] for key in sorted(topics))[:200_000])
    start, newline = default_prefix_ids(tokenizer) or [0], encode(tokenizer, "\n")
    filler = encode(tokenizer, " x" * args.message_tokens)[: args.message_tokens]
    stride = args.span_tokens + args.readers * args.context_tokens
    tasks = []
    for node in range(args.nodes):
        base = 1000 + node * stride
        span = stream[base : base + args.span_tokens]
        parts = [
            MessagePart(start + stream[base - (j + 1) * args.context_tokens : base - j * args.context_tokens],
                        newline + span, span)
            for j in range(args.readers)
        ]
        tasks.append(MessageTask(parts=parts, init_ids=filler, seed=args.seed * 1000 + node))
    return tasks


def timed(function: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall s, CPU s of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def plain_forward(model: Any, rows: int, length: int, scored: int) -> None:
    """The limit's work: one (rows, length) forward pass, logits at the last `scored` positions."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))  # (B, L)
    model(input_ids=ids, use_cache=False, logits_to_keep=torch.arange(length - scored - 1, length - 1))


def same_messages(batched: list[MessageSearchResult], alone: list[MessageSearchResult]) -> tuple[int, bool]:
    """(how many messages are identical, whether every difference is a tie within 1e-5)."""
    same = sum(a.ids == b.ids for a, b in zip(batched, alone, strict=True))
    ties = all(a.ids == b.ids or abs(a.loss - b.loss) <= 1e-5 for a, b in zip(batched, alone, strict=True))
    return same, ties


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--message-tokens", type=int, default=8, help="k, the message's tokens")
    parser.add_argument("--span-tokens", type=int, default=16, help="read tokens each message is about")
    parser.add_argument("--context-tokens", type=int, default=32, help="each reader's own context before the message")
    parser.add_argument("--readers", type=int, default=2, help="parts per task")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--search-width", type=int, default=16)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each engine, after one warm-up run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    model, tokenizer, described = load(args)
    tasks = build_tasks(tokenizer, args)
    allowed = allowed_token_mask(tokenizer, model.get_input_embeddings().weight.shape[0])
    config = MessageSearchConfig(steps=args.steps, search_width=args.search_width, topk=args.topk,
                                 batch_tokens=args.batch_tokens)
    warm = config.model_copy(update={"steps": 1})
    length = len(tasks[0].parts[0].prefix_ids) + args.message_tokens + 1 + args.span_tokens
    rows = max(1, args.batch_tokens // length)
    print(f"{described}, torch {torch.__version__} on {torch.get_num_threads()} threads ({os.cpu_count()} cores); "
          f"{args.nodes} nodes x {args.readers} readers, message {args.message_tokens} tokens, span {args.span_tokens}, "
          f"reader context {args.context_tokens} (rows of {length} tokens); steps {args.steps}, width {args.search_width}, "
          f"top-k {args.topk}, batch {args.batch_tokens} tokens; set up in {time.perf_counter() - began:.1f} s")

    def batched() -> list[MessageSearchResult]:
        return search_messages(model, tokenizer, tasks, config, allowed=allowed)

    def one_by_one() -> list[MessageSearchResult]:
        return [search_messages(model, tokenizer, [task], config, allowed=allowed)[0] for task in tasks]

    search_messages(model, tokenizer, tasks, warm, allowed=allowed)
    search_messages(model, tokenizer, tasks[:1], warm, allowed=allowed)
    plain_forward(model, rows, length, args.span_tokens)
    times: dict[str, list[tuple[float, float]]] = {"batched": [], "node by node": [], "limit": []}
    results: dict[str, list[MessageSearchResult]] = {}
    for _ in range(args.repeats):
        for name, run in (("batched", batched), ("node by node", one_by_one)):
            results[name], wall, cpu = timed(run)
            times[name].append((wall, cpu))
        times["limit"].append(timed(lambda: plain_forward(model, rows, length, args.span_tokens))[1:])
    return report(args, times, results, rows * length)


def report(args: argparse.Namespace, times: dict[str, list[tuple[float, float]]],
           results: dict[str, list[MessageSearchResult]], limit_tokens: int) -> int:
    """Print the table and the checks; 0 when both ways found the same messages."""
    median = {name: (statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs))
              for name, runs in times.items()}
    scored = {name: sum(r.scored_tokens for r in found) for name, found in results.items()}
    scored["limit"] = limit_tokens
    limit_rate = limit_tokens / median["limit"][0]
    print(f"\nmedians of {args.repeats} runs")
    print("| engine | wall s | CPU s | scored tokens | tokens/s (wall) | of the limit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (wall, cpu) in median.items():
        rate = scored[name] / wall
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {scored[name]} | {rate:.0f} | {100 * rate / limit_rate:.1f}% |")
    print(f"\nspeedup of batching (node by node / batched, wall): {median['node by node'][0] / median['batched'][0]:.2f}x")
    found = results["batched"]
    print("messages:", " | ".join(f"{r.text!r} {r.initial_loss:.3f}->{r.loss:.3f}" for r in found))
    same, ties = same_messages(found, results["node by node"])
    print(f"same messages batched and node by node: {same}/{len(found)}" + ("" if same == len(found) else
          f" ({'the others are ties within 1e-5' if ties else 'SOME DIFFER'})"))
    return 0 if ties else 1


if __name__ == "__main__":
    sys.exit(main())
