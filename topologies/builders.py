"""Communication graphs over a collective's nodes: who can send messages to whom.

`build_topology(kind, node_ids, seed=..., directed=..., **params)` validates the kind and
its parameters, builds a graph over positions 0..n-1 with networkx (seeded where the kind
is random), and relabels it onto the node ids. The result is always an `nx.DiGraph` whose
nodes are exactly `node_ids`, in that order; an edge u -> v means u may send to v. An
undirected kind becomes both directions of every edge. Self-loops never appear: a node
does not message itself.

Directed versions exist where the kind has a natural orientation (ring, line, star, grid,
complete, erdos_renyi, file); small_world, scale_free and random_regular are undirected
only and say so rather than inventing an orientation.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import networkx as nx

from topologies.files import read_topology_file


class TopologyError(ValueError):
    """A topology kind or parameter is wrong; the message names it and what was expected."""


# kind -> {parameter: "type (default): meaning"}, for validation messages and scenario docs.
topology_params_schema: dict[str, dict[str, str]] = {
    "ring": {},
    "line": {},
    "star": {
        "center": "node id (default: the first node): the hub every other node is linked to",
        "direction": "'in' or 'out' (default 'in'), directed only: leaves send to the center "
        "('in') or the center sends to the leaves ('out')",
    },
    "complete": {},
    "grid": {
        "rows": "int (default: derived): number of rows; rows * cols must equal the node count",
        "cols": "int (default: derived): number of columns",
        "periodic": "bool (default false): wrap around into a torus",
    },
    "small_world": {
        "k": "even int >= 2 and < n (default 4): each node starts linked to its k nearest ring neighbours",
        "p": "float in [0, 1] (default 0.1): probability of rewiring each edge (kept connected)",
    },
    "scale_free": {
        "m": "int, 1 <= m < n (default 2): edges each new node attaches with (Barabási-Albert)",
    },
    "random_regular": {
        "d": "int, 0 <= d < n with n * d even (default 3): every node's degree",
    },
    "erdos_renyi": {
        "p": "float in [0, 1] (default 0.3): probability of each edge (each ordered pair when directed)",
    },
    "file": {
        "path": "path to an edge list (.edgelist, .txt: one 'source target' pair per line) or "
        "a .graphml file; its node names must be the node ids",
    },
}

_DIRECTED_DESCRIPTION = {
    "ring": "one direction around the ring, in node order",
    "line": "from each node to the next, in node order",
    "star": "leaves to center, or center to leaves (param direction)",
    "complete": "every ordered pair (the same as undirected)",
    "grid": "to the right and downwards",
    "erdos_renyi": "each ordered pair independently with probability p",
    "file": "edges as written in the file",
}


def _int_param(kind: str, name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyError(f"{kind}: parameter `{name}` must be an integer, found {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise TopologyError(f"{kind}: parameter `{name}` must be {bound}, found {value}")
    return value


def _probability(kind: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise TopologyError(f"{kind}: parameter `{name}` must be a probability in [0, 1], found {value!r}")
    return float(value)


# Each builder returns a graph over positions 0..n-1 (nx.Graph, or nx.DiGraph if directed).


def _ring(n: int, seed: int, directed: bool) -> nx.Graph:
    return nx.cycle_graph(n, create_using=nx.DiGraph if directed else nx.Graph)


def _line(n: int, seed: int, directed: bool) -> nx.Graph:
    return nx.path_graph(n, create_using=nx.DiGraph if directed else nx.Graph)


def _complete(n: int, seed: int, directed: bool) -> nx.Graph:
    return nx.complete_graph(n, create_using=nx.DiGraph if directed else nx.Graph)


def _star(n: int, seed: int, directed: bool, *, center: int = 0, direction: str = "in") -> nx.Graph:
    if direction not in ("in", "out"):
        raise TopologyError(f"star: parameter `direction` must be 'in' or 'out', found {direction!r}")
    graph = nx.DiGraph() if directed else nx.Graph()
    graph.add_nodes_from(range(n))
    for leaf in range(n):
        if leaf != center:
            graph.add_edge(*((leaf, center) if direction == "in" else (center, leaf)))
    return graph


def _grid(
    n: int, seed: int, directed: bool, *, rows: Any = None, cols: Any = None, periodic: Any = False
) -> nx.Graph:
    if rows is None and cols is None:
        rows = max(r for r in range(1, int(n**0.5) + 1) if n % r == 0)
    if rows is not None:
        rows = _int_param("grid", "rows", rows, 1)
    if cols is not None:
        cols = _int_param("grid", "cols", cols, 1)
    if cols is None:
        cols = n // rows if n % rows == 0 else None
    if rows is None:
        rows = n // cols if n % cols == 0 else None
    if rows is None or cols is None or rows * cols != n:
        raise TopologyError(
            f"grid: parameters `rows` x `cols` must multiply to the node count {n}, "
            f"found rows={rows}, cols={cols}"
        )
    if not isinstance(periodic, bool):
        raise TopologyError(f"grid: parameter `periodic` must be true or false, found {periodic!r}")
    graph = nx.DiGraph() if directed else nx.Graph()
    graph.add_nodes_from(range(n))
    for r in range(rows):
        for c in range(cols):
            here = r * cols + c  # row-major: node_ids[r * cols + c] sits at (r, c)
            if c + 1 < cols or (periodic and cols > 2):
                graph.add_edge(here, r * cols + (c + 1) % cols)
            if r + 1 < rows or (periodic and rows > 2):
                graph.add_edge(here, ((r + 1) % rows) * cols + c)
    return graph


def _small_world(n: int, seed: int, directed: bool, *, k: Any = 4, p: Any = 0.1) -> nx.Graph:
    k = _int_param("small_world", "k", k, 2, n - 1)
    if k % 2:
        raise TopologyError(f"small_world: parameter `k` must be even (k/2 neighbours each side), found {k}")
    p = _probability("small_world", "p", p)
    try:
        return nx.connected_watts_strogatz_graph(n, k, p, tries=100, seed=seed)
    except nx.NetworkXError as err:
        raise TopologyError(f"small_world: no connected graph with n={n}, k={k}, p={p}: {err}") from err


def _scale_free(n: int, seed: int, directed: bool, *, m: Any = 2) -> nx.Graph:
    m = _int_param("scale_free", "m", m, 1, n - 1)
    return nx.barabasi_albert_graph(n, m, seed=seed)


def _random_regular(n: int, seed: int, directed: bool, *, d: Any = 3) -> nx.Graph:
    d = _int_param("random_regular", "d", d, 0, n - 1)
    if (n * d) % 2:
        raise TopologyError(f"random_regular: n * d must be even, found n={n}, d={d}")
    return nx.random_regular_graph(d, n, seed=seed)


def _erdos_renyi(n: int, seed: int, directed: bool, *, p: Any = 0.3) -> nx.Graph:
    p = _probability("erdos_renyi", "p", p)
    return nx.gnp_random_graph(n, p, seed=seed, directed=directed)


_BUILDERS: dict[str, Callable[..., nx.Graph]] = {
    "ring": _ring,
    "line": _line,
    "star": _star,
    "complete": _complete,
    "grid": _grid,
    "small_world": _small_world,
    "scale_free": _scale_free,
    "random_regular": _random_regular,
    "erdos_renyi": _erdos_renyi,
}

KNOWN_TOPOLOGIES: tuple[str, ...] = (*_BUILDERS, "file")


def _check_params(kind: str, params: dict[str, Any]) -> None:
    accepted = topology_params_schema[kind]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        expected = ", ".join(f"`{name}`" for name in accepted) or "no parameters"
        raise TopologyError(f"{kind}: unknown parameter `{unknown[0]}`; {kind} takes {expected}")


def _check_node_ids(node_ids: Sequence[str]) -> list[str]:
    ids = list(node_ids)
    if not ids:
        raise TopologyError("a topology needs at least one node, found none")
    duplicates = sorted(node for node, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise TopologyError(f"node ids must be unique, found duplicates: {', '.join(duplicates)}")
    return ids


def _as_digraph(graph: nx.Graph, node_ids: list[str], labels: Sequence[Any]) -> nx.DiGraph:
    """graph over `labels` -> DiGraph over node_ids (labels[i] becomes node_ids[i])."""
    name_of = dict(zip(labels, node_ids, strict=True))
    result = nx.DiGraph()
    result.add_nodes_from(node_ids)
    for u, v in graph.edges():
        if u == v:
            continue
        result.add_edge(name_of[u], name_of[v])
        if not graph.is_directed():
            result.add_edge(name_of[v], name_of[u])
    return result


def build_topology(
    kind: str, node_ids: Sequence[str], *, seed: int, directed: bool = False, **params: Any
) -> nx.DiGraph:
    """The communication graph of `kind` over exactly `node_ids` (see topology_params_schema).

    Random kinds draw from `seed` alone: the same seed gives the same graph. The returned
    DiGraph keeps the node order of `node_ids` and records kind, seed and directed in
    `graph.graph`, so `nx.write_graphml` can save it and kind `file` can read it back.
    """
    if kind not in KNOWN_TOPOLOGIES:
        raise TopologyError(f"unknown topology kind {kind!r}; known kinds: {', '.join(KNOWN_TOPOLOGIES)}")
    if directed and kind not in _DIRECTED_DESCRIPTION:
        raise TopologyError(
            f"{kind} has no directed version; use directed: false, or kind: file with a "
            f"directed edge list (directed kinds: {', '.join(_DIRECTED_DESCRIPTION)})"
        )
    _check_params(kind, params)
    ids = _check_node_ids(node_ids)
    if kind == "file":
        if "path" not in params:
            raise TopologyError("file: parameter `path` is required (an .edgelist, .txt or .graphml file)")
        graph = read_topology_file(Path(params["path"]), ids, directed=directed, error=TopologyError)
        labels: Sequence[Any] = ids
    else:
        builder_params = dict(params)
        if kind == "star" and "center" in builder_params:
            center = builder_params["center"]
            if center not in ids:
                raise TopologyError(f"star: parameter `center` must be one of the node ids, found {center!r}")
            builder_params["center"] = ids.index(center)
        graph = _BUILDERS[kind](len(ids), seed, directed, **builder_params)
        labels = range(len(ids))
    result = _as_digraph(graph, ids, labels)
    result.graph.update(kind=kind, seed=seed, directed=directed)  # scalars: GraphML can store them
    return result


def describe_topologies() -> str:
    """Markdown: each kind, its parameters and its directed version, for the scenario docs."""
    lines = []
    for kind in KNOWN_TOPOLOGIES:
        directed = _DIRECTED_DESCRIPTION.get(kind, "none (undirected only)")
        lines.append(f"- `{kind}` (directed: {directed})")
        lines.extend(f"  - `{name}`: {meaning}" for name, meaning in topology_params_schema[kind].items())
    return "\n".join(lines)


def _signature_params(kind: str) -> set[str]:
    """The keyword parameters a builder takes (kept in step with topology_params_schema)."""
    builder = _BUILDERS[kind]
    return {
        name for name, parameter in inspect.signature(builder).parameters.items() if parameter.kind is parameter.KEYWORD_ONLY
    }


__all__ = [
    "KNOWN_TOPOLOGIES",
    "TopologyError",
    "build_topology",
    "describe_topologies",
    "topology_params_schema",
]
