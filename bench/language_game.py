"""The language-game experiment (issue 11): communication gain against bandwidth, per policy.

For every shape (scenarios/language-game/*.yaml), text source and replicate, one
`collective sweep` over the message policy and the link token budget, run into
`--out/<shape>-<source>-r<replicate>`; speaker-controlled cells (a generated message whose
control prompt is searched with `objective: speak`) run as a second sweep beside it.
A replicate changes both the seed and the stretch of text (corpus.offset_tokens = replicate
x --offset-step), so that a deterministic policy (relay) also gets three independent
measurements. Finished cells are skipped (the sweeps resume), so rerunning completes a
stopped experiment.

Then `summarize` reads every cell's report and prints, per shape, source, policy and budget:
the mean communication gain over replicates, the pooled 95% CI (normal approximation:
each replicate's standard error taken as its bootstrap CI's width / 3.92; the replicates
are independent runs) and how many replicates' own CIs exclude 0; for each policy the
smallest budget at which the pooled CI lies above 0; and whether searched or speaker-
controlled messages reach the relay's gain at half the relay's bytes. It writes
results.md, results.json and gain_vs_bandwidth.png in --out.

    python bench/language_game.py run --out sweeps/lg --threads 2
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


def _policy(overrides: dict[str, Any]) -> str:
    if overrides.get("node_defaults.controller.objective") == "speak":
        return "speak"
    return str(overrides.get("node_defaults.message.policy", "?"))


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


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student's t, 97.5% quantile, by degrees of freedom


def pool(points: list[Point]) -> Pooled:
    """The mean gain over replicates with two intervals: `low..high` combines the replicates'
    bootstrap CIs (normal approximation; the uncertainty within each stretch of text only),
    `t_low..t_high` is the t interval of the replicates' gains (their spread from one stretch
    of text and seed to another; NaN for one replicate)."""
    n = len(points)
    gain = sum(p.gain for p in points) / n
    se = math.sqrt(sum(((p.high - p.low) / 3.92) ** 2 for p in points)) / n
    if n > 1:
        sd = math.sqrt(sum((p.gain - gain) ** 2 for p in points) / (n - 1))
        half = T_975.get(n - 1, 1.96) * sd / math.sqrt(n)
    else:
        half = math.nan
    return Pooled(
        n, gain, gain - 1.96 * se, gain + 1.96 * se, sum(p.low > 0 for p in points),
        sum(p.collective for p in points) / n, sum(p.bytes_per_link_round for p in points) / n,
        gain - half, gain + half,
    )


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
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps([{"shape": k[0], "source": k[1], "policy": k[2], "tokens": k[3], **vars(v)} for k, v in pooled.items()], indent=1),
        encoding="utf-8",
    )
    plot(pooled, out / "gain_vs_bandwidth.png")
    print("\n".join(lines))


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
    summary = sub.add_parser("summarize")
    summary.add_argument("--out", default="sweeps/lg")
    summary.add_argument("--budgets", default=None, help="only these bus.max_message_tokens values (default: every one run)")
    args = parser.parse_args()
    run(args) if args.command == "run" else summarize(args)


if __name__ == "__main__":
    main()
