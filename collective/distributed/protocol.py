"""What travels over the broker: versioned envelopes, the topic layout, and the size limits.

Every MQTT payload is one JSON `Envelope` (schema version, run id, round, sender, kind,
payload; the payloads are in `payloads`). Topics live under `collective/<run_id>/`; the
coordinator writes only under `coord/`, a node only under `nodes/<its id>/`, so that a
broker ACL can let each user publish under its own topics and nothing else:

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
A received payload goes through `open_envelope` (size, JSON, schema, run, sender) and then
the receiver's own checks (round, neighbour, budget); anything that fails is dropped and
counted in `Rejections` (`Rejections.dropping`), never raised to the round logic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator

from collective.distributed.payloads import Kind, Payload, WireModel
from collective.lm.codec import TextCodec
from collective.records import RunRecord
from collective.scenario import Scenario

log = logging.getLogger(__name__)

# protocol 2: requests carry message_bytes and message_frame, results a message_search (searched messages)
# protocol 3: requests carry the node's fitted firewall, results its screen records (receiver firewalls)
# protocol 4: a masked node's placeholder id, whether a shuffled message matched, evaluation.yardstick
PROTOCOL_SCHEMA_VERSION = 5
PROTOCOL_CHANGES = (
    "5 runs collectives of models with different tokenizers in bytes: a request may carry the round's bytes "
    "and a result byte rows (256 log-probabilities a byte); the scenario names every model's tokenizer digest"
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

    schema_version: Literal[5] = 5
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


def result_bytes_bound(
    round_tokens: int, top_k: int, max_message_bytes: int, n_links: int, screened_bytes: int = 0, *, round_bytes: int | None = None
) -> int:
    """An upper bound on a result envelope's size: 3 rows of (T) + 2 x (T, K) 4-byte values in
    base64 (a byte-unit run, round_bytes = B: 3 rows of (B, 256) 4-byte values, `ByteRowsWire`),
    the message text and its per-link records (JSON may escape a byte as 6), and the
    firewall's screen records (`screened_bytes_bound`)."""
    if round_bytes is None:
        arrays = 3 * (round_tokens * 4 + 2 * round_tokens * top_k * 4) * 4 // 3
    else:
        arrays = 3 * (4 * ((round_bytes * 256 * 4 + 2) // 3) + 256)
    text = 6 * max(max_message_bytes, 1) * (n_links + 2)
    return 16_384 + arrays + text + 512 * n_links + screened_bytes


def request_bytes_bound(
    prefix_tokens: int, round_tokens: int, control_tokens: int, n_inbox: int, firewall_bytes: int = 0, round_bytes: int = 0
) -> int:
    """An upper bound on a request envelope: token ids are at most 11 characters in JSON, the
    node's firewall (`firewall_bytes_bound`) and a byte-unit round's bytes in base64 (there a
    node's tokens of a span are at most its bytes: pass the spans' bytes as their tokens)."""
    base64_chars = 4 * ((round_bytes + 2) // 3)
    return 16_384 + 12 * (prefix_tokens + 2 * round_tokens + control_tokens) + 200 * n_inbox + firewall_bytes + base64_chars


def span_bytes_max(byte_lengths: torch.Tensor, n_tokens: int) -> int:
    """The most bytes any n_tokens consecutive tokens hold; byte_lengths: (S,) each token's bytes."""
    if n_tokens <= 0 or len(byte_lengths) == 0:
        return 0
    ends = torch.cat([torch.zeros(1, dtype=torch.long), byte_lengths.long().cumsum(0)])  # (S + 1,)
    n = min(n_tokens, len(byte_lengths))
    return int((ends[n:] - ends[:-n]).max())


def may_score_bytes(scenario: Scenario) -> bool:
    """Whether a run of the scenario may be byte-unit without loading its models: asked for, or
    `auto` with nodes (or the reference) on models of different references."""
    if scenario.evaluation.unit != "auto":
        return scenario.evaluation.unit == "byte"
    used = {node.model for node in scenario.nodes} | {scenario.reference_model}
    return len({scenario.models[alias].ref for alias in used}) > 1


def firewall_bytes_bound(scenario: Scenario) -> int:
    """The largest firewall a request carries: a node's filters as JSON (ASCII-escaped, so at
    least as long as the envelope's), each with room for its fitted threshold."""
    return max(
        (len(json.dumps([f.model_dump(mode="json") for f in node.firewall])) + 64 * len(node.firewall) for node in scenario.nodes),
        default=0,
    )


def screened_bytes_bound(scenario: Scenario, n_in_links: int) -> int:
    """A round's screen records at a receiver with `n_in_links` in-links (none without a
    firewall in the scenario): one per message it reads (at most `bus.retain` per in-link),
    each its fields and a rewrite's text (a paraphrase writes as many tokens as the message
    had, counted at BYTES_PER_TOKEN_BOUND bytes a token; JSON may escape a byte as 6)."""
    if not any(node.firewall for node in scenario.nodes):
        return 0
    bus = scenario.bus
    max_tokens = max([bus.max_message_tokens] + [link.max_message_tokens or 0 for link in bus.links])
    max_bytes = max([bus.max_message_bytes] + [link.max_message_bytes or 0 for link in bus.links])
    return n_in_links * bus.retain * (512 + 6 * max(BYTES_PER_TOKEN_BOUND * max_tokens, max_bytes))


def message_bytes_bound(max_message_bytes: int) -> int:
    """A message envelope: the text (JSON escapes a byte as at most 6 characters) and fields."""
    return 2_048 + 6 * max_message_bytes


BYTES_PER_TOKEN_BOUND = 64  # a node's message text is counted at this many UTF-8 bytes per token


def round_event_bytes_bound(
    n_nodes: int, n_links: int, max_message_tokens: int, max_message_bytes: int, screened_bytes: int = 0
) -> int:
    """An upper bound on a round record's event envelope: per node its numbers and its message
    text before the link budgets cut it (at most max_message_tokens tokens), per link one
    message record (at most max_message_bytes; JSON may escape a byte as 6 characters), and
    every receiver's screen records (`screened_bytes`)."""
    node_text = 6 * max(BYTES_PER_TOKEN_BOUND * max_message_tokens, max_message_bytes)
    return 16_384 + n_nodes * (768 + node_text) + n_links * (640 + 6 * max_message_bytes) + screened_bytes


def start_event_bytes_bound(n_nodes: int, n_links: int, scenario_yaml_bytes: int) -> int:
    """A start record's envelope: names, views and policies (all in the scenario), each node's
    control text (a fixed one is in the scenario, a searched one at most 64 tokens), the edges."""
    return 16_384 + 2 * scenario_yaml_bytes + n_nodes * (768 + 6 * BYTES_PER_TOKEN_BOUND * 64) + n_links * 640


def event_record_topic(record: RunRecord) -> tuple[Literal["start", "round", "end"], bool]:
    """Where a record goes under coord/events/, and whether the broker retains it."""
    return record.kind, record.kind != "round"
