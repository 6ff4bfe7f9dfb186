"""Batched language-model operations: teacher-forced scoring of a round, and generation.

Both left-pad a batch of variable-length token sequences (so that the positions that
matter line up at the end), pass explicit position ids, and never loop over positions
in Python for scoring: one forward pass scores every position of a round for every
sequence in the batch. Generation prefills once and then decodes with the KV cache.

Shapes: B sequences, L padded length, R round tokens, V vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from collective.predictions import TokenPredictions, predictions_from_logits


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.x; accept either."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: object) -> object:
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@dataclass(frozen=True)
class ScoreItem:
    """One sequence to score: predict `targets` (R,) after `context` then `round_inputs[:-1]`."""

    context: torch.Tensor  # (C,) int64, C >= 1
    round_inputs: torch.Tensor  # (R,) what the reader sees of the round
    targets: torch.Tensor  # (R,) the true tokens, scored

    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.context, self.round_inputs[:-1]])  # (C + R - 1,)


def left_pad(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors. Returns ids (B, L), attention mask (B, L), position ids (B, L)."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row) :] = row
            mask[i, length - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _chunks(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices (longest first) so that each group's padded size stays under batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= batch_tokens:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@torch.no_grad()
def score_items(
    model: torch.nn.Module,
    items: Sequence[ScoreItem],
    *,
    pad_id: int,
    top_k: int,
    batch_tokens: int = 8192,
) -> TokenPredictions:
    """Score every item in as few forward passes as memory allows; one record row per item."""
    device = next(model.parameters()).device
    rows = [item.input_ids() for item in items]
    n_round = len(items[0].targets)
    if any(len(item.targets) != n_round for item in items):
        raise ValueError("all items of one batch must score the same number of round tokens")
    parts: dict[int, TokenPredictions] = {}
    for group in _chunks([len(r) for r in rows], batch_tokens):
        ids, mask, positions = left_pad([rows[i] for i in group], pad_id)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=n_round,
            use_cache=False,
        ).logits  # (b, R, V)
        targets = torch.stack([items[i].targets for i in group]).to(device)  # (b, R)
        record = predictions_from_logits(logits, targets, top_k)
        for j, index in enumerate(group):
            parts[index] = record.select([j])
    merged = TokenPredictions.stack([parts[i] for i in range(len(items))])
    return TokenPredictions(
        merged.target_logprob.cpu(), merged.topk_ids.cpu(), merged.topk_logprobs.cpu(), merged.vocab_size
    )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Sequence[int],
    generators: Sequence[torch.Generator | None],
    temperatures: Sequence[float],
) -> list[list[int]]:
    """Continue each prompt, batched, with a KV cache: prefill once, then one token a step.

    A row with generator None decodes greedily, else samples at its temperature from its own
    seeded generator. Returns the new ids of each row, without the stop token.
    """
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    ids, mask, positions = left_pad(prompts, pad_id)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = _output_cache(out)
    cache_kwarg = _cache_kwarg(model)
    logits = out.logits[:, -1, :]  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    new_ids: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        chosen = torch.empty(len(prompts), dtype=torch.long, device=device)
        for i, gen in enumerate(generators):
            if gen is None:
                chosen[i] = logits[i].float().argmax()
            else:
                probs = torch.softmax(logits[i].float().cpu() / temperatures[i], dim=-1)
                chosen[i] = torch.multinomial(probs, 1, generator=gen).item()
        is_stop = torch.isin(chosen, stop) if len(stop) else torch.zeros_like(finished)
        for i in range(len(prompts)):
            if not finished[i] and not is_stop[i]:
                new_ids[i].append(int(chosen[i]))
        finished |= is_stop
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=chosen.unsqueeze(1),
            attention_mask=mask,
            position_ids=next_position,
            use_cache=True,
            **{cache_kwarg: cache},
        )
        cache = _output_cache(out)
        logits = out.logits[:, -1, :]
        next_position = next_position + 1
    return new_ids
