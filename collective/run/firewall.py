"""Receiver-side firewalls: what a node's filters do to the messages it is about to read.

A receiver's `firewall:` filters apply in order to each message in its inbox: a dropped
message is gone, a rewritten one goes on to the next filter with its new text (after
`retokenize`, with its new token ids). The model filters run batched over every message of
every receiver that shares the model: `perplexity` scores all the messages waiting for it in
one teacher-forced pass ([start][message], `collective.lm.scoring.score_items`), `paraphrase`
writes all its rewrites in one greedy generation (`collective.lm.scoring.generate`); the text
filters (`charset`, `retokenize`) cost next to nothing. Each message's `ScreenRecord` says what
happened to it, with its share of the passes' time.

Then the inbox is built from what survives: rendered with the bus's template and encoded
as one text, exactly as a node without a firewall reads it; or, when the firewall has
`retokenize`, as token ids: the frame pieces (header, template around each message) each
encoded as the inbox renders them, each message's own ids in its place.

The node's round (`collective.run.node.compute_rounds`) calls `read_inboxes`, so that the
embedded runtime and a volunteer run the same code; the threshold fitting
(`collective.run.firewall_fit`) scores its benign messages with `message_nll`.
"""

from __future__ import annotations

import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from collective.lm.codec import TextCodec, pad_id, start_token, stop_ids
from collective.lm.scoring import ScoreItem, generate, score_items
from collective.message_specs import filter_labels
from collective.records import MessageRecord, ScreenRecord
from collective.run.bus import render_messages
from collective.scenario import (
    CharsetFilter,
    FirewallFilter,
    ParaphraseFilter,
    PerplexityFilter,
    RetokenizeFilter,
)
from collective.seeding import generator

_SLOT = "\x00message\x00"
_PRINTABLE = frozenset(string.printable)  # ASCII letters, digits, punctuation and whitespace


@dataclass(frozen=True)
class InboxRead:
    """One receiver's inbox in one round, before its firewall: the messages it would read (in
    inbox order), its filters, and how the bus renders an inbox."""

    receiver: str
    seed: int  # the scenario seed (retokenize's cuts are seeded from it)
    messages: tuple[MessageRecord, ...]
    filters: tuple[FirewallFilter, ...]
    template: str
    header: str


@dataclass(frozen=True)
class ReadInbox:
    """What the receiver reads: its inbox as token ids, and what its firewall did to each message."""

    ids: list[int]
    screened: list[ScreenRecord]


@dataclass
class Screened:
    """One message on its way through a receiver's filters."""

    receiver: str
    message: MessageRecord
    text: str
    ids: list[int] | None = None  # set by retokenize: the tokens the message reaches the context as
    next_filter: int = 0
    dropped_by: str | None = None
    rewritten_by: list[str] = field(default_factory=list)
    score: float | None = None
    threshold: float | None = None
    seconds: float = 0.0

    def token_ids(self, tokenizer: TextCodec) -> list[int]:
        return self.ids if self.ids is not None else list(tokenizer.encode(self.text, add_special_tokens=False))

    def record(self) -> ScreenRecord:
        m = self.message
        action: Literal["pass", "drop", "rewrite"] = "pass"
        by = None
        if self.dropped_by is not None:
            action, by = "drop", self.dropped_by
        elif self.rewritten_by:
            action, by = "rewrite", "+".join(self.rewritten_by)
        return ScreenRecord(
            sender=m.sender, receiver=self.receiver, round_sent=m.round_sent, action=action, filter=by,
            score=self.score, threshold=self.threshold, text=self.text if action == "rewrite" else None, seconds=self.seconds,
        )


# ---------------------------------------------------------------------------- the filters, pure


def allowed_characters(text: str, allow: str) -> str:
    """`text` without the characters outside the set: `printable` (ASCII printable and
    whitespace), `ascii`, or `latin` (ASCII plus U+00A0..U+017F)."""
    if allow == "printable":
        return "".join(c for c in text if c in _PRINTABLE)
    if allow == "ascii":
        return "".join(c for c in text if ord(c) < 0x80)
    return "".join(c for c in text if ord(c) < 0x80 or 0xA0 <= ord(c) <= 0x17F)


def retokenized_ids(text: str, tokenizer: TextCodec, split_rate: float, gen: torch.Generator) -> list[int]:
    """`text` cut between characters where a draw from `gen` falls under `split_rate` (one
    draw per boundary, len(text) - 1 of them), each piece encoded on its own."""
    if len(text) < 2:
        return list(tokenizer.encode(text, add_special_tokens=False)) if text else []
    cuts = (torch.rand(len(text) - 1, generator=gen) < split_rate).nonzero().flatten().add(1).tolist()
    bounds = [0, *cuts, len(text)]
    return [t for a, b in zip(bounds, bounds[1:]) for t in tokenizer.encode(text[a:b], add_special_tokens=False)]


def message_score(nll: torch.Tensor, window: int | None) -> float:
    """A message's score from its per-token NLL (n,): the mean, or with `window` the highest
    mean over the message's windows of that many consecutive tokens (the mean when shorter)."""
    if len(nll) == 0:
        return 0.0
    if window is None or len(nll) <= window:
        return float(nll.mean())
    return float(nll.unfold(0, window, 1).mean(-1).max())  # (n - window + 1, window) -> max of means


@torch.no_grad()
def message_nll(model: torch.nn.Module, tokenizer: TextCodec, messages: Sequence[list[int]], *, batch_tokens: int) -> list[torch.Tensor]:
    """Each message's per-token NLL (n_i,) in nats, scored from [start][message], all of them
    in one batched pass: every row is filled on the right to the longest message's length R
    (a causal model's earlier positions never see the filling), so all rows score R tokens.
    A message several receivers read (a broadcast) is scored once."""
    distinct = list(dict.fromkeys(tuple(ids) for ids in messages))
    longest = max((len(ids) for ids in distinct), default=0)
    if longest == 0:
        return [torch.zeros(0) for _ in messages]
    start = start_token(tokenizer)
    start_ids = torch.tensor([start])
    items = []
    for ids in distinct:
        row = torch.tensor([*ids, *[start] * (longest - len(ids))], dtype=torch.long)  # (R,)
        items.append(ScoreItem(start_ids, row, row))
    scored = score_items(model, items, pad_id=pad_id(tokenizer), top_k=1, batch_tokens=batch_tokens)
    row_of = {ids: i for i, ids in enumerate(distinct)}
    return [-scored.target_logprob[row_of[tuple(ids)], : len(ids)] for ids in messages]  # (n_i,) each


@torch.no_grad()
def paraphrases(
    model: torch.nn.Module, tokenizer: TextCodec, messages: Sequence[list[int]], prompts: Sequence[str], *, batch_tokens: int
) -> list[str]:
    """Each message rewritten: the model continues [start][message][prompt] greedily for as
    many tokens as the message has (batched, `batch_tokens` padded prompt tokens at a time)."""
    start = start_token(tokenizer)
    rows = [
        torch.tensor([start, *ids, *tokenizer.encode(prompt, add_special_tokens=False)], dtype=torch.long)
        for ids, prompt in zip(messages, prompts, strict=True)
    ]
    out: list[str] = []
    longest = max((len(r) for r in rows), default=1)
    step = max(1, batch_tokens // longest)
    for first in range(0, len(rows), step):
        group = range(first, min(first + step, len(rows)))
        new = generate(
            model, [rows[i] for i in group], max_new_tokens=max(len(messages[i]) for i in group),
            pad_id=pad_id(tokenizer), stop_ids=stop_ids(tokenizer), generators=[None] * len(group),
            temperatures=[1.0] * len(group),
        )
        out += [tokenizer.decode(ids[: len(messages[i])], skip_special_tokens=True) for ids, i in zip(new, group)]
    return out


# ---------------------------------------------------------------------------- screening


def _text_filter(item: Screened, spec: FirewallFilter, label: str, seed: int, tokenizer: TextCodec) -> None:
    """Apply a charset or retokenize filter to one message."""
    if isinstance(spec, CharsetFilter):
        kept = allowed_characters(item.text, spec.allow)
        if kept != item.text:
            if spec.action == "drop":
                item.dropped_by = label
            else:
                item.text, item.ids = kept, None
                item.rewritten_by.append(label)
    elif isinstance(spec, RetokenizeFilter):
        m = item.message
        gen = generator(seed, "retokenize", item.receiver, m.sender, m.round_sent)
        ids = retokenized_ids(item.text, tokenizer, spec.split_rate, gen)
        if ids != item.token_ids(tokenizer):
            item.rewritten_by.append(label)
        item.ids = ids


def _perplexity_pass(model: torch.nn.Module, tokenizer: TextCodec, waiting: list[tuple[Screened, FirewallFilter, str]], batch_tokens: int) -> None:
    nll = message_nll(model, tokenizer, [item.token_ids(tokenizer) for item, _, _ in waiting], batch_tokens=batch_tokens)
    for (item, spec, label), values in zip(waiting, nll, strict=True):
        assert isinstance(spec, PerplexityFilter)
        if spec.threshold is None:
            raise ValueError(f"node {item.receiver}: firewall filter {label} has no threshold; fit it first (`prepare`)")
        item.score, item.threshold = message_score(values, spec.window), spec.threshold
        if item.score > spec.threshold:
            item.dropped_by = label


def _paraphrase_pass(model: torch.nn.Module, tokenizer: TextCodec, waiting: list[tuple[Screened, FirewallFilter, str]], batch_tokens: int) -> None:
    ids = [item.token_ids(tokenizer) for item, _, _ in waiting]
    prompts = [spec.prompt for _, spec, _ in waiting if isinstance(spec, ParaphraseFilter)]
    for (item, _, label), text in zip(waiting, paraphrases(model, tokenizer, ids, prompts, batch_tokens=batch_tokens), strict=True):
        if text != item.text or item.ids is not None:
            item.rewritten_by.append(label)
        item.text, item.ids = text, None


def screen(model: torch.nn.Module, tokenizer: TextCodec, reads: Sequence[InboxRead], *, batch_tokens: int) -> list[list[Screened]]:
    """Every message of every read through its receiver's filters, in order. The text filters
    are applied as a message reaches them; then every message waiting for a model filter goes
    through one batched pass (perplexity first), and so on until every message is through."""
    labels = [filter_labels(read.filters) for read in reads]
    items = [[Screened(read.receiver, m, m.text) for m in read.messages] for read in reads]
    while True:
        waiting: dict[str, list[tuple[Screened, FirewallFilter, str]]] = {"perplexity": [], "paraphrase": []}
        for read, names, screened in zip(reads, labels, items):
            for item in screened:
                while item.dropped_by is None and item.next_filter < len(read.filters):
                    spec, label = read.filters[item.next_filter], names[item.next_filter]
                    if spec.kind in waiting:
                        waiting[spec.kind].append((item, spec, label))
                        break
                    began = time.perf_counter()
                    _text_filter(item, spec, label, read.seed, tokenizer)
                    item.seconds += time.perf_counter() - began
                    item.next_filter += 1
        kind = next((k for k, w in waiting.items() if w), None)
        if kind is None:
            return items
        batch = waiting[kind]
        began = time.perf_counter()
        (_perplexity_pass if kind == "perplexity" else _paraphrase_pass)(model, tokenizer, batch, batch_tokens)
        share = (time.perf_counter() - began) / len(batch)
        for item, _, _ in batch:
            item.seconds += share
            item.next_filter += 1


def inbox_ids(kept: Sequence[Screened], template: str, header: str, tokenizer: TextCodec, *, pieces: bool) -> list[int]:
    """The inbox the receiver reads, as token ids. Without `pieces`: the inbox rendered as the
    bus renders it and encoded as one text. With `pieces`: the frame around the messages (the
    header, the template before and after each text) encoded piece by piece as it renders, and
    each message's own ids in its place."""
    if not pieces:
        text = render_messages([s.message.model_copy(update={"text": s.text}) for s in kept], template, header)
        return list(tokenizer.encode(text, add_special_tokens=False)) if text else []
    if not kept:
        return []
    slots = [s.message.model_copy(update={"text": _SLOT}) for s in kept]
    frame = render_messages(slots, template, header).split(_SLOT)  # len(kept) + 1 pieces
    ids = list(tokenizer.encode(frame[0], add_special_tokens=False)) if frame[0] else []
    for item, after in zip(kept, frame[1:], strict=True):
        ids += item.token_ids(tokenizer)
        ids += tokenizer.encode(after, add_special_tokens=False) if after else []
    return ids


def read_inboxes(model: torch.nn.Module, tokenizer: TextCodec, reads: Sequence[InboxRead], *, batch_tokens: int) -> list[ReadInbox]:
    """Each receiver's inbox after its firewall, as it reads it, and the screen records of
    its messages (none for a receiver without filters)."""
    screened = screen(model, tokenizer, [r for r in reads if r.filters], batch_tokens=batch_tokens)
    by_read = iter(screened)
    out = []
    for read in reads:
        if not read.filters:
            items = [Screened(read.receiver, m, m.text) for m in read.messages]
            out.append(ReadInbox(inbox_ids(items, read.template, read.header, tokenizer, pieces=False), []))
            continue
        items = next(by_read)
        kept = [s for s in items if s.dropped_by is None]
        pieces = any(isinstance(f, RetokenizeFilter) for f in read.filters)
        out.append(ReadInbox(inbox_ids(kept, read.template, read.header, tokenizer, pieces=pieces), [s.record() for s in items]))
    return out
