"""The run's records for watchers: in order, each once, oversized ones skipped, start and end
retained and republished (no broker: the connection is a stand-in that records publishes)."""

from __future__ import annotations

import asyncio

from collective.distributed.event_feed import EventFeed
from collective.distributed.protocol import decode_envelope
from collective.records import RunEnd


class RecordingConnection:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []

    async def wait_connected(self, timeout: float) -> bool:
        return True

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        self.published.append((topic, payload, retain))
        return True


def _end(detail: str) -> RunEnd:
    return RunEnd(run_id="r1", status="complete", rounds_done=3, detail=detail)


def test_records_go_out_in_order_oversized_ones_are_skipped_and_the_retained_ones_come_back_on_reconnect():
    connection = RecordingConnection()
    feed = EventFeed(connection, "r1", max_bytes=600)  # type: ignore[arg-type]

    async def scenario() -> None:
        publisher = asyncio.ensure_future(feed.run())
        for record in (_end("first"), _end("x" * 1_000), _end("last")):
            feed.queue.put_nowait(feed.wire(record))
        await feed.drain(5)
        publisher.cancel()
        assert await feed.republish()

    asyncio.run(scenario())
    topics = [topic for topic, _, _ in connection.published]
    assert topics == ["collective/r1/coord/events/end"] * 2 + ["collective/r1/coord/events/start", "collective/r1/coord/events/end"]
    details = [decode_envelope(raw, 1 << 20).payload.record.detail for _, raw, _ in connection.published if raw]  # type: ignore[union-attr]
    assert details == ["first", "last", "last"]  # the oversized one never went out; the last end is the retained one
    assert all(retain for _, _, retain in connection.published)
    assert connection.published[2][1] == b""  # no start record yet: an empty retained payload clears an old one
