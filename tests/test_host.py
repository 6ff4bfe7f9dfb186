"""Volunteer hosts (`collective node --nodes`, `--claim N`) against a real Mosquitto on 127.0.0.1.

The world (a tiny float32 model, the scenario a -> b -> c -> a and its embedded run) is the one
of `test_distributed`: a host that holds every node computes each round with one batched
`compute_rounds` call, as the embedded runtime does, and must give the embedded numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import sys
from collections.abc import Iterator

import aiomqtt
import pytest

from collective.cli import main
from collective.distributed.broker import users_for
from collective.distributed.coordinator import MqttExecutor
from collective.distributed.limits import PacketLimit
from collective.distributed.protocol import Topics, decode_envelope, encode
from collective.records import RoundEvent, parse_event
from tests.envelope_tap import EnvelopeTap
from tests.mosquitto import running_broker
from tests.test_distributed import (
    NODES,
    REPO,
    Nodes,
    World,
    _assert_same_evaluation,
    _messages,
    _run,
    _wait_until,
    build_world,
)

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tok, tiny_lm, one_torch_thread) -> World:
    # the embedded numbers on one thread, as the host computes them (`--threads 1`): a matmul
    # split over two threads sums in another order, and the bitwise comparison would see it
    return build_world(tmp_path_factory.mktemp("host"), tiny_tok, tiny_lm)


@pytest.fixture
def nodes(tmp_path) -> Iterator[Nodes]:
    started = Nodes(tmp_path)
    yield started
    started.stop_all()


def _host(nodes: Nodes, key: str, url: str, run_id: str, *which: str) -> subprocess.Popen[bytes]:
    """A `collective node` process serving `which` (--nodes A,B or --claim N), logged as node-<key>-*.log."""
    nodes.started += 1
    log = (nodes.folder / f"node-{key}-{nodes.started}.log").open("wb")
    command = [sys.executable, "-m", "collective.cli", "node", "--broker", url, "--run", run_id, *which]
    process = subprocess.Popen(command + ["--threads", "1", "--scenario-timeout", "120"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    nodes.processes[key] = process
    return process


def test_a_host_with_every_node_sends_one_envelope_each_way_a_round_and_gives_the_embedded_numbers_to_the_bit(world, nodes, tmp_path):
    users = {**users_for(world.prepared.scenario), "box": "box-pass"}
    run_dir = tmp_path / "run-host"
    with (
        running_broker(tmp_path / "broker", users=users, hosts={"box": list(NODES)}) as broker,
        EnvelopeTap(broker.url("coordinator"), run_dir.name) as tap,
    ):
        _host(nodes, "box", broker.url("box"), run_dir.name, "--nodes", ",".join(NODES))
        result, executor, _ = _run(world, broker.url("coordinator"), run_dir)
        assert nodes.wait_all() == {"box": 0}
    report = result.report
    assert result.status == "complete" and report is not None and report.missed_rounds == {}
    # the host computes a round as the embedded runtime does (one batch of every node, in the
    # scenario's order) and the rows cross the wire bit for bit: the same report, exactly
    assert report.rows == world.embedded.rows
    assert report.collective_gain == world.embedded.collective_gain and report.communication_gain == world.embedded.communication_gain
    assert _messages(run_dir) == world.embedded_messages
    rounds_asked = sorted({r for (_, r) in tap.kinds if r >= 0})
    assert len(rounds_asked) == len(_rounds(run_dir))
    for r in rounds_asked:  # one request and one result envelope a round, for all three nodes
        assert tap.kinds[("to/box", r)] == ["host_request"] and tap.kinds[("result/box", r)] == ["host_result"], r
    assert not any(topic in tap.heard_on for topic in ("to/a", "to/b", "to/c", "result/a", "result/b", "result/c"))
    output = nodes.output("box")
    rounds = len([line for line in (run_dir / "events.jsonl").read_text().splitlines() if '"kind":"round"' in line])
    assert all(f"round {r}: a, b, c in 1 batch(es)" in output for r in range(rounds)), output
    assert f"done: {3 * rounds} node rounds served, 1 model copy(ies)" in output
    assert executor.rejections.total == 0


def test_a_host_envelope_killed_mid_run_takes_all_its_nodes_out_and_they_rejoin_when_it_comes_back(world, nodes, tmp_path):
    run_dir = tmp_path / "run-host-kill"
    with running_broker(tmp_path / "broker") as broker:
        nodes.start(broker.url(), run_dir.name, "a")
        _host(nodes, "bc", broker.url(), run_dir.name, "--nodes", "b,c")

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index == 1:
                nodes.processes["bc"].kill()  # no goodbye: the broker publishes both nodes' wills
                nodes.processes["bc"].wait()
                _host(nodes, "bc", broker.url(), run_dir.name, "--nodes", "b,c")
            if event.round_index == 2:
                _wait_until(lambda: not executor.missing(), 60, "nodes b and c to rejoin")

        result, executor, _ = _run(world, broker.url(), run_dir, on_event)
        assert nodes.wait_all() == {"a": 0, "bc": 0}
    report = result.report
    assert result.status == "complete" and report is not None
    assert report.missed_rounds == {"b": 1, "c": 1}
    events = [parse_event(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    missed = [(e.round_index, n.node_id) for e in events if isinstance(e, RoundEvent) for n in e.nodes if n.missed]
    assert missed == [(2, "b"), (2, "c")]
    kept = {("member_plain", "a"), ("member_isolated", "a"), ("reference", None)}
    _assert_same_evaluation(world.embedded, report, rows=kept)
    assert report.row("member_plain", "b").n_tokens == world.embedded.row("member_plain", "b").n_tokens - 16


def _rounds(run_dir) -> list[RoundEvent]:
    events = [parse_event(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in events if isinstance(e, RoundEvent)]


def _forge(raw: bytes, round_index: int, results: dict) -> bytes:
    """A host's real result envelope, with another round and other node parts."""
    env = decode_envelope(raw, 1 << 24)
    payload = env.payload.model_copy(update={"results": results})
    return encode(env.model_copy(update={"round_index": round_index, "payload": payload}))


def test_forged_parts_of_a_host_envelope_are_dropped_per_node_and_change_nothing(world, nodes, tmp_path):
    """A lone node a and a host box of b and c, behind logins; box publishes (with its own login)
    envelopes whose parts are for a node it does not serve, for no node of the run, or of an
    earlier round, and garbage: each dropped for its reason, and the run gives the embedded numbers."""
    users = {**users_for(world.prepared.scenario), "box": "box-pass"}
    run_dir = tmp_path / "run-host-forged"
    with (
        running_broker(tmp_path / "broker", users=users, hosts={"box": ["b", "c"]}) as broker,
        EnvelopeTap(broker.url("coordinator"), run_dir.name) as tap,
    ):
        nodes.start(broker.url("a"), run_dir.name, "a")
        _host(nodes, "box", broker.url("box"), run_dir.name, "--nodes", "b,c")
        topic = Topics(run_dir.name).result("box")

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index != 1:
                return
            _wait_until(lambda: ("result/box", 1) in tap.raw, 10, "the tap to hear box's result of round 1")
            honest = decode_envelope(tap.raw[("result/box", 1)][0], 1 << 24).payload.results  # type: ignore[union-attr]
            forged = [
                _forge(tap.raw[("result/box", 1)][0], 2, {"a": honest["b"]}),  # a is served alone: spoofed
                _forge(tap.raw[("result/box", 1)][0], 2, {"zz": honest["b"]}),  # no such node: unknown_node
                _forge(tap.raw[("result/box", 1)][0], 0, dict(honest)),  # round 0 again, both parts: wrong_round x2
                b"{not json",  # malformed
            ]

            async def publish() -> None:
                async with aiomqtt.Client(broker.host, broker.port, username="box", password="box-pass") as box:
                    for raw in forged:
                        await box.publish(topic, raw, qos=1)

            asyncio.run(publish())
            _wait_until(lambda: executor.rejections.total >= 5, 30, "the forged envelopes to be dropped")

        result, executor, _ = _run(world, broker.url("coordinator"), run_dir, on_event)
        assert nodes.wait_all() == {"a": 0, "box": 0}
    assert executor.rejections.as_dict() == {"malformed": 1, "spoofed": 1, "unknown_node": 1, "wrong_round": 2}
    assert result.report is not None and result.report.missed_rounds == {}
    _assert_same_evaluation(world.embedded, result.report)  # a is scored alone: within 1e-5
    assert _messages(run_dir) == world.embedded_messages


def test_a_host_envelope_over_the_packet_limit_is_split_and_the_run_gives_the_embedded_numbers(world, tmp_path, monkeypatch):
    """A packet limit that holds one node's result but not three: the coordinator's request and
    the host's result are split into envelopes under it, on a broker that drops (and disconnects)
    anything larger; the host runs in this process, so that it reads the same limit."""
    import threading

    from collective.distributed.host import Host, HostConfig
    from collective.distributed.mqtt import parse_broker_url

    limit = 16_384
    monkeypatch.setattr(PacketLimit, "of", staticmethod(lambda scenario: PacketLimit(limit)))
    run_dir = tmp_path / "run-host-split"
    with running_broker(tmp_path / "broker", max_packet_size=limit) as broker, EnvelopeTap(broker.url(), run_dir.name) as tap:
        host = Host(HostConfig(parse_broker_url(broker.url()), run_dir.name, node_ids=NODES, scenario_timeout_s=120))
        ended: list[object] = []
        thread = threading.Thread(target=lambda: ended.append(asyncio.run(host.run())), daemon=True)
        thread.start()
        result, executor, _ = _run(world, broker.url(), run_dir)
        thread.join(30)
    assert ended and result.report is not None and result.report.missed_rounds == {}
    assert result.report.rows == world.embedded.rows  # one batch of every node, as embedded: exactly
    assert _messages(run_dir) == world.embedded_messages
    results = {r: n for (where, r), n in tap.sizes.items() if where == f"result/{host.host_id}" and r >= 0}
    assert results and all(len(sizes) >= 2 for sizes in results.values()), results  # split every round
    every = [size for (where, _), sizes in tap.sizes.items() for size in sizes if where.endswith(host.host_id)]
    assert max(every) <= PacketLimit(limit).envelope_bytes
    assert executor.rejections.total == 0


def _fails_at_once(nodes: Nodes, key: str, url: str, run_id: str, *which: str) -> str:
    process = _host(nodes, key, url, run_id, *which)
    assert process.wait(timeout=120) == 2
    return " ".join(nodes.output(key).split())


def test_a_claim_is_assigned_free_nodes_and_bad_requests_fail_at_once_while_the_run_goes_on(world, nodes, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="collective.distributed.roster")
    run_dir = tmp_path / "run-claim"
    errors: dict[str, str] = {}
    with running_broker(tmp_path / "broker") as broker:
        url = broker.url()
        _host(nodes, "claimer", url, run_dir.name, "--claim", "2")  # the first two free nodes: a and b
        nodes.start(url, run_dir.name, "c")

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index == 1:
                errors["claim"] = _fails_at_once(nodes, "greedy", url, run_dir.name, "--claim", "1")
                errors["unknown"] = _fails_at_once(nodes, "stranger", url, run_dir.name, "--nodes", "c,zz")
                errors["twice"] = _fails_at_once(nodes, "second", url, run_dir.name, "--node", "b", "--node", "c")

        result, executor, _ = _run(world, url, run_dir, on_event)
        codes = nodes.wait_all()
    assert codes == {"claimer": 0, "c": 0, "greedy": 2, "stranger": 2, "second": 2}
    assert "claims 1 node(s), 0 are free" in errors["claim"]
    assert "has no node 'zz'; its nodes are a, b, c" in errors["unknown"]
    assert re.search(r"refused node (b|c): node \1 is already served by another process", errors["twice"])  # whichever comes first
    assert any("claimed 2 node(s): assigned a, b" in r.getMessage() for r in caplog.records)
    output = nodes.output("claimer")
    assert "serves 2 node(s): a, b" in output and "round 2: a, b in 1 batch(es)" in output
    assert result.report is not None and result.report.missed_rounds == {}
    _assert_same_evaluation(world.embedded, result.report)


def test_a_host_login_acts_only_for_its_nodes_and_is_told_which_node_it_may_not_serve(world, tmp_path, capsys):
    users = {**users_for(world.prepared.scenario), "box": "box-pass"}
    with running_broker(tmp_path / "broker", users=users, hosts={"box": ["a", "b"]}) as broker:
        topics = Topics("r1")

        async def try_everything() -> tuple[list[str], list[str]]:
            by_box: list[str] = []
            by_coordinator: list[str] = []
            async with aiomqtt.Client(broker.host, broker.port, username="box", password="box-pass") as box, aiomqtt.Client(
                broker.host, broker.port, username="coordinator", password=users["coordinator"]
            ) as coordinator:
                await coordinator.subscribe(f"{topics.root}/nodes/#", qos=1)
                for target in ("a", "c", "box"):  # a host's requests come on its own topic, none on its nodes'
                    await box.subscribe(topics.to_node(target), qos=1)
                    await coordinator.publish(topics.to_node(target), b"{}", qos=1)
                for node in ("a", "c"):  # the messages to its nodes, and not to another
                    await box.subscribe(f"{topics.root}/nodes/+/msg/{node}", qos=1)
                    await coordinator.publish(topics.message("x", node), b"{}", qos=1)
                for topic in (topics.status("c"), topics.result("c"), topics.message("c", "a"), topics.status("a"), topics.status("box")):
                    await box.publish(topic, b"{}", qos=1)
                for client, heard in ((box, by_box), (coordinator, by_coordinator)):
                    with contextlib.suppress(asyncio.TimeoutError):
                        async with asyncio.timeout(1.0):
                            async for message in client.messages:
                                heard.append(str(message.topic))
            return by_box, by_coordinator

        by_box, by_coordinator = asyncio.run(try_everything())
        assert by_box == [topics.to_node("box"), topics.message("x", "a")]  # its own requests, its node's messages
        published_by_box = [t for t in by_coordinator if "/nodes/x/" not in t]  # not the coordinator's own messages
        assert published_by_box == [topics.status("a"), topics.status("box")]  # what it published for c never arrived
        code = main(["node", "--broker", broker.url("box"), "--run", "r1", "--nodes", "a,c", "--scenario-timeout", "20"])
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())  # errors go to stderr, progress to stdout
    assert code == 2 and "login 'box' may not serve node 'c'" in err and "--hosts FILE" in err, err
    assert "may not serve" not in captured.out
