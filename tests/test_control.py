"""Controllers in a run: GCG prompts searched on the train part only, applied to the right
rows, written to controls.json and reused with --controllers-from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from collective.cli import main
from collective.lm.models import ModelPool
from collective.records import Report
from collective.run.control import load_controls, search_controls
from collective.run.runner import RunError, prepare, run_prepared
from collective.scenario import load_scenario
from tests.test_rundir import write_tiny_scenario

GCG = {"kind": "gcg", "tokens": 3, "steps": 3, "search_width": 8, "topk": 8, "train_rounds": 2, "init": "x x x"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scenario_file(folder: Path, model_dir: Path, controller: dict, name: str = "ctl") -> Path:
    path = write_tiny_scenario(
        folder, model_dir, name=name, corpus={"source": "builtin:pydoc", "train_tokens": 96, "eval_tokens": 24}
    )
    data = path.read_text(encoding="utf-8")
    path.write_text(data.replace("node_defaults:\n", f"node_defaults:\n  controller: {json.dumps(controller)}\n"))
    return path


def _prepared(folder: Path, model_dir: Path, controller: dict):
    scenario = load_scenario(_scenario_file(folder, model_dir, controller))
    return prepare(scenario, ModelPool(cache_dir=folder / "cache"), base_dir=folder)


def test_local_search_lowers_every_nodes_train_loss_and_never_reads_the_eval_part(tiny_model_dir, tmp_path):
    prepared = _prepared(tmp_path, tiny_model_dir, GCG)
    steps: list[tuple[str, int, int]] = []
    found = search_controls(prepared, progress=lambda node, step, total: steps.append((node, step, total)))
    assert [s.node_id for s in found] == ["a", "b", "c"]
    for search in found:
        assert search.objective == "local" and search.steps == 3 and len(search.control_ids) == 3
        assert search.loss <= search.initial_loss
        assert prepared.control_ids[search.node_id] == search.control_ids
    assert {(node, total) for node, _, total in steps} == {("a", 3), ("b", 3), ("c", 3)}

    # the same search with the eval part of the stream replaced by other tokens finds the same prompts
    train = prepared.scenario.corpus.train_tokens
    poisoned = prepared.stream.clone()
    poisoned[train:] = torch.flip(poisoned[train:], dims=[0]) + 1
    again = search_controls(replace(prepared, stream=poisoned, control_ids={}))
    assert [(s.control_ids, s.loss) for s in again] == [(s.control_ids, s.loss) for s in found]


def test_collective_search_is_coordinate_descent_that_never_raises_the_train_loss(tiny_model_dir, tmp_path):
    prepared = _prepared(tmp_path, tiny_model_dir, {**GCG, "objective": "collective"})
    found = search_controls(prepared)
    assert [s.objective for s in found] == ["collective"] * 3
    assert all(s.loss <= s.initial_loss for s in found)


def test_prompts_enter_the_isolated_and_collective_rows_but_not_the_plain_ones(tiny_model_dir, tmp_path):
    prepared = _prepared(tmp_path, tiny_model_dir, {"kind": "fixed", "text": "Note: the text below is Python."})
    report = run_prepared(prepared, tmp_path / "run").report
    assert report is not None
    assert set(report.control_prompts) == {"a", "b", "c"}
    assert report.control_prompts["a"] == "Note: the text below is Python."
    plain = {r.node_id: r.nll for r in report.rows if r.row == "member_plain"}
    isolated = {r.node_id: r.nll for r in report.rows if r.row == "member_isolated"}
    assert all(plain[n] != pytest.approx(isolated[n], abs=1e-6) for n in plain)


def test_run_writes_the_prompts_and_controllers_from_reuses_them_without_searching(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "1000")
    scenario = _scenario_file(tmp_path, tiny_model_dir, GCG)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["run", str(scenario), "--out", str(first), "--no-live"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "GCG node a: step 3/3" in out and "control for a (local):" in out
    controls = json.loads((first / "controls.json").read_text(encoding="utf-8"))
    assert set(controls["control_ids"]) == {"a", "b", "c"} and len(controls["searches"]) == 3

    assert main(["run", str(scenario), "--out", str(second), "--no-live", "--controllers-from", str(first)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"control prompts from {first}" in out and "GCG node" not in out
    reused = json.loads((second / "controls.json").read_text(encoding="utf-8"))
    assert reused["control_ids"] == controls["control_ids"] and reused["searches"] == []

    def rows(run: Path) -> list:
        report = Report.model_validate_json((run / "report.json").read_text(encoding="utf-8"))
        return [(r.row, r.node_id, r.nll) for r in report.rows]

    assert rows(second) == rows(first)


def test_controllers_from_a_folder_without_prompts_or_with_foreign_nodes_is_a_clear_error(tiny_model_dir, tmp_path):
    scenario = load_scenario(_scenario_file(tmp_path, tiny_model_dir, GCG))
    with pytest.raises(RunError, match="no such file; --controllers-from needs a run folder"):
        load_controls(tmp_path, scenario)
    (tmp_path / "controls.json").write_text(json.dumps({"control_ids": {"zz": [1, 2]}}), encoding="utf-8")
    with pytest.raises(RunError, match=r"prompts for nodes \['zz'\] that this scenario does not have"):
        load_controls(tmp_path, scenario)
    (tmp_path / "controls.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RunError, match="not a controls file written by collective"):
        load_controls(tmp_path, scenario)


def test_the_initial_prompt_is_padded_with_tokens_that_read_back_the_same(tiny_model_dir, tmp_path):
    from collective.run.control import _initial_ids
    from collective.scenario import GCGController

    prepared = _prepared(tmp_path, tiny_model_dir, GCG)
    tokenizer = prepared.tokenizer
    for init in ["Python:", "a:", ".", "x", ""]:  # padding the first three with their last token broke them
        ids = _initial_ids(GCGController(tokens=6, init=init), tokenizer, "a")
        assert len(ids) == 6
        assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["mean", "logpool"])
def test_the_collective_objective_is_the_runs_own_pool_of_the_members_records(kind):
    """Fed member 1's own log-probs, the objective is the NLL the run's aggregator reports."""
    from collective.lm.predictions import predictions_from_logits
    from collective.run.aggregate import make_aggregator
    from collective.run.control import _pool_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 50, generator=gen) * 3  # (N, n, V)
    targets = torch.randint(0, 50, (6,), generator=gen)
    members = predictions_from_logits(logits, targets, top_k=8)
    expected = -make_aggregator(kind, 3).pool(members).target_logprob.mean()
    own = torch.log_softmax(logits[1], dim=-1)  # (n, V)
    candidates = torch.stack([own, torch.log_softmax(torch.zeros(6, 50), dim=-1)]).requires_grad_(True)  # (B=2, n, V)
    loss = _pool_loss(kind, 1, members, targets)(candidates)  # (B,)
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(expected.item(), abs=1e-5)
    assert loss[1].item() != pytest.approx(expected.item(), abs=1e-3)  # a uniform member 1 pools otherwise
    loss.sum().backward()
    assert torch.isfinite(candidates.grad).all() and candidates.grad.abs().sum() > 0


def test_a_controls_file_is_a_versioned_record_and_an_older_minimal_one_still_reads(tiny_model_dir, tmp_path):
    from collective.records import CONTROLS_SCHEMA_VERSION, Controls, ControlSearch

    scenario = load_scenario(_scenario_file(tmp_path, tiny_model_dir, GCG))
    search = ControlSearch(node_id="a", objective="local", control_ids=[5, 6], control_text="hi", loss=1.0,
                           initial_loss=2.0, steps=3, wall_seconds=0.5)
    written = Controls(control_ids={"a": [5, 6], "b": []}, control_text={"a": "hi"}, searches=[search])
    assert json.loads(written.model_dump_json())["schema_version"] == CONTROLS_SCHEMA_VERSION
    (tmp_path / "controls.json").write_text(written.model_dump_json(indent=2), encoding="utf-8")
    assert load_controls(tmp_path, scenario) == {"a": [5, 6], "b": []}
    (tmp_path / "controls.json").write_text(json.dumps({"control_ids": {"a": [1]}}), encoding="utf-8")
    assert load_controls(tmp_path, scenario) == {"a": [1]}
