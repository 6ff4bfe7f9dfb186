"""`collective hostile`: the variants are the scenario with exactly the stated changes, the
numbers are paired differences of the runs' per-round collective NLL, hostile.json
round-trips and is written whole, and the command runs every variant (here through a stand-in
for a run that writes known per-round NLLs; on the tiny model once attacks and firewalls run)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from collective.cli import main
from collective.evaluate.compare import mean_ci
from collective.evaluate.hostile import (
    READOUT_NOTE,
    VariantRun,
    collective_rounds,
    hostile_report,
    hostile_variants,
    pin_thresholds,
    read_variant,
    screen_counts,
    seed_result,
    silent_ensemble_spread,
)
from collective.evaluate.hostile_record import (
    NUMBERS,
    VARIANT_KINDS,
    HostileRecordError,
    HostileReport,
    ScreenCounts,
    read_hostile,
)
from collective.evaluate.intervals import METHOD, difference
from collective.evaluate.sweep import BrokenCell
from collective.records import Report, RoundEvent, RunEnd, ScreenRecord
from collective.run.prepared import RunError
from collective.scenario import (
    AttackMessage,
    GenerateMessage,
    Scenario,
    ScenarioError,
    SilentMessage,
    parse_scenario,
)
from tests.test_compare import make_report

ROUND_TOKENS = 8
EVAL_ROUNDS = 8


def scenario_data(**changes: Any) -> dict[str, Any]:
    """Four nodes; b is hostile (benign: generate) and has no firewall of its own, a and d take
    node_defaults' perplexity filter, c has a charset filter; d is already out of the pools."""
    data: dict[str, Any] = {
        "name": "hostile-test",
        "seed": 1,
        "models": {"m": "x"},
        "corpus": {"train_tokens": 512, "eval_tokens": ROUND_TOKENS * EVAL_ROUNDS},
        "node_defaults": {
            "model": "m", "view": {"kind": "window", "tokens": 16}, "message": {"policy": "relay"},
            "firewall": [{"kind": "perplexity", "threshold": 6.0}],
        },
        "nodes": [
            {"id": "a"},
            {"id": "b", "message": {"policy": "attack", "threat": "model-only", "benign": "generate"}, "firewall": []},
            {"id": "c", "firewall": [{"kind": "charset"}]},
            {"id": "d"},
        ],
        "topology": {"kind": "ring"},
        "bus": {"round_tokens": ROUND_TOKENS, "max_message_tokens": 8},
        "aggregator": {"kind": "mean", "exclude": ["d"]},
        "evaluation": {"context_tokens": 64},
    }
    data.update(changes)
    return data


def differences(a: Any, b: Any, path: str = "") -> set[str]:
    """The dotted paths where two dumped scenarios differ (a list of another length differs as a whole)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return set().union(*(differences(a.get(k), b.get(k), f"{path}.{k}".lstrip(".")) for k in {*a, *b}))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return set().union(set(), *(differences(x, y, f"{path}.{i}") for i, (x, y) in enumerate(zip(a, b))))
    return set() if a == b else {path}


def changed_prefixes(base: Scenario, variant: Scenario) -> set[str]:
    """The differing paths, cut to the field a variant may change (message, firewall, exclude)."""
    cut = set()
    for path in differences(base.model_dump(mode="json"), variant.model_dump(mode="json")):
        parts = path.split(".")
        cut.add(".".join(parts[:3]) if parts[0] == "nodes" else path)
    return cut


# ---------------------------------------------------------------------------- the variants


def test_each_variant_is_the_scenario_with_exactly_the_stated_changes():
    base = parse_scenario(scenario_data(), "hostile-test.yaml")
    variants = {v.name: v.scenario for v in hostile_variants(base, source="hostile-test.yaml")}
    assert list(variants) == [kind.name for kind in VARIANT_KINDS]
    firewalls = {"nodes.0.firewall", "nodes.2.firewall", "nodes.3.firewall"}  # b has none to remove
    expected = {
        "attack": set(),
        "attack-nofw": firewalls,
        "silent": {"nodes.1.message"},
        "silent-nofw": {"nodes.1.message"} | firewalls,
        "benign": {"nodes.1.message"},
        "benign-nofw": {"nodes.1.message"} | firewalls,
        "attack-unpooled-nofw": firewalls | {"aggregator.exclude"},
        "silent-unpooled-nofw": {"nodes.1.message"} | firewalls | {"aggregator.exclude"},
    }
    for name, scenario in variants.items():
        assert changed_prefixes(base, scenario) == expected[name], name
        message = scenario.node("b").message
        assert message == {"attack": base.node("b").message, "silent": SilentMessage(), "benign": GenerateMessage()}[name.split("-")[0]]
        assert all(not node.firewall for node in scenario.nodes) == name.endswith("nofw")
        assert scenario.aggregator.exclude == (["d", "b"] if "unpooled" in name else ["d"])


def test_the_variants_of_a_template_scenario_change_only_the_hostile_node():
    data = scenario_data(
        nodes={"count": 3, "id_prefix": "n", "overrides": {"n2": {"message": {"policy": "attack", "benign": "silent"}}}},
        aggregator={"kind": "mean"},
    )
    base = parse_scenario(data, "t.yaml")
    silent = next(v.scenario for v in hostile_variants(base, source="t.yaml") if v.name == "silent")
    assert changed_prefixes(base, silent) == {"nodes.2.message"}
    assert [n.message.policy for n in silent.nodes] == ["relay", "relay", "silent"]


def test_without_a_firewall_the_firewall_on_variants_are_skipped():
    data = scenario_data()
    del data["node_defaults"]["firewall"]
    data["nodes"][2].pop("firewall")
    names = [v.name for v in hostile_variants(parse_scenario(data, "t.yaml"), source="t.yaml")]
    assert names == ["attack-nofw", "silent-nofw", "benign-nofw", "attack-unpooled-nofw", "silent-unpooled-nofw"]


def test_a_readout_of_an_honest_node_skips_the_unpooled_variants_and_says_so():
    base = parse_scenario(scenario_data(aggregator={"kind": "readout", "node": "a"}), "t.yaml")
    names = [v.name for v in hostile_variants(base, source="t.yaml")]
    assert names == ["attack", "attack-nofw", "silent", "silent-nofw", "benign", "benign-nofw"]
    assert READOUT_NOTE in hostile_report(base, "t.yaml", []).note


def test_the_thresholds_fitted_once_are_written_into_every_firewall_on_variant_and_nothing_else():
    data = scenario_data()
    data["node_defaults"]["firewall"] = [{"kind": "perplexity", "false_drop_rate": 0.1}]  # to be fitted
    base = parse_scenario(data, "t.yaml")
    variants = hostile_variants(base, source="t.yaml")
    fitted = {
        node.id: tuple(f.model_copy(update={"threshold": 4.0 + i}) if f.kind == "perplexity" else f for f in node.firewall)
        for i, node in enumerate(base.nodes) if node.firewall
    }
    pinned = pin_thresholds(variants, fitted, source="t.yaml")
    assert [v.name for v in pinned] == [v.name for v in variants]
    for before, after in zip(variants, pinned):
        if before.kind.firewall:
            assert {n.id: n.firewall for n in after.scenario.nodes if n.firewall} == fitted, after.name
            assert changed_prefixes(before.scenario, after.scenario) == {"nodes.0.firewall", "nodes.3.firewall"}
        else:
            assert after.scenario == before.scenario, after.name
    firewalls = {v.name: [n.firewall for n in v.scenario.nodes] for v in pinned if v.kind.firewall}
    assert len({repr(f) for f in firewalls.values()}) == 1  # attack, silent, benign: the same filters


def test_each_variant_is_validated_again_and_an_invalid_one_is_named():
    data = scenario_data(aggregator={"kind": "readout", "node": "b"})  # the hostile node cannot leave a readout
    with pytest.raises(ScenarioError, match=r"hostile-test\.yaml \(variant attack-unpooled-nofw\).*aggregator\.exclude"):
        hostile_variants(parse_scenario(data, "hostile-test.yaml"), source="hostile-test.yaml")


def test_a_scenario_without_an_attacker_is_an_error_naming_the_file(tmp_path, capsys):
    data = scenario_data()
    data["nodes"][1]["message"] = {"policy": "relay"}
    path = tmp_path / "friendly.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["hostile", str(path), "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().err.replace("\n", "")
    assert f"{path}: no node has message.policy: attack" in out
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- the numbers


def round_event(eval_round: int, nll: float, screened: list[ScreenRecord] | None = None, n_tokens: int = ROUND_TOKENS) -> RoundEvent:
    return RoundEvent(
        run_id="r", round_index=2 + eval_round, phase="eval", eval_round=eval_round, start_token=1000 + ROUND_TOKENS * eval_round,
        n_tokens=n_tokens, nodes=[], messages=[], screened=screened or [], nll_collective=nll, nll_silent=3.5,
        nll_reference=3.0, wall_seconds=0.1, elapsed_seconds=0.1,
    )


def variant_run(per_round: list[float], silent_nll: float = 3.5, tokens: list[int] | None = None) -> VariantRun:
    rounds = [round_event(r, nll, n_tokens=(tokens or [ROUND_TOKENS] * len(per_round))[r]) for r, nll in enumerate(per_round)]
    return VariantRun(collective_rounds(rounds), tuple(e.start_token for e in rounds), silent_nll, ScreenCounts())


BASE = [3.0 + 0.7 * math.sin(3.0 * r) for r in range(EVAL_ROUNDS)]  # rounds that differ: wide CIs of each NLL alone
SHIFTS = {  # per variant: a constant per-round shift of the collective NLL
    "attack": 0.10, "attack-nofw": 0.30, "silent": 0.0, "silent-nofw": 0.0, "benign": -0.15, "benign-nofw": -0.20,
    "attack-unpooled-nofw": 0.30, "silent-unpooled-nofw": 0.05,
}
EXPECTED = {  # by hand from SHIFTS: minuend's shift - subtrahend's
    "adversarial_damage": 0.30 - -0.20, "adversarial_damage_firewalled": 0.10 - -0.15, "damage_vs_silent": 0.30,
    "damage_vs_silent_firewalled": 0.10, "damage_vs_silent_unpooled": 0.30 - 0.05, "defence_cost": -0.15 - -0.20,
}


def shifted_runs() -> dict[str, VariantRun]:
    return {name: variant_run([x + shift for x in BASE], 3.6 if "unpooled" in name else 3.5) for name, shift in SHIFTS.items()}


def test_a_constant_per_round_shift_gives_a_zero_width_ci_at_that_shift():
    result = seed_result(1, shifted_runs(), {n: n for n in SHIFTS})
    for name, shift in EXPECTED.items():
        number = result.numbers[name]
        assert number.value == pytest.approx(shift, abs=1e-9)
        assert (number.low, number.high) == pytest.approx((shift, shift), abs=1e-9), name  # paired: the rounds' spread cancels
        assert number.n == EVAL_ROUNDS
    attack = next(v for v in result.variants if v.name == "attack").collective_nll
    assert attack.high - attack.low > 0.1  # one variant's NLL alone varies with the rounds
    assert attack.value == pytest.approx(sum(BASE) / EVAL_ROUNDS + 0.10)


UNEQUAL = [8, 2, 8, 16, 3, 8, 12, 5]  # tokens per round: a token-weighted mean differs from the rounds' mean


def test_each_number_is_the_token_weighted_difference_of_the_two_runs_with_the_paired_interval_of_that_pair():
    noise = [0.4 * math.cos(5.0 * r) for r in range(EVAL_ROUNDS)]  # the attack hurts some rounds far more
    runs = {name: variant_run([x + shift for x in BASE], 3.6 if "unpooled" in name else 3.5, UNEQUAL) for name, shift in SHIFTS.items()}
    runs["attack-nofw"] = variant_run([x + 0.3 + e for x, e in zip(BASE, noise)], tokens=UNEQUAL)
    result = seed_result(1, runs, {n: n for n in runs})
    weighted = sum(t * (0.3 + e) for t, e in zip(UNEQUAL, noise)) / sum(UNEQUAL)
    assert abs(weighted - (0.3 + sum(noise) / EVAL_ROUNDS)) > 0.03  # the weighting matters here (0.041)
    for name, baseline in (("adversarial_damage", -0.20), ("damage_vs_silent", 0.0)):
        number = result.numbers[name]
        assert number.value == pytest.approx(weighted - baseline, abs=1e-9), name
        # the interval is the project's paired interval of exactly this pair, in this order
        minuend, subtrahend = next((n.minuend, n.subtrahend) for n in NUMBERS if n.name == name)
        expected = difference(runs[minuend].collective, runs[subtrahend].collective)
        assert (number.low, number.high) == pytest.approx((expected.low, expected.high), abs=1e-9), name
        assert number.high - number.low > 0.05  # the per-round noise leaves a real interval
    attack = next(v for v in result.variants if v.name == "attack-nofw").collective_nll
    assert attack.value == pytest.approx(sum(t * (x + 0.3 + e) for t, x, e in zip(UNEQUAL, BASE, noise)) / sum(UNEQUAL))


def test_a_round_without_a_collective_prediction_is_left_out_of_both_sides():
    runs = shifted_runs()
    runs["attack-nofw"] = variant_run([math.nan, *[x + 0.3 for x in BASE[1:]]])
    damage = seed_result(1, runs, {n: n for n in runs}).numbers["damage_vs_silent"]
    assert damage.value == pytest.approx(0.3, abs=1e-9) and damage.n == EVAL_ROUNDS - 1


def test_the_silent_ensemble_must_not_depend_on_the_bus():
    runs = shifted_runs()
    assert silent_ensemble_spread(runs) == 0.0  # the unpooled variants pool other nodes: another silent ensemble
    runs["benign"] = variant_run(BASE, silent_nll=3.51)
    with pytest.raises(RunError, match=r"silent ensemble differs between variants .*benign"):
        seed_result(1, runs, {n: n for n in runs})


def test_the_firewalls_drops_are_counted_by_sender():
    def screen(sender: str, action: str) -> ScreenRecord:
        return ScreenRecord(sender=sender, receiver="a", round_sent=0, action=action)  # type: ignore[arg-type]

    rounds = [round_event(0, 3.0, [screen("b", "drop"), screen("b", "pass"), screen("c", "drop")]),
              round_event(1, 3.0, [screen("b", "drop"), screen("c", "rewrite"), screen("d", "pass")])]
    assert screen_counts(rounds, ["b"]) == ScreenCounts(
        hostile_screened=3, hostile_dropped=2, benign_screened=3, benign_dropped=1, rewritten=1
    )


def test_hostile_json_round_trips_with_the_mean_over_seeds():
    base = parse_scenario(scenario_data(), "hostile-test.yaml")
    seeds = [seed_result(s, shifted_runs(), {n: f"seed-{s}/{n}" for n in SHIFTS}) for s in (1, 2)]
    runs = shifted_runs()
    runs["attack-nofw"] = variant_run([x + 0.5 for x in BASE])
    seeds.append(seed_result(3, runs, {n: n for n in runs}))
    report = hostile_report(base, "hostile-test.yaml", seeds)
    assert report.schema_version == 2 and report.hostile_nodes == ["b"] and report.firewall
    spread = mean_ci([0.5, 0.5, 0.7])  # adversarial damage: attack-nofw (0.3, 0.3, 0.5) - benign-nofw (-0.2)
    damage = report.numbers_over_seeds["adversarial_damage"]
    assert (damage.value, damage.low, damage.high, damage.n) == pytest.approx((spread.mean, spread.low, spread.high, 3))
    assert report.nll_over_seeds["attack-nofw"].value == pytest.approx(sum(BASE) / EVAL_ROUNDS + (0.3 + 0.3 + 0.5) / 3)
    assert all(s.interval_method == METHOD for s in report.seeds)  # the project's paired interval, by name
    text = report.model_dump_json()
    assert type(report).model_validate_json(text) == report
    single = hostile_report(base, "hostile-test.yaml", seeds[:1])
    assert not single.numbers_over_seeds and type(single).model_validate_json(single.model_dump_json()) == single


def test_an_interval_that_does_not_exist_stays_nan_in_hostile_json():
    one_round = {name: variant_run(BASE[:1], 3.6 if "unpooled" in name else 3.5) for name in SHIFTS}
    report = hostile_report(
        parse_scenario(scenario_data(), "t.yaml"), "t.yaml", [seed_result(1, one_round, {n: n for n in SHIFTS})]
    )
    back = HostileReport.model_validate_json(report.model_dump_json())
    damage = back.seeds[0].numbers["damage_vs_silent"]
    assert damage.value == 0.0 and math.isnan(damage.low) and math.isnan(damage.high)


def test_a_schema_1_hostile_json_is_refused_by_name(tmp_path):
    report = hostile_report(parse_scenario(scenario_data(), "t.yaml"), "t.yaml", [seed_result(1, shifted_runs(), {n: n for n in SHIFTS})])
    path = tmp_path / "hostile.json"
    path.write_text(report.model_dump_json(), encoding="utf-8")
    assert read_hostile(path) == report
    old = report.model_dump(mode="json")
    old["schema_version"] = 1
    path.write_text(json.dumps(old), encoding="utf-8")
    with pytest.raises(HostileRecordError, match=rf"{re.escape(str(path))}: hostile.json schema 1; this version reads schema 2"):
        read_hostile(path)


# ---------------------------------------------------------------------------- the command


def _per_round(scenario: Scenario) -> tuple[list[float], float]:
    """A stand-in run's per-round collective NLL and its silent ensemble, from what the variant changed."""
    message = scenario.node("b").message
    firewall = any(node.firewall for node in scenario.nodes)
    unpooled = "b" in scenario.aggregator.exclude
    if isinstance(message, AttackMessage):
        shift = 0.25 if unpooled else 0.10 if firewall else 0.30
    elif isinstance(message, GenerateMessage):
        shift = -0.15 if firewall else -0.20
    else:
        shift = 0.0
    return [x + shift + (0.05 if unpooled else 0.0) for x in BASE], 3.6 if unpooled else 3.5


class FakeRuns:
    """`prepare` and `run_prepared` as a run folder with known numbers: the command's own
    logic (variants, folders, reading, comparison, writing) runs as it does for real."""

    def __init__(self, fail: str | None = None, error: BaseException | None = None) -> None:
        self.ran: list[str] = []
        self.fail, self.error = fail, error

    def prepare(self, scenario: Scenario, pool: Any, *, base_dir: Path) -> Any:
        firewalls = {node.id: node.firewall for node in scenario.nodes if node.firewall}  # the test's thresholds are given
        return type("P", (), {"scenario": scenario, "control_ids": {}, "firewalls": firewalls, "firewall_fits": {}})()

    def run_prepared(self, prepared: Any, folder: Path, **kwargs: Any) -> None:
        scenario = prepared.scenario
        self.ran.append(folder.name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scenario.yaml").write_text(scenario.resolved_yaml(), encoding="utf-8")
        (folder / "INCOMPLETE").write_text("in progress\n")
        if folder.name == self.fail:
            raise self.error or RuntimeError("boom")
        per_round, silent = _per_round(scenario)
        firewall = any(node.firewall for node in scenario.nodes)
        screened = [ScreenRecord(sender="b", receiver="a", round_sent=0, action="drop")] if firewall else []
        events = [round_event(r, nll, screened) for r, nll in enumerate(per_round)]
        lines = [e.model_dump_json() for e in events] + [RunEnd(run_id="r", status="complete", rounds_done=8).model_dump_json()]
        (folder / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        report = make_report(scenario.seed, sum(per_round) / len(per_round))
        rows = [row.model_copy(update={"nll": silent}) if row.row == "ensemble_silent" else row for row in report.rows]
        (folder / "report.json").write_text(report.model_copy(update={"rows": rows}).model_dump_json(), encoding="utf-8")
        (folder / "INCOMPLETE").unlink()


@pytest.fixture
def fake_runs(monkeypatch):
    def install(**kwargs: Any) -> FakeRuns:
        fake = FakeRuns(**kwargs)
        monkeypatch.setattr("collective.run.runner.prepare", fake.prepare)
        monkeypatch.setattr("collective.run.runner.run_prepared", fake.run_prepared)
        return fake

    return install


def _write(tmp_path: Path, **changes: Any) -> Path:
    path = tmp_path / "hostile-test.yaml"
    path.write_text(yaml.safe_dump(scenario_data(**changes), sort_keys=False), encoding="utf-8")
    return path


def test_the_command_runs_every_variant_and_writes_the_comparison(tmp_path, fake_runs, capsys):
    fake = fake_runs()
    out = tmp_path / "out"
    assert main(["hostile", str(_write(tmp_path)), "--out", str(out), "--set", "bus.max_message_tokens=6"]) == 0
    assert fake.ran == [kind.name for kind in VARIANT_KINDS]
    report = read_hostile(out / "hostile.json")
    assert [s.seed for s in report.seeds] == [1]
    numbers = report.seeds[0].numbers
    for name, value in EXPECTED.items():
        assert (numbers[name].value, numbers[name].low, numbers[name].high) == pytest.approx((value,) * 3, abs=1e-9)
    screens = {v.name: v.screens for v in report.seeds[0].variants}
    assert screens["attack"].hostile_dropped == EVAL_ROUNDS and screens["attack-nofw"].hostile_dropped == 0
    assert {v.run_dir for v in report.seeds[0].variants} == set(fake.ran)
    assert yaml.safe_load((out / "attack" / "scenario.yaml").read_text())["bus"]["max_message_tokens"] == 6
    printed = capsys.readouterr().out
    assert "damage vs silent, attacker unpooled" in printed and "+0.250 [+0.250, +0.250]" in printed
    assert "adversarial damage, no firewalls" in printed and "+0.500 [+0.500, +0.500]" in printed
    assert printed.count("variant ") >= len(VARIANT_KINDS)  # a progress line per variant
    markdown = (out / "hostile.md").read_text()
    assert "| adversarial damage, firewalls on (attack - benign) | +0.250 [+0.250, +0.250] |" in markdown
    assert "| damage vs silent, firewalls on (attack - silent) | +0.100 [+0.100, +0.100] |" in markdown
    assert "| defence cost (benign - benign-nofw) | +0.050 [+0.050, +0.050] |" in markdown
    assert "headline: adversarial damage = NLL(attack) - NLL(benign)" in markdown
    assert f"CIs: paired over {EVAL_ROUNDS} eval rounds: {METHOD}" in markdown and "bootstrap" not in markdown


def test_seeds_repeat_the_comparison_and_give_the_mean_with_a_t_interval(tmp_path, fake_runs):
    fake = fake_runs()
    out = tmp_path / "out"
    assert main(["hostile", str(_write(tmp_path)), "--out", str(out), "--seeds", "4,5"]) == 0
    assert len(fake.ran) == 2 * len(VARIANT_KINDS) and (out / "seed-5" / "silent-unpooled-nofw" / "report.json").exists()
    report = read_hostile(out / "hostile.json")
    assert [s.seed for s in report.seeds] == [4, 5]
    assert report.numbers_over_seeds["damage_vs_silent_firewalled"].value == pytest.approx(0.10)
    assert report.seeds[1].variants[0].run_dir == "seed-5/attack"


def test_a_failing_variant_is_named_with_its_error_and_nothing_is_written(tmp_path, fake_runs, capsys):
    fake_runs(fail="silent-nofw", error=RuntimeError("out of memory in the bus"))
    out = tmp_path / "out"
    assert main(["hostile", str(_write(tmp_path)), "--out", str(out)]) == 2
    printed = capsys.readouterr().err.replace("\n", "")
    assert "variant silent-nofw" in printed and "out of memory in the bus" in printed
    assert not (out / "hostile.json").exists() and not (out / "hostile.md").exists()


def test_ctrl_c_stops_cleanly_and_a_rerun_reuses_the_finished_variants(tmp_path, fake_runs):
    out, scenario = tmp_path / "out", _write(tmp_path)
    fake_runs(fail="benign", error=KeyboardInterrupt())
    assert main(["hostile", str(scenario), "--out", str(out)]) == 130
    assert not (out / "hostile.json").exists() and (out / "benign" / "INCOMPLETE").exists()
    again = fake_runs()
    assert main(["hostile", str(scenario), "--out", str(out)]) == 0
    assert again.ran == ["benign", "benign-nofw", "attack-unpooled-nofw", "silent-unpooled-nofw"]
    assert main(["hostile", str(scenario), "--out", str(out), "--set", "seed=9"]) == 2  # another scenario: refused


@pytest.mark.parametrize("crash_on", ["hostile.md", "hostile.json"])
def test_hostile_json_and_md_are_written_whole_or_not_at_all(tmp_path, fake_runs, monkeypatch, crash_on):
    import os

    fake_runs()
    out = tmp_path / "out"
    real_replace = os.replace

    def crash_on_rename(src: Any, dst: Any) -> None:  # a kill just before the file would be complete
        if Path(dst).name == crash_on:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr("collective.run.rundir.os.replace", crash_on_rename)
    assert main(["hostile", str(_write(tmp_path)), "--out", str(out)]) == 130
    assert not (out / crash_on).exists() and not (out / "hostile.json").exists()


def test_the_per_round_nll_in_the_records_adds_up_to_the_runs_token_weighted_mean():
    per_round = [1.0, 5.0, 1.0, 1.0, 5.0, 1.0, 1.0, 5.0]  # the short rounds are the hard ones
    rounds = [round_event(r, nll, n_tokens=t) for r, (nll, t) in enumerate(zip(per_round, UNEQUAL))]
    stats = collective_rounds(rounds)
    weighted = sum(x * t for x, t in zip(per_round, UNEQUAL)) / sum(UNEQUAL)
    assert weighted == pytest.approx(102 / 62) and sum(per_round) / len(per_round) == 2.5  # weighting matters
    assert float(stats.nll_sum.sum() / stats.n_tokens.sum()) == pytest.approx(weighted)
    assert stats.n_tokens.tolist() == UNEQUAL


def test_the_help_says_what_each_number_is(capsys):
    with pytest.raises(SystemExit):
        main(["hostile", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    for number in NUMBERS:
        assert f"{number.title} = NLL({number.minuend}) - NLL({number.subtrahend})" in printed


# ---------------------------------------------------------------------------- end to end, tiny model


@pytest.mark.usefixtures("one_torch_thread")
def test_collective_hostile_on_a_tiny_ring_with_an_attacker_and_a_fitted_firewall(tmp_path, tiny_model_dir, monkeypatch):
    import collective.lm.models as models_module
    from collective.records import parse_event
    from collective.run.rundir import is_complete
    from tests.test_rundir import write_tiny_scenario

    path = write_tiny_scenario(
        tmp_path, tiny_model_dir, name="tiny-hostile", corpus={"source": "builtin:pydoc", "train_tokens": 400, "eval_tokens": 64},
        bus={"round_tokens": 8, "max_message_tokens": 12},  # relays longer than a round: each sender's view shows in them
        node_defaults={
            "model": "tiny", "message": {"policy": "relay"},
            "firewall": [{"kind": "perplexity", "fit_messages": 8, "false_drop_rate": 0.25}],
        },
        nodes=[
            {"id": "a", "view": {"kind": "window", "tokens": 16}},
            {"id": "b", "view": {"kind": "lagged", "tokens": 8, "lag": 8}},
            {"id": "c", "view": {"kind": "window", "tokens": 8}},
            {"id": "m", "view": {"kind": "window", "tokens": 16}, "firewall": [],
             "message": {"policy": "attack", "threat": "model-only", "steps": 1, "search_width": 4, "topk": 8}},
        ],
    )
    loads = []
    real_load = models_module.load_model
    monkeypatch.setattr(models_module, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "out"
    assert main(["hostile", str(path), "--out", str(out), "--threads", "1"]) == 0
    assert len(loads) == 1  # one model, loaded once for all eight runs
    assert all(is_complete(out / kind.name) for kind in VARIANT_KINDS)
    reports = {k.name: Report.model_validate_json((out / k.name / "report.json").read_text()) for k in VARIANT_KINDS}
    assert len({(r.n_eval_tokens, r.n_eval_rounds) for r in reports.values()}) == 1  # the same eval tokens
    nll = {name: report.row("collective").nll for name, report in reports.items()}
    result = read_hostile(out / "hostile.json").seeds[0]
    for number in NUMBERS:
        assert result.numbers[number.name].value == pytest.approx(nll[number.minuend] - nll[number.subtrahend], abs=1e-5)
    # fitted once, on the scenario as written: every firewall-on variant reads with the same thresholds (fitted
    # per variant, the silent one would leave m's in-link to a and c out of the fit and get others)
    thresholds = {
        name: {node: [f.threshold for f in found.filters] for node, found in reports[name].firewalls.items()}
        for name in ("attack", "silent", "benign")
    }
    assert thresholds["attack"] == thresholds["silent"] == thresholds["benign"] and set(thresholds["attack"]) == {"a", "b", "c"}
    assert {(f.node, f.threshold) for f in result.firewall_fits} == {(n, t[0]) for n, t in thresholds["attack"].items()}
    assert all(f.fit is not None and f.fit.held_out_messages is not None for f in result.firewall_fits)
    screens = {v.name: v.screens for v in result.variants}
    assert screens["attack"].hostile_screened > 0 and screens["attack-nofw"] == ScreenCounts()
    events = [parse_event(line) for line in (out / "attack-nofw" / "events.jsonl").read_text().splitlines()]
    searches = [n.message_search for e in events if isinstance(e, RoundEvent) for n in e.nodes if n.node_id == "m"]
    assert searches and all(s is not None and s.objective == "untargeted" for s in searches)  # the attack ran


def test_a_variant_folder_is_read_as_a_sweep_cell_is_and_a_missing_or_cut_file_is_named(tmp_path):
    folder = tmp_path / "variant"
    folder.mkdir()
    (folder / "events.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(BrokenCell, match=r"variant: report.json is missing"):
        read_variant(folder, ["m"])
    (folder / "report.json").write_text(make_report(0, 1.0).model_dump_json(), encoding="utf-8")
    (folder / "events.jsonl").write_text('{"kind": "round", "run_id"', encoding="utf-8")  # cut short
    with pytest.raises(BrokenCell, match=r"variant: events.jsonl is not whole"):
        read_variant(folder, ["m"])
