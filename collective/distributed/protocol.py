"""What travels over the broker: versioned envelopes, their payloads, and the topic layout.

Every MQTT payload is one JSON `Envelope` (schema version, run id, round, sender, kind,
payload). Topics live under `collective/<run_id>/`; the coordinator writes only under
`coord/`, a node only under `nodes/<its id>/`, so that a broker ACL can let each user
publish under its own topics and nothing else:

    coord/scenario             retained  the resolved scenario and every node's links
    coord/control              retained  open (with the coordinator's session) or ended
    coord/to/<node>                      request (that node's view only), welcome, refuse
    nodes/<node>/status                  join; the node's last will says leave
    nodes/<node>/result                  the node's predictions and messages of a round
    nodes/<node>/msg/<receiver>          one message on the link node -> receiver
    coord/echo, nodes/<node>/echo        the preflight publish/subscribe echo
    coord/events/start         retained  the run's RunStart record   } every record the
    coord/events/round                   each RoundEvent, in order     } coordinator writes
    coord/events/end           retained  the RunEnd record            } to events.jsonl

The `coord/events/` records are for read-only watchers (`collective watch --broker`):
no node subscribes to them, so their `event` kind was added without a schema bump.
A received payload goes through `decode_envelope` (size, JSON, schema) and then the
receiver's own checks (run, round, sender, neighbour, budget); anything that fails is
dropped and counted in `Rejections`, never raised to the round logic.
Predictions travel as base64 of little-endian float32/int32 arrays: exact round trips.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from collective.lm.predictions import TokenPredictions
from collective.records import Event, MessageRecord, RoundEvent, RunEnd, RunStart
from collective.run.node import NodeRoundRequest, NodeRoundResult
from collective.scenario import MessageSpec

log = logging.getLogger(__name__)

PROTOCOL_SCHEMA_VERSION = 1
COORDINATOR = "coordinator"
WATCHER = "watcher"  # the read-only login of `collective watch --broker` (see broker.acl_text)
TOPIC_ROOT = "collective"
RUN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

RejectReason = Literal[
    "oversized",  # payload larger than the topic allows
    "malformed",  # not JSON, not an envelope, or a payload that does not hold together
    "wrong_schema",  # another protocol schema version
    "wrong_run",  # an envelope of another run
    "wrong_round",  # a round that is not the current one (late, early or replayed)
    "spoofed",  # the sender field does not match the topic's owner
    "unknown_node",  # a node id the scenario does not have
    "not_neighbour",  # a message on a link that the topology does not have
    "over_budget",  # a message over its link's token or byte budget
    "unexpected",  # a kind that does not belong on this topic
    "unconfirmed",  # a message the coordinator did not book for this round
    "refused",  # a join the coordinator refused (tokenizer, unknown node)
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- tensors


_DTYPES: dict[str, tuple[torch.dtype, int]] = {"float32": (torch.float32, 4), "int32": (torch.int32, 4)}


class TensorBlob(_Wire):
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


class PredictionsWire(_Wire):
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


# ---------------------------------------------------------------------------- payloads


class ScenarioPayload(_Wire):
    """What a volunteer needs to know of the run: the scenario and its node's links."""

    kind: Literal["scenario"] = "scenario"
    scenario_yaml: str
    in_neighbours: dict[str, list[str]] = Field(description="receiver -> senders, in inbox order")
    out_neighbours: dict[str, list[str]] = Field(description="sender -> receivers, in send order")
    tokenizer_digest: str = Field(description="what a node's tokenizer must hash to (see tokenizer_digest)")
    session: str


class ControlPayload(_Wire):
    kind: Literal["control"] = "control"
    state: Literal["open", "ended"]
    session: str
    detail: str = ""


class JoinPayload(_Wire):
    kind: Literal["join"] = "join"
    session: str = Field(max_length=64)
    model: str = Field(max_length=500)
    vocab_size: int
    tokenizer_digest: str = Field(max_length=64)
    device: str = Field(max_length=64)
    host: str = Field("", max_length=255)


class LeavePayload(_Wire):
    kind: Literal["leave"] = "leave"
    session: str = Field(max_length=64)
    reason: str = Field("", max_length=500)


class WelcomePayload(_Wire):
    kind: Literal["welcome"] = "welcome"
    session: str


class RefusePayload(_Wire):
    kind: Literal["refuse"] = "refuse"
    session: str
    reason: str


class MessageKey(_Wire):
    """A message the coordinator booked: the receiver reads exactly these."""

    sender: str
    round_sent: int
    digest: str


class RequestPayload(_Wire):
    """One node's round: only its own view (partial observation is enforced here)."""

    kind: Literal["request"] = "request"
    node_id: str
    control_ids: list[int]
    prefix_ids: list[int]
    round_inputs: list[int]
    targets: list[int]
    message: MessageSpec
    message_tokens: int = Field(ge=0)
    seed: int
    want_plain: bool = True
    want_isolated: bool = True
    inbox: list[MessageKey] = Field(default_factory=list, description="messages that become readable this round")
    deadline_s: float = Field(gt=0)

    @staticmethod
    def from_request(request: NodeRoundRequest, inbox: list[MessageKey], deadline_s: float) -> RequestPayload:
        return RequestPayload(
            node_id=request.node_id,
            control_ids=list(request.control_ids),
            prefix_ids=request.prefix_ids.tolist(),
            round_inputs=request.round_inputs.tolist(),
            targets=request.targets.tolist(),
            message=request.message,
            message_tokens=request.message_tokens,
            seed=request.seed,
            want_plain=request.want_plain,
            want_isolated=request.want_isolated,
            inbox=inbox,
            deadline_s=deadline_s,
        )

    def to_request(self, round_index: int, inbox_text: str) -> NodeRoundRequest:
        def ids(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long)

        return NodeRoundRequest(
            node_id=self.node_id,
            round_index=round_index,
            control_ids=list(self.control_ids),
            prefix_ids=ids(self.prefix_ids),
            round_inputs=ids(self.round_inputs),
            targets=ids(self.targets),
            message=self.message,
            message_tokens=self.message_tokens,
            seed=self.seed,
            inbox_text=inbox_text,
            want_plain=self.want_plain,
            want_isolated=self.want_isolated,
        )

    def ids_out_of_range(self, vocab_size: int) -> bool:
        every = (*self.control_ids, *self.prefix_ids, *self.round_inputs, *self.targets)
        return any(t < 0 or t >= vocab_size for t in every)


class ResultPayload(_Wire):
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

    @staticmethod
    def from_result(
        result: NodeRoundResult, session: str, compute_seconds: float, rejected: dict[str, int], missing_messages: int
    ) -> ResultPayload:
        def wire(preds: TokenPredictions | None) -> PredictionsWire | None:
            return None if preds is None else PredictionsWire.from_predictions(preds)

        collective = wire(result.collective)
        assert collective is not None
        return ResultPayload(
            session=session,
            collective=collective,
            isolated=wire(result.isolated),
            plain=wire(result.plain),
            message_text=result.message_text,
            inbox_tokens=result.inbox_tokens,
            messages=list(result.messages),
            compute_seconds=compute_seconds,
            rejected=rejected,
            missing_messages=missing_messages,
        )

    def to_result(self, node_id: str, round_index: int) -> NodeRoundResult:
        return NodeRoundResult(
            node_id=node_id,
            round_index=round_index,
            collective=self.collective.to_predictions(),
            isolated=None if self.isolated is None else self.isolated.to_predictions(),
            plain=None if self.plain is None else self.plain.to_predictions(),
            message_text=self.message_text,
            inbox_tokens=self.inbox_tokens,
            messages=list(self.messages),
        )


class MessagePayload(_Wire):
    kind: Literal["message"] = "message"
    record: MessageRecord


class EchoPayload(_Wire):
    kind: Literal["echo"] = "echo"
    nonce: str


class EventPayload(_Wire):
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
    | RequestPayload
    | ResultPayload
    | MessagePayload
    | EchoPayload
    | EventPayload,
    Field(discriminator="kind"),
]
Kind = Literal["scenario", "control", "join", "leave", "welcome", "refuse", "request", "result", "message", "echo", "event"]


class Envelope(_Wire):
    # a round record's NaN (a round every node missed) must survive, as it does in events.jsonl
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    schema_version: Literal[1] = 1
    run_id: str = Field(pattern=RUN_ID_PATTERN)
    round_index: int = Field(-1, ge=-1, description="-1 for envelopes that belong to no round")
    sender: str = Field(max_length=64)
    kind: Kind
    sent_at: float = 0.0
    payload: Payload

    @model_validator(mode="after")
    def _kind_matches(self) -> Envelope:
        if self.kind != self.payload.kind:
            raise ValueError(f"envelope kind {self.kind!r} carries a {self.payload.kind!r} payload")
        return self


def envelope(run_id: str, sender: str, payload: Any, round_index: int = -1) -> Envelope:
    return Envelope(
        run_id=run_id, round_index=round_index, sender=sender, kind=payload.kind, sent_at=time.time(), payload=payload
    )


def encode(env: Envelope) -> bytes:
    return env.model_dump_json().encode("utf-8")


class Rejected(Exception):
    """An envelope that must be dropped; `reason` is the counter it goes into."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason
        self.detail = detail


def decode_envelope(raw: bytes | bytearray, max_bytes: int) -> Envelope:
    """Parse one payload; raises `Rejected` (oversized, malformed, wrong_schema)."""
    if len(raw) > max_bytes:
        raise Rejected("oversized", f"{len(raw)} bytes, at most {max_bytes} allowed here")
    try:
        data = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected("malformed", f"not UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict):
        raise Rejected("malformed", f"a JSON {type(data).__name__}, not an envelope object")
    if "schema_version" in data and data["schema_version"] != PROTOCOL_SCHEMA_VERSION:
        raise Rejected("wrong_schema", f"schema {data['schema_version']!r}, this node speaks {PROTOCOL_SCHEMA_VERSION}")
    try:
        return Envelope.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise Rejected("malformed", f"{exc.error_count()} problem(s), first at {where}: {first['msg']}") from None


# ---------------------------------------------------------------------------- counters


class Rejections:
    """Counts dropped envelopes by reason and logs them (the first few of each at WARNING)."""

    LOUD_PER_REASON = 20

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.counts: Counter[str] = Counter()

    def add(self, reason: RejectReason, topic: str, detail: str) -> None:
        self.counts[reason] += 1
        level = logging.WARNING if self.counts[reason] <= self.LOUD_PER_REASON else logging.DEBUG
        log.log(level, "%s dropped an envelope on %s (%s): %s", self.owner, topic, reason, detail)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ---------------------------------------------------------------------------- topics


@dataclass(frozen=True)
class TopicInfo:
    """A parsed topic: who owns it (`coordinator` or a node id) and what it carries."""

    owner: str
    channel: Literal["scenario", "control", "to", "echo", "status", "result", "msg", "events"]
    target: str | None = None  # coord/to/<node>: the node; nodes/<n>/msg/<receiver>: the receiver; coord/events/<kind>: the kind


@dataclass(frozen=True)
class Topics:
    run_id: str

    @property
    def root(self) -> str:
        return f"{TOPIC_ROOT}/{self.run_id}"

    @property
    def scenario(self) -> str:
        return f"{self.root}/coord/scenario"

    @property
    def control(self) -> str:
        return f"{self.root}/coord/control"

    @property
    def coordinator_echo(self) -> str:
        return f"{self.root}/coord/echo"

    def to_node(self, node_id: str) -> str:
        return f"{self.root}/coord/to/{node_id}"

    def event(self, kind: Literal["start", "round", "end"]) -> str:
        """coord/events/start (retained), coord/events/round, coord/events/end (retained)."""
        return f"{self.root}/coord/events/{kind}"

    @property
    def events(self) -> str:
        return f"{self.root}/coord/events/#"

    def watcher_subscriptions(self) -> list[str]:
        # control too: a run whose coordinator is still waiting for its nodes has no start record yet
        return [self.events, self.control]

    def status(self, node_id: str) -> str:
        return f"{self.root}/nodes/{node_id}/status"

    def result(self, node_id: str) -> str:
        return f"{self.root}/nodes/{node_id}/result"

    def message(self, sender: str, receiver: str) -> str:
        return f"{self.root}/nodes/{sender}/msg/{receiver}"

    def echo(self, node_id: str) -> str:
        return f"{self.root}/nodes/{node_id}/echo"

    def coordinator_subscriptions(self) -> list[str]:
        return [f"{self.root}/nodes/+/status", f"{self.root}/nodes/+/result"]

    def node_subscriptions(self, node_id: str) -> list[str]:
        # every sender's topic into this node: messages on links the topology lacks are
        # seen, and counted, instead of silently unheard
        # control first: a node that arrives after the run ended learns it before loading a model
        return [self.control, self.scenario, self.to_node(node_id), f"{self.root}/nodes/+/msg/{node_id}"]

    def parse(self, topic: str) -> TopicInfo | None:
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if parts[0] == "coord":
            if parts[1:] in (["scenario"], ["control"], ["echo"]):
                return TopicInfo(COORDINATOR, parts[1])  # type: ignore[arg-type]
            if len(parts) == 3 and parts[1] == "to":
                return TopicInfo(COORDINATOR, "to", parts[2])
            if len(parts) == 3 and parts[1] == "events" and parts[2] in ("start", "round", "end"):
                return TopicInfo(COORDINATOR, "events", parts[2])
        elif parts[0] == "nodes" and len(parts) >= 3:
            node, rest = parts[1], parts[2:]
            if rest in (["status"], ["result"], ["echo"]):
                return TopicInfo(node, rest[0])  # type: ignore[arg-type]
            if len(rest) == 2 and rest[0] == "msg":
                return TopicInfo(node, "msg", rest[1])
        return None


# ---------------------------------------------------------------------------- digests, sizes


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary and of its encodings of a few probe texts."""
    vocab = sorted(tokenizer.get_vocab().items())
    probes = ["The quick brown fox.", "  def f(x):\n\treturn x ** 2  # héllo\n", "1234 ,.;:!? 東京 🙂"]
    encodings = [tokenizer.encode(text, add_special_tokens=False) for text in probes]
    blob = json.dumps([vocab, encodings], ensure_ascii=True).encode("ascii")
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def result_bytes_bound(round_tokens: int, top_k: int, max_message_bytes: int, n_links: int) -> int:
    """An upper bound on a result envelope's size: 3 rows of (T) + 2 x (T, K) 4-byte values in
    base64, the message text and its per-link records (JSON may escape a byte as 6)."""
    arrays = 3 * (round_tokens * 4 + 2 * round_tokens * top_k * 4) * 4 // 3
    text = 6 * max(max_message_bytes, 1) * (n_links + 2)
    return 16_384 + arrays + text + 512 * n_links


def request_bytes_bound(prefix_tokens: int, round_tokens: int, control_tokens: int, n_inbox: int) -> int:
    """An upper bound on a request envelope: token ids are at most 11 characters in JSON."""
    return 16_384 + 12 * (prefix_tokens + 2 * round_tokens + control_tokens) + 200 * n_inbox


def message_bytes_bound(max_message_bytes: int) -> int:
    """A message envelope: the text (JSON escapes a byte as at most 6 characters) and fields."""
    return 2_048 + 6 * max_message_bytes


BYTES_PER_TOKEN_BOUND = 64  # a node's message text is counted at this many UTF-8 bytes per token


def round_event_bytes_bound(n_nodes: int, n_links: int, max_message_tokens: int, max_message_bytes: int) -> int:
    """An upper bound on a round record's event envelope: per node its numbers and its message
    text before the link budgets cut it (at most max_message_tokens tokens), per link one
    message record (at most max_message_bytes); JSON may escape a byte as 6 characters."""
    node_text = 6 * max(BYTES_PER_TOKEN_BOUND * max_message_tokens, max_message_bytes)
    return 16_384 + n_nodes * (768 + node_text) + n_links * (640 + 6 * max_message_bytes)


def start_event_bytes_bound(n_nodes: int, n_links: int, scenario_yaml_bytes: int) -> int:
    """A start record's envelope: names, views and policies (all in the scenario), each node's
    control text (a fixed one is in the scenario, a searched one at most 64 tokens), the edges."""
    return 16_384 + 2 * scenario_yaml_bytes + n_nodes * (768 + 6 * BYTES_PER_TOKEN_BOUND * 64) + n_links * 640


def event_record_topic(record: RunStart | RoundEvent | RunEnd) -> tuple[Literal["start", "round", "end"], bool]:
    """Where a record goes under coord/events/, and whether the broker retains it."""
    return record.kind, record.kind != "round"
