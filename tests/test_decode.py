"""The decode loop, the joined caches of bucketed passes and the packed linears, each against a
plain per-row loop (one unbatched, uncached forward pass per token) on tiny random models."""

from __future__ import annotations

import pytest
import torch

from collective.lm.decoding import decode, output_cache
from collective.lm.packed_linear import packable, packed_linears
from collective.lm.scoring import ScoreItem, Speak, _chunks, left_pad, score_and_speak, score_items
from tests.tiny import tiny_gemma3, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@torch.no_grad()
def plain_loop(model, prompt: torch.Tensor, budget: int, stop: list[int], seed: int | None = None,
               temperature: float = 1.0) -> list[int]:
    """One row, no batch, no cache: a full forward pass of prompt + what was written, per token."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    new: list[int] = []
    while len(new) < budget:
        logits = model(input_ids=torch.cat([prompt, torch.tensor(new, dtype=torch.long)]).unsqueeze(0)).logits[0, -1]
        if gen is None:
            token = int(logits.float().argmax())
        else:
            token = int(torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1, generator=gen))
        if token in stop:
            break
        new.append(token)
    return new


@torch.no_grad()
def batched(model, prompts, budgets, stop, seeds, temperature=1.0, drop_finished=True, packed=True) -> list[list[int]]:
    ids, mask, positions = left_pad(prompts, pad_id=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    return decode(model, output_cache(out), out.logits[:, -1, :], mask, positions[:, -1:] + 1, budgets=budgets,
                  stop_ids=stop, generators=gens, temperatures=[temperature] * len(prompts), drop_finished=drop_finished, packed=packed)


def _prompts(vocab: int, lengths: list[int], seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]


@pytest.fixture(scope="module")
def model(tiny_tok):
    return tiny_llama(len(tiny_tok)).float().eval()


@pytest.mark.parametrize(("drop_finished", "packed"), [(True, True), (False, True), (True, False)])
def test_batched_decode_writes_what_a_plain_per_row_loop_writes(model, tiny_tok, drop_finished, packed):
    prompts = _prompts(len(tiny_tok), [3, 17, 1, 9, 25])
    budgets = [12, 4, 0, 9, 12]
    free = [plain_loop(model, p, b, []) for p, b in zip(prompts, budgets)]
    stop = [free[1][2], free[3][5]]  # rows 1 and 3 meet a stop token before their budget
    expected = [plain_loop(model, p, b, stop) for p, b in zip(prompts, budgets)]
    assert len(expected[1]) < 4 and expected[2] == []
    assert batched(model, prompts, budgets, stop, [None] * 5, drop_finished=drop_finished, packed=packed) == expected


@pytest.mark.parametrize("drop_finished", [True, False])
def test_sampled_rows_draw_from_their_own_generators_as_a_plain_loop_does(model, tiny_tok, drop_finished):
    prompts = _prompts(len(tiny_tok), [4, 11, 7])
    budgets, seeds = [3, 10, 10], [1, None, 2]
    expected = [plain_loop(model, p, b, [], s, temperature=0.7) for p, b, s in zip(prompts, budgets, seeds)]
    assert batched(model, prompts, budgets, [], seeds, temperature=0.7, drop_finished=drop_finished) == expected


def _speakers(vocab: int, lengths: list[int]) -> tuple[list[ScoreItem], list[Speak]]:
    gen = torch.Generator().manual_seed(3)
    items, speaks = [], []
    for n in lengths:
        round_ids = torch.randint(1, vocab, (6,), generator=gen)
        items.append(ScoreItem(torch.randint(1, vocab, (n,), generator=gen), round_ids, round_ids))
        speaks.append(Speak(torch.randint(1, vocab, (2,), generator=gen), max_new_tokens=7,
                            generator=torch.Generator().manual_seed(n), temperature=0.8))
    return items, speaks


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gemma3], ids=["llama (caches joined)", "gemma3 (per bucket)"])
def test_bucketed_score_and_speak_scores_and_writes_like_one_row_at_a_time(tiny_tok, make_model):
    model = make_model(len(tiny_tok)).float().eval()
    lengths = [40, 3, 38, 12, 2]
    items, speaks = _speakers(len(tiny_tok), lengths)
    assert len(_chunks([len(it.input_ids()) for it in items], 8192)) > 1  # several buckets, no padding paid
    record, said = score_and_speak(model, items, speaks, pad_id=0, top_k=5, stop_ids=[])
    for row, (item, speak) in enumerate(zip(items, speaks)):
        alone = score_items(model, [item], pad_id=0, top_k=5)
        torch.testing.assert_close(record.target_logprob[row], alone.target_logprob[0], atol=1e-5, rtol=0)
        prompt = torch.cat([item.context, item.round_inputs, speak.continuation])
        assert said[row] == plain_loop(model, prompt, speak.max_new_tokens, [], seed=lengths[row], temperature=0.8)


@pytest.mark.skipif(not packable(torch.nn.Linear(2, 2)), reason="needs oneDNN on the CPU")
def test_packed_linears_match_the_plain_linears_and_are_restored_after(model, tiny_tok):
    ids = _prompts(len(tiny_tok), [13])[0].unsqueeze(0)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with packed_linears(model):
            packed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)  # float32 rounding, another summation order
    assert torch.equal(after, plain)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_packed_linears_stay_off_where_they_do_not_apply(model, monkeypatch):
    import collective.lm.packed_linear as packed_linear

    monkeypatch.setattr(packed_linear, "MAX_PACKED_BYTES", 16)  # a model too big to copy
    assert not packable(model)
    with packed_linears(model):
        assert not any("forward" in m.__dict__ for m in model.modules())
