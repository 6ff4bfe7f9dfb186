"""A byte-unit run distributed: nodes whose models have different tokenizers, on hosts that
hold different models (protocol 5).

The wire parts need no broker: a request carries the round's bytes (any bytes, a round may
end inside a UTF-8 character) and the node's own tokens; a result carries byte rows as 256
log-probabilities a byte, rebuilt exactly at the coordinator; a receiver counts a link's
tokens only for senders of its own tokenizer. The `mqtt` test runs the mixed scenario of
`test_byte_mode` (a byte-level BPE Llama and a byte-fallback Gemma 3) with a real Mosquitto,
the Llama node in its own process and the two Gemma nodes on a host, and must give the embedded report, every row within the tolerance of
`test_distributed`, in bytes.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

import pytest
import torch

from collective.distributed.limits import request_bytes_bound, result_bytes_bound, span_bytes_max
from collective.distributed.payloads import RequestPayload, ResultPayload
from collective.distributed.protocol import (
    COORDINATOR,
    Rejected,
    Rejections,
    Topics,
    decode_envelope,
    encode,
    envelope,
)
from collective.distributed.wire import ByteRowsWire, PredictionsWire, check_byte_row
from collective.lm.byte_rows import as_predictions
from collective.lm.predictions import TokenPredictions
from collective.records import MessageRecord
from collective.run.bus import link_policies
from collective.run.node import NodeRoundRequest, NodeRoundResult
from collective.scenario import BusSpec, RelayMessage, parse_scenario
from tests import test_byte_mode

folders = test_byte_mode.folders  # the two tiny models with different tokenizers, shared by name

ROUND_BYTES = b"x = f(\xe2\x82"  # ends inside a UTF-8 character, as a round cut at stream tokens may


def _byte_row(n_bytes: int, seed: int = 0) -> torch.Tensor:
    """(B, 256) normalized log-probabilities of the next byte, with a few impossible bytes."""
    gen = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(n_bytes, 256, generator=gen, dtype=torch.float64) * 4, dim=-1)
    logprobs[:, :3] = -math.inf  # as_predictions keeps these at LOG_FLOOR
    return torch.log(torch.softmax(logprobs, dim=-1))


def _byte_result(data: bytes) -> NodeRoundResult:
    rows = [as_predictions(_byte_row(len(data), seed), data) for seed in range(3)]
    return NodeRoundResult("a", 2, rows[0], rows[1], rows[2], None, 0)


def test_byte_rows_cross_the_wire_exactly_without_ids_or_targets_and_in_half_the_bytes():
    result = _byte_result(ROUND_BYTES)
    raw = encode(envelope("r", "a", ResultPayload.from_result(result, "s", 0.0, {}, 0, in_bytes=True), 2))
    env = decode_envelope(raw, 1 << 22)
    assert isinstance(env.payload, ResultPayload) and isinstance(env.payload.collective, ByteRowsWire)
    back = env.payload.to_result("a", 2, ROUND_BYTES)
    for sent, got in ((result.collective, back.collective), (result.isolated, back.isolated), (result.plain, back.plain)):
        assert got is not None and sent is not None
        assert torch.equal(got.target_logprob, sent.target_logprob)
        assert torch.equal(got.topk_ids, sent.topk_ids) and torch.equal(got.topk_logprobs, sent.topk_logprobs)
        assert got.vocab_size == 256 and check_byte_row(got, n_bytes=len(ROUND_BYTES)) is None
    as_tokens = ResultPayload.from_result(result, "s", 0.0, {}, 0)
    assert isinstance(as_tokens.collective, PredictionsWire)
    assert len(raw) < 0.55 * len(encode(envelope("r", "a", as_tokens, 2)))
    assert len(raw) <= result_bytes_bound(8, 8, 1, 1, round_bytes=len(ROUND_BYTES))


def test_byte_rows_for_another_round_or_unit_are_refused():
    result = _byte_result(ROUND_BYTES)
    payload = ResultPayload.from_result(result, "s", 0.0, {}, 0, in_bytes=True)
    with pytest.raises(ValueError, match="asked in tokens"):
        payload.to_result("a", 2)
    with pytest.raises(ValueError, match="bytes for a round of"):
        payload.to_result("a", 2, ROUND_BYTES + b"y")
    with pytest.raises(ValueError, match="asked in bytes"):
        ResultPayload.from_result(result, "s", 0.0, {}, 0).to_result("a", 2, ROUND_BYTES)


def test_a_plain_row_that_is_the_isolated_one_travels_once_and_comes_back_as_both():
    result = _byte_result(ROUND_BYTES)
    twice = ResultPayload.from_result(result, "s", 0.0, {}, 0, in_bytes=True)
    result.plain = result.isolated  # no control prompt: one context, one row
    once = ResultPayload.from_result(result, "s", 0.0, {}, 0, in_bytes=True)
    assert once.plain is None and once.plain_is_isolated and not twice.plain_is_isolated
    back = decode_envelope(encode(envelope("r", "a", once, 2)), 1 << 22).payload
    assert isinstance(back, ResultPayload)
    decoded = back.to_result("a", 2, ROUND_BYTES)
    assert decoded.plain is not None and result.isolated is not None
    assert torch.equal(decoded.plain.topk_logprobs, result.isolated.topk_logprobs)
    assert len(encode(envelope("r", "a", once, 2))) < 0.7 * len(encode(envelope("r", "a", twice, 2)))
    with pytest.raises(ValueError, match="said to be the isolated one"):
        twice.model_copy(update={"plain_is_isolated": True}).to_result("a", 2, ROUND_BYTES)


def test_a_byte_row_that_does_not_sum_to_one_is_named():
    row = as_predictions(_byte_row(4), b"abcd")
    assert check_byte_row(row, n_bytes=4) is None
    shifted = TokenPredictions(row.target_logprob, row.topk_ids, row.topk_logprobs + 0.01, 256)  # sums to e^0.01
    assert "do not sum to 1" in str(check_byte_row(shifted, n_bytes=4))
    assert "positions" in str(check_byte_row(row, n_bytes=5))


def test_a_request_carries_the_rounds_bytes_and_the_nodes_own_tokens():
    request = NodeRoundRequest(
        node_id="b", round_index=3, control_ids=[7], prefix_ids=torch.tensor([5, 6, 260000]), round_inputs=torch.tensor([9, 10]),
        targets=torch.tensor([9, 10]), message=RelayMessage(), message_tokens=4, seed=1, round_bytes=ROUND_BYTES,
    )
    payload = RequestPayload.from_request(request, [], 5.0)
    raw = encode(envelope("r", COORDINATOR, payload, 3))
    env = decode_envelope(raw, 1 << 20)
    assert isinstance(env.payload, RequestPayload)
    back = env.payload.to_request(3, (), BusSpec())
    assert back.round_bytes == ROUND_BYTES and back.prefix_ids.tolist() == [5, 6, 260000]
    assert RequestPayload.from_request(NodeRoundRequest(**{**request.__dict__, "round_bytes": None}), [], 5.0).round_bytes is None
    assert len(raw) <= request_bytes_bound(3, 2, 1, 0, round_bytes=len(ROUND_BYTES))


def test_the_longest_span_in_bytes_is_found_anywhere_in_the_stream():
    lengths = torch.tensor([1, 1, 5, 1, 1, 7, 1])
    assert span_bytes_max(lengths, 2) == 8 and span_bytes_max(lengths, 3) == 9 and span_bytes_max(lengths, 100) == 17
    assert span_bytes_max(lengths, 0) == 0


def test_a_receiver_counts_a_links_tokens_only_for_senders_of_its_own_tokenizer():
    """A gemma relay of 4 gemma tokens may be more tokens of the receiver's tokenizer: counted
    in the receiver's it would be dropped as over budget (the embedded bus delivers it)."""
    from collective.distributed.mailbox import Mailbox

    scenario = parse_scenario(
        {
            "name": "m", "models": {"m": "x", "g": "y"}, "corpus": {"train_tokens": 512, "eval_tokens": 16},
            "nodes": [{"id": "a", "model": "m"}, {"id": "b", "model": "g"}, {"id": "c", "model": "m"}],
            "bus": {"round_tokens": 8, "max_message_tokens": 2, "max_message_bytes": 40},
        }
    )
    policies = link_policies(scenario.bus, [("b", "a"), ("c", "a")])

    class Chars:  # a receiver's tokenizer: one token a character
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [ord(ch) for ch in text]

        def decode(self, ids, skip_special_tokens: bool = False) -> str:
            return "".join(map(chr, ids))

    mailbox = Mailbox("a", scenario, ["b", "c"], policies, Chars(), Rejections("node a"), Topics("r"), {"b": None})

    def record(sender: str, text: str) -> MessageRecord:
        return MessageRecord(sender=sender, receiver="a", round_sent=0, deliver_round=1, text=text, n_tokens=2, n_bytes=len(text))

    mailbox.hold("b", record("b", "several words"), 0)  # gemma's two tokens, 13 of the receiver's
    with pytest.raises(Rejected, match="over_budget"):
        mailbox.hold("c", record("c", "several words"), 0)  # c has the receiver's tokenizer: counted
    with pytest.raises(Rejected, match="over_budget"):
        mailbox.hold("b", record("b", "w" * 41), 0)  # bytes are counted for every sender


# ---------------------------------------------------------------------------- a real broker


@pytest.mark.mqtt
def test_a_mixed_collective_on_machines_with_different_models_gives_the_embedded_report_in_bytes(folders, tmp_path):
    from tests.mosquitto import running_broker
    from tests.test_distributed import Nodes, World, _assert_same_evaluation, _messages, _run
    from tests.test_host import _host

    root: Path = folders["root"]
    prepared = test_byte_mode._prepare(folders, "distributed-mixed")
    assert prepared.unit == "byte"
    embedded = test_byte_mode.run_prepared(prepared, root / "embedded-mixed")
    assert embedded.report is not None and embedded.report.unit == "byte"
    world = World(root, prepared, embedded.report, _messages(root / "embedded-mixed"))
    assert any(sender == "c" for sender, _, _, _ in world.embedded_messages)  # gemma's relay crosses to the Llama
    run_dir = tmp_path / "run-mixed"
    hosts = Nodes(tmp_path)
    try:
        with running_broker(tmp_path / "broker") as broker:
            _host(hosts, "llama", broker.url(), run_dir.name, "--nodes", "a")
            _host(hosts, "gemma", broker.url(), run_dir.name, "--nodes", "b,c")
            # a round of these tiny models takes well under a second: a node whose results are refused fails the test in a minute
            result, executor, _ = _run(world, broker.url() + "?deadline=60", run_dir)
            assert hosts.wait_all() == {"llama": 0, "gemma": 0}
    finally:
        hosts.stop_all()
    report = result.report
    assert result.status == "complete" and report is not None and report.runtime == "mqtt"
    assert report.unit == "byte" and report.missed_rounds == {}
    _assert_same_evaluation(world.embedded, report)  # every row, its CI and the gains within 1e-5
    assert _messages(run_dir) == world.embedded_messages
    assert executor.rejections.total == 0 and not any(executor.node_rejections().values())
    assert "round 1: b, c in 1 batch(es)" in hosts.output("gemma")  # the host's two gemma nodes, one batch


def test_a_node_takes_only_rounds_of_its_runs_unit_and_size():
    from types import SimpleNamespace

    from collective.distributed.mqtt import parse_broker_url
    from collective.distributed.payloads import ScenarioPayload
    from collective.distributed.volunteer import Volunteer, VolunteerConfig

    volunteer = Volunteer(VolunteerConfig(parse_broker_url("mqtt://127.0.0.1:1"), "run-1", "a"))
    volunteer.scenario = SimpleNamespace(bus=SimpleNamespace(round_tokens=2))  # type: ignore[assignment]

    def request(round_bytes: bytes | None, ids: list[int]) -> RequestPayload:
        data = None if round_bytes is None else base64.b64encode(round_bytes).decode()
        return RequestPayload(node_id="a", control_ids=[], prefix_ids=[], round_inputs=ids, targets=ids, message=RelayMessage(),
                              message_tokens=0, seed=0, round_bytes=data, deadline_s=1.0)

    assert volunteer._round_problem(request(None, [1, 2])) is None  # before protocol 5 knew units: tokens
    assert "in bytes in a run scored in tokens" in str(volunteer._round_problem(request(b"ab", [1, 2])))
    volunteer.published = ScenarioPayload(scenario_yaml="", in_neighbours={}, out_neighbours={}, tokenizer_digests={},
                                          session="s", unit="byte", round_bytes_max=6, view_bytes_max=12)
    assert volunteer._round_problem(request(b"abc", [1, 2, 3])) is None  # a round of 3 bytes in 3 of its tokens
    assert "no bytes" in str(volunteer._round_problem(request(None, [1, 2])))
    assert "7 bytes" in str(volunteer._round_problem(request(b"abcdefg", [1])))  # longer than any round of the stream
    assert "in 4 tokens" in str(volunteer._round_problem(request(b"abc", [1, 2, 3, 4])))  # a token is at least a byte


def test_a_broker_for_a_scenario_of_several_models_takes_byte_rounds():
    from collective.distributed.broker import max_packet_size_for
    from collective.distributed.limits import BYTES_PER_TOKEN_BOUND

    def scenario(models: dict[str, str], unit: str = "auto"):
        return parse_scenario({
            "name": "m", "models": models, "corpus": {"train_tokens": 512, "eval_tokens": 64},
            "nodes": [{"id": n, "model": m} for n, m in zip("ab", models)],
            "bus": {"round_tokens": 32}, "evaluation": {"unit": unit, "top_k": 8},
        })

    needed = result_bytes_bound(32, 8, 1, 1, round_bytes=BYTES_PER_TOKEN_BOUND * 32)
    assert max_packet_size_for(scenario({"m": "x", "g": "y"})) >= 2 * needed
    assert max_packet_size_for(scenario({"m": "x"}, unit="byte")) >= 2 * needed
    assert max_packet_size_for(scenario({"m": "x", "g": "x"})) < needed  # one model twice: tokens
