"""Batched language-model operations: teacher-forced scoring of a round, and generation.

Both left-pad a batch of variable-length token sequences (so that the positions that
matter line up at the end), pass explicit position ids, and never loop over positions
in Python for scoring: one forward pass scores every position of a round for every
sequence in the batch. Generation prefills once and then decodes with the KV cache.

Shapes: B sequences, L padded length, R round tokens, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from collective.lm import decoding
from collective.lm.decoding import merge_caches, output_cache
from collective.lm.predictions import TokenPredictions, predictions_from_logits
from controllers.objectives import cache_kwarg as _cache_kwarg


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


PASS_TOKENS = 16  # what one more forward pass costs, in padded tokens of work (CPU, ~135M model)


def _chunks(lengths: Sequence[int], batch_tokens: int, pass_tokens: int = PASS_TOKENS) -> list[list[int]]:
    """Group indices into forward passes, bucketed by length: the groups that minimise padded
    tokens plus `pass_tokens` per pass, each group's padded size (rows x longest) at most
    batch_tokens (a row longer than that goes alone). Rows are sorted longest first, so a
    group is a run of neighbours in that order; an exact dynamic program over the cut points
    (O(n^2) for n rows). Each group lists its indices longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n_rows = len(order)
    best = [0.0] + [math.inf] * n_rows  # best[j]: the cheapest grouping of order[:j]
    cut = [0] * (n_rows + 1)
    for end in range(1, n_rows + 1):
        for start in range(end - 1, -1, -1):
            padded = lengths[order[start]] * (end - start)  # the longest row of the run is its first
            if padded > batch_tokens and end - start > 1:
                break
            cost = best[start] + padded + pass_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = n_rows
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


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
    return decoding.decode(
        model, output_cache(out), out.logits[:, -1, :], mask, positions[:, -1:] + 1,
        budgets=[max_new_tokens] * len(prompts), stop_ids=stop_ids, generators=generators, temperatures=temperatures,
    )


@dataclass(frozen=True)
class Speak:
    """What a scored row says next: `continuation` (C,) is fed after the row's round, then up
    to `max_new_tokens` are decoded (greedy when generator is None)."""

    continuation: torch.Tensor
    max_new_tokens: int
    generator: torch.Generator | None = None
    temperature: float = 1.0


@torch.no_grad()
def score_and_speak(
    model: torch.nn.Module,
    items: Sequence[ScoreItem],
    speaks: Sequence[Speak],
    *,
    pad_id: int,
    top_k: int,
    stop_ids: Sequence[int],
    batch_tokens: int = 8192,
) -> tuple[TokenPredictions, list[list[int]]]:
    """Score each item, then continue the same sequence to write a message, reusing the
    scoring pass's KV cache (the context is not run through the model twice).

    The sequence scored is [context][round_inputs[:-1]]; the message is generated after
    [context][round_inputs][speak.continuation], so the continuation fed to the cache is
    [round_inputs[-1]][speak.continuation], left-padded within the batch. The scoring passes
    are bucketed by length (`_chunks`); their caches are then joined, so that the continuation
    is fed and every message decoded in one batch (`decoding.merge_caches`; per bucket where a
    cache cannot be joined).
    """
    n_round = len(items[0].targets)
    parts: dict[int, TokenPredictions] = {}
    scored: list[_Cached] = []
    for group in _chunks([len(item.input_ids()) for item in items], batch_tokens):
        record, cached = _score_cached(model, [items[i] for i in group], pad_id, top_k, n_round)
        parts |= {index: record.select([j]) for j, index in enumerate(group)}
        scored.append(cached._replace(rows=group))
    joined = merge_caches([c.cache for c in scored], [c.mask for c in scored]) if len(scored) > 1 else None
    if joined is not None:
        rows = [i for c in scored for i in c.rows]
        scored = [_Cached(rows, joined[0], joined[1], torch.cat([c.last_position for c in scored]))]
    spoken: dict[int, list[int]] = {}
    for cached in scored:
        speak = [speaks[i] for i in cached.rows]
        tails = [torch.cat([items[i].round_inputs[-1:], sp.continuation]) for i, sp in zip(cached.rows, speak)]
        cache, logits, mask, next_position = _feed(model, cached, tails, pad_id)
        new = decoding.decode(
            model, cache, logits, mask, next_position, budgets=[sp.max_new_tokens for sp in speak], stop_ids=stop_ids,
            generators=[sp.generator for sp in speak], temperatures=[sp.temperature for sp in speak],
        )
        spoken |= dict(zip(cached.rows, new))
    merged = TokenPredictions.stack([parts[i] for i in range(len(items))])
    record = TokenPredictions(
        merged.target_logprob.cpu(), merged.topk_ids.cpu(), merged.topk_logprobs.cpu(), merged.vocab_size
    )
    return record, [spoken[i] for i in range(len(items))]


class _Cached(NamedTuple):
    """Rows scored with a KV cache: their indices into the items, the cache, the mask over it
    (b, L) and each row's last position id (b, 1)."""

    rows: list[int]
    cache: object
    mask: torch.Tensor
    last_position: torch.Tensor


def _score_cached(
    model: torch.nn.Module, items: Sequence[ScoreItem], pad_id: int, top_k: int, n_round: int
) -> tuple[TokenPredictions, _Cached]:
    """One teacher-forced pass over the items (b rows) that keeps its KV cache."""
    device = next(model.parameters()).device
    ids, mask, positions = (t.to(device) for t in left_pad([item.input_ids() for item in items], pad_id))  # (b, L)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=n_round)
    targets = torch.stack([item.targets for item in items]).to(device)  # (b, R)
    return predictions_from_logits(out.logits, targets, top_k), _Cached([], output_cache(out), mask, positions[:, -1:])


def _feed(
    model: torch.nn.Module, cached: _Cached, tails: Sequence[torch.Tensor], pad_id: int
) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed each row's tail (left-padded to (b, C)) onto the cache. Returns the cache, the logits
    of the last position (b, V), the mask over the cache (b, L + C) and the next position ids (b, 1)."""
    device = cached.mask.device
    cont, cont_mask, cont_pos = left_pad(tails, pad_id)  # (b, C) each
    cont_pos = cached.last_position + 1 + cont_pos.to(device)  # continue each row's positions
    full_mask = torch.cat([cached.mask, cont_mask.to(device)], dim=1)  # (b, L + C)
    out = model(
        input_ids=cont.to(device), attention_mask=full_mask, position_ids=cont_pos, use_cache=True, logits_to_keep=1,
        **{_cache_kwarg(model): cached.cache},
    )
    return output_cache(out), out.logits[:, -1, :], full_mask, cont_pos[:, -1:] + 1
