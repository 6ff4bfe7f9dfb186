"""The volunteer: one node of a distributed run, in its own process on any machine.

    preflight (DNS, TCP, TLS, login, echo) -> connect with a last will (leave)
    -> read the run's retained scenario -> load the node's model -> join
    -> for each request: read the booked messages into the inbox, render it, score and
       speak with `compute_rounds` (the function the embedded runtime calls), publish the
       messages to the out-neighbours' topics and the result to the coordinator
    -> until `control: ended`

The node keeps its own `Inbox`. A message from an in-neighbour is checked (run, sender,
link, budget, round) and held until the coordinator's request lists its key; only the
messages the coordinator booked (from results it accepted) enter the inbox, so a late or
forged message cannot change what the node reads. The model runs in a worker thread, so
the connection keeps answering the broker while a round is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from collective.distributed.mqtt import BrokerAddress, DistributedError, client_id, make_client
from collective.distributed.preflight import preflight
from collective.distributed.protocol import (
    ControlPayload,
    Envelope,
    JoinPayload,
    LeavePayload,
    MessageKey,
    MessagePayload,
    RefusePayload,
    Rejected,
    Rejections,
    RequestPayload,
    ResultPayload,
    ScenarioPayload,
    Topics,
    WelcomePayload,
    decode_envelope,
    encode,
    envelope,
    message_bytes_bound,
    request_bytes_bound,
    text_digest,
    tokenizer_digest,
)
from collective.records import MessageRecord
from collective.run.bus import Inbox, LinkPolicy, link_policies, outgoing_messages
from collective.run.node import compute_rounds
from collective.scenario import Scenario, ScenarioError, parse_scenario

log = logging.getLogger(__name__)

SCENARIO_BYTES = 1 << 20
CONTROL_BYTES = 4_096
MAX_BACKOFF_S = 10.0
PENDING_PER_KEY = 4  # copies of one (sender, round) message held; more are dropped


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


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    name: str
    vocab_size: int
    device: str


class Volunteer:
    """Serves one node's rounds until the run ends; `report` gets one line per event."""

    def __init__(self, config: VolunteerConfig, report: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.run_id = config.run_id
        self.topics = Topics(config.run_id)
        self.session = uuid.uuid4().hex[:12]
        self.report = report or (lambda line: None)
        self.rejections = Rejections(f"node {config.node_id}")
        self.missing_messages = 0
        self.rounds_served = 0
        self.scenario: Scenario | None = None
        self.in_neighbours: list[str] = []
        self.out_neighbours: list[str] = []
        self.policies: dict[tuple[str, str], LinkPolicy] = {}
        self.inbox: Inbox | None = None
        self.loaded: _Loaded | None = None
        self.coordinator_session: str | None = None
        self.welcomed = False
        self.ended: str | None = None
        self._client: aiomqtt.Client | None = None
        self._pending: dict[tuple[str, int], list[MessageRecord]] = {}
        self._due: list[MessageKey] = []
        self._request: tuple[int, RequestPayload] | None = None
        self._computing: int | None = None
        self._last_round = -1  # the last round served
        self._latest_round = -1  # the last round requested
        self._last_sent: tuple[int, list[tuple[str, bytes]]] | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ main

    async def run(self) -> str:
        """Serve until the run ends; returns the coordinator's closing words."""
        await preflight(
            self.config.address,
            self.topics.echo(self.node_id),
            timeout=self.config.preflight_timeout_s,
            report=lambda step: self.report(f"preflight {step.name}: {step.status} ({step.detail})"),
        )
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        worker = asyncio.create_task(self._serve_rounds())
        watchdog = asyncio.create_task(self._scenario_watchdog())
        try:
            await self._connection_loop()
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
        if self._stop is not None:
            self._stop.set()

    async def _connection_loop(self) -> None:
        assert self._stop is not None
        will = aiomqtt.Will(
            self.topics.status(self.node_id),
            encode(envelope(self.run_id, self.node_id, LeavePayload(session=self.session, reason="disconnected"))),
            qos=1,
        )
        backoff = 0.5
        while not self._stop.is_set():
            try:
                async with make_client(self.config.address, identifier=client_id(self.node_id), will=will) as client:
                    self._client = client
                    backoff = 0.5
                    for topic in self.topics.node_subscriptions(self.node_id):
                        await client.subscribe(topic, qos=1)
                    reader = asyncio.create_task(self._read(client))
                    stopper = asyncio.create_task(self._stop.wait())
                    try:
                        await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    except asyncio.CancelledError:
                        await self._say_leave("stopped by its operator (Ctrl-C)")
                        raise
                    finally:
                        reader.cancel()
                        stopper.cancel()
                    if reader.done() and not reader.cancelled() and reader.exception() is not None:
                        raise reader.exception()  # type: ignore[misc]
                    await self._say_leave(f"the run ended ({self.ended})" if self._failure is None else f"failed: {self._failure}")
            except aiomqtt.MqttError as exc:
                self._client = None
                if self._stop.is_set():
                    break
                log.warning("lost the broker (%s); reconnecting in %.1f s", exc, backoff)
                self.report(f"lost the broker ({exc}); reconnecting in {backoff:.1f} s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        self._client = None

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            raw = message.payload if isinstance(message.payload, (bytes, bytearray)) else str(message.payload).encode()
            await self._handle(str(message.topic), raw)

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

    async def _publish(self, topic: str, payload: bytes) -> None:
        client = self._client
        if client is None:
            return
        try:
            await client.publish(topic, payload, qos=1)
        except aiomqtt.MqttError as exc:
            log.warning("could not publish to %s: %s", topic, exc)

    async def _say_leave(self, reason: str) -> None:
        client = self._client
        if client is None:
            return
        with contextlib.suppress(Exception):
            payload = encode(envelope(self.run_id, self.node_id, LeavePayload(session=self.session, reason=reason)))
            await asyncio.wait_for(client.publish(self.topics.status(self.node_id), payload, qos=1), 2.0)

    # ------------------------------------------------------------------ incoming

    async def _handle(self, topic: str, raw: bytes | bytearray) -> None:
        info = self.topics.parse(topic)
        if info is None or info.channel == "echo":
            return
        try:
            if info.channel == "msg":
                limit = message_bytes_bound(max([p.max_message_bytes for p in self.policies.values()] + [1]))
            elif info.channel == "to":
                limit = self._request_limit()
            else:
                limit = SCENARIO_BYTES if info.channel == "scenario" else CONTROL_BYTES
            env = decode_envelope(raw, limit)
            if env.run_id != self.run_id:
                raise Rejected("wrong_run", f"run {env.run_id!r}, this node serves {self.run_id!r}")
            if env.sender != info.owner:
                raise Rejected("spoofed", f"sender {env.sender!r} on {info.owner!r}'s topic")
            if info.channel == "msg":
                self._on_message(info.owner, env)
            elif info.channel == "scenario" and isinstance(env.payload, ScenarioPayload):
                await self._on_scenario(env.payload)
            elif info.channel == "control" and isinstance(env.payload, ControlPayload):
                await self._on_control(env.payload)
            elif info.channel == "to" and info.target == self.node_id:
                await self._on_direct(env)
            else:
                raise Rejected("unexpected", f"a {env.kind!r} envelope on a {info.channel} topic")
        except Rejected as rejected:
            self.rejections.add(rejected.reason, topic, rejected.detail)
        except Exception as exc:  # whatever a payload does, the node goes on
            log.exception("an envelope on %s could not be handled", topic)
            self.rejections.add("malformed", topic, f"could not be handled: {exc!r}")

    async def _on_scenario(self, payload: ScenarioPayload) -> None:
        if self.scenario is not None or self.ended is not None:
            return
        try:
            import yaml

            scenario = parse_scenario(yaml.safe_load(payload.scenario_yaml), source=f"run {self.run_id}")
        except (ScenarioError, ValueError) as exc:
            raise Rejected("malformed", f"the published scenario does not validate: {exc}") from None
        if self.node_id not in scenario.node_ids:
            self._fail(
                DistributedError(
                    f"run {self.run_id} has no node {self.node_id!r}; its nodes are {', '.join(scenario.node_ids)}"
                )
            )
            return
        self.scenario = scenario
        self.in_neighbours = list(payload.in_neighbours.get(self.node_id, []))
        self.out_neighbours = list(payload.out_neighbours.get(self.node_id, []))
        edges = [(s, self.node_id) for s in self.in_neighbours] + [(self.node_id, r) for r in self.out_neighbours]
        self.policies = link_policies(scenario.bus, edges)
        self.inbox = Inbox(self.node_id, self.in_neighbours, scenario.bus.retain)
        spec = scenario.models[scenario.node(self.node_id).model]
        ref = self.config.model_ref or spec.ref
        device = self.config.device or spec.device
        self.report(f"run {self.run_id}: scenario {scenario.name!r}; loading {ref} ({spec.dtype}, {device}) ...")
        try:
            self.loaded = await asyncio.to_thread(self._load_model, ref, device, spec.dtype)
        except Exception as exc:  # ModelLoadError and friends: the message is for the user
            self._fail(DistributedError(f"node {self.node_id} cannot load its model {ref!r}: {exc}"))
            return
        if self.loaded.vocab_size and tokenizer_digest(self.loaded.tokenizer) != payload.tokenizer_digest:
            self.report("warning: this tokenizer differs from the coordinator's first model; the coordinator decides")
        self.report(f"loaded {self.loaded.name} on {self.loaded.device}")
        await self._join()

    def _load_model(self, ref: str, device: str, dtype: str) -> _Loaded:
        from collective.lm.models import load_model

        loaded = load_model(ref, device=device, dtype=dtype, cache_dir=self.config.cache_dir)
        return _Loaded(loaded.model, loaded.tokenizer, loaded.name, loaded.vocab_size, str(loaded.device))

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
            tokenizer_digest=tokenizer_digest(self.loaded.tokenizer),
            device=self.loaded.device,
            host=platform.node(),
        )
        await self._publish(self.topics.status(self.node_id), encode(envelope(self.run_id, self.node_id, join)))

    async def _on_direct(self, env: Envelope) -> None:
        payload = env.payload
        if isinstance(payload, WelcomePayload):
            if payload.session == self.session and not self.welcomed:
                self.welcomed = True
                self.report(f"joined run {self.run_id} as node {self.node_id}")
        elif isinstance(payload, RefusePayload):
            if payload.session == self.session:
                self.ended = "refused"
                self._fail(DistributedError(f"the coordinator refused node {self.node_id}: {payload.reason}"))
        elif isinstance(payload, RequestPayload):
            self._on_request(env.round_index, payload)
        else:
            raise Rejected("unexpected", f"a {env.kind!r} envelope on this node's request topic")

    def _on_request(self, round_index: int, request: RequestPayload) -> None:
        scenario, loaded = self.scenario, self.loaded
        if scenario is None or loaded is None:
            raise Rejected("unexpected", "a request before this node loaded its model")
        if request.node_id != self.node_id:
            raise Rejected("spoofed", f"a request for node {request.node_id!r} on {self.node_id!r}'s topic")
        if round_index == self._last_round or round_index == self._computing:
            # the coordinator sent it again after a reconnect: answer again if done
            if round_index == self._last_round and self._last_sent is not None and self._last_sent[0] == round_index:
                for topic, payload in self._last_sent[1]:
                    self._spawn(self._publish(topic, payload))
            return
        if round_index < self._last_round:
            raise Rejected("wrong_round", f"a request for round {round_index} after round {self._last_round}")
        round_tokens = scenario.bus.round_tokens
        if len(request.round_inputs) != round_tokens or len(request.targets) != round_tokens:
            raise Rejected("malformed", f"a round of {len(request.round_inputs)} tokens, the run's rounds have {round_tokens}")
        if request.ids_out_of_range(loaded.vocab_size):
            raise Rejected("malformed", "token ids outside the model's vocabulary")
        self._latest_round = max(self._latest_round, round_index)
        self._due.extend(request.inbox)
        self._request = (round_index, request)
        assert self._wake is not None
        self._wake.set()

    def _on_message(self, sender: str, env: Envelope) -> None:
        scenario = self.scenario
        if not isinstance(env.payload, MessagePayload):
            raise Rejected("unexpected", f"a {env.kind!r} envelope on a message topic")
        if scenario is None or self.inbox is None:
            raise Rejected("unexpected", "a message before this node knows its scenario")
        record = env.payload.record
        if record.sender != sender or record.receiver != self.node_id:
            raise Rejected("spoofed", f"a record {record.sender} -> {record.receiver} on the link {sender} -> {self.node_id}")
        if sender not in scenario.node_ids:
            raise Rejected("unknown_node", f"{sender!r} is not a node of this run")
        if sender not in self.in_neighbours:
            raise Rejected("not_neighbour", f"{sender} -> {self.node_id} is not a link of the topology")
        policy = self.policies[(sender, self.node_id)]
        if record.dropped or record.deliver_round != record.round_sent + policy.latency_rounds:
            raise Rejected("malformed", f"deliver round {record.deliver_round} for a message sent in round {record.round_sent}")
        now = self._latest_round
        if not now - policy.latency_rounds - scenario.bus.retain - 2 <= record.round_sent <= now + 1:
            raise Rejected("wrong_round", f"a message of round {record.round_sent}; this node is at round {now}")
        assert self.loaded is not None
        n_bytes = len(record.text.encode("utf-8"))
        n_tokens = len(self.loaded.tokenizer.encode(record.text, add_special_tokens=False))
        if n_bytes > policy.max_message_bytes or n_tokens > policy.max_message_tokens:
            raise Rejected(
                "over_budget",
                f"{n_tokens} tokens / {n_bytes} bytes on a link of {policy.max_message_tokens} / {policy.max_message_bytes}",
            )
        held = self._pending.setdefault((sender, record.round_sent), [])
        if len(held) < PENDING_PER_KEY and record not in held:
            held.append(record)

    def _request_limit(self) -> int:
        scenario = self.scenario
        if scenario is None:
            return CONTROL_BYTES
        return request_bytes_bound(scenario.max_reach, scenario.bus.round_tokens, 4_096, 4 * len(scenario.nodes))

    # ------------------------------------------------------------------ rounds

    async def _serve_rounds(self) -> None:
        assert self._wake is not None
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

    async def _read_inbox(self, round_index: int, grace_s: float) -> None:
        """Move the messages booked for this round from `_pending` into the inbox."""
        assert self.inbox is not None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + grace_s
        due, self._due = self._due, []
        for key in due:
            while True:
                found = next((r for r in self._pending.get((key.sender, key.round_sent), []) if text_digest(r.text) == key.digest), None)
                if found is not None or loop.time() >= give_up:
                    break
                await asyncio.sleep(0.01)  # sent before the sender's result, so normally already here
            if found is None:
                self.missing_messages += 1
                log.warning("node %s: the booked message %s@%d never arrived", self.node_id, key.sender, key.round_sent)
                continue
            self.inbox.deliver(found)
            held = self._pending.get((key.sender, key.round_sent), [])
            held.remove(found)
        # whatever is still held and already due was never booked: late or forged
        for (sender, round_sent), held in list(self._pending.items()):
            latency = self.policies[(sender, self.node_id)].latency_rounds
            if round_sent + latency <= round_index:
                for record in held:
                    self.rejections.add("unconfirmed", self.topics.message(sender, self.node_id), f"round {record.round_sent}, not booked by the coordinator")
                del self._pending[(sender, round_sent)]

    async def _serve(self, round_index: int, payload: RequestPayload) -> None:
        scenario, loaded, inbox = self.scenario, self.loaded, self.inbox
        assert scenario is not None and loaded is not None and inbox is not None
        began = time.perf_counter()
        self._computing = round_index
        await self._read_inbox(round_index, grace_s=min(2.0, payload.deadline_s / 4))
        inbox_text = inbox.render(round_index, scenario.bus.inbox_template, scenario.bus.inbox_header)
        request = payload.to_request(round_index, inbox_text)
        evaluation = scenario.evaluation
        (result,) = await asyncio.to_thread(
            compute_rounds, loaded.model, loaded.tokenizer, [request], top_k=evaluation.top_k, batch_tokens=evaluation.batch_tokens
        )
        if result.message_text is not None:
            result.messages = outgoing_messages(
                self.node_id, result.message_text, round_index, self.out_neighbours, self.policies, loaded.tokenizer, scenario.seed
            )
        compute_s = time.perf_counter() - began
        sent: list[tuple[str, bytes]] = []
        for record in result.messages:
            if not record.dropped:  # a dropped message never travels
                env = envelope(self.run_id, self.node_id, MessagePayload(record=record), round_index)
                sent.append((self.topics.message(self.node_id, record.receiver), encode(env)))
        reply = ResultPayload.from_result(result, self.session, compute_s, self.rejections.as_dict(), self.missing_messages)
        # messages first: the broker forwards them before the result, and so before the
        # coordinator's next request reaches their receivers
        sent.append((self.topics.result(self.node_id), encode(envelope(self.run_id, self.node_id, reply, round_index))))
        self._last_sent = (round_index, sent)
        self._last_round, self._computing = round_index, None
        # gather keeps the order: each publish hands its packet to the client before it awaits
        await asyncio.gather(*(self._publish(topic, data) for topic, data in sent))
        self.rounds_served += 1
        log.info("node %s served round %d in %.2f s", self.node_id, round_index, compute_s)
        self.report(f"round {round_index} served in {compute_s:.2f} s")
