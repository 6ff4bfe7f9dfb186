"""What the coordinator checks of a node's result before it counts.

Its prediction rows must fit the run (one member, the round's positions, the model's
vocabulary, the kept candidates, log-probabilities that are log-probabilities), and its
message records must be exactly what the link policies make of its message text: the
coordinator recomputes them, so a node cannot claim a budget, a drop or a delivery round
the topology does not give it. A failed check raises `Rejected`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from collective.distributed.payloads import RequestPayload, ResultPayload, check_predictions
from collective.distributed.protocol import Rejected
from collective.lm.codec import TextCodec
from collective.records import MessageRecord
from collective.run.bus import LinkPolicy, outgoing_messages
from collective.run.node import NodeRoundResult


class EncodeOnce:
    """A codec that encodes each text once: a message is cut to every out-link's budget, mostly
    to the same text, and the tokenizer is most of what checking a result costs."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec = codec
        self._ids: dict[tuple[str, bool], list[int]] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        key = (text, add_special_tokens)
        if key not in self._ids:
            self._ids[key] = list(self.codec.encode(text, add_special_tokens=add_special_tokens))
        return list(self._ids[key])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.codec.decode(ids, skip_special_tokens=skip_special_tokens)


@dataclass(frozen=True)
class ResultCheck:
    """The run's facts a result is checked against."""

    top_k: int
    seed: int
    vocab_sizes: dict[str, int]  # node id -> its model's vocabulary size
    out_neighbours: dict[str, list[str]]  # sender -> receivers, in send order
    policies: dict[tuple[str, str], LinkPolicy]
    codec: TextCodec

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
            problem = check_predictions(
                preds, n_positions=len(request.targets), top_k=self.top_k, vocab_size=self.vocab_sizes[node_id]
            )
            if problem is not None:
                raise Rejected("malformed", f"{node_id}'s {name} row: {problem}")

    def messages(self, node_id: str, round_index: int, result: ResultPayload) -> list[MessageRecord]:
        """The node's message records, which must be exactly what the link policies make of its text."""
        if result.message_text is None:
            if result.messages:
                raise Rejected("malformed", f"{node_id} reported messages but no message text")
            return []
        codec = EncodeOnce(self.codec)
        expected = outgoing_messages(
            node_id, result.message_text, round_index, self.out_neighbours[node_id], self.policies, codec, self.seed
        )
        if result.messages != expected:
            for record in result.messages:
                policy = self.policies.get((record.sender, record.receiver))
                if policy is not None and (
                    len(record.text.encode("utf-8")) > policy.max_message_bytes
                    or len(codec.encode(record.text, add_special_tokens=False)) > policy.max_message_tokens
                ):
                    raise Rejected("over_budget", f"{node_id} -> {record.receiver}: {record.n_tokens} tokens, {record.n_bytes} bytes")
            raise Rejected("malformed", f"{node_id}'s message records are not what the link policies make of its text")
        return expected
