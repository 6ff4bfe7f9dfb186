"""Receiver firewalls in distributed runs: the coordinator sends each node its fitted firewall in
its requests, the receiving node screens the messages it reads (`compute_rounds`, as embedded)
and returns its screen records, which the coordinator checks before they count.

The world of the broker tests: a tiny Llama trained for a few seconds on the train part (so
that fluent text is likelier to it than gibberish), a directed ring a -> b -> m -> a in which
m is hostile (`policy: attack, threat: model-only`: its message is searched to raise a's NLL)
and a and b screen what they read with a perplexity filter fitted on the train part. The
embedded run of it is the reference: a distributed run must give the same screen records,
report rows and messages, and a's drops of m's messages must happen at a.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from collective.distributed.backend import NodeModel
from collective.distributed.coordinator import MqttExecutor
from collective.distributed.mqtt import DistributedError, parse_broker_url
from collective.distributed.payloads import RequestPayload, ResultPayload
from collective.distributed.protocol import PROTOCOL_SCHEMA_VERSION, Rejected, Topics
from collective.distributed.rounds import RoundCollector
from collective.distributed.validation import ResultCheck
from collective.distributed.volunteer import Volunteer, VolunteerConfig
from collective.lm.models import LoadedModel, ModelPool
from collective.records import RoundEvent, ScreenRecord, parse_event
from collective.run.bus import link_policies
from collective.run.runner import prepare, run_prepared
from collective.scenario import (
    CharsetFilter,
    PerplexityFilter,
    RelayMessage,
    RetokenizeFilter,
    load_scenario,
    parse_scenario,
)
from tests.mosquitto import running_broker
from tests.test_distributed import Nodes, World, _assert_same_evaluation, _messages, _run
from tests.test_firewall import fluent, stream  # noqa: F401  (fixtures: the fluent tiny Llama and its train text)
from tests.test_host import _host
from tests.test_rounds import Round, _requests

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# searched hard enough that its messages read as gibberish to the fluent model (a drops 7 of the 8 it reads)
HOSTILE = {"policy": "attack", "objective": "untargeted", "threat": "model-only", "steps": 4, "search_width": 16, "topk": 32, "n_replace": 2}
FIREWALL = [{"kind": "perplexity", "false_drop_rate": 0.1, "fit_messages": 32}]
NODE_IDS = ("a", "b", "m")


def _scenario(model: dict[str, Any] | str) -> dict[str, Any]:
    return {
        "name": "hostile-distributed",
        "seed": 3,
        "models": {"tiny": model},
        "corpus": {"source": "builtin:pydoc", "train_tokens": 512, "eval_tokens": 128},
        "node_defaults": {"model": "tiny", "message": {"policy": "relay"}, "firewall": FIREWALL},
        "nodes": [
            {"id": "a", "view": {"kind": "window", "tokens": 32}},
            {"id": "b", "view": {"kind": "lagged", "tokens": 32, "lag": 16}},
            {"id": "m", "view": {"kind": "window", "tokens": 32}, "message": HOSTILE, "firewall": []},
        ],
        "topology": {"kind": "ring", "directed": True},  # a -> b -> m -> a: m's reader is a
        "bus": {"round_tokens": 16, "max_message_tokens": 8, "max_message_bytes": 64},
        "evaluation": {"context_tokens": 64, "warmup_rounds": 1, "top_k": 16},
    }


def _screened(run_dir: Path) -> list[tuple[int, ScreenRecord]]:
    events = [parse_event(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [(e.round_index, s) for e in events if isinstance(e, RoundEvent) for s in e.screened]


def _same_screens(found: list[tuple[int, ScreenRecord]], expected: list[tuple[int, ScreenRecord]], score_tol: float) -> None:
    """The same records in the same rounds, each score within `score_tol` (a node alone may pad its batch differently)."""

    def key(item: tuple[int, ScreenRecord]) -> tuple[object, ...]:
        r, s = item
        return (r, s.sender, s.receiver, s.round_sent, s.action, s.filter, s.threshold, s.text)

    assert [key(item) for item in found] == [key(item) for item in expected]
    for (_, got), (_, want) in zip(found, expected):
        assert got.score is not None and want.score is not None and math.isclose(got.score, want.score, rel_tol=0.0, abs_tol=score_tol)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tok, fluent: LoadedModel) -> World:  # noqa: F811
    root = tmp_path_factory.mktemp("distributed-firewall")
    fluent.model.save_pretrained(root / "fluent")
    tiny_tok.save_pretrained(root / "fluent")
    (root / "scenario.yaml").write_text(yaml.safe_dump(_scenario({"ref": str(root / "fluent"), "dtype": "float32", "device": "cpu"})))
    prepared = prepare(load_scenario(root / "scenario.yaml"), ModelPool(cache_dir=root / "cache"), base_dir=root)
    embedded = run_prepared(prepared, root / "embedded")
    assert embedded.report is not None
    return World(root, prepared, embedded.report, _messages(root / "embedded"))


@pytest.fixture
def nodes(tmp_path):
    started = Nodes(tmp_path)
    yield started
    started.stop_all()


class Traffic:
    """What the coordinator sent each node and took from each node's results (its own methods, wrapped)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests: dict[tuple[str, int], RequestPayload] = {}
        self.screened: dict[tuple[str, int], list[ScreenRecord]] = {}
        send, accept = MqttExecutor._send_request, RoundCollector.accept

        async def sending(executor: MqttExecutor, target: str, payloads: list[RequestPayload], round_index: int) -> None:
            for payload in payloads:  # a lone node's request, or a host's nodes' (one envelope)
                self.requests[(payload.node_id, round_index)] = payload
            await send(executor, target, payloads, round_index)

        def accepting(collector: RoundCollector, node_id: str, round_index: int, result: ResultPayload, **given: Any) -> None:
            accept(collector, node_id, round_index, result, **given)  # via, message_ids
            self.screened[(node_id, round_index)] = list(result.screened)

        monkeypatch.setattr(MqttExecutor, "_send_request", sending)
        monkeypatch.setattr(RoundCollector, "accept", accepting)


def _assert_filtered_at_the_receiver(world: World, run_dir: Path, traffic: Traffic) -> None:
    """Every screen record came in its receiver's result; each of m's messages that a dropped
    was in a's request (so it reached a) with a's fitted firewall, and never reached a's context."""
    screened = _screened(run_dir)
    assert screened and all(s in traffic.screened[(s.receiver, r)] for r, s in screened)
    dropped = [(r, s) for r, s in screened if s.sender == "m" and s.action == "drop"]
    assert len(dropped) >= 3, screened  # the hostile node's searched gibberish, at its reader
    threshold = world.prepared.firewalls["a"][0].threshold
    events = {e.round_index: e for e in map(parse_event, (run_dir / "events.jsonl").read_text().splitlines()) if isinstance(e, RoundEvent)}
    for round_index, record in dropped:
        request = traffic.requests[("a", round_index)]
        assert [(k.sender, k.round_sent) for k in request.inbox] == [("m", record.round_sent)]
        assert request.firewall == world.prepared.firewalls["a"] and record.threshold == threshold
        (node_a,) = [n for n in events[round_index].nodes if n.node_id == "a"]
        # a has no control prompt: with its one message dropped its context is its view alone
        assert node_a.inbox_tokens == 0 and node_a.messages_screened_out == 1 and node_a.nll_collective == node_a.nll_isolated
    assert not any(s.receiver == "m" for _, s in screened)  # m has no firewall


def _assert_as_embedded(world: World, run_dir: Path, report: Any, score_tol: float) -> None:
    _assert_same_evaluation(world.embedded, report)  # every row and gain within 1e-5
    assert _messages(run_dir) == world.embedded_messages
    _same_screens(_screened(run_dir), _screened(world.root / "embedded"), score_tol)
    for node_id in ("a", "b"):
        got, want = report.firewalls[node_id], world.embedded.firewalls[node_id]
        assert (got.messages_read, got.messages_dropped, got.filters[0].threshold) == (
            want.messages_read, want.messages_dropped, want.filters[0].threshold,
        )


# ---------------------------------------------------------------------------- on the broker


@pytest.mark.mqtt
def test_a_host_of_every_node_drops_the_hostile_nodes_messages_at_its_reader_as_the_embedded_run_does(
    world, nodes, tmp_path, monkeypatch
):
    traffic = Traffic(monkeypatch)
    run_dir = tmp_path / "run-host-firewall"
    with running_broker(tmp_path / "broker") as broker:
        _host(nodes, "box", broker.url(), run_dir.name, "--nodes", ",".join(NODE_IDS))
        result, executor, _ = _run(world, broker.url(), run_dir)
        assert nodes.wait_all() == {"box": 0}
    assert result.status == "complete" and result.report is not None and result.report.missed_rounds == {}
    _assert_as_embedded(world, run_dir, result.report, score_tol=0.0)  # one batched pass a round, as embedded
    _assert_filtered_at_the_receiver(world, run_dir, traffic)
    assert executor.rejections.total == 0 and not any(executor.node_rejections().values())


@pytest.mark.mqtt
def test_one_process_per_node_screens_each_inbox_on_its_node_with_the_embedded_records(world, nodes, tmp_path, monkeypatch):
    traffic = Traffic(monkeypatch)
    run_dir = tmp_path / "run-nodes-firewall"
    with running_broker(tmp_path / "broker") as broker:
        for node_id in NODE_IDS:
            nodes.start(broker.url(), run_dir.name, node_id)
        result, executor, _ = _run(world, broker.url(), run_dir)
        assert nodes.wait_all() == dict.fromkeys(NODE_IDS, 0)
    assert result.status == "complete" and result.report is not None
    _assert_as_embedded(world, run_dir, result.report, score_tol=1e-4)
    _assert_filtered_at_the_receiver(world, run_dir, traffic)
    assert executor.rejections.total == 0


# ---------------------------------------------------------------------------- the checks, no broker


UNIT = parse_scenario(_scenario("x"), source="unit.yaml")
FITTED = (PerplexityFilter(threshold=4.0, false_drop_rate=0.1, fit_messages=32),)


def _request(firewall: tuple[Any, ...]) -> RequestPayload:
    return RequestPayload(
        node_id="a", control_ids=[], prefix_ids=[], round_inputs=[1] * 16, targets=[1] * 16, message=RelayMessage(),
        message_tokens=8, seed=3, firewall=firewall, deadline_s=5.0,
    )


def test_a_request_whose_firewall_is_not_the_runs_fitted_one_is_dropped_by_the_node(tiny_tok):
    volunteer = Volunteer(VolunteerConfig(parse_broker_url("mqtt://127.0.0.1:1"), "run-1", "a"))
    volunteer.scenario, volunteer.mailbox = UNIT, SimpleNamespace(due=[])  # type: ignore[assignment]
    volunteer.loaded = NodeModel(None, tiny_tok, "tiny", len(tiny_tok), "cpu")
    volunteer._on_request(0, _request(FITTED))  # the scenario's filter with its threshold fitted
    wrong = {
        "no fitted threshold": (PerplexityFilter(false_drop_rate=0.1, fit_messages=32),),
        "another setting": (PerplexityFilter(threshold=4.0, false_drop_rate=0.2, fit_messages=32),),
        "another filter": (CharsetFilter(),),
        "no firewall": (),
        "one filter more": (*FITTED, RetokenizeFilter()),
    }
    for why, firewall in wrong.items():
        with pytest.raises(Rejected, match="firewall is not the run's") as caught:
            volunteer._on_request(1, _request(firewall))
        assert caught.value.reason == "malformed", why


def test_a_node_that_meets_a_coordinator_of_another_protocol_stops_at_once_naming_both_versions():
    volunteer = Volunteer(VolunteerConfig(parse_broker_url("mqtt://127.0.0.1:1"), "run-1", "a"))
    old = b'{"schema_version": 2, "run_id": "run-1", "sender": "coordinator", "kind": "scenario", "payload": {}}'
    asyncio.run(volunteer._handle(Topics("run-1").scenario, old))
    assert volunteer.rejections.as_dict() == {"wrong_schema": 1}
    assert isinstance(volunteer._failure, DistributedError)
    assert f"speaks another protocol: protocol schema 2, this side speaks {PROTOCOL_SCHEMA_VERSION}" in str(volunteer._failure)
    assert "same collective version on the coordinator, every node" in str(volunteer._failure)


def _check() -> ResultCheck:
    edges = [("a", "b"), ("b", "m"), ("m", "a")]
    return ResultCheck(
        top_k=16, seed=3, vocab_sizes={}, out_neighbours={"a": ["b"], "b": ["m"], "m": ["a"]}, policies=link_policies(UNIT.bus, edges),
        codec=None,  # type: ignore[arg-type]  (screen records need no tokenizer)
        in_neighbours={"a": ["m"], "b": ["a"], "m": ["b"]},
        firewalls={"a": (*FITTED, CharsetFilter(action="strip"), CharsetFilter()), "b": FITTED}, retain=1,
    )


def _screen(**fields: Any) -> ScreenRecord:
    honest: dict[str, Any] = {"sender": "m", "receiver": "a", "round_sent": 4, "action": "drop", "filter": "perplexity", "score": 6.5, "threshold": 4.0}
    return ScreenRecord(**{**honest, **fields})


def test_a_screen_record_must_be_about_the_nodes_own_inbox_and_an_action_its_firewall_can_take():
    check = _check()
    honest = [
        _screen(),
        _screen(action="pass", filter=None, score=3.5),
        _screen(action="rewrite", filter="charset#2", text="clean", score=3.5),
        _screen(action="drop", filter="charset#3", score=3.5),
        _screen(action="drop", filter="charset#3", score=None, threshold=None),
    ]
    for record in honest:
        assert check.screened("a", 5, [record]) == [record]
    forged = {
        "spoofed": [_screen(receiver="b")],  # another receiver's inbox
        "not_neighbour": [_screen(sender="b")],  # b -> a is not a link
        "malformed": [
            _screen(round_sent=5),  # not sent before the round it is read in
            _screen(filter="paraphrase"),  # a filter a's firewall does not have
            _screen(score=3.5),  # a perplexity drop under its threshold
            _screen(threshold=3.0),  # a threshold the coordinator did not send
            _screen(action="pass", filter=None),  # a pass above the threshold
            _screen(action="pass", filter="charset#2"),  # a pass that names a filter
            _screen(action="drop", filter="charset#2", score=3.5),  # a stripping filter does not drop
            _screen(action="rewrite", filter="charset#2", score=3.5),  # a rewrite without the text read
            _screen(action="rewrite", filter="perplexity", text="x", score=3.5),  # perplexity does not rewrite
            _screen(score=None),  # a perplexity drop without its score
            _screen(seconds=-1.0),
            [_screen(), _screen()],  # one message screened twice
            [_screen(), _screen(round_sent=3)],  # more than bus.retain messages of one in-neighbour
        ],
    }
    for reason, cases in forged.items():
        for case in cases:
            records = case if isinstance(case, list) else [case]
            with pytest.raises(Rejected) as caught:
                check.screened("a", 5, records)
            assert caught.value.reason == reason, records
    with pytest.raises(Rejected, match="m has no firewall") as caught:
        check.screened("m", 5, [_screen(sender="b", receiver="m")])
    assert caught.value.reason == "malformed"


def test_the_collector_books_a_results_screen_records_and_rejects_a_result_with_a_forged_one(tiny_tok):
    async def scenario() -> tuple[list[ScreenRecord], str]:
        state = Round(tiny_tok)  # nodes a and b of the ring a -> b -> c -> a joined
        state.collector.check = replace(state.collector.check, in_neighbours={"a": ["c"], "b": ["a"]}, firewalls={"b": FITTED})
        collecting = asyncio.ensure_future(state.collector.collect(5, _requests(5)))
        await asyncio.sleep(0.05)
        drop = _screen(sender="a", receiver="b")
        with pytest.raises(Rejected) as caught:
            state.collector.accept("b", 5, state.result("b", 5).model_copy(update={"screened": [_screen(sender="c", receiver="b")]}))
        state.collector.accept("b", 5, state.result("b", 5).model_copy(update={"screened": [drop]}))
        state.collector.accept("a", 5, state.result("a", 5))
        results = await collecting
        b = results["b"]
        assert b is not None and results["a"] is not None and results["a"].screened == []
        return b.screened, caught.value.reason

    screened, reason = asyncio.run(scenario())
    assert screened == [_screen(sender="a", receiver="b")] and reason == "not_neighbour"
