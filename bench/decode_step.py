"""The decode step of a round's messages against the cost of reading the weights once.

Writes the quickstart's messages (4 rows of Python documentation, ~150-190 tokens each, the
quickstart's speak prompt, sampled at temperature 0.7 from seeded generators, at most 24
tokens) with each variant of the decode loop, side by side (interleaved, median of
`--repeats` after one warm-up), and checks that every variant writes the same tokens:

- before: the loop as it was before issue 24 (every row to the longest budget, the attention
  mask re-allocated each step), kept here as the baseline
- + own budgets: each row stops at its own budget, one mask allocation (`decoding.decode`,
  finished rows kept in the batch)
- + drop finished: finished rows leave the batch (`drop_finished`, the default)
- + packed linears: the same, with oneDNN's packed linear weights (`packed_linear`)

The bound is one pass reading every weight of the model (a sum over each parameter).

    python bench/decode_step.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from collective.lm.codec import start_token, stop_ids
from collective.lm.decoding import decode, output_cache
from collective.lm.models import ModelPool
from collective.lm.scoring import left_pad
from collective.run.runner import prepare
from collective.scenario import load_scenario
from controllers.objectives import cache_kwarg


@torch.no_grad()
def decode_before(model: Any, cache: object, logits: torch.Tensor, mask: torch.Tensor, next_position: torch.Tensor, *,
                  budgets: Sequence[int], stop_ids: Sequence[int], generators: Sequence[torch.Generator | None],
                  temperatures: Sequence[float]) -> list[list[int]]:
    """The decode loop before issue 24 (`collective.lm.scoring._decode`), for the baseline."""
    max_new_tokens, n_rows, device = max(budgets), logits.shape[0], logits.device
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    new_ids: list[list[int]] = [[] for _ in range(n_rows)]
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        chosen = logits.float().argmax(-1)  # (B,)
        for i, gen in enumerate(generators):
            if gen is not None:
                probs = torch.softmax(logits[i].float().cpu() / temperatures[i], dim=-1)
                chosen[i] = torch.multinomial(probs, 1, generator=gen).item()
        is_stop = torch.isin(chosen, stop) if len(stop) else torch.zeros_like(finished)
        for i in range(n_rows):
            if not finished[i] and not is_stop[i]:
                new_ids[i].append(int(chosen[i]))
        finished |= is_stop
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((n_rows, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=chosen.unsqueeze(1), attention_mask=mask, position_ids=next_position, use_cache=True,
                    **{cache_kwarg(model): cache})
        cache, logits, next_position = output_cache(out), out.logits[:, -1, :], next_position + 1
    return [ids[:cap] for ids, cap in zip(new_ids, budgets)]


def prepare_rows(budget: int) -> tuple[Any, Any, list[torch.Tensor]]:
    """The quickstart's model, tokenizer and the 4 rows' prompts (text, then the speak prompt)."""
    scenario = load_scenario(Path(__file__).parent.parent / "scenarios" / "quickstart.yaml")
    prepared = prepare(scenario, ModelPool(), base_dir=Path.cwd())
    lm = prepared.models["smol"]
    speak = lm.tokenizer.encode(scenario.nodes[0].message.speak_prompt, add_special_tokens=False)  # type: ignore[union-attr]
    starts, lengths = (0, 200, 400, 600), (150, 190, 170, 160)
    prompts = [torch.cat([torch.tensor([start_token(lm.tokenizer)]), prepared.stream[s : s + n], torch.tensor(speak)])
               for s, n in zip(starts, lengths)]
    return lm.model, lm.tokenizer, prompts


VARIANTS: dict[str, tuple[Callable[..., list[list[int]]], dict[str, Any]]] = {
    "before": (decode_before, {}),
    "+ own budgets": (decode, {"drop_finished": False, "packed": False}),
    "+ drop finished": (decode, {"drop_finished": True, "packed": False}),
    "+ packed linears": (decode, {"drop_finished": True, "packed": True}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=24)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, prompts = prepare_rows(args.budget)
    ids, mask, positions = left_pad(prompts, start_token(tok))

    def run(loop: Callable[..., list[list[int]]], **options: Any) -> tuple[float, list[list[int]], int]:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            began = time.perf_counter()
            said = loop(model, output_cache(out), out.logits[:, -1, :], mask, positions[:, -1:] + 1,
                        budgets=[args.budget] * len(prompts), stop_ids=stop_ids(tok), generators=gens,
                        temperatures=[0.7] * len(prompts), **options)
            return time.perf_counter() - began, said, max(len(s) for s in said)

    times: dict[str, list[float]] = {name: [] for name in [*VARIANTS, "bound"]}
    said: dict[str, list[list[int]]] = {}
    for repeat in range(args.repeats + 1):  # the first round is a warm-up
        for name, (loop, options) in VARIANTS.items():
            seconds, said[name], steps = run(loop, **options)
            if repeat:
                times[name].append(seconds / steps)
        began = time.perf_counter()
        for p in model.parameters():  # the bound: read every weight once
            p.sum()
        if repeat:
            times["bound"].append(time.perf_counter() - began)
    print(f"{len(prompts)} rows, prompts {[len(p) for p in prompts]} tokens, messages {[len(s) for s in said['before']]} "
          f"tokens, {torch.get_num_threads()} threads; median of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print("\n| decode loop | ms/step | x bound | same tokens as before |\n| --- | ---: | ---: | --- |")
    bound = statistics.median(times["bound"])
    for name in VARIANTS:
        ms = statistics.median(times[name])
        print(f"| {name} | {1e3 * ms:.1f} | {ms / bound:.1f} | {said[name] == said['before']} |")
    print(f"| read every weight once | {1e3 * bound:.1f} | 1.0 | |")
    return 0 if all(said[name] == said["before"] for name in VARIANTS) else 1


if __name__ == "__main__":
    sys.exit(main())
