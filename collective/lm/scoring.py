"""Batched language-model operations: teacher-forced scoring of a round, and generation.

Both left-pad a batch of variable-length token sequences (so that the positions that
matter line up at the end), pass explicit position ids, and never loop over positions
in Python for scoring: one forward pass scores every position of a round for every
sequence in the batch. Generation prefills once and then decodes with the KV cache.

Shapes: B sequences, L padded length, R round tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from collective.lm.predictions import TokenPredictions, predictions_from_logits
from controllers.objectives import cache_kwarg as _cache_kwarg


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
    return _decode(
        model, _output_cache(out), out.logits[:, -1, :], mask, positions[:, -1:] + 1,
        max_new_tokens=max_new_tokens, stop_ids=stop_ids, generators=generators, temperatures=temperatures,
    )


def _decode(
    model: torch.nn.Module,
    cache: object,
    logits: torch.Tensor,
    mask: torch.Tensor,
    next_position: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    generators: Sequence[torch.Generator | None],
    temperatures: Sequence[float],
) -> list[list[int]]:
    """Decode from a filled cache. logits (B, V) predict the first new token; mask (B, L)
    covers the cache; next_position (B, 1) is each row's next position id."""
    device = logits.device
    n_rows = logits.shape[0]
    cache_kwarg = _cache_kwarg(model)
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
    [round_inputs[-1]][speak.continuation], left-padded within the batch.
    """
    device = next(model.parameters()).device
    rows = [item.input_ids() for item in items]
    n_round = len(items[0].targets)
    parts: dict[int, TokenPredictions] = {}
    spoken: dict[int, list[int]] = {}
    for group in _chunks([len(r) for r in rows], batch_tokens):
        ids, mask, positions = left_pad([rows[i] for i in group], pad_id)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=n_round)
        targets = torch.stack([items[i].targets for i in group]).to(device)  # (b, R)
        record = predictions_from_logits(out.logits, targets, top_k)
        for j, index in enumerate(group):
            parts[index] = record.select([j])
        tails = [torch.cat([items[i].round_inputs[-1:], speaks[i].continuation]) for i in group]
        cont, cont_mask, cont_pos = left_pad(tails, pad_id)  # (b, C) each
        cont_pos = positions[:, -1:] + 1 + cont_pos.to(device)  # continue each row's positions
        full_mask = torch.cat([mask, cont_mask.to(device)], dim=1)
        out = model(
            input_ids=cont.to(device),
            attention_mask=full_mask,
            position_ids=cont_pos,
            use_cache=True,
            logits_to_keep=1,
            **{_cache_kwarg(model): _output_cache(out)},
        )
        new = _decode(
            model, _output_cache(out), out.logits[:, -1, :], full_mask, cont_pos[:, -1:] + 1,
            max_new_tokens=max(speaks[i].max_new_tokens for i in group),
            stop_ids=stop_ids,
            generators=[speaks[i].generator for i in group],
            temperatures=[speaks[i].temperature for i in group],
        )
        for j, index in enumerate(group):
            spoken[index] = new[j][: speaks[index].max_new_tokens]
    merged = TokenPredictions.stack([parts[i] for i in range(len(items))])
    record = TokenPredictions(
        merged.target_logprob.cpu(), merged.topk_ids.cpu(), merged.topk_logprobs.cpu(), merged.vocab_size
    )
    return record, [spoken[i] for i in range(len(items))]
