"""The wire format of the distributed runtime: envelopes, payloads, tensors, topics, limits (no broker)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from collective.distributed.limits import (
    firewall_bytes_bound,
    message_bytes_bound,
    request_bytes_bound,
    result_bytes_bound,
    round_event_bytes_bound,
    screened_bytes_bound,
)
from collective.distributed.payloads import (
    EventPayload,
    JoinPayload,
    MessageKey,
    MessagePayload,
    PredictionsWire,
    RequestPayload,
    ResultPayload,
    TensorBlob,
    check_predictions,
)
from collective.distributed.protocol import (
    COORDINATOR,
    Rejected,
    Rejections,
    Topics,
    decode_envelope,
    encode,
    envelope,
    open_envelope,
    text_digest,
    tokenizer_digest,
)
from collective.lm.predictions import TokenPredictions
from collective.records import MessageRecord, ScreenRecord
from collective.run.bus import render_messages
from collective.run.node import NodeRoundRequest, NodeRoundResult
from collective.scenario import (
    BusSpec,
    CharsetFilter,
    GenerateMessage,
    ParaphraseFilter,
    PerplexityFilter,
    RelayMessage,
    Scenario,
    parse_scenario,
)


def _predictions(n_positions: int = 5, top_k: int = 4, vocab_size: int = 50, seed: int = 0) -> TokenPredictions:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, n_positions, vocab_size, generator=gen) * 3
    logprobs = torch.log_softmax(logits, dim=-1)  # (1, T, V)
    topk_logprobs, topk_ids = logprobs.topk(top_k, dim=-1)  # (1, T, K)
    targets = torch.randint(0, vocab_size, (1, n_positions, 1), generator=gen)
    return TokenPredictions(logprobs.gather(-1, targets).squeeze(-1), topk_ids, topk_logprobs, vocab_size)


def _record(text: str = "hello", sender: str = "a", receiver: str = "b", round_sent: int = 3) -> MessageRecord:
    return MessageRecord(
        sender=sender, receiver=receiver, round_sent=round_sent, deliver_round=round_sent + 1, text=text,
        n_tokens=2, n_bytes=len(text.encode()),
    )


def test_float32_tensors_survive_the_wire_bit_for_bit():
    values = torch.tensor([[-0.0, -1e-38, -3.4e38, -float("inf"), -1.2345678e-7, -17.25]], dtype=torch.float32)
    blob = TensorBlob.model_validate_json(TensorBlob.from_tensor(values, "float32").model_dump_json())
    back = blob.to_tensor()
    assert back.dtype == torch.float32 and back.shape == values.shape
    assert torch.equal(back.view(torch.int32), values.view(torch.int32))


def test_a_predictions_record_round_trips_exactly_with_int64_ids_restored():
    preds = _predictions()
    back = PredictionsWire.model_validate_json(PredictionsWire.from_predictions(preds).model_dump_json()).to_predictions()
    assert torch.equal(back.target_logprob, preds.target_logprob)
    assert torch.equal(back.topk_logprobs, preds.topk_logprobs)
    assert torch.equal(back.topk_ids, preds.topk_ids) and back.topk_ids.dtype == torch.int64
    assert back.vocab_size == preds.vocab_size


def test_a_tensor_blob_whose_data_does_not_fit_its_shape_is_refused():
    blob = TensorBlob.from_tensor(torch.zeros(2, 3), "float32").model_dump()
    blob["shape"] = [2, 4]
    with pytest.raises(ValueError, match="shape"):
        TensorBlob.model_validate(blob)


def test_predictions_with_disagreeing_shapes_are_refused():
    wire = PredictionsWire.from_predictions(_predictions()).model_dump()
    wire["topk_ids"] = PredictionsWire.from_predictions(_predictions(n_positions=6)).model_dump()["topk_ids"]
    with pytest.raises(ValueError, match="inconsistent shapes"):
        PredictionsWire.model_validate(wire)


def test_check_predictions_names_what_does_not_fit_the_run():
    preds = _predictions(n_positions=5, top_k=4, vocab_size=50)
    assert check_predictions(preds, n_positions=5, top_k=4, vocab_size=50) is None
    assert "positions" in (check_predictions(preds, n_positions=6, top_k=4, vocab_size=50) or "")
    assert "vocabulary" in (check_predictions(preds, n_positions=5, top_k=4, vocab_size=51) or "")
    assert "candidates" in (check_predictions(preds, n_positions=5, top_k=8, vocab_size=50) or "")
    broken = TokenPredictions(preds.target_logprob.clone().fill_(float("nan")), preds.topk_ids, preds.topk_logprobs, 50)
    assert "NaN" in (check_predictions(broken, n_positions=5, top_k=4, vocab_size=50) or "")
    positive = TokenPredictions(preds.target_logprob, preds.topk_ids, preds.topk_logprobs + 5, 50)
    assert "above 0" in (check_predictions(positive, n_positions=5, top_k=4, vocab_size=50) or "")


def test_a_request_carries_exactly_the_node_view_and_comes_back_as_the_same_request():
    request = NodeRoundRequest(
        node_id="b",
        round_index=7,
        control_ids=[5, 6],
        prefix_ids=torch.tensor([1, 2, 3]),
        round_inputs=torch.tensor([4, 0, 9]),
        targets=torch.tensor([4, 8, 9]),
        message=GenerateMessage(sampling="sample", temperature=0.7),
        message_tokens=12,
        seed=11,
        want_plain=False,
        firewall=(PerplexityFilter(threshold=5.25, window=4), CharsetFilter(action="strip")),
    )
    keys = [MessageKey(sender="a", round_sent=6, digest=text_digest("hi"))]
    payload = RequestPayload.from_request(request, keys, deadline_s=30.0)
    env = decode_envelope(encode(envelope("run-1", COORDINATOR, payload, 7)), 1 << 20)
    assert isinstance(env.payload, RequestPayload) and env.round_index == 7
    inbox = [_record("hi", round_sent=6)]
    back = env.payload.to_request(7, inbox, BusSpec(inbox_template="[{sender}] {text}|", inbox_header="news: "))
    assert back.prefix_ids.tolist() == [1, 2, 3] and back.round_inputs.tolist() == [4, 0, 9]
    assert back.targets.tolist() == [4, 8, 9] and back.control_ids == [5, 6]
    assert back.message == request.message and back.message_tokens == 12 and back.seed == 11
    assert back.want_plain is False and back.want_isolated is True and render_messages(back.inbox_messages, back.inbox_template, back.inbox_header) == "news: [a] hi|"
    # the node screens what it reads with the fitted firewall and renders it as the scenario's bus does
    assert back.inbox_messages == tuple(inbox) and back.firewall == request.firewall
    assert (back.inbox_template, back.inbox_header) == ("[{sender}] {text}|", "news: ")
    assert env.payload.inbox == keys
    assert not env.payload.ids_out_of_range(10) and env.payload.ids_out_of_range(9)


def test_a_result_comes_back_with_identical_predictions_and_messages():
    result = NodeRoundResult(
        node_id="a", round_index=2, collective=_predictions(seed=1), isolated=_predictions(seed=2), plain=None,
        message_text="hello", inbox_tokens=4, messages=[_record(round_sent=2)],
    )
    payload = ResultPayload.from_result(result, "s1", 0.5, {"malformed": 2}, 1)
    env = decode_envelope(encode(envelope("run-1", "a", payload, 2)), 1 << 20)
    assert isinstance(env.payload, ResultPayload)
    back = env.payload.to_result("a", 2)
    assert torch.equal(back.collective.topk_logprobs, result.collective.topk_logprobs)
    assert back.isolated is not None and result.isolated is not None
    assert torch.equal(back.isolated.target_logprob, result.isolated.target_logprob)
    assert back.plain is None and back.messages == result.messages and back.message_text == "hello"
    assert env.payload.rejected == {"malformed": 2} and env.payload.missing_messages == 1


def test_a_result_carries_the_screen_records_of_the_nodes_firewall():
    screened = [
        ScreenRecord(sender="c", receiver="a", round_sent=1, action="drop", filter="perplexity", score=7.125, threshold=5.5, seconds=0.01),
        ScreenRecord(sender="c", receiver="a", round_sent=0, action="rewrite", filter="charset", text="plain", seconds=0.0),
    ]
    result = NodeRoundResult("a", 2, _predictions(), None, None, None, 0, [], screened=screened)
    env = decode_envelope(encode(envelope("run-1", "a", ResultPayload.from_result(result, "s1", 0.5, {}, 0), 2)), 1 << 20)
    assert isinstance(env.payload, ResultPayload) and env.payload.to_result("a", 2).screened == screened


def test_a_result_carries_whether_its_shuffle_matched_at_the_receiver():
    for matched in (True, False, None):
        result = NodeRoundResult("a", 2, _predictions(), None, None, "b a", 0, [], shuffle_matched=matched)
        env = decode_envelope(encode(envelope("run-1", "a", ResultPayload.from_result(result, "s1", 0.5, {}, 0), 2)), 1 << 20)
        assert isinstance(env.payload, ResultPayload) and env.payload.to_result("a", 2).shuffle_matched is matched


def test_another_protocol_version_is_refused_naming_both_versions_and_what_to_do():
    with pytest.raises(Rejected, match="protocol schema 5, this side speaks 6 .*host.*same collective version") as caught:
        decode_envelope(b'{"schema_version": 5, "run_id": "r", "kind": "request"}', 1000)
    assert caught.value.reason == "wrong_schema"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe not utf-8", "malformed"),
        (b"{not json", "malformed"),
        (b"[1, 2, 3]", "malformed"),
        (b'{"run_id": "r", "sender": "a"}', "malformed"),
        (b'{"schema_version": 1, "run_id": "r"}', "wrong_schema"),  # protocol 1: before searched messages
        (b'{"schema_version": 2, "run_id": "r"}', "wrong_schema"),  # protocol 2: before receiver firewalls
        (b'{"schema_version": 4, "run_id": "r"}', "wrong_schema"),  # protocol 4: before byte-unit rounds
        (b'{"schema_version": 5, "run_id": "r"}', "wrong_schema"),  # protocol 5: before host envelopes
        (b"x" * 2000, "oversized"),
    ],
)
def test_a_broken_payload_is_rejected_with_its_reason(raw, reason):
    with pytest.raises(Rejected) as caught:
        decode_envelope(raw, max_bytes=1000)
    assert caught.value.reason == reason


def test_an_envelope_whose_kind_disagrees_with_its_payload_is_malformed():
    data = json.loads(encode(envelope("r", "a", MessagePayload(record=_record()))))
    data["kind"] = "result"
    with pytest.raises(Rejected) as caught:
        decode_envelope(json.dumps(data).encode(), 10_000)
    assert caught.value.reason == "malformed"


def test_a_run_id_that_could_escape_its_topic_is_refused():
    with pytest.raises(ValueError):
        envelope("run/../other", "a", MessagePayload(record=_record()))


def test_topics_name_their_owner_and_parse_back():
    topics = Topics("run-1")
    assert topics.parse(topics.message("a", "b")) == topics.parse("collective/run-1/nodes/a/msg/b")
    info = topics.parse(topics.message("a", "b"))
    assert info is not None and (info.owner, info.channel, info.target) == ("a", "msg", "b")
    info = topics.parse(topics.to_node("c"))
    assert info is not None and (info.owner, info.channel, info.target) == (COORDINATOR, "to", "c")
    for topic, channel in ((topics.result("a"), "result"), (topics.status("a"), "status"), (topics.scenario, "scenario")):
        parsed = topics.parse(topic)
        assert parsed is not None and parsed.channel == channel
    assert topics.parse("collective/run-2/nodes/a/result") is None
    assert topics.parse("collective/run-1/nodes/a/elsewhere") is None
    assert topics.node_subscriptions("b")[-1] == "collective/run-1/nodes/+/msg/b"


def test_rejections_count_by_reason():
    counts = Rejections("test")
    counts.add("spoofed", "t", "x")
    counts.add("spoofed", "t", "y")
    counts.add("malformed", "t", "z")
    assert counts.as_dict() == {"malformed": 1, "spoofed": 2} and counts.total == 3


def test_size_bounds_hold_a_real_result_and_a_budget_sized_message():
    preds = _predictions(n_positions=32, top_k=64, vocab_size=49152)
    text = "é" * 80  # 160 bytes
    records = [_record(text, receiver=r, round_sent=0) for r in ("b", "c")]
    result = NodeRoundResult("a", 0, preds, preds, preds, text, 10, records)
    size = len(encode(envelope("r", "a", ResultPayload.from_result(result, "s", 0.0, {}, 0), 0)))
    assert size <= result_bytes_bound(32, 64, 160, 2)
    # a firewall's screen records: one per message read (bus.retain per in-link), a paraphrase's
    # rewrite as long as the message's tokens allow (24 of them, each of escaped bytes)
    scenario = _firewall_scenario([{"kind": "paraphrase", "prompt": "\x01" * 300}], retain=2)
    worst = ScreenRecord(sender="node-00", receiver="a", round_sent=10**6, action="rewrite", filter="paraphrase",
                         score=-1.5e300, threshold=1.5e300, text="\x01" * 64 * 24, seconds=1e-300)
    result.screened = [worst] * (2 * 5)
    size = len(encode(envelope("r", "a", ResultPayload.from_result(result, "s", 0.0, {}, 0), 0)))
    assert size > result_bytes_bound(32, 64, 160, 2) and size <= result_bytes_bound(32, 64, 160, 2, screened_bytes_bound(scenario, 5))
    assert screened_bytes_bound(_firewall_scenario([]), 5) == 0
    # a request carries the node's firewall, its thresholds fitted
    fitted = (PerplexityFilter(threshold=1.5e300, window=10**6, fit_messages=10**6), ParaphraseFilter(prompt="\x01" * 300))
    request = RequestPayload(node_id="a", control_ids=[], prefix_ids=[], round_inputs=[], targets=[], message=RelayMessage(),
                             message_tokens=0, seed=0, firewall=fitted, deadline_s=1.0)
    scenario = _firewall_scenario([{"kind": "perplexity", "window": 10**6, "fit_messages": 10**6}, {"kind": "paraphrase", "prompt": "\x01" * 300}])
    assert len(encode(envelope("r", COORDINATOR, request, 0))) <= request_bytes_bound(0, 0, 0, 0, firewall_bytes_bound(scenario))


def _firewall_scenario(firewall: list[dict[str, object]], retain: int = 1) -> Scenario:
    return parse_scenario(
        {
            "name": "bounds", "models": {"m": "x"}, "corpus": {"train_tokens": 512, "eval_tokens": 64},
            "node_defaults": {"model": "m", "firewall": firewall}, "nodes": [{"id": "a"}, {"id": "b"}],
            "bus": {"round_tokens": 32, "max_message_tokens": 24, "max_message_bytes": 160, "retain": retain},
        }
    )
    message = encode(envelope("r", "a", MessagePayload(record=_record("\x00" * 160)), 0))
    assert len(message) <= message_bytes_bound(160)


def test_a_join_carries_a_tokenizer_digest_that_tells_tokenizers_apart(tiny_tok):
    digest = tokenizer_digest(tiny_tok)
    assert digest == tokenizer_digest(tiny_tok) and len(digest) == 24
    join = JoinPayload(session="s", model="tiny", vocab_size=len(tiny_tok), tokenizer_digest=digest, device="cpu")
    env = decode_envelope(encode(envelope("r", "a", join)), 4096)
    assert isinstance(env.payload, JoinPayload) and env.payload.tokenizer_digest == digest


def test_message_records_of_relay_policy_serialize_inside_requests():
    payload = RequestPayload(
        node_id="a", control_ids=[], prefix_ids=[], round_inputs=[1], targets=[1], message=RelayMessage(),
        message_tokens=0, seed=0, deadline_s=1.0,
    )
    env = decode_envelope(encode(envelope("r", COORDINATOR, payload, 0)), 100_000)
    assert isinstance(env.payload, RequestPayload) and env.payload.message == RelayMessage()
    assert math.isclose(env.payload.deadline_s, 1.0)


def test_an_event_envelope_carries_a_run_record_exactly_and_its_topic_parses_back():
    from collective.distributed.protocol import event_record_topic
    from collective.records import NodeRound, RoundEvent, RunEnd

    nan_round = RoundEvent(
        run_id="r", round_index=2, phase="eval", eval_round=1, start_token=0, n_tokens=4,
        nodes=[NodeRound(node_id="a", nll_collective=None, nll_isolated=None, nll_plain=None, missed=True)],
        messages=[], nll_collective=float("nan"), nll_silent=float("nan"), nll_reference=1.0, wall_seconds=0.1, elapsed_seconds=0.3,
    )
    for record in (nan_round, RunEnd(run_id="r", status="failed", rounds_done=2, detail="x")):
        raw = encode(envelope("r", COORDINATOR, EventPayload(record=record), 2))
        back = decode_envelope(raw, 1 << 20)
        assert back.kind == "event" and back.payload.record.model_dump_json() == record.model_dump_json()  # type: ignore[union-attr]
    topics = Topics("r")
    assert event_record_topic(nan_round) == ("round", False) and event_record_topic(RunEnd(run_id="r", status="complete", rounds_done=1)) == ("end", True)
    info = topics.parse(topics.event("start"))
    assert info is not None and (info.owner, info.channel, info.target) == (COORDINATOR, "events", "start")
    assert topics.parse("collective/r/coord/events/other") is None
    assert topics.watcher_subscriptions() == ["collective/r/coord/events/#", "collective/r/coord/control"]


def test_the_round_event_bound_holds_a_round_with_every_message_at_its_budget():
    from collective.records import NodeRound, RoundEvent

    ids = [f"node-{i:02d}" for i in range(8)]
    links = [(a, b) for a in ids for b in ids if a != b]
    worst = "\x01" * 160  # JSON escapes each of these bytes as 6 characters
    event = RoundEvent(
        run_id="r", round_index=0, phase="eval", eval_round=0, start_token=0, n_tokens=32,
        nodes=[NodeRound(node_id=n, nll_collective=-1e-300, nll_isolated=1.5e300, nll_plain=3.25, top1_collective=0.5,
                         inbox_tokens=10**6, bytes_sent=10**6, messages_sent=10**6, last_message="\x01" * (24 * 4)) for n in ids],
        messages=[MessageRecord(sender=a, receiver=b, round_sent=10**6, deliver_round=10**6 + 1, text=worst,
                                n_tokens=24, n_bytes=160, truncated=True) for a, b in links],
        nll_collective=3.0, nll_silent=3.0, nll_reference=3.0, wall_seconds=1e6, elapsed_seconds=1e6,
    )
    size = len(encode(envelope("r", COORDINATOR, EventPayload(record=event), 0)))
    assert size <= round_event_bytes_bound(len(ids), len(links), 24, 160)


def test_an_envelope_of_another_run_or_from_someone_but_the_topics_owner_is_not_opened():
    raw = encode(envelope("run-1", "a", MessagePayload(record=_record())))
    assert open_envelope(raw, 10_000, run_id="run-1", sender="a").sender == "a"
    for run_id, sender, reason in (("run-2", "a", "wrong_run"), ("run-1", "b", "spoofed")):
        with pytest.raises(Rejected) as caught:
            open_envelope(raw, 10_000, run_id=run_id, sender=sender)
        assert caught.value.reason == reason


def test_dropping_counts_a_rejection_and_a_handler_bug_alike_and_the_receiver_goes_on():
    counts = Rejections("test")
    with counts.dropping("t"):
        raise Rejected("oversized", "too big")
    with counts.dropping("t"):
        raise KeyError("a bug in a handler")
    with counts.dropping("t"):
        pass
    assert counts.as_dict() == {"malformed": 1, "oversized": 1}
