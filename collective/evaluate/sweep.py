"""A sweep: one scenario run over a grid of overrides and seeds, and its summary.

`parse_set("bus.max_message_tokens=4,8")` reads one `--set` (values split at commas outside
brackets and quotes, so `exclude=[a,b],[c]` is two lists); `expand_grid` makes one `Cell`
per combination of values and seed, each a scenario re-validated by `parse_scenario` (so a
bad path or value names the path, the closest real key, or what was expected) before any
cell runs. A cell's settings are applied to one document, discriminators (`policy`, `kind`)
and shorter paths first, whatever their order on the command line: setting a discriminator
to another value replaces the mapping it sits in (`message.policy=relay` over a generated
message drops its `speak_prompt`), and a setting the final document does not hold is an
error. Repeated paths, values and seeds are refused, and `seed` is set by `--seeds` only.
A finished cell folder is reused only when its scenario is the one the cell would run
(`reuse_difference`). `read_cell` reads a finished cell's report and events into one
`CellSummary`, and `mean_over_seeds` their mean per combination. A cell's gains are in nats
per its report's unit (token, or byte for a collective of several tokenizers: `unit`).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from collective.records import Report, RoundEvent, RunRecord, RunStart, Unit, parse_event
from collective.scenario import Scenario, ScenarioError, parse_scenario

_DISCRIMINATORS = ("policy", "kind")
SUMMARY_COLUMNS = (  # after "combination", one column per --set path
    "seed", "communication_gain", "communication_low", "communication_high",
    "collective_gain", "collective_low", "collective_high", "bytes_per_link_round", "unit",
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
        """The cell's folder: its settings and seed, with every character a file name should
        not hold replaced by `-`; a name that needed a replacement ends with a digest of the
        settings as written (so `Msgs?` and `Msgs!` get two folders), and a name over
        MAX_FOLDER_NAME characters (file systems refuse 255) is cut and ends with one."""
        text = f"{self.combination},seed={self.seed}"
        name = _safe_name(text)
        if name == text and len(name) <= MAX_FOLDER_NAME:
            return name
        digest = _digest(text)
        return f"{name[: MAX_FOLDER_NAME - len(digest) - 1]}-{digest}"

    @property
    def legacy_folder_name(self) -> str:
        """The folder name sweeps gave before names were made unique (characters replaced by
        `-`, no digest unless cut): a resumed sweep still finds its finished cells there."""
        name = _safe_name(f"{self.combination},seed={self.seed}")
        if len(name) <= MAX_FOLDER_NAME:
            return name
        digest = _digest(name)
        return f"{name[: MAX_FOLDER_NAME - len(digest) - 1]}-{digest}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,-]", "-", text)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def cell_folder(sweep_dir: Path, cell: Cell) -> Path:
    """Where a cell's run is: its folder, or the folder an older sweep gave it, if only that exists."""
    folder = sweep_dir / cell.folder_name
    legacy = sweep_dir / cell.legacy_folder_name
    return legacy if not folder.exists() and legacy.exists() else folder


def parse_set(text: str, *, single: bool = False) -> Override:
    """`PATH=v1,v2` -> Override; each value is read as YAML (4 -> int, relay -> str, [a,b] ->
    a list). Values are split at commas outside brackets, braces and quotes, so
    `exclude=[a,b],[c]` is two lists. With `single`, the whole right side is one YAML value.
    A repeated value is refused (it would run one cell twice)."""
    path, sep, values = text.partition("=")
    path = path.strip()
    if not sep or not path or not values.strip() or "" in path.split("."):
        example = "bus.max_message_tokens=8" if single else "bus.max_message_tokens=4,8"
        raise ScenarioError(f"--set {text!r}: expected {'KEY=VALUE' if single else 'PATH=v1,v2'} (e.g. {example})")
    parts = [values] if single else split_values(values)
    try:
        parsed = tuple(yaml.safe_load(part.strip()) for part in parts)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"--set {text!r}: the value is not valid YAML ({exc}); a list is written [a,b]") from None
    for index, value in enumerate(parsed):
        if value in parsed[:index]:
            raise ScenarioError(f"--set {text!r}: the value {parts[index].strip()!r} is given twice; give each value once")
    return Override(path, parsed)


def split_values(text: str) -> list[str]:
    """`4,[a,b],{x: 1, y: 2}` -> ['4', '[a,b]', '{x: 1, y: 2}']: commas inside brackets,
    braces or quotes do not split."""
    parts, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return [*parts, text[start:]]


def apply_override(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of the scenario's YAML data with `path` (dotted; a number indexes a list) set."""
    data = copy.deepcopy(data)
    keys = path.split(".")
    _refuse_template_index(data, keys)
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


def _refuse_template_index(data: dict[str, Any], keys: list[str]) -> None:
    """`nodes.0.x` where `nodes` is a template (`count: N`): a ScenarioError that gives the
    `nodes.overrides.<node id>.x` form (a template has no list to index)."""
    template = data.get("nodes")
    if keys[0] != "nodes" or len(keys) < 2 or not keys[1].isdigit() or not isinstance(template, dict):
        return
    node_id = f"{template.get('id_prefix', 'n')}{keys[1]}"
    rest = ".".join(keys[2:]) or "FIELD"
    raise ScenarioError(
        f"--set {'.'.join(keys)}: `nodes` is a template (count: {template.get('count')}), not a list; set one node "
        f"of it as --set nodes.overrides.{node_id}.{rest}=..., or every node as --set node_defaults.{rest}=..."
    )


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


def grid_size(overrides: Sequence[Override], seeds: Sequence[int]) -> int:
    """How many cells `expand_grid` makes: the product of the values' counts, times the seeds."""
    return math.prod(len(o.values) for o in overrides) * len(seeds)


def check_grid(overrides: Sequence[Override], seeds: Sequence[int]) -> None:
    """Refuse a `seed` override (seeds come from --seeds), a path given twice and a repeated seed."""
    paths = [o.path for o in overrides]
    if "seed" in paths:
        raise ScenarioError("--set seed=...: give the seeds with --seeds (e.g. --seeds 1,2); each cell runs once per seed")
    for index, path in enumerate(paths):
        if path in paths[:index]:
            raise ScenarioError(f"--set {path}=... is given twice; give every value in one --set (e.g. {path}=a,b)")
    repeated = sorted({seed for index, seed in enumerate(seeds) if seed in seeds[:index]})
    if repeated:
        raise ScenarioError(f"--seeds: seed {repeated[0]} is given twice; give each seed once")


def expand_grid(
    data: dict[str, Any], overrides: Sequence[Override], seeds: Sequence[int], *, source: str, base_dir: Path | None = None
) -> list[Cell]:
    """Every combination of the overrides' values, times every seed, each validated."""
    check_grid(overrides, seeds)
    cells = []
    for combo in itertools.product(*(o.values for o in overrides)):
        settings = tuple(zip((o.path for o in overrides), combo))
        changed = apply_settings(data, settings)
        where = f"{source} with " + " ".join(f"--set {path}={value}" for path, value in settings)
        for seed in seeds:
            scenario = parse_scenario({**changed, "seed": seed}, where if settings else source, base_dir)
            cells.append(Cell(settings, seed, scenario))
    return cells


def apply_settings(data: dict[str, Any], settings: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of `data` with every (path, value) set: shorter paths first and, at one depth,
    discriminators (`policy`, `kind`) first, so the order on the command line does not
    matter; a setting that the result does not hold (a later one replaced its mapping) is
    a ScenarioError that names it."""
    order = sorted(settings, key=lambda s: (s[0].count("."), s[0].rsplit(".", 1)[-1] not in _DISCRIMINATORS))
    changed = data
    for path, value in order:
        changed = apply_override(changed, path, value)
    for path, value in settings:
        try:
            held = _lookup(changed, path.split("."))
        except (KeyError, IndexError, TypeError, ValueError):
            held = _MISSING
        if held != value:
            raise ScenarioError(
                f"--set {path}={value}: another --set of the same cell replaced the mapping it is in (a `policy` or "
                "`kind` set to another value starts a fresh mapping, as does setting the mapping itself), so the "
                "scenario would not hold it; set the mapping whole (e.g. --set 'PATH={policy: search, steps: 4}')"
            )
    return changed


_MISSING = object()


def _lookup(container: Any, keys: list[str]) -> Any:
    for key in keys:
        container = container[int(key)] if isinstance(container, list) else container[key]
    return container


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
    unit: Unit = "token"  # what the gains are per (the report's unit)

    def row(self) -> list[Any]:
        return [
            self.combination, *self.settings.values(), "mean" if self.seed is None else self.seed,
            self.communication_gain, *self.communication_ci, self.collective_gain, *self.collective_ci,
            self.bytes_per_link_round, self.unit,
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
        col.value, (col.ci.low, col.ci.high), bytes_per_link_round(records), report.unit,
    )


class BrokenCell(Exception):
    """A finished cell folder whose report or events cannot be read; the message says which file and why."""


def read_finished(folder: Path) -> tuple[Report, list[RunRecord]]:
    """A finished run folder's report.json and events.jsonl records; a BrokenCell naming
    the folder and file when one is missing or cut short."""
    try:
        report = Report.model_validate_json((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BrokenCell(f"{folder}: report.json {_why(exc)}") from None
    try:
        lines = (folder / "events.jsonl").read_text(encoding="utf-8").splitlines()
        records = [parse_event(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise BrokenCell(f"{folder}: events.jsonl {_why(exc)}") from None
    return report, records


def read_cell(cell: Cell, folder: Path) -> CellSummary:
    """The summary of a finished cell's run folder (`read_finished`)."""
    return cell_summary(cell, *read_finished(folder))


def _why(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "is missing"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror})"
    return f"is not whole (cut short or edited: {str(exc).splitlines()[0]})"


def reuse_difference(cell: Cell, folder: Path) -> str | None:
    """None when the finished run in `folder` is the run `cell` would make (its scenario.yaml,
    read as this version reads scenarios, equals the cell's scenario, seed included); else
    what differs, in words. Reading it back (not comparing text) keeps a run that a newer
    version would write with new default fields recognised as the same run."""
    path = folder / "scenario.yaml"
    try:
        written = parse_scenario(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except (OSError, yaml.YAMLError, ScenarioError) as exc:
        return f"its scenario.yaml cannot be read as a scenario ({str(exc).splitlines()[0]})"
    differ = _differences(written.model_dump(mode="json"), cell.scenario.model_dump(mode="json"), "")
    if not differ:
        return None
    shown = "; ".join(f"{key}: {old!r} there, {new!r} in this cell" for key, old, new in differ[:3])
    return shown + (f" (and {len(differ) - 3} more)" if len(differ) > 3 else "")


def _differences(old: Any, new: Any, where: str) -> list[tuple[str, Any, Any]]:
    """(dotted path, old, new) of every leaf where two YAML documents differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in dict.fromkeys([*old, *new]) for d in _differences(old.get(key), new.get(key), f"{where}.{key}".lstrip("."))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for index, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{where}.{index}".lstrip("."))]
    return [] if old == new else [(where or "(the whole scenario)", old, new)]


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
            group[0].unit,  # one combination, one scenario: one unit
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
            "unit": cell.unit,  # absent in older summaries: token
        }

    return {"schema_version": 1, "cells": [one(c) for c in cells], "means": [one(c) for c in mean_over_seeds(cells)]}
