"""bench/round_work.py: the work the limits of bench/rounds.py time (pure parts, no model)."""

from __future__ import annotations

import torch

from bench.round_work import distinct, with_messages
from collective.lm.scoring import ScoreItem


def _item(context: list[int], round_ids: list[int]) -> ScoreItem:
    ids = torch.tensor(round_ids)
    return ScoreItem(torch.tensor(context), ids, ids)


def test_with_messages_scores_each_speakers_prompt_in_place_of_its_row_and_counts_each_rounds_longest_decode():
    # two rounds of two rows each (a speaker's collective row, then a row without the bus)
    scored = [_item([1, 2], [5, 6, 7]), _item([1], [5, 6, 7]), _item([1, 3], [8, 9, 4]), _item([1], [8, 9, 4])]
    prompts = [torch.tensor([1, 2, 5, 6, 7, 40, 41]), torch.tensor([1, 3, 8, 9, 4, 40, 41])]
    spoken = [(0, prompts[0], 5), (2, prompts[1], 23)]
    items, steps = with_messages(scored, spoken, n_rounds=2)
    assert steps == 5 + 23
    assert [item.input_ids().tolist() for item in items] == [
        prompts[0].tolist(), [1, 5, 6], prompts[1].tolist(), [1, 8, 9],
    ]
    assert torch.equal(items[0].targets, scored[0].targets)  # the same number of positions kept as the row's
    assert len(scored[0].input_ids()) == 4  # the fair baseline's work is not changed


def test_with_messages_takes_the_longest_message_of_a_round_not_the_sum():
    scored = [_item([1, 2], [5, 6]), _item([1, 3], [5, 6])]
    prompt = torch.tensor([1, 2, 5, 6, 9])
    _, steps = with_messages(scored, [(0, prompt, 7), (1, prompt, 11)], n_rounds=1)
    assert steps == 11


def test_with_messages_leaves_out_a_row_the_prompts_pass_computes():
    # a speaker with an empty inbox: its collective row is its isolated row, which begins its prompt
    scored = [_item([1, 2], [5, 6, 7]), _item([1, 2], [5, 6, 7])]
    prompt = torch.tensor([1, 2, 5, 6, 7, 40])
    items, _ = with_messages(scored, [(0, prompt, 3)], n_rounds=1)
    assert [item.input_ids().tolist() for item in items] == [prompt.tolist()]


def test_distinct_keeps_the_first_of_identical_sequences():
    rows = [_item([1, 2], [3, 4]), _item([1, 2], [3, 4]), _item([1], [2, 3])]
    assert len(distinct(rows)) == 2
