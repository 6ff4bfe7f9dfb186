"""Byte rows (collective/lm/byte_rows.py): every context of a round scored in batched tree passes."""

from __future__ import annotations

import pytest
import torch

from collective.lm.byte_rows import BYTE_VALUES, LOG_FLOOR, byte_rows, vocab_of
from collective.lm.byte_vocab import encode_span
from collective.lm.bytes import model_tree_scorer, next_byte_distributions
from tests.test_bytes import SAMPLE, byte_fallback_tokenizer
from tests.tiny import tiny_gemma3, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_by_one(model, tokenizer, context: list[int], data: bytes) -> torch.Tensor:
    """The plain route: one context, its own tree pass, the context as the fronts' common start."""
    vocab = vocab_of(tokenizer)
    got = next_byte_distributions(
        data, 0, len(data), vocab=vocab, encode=lambda b: context[1:] + encode_span(tokenizer, vocab, b),
        root_token=context[0], scorer=model_tree_scorer(model),
    )
    return got.probs


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batched_rows_are_each_context_scored_on_its_own(tiny_tok, family):
    tokenizer = tiny_tok if family == "llama" else byte_fallback_tokenizer()
    model = tiny_llama(len(tokenizer), seed=4) if family == "llama" else tiny_gemma3(len(tokenizer), seed=4)
    start = 0 if family == "llama" else 2
    data = SAMPLE[:37]  # ends inside 东 (3 bytes): the last fronts end in byte tokens
    contexts = [
        torch.tensor([start] + tokenizer.encode("Some words before", add_special_tokens=False)),
        torch.tensor([start]),
        torch.tensor([start] + tokenizer.encode("x", add_special_tokens=False) * 9),
    ]
    rows = byte_rows(model, tokenizer, contexts, data, batch_nodes=10_000)
    assert [row.n_positions for row in rows] == [len(data)] * 3
    for row, context in zip(rows, contexts):
        want = _one_by_one(model, tokenizer, context.tolist(), data)
        probs = row.topk_logprobs[0].exp()  # (B, 256), sorted
        assert row.vocab_size == BYTE_VALUES and row.topk_ids.shape[-1] == BYTE_VALUES
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(data)), atol=1e-5, rtol=0)
        back = torch.zeros_like(probs).scatter(1, row.topk_ids[0], probs)
        torch.testing.assert_close(back.double(), want.clamp(min=0), atol=2e-5, rtol=0)
        targets = torch.tensor(list(data))
        torch.testing.assert_close(row.target_logprob[0], back.log().gather(1, targets[:, None]).squeeze(1).clamp(min=LOG_FLOOR))


def test_small_batches_give_the_one_batch_rows(tiny_tok):
    model = tiny_llama(len(tiny_tok), seed=6)
    contexts = [torch.tensor([0] + tiny_tok.encode(w, add_special_tokens=False)) for w in ("a b c", "The cat", "")]
    data = b" sat on the mat."
    whole = byte_rows(model, tiny_tok, contexts, data, batch_nodes=100_000)
    apart = byte_rows(model, tiny_tok, contexts, data, batch_nodes=1)
    for a, b in zip(whole, apart):
        torch.testing.assert_close(a.target_logprob, b.target_logprob, atol=1e-5, rtol=0)


def test_the_context_changes_the_row(tiny_tok):
    model = tiny_llama(len(tiny_tok), seed=8)
    data = b"The cat"
    a, b = byte_rows(model, tiny_tok, [torch.tensor([0]), torch.tensor([0] + [5] * 6)], data)
    assert (a.target_logprob - b.target_logprob).abs().max() > 1e-3
