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
from collective.records import Controls, Report, RoundEvent
from collective.run import control
from collective.run import node as node_module
from collective.run.control import (
    _initial_ids,
    _objective_parts,
    _record,
    _Training,
    load_controls,
    search_controls,
)
from collective.run.engine import EmbeddedExecutor, RoundEngine
from collective.run.prepared import Prepared
from collective.run.runner import RunError, prepare, run_prepared, search_and_run
from collective.scenario import GCGController, load_scenario
from controllers import GCGResult
from tests.test_rundir import write_tiny_scenario

# no validation slice: the search returns the lowest training loss it found, as before validation_rounds
GCG = {"kind": "gcg", "tokens": 3, "steps": 3, "search_width": 8, "topk": 8, "train_rounds": 2, "init": "x x x",
       "validation_rounds": 0}
ROUND = 8  # write_tiny_scenario's round_tokens
# one node of each view that cuts the stream differently, training on different numbers of rounds
# before validation slices of different lengths (the slice: the largest, 2 rounds)
VIEWS = [
    {"id": "w", "view": {"kind": "window", "tokens": 16}, "controller": {**GCG, "train_rounds": 1, "validation_rounds": 1}},
    {"id": "l", "view": {"kind": "lagged", "tokens": 8, "lag": 8}},
    {"id": "m", "view": {"kind": "masked", "tokens": 16, "keep": 0.5}, "controller": {**GCG, "train_rounds": 3}},
    {"id": "n", "view": {"kind": "none"}},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scenario_file(folder: Path, model_dir: Path, controller: dict, name: str = "ctl", **changes) -> Path:
    path = write_tiny_scenario(
        folder, model_dir, name=name, corpus={"source": "builtin:pydoc", "train_tokens": 96, "eval_tokens": 24},
        **changes,
    )
    data = path.read_text(encoding="utf-8")
    path.write_text(data.replace("node_defaults:\n", f"node_defaults:\n  controller: {json.dumps(controller)}\n"))
    return path


def _prepared(folder: Path, model_dir: Path, controller: dict, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    scenario = load_scenario(_scenario_file(folder, model_dir, controller, **changes))
    return prepare(scenario, ModelPool(cache_dir=folder / "cache"), base_dir=folder)


def _training_run(prepared) -> dict[int, RoundEvent]:
    """An engine run over the controllers' training rounds (as eval rounds) with the current
    prompts, built here from the engine's parts: its round events by start token."""
    train = _Training.of(prepared).scenario
    span = train.corpus.train_tokens + train.corpus.eval_tokens
    sub = Prepared(train, prepared.models, prepared.graph, prepared.stream[:span], prepared.byte_lengths[:span],
                   prepared.placeholder_ids, prepared.control_ids)
    events: list[RoundEvent] = []
    RoundEngine.from_prepared(sub, EmbeddedExecutor.from_prepared(sub), "training").run(on_event=events.append)
    return {e.start_token: e for e in events if e.phase == "eval"}


def _last_starts(prepared, n_rounds: int, validation: bool = False) -> list[int]:
    """Where a node's n_rounds training rounds start: the rounds just before the validation
    slice (the last max(validation_rounds) rounds of the train part); with `validation`, the
    last n_rounds of the slice."""
    specs = [n.controller for n in prepared.scenario.nodes if isinstance(n.controller, GCGController)]
    held_out = 0 if validation else max(spec.validation_rounds for spec in specs)
    end = prepared.scenario.corpus.train_tokens - held_out * ROUND
    return [end - (n_rounds - j) * ROUND for j in range(n_rounds)]


def _training_nll(prepared, node_id: str, n_rounds: int, row: str, validation: bool = False) -> float:
    """Mean over node_id's training rounds (with `validation`: its validation rounds) of the
    run's isolated NLL of that node ("isolated") or of the collective's NLL ("collective"),
    with the current prompts."""
    events = _training_run(prepared)
    index = prepared.scenario.node_ids.index(node_id)
    values = [
        events[s].nll_collective if row == "collective" else events[s].nodes[index].nll_isolated
        for s in _last_starts(prepared, n_rounds, validation)
    ]
    return sum(v for v in values if v is not None) / len(values)


def test_local_search_lowers_every_nodes_isolated_nll_on_its_training_rounds_and_never_reads_the_eval_part(
    tiny_model_dir, tmp_path
):
    prepared = _prepared(tmp_path, tiny_model_dir, GCG, nodes=[
        {"id": "a", "view": {"kind": "window", "tokens": 16}, "controller": {**GCG, "train_rounds": 1}},
        {"id": "b", "view": {"kind": "lagged", "tokens": 8, "lag": 8}},
        {"id": "c", "view": {"kind": "masked", "tokens": 16, "keep": 0.5}, "message": {"policy": "relay"}},
    ])
    steps: list[tuple[str, int, int]] = []
    found = search_controls(prepared, progress=lambda node, step, total: steps.append((node, step, total)))
    assert [s.node_id for s in found] == ["a", "b", "c"]
    init = {s.node_id: s.control_ids for s in search_controls(replace(prepared, control_ids={}))}
    for search in found:
        assert search.objective == "local" and search.steps == 3 and len(search.control_ids) == 3
        assert prepared.control_ids[search.node_id] == search.control_ids
    assert {(node, total) for node, _, total in steps} == {("a", 3), ("b", 3), ("c", 3)}
    # The losses GCG reports are the node's isolated NLL that a run gives on its own training
    # rounds (the last ones of the train part), with the found and with the initial prompt.
    found_nll = {n: _training_nll(prepared, n, 2 - (n == "a"), "isolated") for n in "abc"}
    init_ids = _initial_ids(GCGController.model_validate(GCG), prepared.tokenizer)
    with_init = replace(prepared, control_ids=dict.fromkeys("abc", init_ids))
    initial_nll = {n: _training_nll(with_init, n, 2 - (n == "a"), "isolated") for n in "abc"}
    for search in found:
        assert search.loss == pytest.approx(found_nll[search.node_id], abs=1e-4)
        assert search.initial_loss == pytest.approx(initial_nll[search.node_id], abs=1e-4)
        assert search.loss < search.initial_loss - 1e-3  # the search moved, and downhill
    assert init == {s.node_id: s.control_ids for s in found}  # searching again from scratch is deterministic

    # the same search with the eval part of the stream replaced by other tokens finds the same prompts
    train = prepared.scenario.corpus.train_tokens
    poisoned = prepared.stream.clone()
    poisoned[train:] = torch.flip(poisoned[train:], dims=[0]) + 1
    again = search_controls(replace(prepared, stream=poisoned, control_ids={}))
    assert [(s.control_ids, s.loss) for s in again] == [(s.control_ids, s.loss) for s in found]


def test_collective_search_is_coordinate_descent_on_the_collectives_training_nll(tiny_model_dir, tmp_path):
    """Nodes in order, each with the prompts found before it in place: the last node's found
    loss is the collective NLL of a run with every final prompt, and a later sweep starts
    each node from its prompt of the sweep before, the others' records taken again."""
    spec = {**GCG, "objective": "collective"}
    one = _prepared(tmp_path / "one", tiny_model_dir, spec)
    first = {s.node_id: s for s in search_controls(one)}
    assert [s.objective for s in first.values()] == ["collective"] * 3
    assert first["c"].loss == pytest.approx(_training_nll(one, "c", 2, "collective"), abs=1e-4)
    assert all(s.loss < s.initial_loss - 1e-4 for s in first.values())

    two = _prepared(tmp_path / "two", tiny_model_dir, {**spec, "sweeps": 2})
    second = {s.node_id: s for s in search_controls(two)}
    after_first_sweep = _training_nll(one, "a", 2, "collective")  # every prompt from the first sweep
    assert second["a"].initial_loss == pytest.approx(after_first_sweep, abs=1e-4)
    assert second["a"].initial_loss != pytest.approx(first["a"].initial_loss, abs=1e-3)
    assert second["c"].loss == pytest.approx(_training_nll(two, "c", 2, "collective"), abs=1e-4)


def test_a_recording_computes_only_the_rows_in_collective_and_runs_again_only_when_a_prompt_changed(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Searches that return the prompt they started from change nothing after the first sweep
    has set every prompt: the later nodes of the second sweep read the recording again."""
    prepared = _prepared(tmp_path, tiny_model_dir, {**GCG, "objective": "collective", "sweeps": 2})
    recorded: list[tuple[dict[str, list[int]], object]] = []

    def counted(prepared, train):
        recorder = _record(prepared, train)
        recorded.append((dict(prepared.control_ids), recorder))
        return recorder

    def unchanged(model, tokenizer, objective, config, init_ids, progress, on_step):
        return GCGResult(best_ids=list(init_ids), best_text="", best_loss=0.0, success=False, steps=1)

    monkeypatch.setattr(control, "_record", counted)
    monkeypatch.setattr(control, "run_gcg", unchanged)
    searches = search_controls(prepared)
    assert len(searches) == 3  # a, b, c, each searched in both sweeps
    init = _initial_ids(GCGController.model_validate(GCG), prepared.tokenizer)
    # sweep 1: a (no prompt set yet), b (a's), c (a's and b's); sweep 2: a with all three, then b and c read it again
    assert [sorted(n for n, ids in prompts.items() if ids) for prompts, _ in recorded] == [[], ["a"], ["a", "b"], ["a", "b", "c"]]
    assert all(ids in ([], init) for prompts, _ in recorded for ids in prompts.values())
    for _, recorder in recorded:  # only the rows the controllers read: no isolated or plain row
        rows = [result for _, results in recorder.rounds for result in results.values()]  # type: ignore[attr-defined]
        assert rows and all(r is not None and r.isolated is None and r.plain is None for r in rows)


def test_search_and_run_searches_then_runs_and_with_known_prompts_only_runs(tiny_model_dir, tmp_path, monkeypatch):
    """What a sweep's cell and a hostile comparison's variants do: the first run searches and
    writes its searches; a run given those prompts searches nothing and writes the same."""
    first = _prepared(tmp_path / "first", tiny_model_dir, GCG)
    searches = search_and_run(first, tmp_path / "one")
    assert [s.node_id for s in searches] == ["a", "b", "c"]
    written = Controls.model_validate_json((tmp_path / "one" / "controls.json").read_text(encoding="utf-8"))
    assert written.searches == searches and written.control_ids == first.control_ids
    monkeypatch.setattr(control, "search_controls", lambda *args, **kwargs: pytest.fail("searched with known prompts"))
    second = _prepared(tmp_path / "second", tiny_model_dir, GCG)
    again = search_and_run(second, tmp_path / "two", (dict(first.control_ids), searches))
    assert again == searches and second.control_ids == first.control_ids
    reused = Controls.model_validate_json((tmp_path / "two" / "controls.json").read_text(encoding="utf-8"))
    assert reused == written


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
    expected = -make_aggregator(kind, 3).pool(members, targets=targets).target_logprob.mean()
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


@pytest.mark.parametrize("objective", ["local", "collective"])
def test_a_controller_optimises_the_very_context_its_node_is_scored_on(tiny_model_dir, tmp_path, monkeypatch, objective):
    """For window, lagged, masked and none views: each training round's objective reads the
    token sequence the node is scored on when that round is scored (the isolated row for
    local, the row in collective for collective), on the last rounds of the train part,
    is scored on the round's true tokens, and gives the NLL the run gives."""
    prepared = _prepared(tmp_path, tiny_model_dir, {**GCG, "objective": objective, "validation_rounds": 2}, nodes=VIEWS,
                         node_defaults={"model": "tiny", "message": {"policy": "relay"}})
    prompt = list(prepared.tokenizer.encode(" on x", add_special_tokens=False))
    prepared.control_ids.update({n: prompt for n in prepared.scenario.node_ids})
    scored: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    score_items = node_module.score_items

    def spy(model, items, **kwargs):
        scored.update((tuple(torch.cat([i.context, i.round_inputs]).tolist()), tuple(i.targets.tolist())) for i in items)
        return score_items(model, items, **kwargs)

    monkeypatch.setattr(node_module, "score_items", spy)
    events = _training_run(prepared)
    monkeypatch.setattr(node_module, "score_items", score_items)
    training = _Training.of(prepared)
    recorder = _record(prepared, training.scenario) if objective == "collective" else None
    placeholder = prepared.placeholder_ids["m"]
    for index, node in enumerate(prepared.scenario.nodes):
        assert isinstance(node.controller, GCGController)
        n_rounds = node.controller.train_rounds
        parts = _objective_parts(prepared, node, training, training.last(n_rounds), recorder)
        assert len(parts) == n_rounds
        for part, start in zip(parts, _last_starts(prepared, n_rounds)):
            labels = part.labels.tolist()
            assert labels == prepared.stream[start : start + ROUND].tolist()
            sequence = part.prefix_ids.tolist() + prompt + part.rest_ids.tolist()
            assert (tuple(sequence), tuple(labels)) in scored, (node.id, start)
            if node.id == "m":  # the masked node reads placeholders, also in the round itself
                assert placeholder in part.rest_ids[-ROUND:].tolist()
            loss = part.scores(torch.tensor([prompt])).loss.item()
            event = events[start]
            expected = event.nll_collective if objective == "collective" else event.nodes[index].nll_isolated
            assert loss == pytest.approx(expected, abs=1e-4), (node.id, start)
