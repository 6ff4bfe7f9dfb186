from __future__ import annotations

import torch

from controllers.filters import (
    allowed_token_mask,
    filter_candidates,
    is_ascii_printable,
    model_token_mask,
    retokenizes,
    special_token_ids,
)
from controllers.gcg import GCGConfig
from controllers.objectives import encode
from controllers.search import GreedyConfig


def test_special_tokens_are_not_allowed_when_the_filter_is_on(tiny_tok):
    special = special_token_ids(tiny_tok)
    assert special, "the tiny tokenizer has <|endoftext|>"
    on = allowed_token_mask(tiny_tok, len(tiny_tok), no_special=True, ascii_only=False)
    off = allowed_token_mask(tiny_tok, len(tiny_tok), no_special=False, ascii_only=False)
    for token_id in special:
        assert not on[token_id]
        assert off[token_id]


def test_ascii_filter_keeps_exactly_the_tokens_that_decode_to_printable_ascii(tiny_tok):
    mask = allowed_token_mask(tiny_tok, len(tiny_tok), no_special=False, ascii_only=True)
    texts = [tiny_tok.decode([i]) for i in range(len(tiny_tok))]
    expected = torch.tensor([is_ascii_printable(text) for text in texts])
    assert torch.equal(mask, expected)
    newline = encode(tiny_tok, "\n")
    assert len(newline) == 1 and not mask[newline[0]]
    assert 0 < int(mask.sum()) < len(tiny_tok)


def test_embedding_rows_beyond_the_tokenizer_are_never_allowed(tiny_tok):
    mask = allowed_token_mask(tiny_tok, len(tiny_tok) + 7, no_special=False, ascii_only=False)
    assert mask.shape == (len(tiny_tok) + 7,)
    assert mask[: len(tiny_tok)].all()
    assert not mask[len(tiny_tok) :].any()


def test_a_prompt_split_into_pieces_of_a_merged_token_fails_retokenization(tiny_tok):
    word = encode(tiny_tok, " the")
    assert len(word) == 1
    pieces = encode(tiny_tok, " ") + encode(tiny_tok, "t") + encode(tiny_tok, "he")
    natural = encode(tiny_tok, " the value of")
    ok = retokenizes(
        tiny_tok, torch.tensor([natural[:3], pieces], dtype=torch.long)
    )  # both rows have 3 tokens
    assert ok.tolist() == [True, False]


def test_filter_candidates_drops_duplicates_and_non_retokenizing_rows_in_order(tiny_tok):
    good = encode(tiny_tok, " the value of")[:3]
    other = encode(tiny_tok, " return a list")[:3]
    bad = encode(tiny_tok, " ") + encode(tiny_tok, "t") + encode(tiny_tok, "he")
    rows = torch.tensor([good, bad, good, other, bad])
    assert filter_candidates(rows, tiny_tok, retokenize=False).tolist() == [good, bad, other]
    assert filter_candidates(rows, tiny_tok, retokenize=True).tolist() == [good, other]
    kept = filter_candidates(rows, tiny_tok, retokenize=True, deduplicate=False)
    assert kept.tolist() == [good, good, other]


def test_the_model_mask_covers_every_embedding_row_with_the_config_switches(tiny_lm, tiny_tok):
    rows = tiny_lm.get_input_embeddings().weight.shape[0]
    for config in (GCGConfig(), GCGConfig(filter_ascii=False), GreedyConfig(filter_special=False)):
        expected = allowed_token_mask(
            tiny_tok, rows, no_special=config.filter_special, ascii_only=config.filter_ascii
        )
        assert torch.equal(model_token_mask(tiny_lm, tiny_tok, config), expected)
