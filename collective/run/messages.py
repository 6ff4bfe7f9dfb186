"""Searched messages: what a node with `message.policy: search` says after a round.

A searched message is a control input aimed at the node's readers. Its tokens are found by
the batched greedy coordinate search of `controllers.messages`, one task per node, every
searching node of a model in one search:

- the message has as many tokens as its start (`init`): the relay (the last B tokens the
  node read), the text the node writes after its speak prompt, or B filler tokens, with B
  the out-links' token budget; a candidate longer than the out-links' byte budget is
  filtered out, so the message travels whole;
- the span is the last `span_tokens` tokens the node read (default: the round just read),
  as it read them (a masked view's placeholders included);
- objective `sender`: the NLL of the span after [start][the message as a reader's inbox
  renders it] (the bus header, then the inbox template around the text), each piece
  tokenized on its own;
- objective `receiver`: for each out-neighbour j, the NLL of the span after [start][j's
  control][the rendered message][j's view of the text before the span], averaged over
  the out-neighbours, scored with the sender's model (the sender knows no other). The
  engine fills the receivers' contexts; only an embedded run can, since a distributed
  node never sees its neighbours' views.

The search's objective before and after (nats per span token) goes into the round's events
and the report.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from collective.lm.codec import TextCodec
from collective.records import MessageSearch
from collective.scenario import SearchMessage
from collective.seeding import derive_seed
from controllers.filters import allowed_token_mask
from controllers.messages import MessagePart, MessageSearchConfig, MessageTask, search_messages

_SLOT = "\x00message\x00"


@dataclass(frozen=True)
class ReceiverContext:
    """What a searching sender assumes of one reader: its control prompt and its view of the
    text before the span (prefix_ids (P,))."""

    node_id: str
    control_ids: list[int]
    prefix_ids: torch.Tensor


def message_frame(template: str, header: str, sender: str, round_index: int) -> tuple[str, str]:
    """The text before and after a message from `sender` in a reader's inbox, when it is the
    only message there: the header, then the inbox template around `{text}`."""
    rendered = header + template.format(sender=sender, text=_SLOT, round=round_index)
    before, after = rendered.split(_SLOT, 1)
    return before, after


def stable_ids(ids: Sequence[int], tokenizer: TextCodec, limit: int) -> list[int]:
    """`ids` (at most `limit`) moved to a sequence that reads back as itself: decoding a cut
    in the middle of a word and encoding again may give other tokens, which the
    re-tokenization filter would refuse as a start."""
    current = list(ids)[:limit]
    for _ in range(4):
        again = tokenizer.encode(tokenizer.decode(current, skip_special_tokens=True), add_special_tokens=False)[:limit]
        if again == current:
            return current
        current = again
    return current


def filler_ids(tokenizer: TextCodec, count: int) -> list[int]:
    """`count` copies of " x" (one token after any text in the tokenizers we ship)."""
    return [int(tokenizer.encode(" x", add_special_tokens=False)[-1])] * count


@functools.lru_cache(maxsize=8)
def _allowed(tokenizer: object, vocab_size: int, ascii_only: bool) -> torch.Tensor:
    """The tokens a message may use (decoding the whole vocabulary once per tokenizer)."""
    return allowed_token_mask(tokenizer, vocab_size, no_special=True, ascii_only=ascii_only)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SearchInput:
    """One searching node's round: what it read, its start message and its readers."""

    node_id: str
    round_index: int
    seed: int
    spec: SearchMessage
    seen_ids: torch.Tensor  # (S,) everything the node read by the end of the round
    start_ids: list[int]  # the message the search starts from
    frame: tuple[str, str]
    max_bytes: int
    receivers: tuple[ReceiverContext, ...] = ()


def _span(item: SearchInput, round_tokens: int) -> list[int]:
    length = item.spec.span_tokens or round_tokens
    return item.seen_ids[max(0, len(item.seen_ids) - length) :].tolist()


def _task(item: SearchInput, tokenizer: TextCodec, start: int, round_tokens: int) -> MessageTask:
    before, after = (tokenizer.encode(text, add_special_tokens=False) if text else [] for text in item.frame)
    span = _span(item, round_tokens)
    if item.spec.objective == "sender":
        parts = [MessagePart(prefix_ids=[start, *before], rest_ids=[*after, *span], labels=span)]
    else:
        if not item.receivers:
            raise ValueError(f"node {item.node_id}: a receiver-aware message search needs its receivers' contexts")
        weight = 1.0 / len(item.receivers)
        parts = [
            MessagePart(
                prefix_ids=[start, *r.control_ids, *before], rest_ids=[*after, *r.prefix_ids.tolist(), *span],
                labels=span, weight=weight,
            )
            for r in item.receivers
        ]
    seed = derive_seed(item.seed, "message", item.node_id, item.round_index) % (2**31)
    return MessageTask(parts=parts, init_ids=item.start_ids, seed=seed, max_bytes=item.max_bytes)


def search_round_messages(
    model: torch.nn.Module,
    tokenizer: TextCodec,
    items: Sequence[SearchInput],
    *,
    start: int,
    round_tokens: int,
    batch_tokens: int,
) -> list[tuple[str, MessageSearch]]:
    """Each item's message text and its search record, all items searched together (they
    must share a search configuration apart from their own fields: grouped by the caller)."""
    if not items:
        return []
    began = time.perf_counter()
    spec = items[0].spec
    config = MessageSearchConfig(
        steps=spec.steps, search_width=spec.search_width, topk=spec.topk, n_replace=spec.n_replace,
        filter_ascii=spec.ascii_only, filter_retokenize=spec.retokenize_filter, batch_tokens=batch_tokens,
    )
    vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator, union-attr]
    tasks = [_task(item, tokenizer, start, round_tokens) for item in items]
    found = search_messages(model, tokenizer, tasks, config, allowed=_allowed(tokenizer, vocab, spec.ascii_only))  # type: ignore[arg-type]
    seconds = (time.perf_counter() - began) / len(items)
    return [
        (
            result.text,
            MessageSearch(
                objective=item.spec.objective, before=result.initial_loss, after=result.loss,
                tokens=len(result.ids), steps=len(result.losses), seconds=seconds,
            ),
        )
        for item, result in zip(items, found)
    ]
