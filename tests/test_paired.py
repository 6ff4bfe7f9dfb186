"""Paired comparison of two runs that share their eval tokens and seed
(collective/evaluate/paired.py), on hand-made run folders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from collective.evaluate.paired import (
    PairingError,
    compare_cells,
    read_cell_run,
    seed_difference,
    summary_line,
)
from collective.records import RoundEvent, RunStart

SCENARIO = {
    "name": "hand",
    "seed": 0,
    "models": {"tiny": {"ref": "/models/tiny", "dtype": "float32", "device": "cpu"}},
    "corpus": {"source": "builtin:pydoc", "path": None, "train_tokens": 64, "eval_tokens": 40, "offset_tokens": 0},
    "bus": {"round_tokens": 8, "max_message_tokens": 4},
}


def write_run(
    folder: Path, nlls: list[float], tokens: list[int], *, seed: int = 0, warmup: int = 1, unit: str = "token",
    n_bytes: list[int] | None = None, **changes,
) -> Path:
    """A finished run folder: a resolved scenario, one warm-up round, eval rounds with these
    collective NLLs (mean nats/token of the round; NaN: no collective prediction) and tokens."""
    folder.mkdir(parents=True)
    scenario = {**SCENARIO, "seed": seed, **changes}
    (folder / "scenario.yaml").write_text(yaml.safe_dump(scenario), encoding="utf-8")
    start = RunStart(
        run_id=folder.name, scenario="hand", seed=seed, nodes=[], edges=[], directed=False, warmup_rounds=warmup,
        eval_rounds=len(nlls), round_tokens=8, max_message_tokens=4, max_message_bytes=64, aggregator="mean",
    )
    lines = [start.model_dump_json()]
    first = scenario["corpus"]["offset_tokens"] + scenario["corpus"]["train_tokens"]
    for index in range(warmup + len(nlls)):
        phase = "warmup" if index < warmup else "eval"
        eval_index = index - warmup
        nll = 9.0 if phase == "warmup" else nlls[eval_index]  # a warm-up round never counts
        n_tokens = 8 if phase == "warmup" else tokens[eval_index]
        lines.append(RoundEvent(
            run_id=folder.name, round_index=index, phase=phase, eval_round=None if phase == "warmup" else eval_index,
            start_token=first + 8 * eval_index, n_tokens=n_tokens, nodes=[], messages=[], nll_collective=nll,
            nll_silent=3.0, nll_reference=2.0, wall_seconds=0.1, elapsed_seconds=0.1 * index, unit=unit,  # type: ignore[arg-type]
            n_bytes=None if n_bytes is None or phase == "warmup" else n_bytes[eval_index],
        ).model_dump_json())
    (folder / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "report.json").write_text("{}", encoding="utf-8")
    return folder


def test_the_paired_difference_is_the_token_weighted_difference_on_the_rounds_both_scored(tmp_path):
    # A missed its last round (NaN): that round is left out of the difference, not of B's own NLL
    a = read_cell_run(write_run(tmp_path / "a", [3.0, 2.0, 4.0, math.nan], [8, 8, 16, 8]))
    b = read_cell_run(write_run(tmp_path / "b", [2.5, 2.5, 3.0, 1.0], [8, 8, 16, 8]))
    found = seed_difference(a, b)
    # A: (3*8 + 2*8 + 4*16) / 32 = 104/32; B on the same rounds: (2.5*8 + 2.5*8 + 3*16) / 32 = 88/32
    assert found.difference.value == pytest.approx(16 / 32, abs=1e-12)
    assert found.difference.n_rounds == 3
    assert found.nll_a.value == pytest.approx(104 / 32, abs=1e-12)
    assert found.nll_b.value == pytest.approx(96 / 40, abs=1e-12)  # B on all its 4 rounds
    assert found.seed == 0 and found.folder_a.endswith("a")


def test_over_seeds_the_interval_is_the_t_interval_of_the_pairs_differences(tmp_path):
    pairs = []
    for seed, shift in ((0, 0.0), (1, 0.2), (2, 0.1)):
        a = write_run(tmp_path / f"a{seed}", [3.0, 2.0, 4.0, 3.0], [8, 8, 8, 8], seed=seed)
        b = write_run(tmp_path / f"b{seed}", [2.5 + shift, 2.5 + shift, 3.0 + shift, 3.0 + shift], [8, 8, 8, 8], seed=seed)
        pairs.append((read_cell_run(a), read_cell_run(b)))
    comparison = compare_cells(pairs, label_a="relay", label_b="shuffle")
    # per seed: 12/4 - 11/4 = 0.25, then 0.25 - 0.2 = 0.05 and 0.25 - 0.1 = 0.15
    assert [p.difference.value for p in comparison.pairs] == pytest.approx([0.25, 0.05, 0.15], abs=1e-12)
    spread = comparison.over_seeds
    half = 4.302652729749462 * 0.1 / math.sqrt(3)  # scipy.stats.t.ppf(0.975, 2) * sd / sqrt(n), sd = 0.1
    assert spread.mean == pytest.approx(0.15, abs=1e-12)
    assert (spread.low, spread.high) == pytest.approx((0.15 - half, 0.15 + half), abs=1e-9)
    line = summary_line(comparison)
    assert line.startswith("relay - shuffle: +0.150 nats/token (95% t interval -0.098 .. +0.398 over 3 pairs)")
    assert "seed 1 +0.050 [" in line


@pytest.mark.parametrize(
    ("changes", "seed", "named"),
    [
        ({"corpus": {**SCENARIO["corpus"], "offset_tokens": 4096}}, 0, "corpus.offset_tokens 0 vs 4096"),
        ({"corpus": {**SCENARIO["corpus"], "source": "wikitext2"}}, 0, "corpus.source 'builtin:pydoc' vs 'wikitext2'"),
        ({"corpus": {**SCENARIO["corpus"], "eval_tokens": 48}}, 0, "corpus.eval_tokens 40 vs 48"),
        ({"bus": {"round_tokens": 16, "max_message_tokens": 4}}, 0, "bus.round_tokens 8 vs 16"),
        ({"models": {"tiny": {"ref": "/models/other"}}}, 0, "'/models/tiny' vs '/models/other'"),
        ({}, 1, "seed 0 vs 1"),
    ],
)
def test_runs_that_do_not_share_eval_tokens_or_seed_are_refused_naming_both_cells(tmp_path, changes, seed, named):
    a = read_cell_run(write_run(tmp_path / "relay-cell", [3.0, 2.0, 4.0, 3.0], [8, 8, 8, 8]))
    b = read_cell_run(write_run(tmp_path / "shuffle-cell", [3.0, 2.0, 4.0, 3.0], [8, 8, 8, 8], seed=seed, **changes))
    with pytest.raises(PairingError) as error:
        compare_cells([(a, b)], label_a="relay", label_b="shuffle")
    message = str(error.value)
    assert named in message and "relay-cell" in message and "shuffle-cell" in message


def test_only_the_budget_may_differ_between_two_pairable_cells(tmp_path):
    a = read_cell_run(write_run(tmp_path / "a", [3.0, 2.0], [8, 8]))
    b = read_cell_run(write_run(tmp_path / "b", [2.0, 2.0], [8, 8], bus={"round_tokens": 8, "max_message_tokens": 32}))
    assert seed_difference(a, b).difference.value == pytest.approx(0.5)


def test_a_folder_that_is_not_a_finished_run_is_named(tmp_path):
    folder = write_run(tmp_path / "cut", [3.0], [8])
    (folder / "report.json").unlink()
    with pytest.raises(PairingError, match=r"cut: not a finished run folder \(no report.json\)"):
        read_cell_run(folder)


def test_the_language_game_summary_pairs_relay_with_shuffle_replicate_by_replicate(tmp_path):
    """bench/language_game.py: each replicate's relay and shuffle cells (same seed, same
    stretch of text) give one paired difference; over replicates a t interval."""
    import json

    from bench.language_game import contrasts, read_points
    from collective.evaluate.sweep import Cell

    nlls = {("relay", 0): [3.0, 3.0, 3.0, 3.0], ("shuffle", 0): [3.2, 3.2, 3.2, 3.2],
            ("relay", 1): [2.0, 2.5, 2.0, 2.5], ("shuffle", 1): [2.25, 2.5, 2.25, 2.5]}
    for replicate in (0, 1):
        sweep = tmp_path / f"ring-pydoc-r{replicate}" / "policies"
        cells = []
        for policy in ("relay", "shuffle"):
            overrides = {"corpus.offset_tokens": 4096 * replicate, "bus.max_message_tokens": 8,
                         "node_defaults.message.policy": policy}
            folder = sweep / Cell(tuple(overrides.items()), replicate, None).folder_name  # type: ignore[arg-type]
            corpus = {**SCENARIO["corpus"], "offset_tokens": 4096 * replicate}
            write_run(folder, nlls[(policy, replicate)], [8, 8, 8, 8], seed=replicate, corpus=corpus)
            gain = {"value": 0.1, "ci": [0.0, 0.2]}
            cells.append({"combination": ",".join(f"{k}={v}" for k, v in overrides.items()), "overrides": overrides,
                          "seed": replicate, "communication_gain": gain, "collective_gain": gain, "bytes_per_link_round": 10.0})
        (sweep / "summary.json").write_text(json.dumps({"schema_version": 1, "cells": cells, "means": []}), encoding="utf-8")
    [found] = contrasts(read_points(tmp_path))
    assert (found.shape, found.source, found.label_a, found.label_b) == ("ring", "pydoc", "relay@8", "shuffle@8")
    # replicate 0: 3.0 - 3.2 = -0.2; replicate 1: 2.25 - 2.375 = -0.125
    assert [p.difference.value for p in found.comparison.pairs] == pytest.approx([-0.2, -0.125], abs=1e-12)
    spread = found.comparison.over_seeds
    half = 12.706204736174696 * (0.075 / math.sqrt(2)) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(2)
    assert (spread.mean, spread.low, spread.high) == pytest.approx((-0.1625, -0.1625 - half, -0.1625 + half), abs=1e-9)


def test_the_language_game_summary_labels_a_written_messages_controls_apart_from_generate():
    """A sweep of generate with shuffle=false,true (or a replay) must not count its control
    cells as more replicates of `generate` (it did: one replicate read as two)."""
    from bench.language_game import _policy

    policy, shuffle = "node_defaults.message.policy", "node_defaults.message.shuffle"
    assert _policy({policy: "generate"}) == _policy({policy: "generate", shuffle: False}) == "generate"
    assert _policy({policy: "generate", shuffle: True}) == "generate-shuffle"
    assert _policy({policy: "replay"}) == _policy({policy: "replay", shuffle: True}) == "replay-shuffle"
    assert _policy({policy: "replay", shuffle: False}) == "replay"
    assert _policy({policy: "relay"}) == "relay"


def test_a_run_scored_per_byte_does_not_pair_with_one_scored_per_token(tmp_path):
    a = read_cell_run(write_run(tmp_path / "token-cell", [3.0, 2.0, 4.0, 3.0], [8, 8, 8, 8]))
    b = read_cell_run(write_run(tmp_path / "byte-cell", [1.0, 0.8, 1.2, 1.0], [8, 8, 8, 8], unit="byte"))
    assert (a.unit, b.unit) == ("token", "byte")
    with pytest.raises(PairingError, match="NLL in nats/token vs nats/byte") as error:
        compare_cells([(a, b)], label_a="token", label_b="byte")
    assert "token-cell" in str(error.value) and "byte-cell" in str(error.value)


def test_two_runs_scored_per_byte_pair_and_read_in_nats_per_byte(tmp_path):
    from collective.report.sweep_view import paired_markdown

    a = read_cell_run(write_run(tmp_path / "a", [1.0, 0.8, 1.2, 1.0], [30, 28, 31, 30], unit="byte"))
    b = read_cell_run(write_run(tmp_path / "b", [1.1, 0.9, 1.2, 1.2], [30, 28, 31, 30], unit="byte"))
    comparison = compare_cells([(a, b)], label_a="relay", label_b="silent")
    assert comparison.unit == "byte" and summary_line(comparison).startswith("relay - silent: -0.099 nats/byte (")  # byte-weighted
    text = paired_markdown(comparison)
    assert "collective NLL in nats/byte on the rounds both scored" in text and "nats/token" not in text


def test_a_byte_unit_rounds_weigh_by_the_bytes_their_means_are_over_not_the_stream_tokens(tmp_path):
    # two rounds of 8 stream tokens, 10 and 30 bytes: A is worse by 1 nat/byte on the second only
    a = read_cell_run(write_run(tmp_path / "a", [1.0, 2.0], [8, 8], unit="byte", n_bytes=[10, 30]))
    b = read_cell_run(write_run(tmp_path / "b", [1.0, 1.0], [8, 8], unit="byte", n_bytes=[10, 30]))
    assert seed_difference(a, b).difference.value == pytest.approx(30 / 40)  # by tokens it would be 0.5
    assert int(a.collective.n_tokens.sum()) == 40
