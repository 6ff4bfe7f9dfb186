"""Which tokens a control prompt may use, and which candidate prompts survive a text round trip.

Two kinds of filter, each switchable:

- per token, computed once per tokenizer into a boolean mask over the model's vocabulary
  (`allowed_token_mask`): no special tokens, ASCII-printable only. Rows of the embedding
  matrix beyond the tokenizer's vocabulary (padding rows) are never allowed.
- per candidate (`retokenizes`): decoding the ids to text and encoding the text again gives
  the same ids, so that a prompt survives travelling as text over the bus.

`filter_candidates` applies the per-candidate filter and drops duplicates; `model_token_mask`
is the per-token mask over a model's embedding rows, switched by a search config.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from controllers.objectives import input_embedding


class TokenFilters(Protocol):
    """The per-token switches a search config carries (GCGConfig, GreedyConfig)."""

    @property
    def filter_special(self) -> bool: ...

    @property
    def filter_ascii(self) -> bool: ...


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of every special token the tokenizer knows, including added special tokens."""
    ids = {int(i) for i in tokenizer.all_special_ids if i is not None}
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special:
            ids.add(int(token_id))
    return ids


def is_ascii_printable(text: str) -> bool:
    """Non-empty, ASCII only, and printable (spaces allowed; newlines and tabs not)."""
    return bool(text) and text.isascii() and text.isprintable()


def allowed_token_mask(
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    *,
    no_special: bool = True,
    ascii_only: bool = True,
) -> Tensor:
    """Boolean mask (V,) of the tokens a control prompt may contain; V = `vocab_size`.

    `vocab_size` is the number of rows of the model's input embedding matrix, which may be
    larger than the tokenizer's vocabulary (padded); ids the tokenizer cannot decode are
    never allowed.
    """
    n_tokenizer = min(len(tokenizer), vocab_size)
    mask = torch.zeros(vocab_size, dtype=torch.bool)  # (V,)
    mask[:n_tokenizer] = True
    if no_special:
        for token_id in special_token_ids(tokenizer):
            if 0 <= token_id < vocab_size:
                mask[token_id] = False
    if ascii_only:
        texts = tokenizer.batch_decode([[i] for i in range(n_tokenizer)])
        for token_id, text in enumerate(texts):
            if not is_ascii_printable(text):
                mask[token_id] = False
    return mask


def model_token_mask(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, filters: TokenFilters
) -> Tensor:
    """`allowed_token_mask` (V,) over the rows of the model's input embedding matrix, with
    the special-token and ASCII filters switched as `filters` says."""
    weight, _ = input_embedding(model)
    return allowed_token_mask(
        tokenizer,
        weight.shape[0],
        no_special=filters.filter_special,
        ascii_only=filters.filter_ascii,
    )


def retokenizes(tokenizer: PreTrainedTokenizerBase, candidates: Tensor) -> Tensor:
    """Which candidates (B, k) decode to text that encodes back to the same k ids: (B,) bool."""
    texts = tokenizer.batch_decode(candidates.tolist())
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = candidates.tolist()
    return torch.tensor(
        [list(enc) == row for enc, row in zip(encoded, rows, strict=True)], dtype=torch.bool
    )


def filter_candidates(
    candidates: Tensor,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    retokenize: bool = False,
    deduplicate: bool = True,
) -> Tensor:
    """Keep the candidates (B, k) that pass the switched-on filters: returns (B', k), B' <= B.

    Order is preserved (the first of each duplicate is kept), so the result is deterministic.
    """
    keep = torch.ones(candidates.shape[0], dtype=torch.bool)  # (B,)
    if deduplicate and candidates.shape[0] > 1:
        _, inverse = torch.unique(candidates, dim=0, return_inverse=True)
        first_seen: set[int] = set()
        for row, group in enumerate(inverse.tolist()):
            if group in first_seen:
                keep[row] = False
            first_seen.add(group)
    if retokenize:
        if tokenizer is None:
            raise ValueError("filter_retokenize: needs the tokenizer")
        keep &= retokenizes(tokenizer, candidates)
    return candidates[keep.to(candidates.device)]
