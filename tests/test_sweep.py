"""`collective sweep`: the grid, clear errors on a bad --set, one run folder per cell, the
summary, and resuming (finished cells skipped, an INCOMPLETE one rerun)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from collective.cli import main
from collective.evaluate.sweep import apply_override, expand_grid, parse_set
from collective.run.rundir import INCOMPLETE
from collective.scenario import ScenarioError
from tests.test_plots import assert_real_png
from tests.test_rundir import write_tiny_scenario

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(tmp_path: Path, model_dir: Path) -> dict:
    return yaml.safe_load(write_tiny_scenario(tmp_path, model_dir).read_text(encoding="utf-8"))


def test_the_grid_is_every_combination_times_every_seed(tmp_path, tiny_model_dir):
    sets = [parse_set("bus.max_message_tokens=2,4"), parse_set("node_defaults.message.policy=relay,shuffle")]
    cells = expand_grid(_data(tmp_path, tiny_model_dir), sets, [0, 1], source="tiny.yaml")
    assert len(cells) == 8
    assert {(c.scenario.bus.max_message_tokens, c.scenario.node("a").message.policy, c.seed) for c in cells} == {
        (t, p, s) for t in (2, 4) for p in ("relay", "shuffle") for s in (0, 1)
    }
    assert all(c.scenario.seed == c.seed for c in cells)
    assert len({c.folder_name for c in cells}) == 8


def test_another_policy_replaces_the_old_ones_fields():
    data = {"node_defaults": {"message": {"policy": "generate", "speak_prompt": "x"}}}
    assert apply_override(data, "node_defaults.message.policy", "relay") == {"node_defaults": {"message": {"policy": "relay"}}}
    assert data["node_defaults"]["message"]["speak_prompt"] == "x"  # the input is not changed


def test_an_unknown_path_names_it_and_the_closest_key(tmp_path, tiny_model_dir):
    with pytest.raises(ScenarioError, match=r"bus\.max_mesage_tokens.*did you mean 'max_message_tokens'"):
        expand_grid(_data(tmp_path, tiny_model_dir), [parse_set("bus.max_mesage_tokens=4")], [0], source="tiny.yaml")


def test_a_wrong_typed_value_names_the_path_and_what_was_expected(tmp_path, tiny_model_dir):
    with pytest.raises(ScenarioError, match=r"bus\.max_message_tokens.*valid integer.*'lots'"):
        expand_grid(_data(tmp_path, tiny_model_dir), [parse_set("bus.max_message_tokens=4,lots")], [0], source="tiny.yaml")


def test_a_bad_set_is_an_error_on_the_command_line(tmp_path, tiny_model_dir, capsys):
    scenario = write_tiny_scenario(tmp_path, tiny_model_dir)
    code = main(["sweep", str(scenario), "--set", "bsu.max_message_tokens=4", "--out", str(tmp_path / "s")])
    assert code == 2
    printed = capsys.readouterr()
    assert "did you mean 'bus'" in printed.err and "did you mean" not in printed.out  # errors on stderr


def _token_weighted(run_dir: Path, field: str) -> float:
    """A pooled row's NLL over the eval rounds of a run folder, from its round records."""
    rounds = [json.loads(line) for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    rounds = [r for r in rounds if r.get("kind") == "round" and r["phase"] == "eval"]
    return sum(r[field] * r["n_tokens"] for r in rounds) / sum(r["n_tokens"] for r in rounds)


def _sweep(scenario: Path, out: Path) -> int:
    return main(["sweep", str(scenario), "--set", "bus.max_message_tokens=2,6", "--seeds", "3", "--out", str(out), "--threads", "1"])


def test_ctrl_c_keeps_finished_cells_and_a_rerun_resumes(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from collective.run.engine import RoundEngine

    five_rounds = {"source": "builtin:pydoc", "train_tokens": 48, "eval_tokens": 8 * 5}  # enough rounds for an interval
    scenario, out = write_tiny_scenario(tmp_path, tiny_model_dir, corpus=five_rounds), tmp_path / "sweep"
    names = ["bus.max_message_tokens=2,seed=3", "bus.max_message_tokens=6,seed=3"]
    real_run = RoundEngine.run

    def ctrl_c_in_the_second_cell(self, **kwargs):
        if self.scenario.bus.max_message_tokens == 6:
            raise KeyboardInterrupt
        return real_run(self, **kwargs)

    monkeypatch.setattr(RoundEngine, "run", ctrl_c_in_the_second_cell)
    assert _sweep(scenario, out) == 130
    assert (out / names[0] / "report.json").exists() and not (out / names[0] / INCOMPLETE).exists()
    assert (out / names[1] / INCOMPLETE).exists() and not (out / names[1] / "report.json").exists()
    finished = (out / names[0] / "report.json").stat().st_mtime_ns
    monkeypatch.setattr(RoundEngine, "run", real_run)
    capsys.readouterr()

    assert _sweep(scenario, out) == 0
    printed = capsys.readouterr().out
    assert f"{names[0]}: already finished, skipped" in printed and f"{names[1]}: done" in printed
    assert (out / names[0] / "report.json").stat().st_mtime_ns == finished
    assert (out / names[1] / "report.json").exists() and not (out / names[1] / INCOMPLETE).exists()

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [c["overrides"] for c in summary["cells"]] == [{"bus.max_message_tokens": 2}, {"bus.max_message_tokens": 6}]
    assert [c["seed"] for c in summary["cells"]] == [3, 3] and len(summary["means"]) == 2
    small, large = (c["bytes_per_link_round"] for c in summary["cells"])
    assert 0 < small < large  # a larger token budget sends more bytes
    for cell, name in zip(summary["cells"], names):
        # the gain is the cell's silent ensemble minus its collective, recomputed from its rounds,
        # and its interval the one its own report gives (not another row's, not a seed mean's)
        collective, silent = _token_weighted(out / name, "nll_collective"), _token_weighted(out / name, "nll_silent")
        assert cell["communication_gain"]["value"] == pytest.approx(silent - collective, abs=1e-5)
        report = json.loads((out / name / "report.json").read_text(encoding="utf-8"))
        gain = report["communication_gain"]
        assert math.isfinite(gain["ci"]["low"]) and gain["ci"]["low"] != report["collective_gain"]["ci"]["low"]
        assert cell["communication_gain"]["ci"] == pytest.approx([gain["ci"]["low"], gain["ci"]["high"]])
        assert cell["collective_gain"]["value"] == pytest.approx(report["collective_gain"]["value"], abs=1e-12)
    rows = (out / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + 2 + 2 and rows[0].startswith("combination,bus.max_message_tokens,seed,communication_gain")
    assert rows[1].startswith("bus.max_message_tokens=2,2,3,")
    assert_real_png(out / "gain_vs_bandwidth.png")
    capsys.readouterr()
    assert main(["report", str(out), "--markdown"]) == 0  # collective report reads a sweep folder
    table = capsys.readouterr().out
    first = summary["cells"][0]
    assert f"| bus.max_message_tokens=2 | 3 | {first['communication_gain']['value']:+.3f} [" in table
    assert "| bus.max_message_tokens=6 | mean |" in table

    assert _sweep(scenario, out) == 0
    assert "done" not in capsys.readouterr().out  # a third invocation runs nothing

    (out / names[0] / INCOMPLETE).write_text("killed after the report was written\n", encoding="utf-8")
    assert _sweep(scenario, out) == 0  # a marked folder is rerun even if it holds a report
    assert f"{names[0]}: done" in capsys.readouterr().out and not (out / names[0] / INCOMPLETE).exists()


def test_a_long_combination_gets_a_short_distinct_folder_name():
    from collective.evaluate.sweep import MAX_FOLDER_NAME, Cell

    long_value = "x" * 300

    def cell(last):
        return Cell((("corpus.path", long_value), ("node_defaults.message.policy", last)), 0, None)  # type: ignore[arg-type]

    one, two = cell("relay").folder_name, cell("search").folder_name
    assert len(one) <= MAX_FOLDER_NAME and len(two) <= MAX_FOLDER_NAME
    assert one != two
    assert Cell((("bus.max_message_tokens", 8),), 1, None).folder_name == "bus.max_message_tokens=8,seed=1"  # type: ignore[arg-type]


def test_a_cell_searches_its_controllers_as_collective_run_does(tmp_path, tiny_model_dir):
    import json

    from tests.test_rundir import EVAL_ROUNDS

    gcg = {"kind": "gcg", "tokens": 2, "steps": 1, "search_width": 4, "topk": 4, "train_rounds": 1,
           "validation_rounds": 0, "ascii_only": False, "init": "x x"}
    scenario = write_tiny_scenario(
        tmp_path, tiny_model_dir, corpus={"source": "builtin:pydoc", "train_tokens": 96, "eval_tokens": 8 * EVAL_ROUNDS},
        node_defaults={"model": "tiny", "message": {"policy": "relay"}, "controller": gcg},
    )
    out = tmp_path / "sweep"
    assert main(["sweep", str(scenario), "--set", "bus.max_message_tokens=4", "--out", str(out), "--threads", "1"]) == 0
    controls = json.loads((out / "bus.max_message_tokens=4,seed=2" / "controls.json").read_text(encoding="utf-8"))
    assert sorted(s["node_id"] for s in controls["searches"]) == ["a", "b", "c"]
    assert all(len(ids) == 2 for ids in controls["control_ids"].values())


def test_a_cell_that_cannot_be_prepared_names_the_file_and_the_cell(tmp_path, tiny_model_dir, capsys):
    scenario = write_tiny_scenario(
        tmp_path, tiny_model_dir,
        nodes=[{"id": "a", "view": {"kind": "masked", "tokens": 8, "keep": 0.5, "placeholder": "many tokens here"}}, {"id": "b"}],
    )
    code = main(["sweep", str(scenario), "--set", "bus.max_message_tokens=4", "--out", str(tmp_path / "s"), "--threads", "1"])
    err = capsys.readouterr()
    message = err.err + err.out
    assert code != 0
    assert f"{scenario} (bus.max_message_tokens=4, seed 2): nodes[0].view.placeholder" in " ".join(message.split())


def test_a_set_value_is_yaml_one_value_or_a_comma_list_and_bad_yaml_names_the_option():
    assert parse_set("aggregator.exclude=[a, b]", single=True).values == (["a", "b"],)
    assert parse_set("bus.max_message_tokens=4,8").values == (4, 8)
    with pytest.raises(ScenarioError, match=r"--set 'x=\[a': the value is not valid YAML"):
        parse_set("x=[a", single=True)


def test_report_paired_gives_each_seeds_difference_and_the_t_interval_over_seeds_and_refuses_unpaired_runs(
    tmp_path, tiny_model_dir, capsys
):
    from tests.test_rundir import WARMUP

    eval_rounds = 6
    scenario = write_tiny_scenario(
        tmp_path, tiny_model_dir, corpus={"source": "builtin:pydoc", "train_tokens": 48, "eval_tokens": 8 * eval_rounds},
        evaluation={"context_tokens": 24, "warmup_rounds": WARMUP, "top_k": 8},
    )
    out = tmp_path / "sweep"
    assert main(["sweep", str(scenario), "--set", "node_defaults.message.policy=relay,shuffle", "--seeds", "3,4",
                 "--out", str(out), "--threads", "1"]) == 0
    capsys.readouterr()
    relay, shuffle = "node_defaults.message.policy=relay", "node_defaults.message.policy=shuffle"
    assert main(["report", str(out), "--paired", relay, shuffle, "--markdown"]) == 0
    printed = capsys.readouterr().out
    differences = []
    for seed in (3, 4):
        a = _token_weighted(out / f"{relay},seed={seed}", "nll_collective")
        b = _token_weighted(out / f"{shuffle},seed={seed}", "nll_collective")
        differences.append(a - b)
        assert f"| seed {seed} | {eval_rounds} | {a:.3f} | {b:.3f} | {a - b:+.3f} |" in printed
    mean = sum(differences) / 2
    half = 12.706204736174696 * abs(differences[0] - differences[1]) / 2  # t(0.975, 1) * sd / sqrt(2)
    assert f"| mean over 2 |  |  |  | {mean:+.3f} | {mean - half:+.3f} .. {mean + half:+.3f} (t, 1 df) |" in printed
    assert differences[0] != differences[1]  # the two seeds are not one run twice

    # two run folders of different seeds do not share their eval tokens: refused, both named
    first, second = out / f"{relay},seed=3", out / f"{shuffle},seed=4"
    assert main(["report", str(first), str(second), "--paired"]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "seed 3 vs 4" in message and first.name in message and second.name in message
    # a cell that names no combination of the sweep
    assert main(["report", str(out), "--paired", "node_defaults.message.policy=search", shuffle]) == 2
    assert "matches no combination" in " ".join(capsys.readouterr().err.split())


def test_a_cells_summary_carries_its_reports_unit_into_the_json_the_csv_and_the_mean():
    from collective.evaluate.sweep import (
        Cell,
        cell_summary,
        mean_over_seeds,
        summary_csv,
        summary_json,
    )
    from tests.test_compare import make_report

    byte = make_report(0, 3.3).model_copy(update={"unit": "byte"})
    cells = [
        cell_summary(Cell((("models", "mixed"),), seed, None), byte, []) for seed in (0, 1)  # type: ignore[arg-type]
    ] + [cell_summary(Cell((("models", "smol"),), 0, None), make_report(0, 3.3), [])]  # type: ignore[arg-type]
    assert [c.unit for c in cells] == ["byte", "byte", "token"]
    assert [m.unit for m in mean_over_seeds(cells)] == ["byte", "token"]
    data = summary_json(cells)
    assert [c["unit"] for c in data["cells"]] == ["byte", "byte", "token"] and [m["unit"] for m in data["means"]] == ["byte", "token"]
    rows = summary_csv(cells).splitlines()
    assert rows[0].endswith(",bytes_per_link_round,unit") and rows[1].endswith(",byte") and rows[3].endswith(",token")
