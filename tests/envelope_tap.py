"""A listener on a live run's request and result topics, for the real-broker host envelope tests:
which envelope kinds went where in each round, how large each was, and the raw envelopes (to
forge from). It logs in as the coordinator (which may read every topic) in a thread of its own."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from typing import Any

import aiomqtt

from collective.distributed.mqtt import parse_broker_url
from collective.distributed.protocol import Topics


class EnvelopeTap:
    """`with EnvelopeTap(url, run_id) as tap:` subscribed before the block runs; then
    `tap.kinds[("to/box", 2)]` (the kinds sent on coord/to/box in round 2, in order),
    `tap.sizes` (the same keys: bytes), `tap.raw` (the same keys: the envelopes)."""

    def __init__(self, url: str, run_id: str) -> None:
        self.address = parse_broker_url(url)
        self.topics = Topics(run_id)
        self.kinds: dict[tuple[str, int], list[str]] = defaultdict(list)
        self.sizes: dict[tuple[str, int], list[int]] = defaultdict(list)
        self.raw: dict[tuple[str, int], list[bytes]] = defaultdict(list)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)

    @property
    def heard_on(self) -> set[str]:
        """Where anything was heard ("to/box", "result/a"), in any round."""
        return {where for where, _ in self.kinds}

    def __enter__(self) -> EnvelopeTap:
        self._thread.start()
        assert self._ready.wait(10), "the envelope tap could not subscribe"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _listen(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        address = self.address
        async with aiomqtt.Client(address.host, address.port, username=address.username, password=address.password) as client:
            await client.subscribe(f"{self.topics.root}/coord/to/#", qos=1)
            await client.subscribe(f"{self.topics.root}/nodes/+/result", qos=1)
            self._ready.set()
            reader = asyncio.ensure_future(self._read(client))
            await self._stop.wait()
            reader.cancel()

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            info = self.topics.parse(str(message.topic))
            raw = message.payload
            if info is None or not isinstance(raw, (bytes, bytearray)):
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                continue  # a test's own garbage
            where = f"to/{info.target}" if info.channel == "to" else f"result/{info.owner}"
            key = (where, int(data.get("round_index", -1)))
            self.kinds[key].append(str(data.get("kind")))
            self.sizes[key].append(len(raw))
            self.raw[key].append(bytes(raw))
