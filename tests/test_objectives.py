from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from controllers.objectives import (
    ControllerError,
    MeanObjective,
    Scores,
    SequenceObjective,
    cache_kwarg,
    default_prefix_ids,
    encode,
    score_batched,
    stream_objective,
    target_objective,
)


def plain_log_probs(model, ids: list[list[int]]) -> torch.Tensor:
    """Reference: log-probs (B, T, V) from one uncached forward over whole sequences."""
    with torch.no_grad():
        return F.log_softmax(model(input_ids=torch.tensor(ids)).logits.float(), dim=-1)


def reference_target_loss(model, prefix, controls, rest, n_scored):
    """Mean NLL of the last n_scored tokens of [prefix][control][rest], and whether all are argmax."""
    sequences = [list(prefix) + list(u) + list(rest) for u in controls]
    log_probs = plain_log_probs(model, sequences)
    total = len(sequences[0])
    positions = range(total - n_scored, total)
    nll = torch.stack(
        [
            torch.stack([-log_probs[b, t - 1, seq[t]] for t in positions]).mean()
            for b, seq in enumerate(sequences)
        ]
    )
    argmax_ok = torch.tensor(
        [
            all(int(log_probs[b, t - 1].argmax()) == seq[t] for t in positions)
            for b, seq in enumerate(sequences)
        ]
    )
    return nll, argmax_ok


@pytest.fixture
def controls():
    generator = torch.Generator().manual_seed(5)
    return torch.randint(1, 500, (6, 4), generator=generator)


@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_target_loss_after_a_context_equals_the_nll_of_one_plain_forward(
    tiny_lm, tiny_tok, controls, use_prefix_cache
):
    objective = target_objective(
        tiny_lm, tiny_tok, " the value", prefix="Return", use_prefix_cache=use_prefix_cache
    )
    scores = objective.scores(controls)
    prefix = default_prefix_ids(tiny_tok) + encode(tiny_tok, "Return")
    target = encode(tiny_tok, " the value")
    nll, ok = reference_target_loss(tiny_lm, prefix, controls.tolist(), target, len(target))
    assert scores.loss.shape == (6,)
    torch.testing.assert_close(scores.loss, nll, atol=1e-5, rtol=1e-5)
    assert torch.equal(scores.success, ok)


def test_control_before_x0_with_a_suffix_is_scored_on_the_target_only(tiny_lm, tiny_tok, controls):
    objective = target_objective(tiny_lm, tiny_tok, " list", suffix="Return a new")
    target = encode(tiny_tok, " list")
    rest = encode(tiny_tok, "Return a new") + target
    nll, _ = reference_target_loss(tiny_lm, [], controls.tolist(), rest, len(target))
    torch.testing.assert_close(objective.scores(controls).loss, nll, atol=1e-5, rtol=1e-5)


def greedy_continuation(model, sequence: list[int], n: int) -> list[int]:
    """The model's own n greedy next tokens after `sequence`, one plain forward each."""
    greedy: list[int] = []
    for _ in range(n):
        greedy.append(int(plain_log_probs(model, [sequence + greedy])[0, -1].argmax()))
    return greedy


def test_success_means_every_target_token_is_the_greedy_argmax(tiny_lm, tiny_tok):
    prefix = encode(tiny_tok, "Return the")
    control = [[7, 8, 9]]
    # the model's own greedy continuation succeeds by construction
    greedy = greedy_continuation(tiny_lm, prefix + control[0], 2)
    hit = SequenceObjective(tiny_lm, prefix, greedy, 2)
    assert hit.scores(torch.tensor(control)).success.tolist() == [True]
    wrong_second = (greedy[1] + 1) % 500
    miss = SequenceObjective(tiny_lm, prefix, [greedy[0], wrong_second], 2)
    assert miss.scores(torch.tensor(control)).success.tolist() == [False]


class BrokenScoringPath(SequenceObjective):
    """Every logit the scoring path computes (cached or not) is zero: it can neither succeed
    nor rank, so a check that went through it would fail."""

    def _forward(self, batch, length, **inputs):
        return torch.zeros_like(super()._forward(batch, length, **inputs))


@pytest.mark.parametrize("use_prefix_cache", [True, False])
def test_confirm_is_the_success_of_one_plain_forward_pass_apart_from_the_scoring_path(
    tiny_lm, tiny_tok, use_prefix_cache
):
    prefix = encode(tiny_tok, "Return the")
    control = torch.tensor([7, 8, 9])
    greedy = greedy_continuation(tiny_lm, prefix + control.tolist(), 2)
    hit = BrokenScoringPath(tiny_lm, prefix, greedy, 2, use_prefix_cache=use_prefix_cache)
    miss = BrokenScoringPath(
        tiny_lm, prefix, [greedy[0], (greedy[1] + 1) % 500], 2, use_prefix_cache=use_prefix_cache
    )
    assert hit.confirm(control)
    assert not miss.confirm(control)
    assert not hit.scores(control[None]).success.any()  # the scoring path is broken indeed
    assert MeanObjective([hit, hit]).confirm(control)
    assert not MeanObjective([hit, miss]).confirm(control)
    pooled = SequenceObjective(tiny_lm, prefix, greedy, 2, log_prob_loss=lambda lp: lp[:, 0, 2] * 0)
    assert not pooled.confirm(control)  # a pooled loss has no success to confirm


def test_the_embedding_level_loss_equals_the_scored_loss_of_the_same_prompt(
    tiny_lm, tiny_tok, controls
):
    objective = target_objective(tiny_lm, tiny_tok, " the value", prefix="Return")
    control = controls[:1]
    embeds = tiny_lm.get_input_embeddings()(control)  # (1, k, d)
    torch.testing.assert_close(
        objective.embed_loss(embeds), objective.scores(control).loss[0], atol=1e-5, rtol=1e-5
    )


def test_an_empty_control_prompt_is_scored_like_the_bare_context(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " list", suffix="Return a new")
    target = encode(tiny_tok, " list")
    rest = encode(tiny_tok, "Return a new") + target
    nll, _ = reference_target_loss(tiny_lm, [], [[]], rest, len(target))
    empty = torch.zeros(1, 0, dtype=torch.long)
    torch.testing.assert_close(objective.scores(empty).loss, nll, atol=1e-5, rtol=1e-5)


def test_stream_loss_is_the_mean_nll_of_the_tokens_after_the_offset(tiny_lm, tiny_tok, controls):
    stream = encode(tiny_tok, "Return a new list of the values in the sequence.")
    objective = stream_objective(tiny_lm, stream, offset=4, prefix_ids=[0])
    nll, _ = reference_target_loss(tiny_lm, [0], controls.tolist(), stream, len(stream) - 4)
    torch.testing.assert_close(objective.scores(controls).loss, nll, atol=1e-5, rtol=1e-5)


def test_a_pooling_hook_receives_the_node_log_probs_and_defines_the_loss(
    tiny_lm, tiny_tok, controls
):
    stream = encode(tiny_tok, "Return a new list of the values in the sequence.")
    offset = 3
    n = len(stream) - offset
    vocab = tiny_lm.config.vocab_size
    labels = torch.tensor(stream[offset:])
    others = torch.full((n, vocab), 1.0 / vocab)  # a fixed uniform neighbour
    seen_shapes = []

    def linear_pool(log_probs: torch.Tensor) -> torch.Tensor:
        seen_shapes.append(tuple(log_probs.shape))
        pooled = 0.5 * log_probs.exp() + 0.5 * others  # (B, n, V)
        picked = pooled.gather(-1, labels[None, :, None].expand(log_probs.shape[0], -1, 1))
        return -picked.log().squeeze(-1).mean(-1)  # (B,)

    objective = stream_objective(
        tiny_lm, stream, offset=offset, prefix_ids=[0], log_prob_loss=linear_pool
    )
    scores = objective.scores(controls)
    assert seen_shapes[-1] == (6, n, vocab)
    node = plain_log_probs(tiny_lm, [[0, *u, *stream] for u in controls.tolist()]).exp()
    start = 1 + controls.shape[1] + offset
    node_p = node[:, start - 1 : -1].gather(-1, labels[None, :, None].expand(6, -1, 1)).squeeze(-1)
    expected = -(0.5 * node_p + 0.5 / vocab).log().mean(-1)
    torch.testing.assert_close(scores.loss, expected, atol=1e-5, rtol=1e-5)
    assert not scores.success.any()
    embeds = tiny_lm.get_input_embeddings()(controls[:1]).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective.embed_loss(embeds), [embeds])
    assert grad.abs().sum() > 0


def test_mean_objective_averages_the_pairs_and_succeeds_only_when_all_do(
    tiny_lm, tiny_tok, controls
):
    first = target_objective(tiny_lm, tiny_tok, " value", prefix="Return the")
    second = target_objective(tiny_lm, tiny_tok, " list", prefix="Make a new")
    both = MeanObjective([first, second])
    torch.testing.assert_close(
        both.scores(controls).loss,
        (first.scores(controls).loss + second.scores(controls).loss) / 2,
    )
    always = SequenceObjective(tiny_lm, [1], [2], 1, log_prob_loss=lambda lp: lp[:, 0, 2] * 0)
    assert not MeanObjective([first, always]).scores(controls).success.any()


class FlakyMemory:
    """An objective that runs out of memory on batches larger than 4."""

    def __init__(self, model):
        self.model = model
        self.batch_sizes = []

    def scores(self, control_ids):
        self.batch_sizes.append(control_ids.shape[0])
        if control_ids.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        loss = control_ids.float().sum(dim=1)
        return Scores(loss=loss, success=loss < 0)


def test_batched_scoring_halves_the_batch_on_out_of_memory_and_scores_every_candidate(tiny_lm):
    objective = FlakyMemory(tiny_lm)
    candidates = torch.arange(22).reshape(11, 2)
    scores, batch_size = score_batched(objective, candidates, batch_size=16)
    assert batch_size == 2  # 11 -> 5 -> 2
    assert objective.batch_sizes[:3] == [11, 5, 2]
    torch.testing.assert_close(scores.loss, candidates.float().sum(dim=1))


def test_a_batch_that_fits_keeps_the_configured_batch_size(tiny_lm):
    objective = FlakyMemory(tiny_lm)
    _, unlimited = score_batched(objective, torch.zeros(1, 2, dtype=torch.long), batch_size=None)
    _, capped = score_batched(objective, torch.zeros(3, 2, dtype=torch.long), batch_size=4)
    assert (unlimited, capped) == (None, 4)
    score_batched(objective, torch.zeros(4, 2, dtype=torch.long), batch_size=unlimited)
    assert objective.batch_sizes[-1] == 4  # one forward for all four, not four of one


def test_an_error_that_is_not_out_of_memory_is_raised(tiny_lm):
    class Broken(FlakyMemory):
        def scores(self, control_ids):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        score_batched(Broken(tiny_lm), torch.zeros(3, 2, dtype=torch.long), batch_size=2)


def test_a_target_that_tokenizes_to_nothing_is_an_error_naming_the_target(tiny_lm, tiny_tok):
    with pytest.raises(ControllerError, match="target"):
        target_objective(tiny_lm, tiny_tok, "")


def test_a_prompt_longer_than_the_model_context_is_an_error_naming_k(tiny_lm, tiny_tok):
    objective = target_objective(tiny_lm, tiny_tok, " value", prefix="Return the")
    objective.check_control_length(8)
    with pytest.raises(ControllerError, match="k: 2048"):
        objective.check_control_length(2048)


def test_a_model_without_input_embeddings_is_an_error_naming_the_model(tiny_lm):
    class NoEmbeddings(torch.nn.Module):
        config = tiny_lm.config
        device = torch.device("cpu")

        def get_input_embeddings(self):
            raise NotImplementedError

    with pytest.raises(ControllerError, match="model: .* no input embeddings"):
        SequenceObjective(NoEmbeddings(), [1], [2, 3], 1)


def test_the_cache_keyword_is_the_one_the_model_forward_takes(tiny_lm):
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    assert cache_kwarg(Old()) == "past_key_values"
    assert cache_kwarg(New()) == "cache"
    assert cache_kwarg(tiny_lm) in inspect.signature(tiny_lm.forward).parameters


def test_the_best_success_is_the_lowest_loss_among_the_successful_candidates():
    scores = Scores(
        loss=torch.tensor([0.5, 2.0, 1.0, 3.0]), success=torch.tensor([False, True, True, False])
    )
    assert scores.best_success() == (2, 1.0)
    assert Scores(loss=scores.loss, success=torch.zeros(4, dtype=torch.bool)).best_success() is None
