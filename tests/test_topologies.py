from __future__ import annotations

import networkx as nx
import pytest

from topologies import (
    KNOWN_TOPOLOGIES,
    TopologyError,
    build_topology,
    describe_topologies,
    topology_params_schema,
)
from topologies.builders import _BUILDERS, _signature_params

IDS = [f"n{i}" for i in range(12)]


def _out_degrees(graph: nx.DiGraph) -> list[int]:
    return [degree for _, degree in graph.out_degree()]


def _is_symmetric(graph: nx.DiGraph) -> bool:
    return all(graph.has_edge(v, u) for u, v in graph.edges())


@pytest.mark.parametrize("kind", [k for k in KNOWN_TOPOLOGIES if k != "file"])
def test_every_kind_is_a_digraph_over_exactly_the_node_ids_in_order_without_self_loops(kind):
    graph = build_topology(kind, IDS, seed=3)
    assert isinstance(graph, nx.DiGraph)
    assert list(graph.nodes) == IDS
    assert nx.number_of_selfloops(graph) == 0
    assert _is_symmetric(graph), "an undirected kind must give both directions of every edge"
    assert graph.graph["kind"] == kind and graph.graph["seed"] == 3


def test_a_ring_links_each_node_to_its_two_neighbours():
    graph = build_topology("ring", IDS, seed=0)
    assert graph.number_of_edges() == 2 * 12
    assert _out_degrees(graph) == [2] * 12
    assert graph.has_edge("n11", "n0") and graph.has_edge("n0", "n11")


def test_a_directed_ring_goes_one_way_in_node_order():
    graph = build_topology("ring", IDS, seed=0, directed=True)
    assert sorted(graph.edges()) == sorted((IDS[i], IDS[(i + 1) % 12]) for i in range(12))


def test_a_line_has_two_ends_and_its_directed_version_flows_forward():
    graph = build_topology("line", IDS, seed=0)
    assert graph.number_of_edges() == 2 * 11
    assert graph.out_degree("n0") == graph.out_degree("n11") == 1
    directed = build_topology("line", IDS, seed=0, directed=True)
    assert list(directed.edges()) == [(IDS[i], IDS[i + 1]) for i in range(11)]


def test_a_star_links_every_leaf_to_the_first_node_by_default():
    graph = build_topology("star", IDS, seed=0)
    assert graph.out_degree("n0") == 11
    assert all(graph.out_degree(node) == 1 for node in IDS[1:])


def test_a_directed_star_gathers_into_its_center_or_broadcasts_from_it():
    gather = build_topology("star", IDS, seed=0, directed=True, center="n5")
    assert gather.in_degree("n5") == 11 and gather.out_degree("n5") == 0
    broadcast = build_topology("star", IDS, seed=0, directed=True, center="n5", direction="out")
    assert broadcast.out_degree("n5") == 11 and broadcast.in_degree("n5") == 0


def test_a_complete_graph_links_every_ordered_pair_directed_or_not():
    graph = build_topology("complete", IDS, seed=0)
    assert graph.number_of_edges() == 12 * 11
    assert set(build_topology("complete", IDS, seed=0, directed=True).edges()) == set(graph.edges())


def test_a_grid_is_row_major_with_four_neighbours_inside_and_a_torus_when_periodic():
    graph = build_topology("grid", IDS, seed=0, rows=3, cols=4)
    assert graph.number_of_edges() == 2 * (3 * 3 + 2 * 4)
    assert graph.out_degree("n0") == 2 and graph.out_degree("n5") == 4  # corner, interior (1, 1)
    assert graph.has_edge("n0", "n1") and graph.has_edge("n0", "n4")
    torus = build_topology("grid", IDS, seed=0, rows=3, cols=4, periodic=True)
    assert _out_degrees(torus) == [4] * 12


def test_a_grid_derives_a_missing_side_and_its_directed_version_flows_right_and_down():
    assert build_topology("grid", IDS, seed=0, cols=6).has_edge("n0", "n6")
    assert build_topology("grid", IDS, seed=0).number_of_edges() == 2 * (3 * 3 + 2 * 4)  # 3 x 4
    directed = build_topology("grid", IDS, seed=0, directed=True, rows=3, cols=4)
    assert directed.number_of_edges() == 3 * 3 + 2 * 4
    assert all(IDS.index(v) > IDS.index(u) for u, v in directed.edges())


def test_a_small_world_keeps_the_edge_count_of_its_lattice_and_stays_connected():
    graph = build_topology("small_world", IDS, seed=1, k=4, p=0.3)
    assert graph.number_of_edges() == 2 * 12 * 4 // 2
    assert nx.is_strongly_connected(graph)
    lattice = build_topology("small_world", IDS, seed=1, k=4, p=0.0)
    assert _out_degrees(lattice) == [4] * 12


def test_a_scale_free_graph_has_the_barabasi_albert_edge_count():
    m = 2
    graph = build_topology("scale_free", IDS, seed=1, m=m)
    assert graph.number_of_edges() == 2 * m * (12 - m)
    assert min(_out_degrees(graph)) >= m


def test_a_random_regular_graph_gives_every_node_degree_d():
    assert _out_degrees(build_topology("random_regular", IDS, seed=1, d=4)) == [4] * 12


def test_erdos_renyi_extremes_are_empty_and_complete_and_directed_pairs_are_independent():
    assert build_topology("erdos_renyi", IDS, seed=1, p=0.0).number_of_edges() == 0
    assert build_topology("erdos_renyi", IDS, seed=1, p=1.0).number_of_edges() == 12 * 11
    directed = build_topology("erdos_renyi", [f"n{i}" for i in range(40)], seed=1, directed=True, p=0.5)
    assert not _is_symmetric(directed)


@pytest.mark.parametrize(
    ("kind", "params"),
    [("small_world", {"k": 4, "p": 0.5}), ("scale_free", {"m": 2}), ("random_regular", {"d": 3}), ("erdos_renyi", {"p": 0.3})],
)
def test_random_kinds_are_reproducible_per_seed_and_differ_across_seeds(kind, params):
    ids = [f"n{i}" for i in range(30)]
    first = build_topology(kind, ids, seed=7, **params)
    assert list(first.edges()) == list(build_topology(kind, ids, seed=7, **params).edges())
    others = [set(build_topology(kind, ids, seed=s, **params).edges()) for s in (8, 9, 10)]
    assert any(edges != set(first.edges()) for edges in others)


# ------------------------------------------------------------------ files


def test_an_edge_list_file_round_trips_into_the_same_graph(tmp_path):
    original = build_topology("small_world", IDS, seed=2, k=4, p=0.5)
    path = tmp_path / "graph.edgelist"
    nx.write_edgelist(original.to_undirected(), path, data=False)
    loaded = build_topology("file", IDS, seed=0, path=path)
    assert list(loaded.nodes) == IDS
    assert set(loaded.edges()) == set(original.edges())


def test_a_directed_edge_list_keeps_its_directions(tmp_path):
    path = tmp_path / "graph.txt"
    path.write_text("# who reads whom\nn0 n1\nn1 n2 extra-column\nn2 n0\n", encoding="utf-8")
    graph = build_topology("file", ["n0", "n1", "n2"], seed=0, directed=True, path=str(path))
    assert set(graph.edges()) == {("n0", "n1"), ("n1", "n2"), ("n2", "n0")}
    undirected = build_topology("file", ["n0", "n1", "n2"], seed=0, path=str(path))
    assert undirected.number_of_edges() == 6


def test_a_graphml_file_round_trips_including_directions(tmp_path):
    original = build_topology("star", IDS, seed=0, directed=True, center="n3")
    path = tmp_path / "graph.graphml"
    nx.write_graphml(original, path)
    loaded = build_topology("file", IDS, seed=0, directed=True, path=path)
    assert set(loaded.edges()) == set(original.edges())
    assert list(loaded.nodes) == IDS


def test_a_file_whose_nodes_disagree_says_both_counts_and_which_names(tmp_path):
    path = tmp_path / "graph.edgelist"
    path.write_text("n0 n1\nn1 stranger\n", encoding="utf-8")
    with pytest.raises(TopologyError) as info:
        build_topology("file", ["n0", "n1", "n2", "n3"], seed=0, path=path)
    message = str(info.value)
    assert "has 3 nodes but the scenario has 4" in message
    assert "missing from the file: n2, n3" in message
    assert "in the file but not a node: stranger" in message


def test_file_errors_name_the_path_and_what_was_expected(tmp_path):
    with pytest.raises(TopologyError, match="does not exist"):
        build_topology("file", IDS, seed=0, path=tmp_path / "none.edgelist")
    with pytest.raises(TopologyError, match=r"must end in \.edgelist, \.txt, \.graphml"):
        build_topology("file", IDS, seed=0, path=tmp_path / "graph.csv")
    with pytest.raises(TopologyError, match="`path` is required"):
        build_topology("file", IDS, seed=0)
    broken = tmp_path / "broken.graphml"
    broken.write_text("<graphml><graph", encoding="utf-8")
    with pytest.raises(TopologyError, match="could not read"):
        build_topology("file", IDS, seed=0, path=broken)
    loop = tmp_path / "loop.txt"
    loop.write_text("n0 n0\nn0 n1\n", encoding="utf-8")
    with pytest.raises(TopologyError, match="itself"):
        build_topology("file", ["n0", "n1"], seed=0, path=loop)


# ------------------------------------------------------------------ errors


def test_an_unknown_kind_lists_the_known_ones():
    with pytest.raises(TopologyError, match="unknown topology kind 'hypercube'; known kinds: ring, line, star"):
        build_topology("hypercube", IDS, seed=0)


def test_an_unknown_parameter_is_named_with_the_accepted_ones():
    with pytest.raises(TopologyError, match="small_world: unknown parameter `beta`; small_world takes `k`, `p`"):
        build_topology("small_world", IDS, seed=0, beta=0.2)
    with pytest.raises(TopologyError, match="ring takes no parameters"):
        build_topology("ring", IDS, seed=0, k=2)


@pytest.mark.parametrize(
    ("kind", "params", "expected"),
    [
        ("grid", {"rows": 5}, "multiply to the node count 12"),
        ("grid", {"rows": 3, "cols": 5}, "rows=3, cols=5"),
        ("grid", {"rows": "3"}, "`rows` must be an integer"),
        ("small_world", {"k": 3}, "`k` must be even"),
        ("small_world", {"k": 12}, "`k` must be between 2 and 11"),
        ("small_world", {"p": 1.5}, "`p` must be a probability"),
        ("scale_free", {"m": 0}, "`m` must be between 1 and 11"),
        ("random_regular", {"d": 3.0}, "`d` must be an integer"),
        ("erdos_renyi", {"p": True}, "`p` must be a probability"),
        ("star", {"center": "nobody"}, "`center` must be one of the node ids"),
        ("star", {"direction": "sideways"}, "'in' or 'out'"),
    ],
)
def test_bad_parameters_name_the_parameter_and_what_was_expected(kind, params, expected):
    with pytest.raises(TopologyError, match=expected):
        build_topology(kind, IDS, seed=0, **params)


def test_random_regular_needs_an_even_number_of_edge_ends():
    with pytest.raises(TopologyError, match="n \\* d must be even, found n=11, d=3"):
        build_topology("random_regular", IDS[:11], seed=0, d=3)


def test_kinds_without_a_natural_orientation_refuse_directed():
    with pytest.raises(TopologyError, match="small_world has no directed version"):
        build_topology("small_world", IDS, seed=0, directed=True)


def test_node_ids_must_be_unique_and_non_empty():
    with pytest.raises(TopologyError, match="duplicates: n1"):
        build_topology("ring", ["n0", "n1", "n1"], seed=0)
    with pytest.raises(TopologyError, match="at least one node"):
        build_topology("ring", [], seed=0)


def test_tiny_collectives_get_no_self_loops():
    assert build_topology("ring", ["solo"], seed=0).number_of_edges() == 0
    assert set(build_topology("ring", ["a", "b"], seed=0).edges()) == {("a", "b"), ("b", "a")}


def test_the_parameter_schema_documents_exactly_what_each_builder_takes():
    assert set(topology_params_schema) == set(KNOWN_TOPOLOGIES)
    for kind in _BUILDERS:
        assert set(topology_params_schema[kind]) == _signature_params(kind), kind
    docs = describe_topologies()
    assert all(f"`{kind}`" in docs for kind in KNOWN_TOPOLOGIES)
