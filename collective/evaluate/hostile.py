"""`collective hostile`: what a hostile node costs a collective, and what its firewall costs.

One scenario with a hostile node (message policy `attack`) runs as several variants on the
same eval tokens, each a normal run in its own folder, and the variants' collective NLLs
are compared round by round. The variants and the numbers (adversarial damage: attack against
benign, with and without firewalls; the attack against silence as a second line; defence
cost) are defined, and hostile.json's record is, in `collective.evaluate.hostile_record`.

Data flow: `hostile_variants(scenario)` makes each variant with the sweep's
`apply_override` on the resolved scenario (the hostile nodes' `message`, every node's
`firewall`, `aggregator.exclude`; nothing else) and re-validates it; the CLI fits the
firewalls' thresholds once, on the scenario as written, and `pin_thresholds` writes them
into every firewall-on variant (so that each compares the same filters); it runs them
(`collective run`'s path); `read_variant` reads a finished run folder (per-round
collective NLL and tokens from events.jsonl, the silent ensemble from report.json, the
firewalls' screened records); `seed_result` gives every number its paired interval over
the eval rounds (`collective.evaluate.intervals`); `hostile_report` adds the mean over
seeds with a t interval. The rendering is
`collective.report.hostile_view`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from collective.evaluate.compare import mean_ci
from collective.evaluate.hostile_record import (
    KIND_BY_NAME,
    NUMBERS,
    VARIANT_KINDS,
    FirewallFit,
    HostileReport,
    Number,
    ScreenCounts,
    SeedResult,
    VariantKind,
    VariantResult,
)
from collective.evaluate.intervals import paired_intervals
from collective.evaluate.metrics import Estimate, RoundStats
from collective.evaluate.sweep import apply_override, read_finished
from collective.records import FilterFit, RoundEvent, RunRecord
from collective.scenario import (
    AttackMessage,
    FirewallFilter,
    PerplexityFilter,
    Scenario,
    ScenarioError,
    parse_scenario,
)
from collective.scenario_errors import RunError

SILENT_TOLERANCE = 1e-4  # nats/token: how far two variants' silent ensembles may differ (float rounding)
NO_FIREWALL_NOTE = (
    "no firewall in the scenario: the firewall-on variants (attack, silent, benign) were skipped, "
    "so residual damage and defence cost were not measured"
)
READOUT_NOTE = (
    "readout aggregator: the answer is one honest node's prediction, so the hostile nodes' own predictions "
    "never enter it; the unpooled variants would repeat the pooled ones and were skipped"
)


# ---------------------------------------------------------------------------- the variants


@dataclass(frozen=True)
class Variant:
    kind: VariantKind
    scenario: Scenario

    @property
    def name(self) -> str:
        return self.kind.name


def hostile_nodes(scenario: Scenario) -> list[str]:
    """The nodes whose message policy is `attack`."""
    return [node.id for node in scenario.nodes if isinstance(node.message, AttackMessage)]


def has_firewall(scenario: Scenario) -> bool:
    return any(node.firewall for node in scenario.nodes)


def variant_settings(scenario: Scenario, kind: VariantKind) -> list[tuple[str, Any]]:
    """The (path, value) overrides that make `kind` of the resolved scenario."""
    settings: list[tuple[str, Any]] = []
    hostile = hostile_nodes(scenario)
    for index, node in enumerate(scenario.nodes):
        if isinstance(node.message, AttackMessage) and kind.message != "attack":
            policy = "silent" if kind.message == "silent" else node.message.benign
            settings.append((f"nodes.{index}.message", {"policy": policy}))
        if node.firewall and not kind.firewall:
            settings.append((f"nodes.{index}.firewall", []))
    if not kind.attacker_pooled:
        excluded = list(scenario.aggregator.exclude)
        settings.append(("aggregator.exclude", excluded + [n for n in hostile if n not in excluded]))
    return settings


def hostile_variants(scenario: Scenario, *, source: str) -> list[Variant]:
    """Every variant of a scenario with a hostile node, each re-validated (an error names
    `source` and the variant); without a firewall, the firewall-on variants are left out."""
    if not hostile_nodes(scenario):
        raise ScenarioError(
            f"{source}: no node has message.policy: attack; `collective hostile` measures a hostile node: "
            "give one node `message: {policy: attack}` (scenarios/hostile-node.yaml)"
        )
    data = scenario.model_dump(mode="json")
    variants = []
    for kind in VARIANT_KINDS:
        if kind.firewall and not has_firewall(scenario):
            continue
        if not kind.attacker_pooled and _readout_of_an_honest_node(scenario):
            continue
        changed = data
        for path, value in variant_settings(scenario, kind):
            changed = apply_override(changed, path, value)
        # the resolved scenario's paths are already joined to its folder: parsed with no base_dir
        variants.append(Variant(kind, parse_scenario(changed, f"{source} (variant {kind.name})")))
    return variants


def pin_thresholds(variants: Sequence[Variant], firewalls: Mapping[str, tuple[FirewallFilter, ...]], *, source: str) -> list[Variant]:
    """Each variant with every firewall-on node's filters replaced by `firewalls[node]` (its
    filters with the thresholds fitted once, on the scenario as written), re-validated; a
    variant without firewalls is left as it is. Fitted per variant, a silent attacker's
    in-link would leave the fit and the variants would compare different filters."""
    pinned = []
    for variant in variants:
        if not variant.kind.firewall:
            pinned.append(variant)
            continue
        data = variant.scenario.model_dump(mode="json")
        for index, node in enumerate(variant.scenario.nodes):
            if node.firewall:
                data = apply_override(data, f"nodes.{index}.firewall", [f.model_dump(mode="json") for f in firewalls[node.id]])
        pinned.append(Variant(variant.kind, parse_scenario(data, f"{source} (variant {variant.name})")))
    return pinned


def firewall_fits(firewalls: Mapping[str, tuple[FirewallFilter, ...]], fits: Mapping[str, Mapping[int, FilterFit]]) -> list[FirewallFit]:
    """Every perplexity filter's threshold, with how it was fitted (None: given), for hostile.json."""
    return [
        FirewallFit(node=node, filter_index=index, threshold=spec.threshold, fit=fits.get(node, {}).get(index))
        for node, filters in firewalls.items()
        for index, spec in enumerate(filters)
        if isinstance(spec, PerplexityFilter) and spec.threshold is not None
    ]


def _readout_of_an_honest_node(scenario: Scenario) -> bool:
    spec = scenario.aggregator
    return spec.kind == "readout" and spec.node not in hostile_nodes(scenario)


# ---------------------------------------------------------------------------- a variant's run


@dataclass(frozen=True)
class VariantRun:
    """What a finished variant's run folder says. collective: per eval round (R rounds),
    the collective's summed NLL and scored tokens (other fields zero); starts: (R,) the eval
    rounds' first stream token, which pairs the rounds of two variants."""

    collective: RoundStats
    starts: tuple[int, ...]
    silent_nll: float
    screens: ScreenCounts


def eval_rounds(records: Sequence[RunRecord]) -> list[RoundEvent]:
    rounds = [r for r in records if isinstance(r, RoundEvent) and r.phase == "eval"]
    return sorted(rounds, key=lambda r: r.eval_round or 0)


def collective_rounds(rounds: Sequence[RoundEvent]) -> RoundStats:
    """The collective row per eval round from the round records: nll_sum = mean NLL x round
    tokens; a round without a collective prediction (NaN) scores no token."""
    scored = torch.tensor([math.isfinite(r.nll_collective) for r in rounds], dtype=torch.bool)  # (R,)
    tokens = torch.tensor([r.n_tokens for r in rounds], dtype=torch.long)  # (R,)
    nll = torch.tensor([r.nll_collective * r.n_tokens if math.isfinite(r.nll_collective) else 0.0 for r in rounds], dtype=torch.float64)
    zeros = torch.zeros_like(tokens)
    return RoundStats(nll, torch.where(scored, tokens, zeros), zeros, zeros, torch.where(scored, zeros, tokens))


def screen_counts(rounds: Sequence[RoundEvent], hostile: Sequence[str]) -> ScreenCounts:
    counts = {"hostile_screened": 0, "hostile_dropped": 0, "benign_screened": 0, "benign_dropped": 0, "rewritten": 0}
    for record in (s for r in rounds for s in r.screened):
        side = "hostile" if record.sender in hostile else "benign"
        counts[f"{side}_screened"] += 1
        counts[f"{side}_dropped"] += record.action == "drop"
        counts["rewritten"] += record.action == "rewrite"
    return ScreenCounts(**counts)


def read_variant(folder: Path, hostile: Sequence[str]) -> VariantRun:
    """A finished run folder (events.jsonl, report.json) as the comparison needs it; a
    BrokenCell naming the folder and file when one is missing or cut short."""
    report, records = read_finished(folder)
    rounds = eval_rounds(records)
    return VariantRun(
        collective_rounds(rounds), tuple(r.start_token for r in rounds), report.row("ensemble_silent").nll,
        screen_counts(rounds, hostile),
    )


# ---------------------------------------------------------------------------- the numbers


def _number(estimate: Estimate) -> Number:
    return Number(value=estimate.value, low=estimate.low, high=estimate.high, n=estimate.n_rounds)


def silent_ensemble_spread(runs: Mapping[str, VariantRun]) -> float:
    """The largest difference of the silent ensemble's NLL between two variants that pool
    the same nodes (it reads no message, so it must not depend on the bus); a RunError when
    one exceeds SILENT_TOLERANCE, since defence cost reads as lost communication gain only
    if it does not."""
    spread = 0.0
    for pooled in (True, False):
        group = {name: run.silent_nll for name, run in runs.items() if KIND_BY_NAME[name].attacker_pooled == pooled}
        if len(group) < 2:
            continue
        low, high = min(group, key=group.__getitem__), max(group, key=group.__getitem__)
        spread = max(spread, group[high] - group[low])
        if group[high] - group[low] > SILENT_TOLERANCE:
            raise RunError(
                f"the silent ensemble differs between variants {low} ({group[low]:.6f}) and {high} "
                f"({group[high]:.6f} nats/token), beyond {SILENT_TOLERANCE}: the variants did not score the same "
                "isolated members, so their collective NLLs cannot be compared"
            )
    return spread


def _check_paired(runs: Mapping[str, VariantRun]) -> None:
    starts = {run.starts for run in runs.values()}
    if len(starts) != 1:
        raise RunError(f"the variants' eval rounds differ ({', '.join(runs)}): they were not run on the same eval tokens")


def seed_result(
    seed: int, runs: Mapping[str, VariantRun], run_dirs: Mapping[str, str], *, fits: Sequence[FirewallFit] = (),
) -> SeedResult:
    """Every variant's collective NLL and every number of NUMBERS whose two variants ran,
    each with its paired interval over the eval rounds both variants scored."""
    _check_paired(runs)
    spread = silent_ensemble_spread(runs)
    wanted = [(n.minuend, n.subtrahend) for n in NUMBERS if n.minuend in runs and n.subtrahend in runs]
    intervals = paired_intervals({name: run.collective for name, run in runs.items()}, differences=wanted)
    variants = [
        VariantResult(
            name=name, run_dir=run_dirs[name], message=KIND_BY_NAME[name].message, firewall=KIND_BY_NAME[name].firewall,
            attacker_pooled=KIND_BY_NAME[name].attacker_pooled, collective_nll=_number(intervals.nll[name]),
            silent_ensemble_nll=run.silent_nll, screens=run.screens,
        )
        for name, run in runs.items()
    ]
    numbers = {
        n.name: _number(intervals.differences[(n.minuend, n.subtrahend)])
        for n in NUMBERS
        if (n.minuend, n.subtrahend) in intervals.differences
    }
    return SeedResult(
        seed=seed, n_eval_rounds=next(iter(runs.values())).collective.n_rounds, interval_method=intervals.method,
        variants=variants, numbers=numbers, silent_ensemble_spread=spread,
        firewall_fits=list(fits),
    )


def _over_seeds(values: Sequence[float]) -> Number:
    spread = mean_ci(values)
    return Number(value=spread.mean, low=spread.low, high=spread.high, n=spread.n)


def hostile_report(scenario: Scenario, scenario_file: str, seeds: Sequence[SeedResult]) -> HostileReport:
    """The record of a comparison; with several seeds, each number's and each variant's
    collective NLL mean over seeds with a t interval."""
    numbers: dict[str, Number] = {}
    nlls: dict[str, Number] = {}
    if len(seeds) > 1:
        for name in seeds[0].numbers:
            numbers[name] = _over_seeds([s.numbers[name].value for s in seeds])
        for variant in seeds[0].variants:
            nlls[variant.name] = _over_seeds([v.collective_nll.value for s in seeds for v in s.variants if v.name == variant.name])
    firewall = has_firewall(scenario)
    return HostileReport(
        scenario=scenario.name, scenario_file=scenario_file, hostile_nodes=hostile_nodes(scenario), firewall=firewall,
        note=" ".join(n for n, on in ((NO_FIREWALL_NOTE, not firewall), (READOUT_NOTE, _readout_of_an_honest_node(scenario))) if on),
        seeds=list(seeds), numbers_over_seeds=numbers, nll_over_seeds=nlls,
    )


__all__ = [
    "NO_FIREWALL_NOTE",
    "READOUT_NOTE",
    "SILENT_TOLERANCE",
    "Variant",
    "VariantRun",
    "collective_rounds",
    "firewall_fits",
    "has_firewall",
    "hostile_nodes",
    "hostile_report",
    "hostile_variants",
    "pin_thresholds",
    "read_variant",
    "screen_counts",
    "seed_result",
    "silent_ensemble_spread",
    "variant_settings",
]
