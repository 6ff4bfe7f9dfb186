"""Tiny random-initialised causal LMs with a real byte-level BPE tokenizer, for unit tests.

Everything is built locally from a config (no download): the tokenizer is trained on
Python's own `pydoc_data.topics` text, the model weights come from a seeded generator.
"""

from __future__ import annotations

import functools
from typing import TypedDict, TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

M = TypeVar("M", bound=torch.nn.Module)


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([pydoc_text()[:200_000]], trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (every string round-trips) with one special token."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    return tok


class TinyDims(TypedDict):
    """The config keywords every tiny model shares (typed, so that `**dims` is checked per key)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int


def _tiny_dims(vocab_size: int, hidden_size: int = 32) -> TinyDims:
    """The sizes every tiny model shares: 2 layers, 4 query heads over 2 key/value heads."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }


def randomize_weights(model: M, seed: int) -> M:
    """Every weight but the norm gains (kept as built) drawn from N(0, 0.3^2) with a seeded
    generator (no global seed); returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights drawn from a seeded generator (no global seed)."""
    config = LlamaConfig(
        **_tiny_dims(vocab_size, hidden_size),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    return randomize_weights(model, seed)


def tiny_gemma3(vocab_size: int, seed: int = 3) -> Gemma3ForCausalLM:
    """A 2-layer float64 Gemma3 (one sliding-window layer of 4 positions, one full), with the
    scaled input embedding of the real family."""
    config = Gemma3TextConfig(
        **_tiny_dims(vocab_size),
        head_dim=8,
        max_position_embeddings=512,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    return randomize_weights(Gemma3ForCausalLM(config), seed).double()
