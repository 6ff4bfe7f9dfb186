"""The run's records for read-only watchers: every line of events.jsonl, also on `coord/events/`.

The runner hands each record over from its own thread (`EventFeed.put` through the loop
thread: it never blocks and never raises); one task publishes them in order, each at most
once, waiting out a broker outage for a while. A record over the packet size a broker
sized for the scenario takes is skipped with a warning. The start and end records are
retained, and republished whenever the coordinator reconnects (`republish`): a watcher
that attaches mid-run gets the start first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from collective.distributed.connection import Connection
from collective.distributed.payloads import EventPayload
from collective.distributed.protocol import (
    COORDINATOR,
    Topics,
    encode,
    envelope,
    event_record_topic,
)
from collective.records import RoundEvent, RunRecord

log = logging.getLogger(__name__)

EVENT_PATIENCE_S = 10.0  # how long a run record waits for the broker (through an outage) before it is skipped
EVENT_DRAIN_S = 5.0  # at the end, how long the records still queued get to reach the broker

Queued = tuple[str, bytes, bool]  # topic, envelope, retained


class EventFeed:
    """Run records queued in, published in order on coord/events/ (see the module docstring)."""

    def __init__(self, connection: Connection, run_id: str, max_bytes: int) -> None:
        self.connection = connection
        self.run_id = run_id
        self.topics = Topics(run_id)
        self.max_bytes = max_bytes
        self.queue: asyncio.Queue[Queued] = asyncio.Queue()  # bound to the loop that first uses it
        self._retained: dict[str, bytes] = {}  # topic -> the start/end record, republished on reconnect

    def wire(self, record: RunRecord) -> Queued:
        """Where the record goes, its envelope, and whether the broker retains it."""
        kind, retain = event_record_topic(record)
        round_index = record.round_index if isinstance(record, RoundEvent) else -1
        payload = encode(envelope(self.run_id, COORDINATOR, EventPayload(record=record), round_index))
        return self.topics.event(kind), payload, retain

    async def run(self) -> None:
        """Send the queued run records one after another (in order), each at most once."""
        while True:
            topic, payload, retain = await self.queue.get()
            try:
                if len(payload) > self.max_bytes:
                    log.warning(
                        "the run record for %s is %d bytes, over the %d a broker sized for this scenario takes: "
                        "watchers miss it", topic, len(payload), self.max_bytes,
                    )
                    continue
                if retain:
                    self._retained[topic] = payload
                await self._publish(topic, payload, retain)
            except Exception as exc:  # never let one record stop the others
                log.warning("could not publish the run record for %s: %r", topic, exc)
            finally:
                self.queue.task_done()

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + EVENT_PATIENCE_S
        for _attempt in range(2):  # once more after a reconnect, no more (an oversized one would loop)
            if not await self.connection.wait_connected(give_up - loop.time()):
                break
            if await self.connection.publish(topic, payload, retain=retain):
                return
            await asyncio.sleep(0.1)
        log.warning("could not publish the run record for %s within %.0f s: watchers miss it", topic, EVENT_PATIENCE_S)

    async def republish(self) -> bool:
        """The retained records again (after a broker restart); on the first connect an empty
        payload clears what an earlier run under the same id left there."""
        published = True
        for topic in (self.topics.event("start"), self.topics.event("end")):
            published &= await self.connection.publish(topic, self._retained.get(topic, b""), retain=True)
        return published

    async def drain(self, timeout: float = EVENT_DRAIN_S) -> None:
        """Wait (up to `timeout` s) for the queued records to go out."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)
