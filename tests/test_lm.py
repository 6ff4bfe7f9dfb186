"""Batched scoring and generation against one-at-a-time references on a float32 tiny Llama."""

from __future__ import annotations

import pytest
import torch

from collective.lm.scoring import ScoreItem, _chunks, generate, left_pad, score_items

R = 6  # round tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _items(vocab: int, lengths: list[int], seed: int = 0) -> list[ScoreItem]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for length in lengths:
        context = torch.randint(1, vocab, (length,), generator=gen)
        round_inputs = torch.randint(1, vocab, (R,), generator=gen)
        targets = round_inputs.clone()
        targets[::2] = torch.randint(1, vocab, (len(targets[::2]),), generator=gen)  # reading != truth
        items.append(ScoreItem(context, round_inputs, targets))
    return items


@torch.no_grad()
def _reference_logprobs(model, item: ScoreItem) -> torch.Tensor:
    """(R, V) log-probabilities from one unpadded, unbatched forward pass."""
    logits = model(input_ids=item.input_ids().unsqueeze(0)).logits[0]  # (C + R - 1, V)
    return torch.log_softmax(logits[-R:].float(), dim=-1)


def test_left_pad_aligns_rows_at_the_end_with_positions_from_zero():
    ids, mask, positions = left_pad([torch.tensor([5, 6, 7]), torch.tensor([9])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions[:, -1].tolist() == [2, 0]
    assert positions[0].tolist() == [0, 1, 2]


def test_chunks_keep_each_padded_group_under_the_token_budget():
    lengths = [5, 40, 12, 33, 7, 40]
    groups = _chunks(lengths, batch_tokens=80)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or max(lengths[i] for i in group) * len(group) <= 80


def test_chunks_bucket_rows_by_length_so_that_padding_is_not_paid():
    lengths = [100, 9, 98, 10, 50, 50]
    assert _chunks(lengths, batch_tokens=100_000, pass_tokens=16) == [[0, 2], [4, 5], [3, 1]]
    assert _chunks([50] * 6, batch_tokens=100_000) == [list(range(6))]  # no padding: one pass
    assert _chunks([12, 11, 10], batch_tokens=100_000, pass_tokens=16) == [[0, 1, 2]]  # a pass costs more than 3 pads


@pytest.mark.parametrize("batch_tokens", [1, 40, 100_000])
def test_batched_left_padded_scoring_equals_one_at_a_time_forward_passes(tiny_lm, tiny_tok, batch_tokens):
    vocab = len(tiny_tok)
    items = _items(vocab, [1, 3, 17, 9, 30, 2])
    scored = score_items(tiny_lm, items, pad_id=0, top_k=5, batch_tokens=batch_tokens)
    assert scored.target_logprob.shape == (len(items), R)
    assert scored.topk_ids.shape == (len(items), R, 5)
    for row, item in enumerate(items):
        logprobs = _reference_logprobs(tiny_lm, item)
        expected = logprobs.gather(-1, item.targets.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(scored.target_logprob[row], expected, atol=1e-5, rtol=1e-5)
        top_values, _ = logprobs.topk(5, dim=-1)
        torch.testing.assert_close(scored.topk_logprobs[row], top_values, atol=1e-5, rtol=1e-5)
        # the top candidates are the reference's (values tied to 1e-5 may swap order)
        chosen = logprobs.gather(-1, scored.topk_ids[row])
        torch.testing.assert_close(chosen, top_values, atol=1e-5, rtol=1e-5)


def test_scoring_uses_the_round_as_read_but_scores_the_true_targets(tiny_lm, tiny_tok):
    (item,) = _items(len(tiny_tok), [4])
    masked = ScoreItem(item.context, torch.full_like(item.round_inputs, 3), item.targets)
    plain, hidden = (score_items(tiny_lm, [x], pad_id=0, top_k=3).target_logprob[0] for x in (item, masked))
    assert torch.allclose(plain[0], hidden[0])  # the first position sees only the context
    assert not torch.allclose(plain[1:], hidden[1:])


def test_scoring_refuses_items_with_different_round_lengths(tiny_lm):
    short = ScoreItem(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([3, 4]))
    long = ScoreItem(torch.tensor([1, 2]), torch.tensor([3, 4, 5]), torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="same number of round tokens"):
        score_items(tiny_lm, [short, long], pad_id=0, top_k=3)


def _prompts(vocab: int, lengths: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]


@torch.no_grad()
def _hf_greedy(model, prompt: torch.Tensor, max_new_tokens: int, eos: int) -> list[int]:
    out = model.generate(
        input_ids=prompt.unsqueeze(0),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos)] if eos in new else new


def test_batched_greedy_generation_equals_hf_generate(tiny_lm, tiny_tok):
    prompts = _prompts(len(tiny_tok), [3, 11, 1, 25])
    ours = generate(
        tiny_lm, prompts, max_new_tokens=12, pad_id=0, stop_ids=[0], generators=[None] * 4, temperatures=[1.0] * 4
    )
    for prompt, new_ids in zip(prompts, ours):
        assert new_ids == _hf_greedy(tiny_lm, prompt, 12, eos=0)
        assert len(new_ids) == 12


def test_generation_stops_at_a_stop_token_and_leaves_it_out(tiny_lm, tiny_tok):
    (prompt,) = _prompts(len(tiny_tok), [9])
    (free,) = generate(tiny_lm, [prompt], max_new_tokens=10, pad_id=0, stop_ids=[], generators=[None], temperatures=[1.0])
    stop = free[4]
    first = free.index(stop)
    (stopped,) = generate(tiny_lm, [prompt], max_new_tokens=10, pad_id=0, stop_ids=[stop], generators=[None], temperatures=[1.0])
    assert stopped == free[:first]


def _sample(model, prompts, seeds, temperature=1.0):
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    return generate(
        model, prompts, max_new_tokens=16, pad_id=0, stop_ids=[], generators=gens, temperatures=[temperature] * len(prompts)
    )


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(tiny_lm, tiny_tok):
    prompts = _prompts(len(tiny_tok), [5, 8])
    first = _sample(tiny_lm, prompts, [1, 2])
    assert first == _sample(tiny_lm, prompts, [1, 2])
    assert first != _sample(tiny_lm, prompts, [3, 4])
    greedy = _sample(tiny_lm, prompts, [None, None])
    assert first != greedy


def test_a_greedy_row_is_unaffected_by_sampling_rows_in_its_batch(tiny_lm, tiny_tok):
    prompts = _prompts(len(tiny_tok), [5, 8, 13])
    alone = _sample(tiny_lm, prompts[1:2], [None])[0]
    mixed = _sample(tiny_lm, prompts, [7, None, 9])
    assert mixed[1] == alone


def test_no_new_tokens_gives_empty_messages(tiny_lm, tiny_tok):
    prompts = _prompts(len(tiny_tok), [5, 8])
    assert generate(tiny_lm, prompts, max_new_tokens=0, pad_id=0, stop_ids=[0], generators=[None, None], temperatures=[1.0, 1.0]) == [[], []]


def test_score_and_speak_scores_like_score_items_and_writes_like_generate(tiny_tok):
    from collective.lm.scoring import Speak, generate, score_and_speak
    from tests.tiny import tiny_llama

    model = tiny_llama(len(tiny_tok)).float()
    gen = torch.Generator().manual_seed(0)
    items = []
    for n in (3, 10, 1, 7):
        round_ids = torch.randint(1, 500, (8,), generator=gen)
        items.append(ScoreItem(torch.randint(1, 500, (n,), generator=gen), round_ids, round_ids))
    speaks = [Speak(torch.randint(1, 500, (c,), generator=gen), cap) for c, cap in ((2, 5), (0, 6), (4, 6), (1, 3))]
    reference = score_items(model, items, pad_id=0, top_k=5)
    prompts = [torch.cat([it.context, it.round_inputs, sp.continuation]) for it, sp in zip(items, speaks)]
    expected = generate(
        model, prompts, max_new_tokens=6, pad_id=0, stop_ids=[], generators=[None] * 4, temperatures=[1.0] * 4
    )
    for batch_tokens in (10_000, 30):  # one batch, and one row per batch
        record, said = score_and_speak(model, items, speaks, pad_id=0, top_k=5, stop_ids=[], batch_tokens=batch_tokens)
        torch.testing.assert_close(record.target_logprob, reference.target_logprob, atol=1e-5, rtol=0)
        assert said == [ids[: sp.max_new_tokens] for ids, sp in zip(expected, speaks)]
