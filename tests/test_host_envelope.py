"""One request and one result envelope per host and round (protocol 6), without a broker: the
coordinator's per-node checks inside a host's result envelope (one test per rejection), where a
round's requests go, the packet limit (packing and splitting at it), a host's will, and a
protocol mismatch that stops a host and a watcher at once. The same against a real Mosquitto:
tests/test_host.py (`envelope` in their names)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from collective.distributed.connection import Connection
from collective.distributed.host import Host, HostConfig
from collective.distributed.limits import PacketLimit, node_result_bound
from collective.distributed.mqtt import DistributedError, parse_broker_url
from collective.distributed.payloads import (
    HostRequestPayload,
    HostResultPayload,
    JoinPayload,
    LeavePayload,
    RequestPayload,
    ResultPayload,
    ScreenRecord,
    WelcomePayload,
)
from collective.distributed.protocol import (
    COORDINATOR,
    PROTOCOL_SCHEMA_VERSION,
    Rejections,
    Topics,
    decode_envelope,
    encode,
    encode_packed,
    envelope,
)
from collective.distributed.watcher import EventSequencer, EventSubscription
from tests.ring_scenario import ring_scenario
from tests.test_rounds import Round, _requests
from tests.test_scale import CountingCodec

OLD = PROTOCOL_SCHEMA_VERSION - 1


class HostRound(Round):
    """The collector of `Round` with a and b served by host `box` (one session), c alone."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        for node_id in ("a", "b"):
            self.roster.admit(node_id, self.join(node_id).model_copy(update={"session": "s-box", "via": "box"}))
        self.roster.admit("c", self.join("c"))

    def result(self, node_id: str, round_index: int, text: str | None = None) -> ResultPayload:
        honest = super().result(node_id, round_index, text)
        return honest if node_id == "c" else honest.model_copy(update={"session": "s-box"})


def _host_round(tokenizer, results) -> tuple[HostRound, dict[str, int], set[str]]:
    """Round 0 opened; `results(state)` -> (round, HostResultPayload) accepted from box; returns
    the state, what the coordinator dropped and which nodes' results counted."""

    async def scenario() -> tuple[HostRound, dict[str, int], set[str]]:
        state = HostRound(tokenizer)
        collecting = asyncio.ensure_future(state.collector.collect(0, _requests(0)))
        await asyncio.sleep(0.05)
        rejections = Rejections(COORDINATOR)
        round_index, payload = results(state)
        state.collector.accept_host("box", round_index, payload, rejections, "nodes/box/result")
        counted = set(state.collector._results)
        collecting.cancel()
        return state, rejections.as_dict(), counted

    return asyncio.run(scenario())


def test_a_hosts_nodes_requests_go_in_one_envelope_to_the_host_and_a_lone_nodes_in_its_own(tiny_tok):
    state, _, _ = _host_round(tiny_tok, lambda s: (0, HostResultPayload(results={})))
    assert state.targets == ["box", "c"]  # one envelope for a and b, one for c
    assert sorted(n for n, _, _ in state.sent) == ["a", "b", "c"]


def test_an_honest_host_envelope_counts_each_of_its_nodes(tiny_tok):
    honest = lambda s: (0, HostResultPayload(results={"a": s.result("a", 0, text="hi b"), "b": s.result("b", 0)}))  # noqa: E731
    _, dropped, counted = _host_round(tiny_tok, honest)
    assert dropped == {} and counted == {"a", "b"}


def _not_base64(state: HostRound) -> ResultPayload:
    """b's rows with a blob of the right length that is not base64 (checked when decoded)."""
    honest = state.result("b", 0)
    row = honest.collective
    blob = row.target_logprob.model_copy(update={"data": "!!!!" + row.target_logprob.data[4:]})  # type: ignore[union-attr]
    bad = row.model_copy(update={"target_logprob": blob})
    return honest.model_copy(update={"collective": bad, "isolated": bad, "plain": bad})


def _long_record(state: HostRound):
    record = state.result("b", 0, text="hi").messages[0]
    return record.model_copy(update={"text": "x" * 500})


# each: how b's part of box's envelope is made wrong, and the reason it is dropped for; a's part
# in the same envelope is honest and must still count
CORRUPTIONS = {
    "malformed: a forged delivery round": (
        lambda s: s.result("b", 0, text="hi").model_copy(
            update={"messages": [s.result("b", 0, text="hi").messages[0].model_copy(update={"deliver_round": 0})]}
        ),
        "malformed",
    ),
    "malformed: rows that are not base64": (_not_base64, "malformed"),
    "malformed: a missing row": (lambda s: s.result("b", 0).model_copy(update={"plain": None}), "malformed"),
    "malformed: records without a text": (lambda s: s.result("b", 0, text="hi").model_copy(update={"message_text": None}), "malformed"),
    "malformed: screen records without a firewall": (
        lambda s: s.result("b", 0).model_copy(
            update={"screened": [ScreenRecord(receiver="b", sender="a", round_sent=0, action="pass", seconds=0.0)]}
        ),
        "malformed",
    ),
    "over_budget: a message over its link's budget": (
        lambda s: s.result("b", 0, text="hi").model_copy(update={"messages": [_long_record(s)]}),
        "over_budget",
    ),
    "unexpected: an earlier session": (lambda s: s.result("b", 0).model_copy(update={"session": "s-old"}), "unexpected"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_bad_part_of_a_host_envelope_is_dropped_for_its_reason_and_the_other_nodes_count(tiny_tok, case):
    corrupt, reason = CORRUPTIONS[case]
    payload = lambda s: (0, HostResultPayload(results={"a": s.result("a", 0), "b": corrupt(s)}))  # noqa: E731
    _, dropped, counted = _host_round(tiny_tok, payload)
    assert dropped == {reason: 1} and counted == {"a"}


class CallCounting(CountingCodec):
    """A fast tokenizer that counts its calls (`encoded`), one text or a batch."""

    is_fast = True

    def __len__(self) -> int:
        return len(self.codec)

    def __call__(self, texts, **kwargs):
        self.encoded += 1
        return self.codec(texts, **kwargs)


def test_a_host_envelopes_message_texts_are_encoded_in_one_call_and_give_each_part_its_records(tiny_tok):
    """a's and b's texts fit their links: the coordinator encodes both in one batched call (one
    call per part before) and books for each part exactly the records a lone node's check makes."""
    counting = CallCounting(tiny_tok)
    texts = {"a": "café", "b": "the value"}  # each within its link's 8 tokens: nothing cut, nothing re-measured

    def payload(state: HostRound) -> tuple[int, HostResultPayload]:
        results = {n: state.result(n, 0, text=t) for n, t in texts.items()}
        counting.encoded = 0  # the calls of the coordinator's check alone
        return 0, HostResultPayload(results=results)

    state, dropped, counted = _host_round(counting, payload)
    assert dropped == {} and counted == {"a", "b"} and counting.encoded == 1
    for node_id, text in texts.items():
        assert state.collector._results[node_id].messages == state.result(node_id, 0, text=text).messages


def test_a_text_the_tokenizer_cannot_take_drops_its_own_part_of_a_batch_only(tiny_tok):
    """b's text holds a lone surrogate (the tokenizer raises): the batched call fails, each part
    is then checked on its own, and only b's part is dropped."""
    bad = lambda s: s.result("b", 0, text="hi").model_copy(update={"message_text": "h\ud800i"})  # noqa: E731
    payload = lambda s: (0, HostResultPayload(results={"a": s.result("a", 0, text="hi"), "b": bad(s)}))  # noqa: E731
    _, dropped, counted = _host_round(tiny_tok, payload)
    assert dropped == {"malformed": 1} and counted == {"a"}


def test_a_host_envelope_with_a_node_it_does_not_serve_or_the_run_does_not_have_is_dropped_per_node(tiny_tok):
    payload = lambda s: (0, HostResultPayload(results={"a": s.result("a", 0), "c": s.result("c", 0), "zz": s.result("a", 0)}))  # noqa: E731
    _, dropped, counted = _host_round(tiny_tok, payload)
    assert dropped == {"spoofed": 1, "unknown_node": 1} and counted == {"a"}  # c is served alone, not by box


def test_a_host_envelope_of_another_round_is_dropped_for_each_of_its_nodes(tiny_tok):
    payload = lambda s: (1, HostResultPayload(results={"a": s.result("a", 1), "b": s.result("b", 1)}))  # noqa: E731
    _, dropped, counted = _host_round(tiny_tok, payload)
    assert dropped == {"wrong_round": 2} and counted == set()


def test_a_hosts_node_answering_on_its_own_result_topic_is_spoofed(tiny_tok):
    async def scenario() -> str:
        state = HostRound(tiny_tok)
        collecting = asyncio.ensure_future(state.collector.collect(0, _requests(0)))
        await asyncio.sleep(0.05)
        rejections = Rejections(COORDINATOR)
        with rejections.dropping("nodes/a/result"):
            state.collector.accept("a", 0, state.result("a", 0), via="a")
        collecting.cancel()
        return json.dumps(rejections.as_dict())

    assert asyncio.run(scenario()) == '{"spoofed": 1}'


# ---------------------------------------------------------------------------- roster


def test_a_hosts_will_leaves_exactly_its_nodes_of_that_session(tiny_tok):
    async def scenario() -> tuple[list[str], list[str], list[str]]:
        state = HostRound(tiny_tok)
        stale = state.roster.host_leave("box", LeavePayload(session="s-earlier"), expected=False)
        other = state.roster.host_leave("other", LeavePayload(session="s-box"), expected=False)
        gone = state.roster.host_leave("box", LeavePayload(session="s-box"), expected=False)
        return stale, other, gone

    stale, other, gone = asyncio.run(scenario())
    assert stale == [] and other == [] and gone == ["a", "b"]


def test_a_join_that_names_a_node_as_its_host_is_refused(tiny_tok):
    async def scenario() -> str:
        state = Round(tiny_tok)
        reply = state.roster.answer("c", state.join("c").model_copy(update={"via": "a"}))
        return getattr(reply, "reason", "")

    assert "a host id is never a node id" in asyncio.run(scenario())


# ---------------------------------------------------------------------------- the packet limit


def _results(tiny_tok, n: int) -> list[tuple[str, ResultPayload]]:
    state = Round(tiny_tok)
    return [(f"n{i:03d}", state.result("a", i)) for i in range(n)]


def _pack(part) -> HostResultPayload:
    return HostResultPayload(results=dict(part))


def test_a_host_envelope_that_fits_the_packet_limit_goes_whole_and_one_a_byte_over_is_split(tiny_tok, monkeypatch):
    monkeypatch.setattr("collective.distributed.protocol.time.time", lambda: 1.0)  # sent_at: the same bytes each time
    parts = _results(tiny_tok, 8)
    whole = encode(envelope("r", "box", _pack(parts), 3))
    assert encode_packed("r", "box", 3, parts, _pack, len(whole)) == [whole]  # exactly at the limit: one envelope
    split = encode_packed("r", "box", 3, parts, _pack, len(whole) - 1)
    assert len(split) == 2 and all(len(raw) <= len(whole) - 1 for raw in split)
    opened = [decode_envelope(raw, len(whole)) for raw in split]
    carried = [n for env in opened for n in env.payload.results]  # type: ignore[union-attr]
    assert carried == [n for n, _ in parts]  # every node once, in order
    assert all(env.round_index == 3 and env.sender == "box" for env in opened)


def test_a_host_envelope_of_many_nodes_is_split_so_that_every_envelope_fits(tiny_tok):
    parts = _results(tiny_tok, 64)
    one = len(encode(envelope("r", "box", _pack(parts[:1]), 0)))
    limit = 5 * one  # a handful of nodes a packet
    packed = encode_packed("r", "box", 0, parts, _pack, limit)
    assert len(packed) >= 64 // 5 and all(len(raw) <= limit for raw in packed)
    assert sum(len(decode_envelope(raw, limit).payload.results) for raw in packed) == 64  # type: ignore[union-attr]


def test_the_packet_limit_leaves_room_for_the_mqtt_header_and_holds_two_node_results():
    scenario = ring_scenario()
    packet = PacketLimit.of(scenario)
    longest_topic = Topics("r" * 64).result("h" * 64)  # a run id and a sender are at most 64 characters
    # a PUBLISH's fixed header (at most 5 bytes), the topic's length and bytes, a packet id, properties
    assert packet.packet_bytes - packet.envelope_bytes >= 5 + 2 + len(longest_topic.encode()) + 2 + 16
    n = len(scenario.nodes)
    assert packet.envelope_bytes >= node_result_bound(scenario, n - 1, n - 1)  # twice a result over every link


# ---------------------------------------------------------------------------- a protocol mismatch


def _old(kind: str, payload: dict) -> bytes:
    return json.dumps({"schema_version": OLD, "run_id": "r1", "sender": "coordinator", "kind": kind, "payload": payload}).encode()


def test_a_host_that_meets_a_coordinator_of_another_protocol_stops_all_its_nodes_at_once():
    address = parse_broker_url("mqtt://127.0.0.1:1")
    host = Host(HostConfig(address=address, run_id="r1", node_ids=("a", "b")))
    host._add_nodes(["a", "b"], Connection(address, "box", [], host._handle))
    asyncio.run(host._handle(Topics("r1").control, _old("control", {"kind": "control", "state": "open", "session": "s"})))
    for volunteer in host.volunteers:
        assert isinstance(volunteer._failure, DistributedError), volunteer.node_id
        assert f"protocol schema {OLD}, this side speaks {PROTOCOL_SCHEMA_VERSION}" in str(volunteer._failure)
        assert volunteer.ended is not None
    assert host.rejections.as_dict() == {"wrong_schema": 1}


def test_a_host_routes_each_part_of_its_request_to_its_node_and_refuses_a_node_it_does_not_serve():
    address = parse_broker_url("mqtt://127.0.0.1:1")
    host = Host(HostConfig(address=address, run_id="r1", node_ids=("a", "b")))
    host._add_nodes(["a", "b"], Connection(address, "box", [], host._handle))
    request = RequestPayload(
        node_id="a", control_ids=[], prefix_ids=[], round_inputs=[1], targets=[1], message={"policy": "relay"},
        message_tokens=8, seed=0, deadline_s=5.0,
    )
    payload = HostRequestPayload(requests=[request, request.model_copy(update={"node_id": "zz"})])
    raw = encode(envelope("r1", COORDINATOR, payload, 0))
    asyncio.run(host._handle(Topics("r1").to_node(host.host_id), raw))
    assert host.rejections.as_dict() == {"spoofed": 1}  # zz is not the host's
    assert host.by_node["a"].rejections.as_dict() == {"unexpected": 1}  # before a loaded its model: a's own check
    assert host.by_node["b"].rejections.as_dict() == {}


def test_a_watcher_that_meets_a_coordinator_of_another_protocol_stops_at_once():
    sequencer = EventSequencer("r1")
    assert sequencer.feed(Topics("r1").control, _old("control", {})) == [] and sequencer.mismatch is not None
    subscription = EventSubscription(parse_broker_url("mqtt://127.0.0.1:1"), "r1", start_timeout=30.0)
    subscription._subscribed_at = time.monotonic()
    subscription._inbox.put(("message", Topics("r1").control, _old("control", {})))
    began = time.monotonic()
    with pytest.raises(DistributedError, match=f"speaks another protocol: protocol schema {OLD}, this side speaks"):
        next(subscription)
    assert time.monotonic() - began < 1.0  # at once, not after the 30 s of waiting for a run


def test_a_join_names_its_host_and_a_welcome_its_node_on_the_wire():
    join = JoinPayload(session="s", model="m", vocab_size=5, tokenizer_digest="d", device="cpu", via="box")
    env = decode_envelope(encode(envelope("r1", "a", join)), 4096)
    assert isinstance(env.payload, JoinPayload) and env.payload.via == "box"
    welcome = decode_envelope(encode(envelope("r1", COORDINATOR, WelcomePayload(session="s", node_id="a"))), 4096)
    assert isinstance(welcome.payload, WelcomePayload) and welcome.payload.node_id == "a"
