"""A volunteer host: one process that serves several nodes of a distributed run.

    preflight once (under the host's own topics) -> the nodes: named (`--node a --node b`,
    `--nodes a,b`) or claimed (`--claim N`: the coordinator assigns N free nodes) -> one
    `Volunteer` per node, each with its own connection and last will (a host that dies
    takes all its nodes out of the round, and they rejoin when it comes back), sharing
    one `HostBackend`: one copy per model, and each round's requests of all its nodes
    computed with one `compute_rounds` call per model, as the embedded runtime does
    -> until the run ends; the first node that fails stops the others (each says leave).

A host's id is its login (a `collective broker --hosts` login may act for a listed set of
node ids, and only those), or a random `host-...` on an open broker. A claim goes on
nodes/<host id>/status, the answer on coord/to/<host id> (see `ClaimPayload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from collective.distributed.backend import NodeModel, SoloBackend
from collective.distributed.compute_thread import on_compute_thread
from collective.distributed.connection import Connection, SubscriptionRefused
from collective.distributed.mqtt import BrokerAddress, DistributedError, make_client
from collective.distributed.payloads import (
    AssignPayload,
    ClaimPayload,
    ControlPayload,
    RefusePayload,
)
from collective.distributed.preflight import preflight
from collective.distributed.protocol import Rejections, Topics, encode, envelope, open_envelope
from collective.distributed.volunteer import Volunteer, VolunteerConfig
from collective.run.node import NodeRoundRequest, NodeRoundResult, compute_rounds
from collective.scenario import EvaluationSpec

log = logging.getLogger(__name__)

BATCH_GRACE_S = 0.5  # after a round's first request, how long a batch waits for the host's other nodes
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


@dataclass(eq=False)
class _Batch:
    round_index: int
    evaluation: EvaluationSpec
    missing: set[str]  # the nodes expected when the batch opened that have not asked yet
    wanted: dict[str, tuple[NodeModel, NodeRoundRequest, asyncio.Future[NodeRoundResult]]] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


class HostBackend:
    """One copy per model for all the host's nodes; a round's requests batched per model.

    A batch goes when every node in `expected()` (asked once, when the round's first request
    opens the batch) has asked, or BATCH_GRACE_S after that first request (a node welcomed
    mid-round is not asked until the next one). Each request costs O(1), so a round of N nodes
    costs O(N), not O(N^2)."""

    def __init__(
        self,
        cache_dir: Path | None,
        expected: Callable[[], set[str]],
        rank: Callable[[str], int],
        report: Callable[[str], None],
        grace_s: float = BATCH_GRACE_S,
    ) -> None:
        self.solo = SoloBackend(cache_dir)
        self.expected, self.rank, self.report, self.grace_s = expected, rank, report, grace_s
        self._models: dict[tuple[str, str, str], asyncio.Future[NodeModel]] = {}
        self._open: dict[int, _Batch] = {}
        self._running: set[asyncio.Future[None]] = set()

    async def load(self, ref: str, device: str, dtype: str) -> NodeModel:
        key = (ref, device, dtype)
        if key not in self._models:
            self._models[key] = asyncio.ensure_future(self.solo.load(ref, device, dtype))
        return await asyncio.shield(self._models[key])

    @property
    def copies(self) -> int:
        return len(self._models)

    async def compute(self, node_id: str, loaded: NodeModel, request: NodeRoundRequest, evaluation: EvaluationSpec) -> NodeRoundResult:
        batch = self._open.get(request.round_index)
        if batch is None:
            batch = self._open[request.round_index] = _Batch(request.round_index, evaluation, self.expected())
        future: asyncio.Future[NodeRoundResult] = asyncio.get_running_loop().create_future()
        batch.wanted[node_id] = (loaded, request, future)
        batch.missing.discard(node_id)
        if not batch.missing:
            self._launch(batch)
        elif batch.timer is None:
            batch.timer = asyncio.get_running_loop().call_later(self.grace_s, self._launch, batch)
        return await future

    def _launch(self, batch: _Batch) -> None:
        if self._open.get(batch.round_index) is batch:
            del self._open[batch.round_index]
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: _Batch) -> None:
        began = time.perf_counter()
        try:
            results, groups = await on_compute_thread(self._compute, batch)
        except Exception as exc:  # each node's round fails with it (and stops the host with the reason)
            for _, _, future in batch.wanted.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for node_id, (_, _, future) in batch.wanted.items():
            if future.done():
                continue
            if node_id in results:
                future.set_result(results[node_id])
            else:  # never expected: compute_rounds answers every request; fail the node, never hang it
                future.set_exception(RuntimeError(f"round {batch.round_index}: the batch returned no result for {node_id}"))
        took = time.perf_counter() - began
        self.report(f"round {batch.round_index}: {', '.join(n for g in groups for n in g)} in {len(groups)} batch(es), {took:.2f} s")

    def _compute(self, batch: _Batch) -> tuple[dict[str, NodeRoundResult], list[list[str]]]:
        """One `compute_rounds` call per model, its nodes in the scenario's order (as embedded)."""
        by_model: dict[int, list[str]] = {}
        for node_id in sorted(batch.wanted, key=self.rank):
            by_model.setdefault(id(batch.wanted[node_id][0].model), []).append(node_id)
        evaluation, results = batch.evaluation, {}
        for group in by_model.values():
            loaded = batch.wanted[group[0]][0]
            requests = [batch.wanted[n][1] for n in group]
            for result in compute_rounds(
                loaded.model, loaded.tokenizer, requests, top_k=evaluation.top_k, batch_tokens=evaluation.batch_tokens
            ):
                results[result.node_id] = result
        return results, list(by_model.values())


class Host:
    """Serves its nodes until the run ends (see the module docstring); `report` gets one line an event."""

    def __init__(self, config: HostConfig, report: Callable[[str], None] | None = None) -> None:
        if not config.node_ids and config.claim < 1:
            raise DistributedError("a host serves the nodes it names (--node, --nodes) or claims (--claim N)")
        self.config = config
        self.host_id = host_id_for(config.address)
        self.topics = Topics(config.run_id)
        self.report = report or (lambda line: None)
        self.rejections = Rejections(f"host {self.host_id}")
        self.volunteers: list[Volunteer] = []
        self._ranks: dict[str, int] | None = None  # node id -> its place in the scenario, once known
        self.backend = HostBackend(config.cache_dir, self._expected, self._rank, self.report)

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
        for node_id in node_ids:
            node_config = VolunteerConfig(
                address=config.address, run_id=config.run_id, node_id=node_id, device=config.device, model_ref=config.model_ref,
                cache_dir=config.cache_dir, scenario_timeout_s=config.scenario_timeout_s, preflight=False,
                report_rounds=False,
            )
            self.volunteers.append(Volunteer(node_config, self._node_report(node_id), self.backend))
        return await self._serve()

    async def _check_topics(self, node_ids: list[str]) -> None:
        """Every node's echo topic round trip in one connection: a login that may not act for a
        node (a host login outside its list) is told so now, not after a silent timeout."""
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
        """Publish `nonce` on every node's echo topic; what comes back is discarded from `missing`."""
        identifier = f"collective-host-check-{uuid.uuid4().hex[:8]}"
        async with make_client(self.config.address, identifier=identifier, timeout=self.config.preflight_timeout_s) as client:
            for node_id in node_ids:
                await client.subscribe(self.topics.echo(node_id), qos=1)
            for node_id in node_ids:
                await client.publish(self.topics.echo(node_id), nonce, qos=1)

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
        tasks = {asyncio.ensure_future(v.run()): v for v in self.volunteers}
        failure: tuple[Volunteer, BaseException] | None = None
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None and failure is None:
                    failure = (tasks[task], error)
                    for other in self.volunteers:
                        other.stop(f"host {self.host_id} stopped: node {tasks[task].node_id} failed")
        if failure is not None:
            raise self._explain(*failure)
        return next((v.ended for v in self.volunteers if v.ended), "ended")

    def _explain(self, volunteer: Volunteer, error: BaseException) -> BaseException:
        if isinstance(error, SubscriptionRefused):
            login = self.config.address.username
            return DistributedError(f"login {login!r} may not serve node {volunteer.node_id!r}: the broker refused it that node's topics. {ACL_HINT}")
        return error

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
