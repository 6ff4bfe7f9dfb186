"""What travels over the broker: versioned envelopes and the topic layout (sizes: `limits`).

Every MQTT payload is one JSON `Envelope` (schema version, run id, round, sender, kind,
payload; the payloads are in `payloads`). Topics live under `collective/<run_id>/`; the
coordinator writes only under `coord/`, a node only under `nodes/<its id>/`, so that a
broker ACL can let each user publish under its own topics and nothing else:

    coord/scenario             retained  the resolved scenario and every node's links
    coord/control              retained  open (with the coordinator's session) or ended
    coord/to/<node>                      request (that node's view only), welcome, refuse
    coord/to/<host>                      host_request (its nodes' requests), welcome/refuse per node
    nodes/<node>/status                  join (`via`: the host serving it); a lone node's will says leave
    nodes/<host>/status                  a host's claim; its last will says leave for all its nodes
    nodes/<node>/result                  a lone node's predictions and messages of a round
    nodes/<host>/result                  host_result: its nodes' results of a round (split if large)
    nodes/<node>/msg/<receiver>          one message on the link node -> receiver
    coord/echo, nodes/<node>/echo        the preflight publish/subscribe echo
    nodes/<node>/msg/<host>              a host's check that it may write as <node> (no node reads it)
    coord/events/start         retained  the run's RunStart record   } every record the
    coord/events/round                   each RoundEvent, in order     } coordinator writes
    coord/events/end           retained  the RunEnd record            } to events.jsonl

The `coord/events/` records are for read-only watchers (`collective watch --broker`):
no node subscribes to them, so their `event` kind was added without a schema bump.
A received payload goes through `open_envelope` (size, JSON, schema, run, sender) and then
the receiver's own checks (round, neighbour, budget); anything that fails is dropped and
counted in `Rejections` (`Rejections.dropping`), never raised to the round logic. A
host's node is joined on its own status topic (the ACL's proof that the login may act for
it), then served through the host's topics: one request and one result envelope a round
for all of its nodes, each node's part checked as a lone node's envelope is, except its size:
a part is bounded by the host envelope's packet, not by a lone node's result limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from pydantic import ConfigDict, Field, ValidationError, model_validator

from collective.distributed.payloads import Kind, Payload, WireModel
from collective.lm.codec import TextCodec
from collective.records import RunRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

# protocol 2: requests carry message_bytes and message_frame, results a message_search (searched messages)
# protocol 3: requests carry the node's fitted firewall, results its screen records (receiver firewalls)
# protocol 4: a masked node's placeholder id, whether a shuffled message matched, evaluation.yardstick
# protocol 5: byte-unit rounds (a request may carry the round's bytes, a result byte rows), tokenizer digests
PROTOCOL_SCHEMA_VERSION = 6
PROTOCOL_CHANGES = (
    "6 sends a host one request and takes one result envelope a round for all its nodes (coord/to/<host>, "
    "nodes/<host>/result): a join names the host that serves the node (via), a welcome or refusal the node"
)
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


class Envelope(WireModel):
    # a round record's NaN (a round every node missed) must survive, as it does in events.jsonl
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    schema_version: Literal[6] = 6
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


def envelope(run_id: str, sender: str, payload: Payload, round_index: int = -1) -> Envelope:
    return Envelope(
        run_id=run_id, round_index=round_index, sender=sender, kind=payload.kind, sent_at=time.time(), payload=payload
    )


def encode(env: Envelope) -> bytes:
    return env.model_dump_json().encode("utf-8")


def encode_packed(
    run_id: str, sender: str, round_index: int, parts: Sequence[T], pack: Callable[[Sequence[T]], Payload], max_bytes: int
) -> list[bytes]:
    """The envelopes that carry `parts` (a host's nodes' requests or results), each at most
    `max_bytes`: all in one when they fit, else cut into as many even slices as the whole's
    size asks for, and each slice again until it fits. A part that alone is over `max_bytes`
    goes alone (its receiver drops it as oversized)."""
    raw = encode(envelope(run_id, sender, pack(parts), round_index))
    if len(raw) <= max_bytes or len(parts) <= 1:
        return [raw]
    n_slices = min(len(parts), max(2, -(-len(raw) // max_bytes)))
    bounds = [len(parts) * k // n_slices for k in range(n_slices + 1)]
    return [
        packed
        for start, end in zip(bounds, bounds[1:])
        for packed in encode_packed(run_id, sender, round_index, parts[start:end], pack, max_bytes)
    ]


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
        raise Rejected(
            "wrong_schema",
            f"protocol schema {data['schema_version']!r}, this side speaks {PROTOCOL_SCHEMA_VERSION} ({PROTOCOL_CHANGES}); "
            "run the same collective version on the coordinator, every node and every watcher",
        )
    try:
        return Envelope.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise Rejected("malformed", f"{exc.error_count()} problem(s), first at {where}: {first['msg']}") from None


def open_envelope(raw: bytes | bytearray, max_bytes: int, *, run_id: str, sender: str) -> Envelope:
    """`decode_envelope`, then what every receiver checks first: the envelope is of this run and
    its sender owns the topic it came on. Raises `Rejected` (wrong_run, spoofed and the above)."""
    env = decode_envelope(raw, max_bytes)
    if env.run_id != run_id:
        raise Rejected("wrong_run", f"run {env.run_id!r}, this is {run_id!r}")
    if env.sender != sender:
        raise Rejected("spoofed", f"sender {env.sender!r} on {sender!r}'s topic")
    return env


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

    @contextlib.contextmanager
    def dropping(self, topic: str) -> Iterator[None]:
        """Count what the block rejects. Whatever else it raises is logged as a bug and counted
        as malformed: no payload, however made, stops its receiver."""
        try:
            yield
        except Rejected as rejected:
            self.add(rejected.reason, topic, rejected.detail)
        except Exception as exc:
            log.exception("an envelope on %s could not be handled", topic)
            self.add("malformed", topic, f"could not be handled: {exc!r}")

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


class Topics:
    """The topic names of one run (what each carries: the module docstring)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.root = f"{TOPIC_ROOT}/{run_id}"
        coord = f"{self.root}/coord"
        self.scenario, self.control, self.coordinator_echo = f"{coord}/scenario", f"{coord}/control", f"{coord}/echo"
        self.events = f"{coord}/events/#"

    def to_node(self, node_id: str) -> str:
        return f"{self.root}/coord/to/{node_id}"

    def event(self, kind: Literal["start", "round", "end"]) -> str:
        """coord/events/start (retained), coord/events/round, coord/events/end (retained)."""
        return f"{self.root}/coord/events/{kind}"

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

    def host_subscriptions(self, host_id: str, node_ids: Sequence[str]) -> list[str]:
        """A host's one connection: the run, its own request topic, the messages to each of its nodes."""
        return [self.control, self.scenario, self.to_node(host_id), *(f"{self.root}/nodes/+/msg/{n}" for n in node_ids)]

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


class Vocabulary(TextCodec, Protocol):
    """A tokenizer whose whole vocabulary can be listed (a transformers tokenizer is one)."""

    def get_vocab(self) -> dict[str, int]: ...


def tokenizer_digest(tokenizer: Vocabulary) -> str:
    """A short hash of a tokenizer's vocabulary and of its encodings of a few probe texts."""
    vocab = sorted(tokenizer.get_vocab().items())
    probes = ["The quick brown fox.", "  def f(x):\n\treturn x ** 2  # héllo\n", "1234 ,.;:!? 東京 🙂"]
    encodings = [tokenizer.encode(text, add_special_tokens=False) for text in probes]
    blob = json.dumps([vocab, encodings], ensure_ascii=True).encode("ascii")
    return hashlib.blake2b(blob, digest_size=12).hexdigest()



def event_record_topic(record: RunRecord) -> tuple[Literal["start", "round", "end"], bool]:
    """Where a record goes under coord/events/, and whether the broker retains it."""
    return record.kind, record.kind != "round"
