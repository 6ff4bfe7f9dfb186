"""The tokenizer as the library uses it: text to token ids and back (`TextCodec`), and the
special tokens that start every context (`start_token`) and end a written message
(`stop_ids`).

Every tokenizer passed around the library is typed `TextCodec`: a Hugging Face tokenizer
fits it, and so does any small stand-in a test writes. The special token ids are read with
`getattr`, since not every tokenizer has each of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class TextCodec(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


def start_token(tokenizer: TextCodec) -> int:
    """The token every context starts with: a document boundary.

    `<|endoftext|>` where the vocabulary has it (GPT-2 style and SmolLM2 tokenizers, whose
    BOS is a chat-turn marker), else BOS (Gemma, Llama), else EOS.
    """
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is not None:
        found = convert("<|endoftext|>")
        if isinstance(found, int) and found != getattr(tokenizer, "unk_token_id", None):
            return found
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has no BOS, EOS or PAD token to start a context with")



def pad_id(tokenizer: TextCodec) -> int:
    """What right-padded batches are filled with (masked out): the pad token, else the start token."""
    return int(getattr(tokenizer, "pad_token_id", None) or start_token(tokenizer))

def stop_ids(tokenizer: TextCodec) -> list[int]:
    """A message ends at the end of a turn or document (EOS, BOS, the start token)."""
    names = ("eos_token_id", "bos_token_id")
    found = {int(t) for t in (getattr(tokenizer, n, None) for n in names) if t is not None}
    found.add(start_token(tokenizer))
    return sorted(found)
