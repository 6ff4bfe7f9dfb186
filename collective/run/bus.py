"""The text bus: link budgets, latency, seeded drops, and each receiver's inbox.

Data flow for one message: the sender's text goes through `outgoing_messages`, which
applies each out-link's budget (tokens, then UTF-8 bytes) and decides, from the
scenario seed, the link and the round, whether the link drops it. Delivered messages
go into the receiver's `Inbox`, which shows a message from round r only in rounds
>= r + latency and keeps the last `retain` messages per neighbour. The in-memory bus
of the embedded runtime and the MQTT runtime both use these same pieces, which is why
they deliver the same inboxes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from collective.lm.codec import TextCodec
from collective.records import MessageRecord
from collective.scenario import BusSpec
from collective.seeding import uniform

__all__ = [
    "InMemoryBus",
    "Inbox",
    "LinkPolicy",
    "TextCodec",
    "enforce_budget",
    "is_dropped",
    "link_policies",
    "message_byte_budgets",
    "message_token_budgets",
    "outgoing_messages",
    "render_messages",
]

@dataclass(frozen=True)
class LinkPolicy:
    max_message_tokens: int
    max_message_bytes: int
    latency_rounds: int
    drop_rate: float


def link_policies(bus: BusSpec, edges: Iterable[tuple[str, str]]) -> dict[tuple[str, str], LinkPolicy]:
    """Each directed edge's policy: the bus defaults, then any per-link override."""
    overrides = {(link.source, link.target): link for link in bus.links}
    policies = {}
    for edge in edges:
        link = overrides.get(edge)
        policies[edge] = LinkPolicy(
            max_message_tokens=bus.max_message_tokens if link is None or link.max_message_tokens is None else link.max_message_tokens,
            max_message_bytes=bus.max_message_bytes if link is None or link.max_message_bytes is None else link.max_message_bytes,
            latency_rounds=bus.latency_rounds if link is None or link.latency_rounds is None else link.latency_rounds,
            drop_rate=bus.drop_rate if link is None or link.drop_rate is None else link.drop_rate,
        )
    return policies


def message_token_budgets(bus: BusSpec, graph: nx.DiGraph) -> dict[str, int]:
    """Each sender's message budget in tokens: the tightest of its out-links (the bus default
    for a node without out-links). A relay quotes that many tokens of its view; a written
    message stops there (each link then cuts it to its own budget, see `outgoing_messages`)."""
    return _tightest(bus, graph, "max_message_tokens")


def message_byte_budgets(bus: BusSpec, graph: nx.DiGraph) -> dict[str, int]:
    """Each sender's message budget in UTF-8 bytes: the tightest of its out-links (a searched
    message keeps within it, so that every link carries it whole)."""
    return _tightest(bus, graph, "max_message_bytes")


def _tightest(bus: BusSpec, graph: nx.DiGraph, name: str) -> dict[str, int]:
    policies = link_policies(bus, graph.edges())
    default = int(getattr(bus, name))
    return {
        node: min([int(getattr(policies[(node, receiver)], name)) for receiver in graph.successors(node)] or [default])
        for node in graph.nodes()
    }


def enforce_budget(text: str, codec: TextCodec, max_tokens: int, max_bytes: int) -> tuple[str, int, int, bool]:
    """Cut `text` to at most `max_tokens` tokens and `max_bytes` UTF-8 bytes.

    Returns (text, n_tokens, n_bytes, truncated). Bytes are cut at a character boundary.
    """
    return _cut(text, codec, max_tokens, max_bytes, {})


def _cut(
    text: str, codec: TextCodec, max_tokens: int, max_bytes: int, measured: dict[str, Sequence[int]]
) -> tuple[str, int, int, bool]:
    """`enforce_budget` with `measured` (text -> its tokens): what was encoded before, by this
    cut or by another budget's cut of the same message (each text is encoded once)."""

    def tokens(piece: str) -> Sequence[int]:
        if piece not in measured:
            measured[piece] = codec.encode(piece, add_special_tokens=False)
        return measured[piece]

    ids = tokens(text)
    raw = text.encode("utf-8")
    if len(ids) <= max_tokens and len(raw) <= max_bytes:
        return text, len(ids), len(raw), False  # fits as it is: nothing cut, nothing to measure again
    truncated = False
    if len(ids) > max_tokens:
        text = _token_prefix(text, ids, codec, max_tokens)
        truncated = True
    raw = text.encode("utf-8")
    if len(raw) > max_bytes:
        text = raw[:max_bytes].decode("utf-8", errors="ignore")
        truncated = True
    # decode(encode(x)) may differ from x; re-measure what will travel, and drop characters
    # from the end until it fits (a cut text can re-tokenize longer; this always ends).
    while True:
        ids = tokens(text)
        raw = text.encode("utf-8")
        if len(ids) <= max_tokens and len(raw) <= max_bytes:
            break
        text = text[:-1]
        truncated = True
    return text, len(ids), len(raw), truncated


def _token_prefix(text: str, ids: Sequence[int], codec: TextCodec, max_tokens: int) -> str:
    """The text of the first `max_tokens` tokens, without a character split between tokens.

    A byte-level tokenizer spreads one character over several tokens; decoding a cut in the
    middle gives a replacement character that is not in the text (and re-tokenizes longer).
    Back off a few tokens to a cut that decodes to a prefix of the text.
    """
    for k in range(max_tokens, max(-1, max_tokens - 4), -1):
        piece = codec.decode(ids[:k], skip_special_tokens=True)
        if text.startswith(piece):
            return piece
    return codec.decode(ids[:max_tokens], skip_special_tokens=True).rstrip("\ufffd")


def is_dropped(seed: int, sender: str, receiver: str, round_index: int, drop_rate: float) -> bool:
    """Whether the link drops the message sent in this round (seeded per link and round)."""
    if drop_rate <= 0.0:
        return False
    return uniform(seed, "drop", sender, receiver, round_index) < drop_rate


def outgoing_messages(
    sender: str,
    text: str,
    round_index: int,
    receivers: Sequence[str],
    policies: dict[tuple[str, str], LinkPolicy],
    codec: TextCodec,
    seed: int,
    ids: Sequence[int] | None = None,
) -> list[MessageRecord]:
    """The broadcast of `text` from `sender` as one record per out-link (`ids`: the text's
    tokens in `codec`, when the caller has them already). Each text is encoded once for all
    links, the message and every cut of it, and the message is cut once per distinct budget
    (the tokenizer is most of what a message costs the bus and the coordinator's check)."""
    measured: dict[str, Sequence[int]] = {} if ids is None else {text: ids}
    cuts: dict[tuple[int, int], tuple[str, int, int, bool]] = {}
    records = []
    for receiver in receivers:
        policy = policies[(sender, receiver)]
        budget = (policy.max_message_tokens, policy.max_message_bytes)
        if budget not in cuts:
            cuts[budget] = _cut(text, codec, *budget, measured)
        cut, n_tokens, n_bytes, truncated = cuts[budget]
        records.append(
            MessageRecord(
                sender=sender,
                receiver=receiver,
                round_sent=round_index,
                deliver_round=round_index + policy.latency_rounds,
                text=cut,
                n_tokens=n_tokens,
                n_bytes=n_bytes,
                truncated=truncated,
                dropped=is_dropped(seed, sender, receiver, round_index, policy.drop_rate),
            )
        )
    return records


class Inbox:
    """One receiver's inbox: messages become visible at their deliver round."""

    def __init__(self, node_id: str, neighbours: Sequence[str], retain: int) -> None:
        self.node_id = node_id
        self.neighbours = list(neighbours)
        self.retain = retain
        self._messages: dict[str, list[MessageRecord]] = {name: [] for name in self.neighbours}

    def deliver(self, message: MessageRecord) -> None:
        if message.receiver != self.node_id or message.sender not in self._messages:
            raise ValueError(f"{message.sender} -> {message.receiver} is not a link into {self.node_id}")
        if message.dropped:
            return
        queue = self._messages[message.sender]
        queue.append(message)
        queue.sort(key=lambda m: (m.deliver_round, m.round_sent))
        # keep what could still be shown: every pending one (however long the latency) and
        # the last `retain` already readable in the round the message was sent
        now = message.round_sent
        readable = [m for m in queue if m.deliver_round <= now]
        queue[:] = readable[-self.retain :] + [m for m in queue if m.deliver_round > now]

    def visible(self, round_index: int) -> list[MessageRecord]:
        """Messages readable in `round_index`: the last `retain` per neighbour, neighbours in order."""
        shown = []
        for name in self.neighbours:
            ready = [m for m in self._messages[name] if m.deliver_round <= round_index]
            shown.extend(ready[-self.retain :])
        return shown

    def render(self, round_index: int, template: str, header: str = "") -> str:
        return render_messages(self.visible(round_index), template, header)


def render_messages(messages: Sequence[MessageRecord], template: str, header: str = "") -> str:
    """An inbox's text: the header, then each message through the template ("" when empty)."""
    if not messages:
        return ""
    return header + "".join(template.format(sender=m.sender, text=m.text, round=m.round_sent) for m in messages)


class InMemoryBus:
    """The embedded runtime's bus: every node's inbox in one process."""

    def __init__(
        self, graph: nx.DiGraph, bus: BusSpec, codec: TextCodec, seed: int, codecs: Mapping[str, TextCodec] | None = None
    ) -> None:
        self.graph = graph
        self.spec = bus
        self.codec = codec  # counts a link's tokens ...
        self.codecs = dict(codecs or {})  # ... unless the sender has its own (node id -> its model's tokenizer)
        self.seed = seed
        self.policies = link_policies(bus, graph.edges())
        self.inboxes = {
            node: Inbox(node, list(graph.predecessors(node)), bus.retain) for node in graph.nodes()
        }

    def receivers(self, sender: str) -> list[str]:
        return list(self.graph.successors(sender))

    def send(self, sender: str, text: str, round_index: int) -> list[MessageRecord]:
        records = outgoing_messages(
            sender, text, round_index, self.receivers(sender), self.policies, self.codecs.get(sender, self.codec), self.seed
        )
        for record in records:
            self.inboxes[record.receiver].deliver(record)
        return records

    def render_inbox(self, node_id: str, round_index: int) -> str:
        return self.inboxes[node_id].render(round_index, self.spec.inbox_template, self.spec.inbox_header)
