"""The coordinator: an `Executor` whose nodes are volunteer processes behind an MQTT broker.

The round engine stays synchronous and unchanged: it calls `run_round(r, requests)` and
gets each node's `NodeRoundResult`, or None for a node that missed the round. Behind
that call a `LoopThread` runs the async parts:

    connect (`Connection`) -> publish the scenario and `control: open` (retained) -> nodes
    join (`Roster`) -> each round: `RoundCollector` (requests out, results in, checked,
    messages booked) -> `control: ended` (retained), also on Ctrl-C or an error

Every record the run writes to events.jsonl also goes to `coord/events/` for read-only
watchers (`publish_event`, called by the runner; `EventFeed`). A broker restart is
survived by reconnecting; on reconnect the coordinator republishes its retained state and
the requests still unanswered. Every envelope that reaches it is validated (run, round,
sender, predictions, message budgets, screen records) and dropped and counted when it fails.
Each node's fitted firewall goes out in its requests: the receiving node screens its inbox.
A byte-unit run (models with different tokenizers) works the same: the engine's requests are
already in each node's own tokens with the round's bytes, results come back as byte rows, and a
message's tokens are counted in its sender's tokenizer.
`connect_executor` is the one entry point: it reports progress lines through `on_status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import aiomqtt

from collective.distributed.connection import Connection
from collective.distributed.event_feed import EVENT_DRAIN_S, EventFeed
from collective.distributed.limits import PacketLimit, node_result_bound, span_bytes_max
from collective.distributed.loop_thread import LoopThread
from collective.distributed.mqtt import BrokerAddress, DistributedError, parse_broker_url
from collective.distributed.payloads import (
    ClaimPayload,
    ControlPayload,
    HostRequestPayload,
    HostResultPayload,
    JoinPayload,
    LeavePayload,
    Payload,
    RefusePayload,
    RequestPayload,
    ResultPayload,
    ScenarioPayload,
)
from collective.distributed.preflight import preflight
from collective.distributed.protocol import (
    COORDINATOR,
    Rejected,
    Rejections,
    Topics,
    encode,
    encode_packed,
    envelope,
    open_envelope,
    tokenizer_digest,
)
from collective.distributed.roster import WILLS_BEFORE_OUTAGE_S, NodeSnapshot, Roster
from collective.distributed.rounds import FIRST_ROUND_DEADLINE_S, RoundCollector
from collective.distributed.validation import ResultCheck
from collective.records import RunRecord
from collective.run.bus import link_policies
from collective.run.node import NodeRoundRequest, NodeRoundResult
from collective.run.prepared import Prepared, refuse_receiver_search

log = logging.getLogger(__name__)

STATUS_BYTES = 4_096

Status = Callable[[str], None]  # one progress line for the person running the coordinator


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
        self.scenario = scenario
        self.address = address
        self.run_id = run_id
        self.topics = Topics(run_id)
        self.session = uuid.uuid4().hex[:12]
        self.rejoin_timeout_s = rejoin_timeout_s
        graph = prepared.graph
        self.in_neighbours = {n: list(graph.predecessors(n)) for n in scenario.node_ids}
        self.out_neighbours = {n: list(graph.successors(n)) for n in scenario.node_ids}
        policies = link_policies(scenario.bus, graph.edges())
        digests = {alias: tokenizer_digest(model.tokenizer) for alias, model in prepared.models.items()}
        vocab_sizes = {alias: model.vocab_size for alias, model in prepared.models.items()}
        max_links = max([len(v) for v in self.out_neighbours.values()] + [1])
        max_in_links = max([len(v) for v in self.in_neighbours.values()] + [1])
        # a byte-unit run: the longest round and view of the stream in bytes (its requests carry
        # the round's bytes and each node's tokens of them, its results byte rows)
        self.unit = prepared.unit
        in_bytes = self.unit == "byte"
        self.round_bytes_max = span_bytes_max(prepared.byte_lengths, scenario.bus.round_tokens) if in_bytes else 0
        self.view_bytes_max = span_bytes_max(prepared.byte_lengths, scenario.max_reach) if in_bytes else 0
        self.result_limit = node_result_bound(scenario, max_links, max_in_links, self.round_bytes_max if in_bytes else None)
        self.packet = PacketLimit.of(scenario)  # what a `collective broker` broker accepts: host envelopes are packed to it
        self.rejections = Rejections(COORDINATOR)
        self.closing = False
        self.roster = Roster(scenario, digests, vocab_sizes)
        check = ResultCheck(
            top_k=scenario.evaluation.top_k,
            seed=scenario.seed,
            vocab_sizes={n: vocab_sizes[scenario.node(n).model] for n in scenario.node_ids},
            out_neighbours=self.out_neighbours,
            policies=policies,
            codec=prepared.tokenizer,
            in_neighbours=self.in_neighbours,
            firewalls=prepared.firewalls,
            retain=scenario.bus.retain,
            codecs={n: prepared.node_tokenizer(n) for n in scenario.node_ids},  # a link's tokens are its sender's
        )
        self.rounds = RoundCollector(
            self.roster, check, self._send_request, round_deadline_s=round_deadline_s, first_round_deadline_s=first_round_deadline_s
        )
        subscriptions = self.topics.coordinator_subscriptions()
        self.connection = Connection(address, COORDINATOR, subscriptions, self._handle, on_connect=self._on_connect)
        # what a `collective broker` broker accepts, less room for the envelope's own fields
        self.events = EventFeed(self.connection, run_id, self.packet.envelope_bytes)
        self._thread = LoopThread("collective-mqtt")
        self._background: set[asyncio.Future[Any]] = set()

    # ------------------------------------------------------------------ sync API (main thread)

    def start(self, preflight_timeout: float = 10.0) -> None:
        """Check the broker step by step (raises PreflightFailed), then connect in the background."""
        self._thread.start()
        self._thread.call(preflight(self.address, self.topics.coordinator_echo, timeout=preflight_timeout))
        self._thread.call(self._begin())
        if not self._thread.call(self.connection.wait_connected(preflight_timeout * 3)):
            raise DistributedError(f"could not stay connected to the broker at {self.address.display()}")

    def snapshot(self) -> list[NodeSnapshot]:
        return self._thread.call(self._snapshot())

    def missing(self) -> list[str]:
        return [node.node_id for node in self.snapshot() if not node.present]

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        return self._thread.call(self._run_round(round_index, requests))

    def publish_event(self, record: RunRecord) -> None:
        """Queue one run record for coord/events/ (never blocks, never raises: watchers are optional)."""
        try:
            if not self._thread.alive or not self._thread.call_soon(self.events.queue.put_nowait, self.events.wire(record)):
                log.debug("not connected: the %s record is not published", record.kind)
        except Exception as exc:  # a watcher's view is never worth a run
            log.warning("could not publish the run's %s record for watchers: %r", record.kind, exc)

    def close(self, status: str, detail: str = "") -> None:
        """Tell the nodes the run ended (retained), disconnect, stop the loop thread."""
        if not self._thread.alive:
            self._thread.stop()
            return
        self.closing = True
        try:  # the run's last records first (its end record among them), then `control: ended`
            self._thread.call(self.events.drain(EVENT_DRAIN_S), timeout=EVENT_DRAIN_S + 5)
        except Exception as exc:
            log.warning("could not publish the run's last records for watchers: %r", exc)
        try:
            self._thread.call(self._end(status, detail), timeout=10)
        except Exception as exc:  # the run is over either way; say so in the log
            log.warning("could not tell the nodes that the run ended: %r", exc)
        with contextlib.suppress(Exception):
            self._thread.call(self.connection.close(), timeout=10)
        self._thread.stop()

    def node_rejections(self) -> dict[str, dict[str, int]]:
        return self.roster.rejections()

    def rejected_envelopes(self) -> dict[str, dict[str, int]]:
        """What the coordinator and each node dropped so far, by reason (for the report)."""
        dropped = {COORDINATOR: self.rejections.as_dict(), **self.node_rejections()}
        return {who: counts for who, counts in dropped.items() if counts}

    # ------------------------------------------------------------------ connection (loop thread)

    async def _begin(self) -> None:
        self.connection.start()
        self._spawn(self.events.run())

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run `coro` in the background (a reference is kept until it is done)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _snapshot(self) -> list[NodeSnapshot]:
        return self.roster.snapshot()

    async def _on_connect(self) -> None:
        """Publish the run (retained), expect the nodes back after an outage, send again what
        a broker restart lost (the requests still unanswered)."""
        scenario = ScenarioPayload(
            scenario_yaml=self.scenario.resolved_yaml(),
            in_neighbours=self.in_neighbours,
            out_neighbours=self.out_neighbours,
            tokenizer_digests=self.roster.digests,
            session=self.session,
            unit=self.unit,
            round_bytes_max=self.round_bytes_max,
            view_bytes_max=self.view_bytes_max,
        )
        control = ControlPayload(state="open", session=self.session)
        published = await self._publish(self.topics.scenario, scenario, retain=True)
        published &= await self._publish(self.topics.control, control, retain=True)
        if not (published and await self.events.republish()):
            raise aiomqtt.MqttError("could not publish the run's retained state")
        if self.connection.lost_at is not None:
            self.roster.expect_back(self.connection.lost_at)
        await self.rounds.send_all_again()

    async def _publish(self, topic: str, payload: Payload, round_index: int = -1, retain: bool = False) -> bool:
        return await self.connection.publish(topic, encode(envelope(self.run_id, COORDINATOR, payload, round_index)), retain=retain)

    async def _send_request(self, target: str, payloads: list[RequestPayload], round_index: int) -> None:
        """A lone node's request in its own envelope; a host's nodes' requests in one envelope
        (several when they do not fit one packet), on coord/to/<host>."""
        topic = self.topics.to_node(target)
        if len(payloads) == 1 and payloads[0].node_id == target:
            await self._publish(topic, payloads[0], round_index)
            return
        packed = encode_packed(
            self.run_id, COORDINATOR, round_index, payloads, lambda part: HostRequestPayload(requests=list(part)),
            self.packet.envelope_bytes,
        )
        await asyncio.gather(*(self.connection.publish(topic, raw) for raw in packed))

    async def _end(self, status: str, detail: str) -> None:
        if self.connection.lost_at is None and not self.connection.connected.is_set():
            return  # never connected: there is nobody to tell
        await self.connection.wait_connected(5.0)
        control = ControlPayload(state="ended", session=self.session, detail=f"{status}{': ' + detail if detail else ''}")
        await self._publish(self.topics.control, control, retain=True)

    # ------------------------------------------------------------------ rounds (loop thread)

    async def _run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        await self._wait_for_broker(round_index)
        if not await self.roster.wait_for_anyone(self.rejoin_timeout_s):
            raise DistributedError(
                f"every node has left and none came back within {self.rejoin_timeout_s:g} s before round "
                f"{round_index}; restart them with `collective node --broker URL --run {self.run_id} --node ID`"
            )
        return await self.rounds.collect(round_index, requests)

    async def _wait_for_broker(self, round_index: int) -> None:
        """Rounds wait out a broker outage, then give the nodes that were there time to return."""
        loop = asyncio.get_running_loop()
        connected = self.connection.connected
        # A leave that just arrived may be the broker shutting down (it publishes every
        # client's will first): wait a moment to see whether our own connection drops too.
        settle_until = self.roster.last_leave() + WILLS_BEFORE_OUTAGE_S
        while connected.is_set() and loop.time() < settle_until:
            await asyncio.sleep(0.05)
        if not connected.is_set():
            log.warning("round %d waits for the broker at %s to come back", round_index, self.address.display())
            if not await self.connection.wait_connected(self.rejoin_timeout_s):
                raise DistributedError(
                    f"lost the broker at {self.address.display()} and could not reconnect within {self.rejoin_timeout_s:g} s"
                )
        await self.roster.wait_for_expected()

    # ------------------------------------------------------------------ incoming (loop thread)

    async def _handle(self, topic: str, raw: bytes) -> None:
        info = self.topics.parse(topic)
        if info is None or info.channel not in ("status", "result"):
            return  # our own subscriptions only deliver these
        with self.rejections.dropping(topic):
            is_node = info.owner in self.roster.nodes
            if info.channel == "result":  # a host's envelope is packed to the packet limit
                limit = self.result_limit if is_node else self.packet.packet_bytes
            else:
                limit = STATUS_BYTES
            env = open_envelope(raw, limit, run_id=self.run_id, sender=info.owner)
            payload = env.payload
            if info.channel == "status" and isinstance(payload, ClaimPayload):
                self._on_claim(info.owner, payload)
            elif not is_node and info.channel == "status" and isinstance(payload, LeavePayload):
                for node_id in self.roster.host_leave(info.owner, payload, expected=self.closing):
                    self.rounds.left(node_id)
            elif not is_node and info.channel == "result" and isinstance(payload, HostResultPayload):
                self.rounds.accept_host(info.owner, env.round_index, payload, self.rejections, topic)
            elif not is_node:
                raise Rejected("unknown_node", f"{info.owner!r} is not a node of this scenario")
            elif info.channel == "status" and isinstance(payload, JoinPayload):
                self._on_join(info.owner, payload)
            elif info.channel == "status" and isinstance(payload, LeavePayload):
                if self.roster.leave(info.owner, payload, expected=self.closing):
                    self.rounds.left(info.owner)
            elif info.channel == "result" and isinstance(payload, ResultPayload):
                self.rounds.accept(info.owner, env.round_index, payload, via=info.owner)
            else:
                raise Rejected("unexpected", f"a {env.kind!r} envelope on a {info.channel} topic")

    def _on_claim(self, host_id: str, claim: ClaimPayload) -> None:
        """A host's claim (on nodes/<host id>/status): assign it free nodes, or refuse it."""
        reply = self.roster.claim(host_id, claim)
        self._spawn(self._publish(self.topics.to_node(host_id), reply))
        if isinstance(reply, RefusePayload):
            raise Rejected("refused", reply.reason)

    def _on_join(self, node_id: str, join: JoinPayload) -> None:
        """Welcome or refuse; a welcomed node is asked from the next round on (a process that
        reconnected mid-round is also sent again the request it may have lost)."""
        new_process = self.roster.nodes[node_id].session not in (None, join.session)
        reply = self.roster.answer(node_id, join)
        self._spawn(self._publish(self.topics.to_node(join.via or node_id), reply))
        if isinstance(reply, RefusePayload):
            raise Rejected("refused", reply.reason)
        if new_process:
            unread = self.rounds.new_process(node_id)
            log.info("node %s is served by a new process from the next round on; %d message(s) sent to it before are not read", node_id, unread)
        self._spawn(self.rounds.send_again(node_id))


def wait_for_nodes(executor: MqttExecutor, timeout_s: float, on_status: Status, poll_s: float = 0.2) -> None:
    """Block until every node joined, reporting who is missing whenever that changes."""
    total = len(executor.roster.nodes)
    began = time.monotonic()
    shown: list[str] | None = None
    last_report = began
    while True:
        missing = executor.missing()
        if not missing:
            on_status(f"all {total} nodes joined")
            return
        now = time.monotonic()
        left = timeout_s - (now - began)
        if left <= 0:
            raise DistributedError(
                f"nodes {', '.join(missing)} did not join run {executor.run_id} within {timeout_s:g} s. Start each with "
                f"`collective node --broker {executor.address.display()} --run {executor.run_id} --node ID` "
                "(or raise --join-timeout)"
            )
        if missing != shown or now - last_report > 15:
            on_status(
                f"waiting for nodes ({total - len(missing)}/{total} joined, {left:.0f} s left); missing: {', '.join(missing)}"
            )
            shown, last_report = missing, now
        time.sleep(poll_s)


@contextlib.contextmanager
def connect_executor(
    prepared: Prepared,
    bus_url: str,
    *,
    run_id: str,
    on_status: Status = log.info,
    join_timeout: float = 300.0,
    round_deadline_s: float | None = None,
) -> Iterator[MqttExecutor]:
    """Connect, publish the run, wait for every node; yield the executor; end the run on exit.

    `?deadline=SECONDS` in `bus_url` sets the per-round deadline (default: 600 s for the
    first round, then ten times the first round's wall time, at least 30 s). Progress
    lines (checking the broker, how nodes join, who is missing, dropped envelopes) go to
    `on_status` (default: the log, at INFO).
    """
    refuse_receiver_search(prepared.scenario)
    address = parse_broker_url(bus_url, allowed_options=("deadline",))
    deadline = address.option("deadline")
    if deadline is not None:
        try:
            round_deadline_s = float(deadline)
        except ValueError:
            raise DistributedError(f"--bus: deadline={deadline!r} is not a number of seconds") from None
    executor = MqttExecutor(prepared, address, run_id=run_id, round_deadline_s=round_deadline_s, rejoin_timeout_s=join_timeout)
    on_status(f"run {run_id} on {address.display()}: checking the broker ...")
    status, detail = "failed", ""
    try:
        executor.start()
        on_status(
            f"nodes join with: collective node --broker {address.display()} --run {run_id} --node ID "
            f"(ID one of {', '.join(prepared.scenario.node_ids)})"
        )
        wait_for_nodes(executor, join_timeout, on_status)
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
            on_status(f"dropped envelopes: coordinator {dropped or '{}'}, nodes {by_node or '{}'}")
