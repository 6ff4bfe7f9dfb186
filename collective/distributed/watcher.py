"""A read-only view of a distributed run: its records, as the coordinator writes them, from the broker.

`subscribe_events(url, run_id)` checks the broker (preflight up to the login), subscribes
to `collective/<run>/coord/events/#` and `coord/control`, and returns a synchronous
iterator of the run's records, the same as the lines of the coordinator's events.jsonl:

    RunStart (retained: a watcher that attaches mid-run gets it first), then each
    RoundEvent from the moment it attached, in order, then RunEnd, where it stops.

A `LoopThread` runs the MQTT `Connection` (reconnecting, like every other party's) and
hands what arrives to a queue; `EventSequencer`
(pure, no broker) turns those payloads into the ordered records: invalid ones are
dropped, logged and counted, a start republished after a broker restart is not shown
twice, rounds that arrive before the start wait for it. Closing the iterator (or Ctrl-C)
disconnects cleanly.

The login needs read access only: with `collective broker`, the `watcher` user of
credentials.txt (the coordinator's login works too).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import time
from collections.abc import Iterator
from typing import Any

import aiomqtt

from collective.distributed.connection import Connection
from collective.distributed.loop_thread import LoopThread
from collective.distributed.mqtt import (
    BrokerAddress,
    DistributedError,
    describe_connect_error,
    parse_broker_url,
)
from collective.distributed.payloads import ControlPayload, EventPayload
from collective.distributed.preflight import preflight
from collective.distributed.protocol import (
    COORDINATOR,
    RUN_ID_PATTERN,
    WATCHER,
    Rejected,
    Rejections,
    Topics,
    open_envelope,
)
from collective.records import RoundEvent, RunEnd, RunRecord, RunStart

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0  # how long to wait for any sign of the run before saying it is not there
END_GRACE_S = 5.0  # after `control: ended`, how long the end record (or the start) still gets
MAX_EVENT_BYTES = 256 << 20  # the broker's max_packet_size is the real limit
MAX_EARLY_ROUNDS = 1_000  # rounds held while the start record has not arrived


class NoSuchRun(DistributedError):
    """Nothing of the run arrived (or it ended before it had a record to show)."""


class EventSequencer:
    """Payloads from coord/events/# and coord/control in, the run's records out, in order."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.topics = Topics(run_id)
        self.start: RunStart | None = None
        self.end: RunEnd | None = None
        self.control: ControlPayload | None = None
        self.last_round = -1
        self.rejections = Rejections("watcher")
        self.mismatch: str | None = None  # the coordinator speaks another protocol (its envelopes cannot be read)
        self._early: list[RoundEvent] = []
        self._early_end: RunEnd | None = None

    @property
    def done(self) -> bool:
        return self.end is not None

    @property
    def seen_run(self) -> bool:
        """Anything of the run arrived: a record or the coordinator's control state."""
        return self.start is not None or self.control is not None or self._early_end is not None or bool(self._early)

    def feed(self, topic: str, raw: bytes | bytearray) -> list[RunRecord]:
        """The records that become showable with this payload (often none, sometimes several)."""
        info = self.topics.parse(topic)
        if info is None or info.channel not in ("events", "control") or not raw:
            return []  # not ours, or an empty payload that cleared a retained record
        shown: list[RunRecord] = []
        with self.rejections.dropping(topic):
            try:
                env = open_envelope(raw, MAX_EVENT_BYTES, run_id=self.run_id, sender=COORDINATOR)
            except Rejected as rejected:
                if rejected.reason == "wrong_schema":  # the watcher stops at once (`__next__`), as a node does
                    self.mismatch = rejected.detail
                raise
            payload = env.payload
            if info.channel == "control":
                if not isinstance(payload, ControlPayload):
                    raise Rejected("unexpected", f"a {env.kind!r} envelope on the control topic")
                self.control = payload
            elif not isinstance(payload, EventPayload) or payload.record.kind != info.target:
                raise Rejected("unexpected", f"a {env.kind!r} envelope on {topic}")
            elif payload.record.run_id != self.run_id:
                raise Rejected("wrong_run", f"a record of run {payload.record.run_id!r}")
            else:
                shown = self._order(payload.record)
        return shown

    def _order(self, record: RunRecord) -> list[RunRecord]:
        if self.end is not None:
            return []
        if isinstance(record, RunStart):
            if self.start is not None:
                return []  # the retained start again (the coordinator republishes it after a reconnect)
            self.start = record
            shown: list[RunRecord] = [record]
            for early in sorted(self._early, key=lambda event: event.round_index):
                shown += self._round(early)
            self._early = []
            if self._early_end is not None:
                shown += self._finish(self._early_end)
            return shown
        if self.start is None:  # wait for the start: the view needs it first
            if isinstance(record, RoundEvent):
                if len(self._early) < MAX_EARLY_ROUNDS:
                    self._early.append(record)
            else:
                self._early_end = record
            return []
        if isinstance(record, RoundEvent):
            return self._round(record)
        return self._finish(record)

    def _round(self, event: RoundEvent) -> list[RunRecord]:
        if event.round_index <= self.last_round:
            return []  # already shown
        self.last_round = event.round_index
        return [event]

    def _finish(self, end: RunEnd) -> list[RunRecord]:
        self.end = end
        return [end]

    def why_nothing(self, address: BrokerAddress, waited_s: float) -> str:
        """What to tell the user when no record is there to show."""
        run = f"run {self.run_id!r}"
        if self._early_end is not None:
            return (
                f"{run} has ended ({self._early_end.status}, {self._early_end.rounds_done} rounds) and the broker at "
                f"{address.display()} no longer holds its start record; watch the coordinator's run folder instead: "
                "collective watch RUN_DIR"
            )
        if self.control is not None and self.control.state == "ended":
            detail = f" ({self.control.detail})" if self.control.detail else ""
            return f"{run} on the broker at {address.display()} ended before its first round{detail}"
        who = f"user {address.username!r}" if address.username else "an anonymous client"
        return (
            f"no run {self.run_id!r} is live on the broker at {address.display()}: nothing of it arrived within "
            f"{waited_s:g} s. Check the run id (the name of the coordinator's run folder, which it prints) and that "
            f"the coordinator is running; or {who} may not read the run's topics (with `collective broker`, log in as "
            "the watcher user of credentials.txt). Wait longer with --idle-timeout SECONDS."
        )


class EventSubscription:
    """The background connection and the ordered iterator over what it receives."""

    def __init__(
        self,
        address: BrokerAddress,
        run_id: str,
        *,
        start_timeout: float = START_TIMEOUT_S,
        idle_timeout: float | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.run_id = run_id
        self.topics = Topics(run_id)
        self.start_timeout = start_timeout
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.sequencer = EventSequencer(run_id)
        self._inbox: queue.Queue[tuple[str, Any, Any]] = queue.Queue()  # ready, message or failed
        self._pending: list[RunRecord] = []
        self._closing = False
        self._subscribed_at = 0.0
        self._thread: LoopThread | None = None  # started by open()
        # a first connection that fails is reported, not retried
        self.connection = Connection(
            address, WATCHER, self.topics.watcher_subscriptions(), self._received,
            on_connect=self._connected, timeout=connect_timeout, retry_first=False,
        )

    # ------------------------------------------------------------------ main thread

    def open(self) -> EventSubscription:
        """Check the broker, log in and subscribe (raises DistributedError with what to do)."""
        self._thread = LoopThread("collective-watch").start()
        self._thread.submit(self._watch()).add_done_callback(self._ended)
        patience = 4 * self.connect_timeout + 5
        try:
            kind, value, _ = self._inbox.get(timeout=patience)
        except queue.Empty:
            self.close()
            raise DistributedError(f"no answer from the broker at {self.address.display()} within {patience:g} s") from None
        if kind == "failed":
            self.close()
            raise value
        self._subscribed_at = time.monotonic()
        return self

    def __iter__(self) -> Iterator[RunRecord]:
        return self

    def __next__(self) -> RunRecord:
        sequencer = self.sequencer
        last_news = time.monotonic()
        ended_since: float | None = None
        while not self._pending:
            if sequencer.done:
                raise StopIteration
            now = time.monotonic()
            if sequencer.control is not None and sequencer.control.state == "ended":
                ended_since = ended_since or now
            if ended_since is not None:
                wait = ended_since + END_GRACE_S - now  # the end record may still be on its way
                if wait <= 0:
                    if sequencer.start is None:
                        raise NoSuchRun(sequencer.why_nothing(self.address, now - self._subscribed_at))
                    log.warning("the coordinator of run %s ended the run without its end record", self.run_id)
                    raise StopIteration
            elif sequencer.start is None and not sequencer.seen_run:
                wait = self._subscribed_at + self.start_timeout - now
                if wait <= 0:
                    raise NoSuchRun(sequencer.why_nothing(self.address, self.start_timeout))
            elif sequencer.start is not None and self.idle_timeout is not None:
                wait = last_news + self.idle_timeout - now
                if wait <= 0:
                    raise StopIteration  # the caller says the run has not ended
            else:
                wait = 1.0  # the coordinator is waiting for its nodes (control: open), or no idle limit
            try:
                kind, first, second = self._inbox.get(timeout=max(0.01, min(wait, 1.0)))
            except queue.Empty:
                continue
            if kind == "failed":  # the connection gave up (a reconnect was refused)
                raise first
            if kind == "message":
                shown = sequencer.feed(first, second)
                if sequencer.mismatch is not None:
                    raise DistributedError(f"run {self.run_id}'s coordinator speaks another protocol: {sequencer.mismatch}")
                if shown:
                    last_news = time.monotonic()
                self._pending += shown
        return self._pending.pop(0)

    def close(self) -> None:
        """Disconnect and stop the background thread (idempotent)."""
        if self._closing:
            return
        self._closing = True
        thread = self._thread
        if thread is None:
            return
        if thread.alive:
            with contextlib.suppress(Exception):  # the connection may have ended already
                thread.call(self.connection.close(), timeout=10)
        thread.stop()

    # ------------------------------------------------------------------ loop thread

    async def _watch(self) -> None:
        # DNS, TCP, TLS and the login, each with what to do when it fails
        await preflight(self.address, None, timeout=self.connect_timeout)
        try:
            await self.connection.run()
        except aiomqtt.MqttError as exc:  # only the first connection's (later ones reconnect)
            raise DistributedError(describe_connect_error(self.address, exc)) from None

    async def _connected(self) -> None:
        if self.connection.connects == 0:
            self._inbox.put(("ready", None, None))
        else:
            log.info("back on the broker at %s", self.address.display())

    async def _received(self, topic: str, payload: bytes) -> None:
        self._inbox.put(("message", topic, payload))

    def _ended(self, future: concurrent.futures.Future[None]) -> None:
        """Whatever ends the connection other than `close()`, the main thread hears of it."""
        if future.cancelled() or future.exception() is None:
            return
        exc = future.exception()
        failure = exc if isinstance(exc, DistributedError) else DistributedError(f"the watcher's connection failed: {exc!r}")
        self._inbox.put(("failed", failure, None))


def subscribe_events(
    url: str,
    run_id: str,
    *,
    start_timeout: float = START_TIMEOUT_S,
    idle_timeout: float | None = None,
    connect_timeout: float = 10.0,
) -> Iterator[RunRecord]:
    """The records of distributed run `run_id` as they happen (see the module docstring).

    Connects before returning: an unreachable broker or a refused login raises
    `DistributedError` (a `PreflightFailed` naming the failing step) here. Iterating raises
    `NoSuchRun` when nothing of the run arrives within `start_timeout` seconds (a run whose
    coordinator is still waiting for its nodes counts as arrived), and stops after the
    RunEnd record, or after `idle_timeout` seconds without a new record once it started.
    Closing the iterator disconnects.
    """
    import re

    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise DistributedError(f"--run {run_id!r}: a run id is 1-64 letters, digits, '-' or '_'")
    address = parse_broker_url(url)
    subscription = EventSubscription(
        address, run_id, start_timeout=start_timeout, idle_timeout=idle_timeout, connect_timeout=connect_timeout
    ).open()
    return _records(subscription)


def _records(subscription: EventSubscription) -> Iterator[RunRecord]:
    try:
        yield from subscription
    finally:
        subscription.close()
