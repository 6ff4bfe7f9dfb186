"""The priming control's order: a message's tokens shuffled so that the receiver reads the
same tokens, as many, as it would have read of the message unshuffled.

A receiver encodes its rendered inbox as one string, so a shuffle of the sender's token ids
is not what it reads: decoding a permutation and encoding it again merges and splits tokens
at the new neighbours (on SmolLM2 and pydoc text most permutations change). Here the
message is taken as the receiver reads it, inside its frame (the inbox text before and after
it: `collective.run.messages.message_frame`), `ids = encode(before + text + after)`; the
tokens that carry frame characters (a frame's trailing space merged into the message's first
word, its newline into the message's last) stay at their ends, and the others are permuted:

1. up to `PLAIN_DRAWS` seeded permutations, the first that re-encodes to itself in its frame;
2. else up to `SEARCHES` seeded depth-first searches that place one token at a time, keeping
   only prefixes that re-encode to themselves, at most `SEARCH_BUDGET` placements each;
3. else whole words (whitespace-led runs) in a seeded order, not matched.

`matched` says whether the receiver reads a permutation of the unshuffled message's tokens,
as many, and the text fits the token budget on its own (the bus cuts it by the sender's
encoding). The match holds for a receiver of the sender's tokenizer reading the message as
the only one in its inbox.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from collective.lm.codec import TextCodec

PLAIN_DRAWS = 16
SEARCHES = 4  # depth-first searches, each from its own seeded order
SEARCH_BUDGET = 2000  # placements per search


@dataclass(frozen=True)
class ShuffledMessage:
    text: str
    matched: bool  # the receiver reads the unshuffled message's tokens, in another order


class _Frame:
    """The checks of one framed message: a candidate inbox's ids read back as themselves."""

    def __init__(self, tokenizer: TextCodec, frame: tuple[str, str], max_tokens: int) -> None:
        self.tokenizer, self.before, self.after, self.max_tokens = tokenizer, frame[0], frame[1], max_tokens

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def message(self, ids: Sequence[int]) -> str | None:
        """The message text of a whole candidate inbox, if it reads back as `ids` in its frame."""
        text = self.text(ids)
        inner = len(text) - len(self.before) - len(self.after)
        if inner < 0 or not (text.startswith(self.before) and text.endswith(self.after)) or self.encode(text) != list(ids):
            return None
        message = text[len(self.before) : len(self.before) + inner]
        return message if len(self.encode(message)) <= self.max_tokens else None

    def prefix_ok(self, ids: Sequence[int]) -> bool:
        text = self.text(ids)
        if not (text.startswith(self.before) or self.before.startswith(text)):
            return False
        return text.endswith("\ufffd") or self.encode(text) == list(ids)  # a character cut between tokens: wait for its end


def split_framed(ids: Sequence[int], before_ids: Sequence[int], after_ids: Sequence[int]) -> tuple[int, int]:
    """(head, tail): how many of an inbox's ids (N,) stay fixed at its start and end: the frame's
    tokens that read as they do alone, and one more at an end where the frame merged into the
    message."""
    head = 0
    while head < min(len(before_ids), len(ids)) and ids[head] == before_ids[head]:
        head += 1
    tail = 0
    while tail < min(len(after_ids), len(ids) - head) and ids[len(ids) - 1 - tail] == after_ids[len(after_ids) - 1 - tail]:
        tail += 1
    head += int(head < len(before_ids) and head < len(ids) - tail)
    tail += int(tail < len(after_ids) and tail < len(ids) - head)
    return head, tail


def shuffle_message(
    text: str, tokenizer: TextCodec, frame: tuple[str, str], max_tokens: int, generator: torch.Generator
) -> ShuffledMessage:
    """`text` in a seeded order the receiver reads as the same tokens (see the module docstring)."""
    checks = _Frame(tokenizer, frame, max_tokens)
    inbox = checks.encode(frame[0] + text + frame[1])
    head, tail = split_framed(inbox, checks.encode(frame[0]) if frame[0] else [], checks.encode(frame[1]) if frame[1] else [])
    start, middle, end = inbox[:head], inbox[head : len(inbox) - tail], inbox[len(inbox) - tail :]
    for _ in range(PLAIN_DRAWS):
        order = torch.randperm(len(middle), generator=generator).tolist()
        found = checks.message(start + [middle[i] for i in order] + end)
        if found is not None:
            return ShuffledMessage(found, True)
    for _ in range(SEARCHES):
        pool = [middle[i] for i in torch.randperm(len(middle), generator=generator).tolist()]
        placed = _place(checks, start, pool, end, [SEARCH_BUDGET])
        if placed is not None:
            return ShuffledMessage(placed, True)
    words = re.findall(r"\s*\S+|\s+$", text)
    order = torch.randperm(len(words), generator=generator).tolist()
    return ShuffledMessage("".join(words[i] for i in order), False)


def _place(checks: _Frame, built: list[int], pool: list[int], end: list[int], budget: list[int]) -> str | None:
    """Depth first: each distinct token of `pool` in turn after `built`, if the prefix reads
    back as itself; the message once every token is placed and the inbox reads back whole."""
    if not pool:
        return checks.message(built + end)
    tried: set[int] = set()
    for index, token in enumerate(pool):
        if token in tried:
            continue
        tried.add(token)
        budget[0] -= 1
        if budget[0] < 0:
            return None
        candidate = [*built, token]
        if checks.prefix_ok(candidate):
            found = _place(checks, candidate, pool[:index] + pool[index + 1 :], end, budget)
            if found is not None:
                return found
    return None
