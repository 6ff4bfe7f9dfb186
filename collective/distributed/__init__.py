"""The distributed runtime: a coordinator and volunteer nodes talking through an MQTT broker.

The wire: `protocol` (versioned envelopes, topics), `limits` (every size bound: an
envelope's, the broker's packet), `payloads` (what the envelopes carry) and `wire` (tensors
and prediction rows, token or byte, on the wire). The connection: `mqtt` (broker URLs, TLS,
TCP_NODELAY), `connection` (the one reconnecting connection every party holds),
`loop_thread` (the asyncio loop that synchronous code drives), `preflight` (step-by-step
connection checks). The coordinator: `coordinator` (the `Executor` the round engine drives,
and `connect_executor`), `roster` (who serves which node), `rounds` (a round's requests and
results), `validation` (what a result must be, its firewall's screen records too),
`event_feed` (run records for watchers). The node: `volunteer`, its `mailbox` and its
`backend` (where its model and its rounds run; `host` serves several nodes, with
`host_batch`'s shared models and batched rounds). `watcher` is the read-only view of a run
(`subscribe_events`, behind `collective watch --broker`) and `broker` the Mosquitto
configuration. Nothing here is imported unless a distributed run is asked for
(`subscribe_events` too is imported on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collective.distributed.watcher import subscribe_events

__all__ = ["subscribe_events"]


def __getattr__(name: str) -> Any:
    if name == "subscribe_events":
        from collective.distributed.watcher import subscribe_events

        return subscribe_events
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
