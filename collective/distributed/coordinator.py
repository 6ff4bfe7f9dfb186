"""The coordinator: an `Executor` whose nodes are volunteer processes behind an MQTT broker.

The round engine stays synchronous and unchanged: it calls `run_round(r, requests)` and
gets each node's `NodeRoundResult`, or None for a node that missed the round. Behind
that call an asyncio loop in a background thread owns the MQTT connection:

    connect -> publish the scenario and `control: open` (retained) -> nodes join
    round r:  send each present node only its own request (its view, and the keys of the
              messages it must read this round) -> collect results until all present
              nodes answered, left, or the round's deadline passed -> book the messages
              the accepted results carry (receivers read exactly those next rounds)
    end:      `control: ended` (retained), also on Ctrl-C or an error

Every record the run writes to events.jsonl (start, each round, end) also goes to
`coord/events/` for read-only watchers (`publish_event`, called by the runner): queued and
published in order by a background task, so a slow or failed publish never holds up or
breaks a round; the start and end records are retained (and republished on reconnect).

A broker restart is survived by reconnecting with backoff; on reconnect the coordinator
republishes its retained state and the requests still unanswered. Every envelope that
reaches it is validated (run, round, sender, predictions, message budgets) and dropped
and counted when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from collective.distributed.broker import max_packet_size_for
from collective.distributed.mqtt import (
    BrokerAddress,
    DistributedError,
    client_id,
    make_client,
    parse_broker_url,
)
from collective.distributed.preflight import preflight
from collective.distributed.protocol import (
    COORDINATOR,
    ControlPayload,
    EventPayload,
    JoinPayload,
    LeavePayload,
    MessageKey,
    RefusePayload,
    Rejected,
    Rejections,
    RequestPayload,
    ResultPayload,
    ScenarioPayload,
    Topics,
    WelcomePayload,
    check_predictions,
    decode_envelope,
    encode,
    envelope,
    event_record_topic,
    message_bytes_bound,
    result_bytes_bound,
    text_digest,
    tokenizer_digest,
)
from collective.records import MessageRecord, RoundEvent, RunEnd, RunStart
from collective.run.bus import LinkPolicy, link_policies, outgoing_messages
from collective.run.node import NodeRoundRequest, NodeRoundResult
from collective.run.runner import Prepared

log = logging.getLogger(__name__)

FIRST_ROUND_DEADLINE_S = 600.0  # the first round includes every node's warm-up
MIN_ROUND_DEADLINE_S = 30.0
DEADLINE_PER_FIRST_ROUND = 10.0  # later rounds: this many times the first round's wall time
STATUS_BYTES = 4_096
MAX_BACKOFF_S = 10.0
REJOIN_GRACE_S = 10.0  # after a broker outage, how long the next round waits for the nodes to come back
WILLS_BEFORE_OUTAGE_S = 2.0  # a broker that shuts down first publishes every client's last will
EVENT_PATIENCE_S = 10.0  # how long a run record waits for the broker (through an outage) before it is skipped
EVENT_DRAIN_S = 5.0  # at the end, how long the records still queued get to reach the broker


@dataclass
class NodeState:
    node_id: str
    session: str | None = None
    present: bool = False
    host: str = ""
    device: str = ""
    rejected: dict[str, int] = field(default_factory=dict)
    missing_messages: int = 0
    left_at: float | None = None  # loop time of its last leave


@dataclass(frozen=True)
class NodeSnapshot:
    node_id: str
    present: bool
    host: str
    device: str


class MqttExecutor:
    """Runs each round's node part on volunteer machines (see the module docstring)."""

    def __init__(
        self,
        prepared: Prepared,
        address: BrokerAddress,
        *,
        run_id: str,
        round_deadline_s: float | None = None,
        first_round_deadline_s: float = FIRST_ROUND_DEADLINE_S,
        rejoin_timeout_s: float = 300.0,
    ) -> None:
        scenario = prepared.scenario
        self.prepared = prepared
        self.scenario = scenario
        self.address = address
        self.run_id = run_id
        self.topics = Topics(run_id)
        self.session = uuid.uuid4().hex[:12]
        self.round_deadline_s = round_deadline_s
        self.first_round_deadline_s = first_round_deadline_s
        self.rejoin_timeout_s = rejoin_timeout_s
        self.tokenizer: Any = prepared.tokenizer
        self.graph = prepared.graph
        self.in_neighbours = {n: list(self.graph.predecessors(n)) for n in scenario.node_ids}
        self.out_neighbours = {n: list(self.graph.successors(n)) for n in scenario.node_ids}
        self.policies: dict[tuple[str, str], LinkPolicy] = link_policies(scenario.bus, self.graph.edges())
        self.digests = {alias: tokenizer_digest(model.tokenizer) for alias, model in prepared.models.items()}
        self.vocab_sizes = {alias: model.vocab_size for alias, model in prepared.models.items()}
        max_links = max([len(v) for v in self.out_neighbours.values()] + [1])
        max_bytes = max([p.max_message_bytes for p in self.policies.values()] + [scenario.bus.max_message_bytes])
        self.result_limit = 2 * result_bytes_bound(scenario.bus.round_tokens, scenario.evaluation.top_k, max_bytes, max_links)
        self.message_limit = message_bytes_bound(max_bytes)
        self.rejections = Rejections("coordinator")
        self.nodes = {n: NodeState(n) for n in scenario.node_ids}
        self.first_round_wall_s: float | None = None
        self.round_wall_s: list[float] = []  # per round: requests out to the last result in
        self.round_compute_s: list[float] = []  # per round: the slowest node's own compute time
        # round state (loop thread only)
        self._round: int | None = None
        self._awaiting: set[str] = set()
        self._results: dict[str, NodeRoundResult] = {}
        self._compute_s: dict[str, float] = {}
        self._requests: dict[str, RequestPayload] = {}
        self._booked: dict[str, list[tuple[int, MessageKey]]] = {n: [] for n in scenario.node_ids}
        self._changed: asyncio.Event | None = None
        self._connected: asyncio.Event | None = None
        self._client: aiomqtt.Client | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._lost_at: float | None = None  # loop time the broker connection last broke
        self._expect_back: set[str] = set()
        self._expect_until = 0.0
        # run records for watchers (coord/events/): queued by publish_event, sent in order by one task
        self._event_queue: asyncio.Queue[tuple[str, bytes, bool]] | None = None
        self._retained_events: dict[str, bytes] = {}  # topic -> the start/end record, republished on reconnect
        self.event_limit = max_packet_size_for(scenario) - 1_024  # what a `collective broker` broker accepts

    # ------------------------------------------------------------------ sync API (main thread)

    def start(self, preflight_timeout: float = 10.0) -> None:
        """Check the broker step by step (raises PreflightFailed), then connect in the background."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="collective-mqtt", daemon=True)
        self._thread.start()
        self._call(preflight(self.address, self.topics.coordinator_echo, timeout=preflight_timeout))
        self._call(self._begin())
        self._call(self._wait_connected(preflight_timeout * 3))

    def snapshot(self) -> list[NodeSnapshot]:
        return self._call(self._snapshot())

    def missing(self) -> list[str]:
        return [node.node_id for node in self.snapshot() if not node.present]

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        return self._call(self._run_round(round_index, requests))

    def publish_event(self, record: RunStart | RoundEvent | RunEnd) -> None:
        """Queue one run record for coord/events/ (never blocks, never raises: watchers are optional)."""
        loop, queue = self._loop, self._event_queue
        if loop is None or queue is None or loop.is_closed():
            log.debug("not connected: the %s record is not published", record.kind)
            return
        try:
            kind, retain = event_record_topic(record)
            round_index = record.round_index if isinstance(record, RoundEvent) else -1
            payload = encode(envelope(self.run_id, COORDINATOR, EventPayload(record=record), round_index))
            loop.call_soon_threadsafe(queue.put_nowait, (self.topics.event(kind), payload, retain))
        except Exception as exc:  # a watcher's view is never worth a run
            log.warning("could not publish the run's %s record for watchers: %r", record.kind, exc)

    def close(self, status: str, detail: str = "") -> None:
        """Tell the nodes the run ended (retained), disconnect, stop the loop thread."""
        if self._loop is None:
            return
        self._closing = True
        try:  # the run's last records first (its end record among them), then `control: ended`
            asyncio.run_coroutine_threadsafe(self._drain_events(EVENT_DRAIN_S), self._loop).result(timeout=EVENT_DRAIN_S + 5)
        except Exception as exc:
            log.warning("could not publish the run's last records for watchers: %r", exc)
        try:
            asyncio.run_coroutine_threadsafe(self._end(status, detail), self._loop).result(timeout=10)
        except Exception as exc:  # the run is over either way; say so in the log
            log.warning("could not tell the nodes that the run ended: %r", exc)
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()
        self._loop = None

    def node_rejections(self) -> dict[str, dict[str, int]]:
        return {n: dict(state.rejected) for n, state in self.nodes.items()}

    def rejected_envelopes(self) -> dict[str, dict[str, int]]:
        """What the coordinator and each node dropped so far, by reason (for the report)."""
        dropped = {COORDINATOR: self.rejections.as_dict(), **self.node_rejections()}
        return {who: counts for who, counts in dropped.items() if counts}

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None, "start() the executor first"
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    # ------------------------------------------------------------------ connection (loop thread)

    async def _begin(self) -> None:
        self._changed = asyncio.Event()
        self._connected = asyncio.Event()
        self._event_queue = asyncio.Queue()
        self._main_task = asyncio.create_task(self._connection_loop())
        self._spawn(self._event_publisher())

    async def _shutdown(self) -> None:
        """Disconnect cleanly: cancel the connection loop and whatever it started, and wait."""
        tasks = [t for t in (self._main_task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        """Run `coro` in the background (a reference is kept until it is done)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _wait_connected(self, timeout: float) -> None:
        assert self._connected is not None
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            raise DistributedError(f"could not stay connected to the broker at {self.address.display()}") from None

    async def _snapshot(self) -> list[NodeSnapshot]:
        return [NodeSnapshot(s.node_id, s.present, s.host, s.device) for s in self.nodes.values()]

    async def _connection_loop(self) -> None:
        assert self._connected is not None
        backoff = 0.5
        while not self._closing:
            try:
                async with make_client(self.address, identifier=client_id("coordinator")) as client:
                    self._client = client
                    for topic in self.topics.coordinator_subscriptions():
                        await client.subscribe(topic, qos=1)
                    await self._publish_state(client)
                    if self._lost_at is not None:
                        self._expect_nodes_back()
                    self._connected.set()
                    backoff = 0.5
                    # requests still unanswered (a broker restart loses what was in flight)
                    for node_id in sorted(self._awaiting):
                        await self._send_request(node_id)
                    async for message in client.messages:
                        self._handle(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                self._client = None
                if self._connected.is_set():
                    self._lost_at = asyncio.get_running_loop().time()
                self._connected.clear()
                if self._closing:
                    return
                log.warning("lost the broker at %s (%s); reconnecting in %.1f s", self.address.display(), exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        self._client = None

    def _expect_nodes_back(self) -> None:
        """After an outage: the nodes present before it (their wills may have come from the
        broker shutting down, not from them) get REJOIN_GRACE_S to reconnect before a round."""
        assert self._lost_at is not None
        since = self._lost_at - WILLS_BEFORE_OUTAGE_S
        self._expect_back = {
            n for n, state in self.nodes.items() if state.present or (state.left_at is not None and state.left_at >= since)
        }
        self._expect_until = asyncio.get_running_loop().time() + REJOIN_GRACE_S

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        scenario = ScenarioPayload(
            scenario_yaml=self.scenario.resolved_yaml(),
            in_neighbours=self.in_neighbours,
            out_neighbours=self.out_neighbours,
            tokenizer_digest=next(iter(self.digests.values())),
            session=self.session,
        )
        await client.publish(self.topics.scenario, encode(envelope(self.run_id, COORDINATOR, scenario)), qos=1, retain=True)
        control = ControlPayload(state="open", session=self.session)
        await client.publish(self.topics.control, encode(envelope(self.run_id, COORDINATOR, control)), qos=1, retain=True)
        # the run's retained records: again after a broker restart; on the first connect an
        # empty payload clears what an earlier run under the same id left there
        for topic in (self.topics.event("start"), self.topics.event("end")):
            await client.publish(topic, self._retained_events.get(topic, b""), qos=1, retain=True)

    async def _publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            log.warning("could not publish to %s: %s (sent again after reconnecting)", topic, exc)
            return False
        return True

    # ------------------------------------------------------------------ run records (loop thread)

    async def _event_publisher(self) -> None:
        """Send the queued run records one after another (in order), each at most once."""
        assert self._event_queue is not None
        while True:
            topic, payload, retain = await self._event_queue.get()
            try:
                if len(payload) > self.event_limit:
                    log.warning(
                        "the run record for %s is %d bytes, over the %d a broker sized for this scenario takes: "
                        "watchers miss it", topic, len(payload), self.event_limit,
                    )
                    continue
                if retain:
                    self._retained_events[topic] = payload
                await self._publish_event_now(topic, payload, retain)
            except Exception as exc:  # never let one record stop the others
                log.warning("could not publish the run record for %s: %r", topic, exc)
            finally:
                self._event_queue.task_done()

    async def _publish_event_now(self, topic: str, payload: bytes, retain: bool) -> None:
        assert self._connected is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + EVENT_PATIENCE_S
        for _attempt in range(2):  # once more after a reconnect, no more (an oversized one would loop)
            left = give_up - loop.time()
            try:
                await asyncio.wait_for(self._connected.wait(), max(left, 0.0))
            except asyncio.TimeoutError:
                break
            client = self._client
            if client is None:
                await asyncio.sleep(0.1)
                continue
            try:
                await client.publish(topic, payload, qos=1, retain=retain)
                return
            except aiomqtt.MqttError as exc:
                log.debug("publishing to %s failed (%s); once more after reconnecting", topic, exc)
                await asyncio.sleep(0.1)
        log.warning("could not publish the run record for %s within %.0f s: watchers miss it", topic, EVENT_PATIENCE_S)

    async def _drain_events(self, timeout: float) -> None:
        if self._event_queue is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event_queue.join(), timeout)

    async def _end(self, status: str, detail: str) -> None:
        if self._lost_at is None and (self._connected is None or not self._connected.is_set()):
            return  # never connected: there is nobody to tell
        if self._connected is not None and not self._connected.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 5.0)
        control = ControlPayload(state="ended", session=self.session, detail=f"{status}{': ' + detail if detail else ''}")
        await self._publish(self.topics.control, encode(envelope(self.run_id, COORDINATOR, control)), retain=True)

    # ------------------------------------------------------------------ rounds (loop thread)

    def deadline_s(self) -> float:
        if self.round_deadline_s is not None:
            return self.round_deadline_s
        if self.first_round_wall_s is None:
            return self.first_round_deadline_s
        return max(MIN_ROUND_DEADLINE_S, DEADLINE_PER_FIRST_ROUND * self.first_round_wall_s)

    async def _wait_for_anyone(self, round_index: int) -> None:
        """With every node gone, wait (up to rejoin_timeout_s) for one to come back."""
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.rejoin_timeout_s
        while not any(s.present for s in self.nodes.values()):
            left = give_up - loop.time()
            if left <= 0:
                raise DistributedError(
                    f"every node has left and none came back within {self.rejoin_timeout_s:g} s before round "
                    f"{round_index}; restart them with `collective node --broker URL --run {self.run_id} --node ID`"
                )
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    async def _wait_for_broker(self, round_index: int) -> None:
        """Rounds wait out a broker outage, then give the nodes that were there time to return."""
        assert self._changed is not None and self._connected is not None
        loop = asyncio.get_running_loop()
        # A leave that just arrived may be the broker shutting down (it publishes every
        # client's will first): wait a moment to see whether our own connection drops too.
        recent = [s.left_at for s in self.nodes.values() if not s.present and s.left_at is not None]
        settle_until = max(recent, default=0.0) + WILLS_BEFORE_OUTAGE_S
        while self._connected.is_set() and loop.time() < settle_until:
            await asyncio.sleep(0.05)
        if not self._connected.is_set():
            log.warning("round %d waits for the broker at %s to come back", round_index, self.address.display())
            try:
                await asyncio.wait_for(self._connected.wait(), self.rejoin_timeout_s)
            except asyncio.TimeoutError:
                raise DistributedError(
                    f"lost the broker at {self.address.display()} and could not reconnect within {self.rejoin_timeout_s:g} s"
                ) from None
        while self._expect_back - {n for n, s in self.nodes.items() if s.present}:
            left = self._expect_until - loop.time()
            if left <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        self._expect_back = set()

    async def _run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        assert self._changed is not None
        await self._wait_for_broker(round_index)
        await self._wait_for_anyone(round_index)
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline_s = self.deadline_s()
        self._round = round_index
        self._results = {}
        self._compute_s = {}
        self._requests = {}
        self._awaiting = set()
        for request in requests:
            node_id = request.node_id
            if not self.nodes[node_id].present:
                continue
            self._requests[node_id] = RequestPayload.from_request(request, self._inbox_keys(node_id, round_index), deadline_s)
            self._awaiting.add(node_id)
        # concurrently: each QoS 1 publish waits for the broker's acknowledgement
        await asyncio.gather(*(self._send_request(node_id) for node_id in sorted(self._awaiting)))
        while self._awaiting:
            left = began + deadline_s - loop.time()
            if left <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        for node_id in sorted(self._awaiting):
            log.warning("node %s missed the deadline of round %d (%.1f s)", node_id, round_index, deadline_s)
        wall = loop.time() - began
        if self.first_round_wall_s is None and self._results:
            self.first_round_wall_s = wall
        self.round_wall_s.append(wall)
        self.round_compute_s.append(max(self._compute_s.values(), default=0.0))
        results: dict[str, NodeRoundResult | None] = {n: self._results.get(n) for n in self.scenario.node_ids}
        self._round = None
        self._awaiting = set()
        if not self._results:
            raise DistributedError(
                f"no node answered round {round_index} within its deadline ({deadline_s:g} s); "
                "set a longer one with ?deadline=SECONDS in the --bus URL"
            )
        return results

    def _inbox_keys(self, receiver: str, round_index: int) -> list[MessageKey]:
        """The booked messages `receiver` reads from this round on (each listed once)."""
        booked = self._booked[receiver]
        due = [key for deliver_round, key in booked if deliver_round <= round_index]
        self._booked[receiver] = [(d, k) for d, k in booked if d > round_index]
        return due

    async def _send_request(self, node_id: str) -> None:
        payload = self._requests.get(node_id)
        if payload is None or self._round is None:
            return
        await self._publish(
            self.topics.to_node(node_id), encode(envelope(self.run_id, COORDINATOR, payload, self._round))
        )

    # ------------------------------------------------------------------ incoming (loop thread)

    def _handle(self, topic: str, raw: Any) -> None:
        info = self.topics.parse(topic)
        if info is None or info.channel not in ("status", "result"):
            return  # our own subscriptions only deliver these
        payload = raw if isinstance(raw, (bytes, bytearray)) else str(raw).encode()
        try:
            limit = self.result_limit if info.channel == "result" else STATUS_BYTES
            env = decode_envelope(payload, limit)
            if env.run_id != self.run_id:
                raise Rejected("wrong_run", f"run {env.run_id!r}, this is {self.run_id!r}")
            if env.sender != info.owner:
                raise Rejected("spoofed", f"sender {env.sender!r} on {info.owner!r}'s topic")
            if info.owner not in self.nodes:
                raise Rejected("unknown_node", f"{info.owner!r} is not a node of this scenario")
            if info.channel == "status" and isinstance(env.payload, JoinPayload):
                self._on_join(info.owner, env.payload)
            elif info.channel == "status" and isinstance(env.payload, LeavePayload):
                self._on_leave(info.owner, env.payload)
            elif info.channel == "result" and isinstance(env.payload, ResultPayload):
                self._on_result(info.owner, env.round_index, env.payload)
            else:
                raise Rejected("unexpected", f"a {env.kind!r} envelope on a {info.channel} topic")
        except Rejected as rejected:
            self.rejections.add(rejected.reason, topic, rejected.detail)
        except Exception as exc:  # whatever a payload does, the coordinator goes on
            log.exception("an envelope on %s could not be handled", topic)
            self.rejections.add("malformed", topic, f"could not be handled: {exc!r}")

    def _on_join(self, node_id: str, join: JoinPayload) -> None:
        alias = self.scenario.node(node_id).model
        expected = self.digests[alias]
        state = self.nodes[node_id]
        reason = None
        if join.vocab_size != self.vocab_sizes[alias] or join.tokenizer_digest != expected:
            reason = (
                f"node {node_id} loaded {join.model!r} whose tokenizer (vocabulary {join.vocab_size}) differs from "
                f"the run's model {alias!r} ({self.vocab_sizes[alias]} tokens): load the model the scenario names"
            )
        elif state.present and join.session != state.session:
            reason = (
                f"node {node_id} is already served by another process (on {state.host or 'an unnamed host'}); "
                "stop that one first (a silent one times out within 30 s), or serve another node id"
            )
        if reason is not None:
            refuse = RefusePayload(session=join.session, reason=reason)
            self._spawn(self._publish(self.topics.to_node(node_id), encode(envelope(self.run_id, COORDINATOR, refuse))))
            raise Rejected("refused", reason)
        rejoined = state.session is not None and not state.present
        state.session, state.present, state.host, state.device = join.session, True, join.host, join.device
        log.info("node %s %s (%s on %s, %s)", node_id, "rejoined" if rejoined else "joined", join.model, join.host, join.device)
        welcome = WelcomePayload(session=join.session)
        self._spawn(self._publish(self.topics.to_node(node_id), encode(envelope(self.run_id, COORDINATOR, welcome))))
        if node_id in self._awaiting:  # it reconnected mid-round: what it was sent may be lost
            self._spawn(self._send_request(node_id))
        assert self._changed is not None
        self._changed.set()

    def _on_leave(self, node_id: str, leave: LeavePayload) -> None:
        state = self.nodes[node_id]
        if leave.session != state.session:
            return  # the last will of a session it has already replaced
        state.present = False
        state.left_at = asyncio.get_running_loop().time()
        log.log(logging.INFO if self._closing else logging.WARNING, "node %s left: %s", node_id, leave.reason or "disconnected")
        if node_id in self._awaiting:
            self._awaiting.discard(node_id)
            assert self._changed is not None
            self._changed.set()

    def _on_result(self, node_id: str, round_index: int, result: ResultPayload) -> None:
        if self._round is None or round_index != self._round:
            raise Rejected("wrong_round", f"a result for round {round_index}, the current round is {self._round}")
        if node_id in self._results:
            return  # a duplicate after a reconnect: the first one counts
        if node_id not in self._awaiting:
            raise Rejected("unexpected", f"{node_id} was not asked for round {round_index}")
        if result.session != self.nodes[node_id].session:
            raise Rejected("unexpected", f"a result from an earlier session of {node_id}")
        request = self._requests[node_id]
        alias = self.scenario.node(node_id).model
        decoded = result.to_result(node_id, round_index)
        for name, preds, wanted in (
            ("collective", decoded.collective, True),
            ("isolated", decoded.isolated, request.want_isolated),
            ("plain", decoded.plain, request.want_plain),
        ):
            if preds is None:
                if wanted:
                    raise Rejected("malformed", f"{node_id}'s result lacks the {name} row")
                continue
            problem = check_predictions(
                preds, n_positions=len(request.targets), top_k=self.scenario.evaluation.top_k, vocab_size=self.vocab_sizes[alias]
            )
            if problem is not None:
                raise Rejected("malformed", f"{node_id}'s {name} row: {problem}")
        decoded.messages = self._check_messages(node_id, round_index, result)
        self._results[node_id] = decoded
        self._compute_s[node_id] = result.compute_seconds
        state = self.nodes[node_id]
        state.rejected, state.missing_messages = dict(result.rejected), result.missing_messages
        for record in decoded.messages:
            if not record.dropped:
                key = MessageKey(sender=node_id, round_sent=round_index, digest=text_digest(record.text))
                self._booked[record.receiver].append((record.deliver_round, key))
        self._awaiting.discard(node_id)
        assert self._changed is not None
        self._changed.set()

    def _check_messages(self, node_id: str, round_index: int, result: ResultPayload) -> list[MessageRecord]:
        """The node's message records must be exactly what the link policies make of its text."""
        if result.message_text is None:
            if result.messages:
                raise Rejected("malformed", f"{node_id} reported messages but no message text")
            return []
        expected = outgoing_messages(
            node_id,
            result.message_text,
            round_index,
            self.out_neighbours[node_id],
            self.policies,
            self.tokenizer,
            self.scenario.seed,
        )
        if result.messages != expected:
            for record in result.messages:
                policy = self.policies.get((record.sender, record.receiver))
                if policy is not None and (
                    len(record.text.encode("utf-8")) > policy.max_message_bytes
                    or len(self.tokenizer.encode(record.text, add_special_tokens=False)) > policy.max_message_tokens
                ):
                    raise Rejected("over_budget", f"{node_id} -> {record.receiver}: {record.n_tokens} tokens, {record.n_bytes} bytes")
            raise Rejected("malformed", f"{node_id}'s message records are not what the link policies make of its text")
        return expected


def _print_waiting(console: Any, missing: list[str], total: int, seconds_left: float) -> None:
    console.print(
        f"waiting for nodes ({total - len(missing)}/{total} joined, {seconds_left:.0f} s left); missing: {', '.join(missing)}",
        highlight=False,
        soft_wrap=True,
    )


def wait_for_nodes(executor: MqttExecutor, console: Any, timeout_s: float, poll_s: float = 0.2) -> None:
    """Block until every node joined, printing who is missing whenever that changes."""
    total = len(executor.nodes)
    began = time.monotonic()
    shown: list[str] | None = None
    last_print = began
    while True:
        missing = executor.missing()
        if not missing:
            console.print(f"all {total} nodes joined", highlight=False)
            return
        now = time.monotonic()
        left = timeout_s - (now - began)
        if left <= 0:
            raise DistributedError(
                f"nodes {', '.join(missing)} did not join run {executor.run_id} within {timeout_s:g} s. Start each with "
                f"`collective node --broker {executor.address.display()} --run {executor.run_id} --node ID` "
                "(or raise --join-timeout)"
            )
        if missing != shown or now - last_print > 15:
            _print_waiting(console, missing, total, left)
            shown, last_print = missing, now
        time.sleep(poll_s)


@contextlib.contextmanager
def connect_executor(
    prepared: Prepared,
    bus_url: str,
    *,
    run_id: str,
    console: Any,
    join_timeout: float = 300.0,
    round_deadline_s: float | None = None,
) -> Iterator[MqttExecutor]:
    """Connect, publish the run, wait for every node; yield the executor; end the run on exit.

    `?deadline=SECONDS` in `bus_url` sets the per-round deadline (default: 600 s for the
    first round, then ten times the first round's wall time, at least 30 s).
    """
    address = parse_broker_url(bus_url, allowed_options=("deadline",))
    deadline = address.option("deadline")
    if deadline is not None:
        try:
            round_deadline_s = float(deadline)
        except ValueError:
            raise DistributedError(f"--bus: deadline={deadline!r} is not a number of seconds") from None
    executor = MqttExecutor(prepared, address, run_id=run_id, round_deadline_s=round_deadline_s, rejoin_timeout_s=join_timeout)
    console.print(f"run {run_id} on {address.display()}: checking the broker ...", highlight=False)
    status, detail = "failed", ""
    try:
        executor.start()
        console.print(
            f"nodes join with: collective node --broker {address.display()} --run {run_id} --node ID "
            f"(ID one of {', '.join(prepared.scenario.node_ids)})",
            highlight=False,
            soft_wrap=True,
        )
        wait_for_nodes(executor, console, join_timeout)
        yield executor
        status = "complete"
    except KeyboardInterrupt:
        status, detail = "interrupted", "Ctrl-C on the coordinator"
        raise
    except BaseException as exc:
        detail = str(exc)[:300]
        raise
    finally:
        executor.close(status, detail)
        dropped = executor.rejections.as_dict()
        by_node = {n: c for n, c in executor.node_rejections().items() if c}
        if dropped or by_node:
            console.print(f"dropped envelopes: coordinator {dropped or '{}'}, nodes {by_node or '{}'}", highlight=False, soft_wrap=True)
