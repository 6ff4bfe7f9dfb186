"""The command line: exit codes and messages of run, validate and schema."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from collective.cli import EXIT_USER_ERROR, main
from collective.records import Report
from tests.test_rundir import EVAL_ROUNDS, write_tiny_scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """rich wraps at 80 columns when not on a terminal, even inside a path; don't."""
    monkeypatch.setenv("COLUMNS", "1000")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())  # unwrap rich's line breaks


# ---------------------------------------------------------------------------- schema


def test_schema_prints_the_json_schema(capsys):
    code = main(["schema"])
    schema = json.loads(capsys.readouterr().out)
    assert code == 0
    assert schema["title"] == "collective scenario"
    assert {"name", "models", "nodes", "bus"} <= set(schema["properties"])


# ---------------------------------------------------------------------------- validate


def test_validate_accepts_good_files(capsys, tmp_path, tiny_model_dir):
    first = write_tiny_scenario(tmp_path, tiny_model_dir, name="one")
    second = write_tiny_scenario(tmp_path, tiny_model_dir, name="two")
    code, out = _cli(capsys, "validate", str(first), str(second))
    assert code == 0
    assert f"ok {first}: 3 nodes, {EVAL_ROUNDS} eval rounds" in out
    assert f"ok {second}" in out


def test_validate_names_each_bad_file_and_exits_non_zero(capsys, tmp_path, tiny_model_dir):
    good = write_tiny_scenario(tmp_path, tiny_model_dir, name="good")
    typo = write_tiny_scenario(tmp_path, tiny_model_dir, name="typo", colour="red")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nnodes: [a\n", encoding="utf-8")
    code, out = _cli(capsys, "validate", str(good), str(typo), str(broken), str(tmp_path / "missing.yaml"))
    assert code == EXIT_USER_ERROR
    assert f"ok {good}" in out
    assert f"invalid {typo}: the scenario is not valid (1 problem(s)): - colour: unknown key" in out
    assert f"invalid {broken}: this is not valid YAML at line" in out
    assert f"invalid {tmp_path / 'missing.yaml'}: no such scenario file" in out
    assert "Traceback" not in out


def test_validate_reports_a_topology_that_cannot_be_built(capsys, tmp_path, tiny_model_dir):
    path = write_tiny_scenario(tmp_path, tiny_model_dir, topology={"kind": "no-such-graph"})
    code, out = _cli(capsys, "validate", str(path))
    assert code == EXIT_USER_ERROR
    assert "invalid" in out and "no-such-graph" in out


def test_validate_deep_loads_the_model_and_corpus(capsys, tmp_path, tiny_model_dir):
    good = write_tiny_scenario(tmp_path, tiny_model_dir, name="good")
    too_big = write_tiny_scenario(tmp_path, tiny_model_dir, name="big",
                                  corpus={"source": "builtin:pydoc", "train_tokens": 48, "eval_tokens": 10_000_000})
    no_model = write_tiny_scenario(tmp_path, tmp_path / "no-such-model-folder", name="nomodel")
    code, out = _cli(capsys, "--cache-dir", str(tmp_path / "cache"), "validate", "--deep", str(good), str(too_big), str(no_model))
    assert code == EXIT_USER_ERROR
    assert f"ok {good}" in out
    assert "10000048 are needed" in out
    assert "no-such-model-folder" in out
    assert "Traceback" not in out


def test_validate_deep_names_the_file_of_each_error(capsys, tmp_path, tiny_model_dir):
    too_big = write_tiny_scenario(tmp_path, tiny_model_dir, name="big",
                                  corpus={"source": "builtin:pydoc", "train_tokens": 48, "eval_tokens": 10_000_000})
    code, out = _cli(capsys, "--cache-dir", str(tmp_path / "cache"), "validate", "--deep", str(too_big))
    assert code == EXIT_USER_ERROR
    assert f"invalid {too_big}: " in out


# ---------------------------------------------------------------------------- run


def test_run_writes_the_folder_and_prints_the_report(capsys, tmp_path, tiny_model_dir):
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    out_dir = tmp_path / "out"
    code, out = _cli(capsys, "--cache-dir", str(tmp_path / "cache"), "run", str(scenario), "--no-live", "--out", str(out_dir))
    assert code == 0
    assert f"run folder: {out_dir}" in out
    assert out.count("round ") >= 1 + EVAL_ROUNDS  # one plain line per round
    assert "collective gain" in out and "communication gain" in out
    report = Report.model_validate_json((out_dir / "report.json").read_text())
    assert report.verdict.split(";")[0] in out
    assert not (out_dir / "INCOMPLETE").exists()


def test_run_seed_overrides_the_scenario_seed(capsys, tmp_path, tiny_model_dir):
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    out_dir = tmp_path / "out"
    code, _ = _cli(capsys, "run", str(scenario), "--quiet", "--no-live", "--seed", "11", "--out", str(out_dir))
    assert code == 0
    assert Report.model_validate_json((out_dir / "report.json").read_text()).seed == 11
    assert yaml.safe_load((out_dir / "scenario.yaml").read_text())["seed"] == 11


def test_run_threads_sets_torchs_thread_count_and_refuses_zero(capsys, tmp_path, tiny_model_dir):
    torch.set_num_threads(2)
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    code, _ = _cli(capsys, "run", str(scenario), "--quiet", "--no-live", "--threads", "1", "--out", str(tmp_path / "o"))
    assert code == 0 and torch.get_num_threads() == 1
    with pytest.raises(SystemExit) as refused:
        main(["run", str(scenario), "--threads", "0", "--out", str(tmp_path / "o2")])
    assert refused.value.code == 2
    assert "argument --threads: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_run_of_a_bad_scenario_is_one_message_and_exit_2(capsys, tmp_path, tiny_model_dir):
    code, out = _cli(capsys, "run", str(tmp_path / "nope.yaml"), "--no-live")
    assert (code, out) == (EXIT_USER_ERROR, f"error: {tmp_path / 'nope.yaml'}: no such scenario file")
    offline = write_tiny_scenario(tmp_path, tmp_path / "absent-model", name="offline")
    code, out = _cli(capsys, "--cache-dir", str(tmp_path / "cache"), "run", str(offline), "--no-live", "--out", str(tmp_path / "o"))
    assert code == EXIT_USER_ERROR
    assert out.startswith("error: ") and "absent-model" in out and "Traceback" not in out


def test_ctrl_c_during_a_run_exits_130_and_leaves_no_report(capsys, tmp_path, tiny_model_dir, monkeypatch):
    import collective.run.runner as runner

    real_run = runner.RoundEngine.run

    def interrupted(self, on_event=None, should_stop=None):
        def stop_after_first(event):
            if on_event is not None:
                on_event(event)
            raise KeyboardInterrupt

        return real_run(self, on_event=stop_after_first, should_stop=should_stop)

    monkeypatch.setattr(runner.RoundEngine, "run", interrupted)
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    out_dir = tmp_path / "out"
    code, out = _cli(capsys, "run", str(scenario), "--no-live", "--out", str(out_dir))
    assert code == 130
    assert "interrupted" in out
    assert (out_dir / "INCOMPLETE").exists() and not (out_dir / "report.json").exists()


# ---------------------------------------------------------------------------- validate: speakers and latency


def _speaker_file(tmp_path, *, train_rounds: int, latency_rounds: int, link_latency: int | None = None):
    bus = {"round_tokens": 16, "latency_rounds": latency_rounds}
    if link_latency is not None:
        bus["links"] = [{"source": "n1", "target": "n2", "latency_rounds": link_latency}]
    data = {
        "name": "speakers", "models": {"m": "some/model"}, "corpus": {"train_tokens": 512, "eval_tokens": 32},
        "node_defaults": {"model": "m", "message": {"policy": "generate"}},
        "nodes": {"count": 3, "overrides": {"n1": {"controller": {"kind": "gcg", "objective": "speak", "train_rounds": train_rounds}}}},
        "topology": {"kind": "edges", "directed": True, "edges": [["n1", "n2"], ["n2", "n0"]]},
        "bus": bus, "evaluation": {"context_tokens": 32, "warmup_rounds": 1},
    }
    path = tmp_path / f"speak-{train_rounds}-{latency_rounds}-{link_latency}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_validate_refuses_a_speaker_whose_train_rounds_do_not_outlast_its_links_latency(capsys, tmp_path):
    code, out = _cli(capsys, "validate", str(_speaker_file(tmp_path, train_rounds=2, latency_rounds=2)))
    assert code == EXIT_USER_ERROR
    assert "controller.train_rounds" in out and "latency is 2 round(s)" in out and "set train_rounds above 2" in out
    assert _cli(capsys, "validate", str(_speaker_file(tmp_path, train_rounds=3, latency_rounds=2)))[0] == 0
    # a faster override on its out-link is read in time
    assert _cli(capsys, "validate", str(_speaker_file(tmp_path, train_rounds=2, latency_rounds=2, link_latency=1)))[0] == 0


# ---------------------------------------------------------------------------- errors on stderr


@pytest.mark.parametrize(
    ("command", "complaint"),
    [
        (["run", "{tmp}/missing[a].yaml"], "{tmp}/missing[a].yaml: no such scenario file"),
        (["sweep", "{tmp}/missing.yaml", "--out", "{tmp}/s"], "no such scenario file"),
        (["hostile", "{tmp}/missing.yaml"], "no such scenario file"),
        (["validate", "{tmp}/missing.yaml"], "invalid {tmp}/missing.yaml: no such scenario file"),
        (["report", "{tmp}/nothing"], "{tmp}/nothing has no report.json: no such folder"),
        (["watch", "{tmp}"], "no events.jsonl here"),
        (["node", "--broker", "mqtt://127.0.0.1:1", "--run", "x", "--node", "[a]"], "--node '[a]'"),
        (["broker", "--config-dir", "{tmp}/b", "--user", "alice", "--no-start"], "expected NAME:PASSWORD"),
        (["reach", "--model", "{tmp}/no-model", "--out", "{tmp}/r", "--pairs", "1"], "{tmp}/no-model' does not exist"),
        (["game", "x", "--target", " y", "--model", "{tmp}/no-model"], "{tmp}/no-model' does not exist"),
    ],
)
def test_each_command_prints_its_error_on_stderr_and_nothing_of_it_on_stdout(capsys, tmp_path, monkeypatch, command, complaint):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main([part.replace("{tmp}", str(tmp_path)) for part in command])
    printed = capsys.readouterr()
    assert code == EXIT_USER_ERROR
    assert complaint.replace("{tmp}", str(tmp_path)) in " ".join(printed.err.split())  # brackets kept: not Rich markup
    assert "error" not in printed.out and "invalid" not in printed.out
