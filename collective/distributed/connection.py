"""One MQTT connection that comes back when the broker goes away: aiomqtt's reconnection idiom, written once.

    while not stopped:
        try:
            async with make_client(...) as client:     # TCP_NODELAY, TLS, a last will
                subscribe -> on_connect(client) -> `connected` -> read until stopped
                -> farewell(client) -> disconnect cleanly
        except aiomqtt.MqttError:
            wait `interval` (0.5 s, doubling up to 10 s; back to 0.5 s once connected)

The coordinator, every volunteer node and every watcher hold one. What is theirs comes in
through callbacks: `on_connect` (publish what the broker must hold, send again what a
broker restart lost), `on_message` (every payload received, in order), `on_lost` (the line
a user sees while it reconnects) and `farewell` (last words before a clean disconnect).
A client publishes through `publish` (QoS 1) and never holds the aiomqtt client itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import aiomqtt

from collective.distributed.mqtt import BrokerAddress, DistributedError, client_id, make_client

log = logging.getLogger(__name__)

FIRST_INTERVAL_S = 0.5
MAX_INTERVAL_S = 10.0

OnConnect = Callable[[], Awaitable[None]]
OnMessage = Callable[[str, bytes], Awaitable[None]]
OnLost = Callable[[aiomqtt.MqttError, float], None]  # the error, seconds until the next try
Farewell = Callable[[bool], Awaitable[None]]  # True: interrupted (cancelled), False: stopped


class SubscriptionRefused(DistributedError):
    """The broker will not let this login read a topic it needs (its ACL)."""


@dataclass(eq=False)
class Connection:
    """A reconnecting connection to one broker (see the module docstring).

    `run()` serves until `stop()` (or `close()`); `connected` is set while the connection is
    up, and `lost_at` holds the loop time it last broke. `retry_first=False` makes an error
    before the first connection final: the caller reports it instead of retrying forever.
    `role` names the MQTT client id, made fresh for every connection.
    """

    address: BrokerAddress
    role: str
    subscriptions: Sequence[str]
    on_message: OnMessage
    _: KW_ONLY
    on_connect: OnConnect | None = None
    on_lost: OnLost | None = None
    farewell: Farewell | None = None
    will: aiomqtt.Will | None = None
    timeout: float = 10.0
    retry_first: bool = True
    connected: asyncio.Event = field(default_factory=asyncio.Event, init=False)  # bound to the loop that first waits
    lost_at: float | None = field(default=None, init=False)
    connects: int = field(default=0, init=False)
    _client: aiomqtt.Client | None = field(default=None, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _task: asyncio.Task[Any] | None = field(default=None, init=False)

    # ------------------------------------------------------------------ the loop

    def start(self) -> asyncio.Task[None]:
        """`run()` as a task of the running loop."""
        task = asyncio.ensure_future(self.run())
        self._task = task
        return task

    async def run(self) -> None:
        """Connect, and connect again whenever the connection breaks, until `stop()`."""
        self._task = asyncio.current_task()
        interval = FIRST_INTERVAL_S
        while not self._stopping.is_set():
            try:
                async with make_client(
                    self.address, identifier=client_id(self.role), will=self.will, timeout=self.timeout
                ) as client:
                    interval = FIRST_INTERVAL_S
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                self._broke()
                if self._stopping.is_set():
                    return
                if self.connects == 0 and not self.retry_first:
                    raise
                log.warning("lost the broker at %s (%s); reconnecting in %.1f s", self.address.display(), exc, interval)
                if self.on_lost is not None:
                    self.on_lost(exc, interval)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), interval)
                interval = min(2 * interval, MAX_INTERVAL_S)
            finally:
                self._broke()

    async def _serve(self, client: aiomqtt.Client) -> None:
        """One connection: subscribe, announce, read until stopped, say goodbye."""
        self._client = client
        for topic in self.subscriptions:
            granted = await client.subscribe(topic, qos=1)
            if any(getattr(code, "value", code) >= 128 for code in granted):
                raise SubscriptionRefused(self._refusal(topic))
        if self.on_connect is not None:
            await self.on_connect()
        self.connects += 1
        self.connected.set()
        reader = asyncio.ensure_future(self._read(client))
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if self.farewell is not None:
                await self.farewell(True)
            raise
        finally:
            reader.cancel()
            stopper.cancel()
        if reader.done() and not reader.cancelled() and (error := reader.exception()) is not None:
            raise error
        if self.farewell is not None:
            await self.farewell(False)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            raw = message.payload
            payload = bytes(raw) if isinstance(raw, (bytes, bytearray)) else str(raw or "").encode()
            await self.on_message(str(message.topic), payload)

    def _broke(self) -> None:
        self._client = None
        if self.connected.is_set():
            self.lost_at = asyncio.get_running_loop().time()
        self.connected.clear()

    def _refusal(self, topic: str) -> str:
        who = f"user {self.address.username!r}" if self.address.username else "an anonymous client"
        return (
            f"the broker at {self.address.display()} refused to let {who} read {topic}; with `collective broker`, "
            "a node logs in as its node id, the coordinator as coordinator and a read-only watcher as the watcher "
            "user of credentials.txt"
        )

    # ------------------------------------------------------------------ for the holder

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish with QoS 1; False when not connected or the publish failed (logged)."""
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            log.warning("could not publish to %s: %s", topic, exc)
            return False
        return True

    async def wait_connected(self, timeout: float) -> bool:
        """Whether the connection is up within `timeout` s; raises what ended `run()`, if it failed."""
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            task.result()  # raises what ended it, if anything did
        if self.connected.is_set():
            return True
        waiter = asyncio.ensure_future(self.connected.wait())
        watched: set[asyncio.Future[Any]] = {waiter}
        if task is not None:
            watched.add(task)
        try:
            await asyncio.wait(watched, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task is not None and task.done() and not task.cancelled() and not self.connected.is_set():
            task.result()
        return self.connected.is_set()

    def stop(self) -> None:
        """End `run()`: after the current connection's farewell, or at once while it reconnects."""
        self._stopping.set()

    async def close(self, timeout: float = 5.0) -> None:
        """`stop()` and wait for `run()` to end (cancelled after `timeout` s: a connect in progress)."""
        self.stop()
        task = self._task
        if task is None or task is asyncio.current_task():
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
