"""What the coordinator checks of a node's result before it counts.

Its prediction rows must fit the run (one member, the round's positions, the model's
vocabulary, the kept candidates, log-probabilities that are log-probabilities; in a
byte-unit round: every byte of the round, all 256 values, summing to 1), and its
message records must be exactly what the link policies make of its message text, its
tokens counted in the sender's tokenizer: the coordinator recomputes them, so a node cannot
claim a budget, a drop or a delivery round the topology does not give it. Its screen records (what its firewall did to the messages it
read) must be about its own inbox: messages from its in-neighbours, sent before the round,
at most `bus.retain` per in-link, each action one its firewall can take (a drop by one of
its filters, a rewrite by its rewriting filters, a perplexity score held to the threshold
the coordinator sent). A failed check raises `Rejected`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from collective.distributed.payloads import RequestPayload, ResultPayload
from collective.distributed.protocol import Rejected
from collective.distributed.wire import check_byte_row, check_predictions
from collective.lm.codec import TextCodec
from collective.records import MessageRecord, ScreenRecord
from collective.run.bus import LinkPolicy, outgoing_messages
from collective.run.firewall import filter_labels
from collective.run.node import NodeRoundResult
from collective.scenario import CharsetFilter, FirewallFilter, PerplexityFilter


@dataclass(frozen=True)
class ResultCheck:
    """The run's facts a result is checked against."""

    top_k: int
    seed: int
    vocab_sizes: dict[str, int]  # node id -> its model's vocabulary size
    out_neighbours: dict[str, list[str]]  # sender -> receivers, in send order
    policies: dict[tuple[str, str], LinkPolicy]
    codec: TextCodec
    in_neighbours: dict[str, list[str]] = field(default_factory=dict)  # receiver -> senders
    firewalls: dict[str, tuple[FirewallFilter, ...]] = field(default_factory=dict)  # node -> the filters it was sent
    retain: int = 1  # messages a receiver reads per in-link (bus.retain)
    codecs: dict[str, TextCodec] = field(default_factory=dict)  # sender node -> its tokenizer, where not `codec`

    def rows(self, node_id: str, decoded: NodeRoundResult, request: RequestPayload) -> None:
        """Every row the request asked for is there and fits the run."""
        for name, preds, wanted in (
            ("collective", decoded.collective, True),
            ("isolated", decoded.isolated, request.want_isolated),
            ("plain", decoded.plain, request.want_plain),
        ):
            if preds is None:
                if wanted:
                    raise Rejected("malformed", f"{node_id}'s result lacks the {name} row")
                continue
            data = request.round_data()
            if data is not None:
                problem = check_byte_row(preds, n_bytes=len(data))
            else:
                problem = check_predictions(
                    preds, n_positions=len(request.targets), top_k=self.top_k, vocab_size=self.vocab_sizes[node_id]
                )
            if problem is not None:
                raise Rejected("malformed", f"{node_id}'s {name} row: {problem}")

    def message_ids(self, results: Mapping[str, ResultPayload]) -> dict[str, list[int]]:
        """The tokens of the message texts of a host envelope's parts (node id -> its text's
        tokens in its tokenizer), encoded together: one call per tokenizer (see `encode_texts`).
        Empty when that call fails: each part's check then encodes its own text, so that a text
        the tokenizer cannot take drops its own part only."""
        by_codec: dict[int, tuple[TextCodec, list[str]]] = {}
        for node_id, result in results.items():
            if result.message_text is not None:
                codec = self.codecs.get(node_id, self.codec)
                by_codec.setdefault(id(codec), (codec, []))[1].append(node_id)
        found: dict[str, list[int]] = {}
        for codec, node_ids in by_codec.values():
            try:
                encoded = encode_texts(codec, [str(results[n].message_text) for n in node_ids])
            except Exception:  # any text it cannot take: each part's check finds its own
                return {}
            found.update(zip(node_ids, encoded, strict=True))
        return found

    def messages(
        self, node_id: str, round_index: int, result: ResultPayload, ids: Sequence[int] | None = None
    ) -> list[MessageRecord]:
        """The node's message records, which must be exactly what the link policies make of its
        text (`ids`: the text's tokens in the sender's tokenizer, when the caller encoded them)."""
        if result.message_text is None:
            if result.messages:
                raise Rejected("malformed", f"{node_id} reported messages but no message text")
            return []
        codec = self.codecs.get(node_id, self.codec)
        text = result.message_text
        if ids is None:
            ids = codec.encode(text, add_special_tokens=False)
        expected = outgoing_messages(node_id, text, round_index, self.out_neighbours[node_id], self.policies, codec, self.seed, ids)
        if result.messages != expected:
            counted = {text: len(ids), **{record.text: record.n_tokens for record in expected}}  # any other text: encoded once
            for record in result.messages:
                policy = self.policies.get((record.sender, record.receiver))
                if policy is None:
                    continue
                if record.text not in counted:
                    counted[record.text] = len(codec.encode(record.text, add_special_tokens=False))
                if len(record.text.encode("utf-8")) > policy.max_message_bytes or counted[record.text] > policy.max_message_tokens:
                    raise Rejected("over_budget", f"{node_id} -> {record.receiver}: {record.n_tokens} tokens, {record.n_bytes} bytes")
            raise Rejected("malformed", f"{node_id}'s message records are not what the link policies make of its text")
        return expected

    def screened(self, node_id: str, round_index: int, records: Sequence[ScreenRecord]) -> list[ScreenRecord]:
        """The node's screen records of this round, which must be what its firewall can have
        done to the messages it read (see the module docstring)."""
        filters = self.firewalls.get(node_id, ())
        if records and not filters:
            raise Rejected("malformed", f"{node_id} has no firewall but reported {len(records)} screen record(s)")
        senders = self.in_neighbours.get(node_id, [])
        labels = dict(zip(filter_labels(filters), filters))
        seen: set[tuple[str, int]] = set()
        for record in records:
            if record.receiver != node_id:
                raise Rejected("spoofed", f"{node_id} reported a screen record of {record.receiver}'s inbox")
            if record.sender not in senders:
                raise Rejected("not_neighbour", f"{node_id} screened a message from {record.sender}: {record.sender} -> {node_id} is not a link")
            if not 0 <= record.round_sent < round_index or (record.sender, record.round_sent) in seen:
                raise Rejected("malformed", f"{node_id} screened {record.sender}'s message of round {record.round_sent} (twice, or not sent before)")
            seen.add((record.sender, record.round_sent))
            problem = screen_problem(record, labels)
            if problem is not None:
                raise Rejected("malformed", f"{node_id}'s screen record of {record.sender}@{record.round_sent}: {problem}")
        if any(sum(s == sender for s, _ in seen) > self.retain for sender in senders):
            raise Rejected("malformed", f"{node_id} screened more than {self.retain} message(s) of one in-neighbour (bus.retain)")
        return list(records)


def encode_texts(codec: TextCodec, texts: list[str]) -> list[list[int]]:
    """Each text's tokens as `codec.encode(text, add_special_tokens=False)` gives them, in one
    call of a fast Hugging Face tokenizer's batch encoder where `codec` is one (its per-call
    overhead is most of what encoding a short message costs), else one call each."""
    if len(texts) > 1 and getattr(codec, "is_fast", False) and callable(codec):
        return [list(ids) for ids in codec(texts, add_special_tokens=False)["input_ids"]]
    return [list(codec.encode(text, add_special_tokens=False)) for text in texts]


def _drops(spec: FirewallFilter) -> bool:
    return isinstance(spec, PerplexityFilter) or (isinstance(spec, CharsetFilter) and spec.action == "drop")


def screen_problem(record: ScreenRecord, labels: dict[str, FirewallFilter]) -> str | None:
    """Why `record` is not an action the firewall (its filters by label, `filter_labels`) can
    take, or None: a pass names no filter, a drop one dropping filter, a rewrite rewriting
    filters and the text read instead; a perplexity score comes with the threshold of one of
    the node's perplexity filters, above it exactly when a perplexity filter dropped it."""
    named = [] if record.filter is None else record.filter.split("+")
    if any(name not in labels for name in named):
        return f"filter {record.filter!r}, the node's filters are {', '.join(labels)}"
    specs = [labels[name] for name in named]
    shapes = {
        "pass": not specs and record.text is None,
        "drop": len(specs) == 1 and _drops(specs[0]) and record.text is None,
        "rewrite": bool(specs) and not any(_drops(spec) for spec in specs) and record.text is not None,
    }
    if not shapes[record.action]:
        return f"a {record.action} by {record.filter!r}{' with' if record.text is not None else ' without'} a rewritten text"
    if not (math.isfinite(record.seconds) and record.seconds >= 0):
        return f"{record.seconds} seconds of firewall time"
    by_perplexity = record.action == "drop" and isinstance(specs[0], PerplexityFilter)
    if record.score is None or record.threshold is None:
        if by_perplexity or record.score != record.threshold:  # a drop without them, or one without the other
            return f"score {record.score} and threshold {record.threshold}: a perplexity filter records both"
        return None
    thresholds = [spec.threshold for spec in (specs if by_perplexity else labels.values()) if isinstance(spec, PerplexityFilter)]
    if record.threshold not in thresholds or not math.isfinite(record.score):
        return f"score {record.score} held to threshold {record.threshold}; the node was sent {thresholds or 'no perplexity filter'}"
    if (record.score > record.threshold) != by_perplexity:
        return f"score {record.score} against threshold {record.threshold} does not give a {record.action}"
    return None
