"""Searched messages: what a node with `message.policy: search` or `attack` says after a round.

A searched message is a control input aimed at the node's readers. Its tokens are found by
the batched greedy coordinate search of `controllers.messages`, one task per node, every
searching node of a model in one search:

- the message has as many tokens as its start (`init`): the relay (the last B tokens the
  node read), the text the node writes after its speak prompt, or B filler tokens, with B
  the out-links' token budget; a candidate longer than the out-links' byte budget is
  filtered out, so the message travels whole;
- the span is the last `span_tokens` tokens the node read (default: the round just read),
  as it read them (a masked view's placeholders included); the positions the sender's own
  mask hid are read but not scored (their labels would be the placeholder, not the text);
- a reader encodes its inbox as one string, so a message is scored as the tokens it reads:
  the start and every candidate must satisfy encode(before + text + after) == before ids +
  message ids + after ids for the frame around it (a frame's trailing space or newline would
  otherwise merge with the message's first or last token); a start that does not is cut at
  its ends until it does (else the filler start);
- objective `sender`: the NLL of the span after [start][the message as a reader's inbox
  renders it] (the bus header, then the inbox template around the text), each piece
  tokenized on its own;
- objective `receiver`: for each out-neighbour j, the NLL of the span after [start][j's
  control][the rendered message][j's view of the text before the span], averaged over
  the out-neighbours, scored with the sender's model (the sender knows no other). The
  engine fills the receivers' contexts; only an embedded run can, since a distributed
  node never sees its neighbours' views.

An attack (`policy: attack`) is the same search aimed the other way, one part per reader it
assumes: each out-neighbour's control and view (threat `white-box`, filled by the engine), or
one reader standing in for them all, with no control and the attacker's own view
(`model-only`, and `transfer`, whose search runs on another model of the same tokenizer):

- `untargeted`: the span's NLL after [start][control][the rendered message][the view before
  the span], weight -1/readers (the search raises the readers' mean NLL of the span, the
  proxy for the coming round they will read), each token's NLL capped at 2 ln V nats (V the
  vocabulary) so that the objective is bounded and one token pushed to probability 0
  cannot carry it;
- `targeted`: the NLL of the target's tokens teacher-forced after [start][control][the
  rendered message][the view before the span's end] (where the coming round begins),
  weight 1/readers.

The search's objective before and after (nats per span or target token; an untargeted
attack's sign turned back, so that it reads as the readers' NLL) goes into the round's
events and the report.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from collective.lm.codec import TextCodec
from collective.records import MessageSearch
from collective.scenario import AttackMessage, SearchMessage
from collective.seeding import derive_seed
from controllers.filters import allowed_token_mask
from controllers.messages import (
    IGNORE,
    MessagePart,
    MessageSearchConfig,
    MessageSearchResult,
    MessageTask,
    search_messages,
)

logger = logging.getLogger(__name__)
_SLOT = "\x00message\x00"
NLL_CAP_PER_LOG_VOCAB = 2.0  # an untargeted attack counts a token's NLL up to 2 ln V nats


@dataclass(frozen=True)
class ReceiverContext:
    """What a searching sender assumes of one reader: its control prompt and its view of the
    text before the span (prefix_ids (P,); a targeted attack's: before the span's end)."""

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
    """One searching (or attacking) node's round: what it read, its start message and its readers."""

    node_id: str
    round_index: int
    seed: int
    spec: SearchMessage | AttackMessage
    seen_ids: torch.Tensor  # (S,) everything the node read by the end of the round
    start_ids: list[int]  # the message the search starts from
    frame: tuple[str, str]
    max_bytes: int
    receivers: tuple[ReceiverContext, ...] = ()
    placeholder_id: int | None = None  # the token the sender's masked view shows for a hidden one


def _span(item: SearchInput, round_tokens: int) -> list[int]:
    length = item.spec.span_tokens or round_tokens
    return item.seen_ids[max(0, len(item.seen_ids) - length) :].tolist()


Reader = tuple[list[int], list[int]]
"""What a message's search assumes of one reader: its control ids and its view (the text
it reads after the message and before the scored labels)."""


def _reader_parts(
    start: int,
    frame: tuple[list[int], list[int]],
    readers: Sequence[Reader],
    read: list[int],
    weight: float,
    cap: float | None = None,
    labels: list[int] | None = None,
) -> list[MessagePart]:
    """One part per reader: [start][control][frame before] [message] [frame after][view][read],
    scoring `labels` (default: `read`) at the positions of `read`, with the given weight (and
    per-token NLL cap)."""
    before, after = frame
    return [
        MessagePart(
            prefix_ids=[start, *control, *before], rest_ids=[*after, *view, *read],
            labels=read if labels is None else labels, weight=weight, max_nll=cap,
        )
        for control, view in readers
    ]


def seen_labels(span: list[int], placeholder_id: int | None) -> list[int] | None:
    """The span's labels with the positions the sender's mask hid left out (IGNORE); None when
    nothing is hidden, or everything is (then there is nothing better to score)."""
    if placeholder_id is None or placeholder_id not in span or all(t == placeholder_id for t in span):
        return None
    return [IGNORE if t == placeholder_id else t for t in span]


def reads_as_scored(tokenizer: TextCodec, frame: tuple[str, str]) -> Callable[[list[int]], bool]:
    """Whether a reader, encoding [frame before][the message's text][frame after] as one
    string, reads the frame's ids and exactly the message ids that the search scores."""
    before, after = (list(tokenizer.encode(text, add_special_tokens=False)) if text else [] for text in frame)

    def accept(ids: list[int]) -> bool:
        text = frame[0] + tokenizer.decode(ids, skip_special_tokens=False) + frame[1]
        return list(tokenizer.encode(text, add_special_tokens=False)) == [*before, *ids, *after]

    return accept


def framed_start(ids: list[int], fallback: list[int], accept: Callable[[list[int]], bool]) -> list[int]:
    """The start a reader reads as scored: `ids`, else `ids` with up to two tokens cut from
    either end (where the frame merges), else `fallback` (the filler), else `ids` as it is."""
    for front, back in ((0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (0, 2), (2, 2)):
        cut = ids[front : len(ids) - back]
        if cut and accept(cut):
            return cut
    if accept(fallback):
        return fallback
    logger.warning("a searched message's start reads as other tokens in its frame; it is scored as given")
    return ids


def _known_readers(item: SearchInput, what: str) -> list[Reader]:
    """The readers' contexts the engine filled (an embedded run's out-neighbours)."""
    if not item.receivers:
        raise ValueError(f"node {item.node_id}: {what} needs its receivers' contexts")
    return [(r.control_ids, r.prefix_ids.tolist()) for r in item.receivers]


def _attack_parts(
    item: SearchInput, tokenizer: TextCodec, start: int, frame: tuple[list[int], list[int]], span: list[int], vocab: int
) -> list[MessagePart]:
    """An attack's parts, one per reader it assumes (see the module docstring); `vocab`: the
    search model's embedding rows, for the untargeted cap."""
    spec = item.spec
    assert isinstance(spec, AttackMessage)
    targeted = spec.objective == "targeted"
    if spec.threat == "white-box":
        readers = _known_readers(item, "a white-box attack")
    else:  # its own view stands in for the readers': all it read (targeted), or what came before the span
        seen = item.seen_ids.tolist()
        readers = [([], seen if targeted else seen[: len(seen) - len(span)])]
    if targeted:
        target = tokenizer.encode(spec.target or "", add_special_tokens=False)
        return _reader_parts(start, frame, readers, target, 1.0 / len(readers))
    cap = NLL_CAP_PER_LOG_VOCAB * math.log(vocab)
    return _reader_parts(start, frame, readers, span, -1.0 / len(readers), cap, seen_labels(span, item.placeholder_id))


def _task(item: SearchInput, tokenizer: TextCodec, start: int, round_tokens: int, vocab: int) -> MessageTask:
    before, after = (tokenizer.encode(text, add_special_tokens=False) if text else [] for text in item.frame)
    span = _span(item, round_tokens)
    labels = seen_labels(span, item.placeholder_id)
    if isinstance(item.spec, AttackMessage):
        parts = _attack_parts(item, tokenizer, start, (before, after), span, vocab)
    elif item.spec.objective == "sender":  # a reader who knows nothing else: no control, no view
        parts = _reader_parts(start, (before, after), [([], [])], span, 1.0, labels=labels)
    else:
        readers = _known_readers(item, "a receiver-aware message search")
        parts = _reader_parts(start, (before, after), readers, span, 1.0 / len(readers), labels=labels)
    seed = derive_seed(item.seed, "message", item.node_id, item.round_index) % (2**31)
    accept = reads_as_scored(tokenizer, item.frame)
    init = framed_start(item.start_ids, filler_ids(tokenizer, len(item.start_ids)), accept)
    return MessageTask(parts=parts, init_ids=init, seed=seed, max_bytes=item.max_bytes, accept=accept)


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
    tasks = [_task(item, tokenizer, start, round_tokens, vocab) for item in items]
    found = search_messages(model, tokenizer, tasks, config, allowed=_allowed(tokenizer, vocab, spec.ascii_only))  # type: ignore[arg-type]
    seconds = (time.perf_counter() - began) / len(items)
    return [(result.text, _record(item, result, seconds)) for item, result in zip(items, found)]


def _record(item: SearchInput, result: MessageSearchResult, seconds: float) -> MessageSearch:
    """The search's record, in nats per token: an untargeted attack minimised minus the
    readers' NLL, so its sign is turned back (higher after than before: it hurts more)."""
    sign = -1.0 if item.spec.objective == "untargeted" else 1.0
    return MessageSearch(
        objective=item.spec.objective, before=sign * result.initial_loss, after=sign * result.loss,
        tokens=len(result.ids), steps=len(result.losses), seconds=seconds,
    )
