"""The volunteer: one node of a distributed run, in its own process on any machine.

    preflight (DNS, TCP, TLS, login, echo) -> connect with a last will (leave)
    -> read the run's retained scenario -> load the node's model -> join
    -> for each request: read the booked messages into the inbox (`Mailbox`); screen the
       messages it reads this round with the node's firewall (fitted by the coordinator,
       sent in the request), render what passes, score and speak: all in `compute_rounds`,
       the function the embedded runtime calls; publish the messages to the out-neighbours'
       topics and the result (with the firewall's screen records) to the coordinator
    -> until `control: ended`

A process that joins a run under way (a restarted node) is asked from the coordinator's
next round on; what was sent to its node before that is not read (see `Mailbox`).
The connection is a `Connection` (it reconnects, and says leave before a clean
disconnect). The model runs in a worker thread, so the connection keeps answering the
broker while a round is computed. What a person should see goes to `report`, one line
an event. Where the model comes from and where a round is computed is its `NodeBackend`
(`backend`): `SoloBackend` (its own copy, its one request), or a host's shared models and
batched rounds in `host` (one process serving several nodes), where a node has no connection of
its own (`link`: the host's) and hands its round's messages and result to the host (`sink`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiomqtt

from collective.distributed.backend import NodeBackend, NodeModel, SoloBackend, published_scenario
from collective.distributed.connection import Connection
from collective.distributed.limits import message_bytes_bound, node_request_bound
from collective.distributed.mailbox import Mailbox
from collective.distributed.mqtt import BrokerAddress, DistributedError
from collective.distributed.payloads import (
    ControlPayload,
    JoinPayload,
    LeavePayload,
    MessagePayload,
    Payload,
    RefusePayload,
    RequestPayload,
    ResultPayload,
    ScenarioPayload,
    WelcomePayload,
)
from collective.distributed.preflight import preflight
from collective.distributed.protocol import (
    Envelope,
    Rejected,
    Rejections,
    TopicInfo,
    Topics,
    encode,
    envelope,
    open_envelope,
)
from collective.lm.codec import TextCodec
from collective.run.bus import link_policies, outgoing_messages
from collective.scenario import Scenario

log = logging.getLogger(__name__)

SCENARIO_BYTES = 1 << 20
CONTROL_BYTES = 4_096


@dataclass(frozen=True)
class VolunteerConfig:
    address: BrokerAddress
    run_id: str
    node_id: str
    device: str | None = None  # overrides the scenario's device for this node's model
    model_ref: str | None = None  # overrides the scenario's model reference (a local copy)
    cache_dir: Path | None = None
    scenario_timeout_s: float = 600.0
    preflight_timeout_s: float = 10.0
    preflight: bool = True  # False: a host checks the broker once for all its nodes
    report_rounds: bool = True  # False: a host reports each round once for all its nodes
    via: str | None = None  # a host's node: the host whose topics serve it
    session: str | None = None  # a host's node: the host's session (its last will speaks for all its nodes)


class NodeLink(Protocol):
    """How a node talks to the broker: its own `Connection`, or its host's (`host.MemberLink`)."""

    async def run(self) -> None: ...
    def stop(self) -> None: ...
    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool: ...


Sent = list[tuple[str, bytes]]  # (topic, envelope) of a round's messages
ResultSink = Callable[[int, str, Sent, ResultPayload], Awaitable[None]]  # a host's node's round: to its host


class Volunteer:
    """Serves one node's rounds until the run ends; `report` gets one line per event."""

    def __init__(
        self, config: VolunteerConfig, report: Callable[[str], None] | None = None, backend: NodeBackend | None = None,
        link: NodeLink | None = None, sink: ResultSink | None = None,
    ) -> None:
        self.config = config
        self.backend = backend or SoloBackend(config.cache_dir)
        self.node_id = config.node_id
        self.run_id = config.run_id
        self.topics = Topics(config.run_id)
        self.session = config.session or uuid.uuid4().hex[:12]
        self.sink = sink
        self.report = report or (lambda line: None)
        self.rejections = Rejections(f"node {config.node_id}")
        self.rounds_served = 0
        self.scenario: Scenario | None = None
        self.published: ScenarioPayload | None = None  # the run as the coordinator published it
        self._request_limit = CONTROL_BYTES  # the largest request envelope, once the scenario is known
        self.out_neighbours: list[str] = []
        self.mailbox: Mailbox | None = None
        self.loaded: NodeModel | None = None
        self.coordinator_session: str | None = None
        self.welcomed = False
        self.ended: str | None = None
        self._request: tuple[int, RequestPayload] | None = None
        self._computing: int | None = None
        self._last_round = -1  # the last round served
        self._latest_round = -1  # the last round requested
        self._last_sent: tuple[int, Sent, ResultPayload] | None = None
        self._wake = asyncio.Event()
        self._failure: BaseException | None = None
        self._background: set[asyncio.Future[Any]] = set()
        if link is not None:
            self.connection: NodeLink = link
            return
        will = aiomqtt.Will(self.topics.status(self.node_id), self._leave("disconnected"), qos=1)
        self.connection = Connection(
            config.address, self.node_id, self.topics.node_subscriptions(self.node_id), self._handle,
            on_lost=lambda exc, interval: self.report(f"lost the broker ({exc}); reconnecting in {interval:.1f} s"),
            farewell=self._say_leave, will=will,
        )

    @property
    def missing_messages(self) -> int:
        return 0 if self.mailbox is None else self.mailbox.missing_messages

    # ------------------------------------------------------------------ main

    async def run(self) -> str:
        """Serve until the run ends; returns the coordinator's closing words."""
        if self.config.preflight:
            await preflight(
                self.config.address,
                self.topics.echo(self.node_id),
                timeout=self.config.preflight_timeout_s,
                report=lambda step: self.report(f"preflight {step.name}: {step.status} ({step.detail})"),
            )
        worker = asyncio.create_task(self._serve_rounds())
        watchdog = asyncio.create_task(self._scenario_watchdog())
        try:
            await self.connection.run()
        finally:
            worker.cancel()
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        if self._failure is not None:
            raise self._failure
        return self.ended or "ended"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._end(self.ended or "failed")

    def _end(self, detail: str) -> None:
        self.ended = detail
        self.connection.stop()

    def stop(self, detail: str) -> None:
        """End serving (saying leave) for a reason of the process's, such as a host's other node failing."""
        self._end(self.ended or detail)

    async def _scenario_watchdog(self) -> None:
        await asyncio.sleep(self.config.scenario_timeout_s)
        if self.scenario is None and self.ended is None:
            self._fail(
                DistributedError(
                    f"no run {self.run_id!r} on {self.config.address.display()} after {self.config.scenario_timeout_s:g} s: "
                    "start the coordinator first (`collective run SCENARIO --bus URL --out runs/"
                    f"{self.run_id}`), and check that the run id matches its run folder's name"
                )
            )

    def _wire(self, payload: Payload, round_index: int = -1) -> bytes:
        return encode(envelope(self.run_id, self.node_id, payload, round_index))

    def _leave(self, reason: str) -> bytes:
        return self._wire(LeavePayload(session=self.session, reason=reason))

    async def _say_leave(self, interrupted: bool) -> None:
        """The last words before a clean disconnect (the broker publishes the will otherwise)."""
        if interrupted:
            reason = "stopped by its operator (Ctrl-C)"
        else:
            reason = f"the run ended ({self.ended})" if self._failure is None else f"failed: {self._failure}"
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.publish(self.topics.status(self.node_id), self._leave(reason)), 2.0)

    # ------------------------------------------------------------------ incoming

    def _limit(self, channel: str) -> int:
        """The largest envelope this node takes on a topic of `channel`."""
        scenario = self.scenario
        if channel == "msg":
            policies = [] if self.mailbox is None else list(self.mailbox.policies.values())
            return message_bytes_bound(max([p.max_message_bytes for p in policies] + [1]))
        if channel == "to" and scenario is not None:
            return self._request_limit
        return SCENARIO_BYTES if channel == "scenario" else CONTROL_BYTES

    async def _handle(self, topic: str, raw: bytes) -> None:
        info = self.topics.parse(topic)
        if info is None or info.channel == "echo":
            return
        with self.rejections.dropping(topic):
            try:
                env = open_envelope(raw, self._limit(info.channel), run_id=self.run_id, sender=info.owner)
            except Rejected as rejected:
                self.fail_on_mismatch(rejected, info.channel)
                raise
            await self.dispatch(info, env)

    def fail_on_mismatch(self, rejected: Rejected, channel: str) -> None:
        """The run's scenario or control in another protocol: this node cannot serve the run
        (a host checks once for all its nodes)."""
        if rejected.reason == "wrong_schema" and channel in ("scenario", "control"):
            self._fail(DistributedError(f"run {self.run_id}'s coordinator speaks another protocol: {rejected.detail}"))

    async def dispatch(self, info: TopicInfo, env: Envelope) -> None:
        """An envelope that passed `open_envelope`, to what its topic and kind ask (a host
        opens the run's envelopes once and hands them to each of its nodes here)."""
        if info.channel == "msg":
            self._on_message(info.owner, env)
        elif info.channel == "scenario" and isinstance(env.payload, ScenarioPayload):
            await self._on_scenario(env.payload)
        elif info.channel == "control" and isinstance(env.payload, ControlPayload):
            await self._on_control(env.payload)
        elif info.channel == "to" and info.target in (self.node_id, self.config.via):
            await self._on_direct(env)
        else:
            raise Rejected("unexpected", f"a {env.kind!r} envelope on a {info.channel} topic")

    async def _on_scenario(self, payload: ScenarioPayload) -> None:
        if self.scenario is not None or self.ended is not None:
            return
        scenario, request_limit = published_scenario(payload.scenario_yaml, self.run_id)
        if self.node_id not in scenario.node_ids:
            self._fail(
                DistributedError(
                    f"run {self.run_id} has no node {self.node_id!r}; its nodes are {', '.join(scenario.node_ids)}"
                )
            )
            return
        if payload.unit == "byte":  # a node's tokens of a span are at most its bytes
            request_limit = node_request_bound(scenario, view_bytes=payload.view_bytes_max, round_bytes=payload.round_bytes_max)
        self.scenario, self._request_limit, self.published = scenario, request_limit, payload
        spec = scenario.models[scenario.node(self.node_id).model]
        ref = self.config.model_ref or spec.ref
        device = self.config.device or spec.device
        self.report(f"run {self.run_id}: scenario {scenario.name!r}; loading {ref} ({spec.dtype}, {device}) ...")
        try:
            self.loaded = await self.backend.load(ref, device, spec.dtype)
        except Exception as exc:  # ModelLoadError and friends: the message is for the user
            self._fail(DistributedError(f"node {self.node_id} cannot load its model {ref!r}: {exc}"))
            return
        in_neighbours = list(payload.in_neighbours.get(self.node_id, []))
        self.out_neighbours = list(payload.out_neighbours.get(self.node_id, []))
        edges = [(s, self.node_id) for s in in_neighbours] + [(self.node_id, r) for r in self.out_neighbours]
        policies = link_policies(scenario.bus, edges)
        # a link's token budget counts the sender's tokens: this node counts them itself only for
        # senders of its own tokenizer; the others' the coordinator counts (it books what we read)
        digests = payload.tokenizer_digests
        foreign: dict[str, TextCodec | None] = {s: None for s in in_neighbours if digests.get(scenario.node(s).model) != self.loaded.digest}
        self.mailbox = Mailbox(
            self.node_id, scenario, in_neighbours, policies, self.loaded.tokenizer, self.rejections, self.topics, foreign
        )
        if self.loaded.vocab_size and self.loaded.digest != digests.get(scenario.node(self.node_id).model):
            self.report("warning: this tokenizer differs from the one the coordinator loaded for this node's model; the coordinator decides")
        self.report(f"loaded {self.loaded.name} on {self.loaded.device}")
        await self._join()

    async def _on_control(self, control: ControlPayload) -> None:
        if control.state == "ended":
            self.report(f"the coordinator ended the run: {control.detail or 'ended'}")
            self._end(control.detail or "ended")
            return
        # the coordinator publishes `open` whenever it (re)connects, and the broker hands the
        # retained copy to us whenever we (re)subscribe: either way, (re)join. After a broker
        # restart the coordinator then sends again a request we may have lost (see _on_request).
        self.coordinator_session = control.session
        await self._join()

    async def _join(self) -> None:
        if self.loaded is None or self.coordinator_session is None:
            return
        join = JoinPayload(
            session=self.session,
            model=self.loaded.name,
            vocab_size=self.loaded.vocab_size,
            tokenizer_digest=self.loaded.digest,
            device=self.loaded.device,
            host=platform.node(),
            via=self.config.via,
        )
        await self.connection.publish(self.topics.status(self.node_id), self._wire(join))

    async def _on_direct(self, env: Envelope) -> None:
        payload = env.payload
        if isinstance(payload, WelcomePayload):
            if payload.session == self.session and payload.node_id in (None, self.node_id) and not self.welcomed:
                self.welcomed = True
                self.report(f"joined run {self.run_id} as node {self.node_id}")
        elif isinstance(payload, RefusePayload):
            if payload.session == self.session and payload.node_id in (None, self.node_id):
                self.ended = "refused"
                self._fail(DistributedError(f"the coordinator refused node {self.node_id}: {payload.reason}"))
        elif isinstance(payload, RequestPayload):
            self._on_request(env.round_index, payload)
        else:
            raise Rejected("unexpected", f"a {env.kind!r} envelope on this node's request topic")

    def _on_request(self, round_index: int, request: RequestPayload) -> None:
        scenario, loaded, mailbox = self.scenario, self.loaded, self.mailbox
        if scenario is None or loaded is None or mailbox is None:
            raise Rejected("unexpected", "a request before this node loaded its model")
        if request.node_id != self.node_id:
            raise Rejected("spoofed", f"a request for node {request.node_id!r} on {self.node_id!r}'s topic")
        if round_index == self._last_round or round_index == self._computing:
            # the coordinator sent it again after a reconnect: answer again if done
            if round_index == self._last_round and self._last_sent is not None and self._last_sent[0] == round_index:
                self._spawn(self._send(*self._last_sent))
            return
        if round_index < self._last_round:
            raise Rejected("wrong_round", f"a request for round {round_index} after round {self._last_round}")
        problem = self._round_problem(request)
        if problem is not None:
            raise Rejected("malformed", problem)
        if request.ids_out_of_range(loaded.vocab_size):
            raise Rejected("malformed", "token ids outside the model's vocabulary")
        firewall_problem = request.firewall_problem(scenario.node(self.node_id).firewall)
        if firewall_problem is not None:
            raise Rejected("malformed", f"a request whose firewall is not the run's: {firewall_problem}")
        self._latest_round = max(self._latest_round, round_index)
        mailbox.due.extend(request.inbox)
        self._request = (round_index, request)
        self._wake.set()

    def _round_problem(self, request: RequestPayload) -> str | None:
        """Why the request's round is not one of this run's, or None: R stream tokens, or in a
        byte-unit run at most the run's longest round in bytes, read in at most as many tokens."""
        assert self.scenario is not None
        data, published = request.round_data(), self.published
        if published is None or published.unit == "token":
            round_tokens = self.scenario.bus.round_tokens
            if data is not None:
                return "a round in bytes in a run scored in tokens"
            if len(request.round_inputs) != round_tokens or len(request.targets) != round_tokens:
                return f"a round of {len(request.round_inputs)} tokens, the run's rounds have {round_tokens}"
            return None
        if data is None or not 1 <= len(data) <= published.round_bytes_max:
            return f"a round of {'no' if data is None else len(data)} bytes, the run's rounds have 1 to {published.round_bytes_max}"
        if request.round_inputs != request.targets or not 1 <= len(request.round_inputs) <= len(data):
            return f"a reading of a {len(data)}-byte round in {len(request.round_inputs)} tokens, targets {len(request.targets)}"
        return None

    def _on_message(self, sender: str, env: Envelope) -> None:
        if not isinstance(env.payload, MessagePayload):
            raise Rejected("unexpected", f"a {env.kind!r} envelope on a message topic")
        if self.mailbox is None:
            raise Rejected("unexpected", "a message before this node knows its scenario")
        self.mailbox.hold(sender, env.payload.record, self._latest_round)

    # ------------------------------------------------------------------ rounds

    async def _send(self, round_index: int, sent: Sent, reply: ResultPayload) -> None:
        """The round's messages, then its result: in this node's own envelope, or handed to its host."""
        if self.sink is not None:
            await self.sink(round_index, self.node_id, sent, reply)
            return
        every = [*sent, (self.topics.result(self.node_id), self._wire(reply, round_index))]
        # gather keeps the order: each publish hands its packet to the client before it awaits
        await asyncio.gather(*(self.connection.publish(topic, data) for topic, data in every))

    async def _serve_rounds(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._request is None:
                continue
            round_index, request = self._request
            self._request = None
            try:
                await self._serve(round_index, request)
            except Exception as exc:  # a bug or a device error: stop the node with the reason
                log.exception("node %s failed in round %d", self.node_id, round_index)
                self._fail(DistributedError(f"node {self.node_id} failed in round {round_index}: {exc!r}"))
                return

    async def _serve(self, round_index: int, payload: RequestPayload) -> None:
        scenario, loaded, mailbox = self.scenario, self.loaded, self.mailbox
        assert scenario is not None and loaded is not None and mailbox is not None
        began = time.perf_counter()
        self._computing = round_index
        await mailbox.read_booked(round_index, grace_s=min(2.0, payload.deadline_s / 4))
        # what the node reads this round, screened by its firewall inside compute_rounds
        request = payload.to_request(round_index, mailbox.inbox.visible(round_index), scenario.bus)
        result = await self.backend.compute(self.node_id, loaded, request, scenario.evaluation)
        if result.message_text is not None:
            result.messages = outgoing_messages(
                self.node_id, result.message_text, round_index, self.out_neighbours, mailbox.policies, loaded.tokenizer, scenario.seed
            )
        compute_s = time.perf_counter() - began
        # messages first: the broker forwards them before the result, and so before the
        # coordinator's next request reaches their receivers (a dropped message never travels)
        sent = [
            (self.topics.message(self.node_id, record.receiver), self._wire(MessagePayload(record=record), round_index))
            for record in result.messages
            if not record.dropped
        ]
        reply = ResultPayload.from_result(
            result, self.session, compute_s, self.rejections.as_dict(), mailbox.missing_messages, in_bytes=request.round_bytes is not None
        )
        self._last_sent = (round_index, sent, reply)
        self._last_round, self._computing = round_index, None
        await self._send(round_index, sent, reply)
        self.rounds_served += 1
        if self.rounds_served == 1 and round_index > 0:  # taken back mid-run (a restart, a late process)
            unread = f"; {mailbox.expected_unread} message(s) sent to it before are not read" if mailbox.expected_unread else ""
            self.report(f"taken back at round {round_index}{unread}")
        log.info("node %s served round %d in %.2f s", self.node_id, round_index, compute_s)
        if self.config.report_rounds:
            self.report(f"round {round_index} served in {compute_s:.2f} s")
