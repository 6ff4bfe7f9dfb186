"""What `collective hostile` compares and what it writes: the variants, the numbers, and
hostile.json (`HostileReport`, versioned).

Kept apart from the computation (`collective.evaluate.hostile`, which needs torch) so that
the command line can say what each number is without loading it, and the views can read a
hostile.json alone.

- variants (`VARIANT_KINDS`): the hostile nodes' message as written (`attack`), switched
  off (`silent`) or replaced by their `benign` policy (their honest message); each with
  every node's firewall and without (`-nofw`); and, without firewalls, attack and silent
  with the hostile nodes added to `aggregator.exclude` (`-unpooled`), so that the damage
  their messages do shows apart from their own predictions in the pool. The firewalls'
  thresholds are fitted once, on the scenario as written, and the same thresholds are
  written into every firewall-on variant (`SeedResult.firewall_fits`).
- numbers (`NUMBERS`), in nats per token: each the difference of two variants' collective
  NLL on the same eval rounds. The headline is adversarial damage, the attack against the
  hostile node's honest message, with and without the firewalls; the attack against its
  silence is a second line (it adds what any message from that node does).

Version 2: the numbers are renamed and the adversarial damage (attack - benign) added;
`firewall_fits` added; each seed's intervals are the project's paired intervals, named by
`interval_method` (version 1's block bootstrap fields are gone). Version 1 (attack damage =
attack - silent) is not read: `read_hostile` refuses it by name.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from collective.records import FilterFit

HOSTILE_SCHEMA_VERSION: Literal[2] = 2
OVER_SEEDS_RULE = "mean over seeds with a 95% Student t interval (n - 1 degrees of freedom)"

MessageChoice = Literal["attack", "silent", "benign"]


@dataclass(frozen=True)
class VariantKind:
    """One variant: the hostile nodes' message, whether firewalls stay, whether the hostile
    nodes' own predictions stay in the pools."""

    name: str
    message: MessageChoice
    firewall: bool
    attacker_pooled: bool


VARIANT_KINDS = (
    VariantKind("attack", "attack", True, True),
    VariantKind("attack-nofw", "attack", False, True),
    VariantKind("silent", "silent", True, True),
    VariantKind("silent-nofw", "silent", False, True),
    VariantKind("benign", "benign", True, True),
    VariantKind("benign-nofw", "benign", False, True),
    VariantKind("attack-unpooled-nofw", "attack", False, False),
    VariantKind("silent-unpooled-nofw", "silent", False, False),
)
KIND_BY_NAME = {kind.name: kind for kind in VARIANT_KINDS}


@dataclass(frozen=True)
class HostileNumber:
    """A number of the comparison: collective NLL(minuend) - collective NLL(subtrahend);
    `headline`: against the hostile node's honest message (benign), else a second line."""

    name: str  # its key in hostile.json
    title: str
    minuend: str
    subtrahend: str
    meaning: str
    headline: bool = False

    @property
    def definition(self) -> str:
        return f"{self.title} = NLL({self.minuend}) - NLL({self.subtrahend}): {self.meaning}"


NUMBERS = (
    HostileNumber(
        "adversarial_damage", "adversarial damage, no firewalls", "attack-nofw", "benign-nofw",
        "headline: what the attack costs the collective over the hostile node's honest message (its benign "
        "policy), so that what any message from it does cancels (positive: the attack hurts)", headline=True,
    ),
    HostileNumber(
        "adversarial_damage_firewalled", "adversarial damage, firewalls on", "attack", "benign",
        "headline: the same with the firewalls on (the same fitted thresholds in both): what the defence does "
        "not stop", headline=True,
    ),
    HostileNumber(
        "damage_vs_silent", "damage vs silent, no firewalls", "attack-nofw", "silent-nofw",
        "second line: the attack against the hostile node saying nothing; adds what its honest message "
        "would do (on a ring relays hurt the mean pool, in a star they help the hub)",
    ),
    HostileNumber(
        "damage_vs_silent_firewalled", "damage vs silent, firewalls on", "attack", "silent",
        "second line: the same with the firewalls on (the same fitted thresholds in both)",
    ),
    HostileNumber(
        "damage_vs_silent_unpooled", "damage vs silent, attacker unpooled", "attack-unpooled-nofw", "silent-unpooled-nofw",
        "second line, no firewalls: with the hostile nodes' own predictions kept out of the pools, the damage "
        "their messages alone do against their silence",
    ),
    HostileNumber(
        "defence_cost", "defence cost", "benign", "benign-nofw",
        "the communication gain lost to the firewalls when nobody attacks, their false drops (positive: the "
        "defence costs; the silent ensemble is checked to be the same in both runs)",
    ),
)
HEADLINE_RULE = (
    "headline: adversarial damage = NLL(attack) - NLL(benign), the hostile node's search against its honest "
    "message; 'vs silent' compares the attack with the node sending nothing (a second line)"
)


class _Record(BaseModel):
    # NaN (a CI from one round, an interval over one seed) must survive a JSON round trip
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class ScreenCounts(_Record):
    """What the receivers' firewalls did in the eval rounds, by sender: hostile or benign."""

    hostile_screened: int = 0
    hostile_dropped: int = 0
    benign_screened: int = 0
    benign_dropped: int = 0
    rewritten: int = 0


class Number(_Record):
    """A value in nats per token with its 95% interval (NaN: none) and the eval rounds (per
    seed) or seeds (over seeds) it rests on."""

    value: float
    low: float
    high: float
    n: int | None = None


class VariantResult(_Record):
    name: str
    run_dir: str = Field(description="the variant's run folder, relative to the hostile folder")
    message: MessageChoice
    firewall: bool
    attacker_pooled: bool
    collective_nll: Number
    silent_ensemble_nll: float
    screens: ScreenCounts


class FirewallFit(_Record):
    """One perplexity filter's threshold as every firewall-on variant used it: fitted once on
    the scenario as written (`fit`; None: given in the scenario)."""

    node: str
    filter_index: int
    threshold: float
    fit: FilterFit | None = None


class SeedResult(_Record):
    seed: int
    n_eval_rounds: int
    interval_method: str = Field(description="how each per-seed interval is computed, in words")
    variants: list[VariantResult]
    numbers: dict[str, Number] = Field(description="NUMBERS' names -> value with its paired 95% CI")
    silent_ensemble_spread: float = Field(
        description="largest difference of the silent ensemble's NLL between variants that pool the same nodes"
    )
    firewall_fits: list[FirewallFit] = Field(
        default_factory=list,
        description="the perplexity thresholds, fitted once on the scenario as written and written into every firewall-on variant",
    )


class HostileReport(_Record):
    """hostile.json: every seed's variants and numbers, and their mean over seeds."""

    schema_version: Literal[2] = HOSTILE_SCHEMA_VERSION
    scenario: str
    scenario_file: str
    hostile_nodes: list[str]
    firewall: bool = Field(description="some node has a firewall (else the firewall-on variants were skipped)")
    note: str = ""
    seeds: list[SeedResult]
    over_seeds_rule: str = OVER_SEEDS_RULE
    numbers_over_seeds: dict[str, Number] = Field(
        default_factory=dict, description="with several seeds: each number's mean and t interval"
    )
    nll_over_seeds: dict[str, Number] = Field(
        default_factory=dict, description="with several seeds: each variant's collective NLL, mean and t interval"
    )


class HostileRecordError(ValueError):
    """A hostile.json this version does not read (another schema version)."""


def read_hostile(path: Path) -> HostileReport:
    """hostile.json; a HostileRecordError naming the file when its schema is not this one's."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != HOSTILE_SCHEMA_VERSION:
        raise HostileRecordError(
            f"{path}: hostile.json schema {version!r}; this version reads schema {HOSTILE_SCHEMA_VERSION} only "
            "(schema 1 measured the damage against silence with a block bootstrap): rerun collective hostile"
        )
    return HostileReport.model_validate_json(text)


def numbers_help() -> str:
    """What each number is, for `collective hostile --help`."""
    lines = [
        textwrap.fill(n.definition, 92, initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False)
        for n in NUMBERS
    ]
    head = "numbers: differences of the variants' collective NLL in nats/token on the same eval rounds, each with a paired 95% CI"
    return textwrap.fill(head, 92) + "\n" + "\n".join(lines) + "\n" + textwrap.fill(HEADLINE_RULE, 92)
