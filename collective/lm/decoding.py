"""The decode loop of generation: one token a step for every row of a batch, from a filled KV cache.

`decode` takes what a prefill left (the cache, the logits of the last position, the attention
mask over the cache, each row's next position id) and writes each row's message: greedy, or
sampled at the row's temperature from the row's own seeded generator. A row stops at a stop
token or at its own budget of new tokens; a finished row leaves the batch (`drop_finished`), so
the later steps compute only the rows still writing, and the loop ends when every row is done.
On CPU the steps run on packed linear weights (`packed_linear`): a step is bound by reading the
weights. The tokens chosen for a row never depend on the other rows of its batch beyond
floating-point rounding (tested against a plain per-row loop in tests/test_decode.py).

`merge_caches` joins the caches of several prefill passes (rows bucketed by length, so that the
scoring pass pays no padding) into one left-padded batch, so that their messages are decoded
together: decoding reads the weights once a step, whatever the batch size.

Shapes: B rows, L cached positions, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from collective.lm.packed_linear import packed_linears
from controllers.objectives import cache_kwarg


def output_cache(out: object) -> object:
    """The KV cache a forward pass returned (transformers 5 `cache`, or `past_key_values`)."""
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _layers(cache: object) -> list[object] | None:
    """The cache's layers when each is a plain growing (B, H, L, D) key/value pair, else None."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" or getattr(layer, "keys", None) is None for layer in layers):
        return None
    return list(layers)


def merge_caches(caches: Sequence[object], masks: Sequence[torch.Tensor]) -> tuple[object, torch.Tensor] | None:
    """One cache and mask (B, L) for the rows of several, each left-padded to the longest L.

    caches: the groups' caches, keys and values (b_g, H, L_g, D) per layer; masks (b_g, L_g).
    The padded slots hold zeros and are masked out. Returns None when a cache is not made of
    plain growing layers (sliding-window or quantized caches): the caller decodes per group.
    Reuses (and changes) the first cache.
    """
    layers = [_layers(cache) for cache in caches]
    if any(group is None for group in layers):
        return None
    length = max(int(mask.shape[1]) for mask in masks)
    merged: list[object] = layers[0]  # type: ignore[assignment]
    for index, layer in enumerate(merged):
        for name in ("keys", "values"):
            parts = [getattr(group[index], name) for group in layers]  # type: ignore[index]
            setattr(layer, name, torch.cat([F.pad(p, (0, 0, length - p.shape[2], 0)) for p in parts]))  # (B, H, L, D)
    mask = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in masks])  # (B, L)
    return caches[0], mask


def choose_tokens(
    logits: torch.Tensor, generators: Sequence[torch.Generator | None], temperatures: Sequence[float]
) -> torch.Tensor:
    """The next token of each row (B,): argmax of logits (B, V), or for a row with a generator
    one draw from softmax(logits / temperature) in float32 on the CPU (the generator's device)."""
    chosen = logits.float().argmax(-1)  # (B,)
    for i, gen in enumerate(generators):
        if gen is not None:
            probs = torch.softmax(logits[i].float().cpu() / temperatures[i], dim=-1)  # (V,)
            chosen[i] = torch.multinomial(probs, 1, generator=gen).item()
    return chosen


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    cache: object,
    logits: torch.Tensor,
    mask: torch.Tensor,
    next_position: torch.Tensor,
    *,
    budgets: Sequence[int],
    stop_ids: Sequence[int],
    generators: Sequence[torch.Generator | None],
    temperatures: Sequence[float],
    drop_finished: bool = True,
    packed: bool = True,
) -> list[list[int]]:
    """Decode from a filled cache. logits (B, V) predict each row's first new token; mask (B, L)
    covers the cache; next_position (B, 1) is each row's next position id; row i writes at most
    budgets[i] tokens. Returns each row's new ids, without the stop token. `packed`: the steps
    run on oneDNN's packed linear weights where `packed_linear` applies (CPU, float32)."""
    with packed_linears(model, enabled=packed):
        rows = _Rows(budgets, stop_ids, generators, temperatures, drop_finished)
        return _decode_steps(model, cache, logits, mask, next_position, rows)


class _Rows(NamedTuple):
    """What `decode` was asked of each row, and whether finished rows leave the batch."""

    budgets: Sequence[int]
    stop_ids: Sequence[int]
    generators: Sequence[torch.Generator | None]
    temperatures: Sequence[float]
    drop_finished: bool


def _decode_steps(
    model: torch.nn.Module, cache: object, logits: torch.Tensor, mask: torch.Tensor, next_position: torch.Tensor, asked: _Rows
) -> list[list[int]]:
    budgets, stop_ids, generators, temperatures, drop_finished = asked
    n_rows = logits.shape[0]
    stop = set(int(s) for s in stop_ids)
    new_ids: list[list[int]] = [[] for _ in range(n_rows)]
    rows = list(range(n_rows))  # the original index of each batch row
    writing = [budget > 0 for budget in budgets]
    if not any(writing):
        return new_ids
    kwarg = cache_kwarg(model)
    drop_finished = drop_finished and hasattr(cache, "batch_select_indices")
    full_mask = torch.cat([mask, mask.new_ones((n_rows, max(budgets)))], dim=1)  # (B, L + steps), one allocation
    width = mask.shape[1]
    while True:
        # a row that has finished (kept in the batch when drop_finished is off) is not sampled
        chosen = choose_tokens(
            logits, [generators[i] if w else None for i, w in zip(rows, writing)], [temperatures[i] for i in rows]
        ).tolist()
        for row, (index, token) in enumerate(zip(rows, chosen)):
            if writing[row] and token in stop:
                writing[row] = False
            elif writing[row]:
                new_ids[index].append(token)
                writing[row] = len(new_ids[index]) < budgets[index]
        if not any(writing):
            return new_ids
        feed = torch.tensor(chosen, dtype=torch.long, device=logits.device).unsqueeze(1)  # (B, 1)
        if drop_finished and not all(writing):
            keep = [row for row, w in enumerate(writing) if w]
            cache, feed, full_mask, next_position = _select(cache, feed, full_mask, next_position, keep)
            rows, writing = [rows[row] for row in keep], [True] * len(keep)
        width += 1
        out = model(input_ids=feed, attention_mask=full_mask[:, :width], position_ids=next_position, use_cache=True, **{kwarg: cache})
        cache, logits, next_position = output_cache(out), out.logits[:, -1, :], next_position + 1


def _select(
    cache: object, rows_tensor: torch.Tensor, mask: torch.Tensor, next_position: torch.Tensor, rows: list[int]
) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep only batch `rows` (in that order) of the cache (in place), a per-row tensor, the mask
    and the positions."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    cache.batch_select_indices(index)  # type: ignore[attr-defined]
    return cache, rows_tensor[index], mask[index], next_position[index]
