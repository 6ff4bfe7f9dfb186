"""A sweep: one scenario run over a grid of overrides and seeds, and its summary.

`parse_set("bus.max_message_tokens=4,8")` reads one `--set`; `expand_grid` makes one `Cell`
per combination of values and seed, each a scenario re-validated by `parse_scenario` (so a
bad path or value names the path, the closest real key, or what was expected) before any
cell runs. Setting a discriminator (`policy`, `kind`) to another value replaces the mapping
it sits in, so `message.policy=relay` over a generated message drops its `speak_prompt`.
`summarize` reads each finished cell's report and events into one `CellSummary` per cell
and their mean over seeds per combination.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from collective.records import Report, RoundEvent, RunRecord, RunStart, parse_event
from collective.scenario import Scenario, ScenarioError, parse_scenario

_DISCRIMINATORS = ("policy", "kind")
SUMMARY_COLUMNS = (  # after "combination", one column per --set path
    "seed", "communication_gain", "communication_low", "communication_high",
    "collective_gain", "collective_low", "collective_high", "bytes_per_link_round",
)


MAX_FOLDER_NAME = 200  # characters of a cell's folder name


@dataclass(frozen=True)
class Override:
    path: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Cell:
    settings: tuple[tuple[str, Any], ...]  # (path, value) for each --set, in order
    seed: int
    scenario: Scenario

    @property
    def combination(self) -> str:
        return ",".join(f"{path}={value}" for path, value in self.settings) or "base"

    @property
    def folder_name(self) -> str:
        """The cell's folder: its settings and seed, made safe for a file name; a name over
        MAX_FOLDER_NAME characters (file systems refuse 255) is cut and ends with a digest
        of the whole, so that two cells never share a folder."""
        name = re.sub(r"[^A-Za-z0-9._=,-]", "-", f"{self.combination},seed={self.seed}")
        if len(name) <= MAX_FOLDER_NAME:
            return name
        digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).hexdigest()
        return f"{name[: MAX_FOLDER_NAME - len(digest) - 1]}-{digest}"


def parse_set(text: str, *, single: bool = False) -> Override:
    """`PATH=v1,v2` -> Override; each value is read as YAML (4 -> int, relay -> str). With
    `single`, the whole right side is one YAML value (so `exclude=[a, b]` stays one list)."""
    path, sep, values = text.partition("=")
    if not sep or not path.strip() or not values.strip():
        example = "bus.max_message_tokens=8" if single else "bus.max_message_tokens=4,8"
        raise ScenarioError(f"--set {text!r}: expected {'KEY=VALUE' if single else 'PATH=v1,v2'} (e.g. {example})")
    try:
        return Override(path.strip(), tuple(yaml.safe_load(v.strip()) for v in ([values] if single else values.split(","))))
    except yaml.YAMLError as exc:
        raise ScenarioError(f"--set {text!r}: the value is not valid YAML ({exc})") from None


def apply_override(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of the scenario's YAML data with `path` (dotted; a number indexes a list) set."""
    data = copy.deepcopy(data)
    keys = path.split(".")
    parent: Any = data
    for depth, key in enumerate(keys[:-1]):
        child = _get(parent, key, keys[: depth + 1])
        if child is None:
            child = {}
            _put(parent, key, child, keys[: depth + 1])
        parent = child
    last = keys[-1]
    if last in _DISCRIMINATORS and isinstance(parent, dict) and parent.get(last) not in (None, value):
        parent.clear()  # another variant: the old variant's fields would not validate
    _put(parent, last, value, keys)
    return data


def _get(container: Any, key: str, where: list[str]) -> Any:
    if isinstance(container, list):
        return container[_index(container, key, where)]
    if isinstance(container, dict):
        return container.get(key)
    raise ScenarioError(f"--set {'.'.join(where)}: {'.'.join(where[:-1])} is a {type(container).__name__}, not a mapping")


def _put(container: Any, key: str, value: Any, where: list[str]) -> None:
    if isinstance(container, list):
        container[_index(container, key, where)] = value
    elif isinstance(container, dict):
        container[key] = value
    else:
        raise ScenarioError(f"--set {'.'.join(where)}: {'.'.join(where[:-1])} is a {type(container).__name__}, not a mapping")


def _index(items: list[Any], key: str, where: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ScenarioError(f"--set {'.'.join(where)}: expected a list index 0..{len(items) - 1}, got {key!r}")
    return int(key)


def expand_grid(
    data: dict[str, Any], overrides: Sequence[Override], seeds: Sequence[int], *, source: str, base_dir: Path | None = None
) -> list[Cell]:
    """Every combination of the overrides' values, times every seed, each validated."""
    cells = []
    for combo in itertools.product(*(o.values for o in overrides)):
        settings = tuple(zip((o.path for o in overrides), combo))
        changed = data
        for path, value in settings:
            changed = apply_override(changed, path, value)
        where = f"{source} with " + " ".join(f"--set {path}={value}" for path, value in settings)
        for seed in seeds:
            scenario = parse_scenario({**changed, "seed": seed}, where if settings else source, base_dir)
            cells.append(Cell(settings, seed, scenario))
    return cells


# ---------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class CellSummary:
    combination: str
    settings: dict[str, Any]
    seed: int | None  # None: the mean over seeds
    communication_gain: float
    communication_ci: tuple[float, float]
    collective_gain: float
    collective_ci: tuple[float, float]
    bytes_per_link_round: float

    def row(self) -> list[Any]:
        return [
            self.combination, *self.settings.values(), "mean" if self.seed is None else self.seed,
            self.communication_gain, *self.communication_ci, self.collective_gain, *self.collective_ci,
            self.bytes_per_link_round,
        ]


def bytes_per_link_round(records: Sequence[RunRecord]) -> float:
    """UTF-8 bytes that links delivered (drops excluded), per link and round."""
    start = next((r for r in records if isinstance(r, RunStart)), None)
    rounds = [r for r in records if isinstance(r, RoundEvent)]
    links = len(start.edges) * (1 if start.directed else 2) if start else 0
    sent = sum(m.n_bytes for r in rounds for m in r.messages if not m.dropped)
    return sent / (links * len(rounds)) if links and rounds else 0.0


def cell_summary(cell: Cell, report: Report, records: Sequence[RunRecord]) -> CellSummary:
    com, col = report.communication_gain, report.collective_gain
    return CellSummary(
        cell.combination, dict(cell.settings), cell.seed, com.value, (com.ci.low, com.ci.high),
        col.value, (col.ci.low, col.ci.high), bytes_per_link_round(records),
    )


def read_cell(cell: Cell, folder: Path) -> CellSummary:
    """The summary of a finished cell's run folder (its report.json and events.jsonl)."""
    report = Report.model_validate_json((folder / "report.json").read_text(encoding="utf-8"))
    lines = (folder / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return cell_summary(cell, report, [parse_event(line) for line in lines if line.strip()])


def mean_over_seeds(cells: Sequence[CellSummary]) -> list[CellSummary]:
    """One summary per combination: each number the mean of its seeds' (CIs too)."""
    groups: dict[str, list[CellSummary]] = {}
    for cell in cells:
        groups.setdefault(cell.combination, []).append(cell)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return [
        CellSummary(
            name, group[0].settings, None,
            mean([c.communication_gain for c in group]),
            (mean([c.communication_ci[0] for c in group]), mean([c.communication_ci[1] for c in group])),
            mean([c.collective_gain for c in group]),
            (mean([c.collective_ci[0] for c in group]), mean([c.collective_ci[1] for c in group])),
            mean([c.bytes_per_link_round for c in group]),
        )
        for name, group in groups.items()
    ]


def summary_csv(cells: Sequence[CellSummary]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["combination", *(cells[0].settings if cells else {}), *SUMMARY_COLUMNS])
    for cell in [*cells, *mean_over_seeds(cells)]:
        writer.writerow(cell.row())
    return out.getvalue()


def summary_json(cells: Sequence[CellSummary]) -> dict[str, Any]:
    def one(cell: CellSummary) -> dict[str, Any]:
        return {
            "combination": cell.combination, "overrides": cell.settings, "seed": cell.seed,
            "communication_gain": {"value": cell.communication_gain, "ci": list(cell.communication_ci)},
            "collective_gain": {"value": cell.collective_gain, "ci": list(cell.collective_ci)},
            "bytes_per_link_round": cell.bytes_per_link_round,
        }

    return {"schema_version": 1, "cells": [one(c) for c in cells], "means": [one(c) for c in mean_over_seeds(cells)]}
