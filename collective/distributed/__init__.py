"""The distributed runtime: a coordinator and volunteer nodes talking through an MQTT broker.

`protocol` holds the versioned envelopes and the topic layout, `mqtt` the client helpers
(broker URLs, TLS, TCP_NODELAY), `preflight` the step-by-step connection checks,
`coordinator` the `Executor` the round engine drives, `volunteer` the node process,
`watcher` the read-only view of a run's records (`subscribe_events`, behind `collective
watch --broker`) and `broker` the Mosquitto configuration. `cli` adds the `node` and
`broker` subcommands. Nothing here is imported unless a distributed run is asked for
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
