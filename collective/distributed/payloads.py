"""The payloads an envelope carries (see `protocol` for the envelope and the topics).

Each payload names its `kind`, the discriminator the envelope is parsed by. What a node
needs of a round (`RequestPayload`: its own view, the keys of the messages it may read and
its fitted firewall) goes out; what the evaluator needs of it (`ResultPayload`: predictions,
messages, and what its firewall did to each message it read) comes back. Predictions
travel as base64 of little-endian float32/int32 arrays (`TensorBlob`): exact round trips.
"""

from __future__ import annotations

import base64
import math
import sys
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from collective.lm.predictions import TokenPredictions
from collective.records import Event, MessageRecord, MessageSearch, ScreenRecord
from collective.run.node import NodeRoundRequest, NodeRoundResult
from collective.scenario import BusSpec, FirewallFilter, MessageSpec, PerplexityFilter


class WireModel(BaseModel):
    """A record on the wire: unknown fields are refused, nothing changes after parsing."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- tensors


_DTYPES: dict[str, tuple[torch.dtype, int]] = {"float32": (torch.float32, 4), "int32": (torch.int32, 4)}


class TensorBlob(WireModel):
    """A tensor as base64 of its little-endian bytes (float32 and int32 round-trip exactly)."""

    dtype: Literal["float32", "int32"]
    shape: list[Annotated[int, Field(ge=0, le=1 << 24)]] = Field(max_length=4)
    data: str = Field(pattern=r"^[A-Za-z0-9+/]*={0,2}$")

    @model_validator(mode="after")
    def _size_matches(self) -> TensorBlob:
        expected = math.prod(self.shape) * _DTYPES[self.dtype][1]
        # base64 of n bytes is 4 * ceil(n / 3) characters
        if len(self.data) != 4 * ((expected + 2) // 3):
            raise ValueError(f"data holds {len(self.data)} base64 characters, shape {self.shape} needs {expected} bytes")
        return self

    @staticmethod
    def from_tensor(tensor: torch.Tensor, dtype: Literal["float32", "int32"]) -> TensorBlob:
        torch_dtype = _DTYPES[dtype][0]
        array = tensor.detach().to("cpu", torch_dtype).contiguous()
        raw = array.numpy().tobytes() if sys.byteorder == "little" else array.numpy().byteswap().tobytes()
        return TensorBlob(dtype=dtype, shape=list(array.shape), data=base64.b64encode(raw).decode("ascii"))

    def to_tensor(self) -> torch.Tensor:
        raw = bytearray(base64.b64decode(self.data, validate=True))
        torch_dtype = _DTYPES[self.dtype][0]
        if not raw:
            return torch.zeros(self.shape, dtype=torch_dtype)
        tensor = torch.frombuffer(raw, dtype=torch_dtype).reshape(self.shape).clone()
        return tensor if sys.byteorder == "little" else tensor.byteswap()  # type: ignore[attr-defined]


class PredictionsWire(WireModel):
    """A `TokenPredictions` record on the wire. Shapes: (N, T), (N, T, K), (N, T, K)."""

    target_logprob: TensorBlob
    topk_ids: TensorBlob
    topk_logprobs: TensorBlob
    vocab_size: int = Field(ge=1, lt=1 << 31)

    @model_validator(mode="after")
    def _shapes_agree(self) -> PredictionsWire:
        n_t = self.target_logprob.shape
        if len(n_t) != 2 or self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[:2] != n_t:
            raise ValueError(
                f"inconsistent shapes {self.target_logprob.shape}, {self.topk_ids.shape}, {self.topk_logprobs.shape}"
            )
        if len(self.topk_ids.shape) != 3 or self.target_logprob.dtype != "float32" or self.topk_ids.dtype != "int32":
            raise ValueError("expected float32 (N, T) log-probs and int32 (N, T, K) ids")
        return self

    @staticmethod
    def from_predictions(preds: TokenPredictions) -> PredictionsWire:
        return PredictionsWire(
            target_logprob=TensorBlob.from_tensor(preds.target_logprob, "float32"),
            topk_ids=TensorBlob.from_tensor(preds.topk_ids, "int32"),
            topk_logprobs=TensorBlob.from_tensor(preds.topk_logprobs, "float32"),
            vocab_size=preds.vocab_size,
        )

    def to_predictions(self) -> TokenPredictions:
        return TokenPredictions(
            self.target_logprob.to_tensor(),
            self.topk_ids.to_tensor().long(),
            self.topk_logprobs.to_tensor(),
            self.vocab_size,
        )


def check_predictions(preds: TokenPredictions, *, n_positions: int, top_k: int, vocab_size: int) -> str | None:
    """Why a received record cannot be one member's round of this run, or None when it can."""
    if preds.n_members != 1 or preds.n_positions != n_positions:
        return f"expected 1 member x {n_positions} positions, got {preds.n_members} x {preds.n_positions}"
    if preds.vocab_size != vocab_size:
        return f"vocabulary of {preds.vocab_size} tokens, the run's model has {vocab_size}"
    if preds.topk_ids.shape[-1] != min(top_k, vocab_size):
        return f"{preds.topk_ids.shape[-1]} candidates per position, the run keeps {min(top_k, vocab_size)}"
    if bool(((preds.topk_ids < 0) | (preds.topk_ids >= vocab_size)).any()):
        return "a candidate token id outside the vocabulary"
    for name, values in (("target", preds.target_logprob), ("top-k", preds.topk_logprobs)):
        if bool(torch.isnan(values).any()) or bool((values > 1e-3).any()):
            return f"{name} log-probabilities that are NaN or above 0"
    return None


# ---------------------------------------------------------------------------- run and presence


class ScenarioPayload(WireModel):
    """What a volunteer needs to know of the run: the scenario and its node's links."""

    kind: Literal["scenario"] = "scenario"
    scenario_yaml: str
    in_neighbours: dict[str, list[str]] = Field(description="receiver -> senders, in inbox order")
    out_neighbours: dict[str, list[str]] = Field(description="sender -> receivers, in send order")
    tokenizer_digest: str = Field(description="what a node's tokenizer must hash to (see tokenizer_digest)")
    session: str


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


class LeavePayload(WireModel):
    """A volunteer that stops serving (also its last will, which the broker publishes)."""

    kind: Literal["leave"] = "leave"
    session: str = Field(max_length=64)
    reason: str = Field("", max_length=500)


class WelcomePayload(WireModel):
    """The coordinator accepted the join of this session."""

    kind: Literal["welcome"] = "welcome"
    session: str = Field(description="the session of the join it answers")


class RefusePayload(WireModel):
    """The coordinator refused the join (or claim) of this session, and why (the node or host stops)."""

    kind: Literal["refuse"] = "refuse"
    session: str
    reason: str


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
        )

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


def _wire(preds: TokenPredictions | None) -> PredictionsWire | None:
    return None if preds is None else PredictionsWire.from_predictions(preds)


def _unwire(wire: PredictionsWire | None) -> TokenPredictions | None:
    return None if wire is None else wire.to_predictions()


class ResultPayload(WireModel):
    """What the evaluator needs of a node's round, plus the node's own counters."""

    kind: Literal["result"] = "result"
    session: str
    collective: PredictionsWire
    isolated: PredictionsWire | None
    plain: PredictionsWire | None
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
        result: NodeRoundResult, session: str, compute_seconds: float, rejected: dict[str, int], missing_messages: int
    ) -> ResultPayload:
        return ResultPayload(
            session=session,
            collective=PredictionsWire.from_predictions(result.collective),
            isolated=_wire(result.isolated),
            plain=_wire(result.plain),
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

    def to_result(self, node_id: str, round_index: int) -> NodeRoundResult:
        return NodeRoundResult(
            node_id=node_id,
            round_index=round_index,
            collective=self.collective.to_predictions(),
            isolated=_unwire(self.isolated),
            plain=_unwire(self.plain),
            message_text=self.message_text,
            inbox_tokens=self.inbox_tokens,
            messages=list(self.messages),
            message_search=self.message_search,
            screened=list(self.screened),
            shuffle_matched=self.shuffle_matched,
        )


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
    | MessagePayload
    | EchoPayload
    | EventPayload,
    Field(discriminator="kind"),
]
Kind = Literal[
    "scenario", "control", "join", "leave", "welcome", "refuse", "claim", "assign", "request", "result", "message", "echo", "event"
]
