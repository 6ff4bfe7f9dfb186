"""The tiny test models: built from a config and a seed, with nothing drawn from a global RNG."""

from __future__ import annotations

import torch

from tests.tiny import randomize_weights, tiny_gemma3, tiny_llama


def test_the_same_seed_builds_the_same_weights_and_the_norm_gains_stay_as_built(tiny_tok):
    a, b = tiny_llama(len(tiny_tok), seed=5), tiny_llama(len(tiny_tok), seed=5)
    other = tiny_llama(len(tiny_tok), seed=6)
    assert not a.training
    for (name, weight), same, different in zip(
        a.named_parameters(), b.parameters(), other.parameters(), strict=True
    ):
        assert torch.equal(weight, same)
        if "norm" in name:
            assert torch.equal(weight, torch.ones_like(weight)) and torch.equal(weight, different)
        else:
            assert not torch.equal(weight, different)


def test_randomizing_ignores_the_global_generator():
    layer = torch.nn.Linear(3, 2)
    with torch.random.fork_rng():  # the global state is put back afterwards
        torch.manual_seed(0)
        first = randomize_weights(layer, seed=1).weight.clone()
        torch.manual_seed(1)
        assert torch.equal(randomize_weights(layer, seed=1).weight, first)


def test_the_tiny_gemma3_is_float64_and_seeded(tiny_tok):
    model = tiny_gemma3(len(tiny_tok))
    assert model.dtype == torch.float64 and not model.training
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight, tiny_gemma3(len(tiny_tok)).get_input_embeddings().weight)
