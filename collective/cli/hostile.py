"""`collective hostile`: run a scenario with a hostile node as its variants (attack, silent,
benign; firewalls on and off; the attacker in and out of the pools) and compare them on
the same eval tokens: adversarial damage (attack - benign) with and without firewalls, the
attack against silence as a second line, defence cost, each with a paired CI.

Thin: parse, build the variants (`collective.evaluate.hostile`, each re-validated before
anything runs), fit the firewalls' thresholds once per seed on the scenario as written and
write them into every firewall-on variant (`pin_thresholds`), run each as `collective run`
does into DIR/<variant>/ (DIR/seed-S/<variant>/
with --seeds) with one model pool, read the runs back, write hostile.json and hostile.md
(atomically, only when every variant finished) and print the table. A variant folder that
holds a finished run of the same variant is reused, so a stopped comparison resumes.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from rich.console import Console

from collective.cli.common import (
    add_threads_option,
    minutes,
    model_pool,
    output_folder,
    parse_seeds,
    set_threads,
    user_errors,
)
from collective.evaluate.hostile_record import numbers_help

if TYPE_CHECKING:
    from collective.evaluate.hostile import Variant, VariantRun
    from collective.evaluate.hostile_record import FirewallFit, SeedResult
    from collective.lm.models import ModelPool
    from collective.records import ControlSearch
    from collective.scenario import Scenario

log = logging.getLogger(__name__)

DESCRIPTION = """\
Measure what a hostile node (message policy `attack`) costs a collective, and what the
receivers' firewalls cost. The scenario runs as variants on the same eval tokens, each a
normal run in DIR/<variant>/: attack (as written), silent (the hostile nodes' message set
to {policy: silent}), benign (set to {policy: <their `benign`>}), each with the firewalls
and without them (-nofw), and attack-unpooled-nofw / silent-unpooled-nofw (the hostile
nodes added to aggregator.exclude: their messages travel, their predictions stay out of
the pools). Without a firewall in the scenario the firewall-on variants are skipped. The
firewalls' perplexity thresholds are fitted once, on the scenario as written, and the same
thresholds are written into every firewall-on variant. Control prompts (gcg) are searched
once, on the first variant, and used by every variant. The headline is adversarial damage:
the attack against the hostile node's honest (benign) message."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    hostile = sub.add_parser(
        "hostile", help="measure a hostile node: adversarial damage with and without firewalls, and defence cost, with CIs",
        description=DESCRIPTION, epilog=numbers_help() + "\n\nWrites DIR/hostile.json, DIR/hostile.md and one run folder per variant.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hostile.set_defaults(func=cmd_hostile)
    hostile.add_argument("scenario", help="scenario YAML file with a node whose message policy is `attack`")
    hostile.add_argument("--out", help="folder of the variants' runs and the comparison (default runs/<timestamp>-<name>-hostile/)")
    hostile.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="change the scenario before the variants are made: a dotted key (a number indexes a list) and one "
        "YAML value, e.g. bus.max_message_tokens=8 or aggregator.kind=logpool; repeatable",
    )
    hostile.add_argument(
        "--seeds", help="comma-separated seeds: the comparison is repeated for each (scenario seed replaced), and each "
        "number's mean over seeds is given with a t interval (default: the scenario's seed)",
    )
    add_threads_option(hostile)


@dataclass(frozen=True)
class SeedPlan:
    seed: int
    scenario: Scenario  # as written, with --set and the seed
    folder: Path  # the seed's variant folders are under it
    variants: list[Variant]


def cmd_hostile(args: argparse.Namespace, console: Console) -> int:
    from collective.evaluate.hostile import hostile_report
    from collective.report.hostile_view import hostile_markdown, hostile_table
    from collective.run.rundir import default_run_dir, write_atomic
    from collective.scenario import load_scenario

    set_threads(args.threads)
    base = load_scenario(args.scenario)  # the file itself must be valid first
    out = output_folder(args.out, "--out", make=False) if args.out else default_run_dir(f"{base.name}-hostile")
    plans = _plans(args, base.seed, out)
    names = ", ".join(v.name for v in plans[0].variants)
    console.print(f"{len(plans[0].variants)} variant(s) x {len(plans)} seed(s) into {out}: {names}", highlight=False)
    pool = model_pool(args)
    results = [_run_seed(plan, out, pool, args, console) for plan in plans]
    report = hostile_report(plans[0].scenario, args.scenario, results)
    write_atomic(out / "hostile.md", hostile_markdown(report))
    write_atomic(out / "hostile.json", report.model_dump_json(indent=2) + "\n")  # last: it says the comparison is whole
    console.print(hostile_table(report))
    console.print(f"wrote {out}/hostile.json and hostile.md")
    return 0


def _plans(args: argparse.Namespace, default_seed: int, out: Path) -> list[SeedPlan]:
    """Every seed's variants, all validated before anything runs."""
    from collective.evaluate.hostile import hostile_variants
    from collective.evaluate.sweep import apply_settings, expand_grid, parse_set
    from collective.scenario import ScenarioError

    data = yaml.safe_load(Path(args.scenario).read_text(encoding="utf-8"))
    if not isinstance(data, dict):  # pragma: no cover - load_scenario already refused it
        raise ScenarioError(f"{args.scenario}: expected a YAML mapping")
    overrides = [parse_set(text, single=True) for text in args.sets]
    seed_sets = [o for o in overrides if o.path == "seed"]
    overrides = [o for o in overrides if o.path != "seed"]
    if seed_sets and args.seeds is not None:
        raise ScenarioError("--set seed=... and --seeds both give the seed; give the seeds with --seeds alone")
    if len(seed_sets) > 1:
        raise ScenarioError("--set seed=... is given twice; give it once (or the seeds with --seeds)")
    changed = apply_settings(data, [(o.path, o.values[0]) for o in overrides])
    default = seed_sets[0].values[0] if seed_sets else changed.get("seed", default_seed)
    seeds = parse_seeds(args.seeds, default)
    cells = expand_grid(data, overrides, seeds, source=args.scenario, base_dir=Path(args.scenario).parent)
    source = " ".join([args.scenario, *(f"--set {text}" for text in args.sets)])  # what made the scenario
    return [
        SeedPlan(
            cell.seed, cell.scenario, out if args.seeds is None else out / f"seed-{cell.seed}",
            hostile_variants(cell.scenario, source=source),
        )
        for cell in cells
    ]


def _run_seed(plan: SeedPlan, out: Path, pool: ModelPool, args: argparse.Namespace, console: Console) -> SeedResult:
    """Run (or reuse) each variant of one seed, then compare them."""
    from collective.evaluate.hostile import hostile_nodes, seed_result

    first = plan.variants[0].scenario
    hostile = hostile_nodes(first)
    runs: dict[str, VariantRun] = {}
    controls = _Controls()
    started = time.monotonic()
    variants, fits = _fit_once(plan, pool, args)
    for index, variant in enumerate(variants):
        folder = plan.folder / variant.name
        with console.status(f"variant {variant.name} (seed {plan.seed}) ...", spinner="dots"):
            reused = _run_variant(variant, folder, pool, controls, args)
        runs[variant.name] = _read(variant, folder, hostile, args)
        console.print(_progress_line(index, plan, variant, runs[variant.name], reused, time.monotonic() - started), highlight=False)
    run_dirs = {name: str((plan.folder / name).relative_to(out)) for name in runs}
    try:
        return seed_result(plan.seed, runs, run_dirs, fits=fits)
    except Exception as exc:  # the checks name the variants; say which seed and file
        raise _failure(args, f"comparing the variants of seed {plan.seed}", exc) from exc


def _fit_once(plan: SeedPlan, pool: ModelPool, args: argparse.Namespace) -> tuple[list[Variant], list[FirewallFit]]:
    """The seed's variants with the firewalls' thresholds fitted once, on the scenario as
    written (the attack variant's), and written into every firewall-on variant."""
    from collective.evaluate.hostile import firewall_fits, has_firewall, pin_thresholds
    from collective.run.runner import prepare

    if not has_firewall(plan.scenario):
        return plan.variants, []
    try:
        prepared = prepare(plan.scenario, pool, base_dir=Path(args.scenario).parent)
        variants = pin_thresholds(plan.variants, prepared.firewalls, source=args.scenario)
    except Exception as exc:
        raise _failure(args, f"fitting the firewalls (seed {plan.seed})", exc) from exc
    return variants, firewall_fits(prepared.firewalls, prepared.firewall_fits)


class _Controls:
    """The control prompts of a seed: searched on its first variant, used by all."""

    def __init__(self) -> None:
        self.ids: dict[str, list[int]] | None = None
        self.searches: list[ControlSearch] = []


def _run_variant(variant: Variant, folder: Path, pool: ModelPool, controls: _Controls, args: argparse.Namespace) -> bool:
    """One variant as `collective run` runs it; True when a finished run of it was reused."""
    from collective.run.control import load_controls
    from collective.run.rundir import is_complete
    from collective.run.runner import needs_search, prepare, search_and_run

    try:
        if _reusable(variant, folder):
            if controls.ids is None and needs_search(variant.scenario):  # the prompts it found, for the others
                controls.ids = load_controls(folder, variant.scenario)
            return True
        (folder / "report.json").unlink(missing_ok=True)  # an earlier attempt killed after writing it
        prepared = prepare(variant.scenario, pool, base_dir=Path(args.scenario).parent)
        known = None if controls.ids is None else (controls.ids, controls.searches)
        searches = search_and_run(prepared, folder, known)
        if controls.ids is None:
            controls.ids, controls.searches = dict(prepared.control_ids), searches
    except Exception as exc:  # KeyboardInterrupt passes: the folder is marked incomplete
        raise _failure(args, f"variant {variant.name} (seed {variant.scenario.seed}, {folder})", exc) from exc
    if not is_complete(folder):  # pragma: no cover - run_prepared raises or finishes
        raise _failure(args, f"variant {variant.name}", RuntimeError("the run stopped before its last round"))
    return False


def _reusable(variant: Variant, folder: Path) -> bool:
    """A finished run of exactly this variant; a finished run of anything else is refused."""
    from collective.run.rundir import is_complete
    from collective.run.runner import RunError

    if not is_complete(folder):
        return False
    if (folder / "scenario.yaml").read_text(encoding="utf-8") == variant.scenario.resolved_yaml():
        return True
    raise RunError(f"{folder} holds a finished run of another scenario than variant {variant.name}; choose another --out")


def _read(variant: Variant, folder: Path, hostile: list[str], args: argparse.Namespace) -> VariantRun:
    from collective.evaluate.hostile import read_variant

    try:
        return read_variant(folder, hostile)
    except Exception as exc:
        raise _failure(args, f"reading variant {variant.name} ({folder})", exc) from exc


def _failure(args: argparse.Namespace, what: str, exc: Exception) -> Exception:
    """A user-facing error that names the file, the variant and the error."""
    from collective.run.runner import RunError

    log.debug("%s failed", what, exc_info=exc)
    detail = str(exc) if isinstance(exc, user_errors()) else f"{exc!r} (-vv shows the traceback)"
    return RunError(f"{args.scenario}: {what} failed: {detail}")


def _progress_line(index: int, plan: SeedPlan, variant: Variant, run: VariantRun, reused: bool, seconds: float) -> str:
    nll = float(run.collective.nll_sum.sum()) / max(1, int(run.collective.n_tokens.sum()))
    screens = run.screens
    dropped = (
        f", firewalls dropped {screens.hostile_dropped}/{screens.hostile_screened} hostile and "
        f"{screens.benign_dropped}/{screens.benign_screened} benign messages"
        if screens.hostile_screened + screens.benign_screened else ""
    )
    state = "already finished, reused" if reused else f"done ({minutes(seconds)} so far)"
    return (
        f"seed {plan.seed} variant {index + 1}/{len(plan.variants)} {variant.name}: collective {nll:.3f} nats/token"
        f"{dropped}; {state}"
    )
