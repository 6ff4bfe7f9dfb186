"""The payloads an envelope carries (see `protocol` for the envelope and the topics).

Each payload names its `kind`, the discriminator the envelope is parsed by. What a node
needs of a round (`RequestPayload`: its own view, the keys of the messages it may read and
its fitted firewall) goes out; what the evaluator needs of it (`ResultPayload`: predictions,
messages, and what its firewall did to each message it read) comes back. Prediction rows
travel as `wire` has them: token rows as they are, byte rows (a byte-unit run, where a request
also carries the round's bytes) as 256 log-probabilities a byte, exact either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from collective.distributed.wire import (
    BASE64,
    ByteRowsWire,
    PredictionsWire,
    WireModel,
    bytes_wire,
    wire_bytes,
)
from collective.distributed.wire import (
    TensorBlob as TensorBlob,  # re-exported: the wire's names, where they always were
)
from collective.distributed.wire import check_predictions as check_predictions
from collective.lm.predictions import TokenPredictions
from collective.records import Event, MessageRecord, MessageSearch, ScreenRecord
from collective.run.node import NodeRoundRequest, NodeRoundResult
from collective.scenario import BusSpec, FirewallFilter, MessageSpec, PerplexityFilter

# ---------------------------------------------------------------------------- run and presence


class ScenarioPayload(WireModel):
    """What a volunteer needs to know of the run: the scenario, its node's links, its models'
    tokenizers (by digest) and, in a byte-unit run, how long a round and a view can be in bytes
    (a node's tokens of them are at most as many: its size limits)."""

    kind: Literal["scenario"] = "scenario"
    scenario_yaml: str
    in_neighbours: dict[str, list[str]] = Field(description="receiver -> senders, in inbox order")
    out_neighbours: dict[str, list[str]] = Field(description="sender -> receivers, in send order")
    tokenizer_digests: dict[str, str] = Field(
        description="model alias -> what its tokenizer hashes to (tokenizer_digest); a node counts a sender's tokens "
        "itself only when the sender's model has its tokenizer (protocol 5)"
    )
    session: str
    unit: Literal["token", "byte"] = Field("token", description="a byte-unit run's requests carry the round's bytes (protocol 5)")
    round_bytes_max: int = Field(0, ge=0, description="byte unit: the most bytes a round of the stream has")
    view_bytes_max: int = Field(0, ge=0, description="byte unit: the most bytes a node's view before a round has")


class ControlPayload(WireModel):
    """The run's state (retained): `open` whenever the coordinator (re)connects, then `ended`."""

    kind: Literal["control"] = "control"
    state: Literal["open", "ended"]
    session: str
    detail: str = ""


class JoinPayload(WireModel):
    """A volunteer that loaded its node's model and is ready for requests."""

    kind: Literal["join"] = "join"
    session: str = Field(max_length=64)
    model: str = Field(max_length=500)
    vocab_size: int
    tokenizer_digest: str = Field(max_length=64)
    device: str = Field(max_length=64)
    host: str = Field("", max_length=255)
    via: str | None = Field(
        None, max_length=64, description="the host whose topics serve this node (coord/to/<via>, nodes/<via>/result) (protocol 6)"
    )


class LeavePayload(WireModel):
    """A volunteer that stops serving (also its last will, which the broker publishes)."""

    kind: Literal["leave"] = "leave"
    session: str = Field(max_length=64)
    reason: str = Field("", max_length=500)


class WelcomePayload(WireModel):
    """The coordinator accepted the join of this session."""

    kind: Literal["welcome"] = "welcome"
    session: str = Field(description="the session of the join it answers")
    node_id: str | None = Field(None, description="the node it welcomes (a host's joins share its session) (protocol 6)")


class RefusePayload(WireModel):
    """The coordinator refused the join (or claim) of this session, and why (the node or host stops)."""

    kind: Literal["refuse"] = "refuse"
    session: str
    reason: str
    node_id: str | None = Field(None, description="the node it refuses, when it answers a join (protocol 6)")


class ClaimPayload(WireModel):
    """A host asks for `count` nodes that no live process serves yet (`collective node --claim N`).

    It goes on nodes/<host id>/status (a host id is never a node id), the answer (`assign` or
    `refuse`) on coord/to/<host id>. A new kind, not a new field: no node that speaks protocol 2
    receives it, so the schema version stays."""

    kind: Literal["claim"] = "claim"
    session: str = Field(max_length=64)
    count: int = Field(ge=1, le=1 << 16)


class AssignPayload(WireModel):
    """The coordinator's answer to a claim: the nodes this host serves (reserved for it until they join)."""

    kind: Literal["assign"] = "assign"
    session: str = Field(description="the session of the claim it answers")
    node_ids: list[str]


# ---------------------------------------------------------------------------- rounds


class MessageKey(WireModel):
    """A message the coordinator booked: the receiver reads exactly these."""

    sender: str
    round_sent: int
    digest: str


# the request fields that mean the same on both sides of the wire, and the token id lists
# (tensors in a NodeRoundRequest, lists of ints on the wire)
_SAME_FIELDS = (
    "node_id", "message", "message_tokens", "message_bytes", "seed", "want_plain", "want_isolated", "placeholder_id", "replay_text",
)
_ID_FIELDS = ("prefix_ids", "round_inputs", "targets")


class RequestPayload(WireModel):
    """One node's round: only its own view (partial observation is enforced here)."""

    kind: Literal["request"] = "request"
    node_id: str
    control_ids: list[int]
    prefix_ids: list[int]
    round_inputs: list[int]
    targets: list[int]
    message: MessageSpec
    message_tokens: int = Field(ge=0)
    message_bytes: int = Field(1 << 30, ge=0, description="the out-links' byte budget (protocol 2)")
    message_frame: tuple[str, str] = Field(("", "\n"), description="a reader's inbox text around the message (protocol 2)")
    seed: int
    placeholder_id: int | None = Field(None, description="a masked view's hidden-token id: a searched message does not score it")
    replay_text: str | None = Field(None, description="`replay`: the text the node sent in this round of the replayed run (protocol 4)")
    round_bytes: str | None = Field(
        None, pattern=BASE64, description="a byte-unit run: the round's bytes (base64); the ids are the node's own tokens (protocol 5)"
    )
    want_plain: bool = True
    want_isolated: bool = True
    inbox: list[MessageKey] = Field(default_factory=list, description="messages that become readable this round")
    firewall: tuple[FirewallFilter, ...] = Field(
        (), description="the node's firewall, every perplexity threshold set (fitted by the coordinator) (protocol 3)"
    )
    deadline_s: float = Field(gt=0)

    @staticmethod
    def from_request(request: NodeRoundRequest, inbox: list[MessageKey], deadline_s: float) -> RequestPayload:
        same: dict[str, Any] = {name: getattr(request, name) for name in _SAME_FIELDS}
        ids = {name: getattr(request, name).tolist() for name in _ID_FIELDS}
        return RequestPayload(
            **same, **ids, control_ids=list(request.control_ids), message_frame=request.message_frame, inbox=inbox,
            firewall=request.firewall, deadline_s=deadline_s,
            round_bytes=None if request.round_bytes is None else bytes_wire(request.round_bytes),
        )

    def round_data(self) -> bytes | None:
        """The round's bytes (a byte-unit run), or None."""
        return None if self.round_bytes is None else wire_bytes(self.round_bytes)

    def to_request(self, round_index: int, inbox: Sequence[MessageRecord] = (), bus: BusSpec | None = None) -> NodeRoundRequest:
        """The node's round: `inbox` is what it reads this round (`Inbox.visible`, as the embedded
        bus gives it), which `compute_rounds` screens with the firewall and renders as the
        scenario's `bus` does (default: a bus with the default template and header)."""
        bus = bus or BusSpec()
        same: dict[str, Any] = {name: getattr(self, name) for name in _SAME_FIELDS}
        ids: dict[str, Any] = {name: torch.tensor(getattr(self, name), dtype=torch.long) for name in _ID_FIELDS}
        return NodeRoundRequest(
            **same, **ids, round_index=round_index, control_ids=list(self.control_ids),
            message_frame=self.message_frame,
            inbox_messages=tuple(inbox), firewall=self.firewall, inbox_template=bus.inbox_template, inbox_header=bus.inbox_header,
            round_bytes=self.round_data(),
        )

    def firewall_problem(self, scenario_filters: Sequence[FirewallFilter]) -> str | None:
        """Why the firewall is not the scenario's for this node with its thresholds fitted
        (a perplexity filter without a threshold in the scenario gets one, nothing else
        changes), or None when it is."""
        if len(self.firewall) != len(scenario_filters):
            return f"a firewall of {len(self.firewall)} filter(s), the scenario gives node {self.node_id} {len(scenario_filters)}"
        for index, (sent, spec) in enumerate(zip(self.firewall, scenario_filters)):
            if isinstance(sent, PerplexityFilter) and isinstance(spec, PerplexityFilter) and spec.threshold is None:
                if sent.threshold is None:
                    return f"firewall[{index}] (perplexity) has no fitted threshold"
                spec = spec.model_copy(update={"threshold": sent.threshold})
            if sent != spec:
                return f"firewall[{index}] is {sent!r}, the scenario's is {spec!r}"
        return None

    def ids_out_of_range(self, vocab_size: int) -> bool:
        every = (*self.control_ids, *self.prefix_ids, *self.round_inputs, *self.targets)
        return any(t < 0 or t >= vocab_size for t in every)


RowWire = PredictionsWire | ByteRowsWire  # a token row, or a byte row (told apart by their fields)


def _wire(preds: TokenPredictions | None, in_bytes: bool) -> RowWire | None:
    if preds is None:
        return None
    return ByteRowsWire.from_predictions(preds) if in_bytes else PredictionsWire.from_predictions(preds)


def _unwire(wire: RowWire | None, data: bytes | None) -> TokenPredictions | None:
    if wire is None:
        return None
    if isinstance(wire, ByteRowsWire):
        if data is None:
            raise ValueError("byte rows for a round asked in tokens")
        return wire.to_predictions(data)
    if data is not None:
        raise ValueError("token rows for a round asked in bytes")
    return wire.to_predictions()


def _same_rows(a: TokenPredictions | None, b: TokenPredictions | None) -> bool:
    """Whether two rows hold the same record (a node without a control prompt scores its isolated
    and plain contexts once: the same row)."""
    if a is None or b is None:
        return False
    return a is b or (
        a.vocab_size == b.vocab_size and torch.equal(a.target_logprob, b.target_logprob)
        and torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)
    )


class ResultPayload(WireModel):
    """What the evaluator needs of a node's round, plus the node's own counters."""

    kind: Literal["result"] = "result"
    session: str
    collective: RowWire = Field(description="a token row, or in a byte-unit run a byte row (protocol 5)")
    isolated: RowWire | None
    plain: RowWire | None
    plain_is_isolated: bool = Field(
        False, description="the plain row is the isolated one, sent once (no control prompt: one context) (protocol 5)"
    )
    message_text: str | None
    inbox_tokens: int = Field(ge=0)
    messages: list[MessageRecord]
    compute_seconds: float = 0.0
    rejected: dict[str, int] = Field(default_factory=dict, description="envelopes this node dropped so far, by reason")
    missing_messages: int = Field(0, description="booked messages that never reached this node, so far")
    message_search: MessageSearch | None = Field(None, description="a searched message's objective (protocol 2)")
    screened: list[ScreenRecord] = Field(
        default_factory=list, description="what the node's firewall did to each message it read this round (protocol 3)"
    )
    shuffle_matched: bool | None = Field(None, description="a shuffled message read as its message's tokens (protocol 4)")

    @staticmethod
    def from_result(
        result: NodeRoundResult, session: str, compute_seconds: float, rejected: dict[str, int], missing_messages: int,
        in_bytes: bool = False,
    ) -> ResultPayload:
        """in_bytes: the round was asked in bytes (its request carried them): byte rows go out."""
        collective = _wire(result.collective, in_bytes)
        assert collective is not None
        plain_is_isolated = _same_rows(result.isolated, result.plain)
        return ResultPayload(
            session=session,
            collective=collective,
            isolated=_wire(result.isolated, in_bytes),
            plain=None if plain_is_isolated else _wire(result.plain, in_bytes),
            plain_is_isolated=plain_is_isolated,
            message_text=result.message_text,
            inbox_tokens=result.inbox_tokens,
            messages=list(result.messages),
            compute_seconds=compute_seconds,
            rejected=rejected,
            missing_messages=missing_messages,
            message_search=result.message_search,
            screened=list(result.screened),
            shuffle_matched=result.shuffle_matched,
        )

    def to_result(self, node_id: str, round_index: int, round_bytes: bytes | None = None) -> NodeRoundResult:
        """The node's round; round_bytes: the bytes a byte-unit round scored (its byte rows'
        targets). Raises ValueError when the rows are not of the round's unit or length."""
        collective = _unwire(self.collective, round_bytes)
        assert collective is not None
        if self.plain_is_isolated and (self.plain is not None or self.isolated is None):
            raise ValueError("a plain row said to be the isolated one, but sent too or without an isolated row")
        isolated = _unwire(self.isolated, round_bytes)
        return NodeRoundResult(
            node_id=node_id,
            round_index=round_index,
            collective=collective,
            isolated=isolated,
            plain=isolated if self.plain_is_isolated else _unwire(self.plain, round_bytes),
            message_text=self.message_text,
            inbox_tokens=self.inbox_tokens,
            messages=list(self.messages),
            message_search=self.message_search,
            screened=list(self.screened),
            shuffle_matched=self.shuffle_matched,
        )


class HostRequestPayload(WireModel):
    """A host's round: each of its nodes' own request, as a lone node would get it (protocol 6)."""

    kind: Literal["host_request"] = "host_request"
    requests: list[RequestPayload]


class HostResultPayload(WireModel):
    """A host's nodes' results of a round (all of them, or a part when they do not fit one
    packet), each as a lone node would send it (protocol 6)."""

    kind: Literal["host_result"] = "host_result"
    results: dict[str, ResultPayload] = Field(description="node id -> its result")


class MessagePayload(WireModel):
    """One message on the link sender -> receiver, held by the receiver until it is booked."""

    kind: Literal["message"] = "message"
    record: MessageRecord = Field(description="as the sender's link policy made it: budget, delivery round")


class EchoPayload(WireModel):
    """The preflight's publish/subscribe round trip."""

    kind: Literal["echo"] = "echo"
    nonce: str = Field(description="a fresh random string the echo must bring back")


class EventPayload(WireModel):
    """One run record (RunStart, RoundEvent or RunEnd): exactly a line of the run's events.jsonl.

    Added to schema 1 without a version bump: only watchers subscribe to coord/events/, and a
    record carries its own `schema_version` (EVENT_SCHEMA_VERSION of collective.records)."""

    kind: Literal["event"] = "event"
    record: Event


Payload = Annotated[
    ScenarioPayload
    | ControlPayload
    | JoinPayload
    | LeavePayload
    | WelcomePayload
    | RefusePayload
    | ClaimPayload
    | AssignPayload
    | RequestPayload
    | ResultPayload
    | HostRequestPayload
    | HostResultPayload
    | MessagePayload
    | EchoPayload
    | EventPayload,
    Field(discriminator="kind"),
]
Kind = Literal[
    "scenario", "control", "join", "leave", "welcome", "refuse", "claim", "assign", "request", "result", "host_request", "host_result",
    "message", "echo", "event",
]
