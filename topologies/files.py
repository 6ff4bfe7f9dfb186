"""Reading a communication graph from a file: an edge list or GraphML.

Edge lists (`.edgelist`, `.txt`) hold one `source target` pair per line (whitespace
separated, `#` starts a comment, extra columns are ignored); GraphML holds nodes and
edges explicitly. Node names must be the scenario's node ids, no more and no fewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import networkx as nx

EDGE_LIST_SUFFIXES = (".edgelist", ".txt")
GRAPHML_SUFFIXES = (".graphml",)


def read_topology_file(
    path: Path, node_ids: Sequence[str], *, directed: bool, error: type[Exception] = ValueError
) -> nx.Graph:
    """The graph in `path` over exactly `node_ids` (as strings); raises `error` otherwise.

    With directed=False every edge is undirected. With directed=True an edge list's lines
    are read as source -> target, and a GraphML file keeps its own edge directions (an
    undirected GraphML file has no orientation, so its edges go both ways).
    """
    suffix = path.suffix.lower()
    if suffix not in EDGE_LIST_SUFFIXES + GRAPHML_SUFFIXES:
        raise error(
            f"file: parameter `path` must end in {', '.join(EDGE_LIST_SUFFIXES + GRAPHML_SUFFIXES)}, "
            f"found {path.name!r}"
        )
    if not path.is_file():
        raise error(f"file: the topology file {str(path)!r} does not exist")
    try:
        if suffix in GRAPHML_SUFFIXES:
            graph = nx.read_graphml(path, node_type=str)
            if not directed and graph.is_directed():
                graph = graph.to_undirected()
        else:
            graph = nx.read_edgelist(
                path, create_using=nx.DiGraph if directed else nx.Graph, nodetype=str, data=False
            )
    except (nx.NetworkXError, OSError, UnicodeDecodeError, SyntaxError, ValueError) as err:
        # read_graphml raises a bare ElementTree ParseError (a SyntaxError) on malformed XML
        raise error(f"file: could not read the topology file {str(path)!r}: {err}") from err
    in_file, expected = set(graph.nodes), set(node_ids)
    if in_file != expected:
        missing, extra = sorted(expected - in_file), sorted(in_file - expected)
        raise error(
            f"file: {str(path)!r} has {len(in_file)} nodes but the scenario has {len(expected)}; "
            f"missing from the file: {', '.join(missing) or 'none'}; "
            f"in the file but not a node: {', '.join(extra) or 'none'}"
        )
    loops = sorted(str(u) for u, v in graph.edges() if u == v)
    if loops:
        raise error(f"file: {str(path)!r} links node {loops[0]!r} to itself; a node cannot message itself")
    return graph
