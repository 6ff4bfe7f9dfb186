"""The language-game experiment (issue 11): communication gain against bandwidth, per policy.

For every shape (scenarios/language-game/*.yaml), text source and replicate, one
`collective sweep` over the message policy and the link token budget, run into
`--out/<shape>-<source>-r<replicate>`; speaker-controlled cells (a generated message whose
control prompt is searched with `objective: speak`) run as a second sweep beside it.
A replicate changes both the seed and the stretch of text (corpus.offset_tokens = replicate
x --offset-step), so that a deterministic policy (relay) also gets three independent
measurements. Finished cells are skipped (the sweeps resume), so rerunning completes a
stopped experiment.

`--eval-rounds N` runs every cell at N eval rounds (corpus.eval_tokens = N x the shape's
round_tokens; the shapes ship 8), for intervals that hold their level.

Then `summarize` reads every cell's report and prints, per shape, source, policy and budget:
the mean communication gain over replicates, the pooled 95% CI (normal approximation:
each replicate's standard error taken as its CI's width / (2 z), z the normal 97.5%
quantile; the replicates are independent runs), the t interval over the replicates' gains
and how many replicates' own CIs exclude 0; for each policy the smallest budget at which
the pooled CI lies above 0; and whether searched or speaker-controlled messages reach the
relay's gain at half the relay's bytes. Then the paired comparisons the verdicts rest on
(`collective.evaluate.paired`): two cells of one replicate share their eval tokens and
seed, so their collective NLLs are compared round by round (relay - shuffle: more than
priming; search - relay: searched messages worse; speak - generate: the speaker's prompt;
each policy at its largest budget - at its smallest), each replicate with its own interval
and over the replicates with a t interval (`collective.evaluate.tdist`, replicates - 1
degrees of freedom). It writes results.md, results.json and gain_vs_bandwidth.png in --out.

    python bench/language_game.py run --out sweeps/lg --threads 2 --eval-rounds 16
    python bench/language_game.py summarize --out sweeps/lg
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collective.evaluate.compare import mean_ci  # noqa: E402
from collective.evaluate.paired import PairedComparison, PairingError, compare_cells, read_cell_run  # noqa: E402
from collective.evaluate.sweep import Cell, cell_folder  # noqa: E402
from collective.evaluate.tdist import t_critical  # noqa: E402

SHAPES = {"ring": ROOT / "scenarios/language-game/ring-delayed.yaml", "star": ROOT / "scenarios/language-game/star-masked.yaml"}
WIKITEXT = ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"


def _sources(wikitext: Path) -> dict[str, list[str]]:
    return {
        "wikitext2": ["--set", "corpus.source=wikitext2", "--set", f"corpus.path={wikitext}"],
        "pydoc": ["--set", "corpus.source=builtin:pydoc"],
    }


def run(args: argparse.Namespace) -> None:
    budgets = args.budgets
    for shape in args.shapes:
        for source, source_sets in _sources(Path(args.wikitext)).items():
            if source not in args.sources:
                continue
            for replicate in range(args.replicates):
                base = [
                    sys.executable, "-m", "collective", "sweep", str(SHAPES[shape]), *source_sets,
                    "--set", f"corpus.offset_tokens={replicate * args.offset_step}",
                    "--set", f"bus.max_message_tokens={budgets}", "--seeds", str(replicate), "--threads", str(args.threads),
                ]
                if args.eval_rounds is not None:
                    base += ["--set", f"corpus.eval_tokens={args.eval_rounds * _round_tokens(SHAPES[shape])}"]
                folder = Path(args.out) / f"{shape}-{source}-r{replicate}"
                policies = ",".join(p for p in args.policies.split(",") if p != "speak")
                if policies:
                    _call([*base, "--set", f"node_defaults.message.policy={policies}", "--out", str(folder / "policies")])
                if "speak" in args.policies.split(","):
                    speak = [
                        "--set", "node_defaults.message.policy=generate", "--set", "node_defaults.controller.kind=gcg",
                        "--set", "node_defaults.controller.objective=speak",
                        *(item for key, value in args.speak_settings for item in ("--set", f"node_defaults.controller.{key}={value}")),
                    ]
                    _call([*base, *speak, "--out", str(folder / "speak")])


def _round_tokens(scenario: Path) -> int:
    import yaml

    return int(yaml.safe_load(scenario.read_text(encoding="utf-8"))["bus"]["round_tokens"])


def _call(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


# ---------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Point:
    shape: str
    source: str
    replicate: int
    policy: str
    budget: int
    gain: float
    low: float
    high: float
    collective: float
    bytes_per_link_round: float
    folder: Path  # the cell's run folder


def _policy(overrides: dict[str, Any]) -> str:
    """The cell's policy label: a written message's shuffled control and a replay are labels
    of their own, never more replicates of `generate` (a sweep of shuffle=false,true put both
    under one label)."""
    if overrides.get("node_defaults.controller.objective") == "speak":
        return "speak"
    policy = str(overrides.get("node_defaults.message.policy", "?"))
    if policy == "replay":
        return "replay-shuffle" if str(overrides.get("node_defaults.message.shuffle", True)).lower() != "false" else "replay"
    if str(overrides.get("node_defaults.message.shuffle", False)).lower() == "true":
        return f"{policy}-shuffle"
    return policy


def read_points(out: Path) -> list[Point]:
    points = []
    for summary in sorted(out.glob("*-r*/*/summary.json")):
        shape, source, replicate = summary.parent.parent.name.rsplit("-", 2)
        for cell in json.loads(summary.read_text(encoding="utf-8"))["cells"]:
            overrides = cell["overrides"]
            gain = cell["communication_gain"]
            points.append(
                Point(
                    shape, source, int(replicate[1:]), _policy(overrides), int(overrides["bus.max_message_tokens"]),
                    gain["value"], gain["ci"][0], gain["ci"][1], cell["collective_gain"]["value"], cell["bytes_per_link_round"],
                    cell_folder(summary.parent, Cell(tuple(overrides.items()), cell["seed"], None)),  # type: ignore[arg-type]
                )
            )
    return points


@dataclass(frozen=True)
class Pooled:
    n: int
    gain: float
    low: float
    high: float
    excluding: int  # replicates whose own CI lies above 0
    collective: float
    bytes_per_link_round: float
    t_low: float  # the t interval over the replicates' gains (their spread, n - 1 degrees of freedom)
    t_high: float


def pool(points: list[Point]) -> Pooled:
    """The mean gain over replicates with two intervals: `low..high` combines the replicates'
    own CIs (normal approximation; the uncertainty within each stretch of text only),
    `t_low..t_high` is the t interval of the replicates' gains (their spread from one stretch
    of text and seed to another; NaN for one replicate)."""
    n = len(points)
    z = t_critical(math.inf)  # the normal's 97.5% quantile
    gain = sum(p.gain for p in points) / n
    se = math.sqrt(sum(((p.high - p.low) / (2 * z)) ** 2 for p in points)) / n
    spread = mean_ci([p.gain for p in points])
    return Pooled(
        n, gain, gain - z * se, gain + z * se, sum(p.low > 0 for p in points),
        sum(p.collective for p in points) / n, sum(p.bytes_per_link_round for p in points) / n,
        spread.low, spread.high,
    )


# ---------------------------------------------------------------------------- paired contrasts

CONTRASTS = (  # (A, B, what A - B < 0 would say), each at every budget both ran
    ("relay", "shuffle", "relay better than its priming control"),
    ("search", "relay", "searched better than the relay"),
    ("speak", "generate", "speaker-controlled better than plain generated"),
    ("generate", "relay", "generated better than the relay"),
)


@dataclass(frozen=True)
class Contrast:
    shape: str
    source: str
    label_a: str
    label_b: str
    meaning: str
    comparison: PairedComparison


def contrast_pairs(points: list[Point]) -> dict[tuple[str, str, str, str], list[tuple[Point, Point]]]:
    """Per (shape, source, A label, B label): the replicates' (A cell, B cell), matched by
    replicate. A label is 'policy@budget'."""
    cells = {(p.shape, p.source, p.policy, p.budget, p.replicate): p for p in points}
    out: dict[tuple[str, str, str, str], list[tuple[Point, Point]]] = defaultdict(list)
    budgets = sorted({p.budget for p in points})
    for (shape, source, policy, budget, replicate), point in sorted(cells.items()):
        for a, b, _ in CONTRASTS:
            if policy == a and (other := cells.get((shape, source, b, budget, replicate))):
                out[(shape, source, f"{a}@{budget}", f"{b}@{budget}")].append((point, other))
        ran = [x for x in budgets if (shape, source, policy, x, replicate) in cells]
        if len(ran) > 1 and budget == ran[-1]:  # this policy at its largest budget - at its smallest
            out[(shape, source, f"{policy}@{budget}", f"{policy}@{ran[0]}")].append(
                (point, cells[(shape, source, policy, ran[0], replicate)])
            )
    return out


def contrasts(points: list[Point]) -> list[Contrast]:
    """Every paired contrast the points allow; a pair that does not share its eval tokens
    is an error that names both cells."""
    meanings = {(a, b): meaning for a, b, meaning in CONTRASTS}
    found = []
    for (shape, source, label_a, label_b), pairs in sorted(contrast_pairs(points).items()):
        runs = [(read_cell_run(a.folder), read_cell_run(b.folder)) for a, b in pairs]
        policy_a, policy_b = label_a.split("@")[0], label_b.split("@")[0]
        meaning = meanings.get((policy_a, policy_b), f"{policy_a} better with more bytes")
        found.append(Contrast(shape, source, label_a, label_b, meaning, compare_cells(runs, label_a=label_a, label_b=label_b)))
    return found


def contrast_line(contrast: Contrast) -> str:
    """One line: the mean of A - B over replicates with its t interval, each replicate's
    difference with its own interval, and what the t interval establishes."""
    spread = contrast.comparison.over_seeds
    if not math.isfinite(spread.low):
        verdict = "not established (one replicate)"
    elif spread.high < 0:
        verdict = f"established: {contrast.meaning}"
    elif spread.low > 0:
        verdict = f"established: the opposite ({contrast.label_b} better)"
    else:
        verdict = "not established (the t interval covers 0)"
    per = ", ".join(
        f"{p.difference.value:+.3f} [{p.difference.low:+.3f}, {p.difference.high:+.3f}]" for p in contrast.comparison.pairs
    )
    return (
        f"| {contrast.shape} | {contrast.source} | {contrast.label_a} - {contrast.label_b} | {spread.mean:+.3f} | "
        f"{spread.low:+.3f} .. {spread.high:+.3f} | {spread.n} | {per} | {verdict} |"
    )


CONTRAST_HEAD = [
    "| shape | source | A - B (collective NLL) | mean over replicates | 95% t interval | replicates | per replicate (own 95% CI) | verdict |",
    "|---|---|---|---:|---|---:|---|---|",
]


def summarize(args: argparse.Namespace) -> None:
    out = Path(args.out)
    groups: dict[tuple[str, str, str, int], list[Point]] = defaultdict(list)
    budgets = {int(b) for b in args.budgets.split(",")} if args.budgets else None
    for point in read_points(out):
        if budgets is None or point.budget in budgets:
            groups[(point.shape, point.source, point.policy, point.budget)].append(point)
    pooled = {key: pool(points) for key, points in sorted(groups.items())}
    lines = [
        "| shape | source | policy | tokens | bytes/link/round | communication gain | 95% CI within the stretches | 95% t interval over replicates | replicates with CI > 0 | collective gain |",
        "|---|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for (shape, source, policy, budget), p in pooled.items():
        lines.append(
            f"| {shape} | {source} | {policy} | {budget} | {p.bytes_per_link_round:.1f} | {p.gain:+.3f} | "
            f"{p.low:+.3f} .. {p.high:+.3f} | {p.t_low:+.3f} .. {p.t_high:+.3f} | {p.excluding}/{p.n} | {p.collective:+.3f} |"
        )
    lines += ["", *verdicts(pooled)]
    try:
        found = contrasts([p for group in groups.values() for p in group])
    except PairingError as exc:
        sys.exit(f"paired contrasts: {exc}")
    if found:
        lines += [
            "", "Paired contrasts: A - B of the collective NLL on the rounds both cells scored (< 0: A predicts better); "
            f"{len(found)} contrasts tested, each at 95%, with no correction for their number.", "", *CONTRAST_HEAD,
            *(contrast_line(c) for c in found),
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps({
            "cells": [{"shape": k[0], "source": k[1], "policy": k[2], "tokens": k[3], **vars(v)} for k, v in pooled.items()],
            "contrasts": [_contrast_json(c) for c in found],
        }, indent=1),
        encoding="utf-8",
    )
    plot(pooled, out / "gain_vs_bandwidth.png")
    print("\n".join(lines))


def _contrast_json(contrast: Contrast) -> dict[str, Any]:
    spread = contrast.comparison.over_seeds
    return {
        "shape": contrast.shape, "source": contrast.source, "a": contrast.label_a, "b": contrast.label_b,
        "mean": spread.mean, "t_low": spread.low, "t_high": spread.high, "replicates": spread.n,
        "per_replicate": [
            {"seed": p.seed, "difference": p.difference.value, "low": p.difference.low, "high": p.difference.high,
             "n_rounds": p.difference.n_rounds, "a": p.folder_a, "b": p.folder_b}
            for p in contrast.comparison.pairs
        ],
    }


def verdicts(pooled: dict[tuple[str, str, str, int], Pooled]) -> list[str]:
    """The smallest budget whose gain is above 0 by the t interval over replicates (and, where
    that fails, by the CI within the stretches), per policy; and half-the-bytes."""
    out = []
    combos = sorted({(k[0], k[1]) for k in pooled})
    for shape, source in combos:
        here = {(k[2], k[3]): v for k, v in pooled.items() if k[:2] == (shape, source)}
        for policy in sorted({k[0] for k in here}):
            budgets = sorted(b for p, b in here if p == policy)
            rows = {b: here[(policy, b)] for b in budgets}
            over = _first([b for b in budgets if rows[b].t_low > 0], rows)
            within = _first([b for b in budgets if rows[b].low > 0], rows)
            out.append(
                f"- {shape}, {source}, {policy}: smallest budget above 0 by the t interval over replicates: {over}; "
                f"by the CI within the stretches: {within}"
            )
        for challenger in ("search", "speak"):
            for budget in sorted(b for p, b in here if p == "relay"):
                relay = here[("relay", budget)]
                half = [
                    (b, v) for (p, b), v in here.items()
                    if p == challenger and v.bytes_per_link_round <= relay.bytes_per_link_round / 2
                ]
                if not half or relay.gain <= 0:
                    continue
                best_budget, best = max(half, key=lambda item: item[1].gain)
                reached = "reaches" if best.gain >= relay.gain else "does not reach"
                out.append(
                    f"- {shape}, {source}: {challenger} at {best_budget} tokens ({best.bytes_per_link_round:.0f} B) {reached} "
                    f"the relay's gain at {budget} tokens ({relay.bytes_per_link_round:.0f} B): {best.gain:+.3f} vs {relay.gain:+.3f}"
                )
    return out


def _first(above: list[int], rows: dict[int, Pooled]) -> str:
    """The smallest of the budgets `above`, with its bytes, or that none of `rows` was."""
    if not above:
        return f"none of the budgets tried ({', '.join(str(b) for b in rows)} tokens)"
    return f"{above[0]} tokens ({rows[above[0]].bytes_per_link_round:.0f} B/link/round)"


def plot(pooled: dict[tuple[str, str, str, int], Pooled], path: Path) -> None:
    from collective.report.plots import _figure, _save

    combos = sorted({(k[0], k[1]) for k in pooled})
    figure = _figure(5.2 * len(combos), 4.2)
    panels = figure.subplots(1, len(combos), squeeze=False)[0]
    for panel, (shape, source) in zip(panels, combos):
        for policy in sorted({k[2] for k in pooled if k[:2] == (shape, source)}):
            points = sorted((v for k, v in pooled.items() if k[:3] == (shape, source, policy)), key=lambda v: v.bytes_per_link_round)
            x = [p.bytes_per_link_round for p in points]
            y = [p.gain for p in points]
            error = [[p.gain - p.t_low for p in points], [p.t_high - p.gain for p in points]]
            panel.errorbar(x, y, yerr=error, fmt="o-", capsize=3, label=policy)
        panel.axhline(0, color="black", lw=0.8)
        panel.set_xscale("symlog", linthresh=1.0)
        panel.set_title(f"{shape}, {source}")
        panel.set_xlabel("bytes delivered per link per round")
        panel.grid(alpha=0.3)
    panels[0].set_ylabel("communication gain, nats/token (mean, 95% t interval over replicates)")
    panels[0].legend(fontsize=8)
    _save(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--out", default="sweeps/lg")
    go.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    go.add_argument("--sources", nargs="+", default=["wikitext2", "pydoc"], choices=["wikitext2", "pydoc"])
    go.add_argument("--replicates", type=int, default=3)
    go.add_argument("--offset-step", type=int, default=4096, help="tokens between replicates' stretches of text")
    go.add_argument("--budgets", default="2,4,8,16", help="bus.max_message_tokens values")
    go.add_argument("--policies", default="relay,generate,search,shuffle,speak")
    go.add_argument("--speak-setting", dest="speak_settings", nargs=2, action="append", default=[],
                    metavar=("KEY", "VALUE"), help="a controller setting for the speak cells, e.g. steps 3")
    go.add_argument("--wikitext", default=str(WIKITEXT))
    go.add_argument("--threads", type=int, default=2)
    go.add_argument("--eval-rounds", type=int, default=None,
                    help="eval rounds per cell (corpus.eval_tokens = this x the shape's round_tokens; the shapes ship 8); "
                    "16 or more for intervals that hold their level")
    summary = sub.add_parser("summarize")
    summary.add_argument("--out", default="sweeps/lg")
    summary.add_argument("--budgets", default=None, help="only these bus.max_message_tokens values (default: every one run)")
    args = parser.parse_args()
    run(args) if args.command == "run" else summarize(args)


if __name__ == "__main__":
    main()
