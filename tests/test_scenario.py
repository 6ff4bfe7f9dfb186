"""The scenario schema: expansion and defaults, and one clear error per user mistake."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from collective.scenario import (
    FixedController,
    FullView,
    GenerateMessage,
    LaggedView,
    MaskedView,
    ModelSpec,
    NoController,
    NoView,
    RelayMessage,
    ScenarioError,
    ScenarioFile,
    SilentMessage,
    WindowView,
    load_scenario,
    parse_scenario,
    scenario_json_schema,
)
from collective.scenario_errors import field_names


def _base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "seed": 5,
        "models": {"tiny": "some/model"},
        "corpus": {"train_tokens": 128, "eval_tokens": 64},
        "node_defaults": {"model": "tiny", "view": {"kind": "window", "tokens": 16}, "message": {"policy": "relay"}},
        "nodes": [{"id": "a"}, {"id": "b"}],
        "bus": {"round_tokens": 16},
        "evaluation": {"context_tokens": 32, "warmup_rounds": 1},
    }
    data.update(overrides)
    return data


def _error(data: dict[str, Any], source: str = "s.yaml") -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, source=source)
    return str(info.value)


# ---------------------------------------------------------------------------- what a valid file becomes


def test_the_node_ids_and_positions_are_computed_once_and_a_copy_with_other_nodes_has_its_own():
    scenario = parse_scenario(_base(nodes=[{"id": "a"}, {"id": "b"}, {"id": "c"}]))
    assert scenario.node_ids is scenario.node_ids == ["a", "b", "c"]  # one list, not one per call
    assert [scenario.node_index(n) for n in "cab"] == [2, 0, 1] and scenario.node("b").id == "b"
    with pytest.raises(KeyError):
        scenario.node("zz")
    fewer = scenario.model_copy(update={"nodes": scenario.nodes[::2]})  # the copy carries the first one's cache
    assert fewer.node_ids == ["a", "c"] and fewer.node_index("c") == 1 and scenario.node_ids == ["a", "b", "c"]
    with pytest.raises(KeyError):
        fewer.node("b")
    # the cache is no field: equality, dumps and copies of the same nodes see no difference
    fresh = type(scenario).model_validate(scenario.model_dump())
    assert fresh == scenario and "_node_order" not in scenario.model_dump()
    assert scenario.model_copy(update={"seed": 9}).node_ids == ["a", "b", "c"]


def test_a_node_list_takes_unset_fields_from_node_defaults():
    data = _base(nodes=[{"id": "a"}, {"id": "b", "view": {"kind": "lagged", "tokens": 8, "lag": 4}}])
    scenario = parse_scenario(data)
    assert scenario.node_ids == ["a", "b"]
    assert scenario.node("a").view == WindowView(tokens=16)
    assert scenario.node("b").view == LaggedView(tokens=8, lag=4)
    assert scenario.node("a").message == RelayMessage()
    assert scenario.node("a").controller == NoController()


def test_a_node_without_view_or_message_reads_a_full_view_and_stays_silent():
    data = _base(node_defaults={"model": "tiny"}, nodes=[{"id": "a"}, {"id": "b", "view": {"kind": "none"}}])
    scenario = parse_scenario(data)
    assert scenario.node("a").view == FullView() and scenario.view_reach(scenario.node("a")) == 32  # context_tokens
    assert scenario.node("a").message == SilentMessage() and scenario.node("a").controller == NoController()
    assert scenario.node("b").view == NoView()  # its own value wins
    again = parse_scenario(yaml.safe_load(scenario.resolved_yaml()))  # a run folder's scenario.yaml
    assert again == scenario and again.node("a").view == FullView()


def test_a_nodes_own_setting_wins_over_node_defaults_which_wins_over_the_built_in_default():
    defaults = {"model": "tiny", "message": {"policy": "relay"}}
    data = _base(
        node_defaults=defaults,
        nodes={"count": 3, "overrides": {"n1": {"message": {"policy": "generate"}}, "n2": {"view": {"kind": "window", "tokens": 4}}}},
    )
    scenario = parse_scenario(data)
    assert [node.message for node in scenario.nodes] == [RelayMessage(), GenerateMessage(), RelayMessage()]
    assert [node.view for node in scenario.nodes] == [FullView(), FullView(), WindowView(tokens=4)]


def test_the_smallest_scenario_of_the_docs_is_valid_as_written():
    readme = (Path(__file__).resolve().parents[1] / "scenarios" / "README.md").read_text(encoding="utf-8")
    block = readme.split("So the smallest scenario is")[1].split("```yaml")[1].split("```")[0]
    scenario = parse_scenario(yaml.safe_load(block))
    assert scenario.node_ids == ["n0", "n1", "n2"]
    assert all(node.view == FullView() and node.message == SilentMessage() for node in scenario.nodes)


def test_the_json_schema_documents_the_built_in_node_defaults():
    node = scenario_json_schema()["$defs"]["NodeEntry"]["properties"]
    assert "{kind: full}" in node["view"]["description"] and "{policy: silent}" in node["message"]["description"]


def test_a_file_topology_takes_its_path_at_the_top_level_or_under_params(tmp_path):
    top = parse_scenario(_base(topology={"kind": "file", "path": "g.edgelist"}), base_dir=tmp_path)
    under = parse_scenario(_base(topology={"kind": "file", "params": {"path": "g.edgelist"}}), base_dir=tmp_path)
    assert top == under and under.topology.path == tmp_path / "g.edgelist" and under.topology.params == {}
    again = parse_scenario(yaml.safe_load(under.resolved_yaml()))
    assert again == under


def test_a_file_topology_without_a_path_or_with_two_says_how_to_write_it():
    message = _error(_base(topology={"kind": "file"}))
    assert "topology: Value error, kind `file` needs the graph file: `topology: {kind: file, path: graph.graphml}`" in message
    assert "(or `params: {path: graph.edgelist}`)" in message
    two = _error(_base(topology={"kind": "file", "path": "a.edgelist", "params": {"path": "b.edgelist"}}))
    assert "kind `file` got two paths, 'a.edgelist' and params.path 'b.edgelist'; give one" in two


def test_a_template_makes_count_nodes_with_per_node_overrides():
    data = _base(
        nodes={
            "count": 3,
            "id_prefix": "node",
            "overrides": {"node2": {"message": {"policy": "generate"}, "controller": {"kind": "fixed", "text": "hi"}}},
        }
    )
    scenario = parse_scenario(data)
    assert scenario.node_ids == ["node0", "node1", "node2"]
    assert scenario.node("node0").message == RelayMessage()
    assert scenario.node("node2").message == GenerateMessage()
    assert scenario.node("node2").controller == FixedController(text="hi")
    assert scenario.node("node2").view == WindowView(tokens=16)  # not overridden: the default


def test_defaults_fill_everything_left_out():
    scenario = parse_scenario(_base())
    assert scenario.models == {"tiny": ModelSpec(ref="some/model")}
    assert scenario.models["tiny"].dtype == "auto"
    assert scenario.corpus.source == "builtin:pydoc"
    assert scenario.topology.kind == "ring"
    assert (scenario.bus.latency_rounds, scenario.bus.retain, scenario.bus.drop_rate) == (1, 1, 0.0)
    assert scenario.aggregator.kind == "mean"
    assert scenario.reference_model == "tiny"
    assert scenario.eval_rounds == 4  # 64 eval tokens / 16


def test_the_longest_view_sets_how_far_back_the_train_part_must_reach():
    scenario = parse_scenario(_base(nodes=[{"id": "a", "view": {"kind": "lagged", "tokens": 40, "lag": 30}}],
                                    corpus={"train_tokens": 100, "eval_tokens": 64}))
    assert scenario.view_reach(scenario.node("a")) == 70
    assert scenario.max_reach == 70


def test_relative_paths_resolve_against_the_scenario_folder(tmp_path):
    data = _base(corpus={"source": "file", "path": "text.txt", "train_tokens": 128, "eval_tokens": 64})
    scenario = parse_scenario(data, base_dir=tmp_path)
    assert scenario.corpus.path == tmp_path / "text.txt"


def test_the_resolved_yaml_reads_back_as_the_same_scenario(tmp_path):
    data = _base(
        models={"tiny": "some/model", "other": {"ref": "x/y", "dtype": "float32"}},
        corpus={"source": "file", "path": "text.txt", "train_tokens": 128, "eval_tokens": 64},
        nodes={"count": 3, "overrides": {"n1": {"model": "other", "view": {"kind": "masked", "tokens": 8, "keep": 0.5}}}},
        topology={"kind": "edges", "edges": [["n0", "n1"], ["n1", "n2"]], "directed": True},
        bus={"round_tokens": 16, "links": [{"source": "n0", "target": "n1", "drop_rate": 0.5}]},
        aggregator={"kind": "readout", "node": "n2"},
    )
    scenario = parse_scenario(data, base_dir=tmp_path)
    again = parse_scenario(yaml.safe_load(scenario.resolved_yaml()))
    assert again == scenario


def test_the_json_schema_is_json_with_the_top_level_fields():
    schema = json.loads(json.dumps(scenario_json_schema()))
    assert schema["title"] == "collective scenario"
    for key in ("name", "seed", "corpus", "models", "node_defaults", "nodes", "topology", "bus", "aggregator", "evaluation"):
        assert key in schema["properties"], key
    assert set(schema["required"]) == {"name", "models", "nodes"}


# ---------------------------------------------------------------------------- one clear error per mistake


def test_an_unknown_key_is_named_by_its_yaml_path_only_once():
    message = _error(_base(nodes=[{"id": "a", "colour": "red"}]))
    assert message.startswith("s.yaml: ")
    assert "nodes[0].colour: unknown key" in message
    assert "1 problem(s)" in message
    assert "NodeEntry" not in message and "NodeTemplate" not in message


def test_a_misspelt_key_gets_the_closest_real_one_and_a_node_template_says_how_to_write_it():
    assert "bus.round_token: unknown key (did you mean 'round_tokens'?" in _error(_base(bus={"round_token": 16}))
    # a key of another section is not suggested as itself
    elsewhere = _error(_base(nodes=[{"id": "a", "controller": {"kind": "gcg", "top_k": 8}}]))
    assert "controller.top_k: unknown key (did you mean 'topk'?" in elsewhere
    template = _error({**_base(), "node_template": {"count": 3}})
    assert "node_template: unknown key (a template of N nodes is written `nodes: {count: N}`" in template
    assert "colour: unknown key (check its spelling" in _error({**_base(), "colour": 1})
    misplaced = _error(_base(topology={"kind": "small_world", "k": 4}))
    assert "topology.k: unknown key (a topology's parameters go under `params:`, e.g. `params: {k: ...}`)" in misplaced


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"colour": 1}, "colour: unknown key"),
        ({"bus": {"round_tokens": 16, "latency": 2}}, "bus.latency: unknown key"),
        ({"nodes": {"count": 2, "prefix": "x"}}, "nodes.prefix: unknown key"),
        ({"models": {"Tiny": {"ref": "x", "typo": 1}}}, "models.Tiny.typo: unknown key"),
        ({"nodes": [{"id": "a", "view": {"kind": "lagged", "tokens": 4, "lag": 2, "extra": 0}}]}, "nodes[0].view.extra: unknown key"),
        (
            {"nodes": {"count": 2, "id_prefix": "N", "overrides": {"N1": {"view": {"kind": "window", "tokens": -1}}}}},
            "nodes.overrides.N1.view.tokens: Input should be greater than or equal to 0",
        ),
        ({"nodes": [{"id": "a", "view": {"kind": "lagged", "tokens": 4}}]}, "nodes[0].view.lag: this field is required"),
        ({"bus": {"latency_rounds": 0}}, "bus.latency_rounds: Input should be greater than or equal to 1; found 0"),
        ({"nodes": [{"id": "a", "view": {"kind": "blurry"}}]}, "nodes[0].view: Input tag 'blurry'"),
    ],
)
def test_schema_errors_name_the_yaml_path_once(change, path):
    message = _error(_base(**change))
    assert "1 problem(s)" in message
    assert f"  - {path}" in message


def test_a_node_pointing_at_a_missing_model_names_the_model_and_the_defined_ones():
    message = _error(_base(nodes=[{"id": "a"}, {"id": "b", "model": "big"}]))
    assert message == (
        "s.yaml: nodes[1].model: node 'b' uses model 'big', which `models` does not define (defined: tiny)"
    )


def test_duplicate_node_ids_are_an_error():
    assert _error(_base(nodes=[{"id": "a"}, {"id": "b"}, {"id": "a"}])) == "s.yaml: nodes[2].id: node id 'a' appears twice"


def test_a_template_override_of_an_unknown_node_is_an_error():
    message = _error(_base(nodes={"count": 2, "overrides": {"n7": {"model": "tiny"}}}))
    assert message == "s.yaml: nodes.overrides.n7: no node named 'n7'; the template makes n0 .. n1"


def test_a_readout_of_an_unknown_node_is_an_error():
    message = _error(_base(aggregator={"kind": "readout", "node": "zz"}))
    assert message == "s.yaml: aggregator.node: readout node 'zz' is not a node (a, b)"
    assert "aggregator: Value error, kind `readout` needs `node: NODE_ID`" in _error(_base(aggregator={"kind": "readout"}))


def test_an_eval_split_with_no_whole_round_is_an_error():
    message = _error(_base(corpus={"train_tokens": 128, "eval_tokens": 10}))
    assert message == "s.yaml: corpus.eval_tokens: 10 eval tokens make no whole round of 16 tokens"


def test_a_train_part_too_small_for_warm_up_and_views_is_an_error():
    # 1 warm-up round of 16 + the longest reach (context_tokens 32 > window 16) = 48
    message = _error(_base(corpus={"train_tokens": 40, "eval_tokens": 64}))
    assert message.startswith("s.yaml: corpus.train_tokens: found 40;")
    assert "need the 48 tokens" in message


def test_a_node_with_no_model_and_no_default_is_an_error():
    data = _base(node_defaults={})
    assert _error(data) == (
        "s.yaml: nodes[0].model: node 'a' has no `model` and `node_defaults` gives none; set one of them"
    )


def test_links_and_edges_must_name_nodes():
    message = _error(_base(bus={"round_tokens": 16, "links": [{"source": "a", "target": "q"}]}))
    assert message == "s.yaml: bus.links[0].target: 'q' is not a node"
    message = _error(_base(topology={"kind": "edges", "edges": [["a", "b"], ["b", "q"]]}))
    assert message == "s.yaml: topology.edges[1]: edge endpoint 'q' is not a node"


def test_an_unknown_reference_model_is_an_error():
    message = _error(_base(evaluation={"context_tokens": 32, "reference_model": "huge"}))
    assert message == "s.yaml: evaluation.reference_model: 'huge' is not in `models` (defined: tiny)"


def test_a_non_mapping_file_is_an_error():
    assert _error([1, 2]) == "s.yaml: expected a YAML mapping at the top level, found list"  # type: ignore[arg-type]


def test_bad_yaml_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\nmodels:\n  tiny: x\nnodes: [a, b\nseed: 1\n", encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}: this is not valid YAML at line ")
    line = int(message.split(" at line ")[1].split(",")[0])
    assert 4 <= line <= 5


def test_a_missing_file_is_an_error(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ScenarioError, match="nope.yaml: no such scenario file"):
        load_scenario(path)


def test_load_scenario_names_the_file_in_schema_errors(tmp_path):
    path = tmp_path / "s.yaml"
    data = copy.deepcopy(_base(colour=1))
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: the scenario is not valid")
    assert "colour: unknown key" in str(info.value)


def test_load_scenario_reads_a_valid_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_base()), encoding="utf-8")
    assert load_scenario(Path(path)) == parse_scenario(_base(), base_dir=tmp_path)


def test_an_old_scenario_with_the_bootstrap_fields_loads_and_validate_warns_naming_the_file_and_each_field(
    tmp_path, caplog, capsys
):
    from collective.cli import main

    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(_base(evaluation={"context_tokens": 32, "n_boot": 500, "block_rounds": 2})), encoding="utf-8")
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(_base()), encoding="utf-8")
    with caplog.at_level("WARNING", logger="collective.scenario"):
        assert main(["validate", str(old), str(new)]) == 0  # still valid: older scenarios load
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    why = "is unused since report 6: the intervals are no longer a block bootstrap; remove it"
    assert sorted(warnings) == sorted([f"{old}: evaluation.n_boot {why}", f"{old}: evaluation.block_rounds {why}"])
    assert f"ok {old}" in capsys.readouterr().out
    caplog.clear()
    with caplog.at_level("WARNING", logger="collective.scenario"):
        load_scenario(new)
    assert not caplog.records


def test_the_controllers_training_rounds_must_also_fit_in_the_train_part():
    # 1 warm-up round of 16 + the longest reach 32 + (2 training + 3 validation rounds) of 16 = 128
    gcg = {"model": "tiny", "view": {"kind": "window", "tokens": 16}, "message": {"policy": "relay"},
           "controller": {"kind": "gcg", "train_rounds": 2, "validation_rounds": 3}}
    message = _error(_base(node_defaults=gcg, corpus={"train_tokens": 127, "eval_tokens": 64}))
    assert message.startswith("s.yaml: corpus.train_tokens: found 127;")
    assert "need the 128 tokens" in message
    assert "+ 2 controller training rounds + 3 controller validation rounds" in message
    parse_scenario(_base(node_defaults=gcg, corpus={"train_tokens": 128, "eval_tokens": 64}))


@pytest.mark.parametrize(
    "view, reach, span",
    [
        (FullView(), 32, (68, 100)),
        (FullView(tokens=8), 8, (92, 100)),
        (WindowView(tokens=0), 0, (100, 100)),
        (LaggedView(tokens=12, lag=8), 20, (80, 92)),
        (MaskedView(tokens=16, keep=0.5), 16, (84, 100)),
        (NoView(), 0, (100, 100)),
    ],
)
def test_a_view_says_how_far_back_it_reaches_and_which_positions_it_shows(view, reach, span):
    assert view.reach(32) == reach  # 32: what a full view without its own tokens sees
    assert view.span(100, 32) == span
    lo, hi = view.span(5, 32)  # clipped at the start of the stream
    assert 0 <= lo <= hi <= 5


def test_every_key_of_every_nested_part_is_known_to_the_misspelling_hint():
    keys = field_names(ScenarioFile)
    assert {"round_tokens", "placeholder", "lag", "speak_prompt", "sweeps", "id_prefix", "window_tokens"} <= keys
    assert {"node_defaults", "overrides", "links", "drop_rate"} <= keys


def test_a_missing_models_section_says_what_to_write():
    data = _base()
    del data["models"]
    message = _error(data)
    assert "models: this field is required (the models the nodes name, e.g. `models: {smol: smollm2-135m}`" in message
