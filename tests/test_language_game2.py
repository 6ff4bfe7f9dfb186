"""bench/language_game2.py (issue 23): each policy paired with its own matched control, the
half-the-bytes contrasts, replay cells labelled by what they replay; and bench/search_steps.py's
curve of the objective against steps. On hand-made sweep folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.language_game2 import (
    cell_policy,
    contrast_specs,
    contrasts,
    read_points,
    replay_sets,
    verdict,
)
from bench.search_steps import drop_curve, set_dotted
from collective.evaluate.sweep import Cell, parse_set
from tests.test_paired import SCENARIO, write_run

POLICY = "node_defaults.message.policy"


def test_each_policy_is_paired_with_its_own_matched_control_and_the_relay_at_twice_its_bytes():
    specs = contrast_specs({"relay", "shuffle", "generate", "replay-generate", "search", "replay-search"}, [4, 8, 16])
    pairs = {(a, b) for a, b, _ in specs}
    assert {("relay@8", "shuffle@8"), ("generate@8", "replay-generate@8"), ("search@8", "replay-search@8")} <= pairs
    assert ("search@4", "relay@8") in pairs and ("search@8", "relay@16") in pairs  # half the bytes
    assert ("search@16", "relay@32") not in pairs  # relay@32 did not run
    assert ("search@8", "replay-generate@8") not in pairs and ("generate@8", "replay-search@8") not in pairs
    assert not any(b.startswith("replay-speak") for _, b, _ in specs)  # speak did not run


def test_a_cell_is_labelled_by_its_sweep_folder_a_replay_by_what_it_replays():
    assert cell_policy("replay-search-b8") == "replay-search"
    assert cell_policy("replay-generate-b16") == "replay-generate"
    assert cell_policy("search-b32") == "search"
    assert cell_policy("shuffle-b4") == "shuffle"


def test_a_verdict_prefers_the_t_interval_and_says_when_only_the_stretches_support_it():
    nan = float("nan")
    assert verdict(-0.3, -0.1, -0.5, -0.05) == "A better (t interval over stretches)"
    assert verdict(-0.3, -0.1, -0.5, +0.2) == "A better within these stretches only"
    assert verdict(-0.3, -0.1, nan, nan) == "A better within these stretches only"
    assert verdict(+0.1, +0.3, +0.05, +0.4) == "B better (t interval over stretches)"
    assert verdict(-0.1, +0.1, -0.2, +0.2) == "not established"


def _sweep(stretch: Path, name: str, seed: int, cells: dict[tuple[tuple[str, object], ...], list[float]]) -> None:
    rows = []
    for overrides_items, nlls in cells.items():
        overrides = dict(overrides_items)
        folder = stretch / name / Cell(overrides_items, seed, None).folder_name  # type: ignore[arg-type]
        write_run(folder, nlls, [8] * len(nlls), seed=seed, corpus={**SCENARIO["corpus"], "offset_tokens": 4096 * seed})  # type: ignore[dict-item]
        gain = {"value": 0.1, "ci": [0.0, 0.2]}
        rows.append({"combination": ",".join(f"{k}={v}" for k, v in overrides.items()), "overrides": overrides, "seed": seed,
                     "communication_gain": gain, "collective_gain": gain, "bytes_per_link_round": 10.0})
    (stretch / name / "summary.json").write_text(json.dumps({"schema_version": 1, "cells": rows, "means": []}), encoding="utf-8")


def test_a_searched_message_is_paired_with_its_replay_and_the_relay_stretch_by_stretch(tmp_path):
    for seed in (0, 1):
        stretch = tmp_path / f"lagged-wikitext2-o{4096 * seed}"
        offset = ("corpus.offset_tokens", 4096 * seed)
        _sweep(stretch, "relay-b8", seed, {(offset, ("bus.max_message_tokens", 8), (POLICY, "relay")): [3.0, 3.0, 3.0, 3.0]})
        _sweep(stretch, "search-b8", seed, {(offset, ("bus.max_message_tokens", 8)): [2.5, 2.5, 2.5, 2.5 + seed]})
        _sweep(stretch, "replay-search-b8", seed, {
            (offset, ("bus.max_message_tokens", 8), (POLICY, "replay")): [2.75, 2.75, 2.75, 2.75],
        })
    points = read_points(tmp_path)
    assert sorted({p.policy for p in points}) == ["relay", "replay-search", "search"]
    found = {(c.label_a, c.label_b): c for c in contrasts(points)}
    assert set(found) == {("search@8", "replay-search@8"), ("search@8", "relay@8")}
    against_relay = found[("search@8", "relay@8")].comparison
    assert [p.difference.value for p in against_relay.pairs] == pytest.approx([-0.5, -0.25])  # stretch 1: (2.5*3+3.5)/4 - 3
    assert against_relay.over_seeds.mean == pytest.approx(-0.375)
    assert [p.difference.value for p in found[("search@8", "replay-search@8")].comparison.pairs] == pytest.approx([-0.25, 0.0])


def test_the_step_curve_keeps_an_early_stopped_searchs_last_value():
    searches = [{"initial": 3.0, "losses": [2.8, 2.5, 2.5]}, {"initial": 2.0, "losses": [1.9]}]
    curve = drop_curve(searches, 3)
    assert curve == pytest.approx([0.0, (-0.2 - 0.1) / 2, (-0.5 - 0.1) / 2, (-0.5 - 0.1) / 2])


def test_a_dotted_setting_indexes_lists_and_makes_missing_mappings():
    data: dict = {"nodes": [{"id": "a"}, {"id": "b"}]}
    set_dotted(data, "nodes.1.message.policy", "relay")
    set_dotted(data, "bus.max_message_tokens", 8)
    assert data == {"nodes": [{"id": "a"}, {"id": "b", "message": {"policy": "relay"}}], "bus": {"max_message_tokens": 8}}


def test_a_replayed_cells_folder_with_commas_in_its_name_is_one_value_of_the_sweeps_set():
    cell = Path("/s/generate-b8/corpus.source=wikitext2,bus.max_message_tokens=8,seed=0-b90f")
    policy, run = replay_sets(cell)[1::2]
    assert parse_set(policy).values == ("replay",)
    assert parse_set(run).values == (str(cell),)
