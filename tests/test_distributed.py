"""The distributed runtime end to end: a real Mosquitto on 127.0.0.1, the coordinator in this
process, one `collective node` process per node, a tiny float32 model saved to a folder.

The reference for every check is the embedded run of the same scenario: a distributed run
must give the same evaluation (within float tolerance: a volunteer scores its node alone,
the embedded runtime batches all nodes) and the same messages, word for word.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
import torch
import yaml

from collective.distributed.broker import TlsFiles, users_for
from collective.distributed.coordinator import MqttExecutor, connect_executor
from collective.distributed.mqtt import parse_broker_url
from collective.distributed.payloads import (
    EventPayload,
    JoinPayload,
    MessagePayload,
    PredictionsWire,
    RefusePayload,
    ResultPayload,
    WelcomePayload,
)
from collective.distributed.preflight import PreflightFailed, preflight
from collective.distributed.protocol import (
    Envelope,
    Topics,
    decode_envelope,
    encode,
    envelope,
    tokenizer_digest,
)
from collective.lm.models import ModelPool
from collective.lm.predictions import TokenPredictions
from collective.records import MessageRecord, Report, RoundEvent, parse_event
from collective.run.runner import Prepared, RunResult, prepare, run_prepared
from collective.scenario import load_scenario
from tests.mosquitto import RunningBroker, running_broker

pytestmark = pytest.mark.mqtt

REPO = Path(__file__).resolve().parents[1]
NODES = ("a", "b", "c")
# a -> b -> c -> a: b hears only a, so a message "from c" at b is off the topology
SCENARIO = {
    "name": "distributed",
    "seed": 3,
    "corpus": {"source": "builtin:pydoc", "train_tokens": 256, "eval_tokens": 128},
    "node_defaults": {"model": "tiny", "message": {"policy": "relay"}},
    "nodes": [
        {"id": "a", "view": {"kind": "window", "tokens": 32}},
        {"id": "b", "view": {"kind": "lagged", "tokens": 32, "lag": 16}},
        {"id": "c", "view": {"kind": "none"}, "message": {"policy": "generate", "max_tokens": 6}},
    ],
    "topology": {"kind": "ring", "directed": True},
    "bus": {"round_tokens": 16, "max_message_tokens": 8, "max_message_bytes": 64},
    "evaluation": {"context_tokens": 64, "warmup_rounds": 1, "top_k": 16},
}


@dataclass
class World:
    root: Path
    prepared: Prepared
    embedded: Report
    embedded_messages: list[tuple[str, str, int, str]]


def _messages(run_dir: Path) -> list[tuple[str, str, int, str]]:
    events = [parse_event(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [(m.sender, m.receiver, m.round_sent, m.text) for e in events if isinstance(e, RoundEvent) for m in e.messages]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tok, tiny_lm) -> World:
    return build_world(tmp_path_factory.mktemp("distributed"), tiny_tok, tiny_lm)


def build_world(root: Path, tiny_tok, tiny_lm) -> World:
    """The tiny model saved to a folder, the scenario on it, and its embedded run."""
    tiny_lm.save_pretrained(root / "tiny")
    tiny_tok.save_pretrained(root / "tiny")
    spec = {**SCENARIO, "models": {"tiny": {"ref": str(root / "tiny"), "dtype": "float32", "device": "cpu"}}}
    (root / "scenario.yaml").write_text(yaml.safe_dump(spec))
    prepared = prepare(load_scenario(root / "scenario.yaml"), ModelPool(cache_dir=root / "cache"), base_dir=root)
    embedded = run_prepared(prepared, root / "embedded")
    assert embedded.report is not None
    return World(root, prepared, embedded.report, _messages(root / "embedded"))


class Nodes:
    """`collective node` processes; whatever is still running at the end is stopped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.started = 0

    def start(self, url: str, run_id: str, node_id: str) -> subprocess.Popen[bytes]:
        self.started += 1
        log = (self.folder / f"node-{node_id}-{self.started}.log").open("wb")
        command = [sys.executable, "-m", "collective.cli", "node", "--broker", url, "--run", run_id, "--node", node_id]
        process = subprocess.Popen(command + ["--threads", "1", "--scenario-timeout", "120"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.processes[node_id] = process
        return process

    def restart(self, url: str, run_id: str, node_id: str) -> Path:
        """SIGKILL the node's process (no goodbye: the broker publishes its last will) and start a
        new one; returns the new one's log."""
        victim = self.processes[node_id]
        victim.kill()
        victim.wait()
        self.start(url, run_id, node_id)
        return self.folder / f"node-{node_id}-{self.started}.log"

    def output(self, node_id: str) -> str:
        return "\n".join(p.read_text() for p in sorted(self.folder.glob(f"node-{node_id}-*.log")))

    def wait_all(self, timeout: float = 30.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for node_id, process in self.processes.items():
            codes[node_id] = process.wait(timeout=max(0.1, deadline - time.monotonic()))
        return codes

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def nodes(tmp_path) -> Iterator[Nodes]:
    started = Nodes(tmp_path)
    yield started
    started.stop_all()


OnEvent = Callable[[MqttExecutor, RoundEvent], None]


def _run(world: World, url: str, run_dir: Path, on_event: OnEvent | None = None) -> tuple[RunResult, MqttExecutor, str]:
    """The coordinator's side of a run; returns its result, its executor and its status lines."""
    lines: list[str] = []
    with connect_executor(world.prepared, url, run_id=run_dir.name, on_status=lines.append, join_timeout=120) as executor:
        hook = None if on_event is None else (lambda event: on_event(executor, event))
        result = run_prepared(world.prepared, run_dir, executor=executor, runtime="mqtt", on_event=hook)
    return result, executor, "\n".join(lines)


def _run_with_nodes(
    world: World, nodes: Nodes, broker: RunningBroker, run_dir: Path, on_event: OnEvent | None = None, *, logins: bool = False
) -> tuple[RunResult, MqttExecutor, str]:
    """A `collective node` process for each node, then the coordinator; every node must end cleanly.
    `logins`: each party logs in as itself (a broker with ACLs), else anonymously."""
    for node_id in NODES:
        nodes.start(broker.url(node_id) if logins else broker.url(), run_dir.name, node_id)
    outcome = _run(world, broker.url("coordinator") if logins else broker.url(), run_dir, on_event)
    assert nodes.wait_all() == dict.fromkeys(NODES, 0)
    return outcome


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)


def _assert_same_evaluation(expected: Report, found: Report, rows: set[tuple[str, str | None]] | None = None) -> None:
    assert [(r.row, r.node_id) for r in found.rows] == [(r.row, r.node_id) for r in expected.rows]
    for want, got in zip(expected.rows, found.rows):
        if rows is not None and (want.row, want.node_id) not in rows:
            continue
        assert want.n_tokens == got.n_tokens
        for name in ("nll", "bits_per_byte", "top1"):
            assert _close(getattr(want, name), getattr(got, name)), (want.row, want.node_id, name)
        assert _close(want.nll_ci.low, got.nll_ci.low) and _close(want.nll_ci.high, got.nll_ci.high)
    if rows is None:
        for gain in ("collective_gain", "communication_gain"):
            assert _close(getattr(expected, gain).value, getattr(found, gain).value)
        assert found.verdict.split("(")[0] == expected.verdict.split("(")[0]


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- equivalence


def test_a_distributed_run_with_logins_and_acls_gives_the_embedded_evaluation_and_messages(world, nodes, tmp_path):
    users = users_for(world.prepared.scenario)
    run_dir = tmp_path / "run-equal"
    with running_broker(tmp_path / "broker", users=users) as broker:
        result, executor, console = _run_with_nodes(world, nodes, broker, run_dir, logins=True)
    assert result.report is not None and result.report.runtime == "mqtt"
    _assert_same_evaluation(world.embedded, result.report)
    assert _messages(run_dir) == world.embedded_messages
    assert result.report.missed_rounds == {}  # the report lists nodes that missed any
    assert executor.rejections.total == 0 and not any(executor.node_rejections().values())
    assert "all 3 nodes joined" in console and "missing:" in console
    assert "the coordinator ended the run: complete" in nodes.output("a")


# ---------------------------------------------------------------------------- faults


def test_a_node_killed_mid_run_misses_its_rounds_and_rejoins_at_the_next(world, nodes, tmp_path):
    run_dir = tmp_path / "run-kill"
    with running_broker(tmp_path / "broker") as broker:

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index == 1:
                nodes.restart(broker.url(), run_dir.name, "c")
            if event.round_index == 2:
                _wait_until(lambda: "c" not in executor.missing(), 60, "node c to rejoin")

        result, executor, _ = _run_with_nodes(world, nodes, broker, run_dir, on_event)  # the restarted c among them
    report = result.report
    assert result.status == "complete" and report is not None
    assert report.missed_rounds == {"c": 1}
    events = [parse_event(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    missed = [(e.round_index, n.node_id) for e in events if isinstance(e, RoundEvent) for n in e.nodes if n.missed]
    assert missed == [(2, "c")]
    # nothing else is lost: the rows that do not depend on messages are the embedded ones
    kept = {(kind, node) for kind in ("member_plain", "member_isolated") for node in ("a", "b")} | {("reference", None)}
    _assert_same_evaluation(world.embedded, report, rows=kept)
    assert report.row("member_plain", "c").n_tokens == world.embedded.row("member_plain", "c").n_tokens - 16


def test_a_restarted_node_is_taken_back_at_the_next_round_after_its_join_and_serves_every_round_left(world, nodes, tmp_path):
    run_dir = tmp_path / "run-rejoin"
    restarted = tmp_path / "node-c-4.log"  # the log of c's second process (a, b, c were started 1 to 3)
    with running_broker(tmp_path / "broker") as broker:

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index == 1:
                assert nodes.restart(broker.url(), run_dir.name, "c") == restarted
            elif event.round_index == 2:  # from now on it hears b's messages, while it loads its model
                _wait_until(lambda: restarted.exists() and "loading" in restarted.read_text(), 60, "node c to get the scenario")
            elif event.round_index in (3, 4) and "c" in executor.missing():
                time.sleep(0.3)  # rounds go on while it loads: its join lands mid-run
            elif event.round_index == 5:  # at the latest: rounds 6, 7 and 8 are left
                _wait_until(lambda: "c" not in executor.missing(), 60, "node c to rejoin")

        result, executor, _ = _run_with_nodes(world, nodes, broker, run_dir, on_event)
    report = result.report
    assert result.status == "complete" and report is not None
    events = [parse_event(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    served = [e.round_index for e in rounds if e.round_index > 1 and not next(n for n in e.nodes if n.node_id == "c").missed]
    back = served[0]  # the first round after its join: every round from then on is served
    assert 2 <= back <= 6 and served == list(range(back, len(rounds)))
    output = restarted.read_text()
    assert f"taken back at round {back}" in output and f"done: {len(rounds) - back} rounds served" in output
    assert report.missed_rounds == ({"c": back - 2} if back > 2 else {})
    assert report.row("member_plain", "c").n_tokens == world.embedded.row("member_plain", "c").n_tokens - 16 * (back - 2)
    # what was sent to c before its join is an expected loss: no warning, no drop, nothing missing
    assert executor.node_rejections()["c"] == {} and executor.roster.nodes["c"].missing_messages == 0
    assert "dropped an envelope" not in output and "never arrived" not in output
    assert executor.rejections.total == 0


def test_the_run_survives_a_broker_restart_with_the_same_numbers(world, nodes, tmp_path):
    run_dir = tmp_path / "run-restart"
    with running_broker(tmp_path / "broker") as broker:

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index == 2:
                broker.restart()

        result, executor, _ = _run_with_nodes(world, nodes, broker, run_dir, on_event)
    assert result.report is not None and result.report.missed_rounds == {}
    _assert_same_evaluation(world.embedded, result.report)
    assert _messages(run_dir) == world.embedded_messages


def test_ctrl_c_on_the_coordinator_tells_the_nodes_that_the_run_ended(world, nodes, tmp_path):
    run_dir = tmp_path / "run-interrupted"
    with running_broker(tmp_path / "broker") as broker:

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            _run_with_nodes(world, nodes, broker, run_dir, on_event)
        assert nodes.wait_all() == dict.fromkeys(NODES, 0)
    assert (run_dir / "INCOMPLETE").exists()
    assert "the coordinator ended the run: interrupted: Ctrl-C on the coordinator" in nodes.output("b")


# ---------------------------------------------------------------------------- watching


class Watching:
    """A `subscribe_events` iterator drained by a thread into `records`."""

    def __init__(self, url: str, run_id: str, start_timeout: float = 120.0) -> None:
        from collective.distributed import subscribe_events

        self.records: list = []
        self.error: BaseException | None = None
        self.events = subscribe_events(url, run_id, start_timeout=start_timeout)  # connected and subscribed on return
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        try:
            for record in self.events:
                self.records.append(record)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 30.0) -> list[str]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the watcher did not stop: {len(self.records)} records so far"
        assert self.error is None, self.error
        return [record.model_dump_json() for record in self.records]


def test_a_watcher_sees_the_start_every_round_in_order_and_the_end_as_events_jsonl_has_them(world, nodes, tmp_path):
    users = users_for(world.prepared.scenario)
    with running_broker(tmp_path / "broker", users=users) as broker:
        run_dir = tmp_path / "run-watched"
        early = Watching(broker.url("watcher"), run_dir.name)  # before the coordinator: it waits for the run
        late: list[Watching] = []

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index == 2:  # a second watcher attaches mid-run, with the coordinator's login
                late.append(Watching(broker.url("coordinator"), run_dir.name, start_timeout=10))

        result, executor, _ = _run_with_nodes(world, nodes, broker, run_dir, on_event, logins=True)
        lines = (run_dir / "events.jsonl").read_text().splitlines()
        assert early.join() == lines
        # mid-run: the retained start, then the rounds from where it attached (round 2 or 3), then the end
        seen = late[0].join()
        assert seen[0] == lines[0] and seen[-1] == lines[-1] and seen[1:-1] in (lines[3:-1], lines[4:-1])
        # after the run: the retained start and end
        after = Watching(broker.url("watcher"), run_dir.name, start_timeout=10)
        assert after.join() == [lines[0], lines[-1]]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            from collective.cli import main

            assert main(["watch", "--broker", broker.url("watcher"), "--run", run_dir.name, "--no-live"]) == 0
        assert f"watching run {run_dir.name} on mqtt://watcher@127.0.0.1" in out.getvalue()
        assert f"end complete rounds={len(lines) - 2}" in out.getvalue()
    assert result.status == "complete" and len(lines) == 2 + world.prepared.scenario.evaluation.warmup_rounds + world.prepared.scenario.eval_rounds
    assert executor.rejections.total == 0


def test_watch_broker_of_a_run_that_is_not_there_exits_2_within_its_timeout(tmp_path, capsys):
    from collective.cli import main
    from collective.records import RunEnd

    users = {"coordinator": "c-pass", "a": "a-pass", "watcher": "w-pass"}
    with running_broker(tmp_path / "broker", users=users) as broker:

        async def forge() -> None:  # the watcher login cannot write run records
            record = RunEnd(run_id="nope", status="complete", rounds_done=1)
            raw = encode(envelope("nope", "coordinator", EventPayload(record=record)))
            async with aiomqtt.Client(broker.host, broker.port, username="watcher", password="w-pass") as forger:
                await forger.publish(Topics("nope").event("end"), raw, qos=1, retain=True)

        asyncio.run(forge())
        began = time.monotonic()
        code = main(["watch", "--broker", broker.url("watcher"), "--run", "nope", "--idle-timeout", "1", "--no-live"])
        took = time.monotonic() - began
        captured = capsys.readouterr()
        err = " ".join(captured.err.split())  # errors go to stderr, results to stdout
        assert code == 2 and took < 10, err
        assert "no run 'nope' is live on the broker at mqtt://watcher@127.0.0.1" in err and "within 1 s" in err
        assert "no run 'nope'" not in captured.out
        # a wrong password: refused at the login, with what to do
        code = main(["watch", "--broker", broker.url("watcher", "wrong"), "--run", "nope", "--no-live"])
        out = " ".join(capsys.readouterr().err.split())
        assert code == 2 and "step 'authentication'" in out and "refused the login of user 'watcher'" in out
        # a node's login may not read the run records
        code = main(["watch", "--broker", broker.url("a"), "--run", "nope", "--idle-timeout", "1", "--no-live"])
        out = " ".join(capsys.readouterr().err.split())
        assert code == 2 and ("may not read" in out or "refused to let user 'a' read" in out), out


# ---------------------------------------------------------------------------- hostile envelopes


def _fake_result(vocab_size: int) -> ResultPayload:
    zeros = TokenPredictions(torch.zeros(1, 16), torch.zeros(1, 16, 16, dtype=torch.long), torch.zeros(1, 16, 16), vocab_size)
    wire = PredictionsWire.from_predictions(zeros)
    return ResultPayload(session="forged", collective=wire, isolated=wire, plain=wire, message_text=None, inbox_tokens=0, messages=[])


async def _inject(url: str, run_id: str, round_index: int, tokenizer, vocab_size: int) -> None:
    topics = Topics(run_id)

    def message(sender: str, text: str, round_sent: int) -> MessagePayload:
        return MessagePayload(
            record=MessageRecord(
                sender=sender, receiver="b", round_sent=round_sent, deliver_round=round_sent + 1, text=text,
                n_tokens=len(tokenizer.encode(text, add_special_tokens=False)), n_bytes=len(text.encode()),
            )
        )

    join = JoinPayload(session="x", model="tiny", vocab_size=vocab_size, tokenizer_digest="0" * 24, device="cpu")
    now = round_index
    junk = [
        # at node b (its in-neighbour is a)
        (topics.message("a", "b"), b"{not json"),  # malformed
        (topics.message("a", "b"), b"x" * 100_000),  # oversized
        (topics.message("a", "b"), encode(envelope(run_id, "c", message("c", "hi", now)))),  # spoofed: c on a's topic
        (topics.message("a", "b"), encode(envelope("other-run", "a", message("a", "hi", now)))),  # wrong run
        (topics.message("c", "b"), encode(envelope(run_id, "c", message("c", "hi", now)))),  # c -> b is no link
        (topics.message("a", "b"), encode(envelope(run_id, "a", message("a", "word " * 60, now)))),  # over budget
        (topics.message("a", "b"), encode(envelope(run_id, "a", message("a", "hi", now + 50)))),  # wrong round
        (topics.message("a", "b"), encode(envelope(run_id, "a", message("a", "forged", now)))),  # never booked
        # at the coordinator
        (topics.result("a"), b"\xff\xfe"),  # malformed
        (topics.status("a"), b"y" * 100_000),  # oversized
        (topics.status("a"), encode(envelope(run_id, "b", join))),  # spoofed: b on a's topic
        (topics.status("a"), encode(envelope("other-run", "a", join))),  # wrong run
        (topics.status("zz"), encode(envelope(run_id, "zz", join))),  # unknown node
        (topics.result("a"), encode(envelope(run_id, "a", _fake_result(vocab_size), 999))),  # wrong round
    ]
    address = parse_broker_url(url)
    async with aiomqtt.Client(address.host, address.port) as client:
        for topic, payload in junk:
            await client.publish(topic, payload, qos=1)


def test_malformed_oversized_spoofed_and_wrong_run_envelopes_are_dropped_counted_and_change_nothing(world, nodes, tmp_path):
    tokenizer = world.prepared.tokenizer
    vocab_size = world.prepared.models["tiny"].vocab_size
    run_dir = tmp_path / "run-hostile"
    with running_broker(tmp_path / "broker") as broker:  # no ACL: the runtime's own checks are on trial

        def on_event(executor: MqttExecutor, event: RoundEvent) -> None:
            if event.round_index == 1:
                asyncio.run(_inject(broker.url(), run_dir.name, 1, tokenizer, vocab_size))

        result, executor, console = _run_with_nodes(world, nodes, broker, run_dir, on_event)
    assert result.report is not None
    _assert_same_evaluation(world.embedded, result.report)
    assert _messages(run_dir) == world.embedded_messages
    assert executor.rejections.as_dict() == {
        "malformed": 1, "oversized": 1, "spoofed": 1, "unknown_node": 1, "wrong_round": 1, "wrong_run": 1,
    }
    assert executor.node_rejections() == {
        "a": {},
        "b": {
            "malformed": 1, "not_neighbour": 1, "over_budget": 1, "oversized": 1, "spoofed": 1,
            "unconfirmed": 1, "wrong_round": 1, "wrong_run": 1,
        },
        "c": {},
    }
    assert "dropped envelopes" in console
    assert result.report.rejected_envelopes == {
        "coordinator": executor.rejections.as_dict(), "b": executor.node_rejections()["b"]
    }
    report_md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "dropped envelopes (invalid, spoofed, oversized ...): coordinator 6 (malformed 1" in report_md


# ---------------------------------------------------------------------------- authentication


def test_a_node_with_a_wrong_password_is_refused_with_a_clear_message(world, tmp_path):
    users = users_for(world.prepared.scenario)
    with running_broker(tmp_path / "broker", users=users) as broker:
        command = [sys.executable, "-m", "collective.cli", "node", "--broker", broker.url("a", "not-the-password")]
        done = subprocess.run(command + ["--run", "r1", "--node", "a"], cwd=REPO, capture_output=True, text=True, timeout=60)
        output = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == 2, output
        assert "preflight failed at step 'authentication'" in output
        assert "refused the login of user 'a'" in output and "password" in output
        assert "not-the-password" not in output
        # the right password passes every step; the ACL keeps a node out of another's topics
        steps = asyncio.run(preflight(parse_broker_url(broker.url("a")), Topics("r1").echo("a"), timeout=5))
        assert [s.status for s in steps] == ["ok", "ok", "skipped", "ok", "ok"]
        with pytest.raises(PreflightFailed) as caught:
            asyncio.run(preflight(parse_broker_url(broker.url("a")), Topics("r1").echo("b"), timeout=1))
        assert caught.value.steps[-1].name == "publish/subscribe echo" and "ACL" in str(caught.value)


def test_a_node_cannot_read_another_nodes_requests_through_the_acl(world, tmp_path):
    users = users_for(world.prepared.scenario)
    with running_broker(tmp_path / "broker", users=users) as broker:

        async def eavesdrop() -> list[str]:
            topics = Topics("r1")
            heard: list[str] = []
            async with aiomqtt.Client(broker.host, broker.port, username="a", password=users["a"]) as spy, aiomqtt.Client(
                broker.host, broker.port, username="coordinator", password=users["coordinator"]
            ) as coordinator:
                await spy.subscribe(topics.to_node("b"), qos=1)  # b's view: refused by the broker
                await spy.subscribe(topics.to_node("a"), qos=1)
                await coordinator.publish(topics.to_node("b"), b"b's view", qos=1)
                await coordinator.publish(topics.to_node("a"), b"a's view", qos=1)
                with contextlib.suppress(asyncio.TimeoutError):
                    async with asyncio.timeout(1.0):
                        async for message in spy.messages:
                            heard.append(str(message.topic))
            return heard

        assert asyncio.run(eavesdrop()) == [Topics("r1").to_node("a")]


def _self_signed(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed (openssl CLI)."""
    folder.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf")
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_a_tls_broker_passes_preflight_with_its_ca_and_an_untrusted_one_is_named(tmp_path):
    ca, cert, key = _self_signed(tmp_path / "certs")
    with running_broker(tmp_path / "broker", tls=TlsFiles(cert, key)) as broker:
        trusted = parse_broker_url(f"mqtts://127.0.0.1:{broker.port}?ca={ca}")
        steps = asyncio.run(preflight(trusted, Topics("r1").echo("a"), timeout=5))
        assert [s.status for s in steps] == ["ok"] * 5 and "certificate trusted" in steps[2].detail
        with pytest.raises(PreflightFailed) as caught:
            asyncio.run(preflight(parse_broker_url(f"mqtts://127.0.0.1:{broker.port}"), Topics("r1").echo("a"), timeout=5))
        assert caught.value.steps[-1].name == "TLS" and "not trusted" in str(caught.value) and "?ca=" in str(caught.value)


def test_a_second_process_for_a_node_and_a_foreign_tokenizer_are_refused_with_reasons(world, tmp_path):
    topics = Topics("r-join")
    digest = tokenizer_digest(world.prepared.tokenizer)
    vocab_size = world.prepared.models["tiny"].vocab_size

    def join(session: str, node_digest: str) -> JoinPayload:
        return JoinPayload(session=session, model="tiny", vocab_size=vocab_size, tokenizer_digest=node_digest, device="cpu", host="h1")

    async def volunteer_side(url: str) -> list[Envelope]:
        address = parse_broker_url(url)
        replies: list[Envelope] = []
        async with aiomqtt.Client(address.host, address.port) as client:
            await client.subscribe(f"{topics.root}/coord/to/+", qos=1)
            await client.publish(topics.status("a"), encode(envelope("r-join", "a", join("s1", digest))), qos=1)
            await client.publish(topics.status("a"), encode(envelope("r-join", "a", join("s2", digest))), qos=1)
            await client.publish(topics.status("b"), encode(envelope("r-join", "b", join("s3", "0" * 24))), qos=1)
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(1.5):
                    async for message in client.messages:
                        replies.append(decode_envelope(message.payload, 1 << 16))  # type: ignore[arg-type]
        return replies

    with running_broker(tmp_path / "broker") as broker:
        executor = MqttExecutor(world.prepared, parse_broker_url(broker.url()), run_id="r-join")
        executor.start()
        try:
            replies = asyncio.run(volunteer_side(broker.url()))
            assert executor.missing() == ["b", "c"]
        finally:
            executor.close("complete")
    kinds = {(type(r.payload).__name__, r.payload.session) for r in replies}  # type: ignore[union-attr]
    assert kinds == {("WelcomePayload", "s1"), ("RefusePayload", "s2"), ("RefusePayload", "s3")}
    reasons = {r.payload.session: r.payload.reason for r in replies if isinstance(r.payload, RefusePayload)}
    assert "already served by another process" in reasons["s2"] and "tokenizer" in reasons["s3"]
    assert executor.rejections.as_dict() == {"refused": 2}
    assert not any(isinstance(r.payload, WelcomePayload) and r.payload.session != "s1" for r in replies)
