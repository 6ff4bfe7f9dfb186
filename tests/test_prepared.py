"""What a run checks on its scenario before loading anything: the topology's graph and the
link overrides that must name its links (`build_graph`, which `collective run` and
`collective validate` both call)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from collective.cli import main
from collective.run.prepared import RunError, build_graph
from collective.scenario import load_scenario, parse_scenario


def _scenario(topology: dict[str, Any], links: list[dict[str, Any]], *, count: int = 3, seed: int = 0) -> dict[str, Any]:
    return {
        "name": "links",
        "seed": seed,
        "models": {"m": "some/model"},
        "corpus": {"train_tokens": 128, "eval_tokens": 32},
        "node_defaults": {"model": "m"},
        "nodes": {"count": count},
        "topology": topology,
        "bus": {"round_tokens": 16, "links": links},
        "evaluation": {"context_tokens": 32, "warmup_rounds": 1},
    }


def _graph_error(data: dict[str, Any]) -> str:
    with pytest.raises(RunError) as info:
        build_graph(parse_scenario(data))
    return str(info.value)


def test_an_override_of_a_link_the_topology_lacks_is_named_with_the_real_links():
    message = _graph_error(_scenario({"kind": "ring", "directed": True}, [{"source": "n0", "target": "n2", "drop_rate": 0.5}]))
    assert message.startswith("bus.links[0]: there is no link n0 -> n2 in this topology (ring, directed, seed 0)")
    assert message.endswith("override one of its links: n0 -> n1, n1 -> n2, n2 -> n0")


def test_an_override_of_an_existing_link_is_kept_and_an_undirected_edge_is_a_link_each_way():
    links = [{"source": "n0", "target": "n1", "drop_rate": 0.5}, {"source": "n1", "target": "n0", "latency_rounds": 2}]
    graph = build_graph(parse_scenario(_scenario({"kind": "line"}, links)))
    assert graph.has_edge("n0", "n1") and graph.has_edge("n1", "n0")
    message = _graph_error(_scenario({"kind": "line"}, [*links, {"source": "n2", "target": "n0"}]))
    assert message.startswith("bus.links[2]: there is no link n2 -> n0 in this topology (line, undirected: each edge is a link each way")


def test_a_random_topology_checks_its_overrides_on_the_graph_its_seed_draws():
    topology = {"kind": "erdos_renyi", "directed": True, "params": {"p": 0.5}}
    has_link = {seed: build_graph(parse_scenario(_scenario(topology, [], count=4, seed=seed))).has_edge("n0", "n1") for seed in range(20)}
    with_link = next(seed for seed, has in has_link.items() if has)  # a seed whose graph has n0 -> n1
    without_link = next(seed for seed, has in has_link.items() if not has)  # and one whose graph lacks it
    link = [{"source": "n0", "target": "n1", "drop_rate": 0.5}]
    assert build_graph(parse_scenario(_scenario(topology, link, count=4, seed=with_link))).has_edge("n0", "n1")
    message = _graph_error(_scenario(topology, link, count=4, seed=without_link))
    assert f"there is no link n0 -> n1 in this topology (erdos_renyi, directed, seed {without_link})" in message


def test_collective_validate_reports_an_override_of_a_missing_link_with_the_file(tmp_path, capsys):
    path = tmp_path / "ring.yaml"
    path.write_text(yaml.safe_dump(_scenario({"kind": "ring", "directed": True}, [{"source": "n0", "target": "n2"}])), encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    out = " ".join(capsys.readouterr().err.split())
    assert f"invalid {path}: bus.links[0]: there is no link n0 -> n2" in out and "n0 -> n1, n1 -> n2, n2 -> n0" in out


@pytest.mark.parametrize("where", ["top", "params"])
def test_a_file_topology_reads_its_graph_from_the_scenario_folder_either_way(tmp_path, where):
    (tmp_path / "g.edgelist").write_text("n0 n2\nn2 n1\n", encoding="utf-8")
    topology: dict[str, Any] = {"kind": "file", "directed": True}
    if where == "top":
        topology["path"] = "g.edgelist"
    else:
        topology["params"] = {"path": "g.edgelist"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_scenario(topology, [{"source": "n0", "target": "n2", "drop_rate": 0.5}])), encoding="utf-8")
    graph = build_graph(load_scenario(path))
    assert sorted(graph.edges()) == [("n0", "n2"), ("n2", "n1")]


def test_collective_run_names_the_file_of_an_override_of_a_missing_link(tmp_path, capsys):
    path = tmp_path / "ring.yaml"
    path.write_text(yaml.safe_dump(_scenario({"kind": "ring", "directed": True}, [{"source": "n0", "target": "n2"}])), encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-live"]) == 2
    captured = capsys.readouterr()
    said = " ".join((captured.out + captured.err).split())
    assert f"{path}: bus.links[0]: there is no link n0 -> n2" in said
    assert not (tmp_path / "run").exists()  # it stopped before the run folder was made
