"""The run folder, and the runner that fills it: complete runs, interrupted runs, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from collective.lm.models import ModelPool
from collective.records import Report, RoundEvent, RunEnd, RunStart, parse_event
from collective.run.rundir import (
    INCOMPLETE,
    RunDir,
    default_run_dir,
    is_complete,
    run_id_for,
    write_atomic,
)
from collective.run.runner import prepare, run_prepared
from collective.scenario import load_scenario

WARMUP, EVAL_ROUNDS = 1, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_tiny_scenario(folder: Path, model_dir: Path, name: str = "tiny-run", **changes) -> Path:
    """A small scenario YAML whose model is the tiny folder, on the builtin pydoc corpus."""
    data = {
        "name": name,
        "seed": 2,
        "models": {"tiny": {"ref": str(model_dir), "dtype": "float32", "device": "cpu"}},
        "corpus": {"source": "builtin:pydoc", "train_tokens": 48, "eval_tokens": 8 * EVAL_ROUNDS},
        "node_defaults": {"model": "tiny", "message": {"policy": "generate"}},
        "nodes": [
            {"id": "a", "view": {"kind": "window", "tokens": 16}},
            {"id": "b", "view": {"kind": "lagged", "tokens": 8, "lag": 8}},
            {"id": "c", "view": {"kind": "none"}, "message": {"policy": "relay"}},
        ],
        "topology": {"kind": "ring"},
        "bus": {"round_tokens": 8, "max_message_tokens": 4},
        "evaluation": {"context_tokens": 24, "warmup_rounds": WARMUP, "top_k": 8},
    }
    data.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenario")
    scenario = load_scenario(write_tiny_scenario(folder, tiny_model_dir))
    return prepare(scenario, ModelPool(cache_dir=folder / "cache"), base_dir=folder)


def _events(run_dir: Path) -> list:
    return [parse_event(line) for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------- the folder itself


def test_a_run_folder_is_incomplete_until_finished(tmp_path):
    folder = RunDir(tmp_path / "run").open("name: x\n")
    assert (tmp_path / "run" / INCOMPLETE).read_text().startswith("the run is in progress")
    assert (tmp_path / "run" / "scenario.yaml").read_text() == "name: x\n"
    folder.write_json("report.json", {"ok": 1})
    assert not is_complete(tmp_path / "run")
    folder.close()
    folder.finish()
    assert is_complete(tmp_path / "run")


def test_a_finished_run_folder_is_never_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        RunDir(tmp_path / "run").open("name: x\n")


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    write_atomic(tmp_path / "a.json", "one")
    write_atomic(tmp_path / "a.json", "two")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").read_text() == "two"


def test_default_run_folders_are_unique_and_named_after_the_scenario(tmp_path):
    first = default_run_dir("quick", root=tmp_path)
    first.mkdir()
    second = default_run_dir("quick", root=tmp_path)
    assert first.name.endswith("-quick") and second != first
    assert run_id_for(Path("runs/2024 01:02 quick")) == "2024-01-02-quick"


# ---------------------------------------------------------------------------- the runner


def test_a_complete_run_leaves_scenario_events_and_reports(prepared, tmp_path):
    run_dir = tmp_path / "run"
    result = run_prepared(prepared, run_dir)
    assert result.status == "complete" and result.report is not None
    names = {p.name for p in run_dir.iterdir()}
    assert {"scenario.yaml", "events.jsonl", "report.json", "report.md", "controls.json"} <= names
    assert INCOMPLETE not in names and is_complete(run_dir)
    assert load_scenario(run_dir / "scenario.yaml") == prepared.scenario
    events = _events(run_dir)
    assert isinstance(events[0], RunStart) and isinstance(events[-1], RunEnd)
    rounds = [e for e in events if isinstance(e, RoundEvent)]
    assert len(rounds) == len(events) - 2 == WARMUP + EVAL_ROUNDS
    assert [e.round_index for e in rounds] == list(range(WARMUP + EVAL_ROUNDS))
    assert events[-1].status == "complete" and events[-1].rounds_done == WARMUP + EVAL_ROUNDS
    assert {(a, b) for a, b in events[0].edges} == {("a", "b"), ("b", "a"), ("b", "c"), ("c", "b"), ("c", "a"), ("a", "c")}
    report = Report.model_validate_json((run_dir / "report.json").read_text())
    assert report.model_dump_json() == result.report.model_dump_json()  # NaN CIs (3 rounds) are unequal as floats
    assert report.run_id == "run" and report.n_eval_rounds == EVAL_ROUNDS
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith("# tiny-run") and report.verdict in markdown
    assert json.loads((run_dir / "controls.json").read_text())["control_ids"] == {"a": [], "b": [], "c": []}


def test_the_same_prepared_scenario_runs_to_the_same_numbers_twice(prepared, tmp_path):
    first = run_prepared(prepared, tmp_path / "one").report
    second = run_prepared(prepared, tmp_path / "two").report
    timing = {"run_id", "wall_seconds", "tokens_per_second"}
    assert first.model_dump(exclude=timing) == second.model_dump(exclude=timing)


def _assert_incomplete_without_report(run_dir: Path) -> list:
    assert (run_dir / INCOMPLETE).exists()
    assert not (run_dir / "report.json").exists() and not (run_dir / "report.md").exists()
    assert not is_complete(run_dir)
    events = _events(run_dir)
    assert isinstance(events[0], RunStart)
    assert isinstance(events[-1], RunEnd) and events[-1].status == "interrupted"
    return events


def test_ctrl_c_mid_run_leaves_the_folder_incomplete_and_without_a_report(prepared, tmp_path):
    run_dir = tmp_path / "run"

    def interrupt(event: RoundEvent) -> None:
        if event.round_index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_prepared(prepared, run_dir, on_event=interrupt)
    events = _assert_incomplete_without_report(run_dir)
    assert [e.round_index for e in events if isinstance(e, RoundEvent)] == [0, 1]
    assert events[-1].rounds_done == 2  # the rounds written before Ctrl-C
    assert "Ctrl-C" in (run_dir / INCOMPLETE).read_text()


def test_should_stop_ends_the_run_early_without_a_report(prepared, tmp_path):
    run_dir = tmp_path / "run"
    seen: list[RoundEvent] = []
    result = run_prepared(prepared, run_dir, on_event=seen.append, should_stop=lambda: len(seen) >= 2)
    assert (result.status, result.report) == ("interrupted", None)
    events = _assert_incomplete_without_report(run_dir)
    assert len([e for e in events if isinstance(e, RoundEvent)]) == 2
    assert events[-1].rounds_done == 2
    assert "stopped after 2 of 4 rounds" in (run_dir / INCOMPLETE).read_text()


def test_a_failing_round_marks_the_folder_failed(prepared, tmp_path):
    run_dir = tmp_path / "run"

    def explode(event: RoundEvent) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_prepared(prepared, run_dir, on_event=explode)
    assert "failed: RuntimeError('boom')" in (run_dir / INCOMPLETE).read_text()
    end = _events(run_dir)[-1]
    assert (end.status, end.rounds_done) == ("failed", 1)
    assert not (run_dir / "report.json").exists()


def test_report_hooks_see_the_finished_report(prepared, tmp_path):
    seen = []
    run_prepared(prepared, tmp_path / "run", report_hooks=[lambda path, report: seen.append((path, report.run_id))])
    assert seen == [(tmp_path / "run", "run")]


class _Publishing:
    """The embedded executor plus `publish_event`, as the distributed coordinator has it."""

    def __init__(self, inner, fail: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.fail = fail
        self.records: list = []

    def run_round(self, round_index, requests):  # type: ignore[no-untyped-def]
        return self.inner.run_round(round_index, requests)

    def publish_event(self, record) -> None:  # type: ignore[no-untyped-def]
        self.records.append(record)
        if self.fail:
            raise RuntimeError("the broker is gone")


def test_an_executor_that_publishes_events_gets_every_record_events_jsonl_gets(prepared, tmp_path):
    from collective.run.engine import EmbeddedExecutor

    publisher = _Publishing(EmbeddedExecutor.from_prepared(prepared))
    run_prepared(prepared, tmp_path / "run", executor=publisher)
    lines = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    assert [record.model_dump_json() for record in publisher.records] == lines
    assert len(lines) == 2 + WARMUP + EVAL_ROUNDS
    # a publisher that fails never breaks the run
    failing = _Publishing(EmbeddedExecutor.from_prepared(prepared), fail=True)
    assert run_prepared(prepared, tmp_path / "run-2", executor=failing).status == "complete"
    assert len(failing.records) == len(lines)
