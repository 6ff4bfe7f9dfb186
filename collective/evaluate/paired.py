"""Paired comparison of two runs (two sweep cells) that share their eval tokens and seed.

Two cells of a sweep (relay vs shuffle, search vs relay, speak vs generate, one budget vs
another) are scored on the same eval tokens when they share the corpus (source, path,
offset, train and eval parts), the round length, the stream's tokenizer and the seed. Their
collective NLLs are then compared round by round, which is far tighter than setting two
separate intervals side by side.

Data flow: `read_cell_run(folder)` reads a finished run folder (scenario.yaml for what fixes
the eval tokens, events.jsonl for the collective's NLL and tokens per eval round);
`check_pairable(a, b)` refuses, naming both folders and what differs, two runs that do not
share eval tokens or seed; `seed_difference` gives, for one seed, each run's collective NLL
and the paired difference A - B on the rounds both scored, with the project's per-run
interval (`_per_run_interval`, the one place that names it); `compare_cells` does that for
every pair (one per seed or replicate) and adds the t interval over the pairs' differences
(n - 1 degrees of freedom, `tdist.t_critical`). A run scored per byte (several tokenizers: its
round records' `unit`) pairs only with another scored per byte, and its NLLs read in nats/byte.
Rendering: `collective.report.sweep_view`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from collective.evaluate.compare import Spread, mean_ci
from collective.evaluate.hostile import collective_rounds, eval_rounds
from collective.evaluate.intervals import paired_intervals
from collective.evaluate.metrics import Estimate, RoundStats
from collective.evaluate.sweep import Cell, cell_folder
from collective.records import RoundEvent, RunStart, Unit, nll_unit, parse_event
from collective.scenario_errors import RunError

logger = logging.getLogger(__name__)


class PairingError(RunError):
    """Two runs cannot be compared pair by pair; the message names both and what differs."""


@dataclass(frozen=True)
class CellRun:
    """A finished run folder as the paired comparison needs it.

    eval_setting: what fixes the eval tokens (corpus spec, round length, stream tokenizer);
    starts: (R,) each eval round's first stream token; collective: the collective row per
    eval round (summed NLL and scored tokens, or bytes: `unit`)."""

    folder: Path
    seed: int
    eval_setting: dict[str, Any]
    starts: tuple[int, ...]
    collective: RoundStats
    unit: Unit = "token"  # what its NLLs are per: a token, or a byte of the text (several tokenizers)


def eval_setting(scenario: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's eval tokens, from its resolved scenario: the corpus (source, path,
    offset, train and eval parts), the round length and the stream's tokenizer (every model
    shares it; the first model's ref names it)."""
    models = scenario.get("models") or {}
    first: Any = next(iter(models.values()), {})
    return {
        **{f"corpus.{key}": value for key, value in (scenario.get("corpus") or {}).items()},
        "bus.round_tokens": (scenario.get("bus") or {}).get("round_tokens"),
        "tokenizer (first model's ref)": first.get("ref") if isinstance(first, dict) else None,
    }


def read_cell_run(folder: Path) -> CellRun:
    """A finished run folder (scenario.yaml, events.jsonl, report.json); a PairingError
    that names the folder when it is not one."""
    needed = [folder / name for name in ("scenario.yaml", "events.jsonl", "report.json")]
    missing = [path.name for path in needed if not path.exists()]
    if missing:
        raise PairingError(f"{folder}: not a finished run folder (no {', '.join(missing)})")
    scenario = yaml.safe_load(needed[0].read_text(encoding="utf-8"))
    records = [parse_event(line) for line in needed[1].read_text(encoding="utf-8").splitlines() if line.strip()]
    start = next((r for r in records if isinstance(r, RunStart)), None)
    if start is None:
        raise PairingError(f"{folder}: events.jsonl has no run start record")
    rounds = eval_rounds(records)
    unit: Unit = "byte" if any(r.unit == "byte" for r in rounds) else "token"
    return CellRun(
        folder, start.seed, eval_setting(scenario), tuple(r.start_token for r in rounds), collective_rounds(per_position(rounds)), unit
    )


def per_position(rounds: Sequence[RoundEvent]) -> list[RoundEvent]:
    """The rounds with `n_tokens` the positions their mean NLLs are over: a byte-unit round's
    bytes (`n_bytes`), so that the collective's row weights each round by its bytes; a round
    that did not record them keeps its tokens (the weights are then approximate, and logged)."""
    if not any(r.unit == "byte" for r in rounds):
        return list(rounds)
    if any(r.n_bytes is None for r in rounds):
        logger.warning("byte-unit rounds without n_bytes: the paired comparison weights rounds by their stream tokens")
        return list(rounds)
    return [r.model_copy(update={"n_tokens": r.n_bytes}) for r in rounds]


def check_pairable(a: CellRun, b: CellRun) -> None:
    """Refuse two runs that do not share their eval tokens or their seed."""
    differ = [
        f"{key} {a.eval_setting.get(key)!r} vs {b.eval_setting.get(key)!r}"
        for key in dict.fromkeys([*a.eval_setting, *b.eval_setting])
        if a.eval_setting.get(key) != b.eval_setting.get(key)
    ]
    if a.seed != b.seed:
        differ.append(f"seed {a.seed} vs {b.seed}")
    if a.unit != b.unit:
        differ.append(f"NLL in {nll_unit(a.unit)} vs {nll_unit(b.unit)} (a run of several tokenizers is scored per byte)")
    if not differ and a.starts != b.starts:
        differ.append(f"eval rounds starting at {list(a.starts[:4])}... vs {list(b.starts[:4])}...")
    if differ:
        raise PairingError(
            f"cells {a.folder} and {b.folder} cannot be compared pair by pair: they do not share their eval tokens "
            f"and seed ({'; '.join(differ)})"
        )


def _per_run_interval(a: RoundStats, b: RoundStats, *, confidence: float) -> tuple[Estimate, Estimate, Estimate]:
    """The project's per-run interval on two runs' rounds (R,): A's NLL, B's NLL, A - B on
    the rounds both scored. The one call of the interval function: switching it is one line."""
    result = paired_intervals({"a": a, "b": b}, differences=[("a", "b")], confidence=confidence)
    return result.nll["a"], result.nll["b"], result.differences[("a", "b")]


@dataclass(frozen=True)
class SeedDifference:
    """One pair: each run's collective NLL (nats per the runs' unit) and A - B, each with its interval."""

    seed: int
    folder_a: str
    folder_b: str
    nll_a: Estimate
    nll_b: Estimate
    difference: Estimate


@dataclass(frozen=True)
class PairedComparison:
    """A - B per pair (seed or replicate), and over the pairs: the mean difference with its
    t interval (NaN with one pair)."""

    label_a: str
    label_b: str
    pairs: tuple[SeedDifference, ...]
    over_seeds: Spread
    confidence: float = 0.95
    unit: Unit = "token"  # every pair's: check_pairable refuses two runs of different units


def seed_difference(a: CellRun, b: CellRun, *, confidence: float = 0.95) -> SeedDifference:
    check_pairable(a, b)
    nll_a, nll_b, difference = _per_run_interval(a.collective, b.collective, confidence=confidence)
    return SeedDifference(a.seed, str(a.folder), str(b.folder), nll_a, nll_b, difference)


def compare_cells(
    pairs: Sequence[tuple[CellRun, CellRun]], *, label_a: str, label_b: str, confidence: float = 0.95
) -> PairedComparison:
    """A - B for each (A, B) pair, then the t interval over the pairs' differences."""
    if not pairs:
        raise PairingError(f"no pair of runs to compare ({label_a} against {label_b})")
    found = tuple(seed_difference(a, b, confidence=confidence) for a, b in pairs)
    values = [p.difference.value for p in found]
    return PairedComparison(label_a, label_b, found, mean_ci(values, confidence=confidence), confidence, pairs[0][0].unit)


# ---------------------------------------------------------------------------- cells of a sweep folder


def _selector(text: str) -> dict[str, Any]:
    """'path=value,path=value' -> {path: value}, each value read as YAML (8 -> int)."""
    settings = {}
    for part in text.split(","):
        path, sep, value = part.partition("=")
        if not sep or not path.strip():
            raise PairingError(f"cell {text!r}: expected PATH=VALUE[,PATH=VALUE] (e.g. node_defaults.message.policy=relay)")
        settings[path.strip()] = yaml.safe_load(value.strip())
    return settings


def select_cells(summary: dict[str, Any], text: str, where: Path) -> dict[int, str]:
    """The folder name, per seed, of the one combination of a sweep's summary.json whose
    overrides include every PATH=VALUE of `text`; a PairingError when none or several do."""
    wanted = _selector(text)
    cells = [c for c in summary.get("cells", []) if all(c["overrides"].get(k, object()) == v for k, v in wanted.items())]
    combinations = sorted({c["combination"] for c in cells})
    if len(combinations) != 1:
        known = ", ".join(sorted({c["combination"] for c in summary.get("cells", [])}))
        found = "no combination" if not combinations else f"{len(combinations)} combinations ({', '.join(combinations)})"
        raise PairingError(f"{where}: cell {text!r} matches {found}; the sweep's combinations: {known}")
    return {c["seed"]: cell_folder(where, Cell(tuple(c["overrides"].items()), c["seed"], None)).name for c in cells}  # type: ignore[arg-type]


def sweep_pairs(folder: Path, cell_a: str, cell_b: str) -> list[tuple[CellRun, CellRun]]:
    """The runs of two cells of a sweep folder, paired by seed (every seed both ran)."""
    import json

    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    a, b = select_cells(summary, cell_a, folder), select_cells(summary, cell_b, folder)
    seeds = [seed for seed in a if seed in b]
    if not seeds:
        raise PairingError(f"{folder}: cells {cell_a!r} (seeds {sorted(a)}) and {cell_b!r} (seeds {sorted(b)}) share no seed")
    return [(read_cell_run(folder / a[seed]), read_cell_run(folder / b[seed])) for seed in seeds]


def summary_line(comparison: PairedComparison) -> str:
    """'relay - shuffle: -0.120 nats/token (95% t interval -0.200 .. -0.040 over 3 seeds); per seed: ...'."""
    spread = comparison.over_seeds
    level = f"{100 * comparison.confidence:g}%"
    over = (
        f"{level} t interval {spread.low:+.3f} .. {spread.high:+.3f} over {spread.n} pairs"
        if math.isfinite(spread.low) else f"one pair: no interval over pairs ({spread.n} finite)"
    )
    per = ", ".join(
        f"seed {p.seed} {p.difference.value:+.3f} [{p.difference.low:+.3f}, {p.difference.high:+.3f}]" for p in comparison.pairs
    )
    return f"{comparison.label_a} - {comparison.label_b}: {spread.mean:+.3f} {nll_unit(comparison.unit)} ({over}); per pair: {per}"


__all__ = [
    "CellRun",
    "PairedComparison",
    "PairingError",
    "SeedDifference",
    "check_pairable",
    "compare_cells",
    "eval_setting",
    "read_cell_run",
    "seed_difference",
    "select_cells",
    "summary_line",
    "sweep_pairs",
]
