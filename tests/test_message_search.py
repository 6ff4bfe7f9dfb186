from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from controllers.filters import retokenizes
from controllers.messages import (
    IGNORE,
    MessagePart,
    MessageSearchConfig,
    MessageTask,
    message_gradients,
    message_losses,
    search_messages,
)
from controllers.objectives import ControllerError, encode, input_embedding
from tests.test_gcg import llama64  # noqa: F401  (the fixture: a tiny Llama in float64, norms too)
from tests.tiny import tiny_gemma3

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "The return statement leaves the current function call with the expression list",
    "A class definition is an executable statement that defines a class object",
    "If the syntax is correct, the value of the expression is",
    "The with statement is used to wrap the execution of a block",
]
CONFIG = MessageSearchConfig(steps=3, search_width=16, topk=16)


def make_task(tok, index: int, *, seed: int | None = None, init: str = " a b c d", weights=(1.0, 0.5),
              max_bytes: int | None = None) -> MessageTask:
    """Two readers of different layouts: one scores the text's last 6 tokens after an inbox
    line, the other reads a masked view (placeholders) and scores the true tokens."""
    rest = encode(tok, "\n" + TEXTS[index % len(TEXTS)])
    masked = rest[:-3] + [88, 88, 88]  # what a masked reader reads: its labels are the truth
    return MessageTask(
        parts=[
            MessagePart([0] + encode(tok, f"From n{index}:"), rest, rest[-6:], weights[0]),
            MessagePart([0], masked, rest[-4:], weights[1]),
        ],
        init_ids=encode(tok, init),
        seed=index if seed is None else seed,
        max_bytes=max_bytes,
    )


def reference_loss(model, task: MessageTask, message: list[int]) -> float:
    """The objective the plain way: each part as one unpadded sequence, every logit."""
    total = 0.0
    for part in task.parts:
        ids = part.prefix_ids + message + part.rest_ids
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        n = len(part.labels)
        scored = log_probs[len(ids) - n - 1 : len(ids) - 1]  # (n, V)
        total += part.weight * float(-scored[torch.arange(n), torch.tensor(part.labels)].mean())
    return total


# -- the objective ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_tokens", [8192, 40])
def test_message_losses_equal_the_plain_forward_of_each_part(tiny_lm, tiny_tok, batch_tokens):
    tasks = [make_task(tiny_tok, i) for i in range(4)]
    messages = [encode(tiny_tok, text) for text in (" a b c d", " x", " the value of", " if")]
    losses = message_losses(tiny_lm, tasks, messages, batch_tokens=batch_tokens)
    expected = [reference_loss(tiny_lm, task, message) for task, message in zip(tasks, messages, strict=True)]
    torch.testing.assert_close(losses.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-5, rtol=1e-5)


def _spied_scores(monkeypatch) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each call of the search's scoring: per task, (candidates (C, k), their losses (C,))."""
    import controllers.messages as search_module

    calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    real = search_module.candidate_losses

    def spy(model, tasks, candidates, batch_tokens):
        losses = real(model, tasks, candidates, batch_tokens)
        calls.append(list(zip(candidates, losses, strict=True)))
        return losses

    monkeypatch.setattr(search_module, "candidate_losses", spy)
    return calls


def test_a_searched_message_lowers_its_objective(tiny_lm, tiny_tok, monkeypatch):
    calls = _spied_scores(monkeypatch)
    tasks = [make_task(tiny_tok, i) for i in range(3)]
    results = search_messages(tiny_lm, tiny_tok, tasks, CONFIG)
    assert len(calls) == 1 + CONFIG.steps  # the starts, then one scoring per step
    for t, (task, result) in enumerate(zip(tasks, results, strict=True)):
        assert result.initial_loss == pytest.approx(reference_loss(tiny_lm, task, task.init_ids), abs=2e-5)
        assert result.loss < result.initial_loss
        assert result.losses[-1] == result.loss and len(result.losses) == CONFIG.steps
        held, ids = result.initial_loss, task.init_ids
        for step, call in enumerate(calls[1:]):  # each step takes its best candidate if it beats the message held
            candidates, losses = call[t]
            if losses.numel() and float(losses.min()) < held:
                held, ids = float(losses.min()), candidates[int(losses.argmin())].tolist()
            assert result.losses[step] == pytest.approx(held, abs=1e-6), step
        assert result.ids == ids
        assert result.text == tiny_tok.decode(result.ids) and len(result.ids) == len(task.init_ids)
        assert result.scored_tokens > 0
    again = message_losses(tiny_lm, tasks, [result.ids for result in results])
    torch.testing.assert_close(again, torch.tensor([r.loss for r in results]), atol=1e-5, rtol=0)


def test_a_negative_weight_raises_that_readers_nll(tiny_lm, tiny_tok):
    friendly = make_task(tiny_tok, 0, weights=(1.0, 0.0))
    adversary = make_task(tiny_tok, 0, weights=(-1.0, 0.0))
    (result,) = search_messages(tiny_lm, tiny_tok, [adversary], CONFIG)
    assert result.loss < result.initial_loss
    before, after = message_losses(tiny_lm, [friendly, friendly], [adversary.init_ids, result.ids])
    assert float(after) > float(before) + 0.1


def test_an_ignored_label_is_read_but_not_scored(tiny_lm, tiny_tok):
    task = make_task(tiny_tok, 0, weights=(1.0, 0.0))
    part = task.parts[0]
    hidden = [IGNORE if i in (1, 4) else label for i, label in enumerate(part.labels)]  # 6 labels, 2 left out
    masked = MessageTask([MessagePart(part.prefix_ids, part.rest_ids, hidden, 1.0)], task.init_ids, 0)
    ids = part.prefix_ids + task.init_ids + part.rest_ids
    with torch.no_grad():
        log_probs = F.log_softmax(tiny_lm(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    n = len(part.labels)
    nll = -log_probs[len(ids) - n - 1 : len(ids) - 1].gather(1, torch.tensor(part.labels)[:, None])[:, 0]  # (n,)
    expected = float(nll[[0, 2, 3, 5]].mean())
    (loss,) = message_losses(tiny_lm, [masked], [task.init_ids]).tolist()
    assert loss == pytest.approx(expected, abs=2e-5)
    assert abs(loss - float(nll.mean())) > 1e-3  # not the mean over every label
    (grad,) = message_gradients(tiny_lm, [masked], [torch.tensor(task.init_ids)])
    assert torch.isfinite(grad).all()


# -- batching and seeds -------------------------------------------------------------------------


def test_searching_batched_gives_the_messages_of_searching_one_by_one_in_float64(llama64, tiny_tok):  # noqa: F811
    tasks = [make_task(tiny_tok, i, init=init) for i, init in enumerate([" a b c d", " x y", " the value of it", " if"])]
    batched = search_messages(llama64, tiny_tok, tasks, CONFIG)
    alone = [search_messages(llama64, tiny_tok, [task], CONFIG)[0] for task in tasks]
    assert [r.ids for r in batched] == [r.ids for r in alone]
    for b, a in zip(batched, alone, strict=True):
        assert b.losses == pytest.approx(a.losses, abs=1e-9)
        assert b.scored_tokens == a.scored_tokens
    assert any(r.ids != t.init_ids for r, t in zip(batched, tasks, strict=True))


def test_searching_batched_in_small_float32_batches_matches_one_by_one(tiny_lm, tiny_tok):
    tasks = [make_task(tiny_tok, i) for i in range(4)]
    config = CONFIG.model_copy(update={"batch_tokens": 64})
    batched = search_messages(tiny_lm, tiny_tok, tasks, config)
    alone = [search_messages(tiny_lm, tiny_tok, [task], CONFIG)[0] for task in tasks]
    for b, a in zip(batched, alone, strict=True):
        assert b.ids == a.ids or b.loss == pytest.approx(a.loss, abs=1e-5)
        assert b.loss == pytest.approx(a.loss, abs=1e-5)


def test_a_step_takes_one_pass_for_the_gradient_and_one_for_every_tasks_candidates(tiny_lm, tiny_tok):
    tasks = [make_task(tiny_tok, i) for i in range(4)]
    shapes: list[tuple[int, ...]] = []
    hook = tiny_lm.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                                          else kwargs["inputs_embeds"]).shape[:2])),
        with_kwargs=True,
    )
    try:
        search_messages(tiny_lm, tiny_tok, tasks, CONFIG.model_copy(update={"steps": 1}))
        assert len(shapes) == 3  # the initial messages, the gradient, the candidates
        assert shapes[1][0] == 8  # 4 tasks x 2 parts
        assert shapes[2][0] > 4 * 2 * 8  # most of 4 x 16 candidates x 2 parts
        shapes.clear()
        search_messages(tiny_lm, tiny_tok, tasks, CONFIG.model_copy(update={"steps": 1, "batch_tokens": 100}))
        assert all(rows * width <= 100 for rows, width in shapes)
    finally:
        hook.remove()


def test_the_same_seed_gives_the_same_search_and_another_seed_other_candidates(tiny_lm, tiny_tok):
    tasks = [make_task(tiny_tok, i, seed=7) for i in range(3)]
    first = search_messages(tiny_lm, tiny_tok, tasks, CONFIG)
    again = search_messages(tiny_lm, tiny_tok, tasks, CONFIG)
    assert first == again
    other = search_messages(tiny_lm, tiny_tok, [make_task(tiny_tok, i, seed=8) for i in range(3)], CONFIG)
    assert [r.losses for r in other] != [r.losses for r in first]


# -- filters ------------------------------------------------------------------------------------


def test_no_returned_message_decodes_longer_than_its_byte_limit(tiny_lm, tiny_tok):
    tasks = [make_task(tiny_tok, i, init=" a b c d", max_bytes=8) for i in range(4)]
    config = CONFIG.model_copy(update={"steps": 4, "topk": 64})
    limited = search_messages(tiny_lm, tiny_tok, tasks, config)
    assert all(len(r.text.encode("utf-8")) <= 8 for r in limited)
    assert any(r.ids != t.init_ids for r, t in zip(limited, tasks, strict=True))
    unlimited = search_messages(tiny_lm, tiny_tok, [make_task(tiny_tok, i) for i in range(4)], config)
    assert any(len(r.text.encode("utf-8")) > 8 for r in unlimited)  # the limit had work to do


def test_with_the_retokenize_filter_every_result_reads_back_as_its_ids(tiny_lm, tiny_tok):
    tasks = [make_task(tiny_tok, i) for i in range(4)]
    config = CONFIG.model_copy(update={"steps": 4, "topk": 256})
    filtered = search_messages(tiny_lm, tiny_tok, tasks, config)
    assert all(encode(tiny_tok, r.text) == r.ids for r in filtered)
    loose = search_messages(tiny_lm, tiny_tok, tasks, config.model_copy(update={"filter_retokenize": False}))
    assert not retokenizes(tiny_tok, torch.tensor([r.ids for r in loose])).all()  # the filter had work to do


def test_the_allowed_mask_bounds_the_tokens_a_search_may_write(tiny_lm, tiny_tok):
    tasks = [make_task(tiny_tok, i) for i in range(2)]
    allowed = torch.zeros(tiny_lm.config.vocab_size, dtype=torch.bool)
    allowed[300:400] = True  # merged tokens: whole characters
    results = search_messages(tiny_lm, tiny_tok, tasks, CONFIG, allowed=allowed)
    for task, result in zip(tasks, results, strict=True):
        changed = [new for new, old in zip(result.ids, task.init_ids, strict=True) if new != old]
        assert changed and all(300 <= token < 400 for token in changed)


# -- the gradient -------------------------------------------------------------------------------


def test_the_one_hot_gradient_goes_through_gemmas_embedding_scale(tiny_tok):
    model = tiny_gemma3(len(tiny_tok))
    weight, scale = input_embedding(model)
    assert scale == pytest.approx(32**0.5)
    tasks = [make_task(tiny_tok, i, weights=(1.0, -0.5)) for i in range(2)]
    messages = [torch.tensor(task.init_ids) for task in tasks]
    grads = message_gradients(model, tasks, messages, batch_tokens=30)  # rows in separate passes
    for task, message, grad in zip(tasks, messages, grads, strict=True):
        # independently: per part, the gradient at the model's own embeddings of the whole
        # sequence, then the chain rule through the scaled lookup
        d_message = torch.zeros(len(message), weight.shape[1], dtype=weight.dtype)
        for part in task.parts:
            ids = torch.tensor([part.prefix_ids + message.tolist() + part.rest_ids])
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            log_probs = F.log_softmax(model(inputs_embeds=embeds).logits[0], dim=-1)
            n, total = len(part.labels), ids.shape[1]
            nll = -log_probs[total - n - 1 : total - 1][torch.arange(n), torch.tensor(part.labels)].mean()
            (d_embeds,) = torch.autograd.grad(part.weight * nll, [embeds])
            start = len(part.prefix_ids)
            d_message += d_embeds[0, start : start + len(message)]
        torch.testing.assert_close(grad, scale * d_message @ weight.T, atol=1e-10, rtol=1e-7)
        assert not torch.allclose(grad, d_message @ weight.T, rtol=1e-3)  # the scale matters


def test_the_one_hot_gradient_matches_finite_differences_of_the_objective(llama64, tiny_tok):  # noqa: F811
    task = make_task(tiny_tok, 1)
    message = torch.tensor(task.init_ids)
    (grad,) = message_gradients(llama64, [task], [message])
    weight = llama64.get_input_embeddings().weight
    # moving the embedding of position p by eps along W[v] is moving one_hot[p, v] by eps
    for position, token in [(0, 5), (2, 311), (3, 37)]:
        eps = 1e-5
        losses = []
        for sign in (1, -1):
            total = 0.0
            for part in task.parts:
                ids = torch.tensor([part.prefix_ids + message.tolist() + part.rest_ids])
                with torch.no_grad():
                    embeds = llama64.get_input_embeddings()(ids)
                    embeds[0, len(part.prefix_ids) + position] += sign * eps * weight[token]
                    log_probs = F.log_softmax(llama64(inputs_embeds=embeds).logits[0], dim=-1)
                n, length = len(part.labels), ids.shape[1]
                nll = -log_probs[length - n - 1 : length - 1][torch.arange(n), torch.tensor(part.labels)].mean()
                total += part.weight * float(nll)
            losses.append(total)
        assert float(grad[position, token]) == pytest.approx((losses[0] - losses[1]) / (2 * eps), rel=1e-4, abs=1e-7)


# -- bad input ----------------------------------------------------------------------------------


def bad_tasks(tok) -> dict[str, tuple[MessageTask, str]]:
    good = make_task(tok, 0)
    part = good.parts[0]
    return {
        "empty message": (MessageTask(good.parts, [], 0), r"tasks\[0\]\.init_ids: empty"),
        "no readers": (MessageTask([], good.init_ids, 0), r"tasks\[0\]\.parts: none"),
        "labels longer than rest": (
            MessageTask([MessagePart(part.prefix_ids, [5, 6], [5, 6, 7])], good.init_ids, 0),
            r"tasks\[0\]\.parts\[0\]\.labels: 3 labels but rest_ids has 2",
        ),
        "no labels": (MessageTask([MessagePart([0], [5], [])], good.init_ids, 0), r"parts\[0\]\.labels: empty"),
        "only ignored labels": (MessageTask([MessagePart([0], [5, 6], [IGNORE, IGNORE])], good.init_ids, 0), r"all IGNORE"),
        "id outside the vocabulary": (
            MessageTask([MessagePart([0], [5, 100_000], [5])], good.init_ids, 0),
            r"parts\[0\]\.rest_ids: token id 100000 outside",
        ),
        "nan weight": (MessageTask([MessagePart([0], [5], [5], float("nan"))], good.init_ids, 0), r"weight: nan"),
        "zero bytes": (MessageTask(good.parts, good.init_ids, 0, max_bytes=0), r"max_bytes: 0"),
    }


@pytest.mark.parametrize("case", ["empty message", "no readers", "labels longer than rest", "no labels", "only ignored labels",
                                  "id outside the vocabulary", "nan weight", "zero bytes"])
def test_bad_tasks_are_refused_with_the_field_named(tiny_lm, tiny_tok, case):
    task, message = bad_tasks(tiny_tok)[case]
    good = make_task(tiny_tok, 1)
    with pytest.raises(ControllerError, match=message):
        search_messages(tiny_lm, tiny_tok, [task], CONFIG)
    with pytest.raises(ControllerError, match=message.replace(r"tasks\[0\]", r"tasks\[1\]")):
        search_messages(tiny_lm, tiny_tok, [good, task], CONFIG)  # the index of the bad task


def test_bad_calls_are_refused(tiny_lm, tiny_tok):
    task = make_task(tiny_tok, 0)
    with pytest.raises(ControllerError, match="messages: 1 messages for 2 tasks"):
        message_losses(tiny_lm, [task, task], [task.init_ids])
    with pytest.raises(ControllerError, match=r"messages\[0\]: empty"):
        message_losses(tiny_lm, [task], [[]])
    with pytest.raises(ControllerError, match="allowed: mask of shape"):
        search_messages(tiny_lm, tiny_tok, [task], CONFIG, allowed=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ControllerError, match="no token is allowed"):
        search_messages(tiny_lm, tiny_tok, [task], CONFIG, allowed=torch.zeros(tiny_lm.config.vocab_size, dtype=torch.bool))
    with pytest.raises(ValidationError, match="batch_tokens"):
        MessageSearchConfig(batch_tokens=0)
    with pytest.raises(ValidationError, match="width"):
        MessageSearchConfig(width=3)
    assert search_messages(tiny_lm, tiny_tok, [], CONFIG) == []
