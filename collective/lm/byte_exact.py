"""Exhaustive reference for the next-byte code, for short strings only: every tokenization.

`cover_chain_logprobs` scores each byte of a short string by brute force, summing over covers
whose front is *any* token sequence that spells x[:j] (`fronts="all"`: the exact marginal of
the model's distribution over byte strings, special tokens aside) or only the tokenizer's own
encoding of x[:j] (`fronts="canonical"`: what `collective.lm.bytes` computes, by a different
route: no trie pass, no sorted ranges). The number of tokenizations grows exponentially with the
length, so this is for measuring the gap on strings of a few words (docs/BYTES.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from collective.lm.byte_vocab import ByteVocab
from collective.lm.bytes import TreeScorer, build_tree


def all_tokenizations(data: bytes, vocab: ByteVocab, limit: int = 20_000) -> list[list[list[int]]]:
    """For each j in [0, len(data)], every sequence of text tokens that spells data[:j]."""
    by_bytes: dict[bytes, list[int]] = {}
    for token_id, value in enumerate(vocab.token_bytes):
        if value:
            by_bytes.setdefault(value, []).append(token_id)
    spelled: list[list[list[int]]] = [[[]]]
    spelled += [[] for _ in data]
    for j in range(1, len(data) + 1):
        for i in range(max(0, j - vocab.max_token_bytes), j):
            for token_id in by_bytes.get(data[i:j], []):
                spelled[j].extend(seq + [token_id] for seq in spelled[i])
        if sum(len(s) for s in spelled) > limit:
            raise ValueError(f"more than {limit} tokenizations: use a shorter string")
    return spelled


def _starts(vocab: ByteVocab, prefix: bytes, longer: bool) -> torch.Tensor:
    """(V,) bool: text tokens whose bytes start with prefix (and, if longer, are not just it)."""
    return torch.tensor(
        [b is not None and b.startswith(prefix) and (not longer or len(b) > len(prefix)) for b in vocab.token_bytes]
    )


def cover_chain_logprobs(
    data: bytes,
    *,
    vocab: ByteVocab,
    encode: Callable[[bytes], list[int]],
    root_token: int,
    scorer: TreeScorer,
    fronts: Literal["all", "canonical"],
) -> torch.Tensor:
    """(len(data),) float64: log p(x[n] | x[:n]) for every byte, context empty, by enumeration."""
    if fronts == "all":
        spelled = all_tokenizations(data, vocab)
    else:
        spelled = [[encode(data[:j])] for j in range(len(data) + 1)]
    flat = [(j, seq) for j, seqs in enumerate(spelled) for seq in seqs]
    tree, ends = build_tree(root_token, [seq for _, seq in flat])
    logprobs = scorer(tree)(torch.arange(len(tree))).double()  # (K, V)
    path = torch.zeros(len(tree), dtype=torch.float64)
    for node in range(1, len(tree)):
        parent = int(tree.parents[node])
        path[node] = path[parent] + logprobs[parent, int(tree.tokens[node])]
    probs = logprobs.exp()
    out = torch.zeros(len(data), dtype=torch.float64)
    for n in range(len(data)):
        hit = torch.zeros((), dtype=torch.float64)  # P(x[:n+1])
        total = torch.zeros((), dtype=torch.float64)  # sum over b of P(x[:n] b)
        for (j, _), node in zip(flat, ends, strict=True):
            if j > n:
                continue
            weight, row, part = path[node].exp(), probs[node], data[j:n]
            hit += weight * row[_starts(vocab, data[j : n + 1], longer=False)].sum()
            total += weight * row[_starts(vocab, part, longer=True)].sum()
        out[n] = (hit / total).log()
    return out
