"""`collective sweep` refusing what would give a wrong summary (issue 22): cells that share a
folder, a finished folder of another scenario, `seed` in --set, settings lost to their order,
repeats, checks that come after a cell ran, grids too large to start, --out that is a
file, finished cells that no longer read back, and errors printed as Rich markup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from collective.cli import main
from collective.evaluate.sweep import Cell, expand_grid, parse_set
from collective.scenario import ScenarioError
from tests.test_rundir import write_tiny_scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


def _data(tmp_path: Path, model_dir: Path, **changes) -> dict:
    return yaml.safe_load(write_tiny_scenario(tmp_path, model_dir, **changes).read_text(encoding="utf-8"))


def _err(capsys) -> str:
    printed = capsys.readouterr()
    assert "error" not in printed.out  # errors go to stderr, results to stdout
    return " ".join(printed.err.split())


@pytest.fixture
def no_cell_runs(monkeypatch):
    """Fail the test if any cell starts to run (prepare loads its models)."""
    import collective.run.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("a cell ran before the sweep was refused")

    monkeypatch.setattr(runner, "prepare", refuse)


# ---------------------------------------------------------------------------- item 1: folders and reuse


def test_values_that_differ_only_in_replaced_characters_get_two_folders():
    cells = [Cell((("bus.inbox_header", value),), 0, None) for value in ("Msgs?", "Msgs!", "Msgs:", "Msgs_", "Msgs-")]  # type: ignore[arg-type]
    assert len({c.folder_name for c in cells}) == 5
    plain = Cell((("bus.max_message_tokens", 2),), 3, None)  # type: ignore[arg-type]
    assert plain.folder_name == plain.legacy_folder_name == "bus.max_message_tokens=2,seed=3"  # old sweeps resume


def test_a_finished_cell_folder_of_another_scenario_is_refused_naming_the_cell_and_the_difference(
    tmp_path, tiny_model_dir, capsys, no_cell_runs
):
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    data = _data(tmp_path, tiny_model_dir)
    (cell,) = expand_grid(data, [parse_set("bus.max_message_tokens=2")], [2], source="x")
    out = tmp_path / "sweep"
    folder = out / cell.folder_name
    folder.mkdir(parents=True)
    edited = {**data, "bus": {**data["bus"], "round_tokens": 4}}  # the scenario as it was before an edit
    (old,) = expand_grid(edited, [parse_set("bus.max_message_tokens=2")], [2], source="x")
    (folder / "scenario.yaml").write_text(old.scenario.resolved_yaml(), encoding="utf-8")
    (folder / "report.json").write_text("{}", encoding="utf-8")
    code = main(["sweep", str(scenario), "--set", "bus.max_message_tokens=2", "--out", str(out), "--threads", "1"])
    message = _err(capsys)
    assert code == 2
    assert "bus.max_message_tokens=2, seed 2" in message and "bus.round_tokens: 4 there, 8 in this cell" in message


def test_the_same_run_is_reused_in_its_folder_or_in_the_folder_an_older_sweep_named_it(tmp_path, tiny_model_dir):
    from collective.cli.sweep import _reusable_folder

    data = _data(tmp_path, tiny_model_dir)
    first, second = expand_grid(data, [parse_set("bus.inbox_header='Msgs?','Msgs!'")], [2], source="x")
    assert first.legacy_folder_name == second.legacy_folder_name != first.folder_name
    legacy = tmp_path / first.legacy_folder_name  # an old sweep ran `Msgs?` into the shared folder
    legacy.mkdir()
    (legacy / "scenario.yaml").write_text(first.scenario.resolved_yaml(), encoding="utf-8")
    (legacy / "report.json").write_text("{}", encoding="utf-8")
    assert _reusable_folder(first, tmp_path, "x") == legacy
    assert _reusable_folder(second, tmp_path, "x") is None  # not the run `Msgs!` would make: run it afresh
    own = tmp_path / first.folder_name
    own.mkdir()
    (own / "scenario.yaml").write_text(first.scenario.resolved_yaml(), encoding="utf-8")
    (own / "report.json").write_text("{}", encoding="utf-8")
    assert _reusable_folder(first, tmp_path, "x") == own


# ---------------------------------------------------------------------------- items 2-4: seed, order, repeats


def test_seed_in_set_is_refused_in_favour_of_seeds(tmp_path, tiny_model_dir, capsys, no_cell_runs):
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    assert main(["sweep", str(scenario), "--set", "seed=1,2", "--out", str(tmp_path / "s")]) == 2
    assert "--set seed=...: give the seeds with --seeds" in _err(capsys)


def test_the_order_of_set_options_does_not_drop_a_setting(tmp_path, tiny_model_dir):
    data = _data(tmp_path, tiny_model_dir, aggregator={"kind": "mean"})
    sets = [parse_set("aggregator.eta=0.05"), parse_set("aggregator.kind=weighted")]
    (cell,) = expand_grid(data, sets, [0], source="x")
    assert cell.scenario.aggregator.kind == "weighted" and cell.scenario.aggregator.eta == 0.05
    sets = [parse_set("node_defaults.message.steps=2"), parse_set("node_defaults.message.policy=search")]
    (cell,) = expand_grid(data, sets, [0], source="x")
    assert cell.scenario.node("a").message.policy == "search" and cell.scenario.node("a").message.steps == 2


def test_a_setting_that_another_replaces_is_an_error():
    from collective.evaluate.sweep import apply_settings

    data = {"node_defaults": {"message": {"policy": "generate"}}}
    with pytest.raises(ScenarioError, match=r"--set node_defaults.message=\{'policy': 'relay'\}: another --set"):
        apply_settings(data, [("node_defaults.message", {"policy": "relay"}), ("node_defaults.message.policy", "search")])


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--set", "bus.max_message_tokens=2", "--set", "bus.max_message_tokens=4"], "--set bus.max_message_tokens=... is given twice"),
        (["--set", "bus.max_message_tokens=8,8"], "the value '8' is given twice"),
        (["--seeds", "1,1"], "seed 1 is given twice"),
    ],
)
def test_repeats_are_refused(tmp_path, tiny_model_dir, capsys, no_cell_runs, argv, complaint):
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    assert main(["sweep", str(scenario), *argv, "--out", str(tmp_path / "s")]) == 2
    assert complaint in _err(capsys)


def test_hostile_refuses_repeated_seeds_and_a_seed_set_beside_seeds(tmp_path, capsys):
    scenario = str(Path(__file__).resolve().parents[1] / "scenarios" / "hostile-node.yaml")
    assert main(["hostile", scenario, "--seeds", "1,1", "--out", str(tmp_path / "h")]) == 2
    assert "seed 1 is given twice" in _err(capsys)
    assert main(["hostile", scenario, "--seeds", "1,2", "--set", "seed=3", "--out", str(tmp_path / "h")]) == 2
    assert "--set seed=... and --seeds both give the seed" in _err(capsys)


# ---------------------------------------------------------------------------- items 6, 8: before the first cell


def test_every_cell_is_checked_without_a_model_before_the_first_runs(tmp_path, tiny_model_dir, capsys, no_cell_runs):
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)  # a ring a -> b -> c -> a
    code = main(["sweep", str(scenario), "--set", "bus.links=[],[{source: a, target: a, latency_rounds: 2}]",
                 "--out", str(tmp_path / "s")])
    message = _err(capsys)
    assert code == 2
    assert "bus.links=[{'source': 'a', 'target': 'a', 'latency_rounds': 2}], seed 2" in message
    assert "there is no link a -> a" in message


def test_the_grid_size_comes_first_and_a_grid_over_the_limit_needs_yes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import collective.evaluate.sweep as sweep

    def too_slow(*args, **kwargs):
        raise AssertionError("the grid was built before its size was checked")

    monkeypatch.setattr(sweep, "expand_grid", too_slow)
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    argv = ["sweep", str(scenario), "--set", "bus.max_message_tokens=1,2,3", "--set", "bus.round_tokens=4,8",
            "--seeds", "0,1", "--max-cells", "10", "--out", str(tmp_path / "s")]
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert printed.out.startswith("sweep of 12 cell(s)")
    assert "the grid has 12 cells, more than --max-cells 10: give --yes" in " ".join(printed.err.split())
    with pytest.raises(AssertionError, match="built before"):
        main([*argv, "--yes"])  # with --yes it goes on to build the grid


# ---------------------------------------------------------------------------- item 9: files, broken cells


@pytest.mark.parametrize("under", [False, True])
def test_an_out_that_is_a_file_or_under_one_is_refused_naming_the_option(tmp_path, tiny_model_dir, capsys, under):
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    blocker = tmp_path / "taken"
    blocker.write_text("x", encoding="utf-8")
    out = blocker / "sweep" if under else blocker
    assert main(["sweep", str(scenario), "--out", str(out)]) == 2
    message = _err(capsys)
    assert f"--out {out}:" in message and ("lies under" if under else "is a file") in message
    assert main(["hostile", str(Path(__file__).resolve().parents[1] / "scenarios" / "hostile-node.yaml"), "--out", str(out)]) == 2
    assert f"--out {out}:" in _err(capsys)


def test_a_resumed_sweep_writes_the_summary_of_the_whole_cells_and_names_the_broken_ones(tmp_path, tiny_model_dir, capsys):
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    out = tmp_path / "sweep"
    argv = ["sweep", str(scenario), "--set", "bus.max_message_tokens=2,4,6", "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    (out / "bus.max_message_tokens=2,seed=2" / "events.jsonl").unlink()
    report = out / "bus.max_message_tokens=4,seed=2" / "report.json"
    report.write_text(report.read_text(encoding="utf-8")[:100], encoding="utf-8")
    capsys.readouterr()
    assert main(argv) == 2
    message = _err(capsys)
    assert "bus.max_message_tokens=2,seed=2: events.jsonl is missing" in message
    assert "bus.max_message_tokens=4,seed=2: report.json is not whole" in message
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [c["overrides"] for c in summary["cells"]] == [{"bus.max_message_tokens": 6}]


@pytest.mark.parametrize(("text", "complaint"), [('{"schema_version": 1, "cells": [', "not a whole sweep summary"), ("{}", "the summary holds no cells")])
def test_report_on_a_cut_or_empty_summary_is_an_error(tmp_path, capsys, text, complaint):
    (tmp_path / "summary.json").write_text(text, encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 2
    message = _err(capsys)
    assert f"{tmp_path / 'summary.json'}: {complaint}" in message


# ---------------------------------------------------------------------------- item 10: lists, markup


def test_a_list_is_one_value_and_values_split_outside_brackets():
    assert parse_set("aggregator.exclude=[a,b],[c]").values == (["a", "b"], ["c"])
    assert parse_set("node_defaults.message={policy: search, steps: 2},relay").values == ({"policy": "search", "steps": 2}, "relay")
    assert parse_set("bus.inbox_header='a,b',c").values == ("a,b", "c")


def test_bracketed_text_in_an_error_is_printed_as_written(tmp_path, capsys):
    missing = tmp_path / "x[a].yaml"
    assert main(["run", str(missing)]) == 2
    assert f"{missing}: no such scenario file" in _err(capsys)


def test_report_paired_finds_a_cell_in_the_folder_an_older_sweep_named_it(tmp_path):
    from collective.evaluate.paired import select_cells

    overrides = {"corpus.path": "/data/wiki.raw", "node_defaults.message.policy": "relay"}
    cell = Cell(tuple(overrides.items()), 1, None)  # type: ignore[arg-type]
    summary = {"cells": [{"combination": cell.combination, "overrides": overrides, "seed": 1}]}
    (tmp_path / cell.legacy_folder_name).mkdir()
    assert cell.legacy_folder_name != cell.folder_name
    assert select_cells(summary, "node_defaults.message.policy=relay", tmp_path) == {1: cell.legacy_folder_name}
    (tmp_path / cell.folder_name).mkdir()  # once the cell has its own folder, that one
    assert select_cells(summary, "node_defaults.message.policy=relay", tmp_path) == {1: cell.folder_name}


# ---------------------------------------------------------------------------- item 12: smaller


def test_an_index_into_a_node_template_suggests_the_overrides_form():
    from collective.evaluate.sweep import apply_override

    data = {"nodes": {"count": 3, "id_prefix": "n"}, "node_defaults": {"message": {"policy": "relay"}}}
    with pytest.raises(ScenarioError, match=r"--set nodes.1.message.policy: `nodes` is a template \(count: 3\).*"
                       r"--set nodes.overrides.n1.message.policy=\.\.\., or every node as --set node_defaults.message.policy"):
        apply_override(data, "nodes.1.message.policy", "search")


def test_hostile_names_the_set_that_removed_the_attacker(tmp_path, capsys):
    scenario = str(Path(__file__).resolve().parents[1] / "scenarios" / "hostile-node.yaml")
    assert main(["hostile", scenario, "--set", "nodes.3.message={policy: relay}", "--out", str(tmp_path / "h")]) == 2
    assert f"{scenario} --set nodes.3.message={{policy: relay}}: no node has message.policy: attack" in _err(capsys)
