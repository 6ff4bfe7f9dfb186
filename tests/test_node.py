"""One node's round: its three contexts, deduplicated scoring, and its message."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import collective.run.node as node_module
from collective.run.node import NodeRoundRequest, compute_rounds, start_token
from collective.scenario import GenerateMessage, RelayMessage, SilentMessage

R = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stream(tok) -> torch.Tensor:
    from tests.tiny import pydoc_text

    return torch.tensor(tok.encode(pydoc_text()[:4000], add_special_tokens=False))


def _request(tok, node_id="a", *, prefix=(100, 130), control="", inbox="", message=None, seed=0, round_index=4, budget=6):
    stream = _stream(tok)
    start = prefix[1]
    return NodeRoundRequest(
        node_id=node_id,
        round_index=round_index,
        control_ids=tok.encode(control, add_special_tokens=False) if control else [],
        prefix_ids=stream[prefix[0] : prefix[1]],
        round_inputs=stream[start : start + R],
        targets=stream[start : start + R],
        message=message or SilentMessage(),
        message_tokens=budget,
        seed=seed,
        inbox_text=inbox,
    )


def _run(model, tok, requests):
    return compute_rounds(model, tok, requests, top_k=8, batch_tokens=4096)


@pytest.fixture
def scored(monkeypatch, tiny_lm, tiny_tok):
    """Runs compute_rounds; returns its results and how many sequences it scored."""
    counts: list[int] = []
    real = node_module.score_items

    def counting(model, items, **kwargs):
        counts.append(len(items))
        return real(model, items, **kwargs)

    monkeypatch.setattr(node_module, "score_items", counting)

    def run(requests):
        counts.clear()
        results = _run(tiny_lm, tiny_tok, requests)
        return results, sum(counts)

    return run


def test_without_control_prompt_or_inbox_the_three_rows_are_one_scored_sequence(tiny_tok, scored):
    (result,), n_scored = scored([_request(tiny_tok)])
    assert n_scored == 1
    assert torch.equal(result.collective.target_logprob, result.isolated.target_logprob)
    assert torch.equal(result.isolated.target_logprob, result.plain.target_logprob)
    assert torch.equal(result.isolated.topk_ids, result.plain.topk_ids)


def test_nodes_with_the_same_view_and_no_messages_share_one_scored_sequence(tiny_tok, scored):
    results, n_scored = scored([_request(tiny_tok, "a"), _request(tiny_tok, "b"), _request(tiny_tok, "c", prefix=(90, 130))])
    assert n_scored == 2
    assert torch.equal(results[0].plain.target_logprob, results[1].plain.target_logprob)
    assert not torch.equal(results[0].plain.target_logprob, results[2].plain.target_logprob)


def test_an_inbox_changes_only_the_collective_row(tiny_tok, scored):
    (quiet,), _ = scored([_request(tiny_tok)])
    (told,), n_scored = scored([_request(tiny_tok, inbox="b: the answer is here\n")])
    assert n_scored == 2  # the inbox adds one sequence; isolated == plain still
    assert not torch.allclose(told.collective.target_logprob, quiet.collective.target_logprob)
    assert torch.equal(told.isolated.target_logprob, quiet.isolated.target_logprob)
    assert torch.equal(told.plain.target_logprob, quiet.plain.target_logprob)
    assert told.inbox_tokens == len(tiny_tok.encode("b: the answer is here\n", add_special_tokens=False))
    assert quiet.inbox_tokens == 0


def test_a_control_prompt_changes_the_isolated_and_collective_rows_not_the_plain_one(tiny_tok, scored):
    (quiet,), _ = scored([_request(tiny_tok)])
    (steered,), n_steered = scored([_request(tiny_tok, control="Answer well:")])
    (both,), n_both = scored([_request(tiny_tok, control="Answer well:", inbox="b: hint\n")])
    assert (n_steered, n_both) == (2, 3)
    # the same sequence in another batch: equal up to float noise
    torch.testing.assert_close(steered.plain.target_logprob, quiet.plain.target_logprob, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered.isolated.target_logprob, quiet.isolated.target_logprob)
    assert torch.equal(steered.collective.target_logprob, steered.isolated.target_logprob)
    assert torch.equal(both.isolated.target_logprob, steered.isolated.target_logprob)
    assert not torch.allclose(both.collective.target_logprob, both.isolated.target_logprob)


@torch.no_grad()
def test_target_logprobs_equal_cross_entropy_of_an_independent_forward_pass(tiny_lm, tiny_tok):
    control, inbox = "Answer well:", "b: a hint\n"
    requests = [
        _request(tiny_tok, "a", control=control, inbox=inbox),
        _request(tiny_tok, "b", prefix=(120, 130)),
        _request(tiny_tok, "c", prefix=(130, 130)),  # no view at all: [bos] then the round
    ]
    results = _run(tiny_lm, tiny_tok, requests)
    bos = [start_token(tiny_tok)]
    for request, result in zip(requests, results):
        inbox_ids = tiny_tok.encode(request.inbox_text, add_special_tokens=False) if request.inbox_text else []
        for preds, head in (
            (result.collective, bos + request.control_ids + inbox_ids),
            (result.isolated, bos + request.control_ids),
            (result.plain, bos),
        ):
            context = torch.tensor(head + request.prefix_ids.tolist() + request.round_inputs[:-1].tolist())
            logits = tiny_lm(input_ids=context.unsqueeze(0)).logits[0, -R:]  # (R, V)
            expected = F.cross_entropy(logits.float(), request.targets, reduction="none")
            torch.testing.assert_close(-preds.target_logprob[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [0, 3, 10, 50])
def test_a_relay_message_is_the_last_budget_tokens_of_what_the_node_saw(tiny_lm, tiny_tok, budget):
    request = _request(tiny_tok, prefix=(110, 130), message=RelayMessage(), budget=budget)
    (result,) = _run(tiny_lm, tiny_tok, [request])
    seen = request.prefix_ids.tolist() + request.round_inputs.tolist()  # 28 tokens
    expected = seen[len(seen) - min(budget, len(seen)) :]
    assert result.message_text == tiny_tok.decode(expected)


def test_a_silent_node_sends_nothing(tiny_lm, tiny_tok):
    (result,) = _run(tiny_lm, tiny_tok, [_request(tiny_tok, message=SilentMessage())])
    assert result.message_text is None


@torch.no_grad()
def test_a_greedy_message_is_the_model_continuing_its_context_and_speak_prompt(tiny_lm, tiny_tok):
    spec = GenerateMessage(speak_prompt="\nIn short:")
    requests = [
        _request(tiny_tok, "a", control="Answer well:", inbox="b: hint\n", message=spec, budget=5),
        _request(tiny_tok, "b", prefix=(125, 130), message=spec, budget=7),
    ]
    results = _run(tiny_lm, tiny_tok, requests)
    bos = [start_token(tiny_tok)]
    for request, result in zip(requests, results):
        inbox_ids = tiny_tok.encode(request.inbox_text, add_special_tokens=False) if request.inbox_text else []
        prompt = torch.tensor(
            bos + request.control_ids + inbox_ids + request.prefix_ids.tolist() + request.round_inputs.tolist()
            + tiny_tok.encode("\nIn short:", add_special_tokens=False)
        )
        out = tiny_lm.generate(
            input_ids=prompt.unsqueeze(0), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=request.message_tokens, eos_token_id=0, pad_token_id=0,
        )
        new = out[0, len(prompt) :].tolist()
        new = new[: new.index(0)] if 0 in new else new
        assert result.message_text == tiny_tok.decode(new)


def test_max_tokens_caps_a_generated_message_below_the_budget(tiny_lm, tiny_tok):
    long_, short = (
        _run(tiny_lm, tiny_tok, [_request(tiny_tok, message=GenerateMessage(max_tokens=cap), budget=8)])[0].message_text
        for cap in (None, 2)
    )
    ids = tiny_tok.encode(long_, add_special_tokens=False)
    assert short == tiny_tok.decode(ids[:2]) or long_.startswith(short)
    assert len(tiny_tok.encode(short, add_special_tokens=False)) <= 2


def test_a_sampled_message_is_seeded_by_scenario_seed_node_and_round(tiny_lm, tiny_tok):
    spec = GenerateMessage(sampling="sample", temperature=1.0)

    def text(seed=0, node_id="a", round_index=4):
        request = _request(tiny_tok, node_id, message=spec, seed=seed, round_index=round_index, budget=12)
        return _run(tiny_lm, tiny_tok, [request])[0].message_text

    assert text() == text()
    assert text() != text(seed=1)
    assert text() != text(node_id="b")
    assert text() != text(round_index=5)


def test_a_row_not_asked_for_comes_back_none_and_is_not_scored(tiny_tok, scored):
    full, _ = scored([_request(tiny_tok, control="Answer well:")])
    request = replace(_request(tiny_tok, control="Answer well:"), want_isolated=False)
    (result,), n_scored = scored([request])
    assert result.isolated is None and result.plain is not None
    assert n_scored == 2  # plain, and collective == what isolated would have been
    assert torch.equal(result.collective.target_logprob, full[0].collective.target_logprob)
    (neither,), n_scored = scored([replace(request, want_plain=False)])
    assert (neither.isolated, neither.plain, n_scored) == (None, None, 1)
