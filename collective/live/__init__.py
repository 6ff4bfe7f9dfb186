"""What people watch while a collective runs: a state folded from events, and pure views.

Events (`RunStart`, `RoundEvent`, `RunEnd`) come from the engine's `on_event`, from a
run folder's `events.jsonl` (`collective.live.replay`) or from a distributed run's broker
(`collective.distributed.subscribe_events`). Whatever the
source, they are folded into one immutable `LiveState` (`state = state.apply(event)`), and
each view is a pure function of that snapshot that returns a rich renderable:

    events --apply--> LiveState --dashboard(state, width, height)--> renderable --Live--> screen

Only `collective.live.display` owns a `rich.live.Live`; everything here renders to a string in tests.
"""

from collective.live.dashboard import (
    collective_view,
    dashboard,
    header_view,
    node_table,
    round_line,
    sparkline,
)
from collective.live.state import LiveState, NodeState
from collective.live.topology import topology_view

__all__ = [
    "LiveState",
    "NodeState",
    "collective_view",
    "dashboard",
    "header_view",
    "node_table",
    "round_line",
    "sparkline",
    "topology_view",
]
