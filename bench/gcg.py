"""Benchmark: our GCG engine, with and without its prefix KV cache, against nanoGCG 0.3.0.

Three engines search a control suffix u for the layout [context][u][target] on the same
(context, target) pairs cut from WikiText-2, where target is the true next token of the
context and not the model's argmax (so that every pair needs a search), from the same
initial prompt ("x x x ..."), with the same search width, top-k, n_replace=1, no buffer,
the non-ASCII and re-tokenization filters on, early stop on success and the same step
budget:

- ours: `run_gcg` with the context's KV cache computed once and copied per batch;
- ours, no cache: the same engine with `use_prefix_cache=False` (the context is run again
  for every candidate), so that the cache's share of the difference to nanoGCG shows;
- nanoGCG 0.3.0 with `use_prefix_cache=False`: its prefix cache passes a list of tensors
  as past_key_values, which transformers 5 no longer accepts (it also needs scipy, which
  nanogcg.gcg imports). The model's chat template is replaced by a plain concatenation so
  that every engine sees the same tokens: [bos][context][u][target].

Each pair runs the three engines one after the other, so that all see the same machine
load. A step is timed from one gradient computation to the next (setup, such as
nanoGCG's vocabulary scan, is excluded for all), in wall time and in this process's CPU
time. Success is checked the same way for every engine: the prompt text it returns is
encoded after the context, and one plain forward pass must make every target token the
greedy argmax. "claimed" is what the engine itself reported.

    python bench/gcg.py --threads 2          # 30 pairs, 5 steps, width 24, top-k 64: ~12 min
    python bench/gcg.py --pairs 3 --steps 2 --threads 1     # a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import controllers.gcg
from collective.lm.models import load_model
from controllers.filters import allowed_token_mask
from controllers.gcg import GCGConfig, run_gcg
from controllers.objectives import default_prefix_ids, encode, target_objective

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = "../shared/data/wikitext-2-raw/wiki.test.raw"
PLAIN_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
ENGINES = ("ours", "ours, no cache", "nanoGCG 0.3.0")


class StepClock:
    """Stamps wall and CPU time at each gradient call (the start of a step) and at the end.

    CPU time (`time.process_time`, all threads of this process) is reported beside wall
    time because on a shared machine other processes stretch wall time unevenly."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def stamp(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.stamp()
            return function(*args, **kwargs)

        return timed

    @contextlib.contextmanager
    def timing(self, owner: object, name: str) -> Iterator[None]:
        """Stamp at every call of `owner.name` (the start of a step) inside the block; the
        original is put back on the way out."""
        original = getattr(owner, name)
        setattr(owner, name, self.wrap(original))
        try:
            yield
        finally:
            setattr(owner, name, original)

    def steps(self) -> tuple[list[float], list[float]]:
        """Per-step (wall, cpu) seconds; call after a final `stamp()`."""
        wall = [b - a for a, b in zip(self.wall, self.wall[1:], strict=False)]
        cpu = [b - a for a, b in zip(self.cpu, self.cpu[1:], strict=False)]
        return wall, cpu


@dataclass
class Run:
    engine: str
    claimed: bool  # what the engine reported
    success: bool  # checked here, the same way for every engine
    steps: int
    step_wall_s: list[float]
    step_cpu_s: list[float]
    loss: float
    prompt: str


@torch.no_grad()
def next_logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def draw_pairs(model: Any, tokenizer: Any, text: str, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(context text, target text) pairs: the target is the true next token, ranked 1..max_rank
    by the model (not the argmax), and both strings re-tokenize to the same ids."""
    stream = encode(tokenizer, text)
    generator = torch.Generator().manual_seed(args.seed)
    prefix = default_prefix_ids(tokenizer)
    pairs: list[tuple[str, str]] = []
    for _ in range(20 * args.pairs + 1000):
        if len(pairs) == args.pairs:
            break
        start = int(torch.randint(0, len(stream) - args.context_tokens - 1, (1,), generator=generator))
        context_ids = stream[start : start + args.context_tokens]
        target_id = stream[start + args.context_tokens]
        context, target = tokenizer.decode(context_ids), tokenizer.decode([target_id])
        if "\n" in context + target or not target.strip() or not target.isascii():
            continue
        if encode(tokenizer, context) != context_ids or encode(tokenizer, target) != [target_id]:
            continue
        logits = next_logits(model, prefix + context_ids)
        rank = int((logits > logits[target_id]).sum())
        if 1 <= rank <= args.max_rank:
            pairs.append((context, target))
    return pairs


def reaches(model: Any, tokenizer: Any, context: str, prompt: str, target: str) -> bool:
    """The one success check for every engine: [bos][context][prompt] as the engines lay it
    out (context and prompt encoded apart), then each target token must be the argmax of a
    plain forward pass."""
    ids = default_prefix_ids(tokenizer) + encode(tokenizer, context) + encode(tokenizer, prompt)
    for token in encode(tokenizer, target):
        if int(next_logits(model, ids).argmax()) != token:
            return False
        ids.append(token)
    return True


def shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every engine takes under the same names: the same budget for each."""
    return {
        "num_steps": args.steps,
        "search_width": args.search_width,
        "batch_size": args.batch_size,
        "topk": args.topk,
        "n_replace": 1,
        "buffer_size": 0,
        "early_stop": True,
        "seed": args.seed,
    }


def run_ours(model: Any, tokenizer: Any, context: str, target: str, args: argparse.Namespace,
             allowed: torch.Tensor, cached: bool) -> Run:
    objective = target_objective(model, tokenizer, target, prefix=context, use_prefix_cache=cached)
    config = GCGConfig(**shared_settings(args), filter_ascii=True, filter_retokenize=True)
    clock = StepClock()
    with clock.timing(controllers.gcg, "one_hot_gradient"):
        result = run_gcg(model, tokenizer, objective, config, init_ids=encode(tokenizer, args.init), allowed=allowed)
    clock.stamp()
    wall, cpu = clock.steps()
    assert encode(tokenizer, result.best_text) == result.best_ids  # the re-tokenization filter
    ok = reaches(model, tokenizer, context, result.best_text, target)
    name = ENGINES[0] if cached else ENGINES[1]
    return Run(name, result.success, ok, result.steps, wall, cpu, result.best_loss, result.best_text)


def run_nanogcg(model: Any, tokenizer: Any, context: str, target: str, args: argparse.Namespace) -> Run:
    import nanogcg
    import nanogcg.gcg

    clock = StepClock()
    config = nanogcg.GCGConfig(
        **shared_settings(args),
        optim_str_init=args.init,
        use_prefix_cache=False,  # its list-of-tensors cache breaks on transformers 5
        allow_non_ascii=False,
        filter_ids=True,
        verbosity="ERROR",
    )
    nanogcg.gcg.tqdm = lambda steps: steps  # no progress bar inside our table
    search = nanogcg.gcg.GCG(model, tokenizer, config)
    try:
        with clock.timing(nanogcg.gcg.GCG, "compute_token_gradient"):
            result = search.run(context, target)
    finally:
        torch.use_deterministic_algorithms(False)  # nanoGCG turns it on globally with a seed
    clock.stamp()
    wall, cpu = clock.steps()
    ok = reaches(model, tokenizer, context, result.best_string, target)
    claimed = bool(getattr(search, "stop_flag", False))  # its early stop: some candidate hit the target
    return Run(ENGINES[2], claimed, ok, len(wall), wall, cpu, float(result.best_loss), result.best_string)


@dataclass
class Summary:
    success_rate: float
    claimed_rate: float
    step_wall_s: float  # median over every step of every pair
    step_cpu_s: float
    search_wall_s: float  # median over pairs of a search's total step time (a failure runs its budget)
    search_cpu_s: float
    solved_wall_s: float | None  # median over the pairs every engine solved of the time to success
    solved_cpu_s: float | None


def summarize(runs: list[Run], solved_by_all: list[int]) -> Summary:
    solved = [runs[i] for i in solved_by_all]
    return Summary(
        success_rate=sum(run.success for run in runs) / len(runs),
        claimed_rate=sum(run.claimed for run in runs) / len(runs),
        step_wall_s=statistics.median(t for run in runs for t in run.step_wall_s),
        step_cpu_s=statistics.median(t for run in runs for t in run.step_cpu_s),
        search_wall_s=statistics.median(sum(run.step_wall_s) for run in runs),
        search_cpu_s=statistics.median(sum(run.step_cpu_s) for run in runs),
        solved_wall_s=statistics.median(sum(r.step_wall_s) for r in solved) if solved else None,
        solved_cpu_s=statistics.median(sum(r.step_cpu_s) for r in solved) if solved else None,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="WikiText-2 raw text, relative to the repo")
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--search-width", type=int, default=24)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--context-tokens", type=int, default=24)
    parser.add_argument("--max-rank", type=int, default=10, help="targets the model ranks 1..max-rank")
    parser.add_argument("--init", default="x x x x x x x x x x", help="initial control string")
    parser.add_argument("--corpus-chars", type=int, default=300_000, help="read this much of the corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="every engine runs in it (float32 is the faster one on a CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is fastest on an oversubscribed machine)")
    return parser.parse_args()


def print_tables(results: dict[str, list[Run]]) -> None:
    """The summary table, and per-pair ratios (medians over the same pairs)."""
    n_pairs = len(results[ENGINES[0]])
    solved_by_all = [i for i in range(n_pairs) if all(results[e][i].success for e in ENGINES)]
    summaries = {engine: summarize(runs, solved_by_all) for engine, runs in results.items()}

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(f"\nmedians; 'solved by all': the {len(solved_by_all)} pairs that every engine solved (checked)")
    print("| engine | success (checked) | claimed | s/step wall | s/step cpu | s/search wall | s/search cpu "
          "| s/solved-by-all wall | s/solved-by-all cpu |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for engine, row in summaries.items():
        print(f"| {engine} | {100 * row.success_rate:.0f}% | {100 * row.claimed_rate:.0f}% | {row.step_wall_s:.3f} | "
              f"{row.step_cpu_s:.3f} | {row.search_wall_s:.2f} | {row.search_cpu_s:.2f} | "
              f"{fmt(row.solved_wall_s)} | {fmt(row.solved_cpu_s)} |")

    def per_pair(slow: str, fast: str) -> str:
        """Median over pairs of the ratio of median step times (wall, cpu)."""
        ratios = [
            (statistics.median(a.step_wall_s) / statistics.median(b.step_wall_s),
             statistics.median(a.step_cpu_s) / statistics.median(b.step_cpu_s))
            for a, b in zip(results[slow], results[fast]) if a.step_wall_s and b.step_wall_s
        ]
        if not ratios:
            return "-"
        return f"{statistics.median(r[0] for r in ratios):.2f}x wall, {statistics.median(r[1] for r in ratios):.2f}x cpu"

    print("\nper step, median over pairs of the ratio:")
    print(f"  the prefix cache (ours, no cache / ours):       {per_pair(ENGINES[1], ENGINES[0])}")
    print(f"  the rest (nanoGCG / ours, no cache):            {per_pair(ENGINES[2], ENGINES[1])}")
    print(f"  in all (nanoGCG / ours):                        {per_pair(ENGINES[2], ENGINES[0])}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("nanogcg").setLevel(logging.ERROR)
    corpus = Path(args.corpus)
    corpus = corpus if corpus.is_absolute() else REPO / corpus
    text = corpus.read_text(encoding="utf-8")[: args.corpus_chars]
    began = time.perf_counter()
    loaded = load_model("smollm2-135m", device="cpu", dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenizer.chat_template = PLAIN_TEMPLATE
    pairs = draw_pairs(model, tokenizer, text, args)
    allowed = allowed_token_mask(tokenizer, model.get_input_embeddings().weight.shape[0])
    print(f"SmolLM2-135M {args.dtype}, torch {torch.__version__} on {torch.get_num_threads()} threads "
          f"({os.cpu_count()} cores); {len(pairs)} pairs (context {args.context_tokens} tokens, targets ranked "
          f"1..{args.max_rank}); steps {args.steps}, search width {args.search_width}, top-k {args.topk}, "
          f"control {len(encode(tokenizer, args.init))} tokens; set up in {time.perf_counter() - began:.1f} s")
    results: dict[str, list[Run]] = {engine: [] for engine in ENGINES}
    for index, (context, target) in enumerate(pairs):
        runs = [
            run_ours(model, tokenizer, context, target, args, allowed, cached=True),
            run_ours(model, tokenizer, context, target, args, allowed, cached=False),
            run_nanogcg(model, tokenizer, context, target, args),
        ]
        line = " | ".join(
            f"{run.engine} {'ok' if run.success else '--'}{'' if run.claimed == run.success else '(claimed)'} "
            f"{run.steps} steps {sum(run.step_wall_s):.1f}s" for run in runs
        )
        print(f"[{index + 1}/{len(pairs)}] ...{context[-30:]!r} -> {target!r}: {line}", flush=True)
        for run in runs:
            results[run.engine].append(run)
    print_tables(results)
    print(f"\nwhole run {time.perf_counter() - began:.0f} s; load average at the end: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
