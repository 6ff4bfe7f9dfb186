"""Speaker controllers (`objective: speak`): node a's prompt searched on the train part to
lower its out-neighbour's NLL in collective through the messages a writes, every candidate
scored end to end (write the messages, then score the receivers)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from collective.cli import main
from collective.lm.models import ModelPool
from collective.run.control import _initial_ids, _record, _Training, search_controls
from collective.run.prepared import RunError, build_graph
from collective.run.runner import prepare
from collective.run.speaker import SpeakObjective, relay_surrogate
from collective.scenario import GCGController, load_scenario, parse_scenario
from controllers import gcg as gcg_module
from tests.test_control import _training_run
from tests.test_rundir import write_tiny_scenario

SPEAK = {
    "kind": "gcg", "objective": "speak", "tokens": 3, "steps": 6, "search_width": 16, "topk": 32,
    "train_rounds": 3, "validation_rounds": 2, "init": "x x x",
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prepared(folder: Path, model_dir: Path, controller: dict[str, Any]):
    """A ring a -> b -> c -> a where only a writes its messages (b and c relay what they
    read, so nothing a says comes back to a's inbox): a's only reader is b, whose lagged view
    misses the 8 most recent tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_tiny_scenario(
        folder, model_dir, name="speak", corpus={"source": "builtin:pydoc", "train_tokens": 96, "eval_tokens": 24},
        node_defaults={"model": "tiny", "message": {"policy": "relay"}},
        nodes=[
            {"id": "a", "view": {"kind": "window", "tokens": 16}, "message": {"policy": "generate"}, "controller": controller},
            {"id": "b", "view": {"kind": "lagged", "tokens": 8, "lag": 8}},
            {"id": "c", "view": {"kind": "none"}},
        ],
        topology={"kind": "ring", "directed": True},
    )
    return prepare(load_scenario(path), ModelPool(cache_dir=folder / "cache"), base_dir=folder)


def _receivers_nll(prepared, rounds: list[tuple[int, int]]) -> float:
    """b's NLL in collective, from a run of the collective with the current prompts, over the
    rounds in which it reads a message a sent in `rounds` (latency 1: all but the first)."""
    events = _training_run(prepared)
    b = prepared.scenario.node_ids.index("b")
    values = [events[start].nodes[b].nll_collective for _, start in rounds[1:]]
    return sum(v for v in values if v is not None) / len(values)


def test_the_speak_objective_lowers_the_receivers_train_nll_as_a_run_of_the_collective_measures_it(tiny_model_dir, tmp_path):
    prepared = _prepared(tmp_path, tiny_model_dir, SPEAK)
    steps: list[tuple[str, int, int]] = []
    (found,) = search_controls(prepared, progress=lambda node, step, total: steps.append((node, step, total)))
    assert found.objective == "speak" and found.node_id == "a" and prepared.control_ids["a"] == found.control_ids
    assert steps[-1] == ("a", found.steps, SPEAK["steps"])
    assert found.loss < found.initial_loss - 1e-3  # the search moved, downhill
    assert found.validation_loss is not None and found.initial_validation_loss is not None
    assert found.validation_loss < found.initial_validation_loss  # returned for its validation loss
    # Re-measured by running the collective over the training rounds: the losses are b's NLL
    # in collective there, with the prompt found and with the initial one.
    training = _Training.of(prepared)
    rounds = training.last(SPEAK["train_rounds"])
    with_found = _receivers_nll(prepared, rounds)
    init = _initial_ids(GCGController.model_validate(SPEAK), prepared.tokenizer)
    with_init = _receivers_nll(replace(prepared, control_ids={**prepared.control_ids, "a": init}), rounds)
    assert found.loss == pytest.approx(with_found, abs=1e-4)
    assert found.initial_loss == pytest.approx(with_init, abs=1e-4)
    assert with_found < with_init
    held_out = training.validation(SPEAK["validation_rounds"])
    assert found.validation_loss == pytest.approx(_receivers_nll(prepared, held_out), abs=1e-4)


def _word_prompts(tmp_path, model_dir, spec: dict[str, Any]):
    """The prepared run with node a at its initial prompt, the speak objective on its training
    rounds, and 64 three-word prompts (64, 3) to hand a search."""
    prepared = _prepared(tmp_path, model_dir, spec)
    init = _initial_ids(GCGController.model_validate(spec), prepared.tokenizer)
    prepared.control_ids["a"] = init
    training = _Training.of(prepared)
    objective = SpeakObjective(prepared, "a", _record(prepared, training.scenario), [r for r, _ in training.last(3)], "x")
    words = [prepared.tokenizer.encode(f" {w}", add_special_tokens=False) for w in ["the", "a", "of", "is", "to", "in", "and", "for"]]
    prompts = torch.tensor([w1 + w2 + w3 for w1 in words[:4] for w2 in words[2:6] for w3 in words[4:]])
    assert prompts.shape == (64, 3)
    return prepared, init, objective, prompts


def test_the_end_to_end_objective_decides_which_candidate_is_kept_not_the_surrogate(tiny_model_dir, tmp_path, monkeypatch):
    """Among prompts the surrogate ranks A < B and the true objective B < A (and B below the
    initial prompt), a step that proposes both keeps B."""
    prepared, init, objective, prompts = _word_prompts(tmp_path, tiny_model_dir, {**SPEAK, "steps": 1, "validation_rounds": 0})
    true = objective.losses(prompts)
    surrogate = relay_surrogate(objective).scores(prompts).loss.cpu()
    initial = float(objective.losses(torch.tensor([init]))[0])
    pairs = [
        (a, b) for a in range(len(prompts)) for b in range(len(prompts))
        if surrogate[a] < surrogate[b] - 1e-3 and true[b] < true[a] - 1e-3 and true[b] < initial - 1e-3
    ]
    assert pairs, "no disagreeing pair among the prompts"
    a, b = pairs[0]
    monkeypatch.setattr(gcg_module, "filter_candidates", lambda candidates, tokenizer, retokenize: prompts[[a, b]])
    (found,) = search_controls(prepared)
    assert found.control_ids == prompts[b].tolist()
    assert found.loss == pytest.approx(float(true[b]), abs=1e-5)


def test_the_search_is_deterministic_per_seed_and_never_reads_the_eval_part(tiny_model_dir, tmp_path):
    prepared = _prepared(tmp_path, tiny_model_dir, SPEAK)
    (first,) = search_controls(prepared)
    (again,) = search_controls(replace(prepared, control_ids={}))
    assert (again.control_ids, again.loss, again.validation_loss) == (first.control_ids, first.loss, first.validation_loss)
    train = prepared.scenario.corpus.train_tokens
    poisoned = prepared.stream.clone()
    poisoned[train:] = torch.flip(poisoned[train:], dims=[0]) + 1
    (blind,) = search_controls(replace(prepared, stream=poisoned, control_ids={}))
    assert (blind.control_ids, blind.loss) == (first.control_ids, first.loss)


def _scenario(edges: list[list[str]], message: str = "generate") -> dict[str, Any]:
    return {
        "name": "speakers",
        "models": {"m": "some/model"},
        "corpus": {"train_tokens": 256, "eval_tokens": 32},
        "node_defaults": {"model": "m", "message": {"policy": message}},
        "nodes": {"count": 3, "overrides": {"n1": {"controller": {"kind": "gcg", "objective": "speak"}}}},
        "topology": {"kind": "edges", "directed": True, "edges": edges},
        "bus": {"round_tokens": 16},
        "evaluation": {"context_tokens": 32, "warmup_rounds": 1},
    }


def test_a_speaker_without_out_links_or_that_does_not_write_is_refused_before_any_model_work(tmp_path, capsys):
    with pytest.raises(RunError) as info:
        build_graph(parse_scenario(_scenario([["n0", "n1"], ["n2", "n1"]])))
    message = str(info.value)
    assert message.startswith("nodes.n1.controller.objective: `speak`")
    assert "node 'n1' has no out-links in this topology (edges)" in message
    with pytest.raises(RunError, match=r"nodes.n1.controller.objective: .* has message policy 'relay'; set its message"):
        build_graph(parse_scenario(_scenario([["n1", "n2"]], message="relay")))
    build_graph(parse_scenario(_scenario([["n1", "n2"]])))  # out-links and written messages: fine
    path = tmp_path / "speakers.yaml"
    path.write_text(yaml.safe_dump(_scenario([["n0", "n1"]])), encoding="utf-8")
    assert main(["validate", str(path)]) == 2  # collective validate loads no model
    out = " ".join(capsys.readouterr().err.split())
    assert f"invalid {path}: nodes.n1.controller.objective:" in out and "no out-links" in out


def test_the_validation_slice_scores_the_lowest_training_loss_prompt_so_far_not_each_steps_best(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Patience counts as `objective: local` and `collective` count it: after each step the slice
    scores the best prompt so far. Steps whose best is worse than an earlier step's leave that
    earlier prompt the one validated, and it is not scored again."""
    prepared, init, objective, prompts = _word_prompts(tmp_path, tiny_model_dir, {**SPEAK, "steps": 3, "patience": 2})
    true = objective.losses(prompts)
    best, worst = int(true.argmin()), int(true.argmax())
    assert float(true[best]) < float(objective.losses(torch.tensor([init]))[0]) - 1e-3 < float(true[worst])
    proposals = iter([prompts[[best]], prompts[[worst]], prompts[[worst]]])  # steps 1, 2, 3
    monkeypatch.setattr(gcg_module, "filter_candidates", lambda candidates, tokenizer, retokenize: next(proposals))
    validated: list[list[int]] = []
    built, losses = SpeakObjective.__init__, SpeakObjective.losses

    def init_recording(self, prepared, speaker, recording, rounds, field):
        built(self, prepared, speaker, recording, rounds, field)
        self.on_slice = field.endswith("validation_rounds")

    def losses_recording(self, candidates):
        if self.on_slice:
            validated.extend(candidates.tolist())
        return losses(self, candidates)

    monkeypatch.setattr(SpeakObjective, "__init__", init_recording)
    monkeypatch.setattr(SpeakObjective, "losses", losses_recording)
    (found,) = search_controls(prepared)
    assert validated == [init, prompts[best].tolist()]  # the worse step-2 and step-3 prompt is never validated
    assert found.loss == pytest.approx(float(true[best]) if found.control_ids != init else found.initial_loss, abs=1e-5)
