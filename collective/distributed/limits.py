"""How large an envelope may be: one place for every size bound of the protocol.

The bounds (`result_bytes_bound`, `request_bytes_bound`, ...) are upper bounds on what one
envelope of a kind can weigh for a scenario's shapes. `ScenarioLimits` applies them once to
a scenario: the broker's `max_packet_size` (`collective broker`: twice the largest envelope),
the largest request a node takes, the largest result the coordinator takes, a message's.
A host envelope (every node of a host in one request or result) is packed up to `packet_bytes`
less room for the MQTT header and split into several when its nodes do not fit
(`protocol.encode_packed`); each node's part is within the per-node bounds, so every part fits.
The coordinator, the volunteers, the hosts and `collective broker` all read them here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from collective.scenario import Scenario

DEFAULT_MAX_PACKET_BYTES = 8 << 20
MIN_MAX_PACKET_BYTES = 1 << 20
PACKET_HEADROOM_BYTES = 1_024  # an MQTT PUBLISH's fixed header, topic and properties, at most
BYTES_PER_TOKEN_BOUND = 64  # a node's message text is counted at this many UTF-8 bytes per token


def link_budget(scenario: Scenario) -> tuple[int, int]:
    """The largest message any link allows: (tokens, bytes)."""
    bus = scenario.bus
    max_tokens = max([bus.max_message_tokens] + [link.max_message_tokens or 0 for link in bus.links])
    max_bytes = max([bus.max_message_bytes] + [link.max_message_bytes or 0 for link in bus.links])
    return max_tokens, max_bytes


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
    max_tokens, max_bytes = link_budget(scenario)
    return n_in_links * scenario.bus.retain * (512 + 6 * max(BYTES_PER_TOKEN_BOUND * max_tokens, max_bytes))


def message_bytes_bound(max_message_bytes: int) -> int:
    """A message envelope: the text (JSON escapes a byte as at most 6 characters) and fields."""
    return 2_048 + 6 * max_message_bytes


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


def link_count(scenario: Scenario) -> int:
    """How many directed links the scenario's topology has (at most n * (n - 1))."""
    n = len(scenario.nodes)
    most = n * (n - 1)
    spec = scenario.topology
    if spec.kind == "edges":
        pairs = {(a, b) for a, b in spec.edges or []} | (set() if spec.directed else {(b, a) for a, b in spec.edges or []})
        return min(most, len(pairs))
    if spec.kind == "file":  # its path is relative to where the run starts: count the worst case
        return most
    try:
        from topologies import build_topology

        graph = build_topology(spec.kind, scenario.node_ids, seed=scenario.seed, directed=spec.directed, **spec.params)
    except Exception:  # the run itself says what is wrong with the topology
        return most
    return min(most, graph.number_of_edges() * (1 if graph.is_directed() else 2))


def max_packet_size_for(scenario: Scenario) -> int:
    """Twice the largest envelope a run of this scenario sends, at least 1 MiB. A run that may
    score bytes (`may_score_bytes`) is sized for rounds and views of BYTES_PER_TOKEN_BOUND bytes
    a stream token (the broker is configured before the stream is read)."""
    bus = scenario.bus
    max_tokens, max_bytes = link_budget(scenario)
    n_nodes, n_links = len(scenario.nodes), link_count(scenario)
    yaml_bytes = len(scenario.resolved_yaml().encode("utf-8"))
    round_bytes = BYTES_PER_TOKEN_BOUND * bus.round_tokens if may_score_bytes(scenario) else None
    result = result_bytes_bound(
        bus.round_tokens, scenario.evaluation.top_k, max_bytes, n_nodes, screened_bytes_bound(scenario, n_nodes), round_bytes=round_bytes
    )
    view_bytes = 0 if round_bytes is None else BYTES_PER_TOKEN_BOUND * scenario.max_reach
    request = node_request_bound(scenario, view_bytes=view_bytes, round_bytes=round_bytes or 0)
    scenario_bytes = 64 * 1024 + 2 * yaml_bytes
    round_event = round_event_bytes_bound(n_nodes, n_links, max_tokens, max_bytes, screened_bytes_bound(scenario, n_links))
    events = max(round_event, start_event_bytes_bound(n_nodes, n_links, yaml_bytes))
    return max(MIN_MAX_PACKET_BYTES, 2 * max(result, request, scenario_bytes, events, message_bytes_bound(max_bytes)))


def node_request_bound(scenario: Scenario, *, view_bytes: int = 0, round_bytes: int = 0) -> int:
    """The largest request envelope a node of the scenario takes: in tokens, or in a byte-unit
    run with views and rounds of at most `view_bytes` and `round_bytes` bytes (a node's tokens of
    a span are at most its bytes)."""
    prefix, rounds = (view_bytes, round_bytes) if round_bytes else (scenario.max_reach, scenario.bus.round_tokens)
    return request_bytes_bound(prefix, rounds, 4_096, 4 * len(scenario.nodes), firewall_bytes_bound(scenario), round_bytes)


def node_result_bound(scenario: Scenario, out_links: int, in_links: int, round_bytes: int | None = None) -> int:
    """Twice the largest result envelope a node of the scenario sends (the coordinator's limit
    per node): at most `out_links` message records and `in_links` in-links' screen records."""
    _, max_bytes = link_budget(scenario)
    bound = result_bytes_bound(
        scenario.bus.round_tokens, scenario.evaluation.top_k, max_bytes, out_links, screened_bytes_bound(scenario, in_links),
        round_bytes=round_bytes,
    )
    return 2 * bound


@dataclass(frozen=True)
class PacketLimit:
    """What one envelope on the broker may weigh: the broker's `max_packet_size` less room for
    the PUBLISH header; a host envelope over it is split (`protocol.encode_packed`)."""

    packet_bytes: int

    @property
    def envelope_bytes(self) -> int:
        return self.packet_bytes - PACKET_HEADROOM_BYTES

    @staticmethod
    def of(scenario: Scenario) -> PacketLimit:
        return PacketLimit(max_packet_size_for(scenario))
