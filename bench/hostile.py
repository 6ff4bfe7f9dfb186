"""The hostile-volunteer experiment (issue 13): what one attacker costs a collective, what the
receivers' firewalls stop, and what they cost when nobody attacks.

For every shape (scenarios/hostile/*.yaml), threat model and replicate, one `collective
hostile` run into `--out/<shape>-<threat>-r<replicate>`: the scenario as written (the
attack, firewalls on), with the attacker silent, with its benign policy, each with and
without the firewalls, and with the attacker's own predictions out of the pool. A
replicate changes both the seed and the stretch of text (corpus.offset_tokens = replicate x
--offset-step), so that every number gets independent measurements. The variants that do
not involve the attack (silent, benign) are the same scenario for every threat model: they
are copied from the first threat model's folder, and `collective hostile` reuses a finished
run of the same variant. Finished replicates are skipped, so rerunning completes a stopped
experiment.

The firewalls' thresholds are fitted once per replicate on the scenario as written (on
distinct train windows, with a held-out drop rate) and are the same in every firewall-on
variant (`collective hostile`), so the shared variants stay the same across threat models.
`--eval-rounds N` sets corpus.eval_tokens to N rounds of the scenario's round_tokens.

`summarize` reads every hostile.json and writes, per shape and threat model, each number's
mean over replicates with a 95% t interval (3 replicates: 2 degrees of freedom), how many
replicates' own paired CIs lie above 0, the firewalls' drops and held-out false-drop rates,
and the attacker's search objective, to --out/results.md and results.json. The headline
numbers come first: adversarial damage = NLL(attack) - NLL(benign) without and with the
firewalls; then the attack against silence (a second line) and the defence cost.

    python bench/hostile.py run --out sweeps/hostile --eval-rounds 16 --threads 1
    python bench/hostile.py summarize --out sweeps/hostile
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collective.evaluate.compare import mean_ci  # noqa: E402
from collective.records import Report  # noqa: E402

SHAPES = {"ring": ROOT / "scenarios/hostile/ring.yaml", "star": ROOT / "scenarios/hostile/star.yaml"}
ATTACKER_INDEX = {"ring": 3, "star": 4}  # the attacker's place in the file's `nodes:` list
THREATS = ("white-box", "model-only")
SHARED_VARIANTS = ("silent", "silent-nofw", "benign", "benign-nofw", "silent-unpooled-nofw")
LOCK = ".worker.lock"  # a replicate's folder is run by one worker at a time
NUMBERS = (  # hostile.json's names (collective.evaluate.hostile_record.NUMBERS), the headline first
    "adversarial_damage", "adversarial_damage_firewalled", "damage_vs_silent", "damage_vs_silent_firewalled",
    "damage_vs_silent_unpooled", "defence_cost",
)
ROUND_TOKENS = 16  # the hostile scenarios' bus.round_tokens (--eval-rounds counts rounds of it)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for shape in args.shapes.split(","):
        for replicate in range(args.first_replicate, args.replicates):
            first: Path | None = None
            for threat in args.threats.split(","):
                folder = out / f"{shape}-{threat}-r{replicate}"
                if (folder / "hostile.json").exists():
                    first = first or folder
                    continue
                if not _claim(folder):
                    print(f"skipping {folder}: another worker runs it ({folder / LOCK})", flush=True)
                    continue
                try:
                    if first is not None:
                        _reuse_shared(first, folder)
                    _call([
                        sys.executable, "-m", "collective", "hostile", str(SHAPES[shape]), "--out", str(folder),
                        "--set", f"seed={replicate}", "--set", f"corpus.offset_tokens={replicate * args.offset_step}",
                        "--set", f"nodes.{ATTACKER_INDEX[shape]}.message.threat={threat}", "--threads", str(args.threads),
                        *(["--set", f"corpus.eval_tokens={args.eval_rounds * ROUND_TOKENS}"] if args.eval_rounds else []),
                    ])
                finally:
                    (folder / LOCK).unlink(missing_ok=True)
                first = first or folder


def _claim(folder: Path) -> bool:
    """Whether this worker may run `folder` (no other worker holds its lock; the lock goes when
    the worker's run ends, failed or not; one left by a worker that was killed must be removed
    by hand)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _reuse_shared(source: Path, folder: Path) -> None:
    """The attack-free variants of `source` (the same scenario under every threat model)."""
    for name in SHARED_VARIANTS:
        if (source / name / "report.json").exists() and not (folder / name).exists():
            shutil.copytree(source / name, folder / name)


def _call(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


# ---------------------------------------------------------------------------- summary


def _search(folder: Path) -> tuple[float, float] | None:
    """The attacker's mean search objective (before -> after) in the attack variant's report."""
    path = folder / "attack" / "report.json"
    if not path.exists():
        return None
    report = Report.model_validate_json(path.read_text())
    summaries = list(report.message_searches.values())
    if not summaries:
        return None
    return statistics.fmean(s.mean_before for s in summaries), statistics.fmean(s.mean_after for s in summaries)


def read_cells(out: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(shape, threat) -> each replicate's hostile.json (seed 0 of it) and attacker search."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*-r*/hostile.json")):
        shape, rest = path.parent.name.split("-", 1)
        threat = rest.rsplit("-r", 1)[0]
        data = json.loads(path.read_text())
        (seed,) = data["seeds"]
        drops = {v["name"]: v["screens"] for v in seed["variants"]}
        held_out = [f["fit"]["held_out_drop_rate"] for f in seed.get("firewall_fits", []) if f.get("fit")]
        cells.setdefault((shape, threat), []).append(
            {"folder": str(path.parent), "numbers": seed["numbers"], "drops": drops, "search": _search(path.parent),
             "held_out": [r for r in held_out if r is not None], "eval_rounds": seed["n_eval_rounds"]}
        )
    return cells


def _row(replicates: list[dict[str, Any]], name: str) -> dict[str, Any]:
    values = [r["numbers"][name]["value"] for r in replicates if name in r["numbers"]]
    if not values:
        return {"n": 0}
    spread = mean_ci(values)
    above = sum(r["numbers"][name]["low"] > 0 for r in replicates if name in r["numbers"])
    below = sum(r["numbers"][name]["high"] < 0 for r in replicates if name in r["numbers"])
    return {"mean": spread.mean, "low": spread.low, "high": spread.high, "n": len(values), "above": above, "below": below, "values": values}


def _drops(replicates: list[dict[str, Any]], variant: str, key: str) -> str:
    pairs = [r["drops"].get(variant) for r in replicates]
    found = [p for p in pairs if p]
    if not found:
        return "-"
    return f"{sum(p[key] for p in found)}/{sum(p[key.replace('dropped', 'screened')] for p in found)}"


def summarize(args: argparse.Namespace) -> None:
    out = Path(args.out)
    cells = read_cells(out)
    lines = [
        "| shape | threat | number | mean over replicates | 95% t interval | replicates > 0 / < 0 (own CI) | per replicate |",
        "| --- | --- | --- | ---: | --- | --- | --- |",
    ]
    summary: dict[str, Any] = {}
    for (shape, threat), replicates in sorted(cells.items()):
        for name in NUMBERS:
            row = _row(replicates, name)
            summary[f"{shape}/{threat}/{name}"] = row
            if not row["n"]:
                continue
            values = ", ".join(f"{v:+.3f}" for v in row["values"])
            lines.append(
                f"| {shape} | {threat} | {name.replace('_', ' ')} | {row['mean']:+.3f} | {row['low']:+.3f} .. {row['high']:+.3f} "
                f"| {row['above']} / {row['below']} of {row['n']} | {values} |"
            )
    lines += ["", "| shape | threat | eval rounds | attacker's messages dropped (attack) | benign messages dropped (benign) "
              "| held-out false drops at fit (mean over receivers, replicates) | search objective before -> after |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for (shape, threat), replicates in sorted(cells.items()):
        searches = [r["search"] for r in replicates if r["search"]]
        search = (f"{statistics.fmean(s[0] for s in searches):.2f} -> {statistics.fmean(s[1] for s in searches):.2f}"
                  if searches else "-")
        rates = [r for rep in replicates for r in rep["held_out"]]
        held = f"{statistics.fmean(rates):.1%}" if rates else "-"
        rounds = ",".join(sorted({str(r["eval_rounds"]) for r in replicates}))
        lines.append(
            f"| {shape} | {threat} | {rounds} | {_drops(replicates, 'attack', 'hostile_dropped')} "
            f"| {_drops(replicates, 'benign', 'benign_dropped')} | {held} | {search} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"cells": {f"{s}/{t}": r for (s, t), r in cells.items()}, "summary": summary}, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    runner = sub.add_parser("run")
    runner.add_argument("--out", default="sweeps/hostile")
    runner.add_argument("--shapes", default="ring,star")
    runner.add_argument("--threats", default=",".join(THREATS))
    runner.add_argument("--replicates", type=int, default=3)
    runner.add_argument("--first-replicate", type=int, default=0, help="start at this replicate (a second worker)")
    runner.add_argument("--offset-step", type=int, default=8192, help="tokens between replicates' texts (above train + eval)")
    runner.add_argument("--eval-rounds", type=int, default=None, help="eval rounds per run (default: the scenario's)")
    runner.add_argument("--threads", type=int, default=1)
    summary = sub.add_parser("summarize")
    summary.add_argument("--out", default="sweeps/hostile")
    args = parser.parse_args()
    run(args) if args.command == "run" else summarize(args)


if __name__ == "__main__":
    main()
