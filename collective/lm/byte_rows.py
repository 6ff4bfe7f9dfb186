"""Rows in bytes: a member's next-byte distributions over a round, as a `TokenPredictions`
record whose "tokens" are the 256 byte values (a byte-unit run: scenarios whose models do not
share one tokenizer, or `evaluation.unit: byte`).

Every context a node scores (in collective, isolated, plain; the reference; the yardstick) is
token ids of the node's own tokenizer, starting with its start token; the round is bytes. For
each context, the fronts of every byte position of the round are the context followed by the
round's first j bytes encoded on their own (`encode_span`): a token boundary is forced at the
round's start, as the yardstick's is. All contexts of one model and round share one plan of
fronts (`plan_fronts`), and their trees are scored in batched forward passes
(`batch_tree_scorer`). The record keeps all 256 candidates (K = V = 256), so a pool over byte
rows has no recorded tail: it is exact.

Shapes: B bytes of the round, 256 byte values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from collective.lm.byte_vocab import ByteVocab, byte_vocab, encode_span
from collective.lm.bytes import FrontPlan, assemble, batch_tree_scorer, build_tree, plan_fronts
from collective.lm.predictions import TokenPredictions

BYTE_VALUES = 256
LOG_FLOOR = -1.0e4  # log-probability given to a byte no token can start with (probability 0)

_VOCABS: dict[int, tuple[Any, ByteVocab]] = {}  # id(tokenizer) -> (tokenizer, its byte table)


def vocab_of(tokenizer: Any) -> ByteVocab:
    """The tokenizer's byte table, read once per tokenizer object (`byte_vocab`)."""
    held = _VOCABS.get(id(tokenizer))
    if held is None or held[0] is not tokenizer:
        held = (tokenizer, byte_vocab(tokenizer))
        _VOCABS[id(tokenizer)] = held
    return held[1]


def byte_targets(data: bytes) -> torch.Tensor:
    """(B,) int64: the round's bytes, the targets of every byte row."""
    return torch.tensor(list(data), dtype=torch.long)


def as_predictions(logprobs: torch.Tensor, data: bytes) -> TokenPredictions:
    """One row (1, B) from (B, 256) log-probabilities of the next byte; a zero probability is
    kept as LOG_FLOOR, so that pools never meet an infinity."""
    logq = logprobs.clamp(min=LOG_FLOOR).float()  # (B, 256)
    targets = byte_targets(data)
    target = logq.gather(1, targets[:, None]).squeeze(1)  # (B,)
    top, ids = logq.sort(dim=-1, descending=True)
    return TokenPredictions(target[None], ids[None], top[None], BYTE_VALUES)


def byte_rows(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[torch.Tensor],
    data: bytes,
    *,
    batch_nodes: int = 8192,
) -> list[TokenPredictions]:
    """Each context's (1, B) byte row over `data`. contexts: (C_i,) token ids of this model,
    each starting with the start token; data: the round's bytes (B >= 1)."""
    if not data:
        raise ValueError("a byte row needs at least one byte of text")
    vocab = vocab_of(tokenizer)
    plan = plan_fronts(data, 0, len(data), vocab)
    spans = [encode_span(tokenizer, vocab, data[:j]) for j in plan.fronts]
    trees = []
    for context in contexts:
        ids = context.tolist()
        trees.append(build_tree(int(ids[0]), [ids[1:] + span for span in spans]))
    rows: list[TokenPredictions] = []
    for batch in _batches([len(tree) for tree, _ in trees], batch_nodes):
        scorers = batch_tree_scorer(model, [trees[i][0] for i in batch])
        for i, logprobs_of in zip(batch, scorers, strict=True):
            rows.append(_row(plan, trees[i], logprobs_of, vocab))
    return rows


def _row(plan: FrontPlan, tree: Any, logprobs_of: Any, vocab: ByteVocab) -> TokenPredictions:
    dists = assemble(plan, tree[0], tree[1], logprobs_of, vocab)
    return as_predictions(torch.log(dists.probs), plan.data)


def _batches(sizes: list[int], batch_nodes: int) -> list[list[int]]:
    """Consecutive indices grouped so that (group size) x (largest tree) stays within
    `batch_nodes` (at least one tree per group)."""
    groups: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for index, size in enumerate(sizes):
        if current and (len(current) + 1) * max(widest, size) > batch_nodes:
            groups.append(current)
            current, widest = [], 0
        current.append(index)
        widest = max(widest, size)
    if current:
        groups.append(current)
    return groups


def bits_per_byte(row: TokenPredictions) -> float:
    """Mean bits per byte of a (1, B) byte row."""
    return float(-row.target_logprob.mean() / math.log(2.0))
