"""PNG plots of a run, and the node layout that the terminal view and the PNGs share.

At the end of every run `write_run_plots(run_dir, report)` reads the run's `events.jsonl`
and writes three PNGs into the run folder, which `report.md` then embeds:

- `nll_per_round.png`: each member's NLL in the collective and the collective's, silent
  ensemble's and reference's, per round and as running means over the eval rounds;
- `gains.png`: every report row's NLL with its 95% CI, and the two headline gains;
- `topology.png`: the graph, each node coloured by its final gain from messages
  (isolated minus in-collective NLL), links drawn as wide as the messages they carried.

`plot_reach(summaries, out_path)` draws `collective reach`'s fraction-reached curves
against the paper's points from plain data. Drawing uses matplotlib's object API on an
Agg canvas (no pyplot, no global backend switch). A plot that fails logs a warning and
is left out; it never fails the run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import networkx as nx

log = logging.getLogger(__name__)

NLL_PLOT = "nll_per_round.png"
GAINS_PLOT = "gains.png"
TOPOLOGY_PLOT = "topology.png"


# ---------------------------------------------------------------------------- layout


@functools.lru_cache(maxsize=16)
def _layout(nodes: tuple[str, ...], edges: tuple[tuple[str, str], ...]) -> tuple[tuple[float, float], ...]:
    graph = nx.Graph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    degrees = {d for _, d in graph.degree()}
    if len(nodes) <= 2 or (degrees == {2} and nx.is_connected(graph)):
        positions = nx.circular_layout(graph)  # rings read best as rings
    else:
        try:
            positions = nx.kamada_kawai_layout(graph)  # deterministic; needs scipy
        except ImportError:
            positions = nx.spring_layout(graph, seed=0)
    xs = [float(positions[n][0]) for n in nodes]
    ys = [float(positions[n][1]) for n in nodes]

    def scale(values: list[float]) -> list[float]:
        low, high = min(values), max(values)
        return [0.5 if high - low < 1e-9 else (v - low) / (high - low) for v in values]

    return tuple(zip(scale(xs), scale(ys)))


def node_positions(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> dict[str, tuple[float, float]]:
    """Each node's place in the unit square (x right, y up), from a networkx layout.

    Rings get a circle, other graphs Kamada-Kawai (spring layout without scipy). Cached per
    topology, deterministic, and shared by the terminal view and the PNGs.
    """
    key_nodes = tuple(nodes)
    key_edges = tuple(sorted({(a, b) if a <= b else (b, a) for a, b in edges if a != b}))
    return dict(zip(key_nodes, _layout(key_nodes, key_edges)))
