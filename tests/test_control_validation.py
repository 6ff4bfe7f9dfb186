"""Controllers that carry over: the validation slice at the end of the train part chooses the
returned prompt and stops the search early; the eval part is never read."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from collective.records import Controls
from collective.run import control
from collective.run.control import _loss, _record, _Training, search_controls
from collective.scenario import GCGController
from controllers.held_out import HeldOut
from controllers.objectives import Scores
from tests.test_control import GCG, ROUND, _prepared, _training_nll

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VALIDATED = {**GCG, "steps": 4, "validation_rounds": 2, "patience": 10}


def test_the_validation_slice_is_the_train_parts_last_rounds_and_each_nodes_training_rounds_come_just_before_it(
    tiny_model_dir, tmp_path
):
    prepared = _prepared(tmp_path, tiny_model_dir, VALIDATED, nodes=[
        {"id": "a", "view": {"kind": "window", "tokens": 16}, "controller": {**VALIDATED, "train_rounds": 3}},
        {"id": "b", "view": {"kind": "window", "tokens": 16}, "controller": {**VALIDATED, "validation_rounds": 1}},
        {"id": "c", "view": {"kind": "none"}},
    ])
    end = prepared.scenario.corpus.train_tokens  # where the eval part starts
    training = _Training.of(prepared)
    assert [start for _, start in training.validation(2)] == [end - 2 * ROUND, end - ROUND]
    assert [start for _, start in training.validation(1)] == [end - ROUND]
    assert [start for _, start in training.last(3)] == [end - 5 * ROUND, end - 4 * ROUND, end - 3 * ROUND]
    assert [start for _, start in training.last(2)] == [end - 4 * ROUND, end - 3 * ROUND]
    assert [index for index, _ in training.last(3) + training.validation(2)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="3 validation rounds asked of a slice of 2"):
        training.validation(3)
    # the collective objective's recording covers the training rounds and the slice, and no more
    recorder = _record(prepared, training.scenario)
    assert len(recorder.rounds) == 5
    assert max(training.starts) + ROUND == end


class _Recording(HeldOut):
    """The validation callback, recording every prompt the search offered it (its candidates)."""

    offered: list[list[list[int]]] = []  # per instance, in the order the nodes are searched

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mine: list[list[int]] = []
        _Recording.offered.append(self.mine)

    def __call__(self, step: int, ids: torch.Tensor) -> bool:
        self.mine.append([int(i) for i in ids.tolist()])
        return super().__call__(step, ids)


def test_the_search_returns_the_prompt_lowest_on_the_validation_slice_and_reads_neither_the_eval_part_nor_the_slice_to_train(
    tiny_model_dir, tmp_path, monkeypatch
):
    prepared = _prepared(tmp_path, tiny_model_dir, VALIDATED)
    monkeypatch.setattr(_Recording, "offered", [])
    monkeypatch.setattr(control, "HeldOut", _Recording)
    found = {s.node_id: s for s in search_controls(prepared)}
    offered = dict(zip(found, _Recording.offered))
    monkeypatch.undo()
    without = _prepared(tmp_path / "without", tiny_model_dir, {**VALIDATED, "validation_rounds": 0})
    # the same search with no slice: the training rounds are the last ones, so move them onto
    # the same rounds by cutting the slice off the train part
    corpus = without.scenario.corpus.model_copy(update={"train_tokens": without.scenario.corpus.train_tokens - 2 * ROUND})
    without = replace(without, scenario=without.scenario.model_copy(update={"corpus": corpus}))
    train_best = {s.node_id: s for s in search_controls(without)}
    init = control._initial_ids(GCGController.model_validate(VALIDATED), prepared.tokenizer)
    chosen_otherwise = 0
    for node_id, search in found.items():
        assert search.steps == 4 and search.stopped_at_step is None  # patience 10: never stopped
        assert train_best[node_id].initial_loss == pytest.approx(search.initial_loss, abs=1e-6)  # the same training rounds
        assert search.validation_loss is not None and search.initial_validation_loss is not None
        # the prompt returned is the lowest on the slice among the initial prompt and every
        # candidate the search offered, each scored again by a run of its own
        candidates = [init, *offered[node_id]]
        assert len({tuple(c) for c in candidates}) > 1  # the search offered something new
        rescored = {
            tuple(c): _training_nll(replace(prepared, control_ids=dict.fromkeys(prepared.scenario.node_ids, c)), node_id, 2,
                                    "isolated", validation=True)
            for c in candidates
        }
        best = min(rescored.values())
        assert search.validation_loss == pytest.approx(best, abs=1e-4)
        assert rescored[tuple(search.control_ids)] == pytest.approx(best, abs=1e-4)
        # the numbers are the isolated NLL a run gives on the slice and on the training rounds
        assert search.validation_loss == pytest.approx(_training_nll(prepared, node_id, 2, "isolated", validation=True), abs=1e-4)
        assert search.loss == pytest.approx(_training_nll(prepared, node_id, 2, "isolated"), abs=1e-4)
        with_init = replace(prepared, control_ids=dict.fromkeys(prepared.scenario.node_ids, init))
        initial = _training_nll(with_init, node_id, 2, "isolated", validation=True)
        assert search.initial_validation_loss == pytest.approx(initial, abs=1e-4)
        # the search without a slice takes the same steps; its lowest-training-loss prompt was
        # a candidate here too, and is no better on the slice than the prompt returned
        best_by_training = replace(prepared, control_ids=dict.fromkeys(prepared.scenario.node_ids, train_best[node_id].control_ids))
        assert search.validation_loss <= _training_nll(best_by_training, node_id, 2, "isolated", validation=True) + 1e-5
        assert search.loss >= train_best[node_id].loss - 1e-5
        chosen_otherwise += search.control_ids != train_best[node_id].control_ids
    assert chosen_otherwise > 0  # on this data the training loss and the slice disagree, and the slice decides

    def poisoned(start: int, stop: int):
        stream = prepared.stream.clone()
        stream[start:stop] = torch.flip(stream[start:stop], dims=[0]) + 1
        return {s.node_id: s.model_copy(update={"wall_seconds": 0.0}) for s in search_controls(
            replace(prepared, stream=stream, control_ids={}))}

    end = prepared.scenario.corpus.train_tokens
    untimed = {node_id: s.model_copy(update={"wall_seconds": 0.0}) for node_id, s in found.items()}
    assert poisoned(end, len(prepared.stream)) == untimed  # the eval part is never read
    other_slice = poisoned(end - 2 * ROUND, end)  # the slice is read only to validate
    for node_id, search in found.items():
        assert other_slice[node_id].initial_loss == search.initial_loss
        assert other_slice[node_id].initial_validation_loss != pytest.approx(search.initial_validation_loss, abs=1e-4)


class _DistanceFrom:
    """A stand-in validation objective: the number of tokens a prompt differs from `ids` in."""

    def __init__(self, model, ids: list[int]) -> None:
        self.model, self.ids = model, torch.tensor(ids)

    def scores(self, control_ids: torch.Tensor) -> Scores:
        loss = (control_ids.cpu() != self.ids).sum(-1).float()
        return Scores(loss=loss, success=torch.zeros_like(loss, dtype=torch.bool))


def test_patience_ends_the_search_and_the_prompt_best_on_the_slice_is_returned_even_when_training_prefers_another(
    tiny_model_dir, tmp_path, monkeypatch
):
    """With a validation objective that no prompt beats the initial one on, the search stops
    after `patience` steps and returns the initial prompt, whatever the training loss says."""
    prepared = _prepared(tmp_path, tiny_model_dir, {**VALIDATED, "steps": 6, "patience": 2})
    scored: list[list[int]] = []

    def validation(prepared, node, training, recorder, init):
        spec = node.controller
        held_out = _DistanceFrom(prepared.models[node.model].model, init)
        real = held_out.scores
        held_out.scores = lambda ids: (scored.append(ids[0].tolist()), real(ids))[1]  # type: ignore[method-assign]
        return HeldOut(lambda ids: _loss(held_out, ids), init, spec.patience, spec.steps)  # type: ignore[arg-type]

    monkeypatch.setattr(control, "_validation", validation)
    init = control._initial_ids(GCGController.model_validate(VALIDATED), prepared.tokenizer)
    for search in search_controls(prepared):
        assert search.steps == 2 and search.stopped_at_step == 2
        assert search.control_ids == init and search.validation_loss == 0.0 == search.initial_validation_loss
        assert search.loss == pytest.approx(search.initial_loss, abs=1e-6)  # the training loss of the prompt returned
    # after each step the slice scored the lowest-training-loss prompt, which had moved away from the initial one
    assert any(ids != init for ids in scored)


def test_a_version_1_controls_file_still_reads_and_version_2_keeps_the_validation_numbers():
    old = {"schema_version": 1, "control_ids": {"a": [5, 6]}, "searches": [
        {"node_id": "a", "objective": "local", "control_ids": [5, 6], "control_text": "hi", "loss": 1.0,
         "initial_loss": 2.0, "steps": 3, "wall_seconds": 0.5}]}
    read = Controls.model_validate_json(json.dumps(old))
    assert read.searches[0].validation_loss is None and read.searches[0].stopped_at_step is None
    search = read.searches[0].model_copy(update={"validation_loss": 1.5, "initial_validation_loss": 1.7, "stopped_at_step": 4})
    written = Controls(control_ids={"a": [5, 6]}, searches=[search]).model_dump_json()
    again = Controls.model_validate_json(written)
    assert again.schema_version == 2 and again.searches[0] == search
