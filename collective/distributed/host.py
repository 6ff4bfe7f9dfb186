"""A volunteer host: one process that serves several nodes of a distributed run.

    preflight once (under the host's own topics) -> the nodes: named (`--node a --node b`,
    `--nodes a,b`) or claimed (`--claim N`: the coordinator assigns N free nodes) -> a check
    that the login may write as each node -> one connection for all of them (its last will
    says leave for every node) and one `Volunteer` per node on it (`MemberLink`), sharing one
    `HostBackend` (one copy per model, a round of all its nodes in one `compute_rounds` call
    per model, as the embedded runtime does) -> until the run ends; the first node that
    fails stops the others.

On the wire (protocol 6) each node joins on its own status topic, naming the host (`via`):
only a login that may write as the node can join it, which is what lets the coordinator send
that node's requests to the host. Then each round the host gets one `host_request` on
coord/to/<host id> and answers with one `host_result` on nodes/<host id>/result (split into
several when its nodes do not fit the broker's packet, `protocol.encode_packed`); each node's
part is checked by that node as its own envelope would be, and its messages still go on the
per-link topics. The run's retained envelopes and a request are opened once for all nodes.

A host's id is its login (a `collective broker --hosts` login may act for a listed set of
node ids, and only those), or a random `host-...` on an open broker. A claim goes on
nodes/<host id>/status, the answer on coord/to/<host id> (see `ClaimPayload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from collective.distributed.backend import published_scenario
from collective.distributed.connection import Connection, SubscriptionRefused
from collective.distributed.host_batch import HostBackend
from collective.distributed.limits import DEFAULT_MAX_PACKET_BYTES, PacketLimit
from collective.distributed.mqtt import BrokerAddress, DistributedError, make_client
from collective.distributed.payloads import (
    AssignPayload,
    ClaimPayload,
    ControlPayload,
    HostRequestPayload,
    HostResultPayload,
    LeavePayload,
    RefusePayload,
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
    encode_packed,
    envelope,
    open_envelope,
)
from collective.distributed.volunteer import SCENARIO_BYTES, Sent, Volunteer, VolunteerConfig

log = logging.getLogger(__name__)

CLAIM_BYTES = 1 << 20
ECHO_TIMEOUT_S = 3.0  # each node's echo topic must come back within this (loopback: milliseconds)
ACL_HINT = (
    "A host login acts only for the node ids `collective broker --hosts FILE` lists for it: serve those, "
    "or add the node to its list and restart the broker"
)


@dataclass(frozen=True)
class HostConfig:
    address: BrokerAddress
    run_id: str
    node_ids: tuple[str, ...] = ()  # the nodes to serve; empty: claim `claim` of them
    claim: int = 0
    device: str | None = None
    model_ref: str | None = None
    cache_dir: Path | None = None
    scenario_timeout_s: float = 600.0
    preflight_timeout_s: float = 10.0


def host_id_for(address: BrokerAddress) -> str:
    """The login (what the broker's ACL knows the host by), else a random id."""
    return address.username or f"host-{uuid.uuid4().hex[:8]}"


class MemberLink:
    """A host's node's link to the broker: it publishes through the host's one connection and
    serves until stopped (the host's connection reads for it and says leave for all)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        await self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        return await self.connection.publish(topic, payload, retain=retain)


class Host:
    """Serves its nodes until the run ends (see the module docstring); `report` gets one line an event."""

    def __init__(self, config: HostConfig, report: Callable[[str], None] | None = None) -> None:
        if not config.node_ids and config.claim < 1:
            raise DistributedError("a host serves the nodes it names (--node, --nodes) or claims (--claim N)")
        self.config = config
        self.host_id = host_id_for(config.address)
        self.topics = Topics(config.run_id)
        self.session = uuid.uuid4().hex[:12]  # every node of the host joins in it: the host's will leaves them all
        self.report = report or (lambda line: None)
        self.rejections = Rejections(f"host {self.host_id}")
        self.by_node: dict[str, Volunteer] = {}  # one per node the host serves, in the order given
        self._ranks: dict[str, int] | None = None  # node id -> its place in the scenario, once known
        self.backend = HostBackend(config.cache_dir, self._expected, self._rank, self.report)
        self.packet = PacketLimit(DEFAULT_MAX_PACKET_BYTES)  # the scenario's, once it is known
        self._outgoing: dict[int, tuple[Sent, dict[str, ResultPayload]]] = {}  # round -> what its flush sends
        self._background: set[asyncio.Future[Any]] = set()
        self.connection: Connection | None = None

    @property
    def volunteers(self) -> list[Volunteer]:
        return list(self.by_node.values())

    @property
    def rounds_served(self) -> int:
        return sum(v.rounds_served for v in self.volunteers)

    def _expected(self) -> set[str]:
        return {v.node_id for v in self.volunteers if v.welcomed and v.ended is None}

    def _rank(self, node_id: str) -> int:
        if self._ranks is None:
            scenario = next((v.scenario for v in self.volunteers if v.scenario is not None), None)
            if scenario is None:
                return 0
            self._ranks = {n: i for i, n in enumerate(scenario.node_ids)}
        return self._ranks.get(node_id, 0)

    async def run(self) -> str:
        """Serve every node until the run ends; returns the coordinator's closing words."""
        config = self.config
        await preflight(
            config.address, self.topics.echo(self.host_id), timeout=config.preflight_timeout_s,
            report=lambda step: self.report(f"preflight {step.name}: {step.status} ({step.detail})"),
        )
        node_ids = list(config.node_ids) or await self._claim()
        await self._check_topics(node_ids)
        self.report(f"host {self.host_id} serves {len(node_ids)} node(s): {', '.join(node_ids)}")
        leave = encode(envelope(config.run_id, self.host_id, LeavePayload(session=self.session, reason="disconnected")))
        self.connection = Connection(
            config.address, self.host_id, self.topics.host_subscriptions(self.host_id, node_ids), self._handle,
            on_lost=lambda exc, interval: self.report(f"lost the broker ({exc}); reconnecting in {interval:.1f} s"),
            farewell=self._say_leave, will=aiomqtt.Will(self.topics.status(self.host_id), leave, qos=1),
        )
        self._add_nodes(node_ids, self.connection)
        return await self._serve()

    def _add_nodes(self, node_ids: list[str], connection: Connection) -> None:
        """One `Volunteer` per node on the host's connection, its round handed to `_collect`."""
        config = self.config
        for node_id in node_ids:
            node_config = VolunteerConfig(
                address=config.address, run_id=config.run_id, node_id=node_id, device=config.device, model_ref=config.model_ref,
                cache_dir=config.cache_dir, scenario_timeout_s=config.scenario_timeout_s, preflight=False,
                report_rounds=False, via=self.host_id, session=self.session,
            )
            volunteer = Volunteer(node_config, self._node_report(node_id), self.backend, link=MemberLink(connection), sink=self._collect)
            self.by_node[node_id] = volunteer

    async def _check_topics(self, node_ids: list[str]) -> None:
        """Every node's topics in one round trip: a login that may not write as a node (a host
        login outside its list) is told so now, not after a silent timeout."""
        nonce = uuid.uuid4().hex.encode()
        missing = set(node_ids)
        try:
            await self._echo_all(node_ids, nonce, missing)
        except aiomqtt.MqttError as exc:
            raise DistributedError(f"lost the broker at {self.config.address.display()} while checking the nodes' topics: {exc}") from None
        if missing:
            refused = ", ".join(repr(n) for n in node_ids if n in missing)
            raise DistributedError(
                f"login {self.config.address.username!r} may not serve node {refused}: the broker did not echo "
                f"{'its' if len(missing) == 1 else 'their'} topics back within {ECHO_TIMEOUT_S:g} s (its ACL). {ACL_HINT}"
            )

    async def _echo_all(self, node_ids: list[str], nonce: bytes, missing: set[str]) -> None:
        """Publish `nonce` as each node to this host (nodes/<node>/msg/<host id>: only a login that
        may write as the node gets it through, and no node reads a host's id); what comes back is
        discarded from `missing`."""
        identifier = f"collective-host-check-{uuid.uuid4().hex[:8]}"
        async with make_client(self.config.address, identifier=identifier, timeout=self.config.preflight_timeout_s) as client:
            await client.subscribe(self.topics.message("+", self.host_id), qos=1)
            for node_id in node_ids:
                await client.publish(self.topics.message(node_id, self.host_id), nonce, qos=1)

            async def echoed() -> None:
                async for message in client.messages:
                    info = self.topics.parse(str(message.topic))
                    if info is not None and message.payload == nonce:
                        missing.discard(info.owner)
                        if not missing:
                            return

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(echoed(), ECHO_TIMEOUT_S)

    def _node_report(self, node_id: str) -> Callable[[str], None]:
        return lambda line: self.report(f"{node_id}: {line}")

    async def _serve(self) -> str:
        assert self.connection is not None
        connection = self.connection.start()
        tasks: dict[asyncio.Future[Any], Volunteer] = {asyncio.ensure_future(v.run()): v for v in self.volunteers}
        failure: tuple[Volunteer, BaseException] | None = None
        pending: set[asyncio.Future[Any]] = {*tasks, connection}
        try:
            while tasks.keys() & pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if connection in done:  # it gave up (a refused subscription): every node stops with it
                    error = connection.exception() if not connection.cancelled() else None
                    failure = failure or (self.volunteers[0], error or DistributedError("the host's connection ended"))
                    self._stop_all(f"host {self.host_id} lost its connection")
                for task in done & tasks.keys():
                    error = None if task.cancelled() else task.exception()
                    if error is not None and failure is None:
                        failure = (tasks[task], error)
                        self._stop_all(f"host {self.host_id} stopped: node {tasks[task].node_id} failed")
        finally:
            await self.connection.close()
        if failure is not None:
            raise self._explain(*failure)
        return next((v.ended for v in self.volunteers if v.ended), "ended")

    def _stop_all(self, detail: str) -> None:
        for volunteer in self.volunteers:
            volunteer.stop(detail)

    def _explain(self, volunteer: Volunteer, error: BaseException) -> BaseException:
        if isinstance(error, SubscriptionRefused):
            login = self.config.address.username
            return DistributedError(f"login {login!r} may not serve node {volunteer.node_id!r}: the broker refused it that node's topics. {ACL_HINT}")
        return error

    async def _say_leave(self, interrupted: bool) -> None:
        """The host's last words for all its nodes before a clean disconnect (else its will)."""
        assert self.connection is not None
        failed = next((v._failure for v in self.volunteers if v._failure is not None), None)
        if interrupted:
            reason = "stopped by its operator (Ctrl-C)"
        else:
            ended = next((v.ended for v in self.volunteers if v.ended), "ended")
            reason = f"the run ended ({ended})" if failed is None else f"failed: {failed}"
        leave = encode(envelope(self.config.run_id, self.host_id, LeavePayload(session=self.session, reason=reason[:500])))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.publish(self.topics.status(self.host_id), leave), 2.0)

    # ------------------------------------------------------------------ the host's envelopes

    async def _handle(self, topic: str, raw: bytes) -> None:
        """The run's envelopes are opened once for all the host's nodes; a message goes to its
        receiver, a host request's parts to their nodes, each part checked by its node."""
        info = self.topics.parse(topic)
        if info is None or info.channel == "echo":
            return
        if info.channel == "msg":
            volunteer = self.by_node.get(info.target or "")
            if volunteer is not None:
                await volunteer._handle(topic, raw)
            return
        with self.rejections.dropping(topic):
            limit = SCENARIO_BYTES if info.channel == "scenario" else self.packet.packet_bytes
            try:
                env = open_envelope(raw, limit, run_id=self.config.run_id, sender=info.owner)
            except Rejected as rejected:
                for volunteer in self.volunteers:
                    volunteer.fail_on_mismatch(rejected, info.channel)
                raise
            if info.channel == "to" and info.target == self.host_id:
                await self._on_direct(topic, info, env)
                return
            if info.channel == "scenario" and isinstance(env.payload, ScenarioPayload):
                self.packet = PacketLimit.of(published_scenario(env.payload.scenario_yaml, self.config.run_id)[0])
            for volunteer in self.volunteers:
                with volunteer.rejections.dropping(topic):
                    await volunteer.dispatch(info, env)

    async def _on_direct(self, topic: str, info: TopicInfo, env: Envelope) -> None:
        payload = env.payload
        if isinstance(payload, HostRequestPayload):
            for request in payload.requests:
                with self.rejections.dropping(f"{topic} ({request.node_id})"):
                    volunteer = self.by_node.get(request.node_id)
                    if volunteer is None:
                        raise Rejected("spoofed", f"a request for node {request.node_id!r}, which this host does not serve")
                    with volunteer.rejections.dropping(topic):
                        volunteer._on_request(env.round_index, request)
        elif isinstance(payload, (WelcomePayload, RefusePayload)) and payload.node_id in self.by_node:
            await self.by_node[payload.node_id].dispatch(info, env)
        elif not isinstance(payload, (AssignPayload, RefusePayload)):  # a claim's answer, seen again: not ours now
            raise Rejected("unexpected", f"a {env.kind!r} envelope on host {self.host_id}'s topic")

    async def _collect(self, round_index: int, node_id: str, sent: Sent, reply: ResultPayload) -> None:
        """A node's round, sent with its host's other nodes' of that round in one envelope: the
        batch's nodes hand theirs in one after the other (their computation ended together), so
        the flush, queued behind them on the loop, finds them all."""
        first = round_index not in self._outgoing
        messages, results = self._outgoing.setdefault(round_index, ([], {}))
        messages.extend(sent)
        results[node_id] = reply
        if first:
            asyncio.get_running_loop().call_soon(self._spawn, self._flush(round_index))

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush(self, round_index: int) -> None:
        """The round's messages, then its results (in as few envelopes as the packet limit allows)."""
        assert self.connection is not None
        sent, results = self._outgoing.pop(round_index)
        packed = encode_packed(
            self.config.run_id, self.host_id, round_index, sorted(results.items()),
            lambda part: HostResultPayload(results=dict(part)), self.packet.envelope_bytes,
        )
        every = [*sent, *((self.topics.result(self.host_id), raw) for raw in packed)]
        # gather keeps the order: each publish hands its packet to the client before it awaits
        await asyncio.gather(*(self.connection.publish(topic, data) for topic, data in every))

    # ------------------------------------------------------------------ claims

    async def _claim(self) -> list[str]:
        """Ask the coordinator for `claim` free nodes (once its run is open); returns their ids."""
        session = uuid.uuid4().hex[:12]
        answer: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        claim = encode(envelope(self.config.run_id, self.host_id, ClaimPayload(session=session, count=self.config.claim)))

        async def handle(topic: str, raw: bytes) -> None:
            info = self.topics.parse(topic)
            if info is None or answer.done():
                return
            with self.rejections.dropping(topic):
                payload = open_envelope(raw, CLAIM_BYTES, run_id=self.config.run_id, sender=info.owner).payload
                if isinstance(payload, ControlPayload) and payload.state == "open":
                    await connection.publish(self.topics.status(self.host_id), claim)
                elif isinstance(payload, ControlPayload):
                    answer.set_exception(DistributedError(f"run {self.config.run_id} has ended ({payload.detail}): nothing to claim"))
                elif isinstance(payload, AssignPayload) and payload.session == session:
                    answer.set_result(list(payload.node_ids))
                elif isinstance(payload, RefusePayload) and payload.session == session:
                    answer.set_exception(DistributedError(f"the coordinator refused the claim of host {self.host_id}: {payload.reason}"))

        connection = Connection(self.config.address, self.host_id, [self.topics.control, self.topics.to_node(self.host_id)], handle)
        running = connection.start()
        try:
            watched: set[asyncio.Future[Any]] = {answer, running}
            done, _ = await asyncio.wait(watched, timeout=self.config.scenario_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if answer in done:
                return answer.result()
            if running in done:
                running.result()
            raise DistributedError(
                f"no run {self.config.run_id!r} on {self.config.address.display()} answered the claim within "
                f"{self.config.scenario_timeout_s:g} s: start the coordinator first, and check the run id"
            )
        finally:
            with contextlib.suppress(Exception):
                await connection.close()
