"""The language game at a real search budget (issue 23): each policy against its matched control.

For one shape (scenarios/language-game/*.yaml), text source and stretch of text (an offset
into the stream; the stretch's index is the seed), it runs `collective sweep`s into
`--out/<shape>-<source>-o<offset>/<policy>-b<budget>`, one cell each:

- `relay`, `shuffle` (the relay's matched priming control) and `generate`;
- `search`: a searched message (the scenario's `search` settings: `objective: receiver`,
  --steps steps of --search-width candidates);
- `speak`: a generated message whose speak prompt is searched (`controller: gcg,
  objective: speak`);
- `replay-generate`, `replay-search`, `replay-speak`: each written or searched cell's own
  messages, replayed round by round and shuffled as a relay is (`policy: replay`), at its
  budget: the matched priming control of a written message (same bytes, another order).

Every policy runs at every link budget of --budgets.

--policies chooses among relay, shuffle, generate, search, speak and replay-<policy>, in the
order they run: put the most informative first. Finished cells are skipped (the sweeps
resume), so rerunning completes a stopped experiment.

`summarize` reads every cell and writes results.md, results.json and curve.png in --out: per
shape, source, policy and budget the mean communication gain over the stretches (its
t interval over stretches, and the stretches' own calibrated intervals combined); then
the paired contrasts the issue's questions need (`collective.evaluate.paired`: two cells of a
stretch share their eval tokens and seed): each policy minus its matched control, searched
minus the relay at equal bytes and at half the bytes, speaker-controlled minus generated,
each stretch with its own interval and over the stretches with a t interval.

    python bench/language_game2.py run --out sweeps/lg23 --shape lagged --source wikitext2 \\
        --offsets 0,4096 --budgets 8 --policies search,replay-search,relay,shuffle --threads 1
    python bench/language_game2.py summarize --out sweeps/lg23
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.language_game import _call  # noqa: E402  (one way to run a sweep command, shared)
from collective.evaluate.compare import mean_ci  # noqa: E402
from collective.evaluate.paired import PairedComparison, compare_cells, read_cell_run  # noqa: E402
from collective.evaluate.sweep import Cell, cell_folder  # noqa: E402

SHAPES = {
    "lagged": ROOT / "scenarios/language-game/lagged-reader.yaml",
    "ring": ROOT / "scenarios/language-game/ring-delayed.yaml",
    "star": ROOT / "scenarios/language-game/star-masked.yaml",
    "mixed": ROOT / "scenarios/language-game/mixed-pair.yaml",
}
WIKITEXT = ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw"
PLAIN = ("relay", "shuffle", "generate")
POLICY = "node_defaults.message.policy"


def source_sets(source: str, wikitext: str) -> list[str]:
    if source == "wikitext2":
        return ["--set", "corpus.source=wikitext2", "--set", f"corpus.path={wikitext}"]
    return ["--set", f"corpus.source=builtin:{source}"]


def sweep_command(args: argparse.Namespace, seed: int, offset: int, budgets: str, sets: list[str], out: Path) -> list[str]:
    """One `collective sweep` over the budgets, on one stretch (its offset; its index is the seed)."""
    return [
        sys.executable, "-m", "collective", "sweep", str(SHAPES[args.shape]), *source_sets(args.source, args.wikitext),
        "--set", f"corpus.offset_tokens={offset}", "--set", f"bus.max_message_tokens={budgets}",
        "--seeds", str(seed), "--threads", str(args.threads), *sets, "--out", str(out),
    ]


def policy_sets(policy: str, args: argparse.Namespace) -> list[str]:
    """The --set options of one policy's sweep (not a replay's)."""
    if policy in PLAIN:
        return ["--set", f"{POLICY}={policy}"]
    if policy == "search":
        return ["--set", f"node_defaults.message.steps={args.steps}", "--set", f"node_defaults.message.search_width={args.search_width}"]
    if policy == "speak":
        return [
            "--set", f"{POLICY}=generate", "--set", "node_defaults.controller.kind=gcg",
            "--set", "node_defaults.controller.objective=speak",
            *(item for key, value in args.speak_settings for item in ("--set", f"node_defaults.controller.{key}={value}")),
        ]
    raise ValueError(f"unknown policy {policy!r}")


def replayed_cell(sweep: Path) -> Path:
    """The one finished cell of a (policy, budget) sweep folder (to replay)."""
    summary = json.loads((sweep / "summary.json").read_text(encoding="utf-8"))
    (cell,) = summary["cells"]
    return cell_folder(sweep, Cell(tuple(cell["overrides"].items()), cell["seed"], None))  # type: ignore[arg-type]


def replay_sets(cell: Path) -> list[str]:
    """The --set options of a replay of `cell`; its path is quoted, since a cell folder's name
    holds commas that `--set` would split into several values."""
    return ["--set", f"{POLICY}=replay", "--set", f"node_defaults.message.run='{cell}'"]


def run(args: argparse.Namespace) -> None:
    """One sweep folder per stretch, policy and budget (`<policy>-b<budget>`, one cell), so
    that a later call with other policies or budgets never rewrites a finished sweep's summary."""
    for seed, offset in enumerate(int(o) for o in args.offsets.split(",")):
        stretch = Path(args.out).resolve() / f"{args.shape}-{args.source}-o{offset}"
        for policy in args.policies.split(","):
            for budget in (int(b) for b in args.budgets.split(",")):
                if policy.startswith("replay-"):
                    cell = replayed_cell(stretch / f"{policy.removeprefix('replay-')}-b{budget}")
                    sets = replay_sets(cell)
                else:
                    sets = policy_sets(policy, args)
                _call(sweep_command(args, seed, offset, str(budget), sets, stretch / f"{policy}-b{budget}"))


# ---------------------------------------------------------------------------- reading the cells


@dataclass(frozen=True)
class Point:
    shape: str
    source: str
    seed: int  # the stretch's index
    policy: str  # relay, shuffle, generate, search, speak, or replay-<policy>
    budget: int
    gain: float  # communication gain, nats per token (per byte in a byte-unit run)
    low: float
    high: float
    bytes_per_link_round: float
    folder: Path


def cell_policy(sweep_name: str) -> str:
    """A cell's policy label, from its sweep folder `<policy>-b<budget>` (a replay's policy is
    `replay-<what it replays>`; a searched cell's overrides do not name its policy)."""
    return sweep_name.rsplit("-b", 1)[0]


def read_points(out: Path) -> list[Point]:
    points = []
    for summary in sorted(out.glob("*-o*/*/summary.json")):
        shape, source, _ = summary.parent.parent.name.rsplit("-", 2)
        for cell in json.loads(summary.read_text(encoding="utf-8"))["cells"]:
            overrides, gain = cell["overrides"], cell["communication_gain"]
            folder = cell_folder(summary.parent, Cell(tuple(overrides.items()), cell["seed"], None))  # type: ignore[arg-type]
            points.append(Point(
                shape, source, cell["seed"], cell_policy(summary.parent.name), int(overrides["bus.max_message_tokens"]),
                gain["value"], gain["ci"][0], gain["ci"][1], cell["bytes_per_link_round"], folder,
            ))
    return points


@dataclass(frozen=True)
class Pooled:
    n: int
    gain: float
    low: float  # the stretches' own intervals combined (normal approximation)
    high: float
    t_low: float  # the t interval over the stretches' gains (NaN for one stretch)
    t_high: float
    bytes_per_link_round: float


def pool(points: list[Point]) -> Pooled:
    """The mean gain over stretches: `low..high` combines the stretches' own intervals as
    sqrt(sum h_i^2) / n (h_i a stretch's half-width; the uncertainty within these stretches),
    `t_low..t_high` is the t interval over their gains (their spread from stretch to stretch)."""
    n = len(points)
    gain = sum(p.gain for p in points) / n
    half = math.sqrt(sum(((p.high - p.low) / 2) ** 2 for p in points)) / n
    spread = mean_ci([p.gain for p in points])
    return Pooled(n, gain, gain - half, gain + half, spread.low, spread.high, sum(p.bytes_per_link_round for p in points) / n)


# ---------------------------------------------------------------------------- paired contrasts


def contrast_specs(policies: set[str], budgets: list[int]) -> list[tuple[str, str, str]]:
    """(A, B, the question) as 'policy@budget' labels, for the cells that exist: each policy
    against its matched control, searched and speaker-controlled against the relay at equal
    bytes and at half the bytes, speak against generate, generate against the relay."""
    pairs = [(p, f"replay-{p}", "Q2: more than its matched priming control") for p in ("generate", "search", "speak")]
    pairs = [("relay", "shuffle", "Q2: more than its matched priming control"), *pairs]
    pairs += [("search", "relay", "Q1: searched against the relay"), ("speak", "generate", "Q3: speaker control against plain generation"),
              ("generate", "relay", "generated against the relay"), ("search", "generate", "searched against generated")]
    specs = []
    for budget in budgets:
        for a, b, question in pairs:
            if {a, b} <= policies:
                specs.append((f"{a}@{budget}", f"{b}@{budget}", question))
        if budget * 2 in budgets:
            for challenger in ("search", "speak", "generate"):
                if {challenger, "relay"} <= policies:
                    specs.append((f"{challenger}@{budget}", f"relay@{budget * 2}", "Q1: at half the relay's bytes"))
    return specs


@dataclass(frozen=True)
class Contrast:
    shape: str
    source: str
    label_a: str
    label_b: str
    question: str
    comparison: PairedComparison


def contrasts(points: list[Point]) -> list[Contrast]:
    """Every contrast of contrast_specs whose two cells ran on the same stretches, paired
    stretch by stretch (a pair that does not share its eval tokens is a PairingError)."""
    cells = {(p.shape, p.source, f"{p.policy}@{p.budget}", p.seed): p for p in points}
    found = []
    for shape, source in sorted({(p.shape, p.source) for p in points}):
        here = [p for p in points if (p.shape, p.source) == (shape, source)]
        specs = contrast_specs({p.policy for p in here}, sorted({p.budget for p in here}))
        for label_a, label_b, question in specs:
            seeds = sorted({p.seed for p in here})
            pairs = [(cells[(shape, source, label_a, s)], cells[(shape, source, label_b, s)]) for s in seeds
                     if (shape, source, label_a, s) in cells and (shape, source, label_b, s) in cells]
            if pairs:
                runs = [(read_cell_run(a.folder), read_cell_run(b.folder)) for a, b in pairs]
                found.append(Contrast(shape, source, label_a, label_b, question, compare_cells(runs, label_a=label_a, label_b=label_b)))
    return found


def within(comparison: PairedComparison) -> tuple[float, float]:
    """The mean difference's interval from the stretches' own intervals, sqrt(sum h_i^2) / n."""
    pairs = comparison.pairs
    half = math.sqrt(sum(((p.difference.high - p.difference.low) / 2) ** 2 for p in pairs)) / len(pairs)
    mean = sum(p.difference.value for p in pairs) / len(pairs)
    return mean - half, mean + half


def verdict(low: float, high: float, t_low: float, t_high: float) -> str:
    """What the intervals establish for A - B (< 0: A predicts better)."""
    if math.isfinite(t_low) and (t_high < 0 or t_low > 0):
        return "A better (t interval over stretches)" if t_high < 0 else "B better (t interval over stretches)"
    if high < 0 or low > 0:
        return "A better within these stretches only" if high < 0 else "B better within these stretches only"
    return "not established"


def contrast_line(contrast: Contrast) -> str:
    spread = contrast.comparison.over_seeds
    low, high = within(contrast.comparison)
    per = ", ".join(f"{p.difference.value:+.3f} [{p.difference.low:+.3f}, {p.difference.high:+.3f}]" for p in contrast.comparison.pairs)
    return (
        f"| {contrast.shape} | {contrast.source} | {contrast.question} | {contrast.label_a} - {contrast.label_b} | {spread.mean:+.3f} | "
        f"{low:+.3f} .. {high:+.3f} | {spread.low:+.3f} .. {spread.high:+.3f} | {per} | {verdict(low, high, spread.low, spread.high)} |"
    )


def summarize(args: argparse.Namespace) -> None:
    out = Path(args.out)
    points = read_points(out)
    groups: dict[tuple[str, str, str, int], list[Point]] = defaultdict(list)
    for point in points:
        groups[(point.shape, point.source, point.policy, point.budget)].append(point)
    pooled = {key: pool(group) for key, group in sorted(groups.items())}
    lines = [
        "| shape | source | policy | tokens | bytes/link/round | communication gain | 95% CI within the stretches | 95% t interval over stretches | stretches |",
        "|---|---|---|---:|---:|---:|---|---|---:|",
        *(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {v.bytes_per_link_round:.1f} | {v.gain:+.3f} | {v.low:+.3f} .. {v.high:+.3f} | "
          f"{v.t_low:+.3f} .. {v.t_high:+.3f} | {v.n} |" for k, v in pooled.items()),
    ]
    found = contrasts(points)
    lines += [
        "", f"Paired contrasts, A - B of the collective NLL on shared eval rounds (< 0: A predicts better); {len(found)} tested, "
        "each at 95%, no correction for their number.", "",
        "| shape | source | question | A - B | mean | 95% CI within the stretches | 95% t interval over stretches | per stretch (own 95% CI) | verdict |",
        "|---|---|---|---|---:|---|---|---|---|",
        *(contrast_line(c) for c in found),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({
        "cells": [{"shape": k[0], "source": k[1], "policy": k[2], "tokens": k[3], **vars(v)} for k, v in pooled.items()],
        "contrasts": [{"shape": c.shape, "source": c.source, "a": c.label_a, "b": c.label_b, "question": c.question,
                       "mean": c.comparison.over_seeds.mean, "within": within(c.comparison),
                       "t": [c.comparison.over_seeds.low, c.comparison.over_seeds.high],
                       "per_stretch": [[p.difference.value, p.difference.low, p.difference.high] for p in c.comparison.pairs]}
                      for c in found],
    }, indent=1), encoding="utf-8")
    plot(pooled, out / "curve.png")
    print("\n".join(lines))


def plot(pooled: dict[tuple[str, str, str, int], Pooled], path: Path) -> None:
    """Communication gain against bytes per link per round, one line per policy (its matched
    control dashed, in the same colour), per shape and source; bars: the intervals within
    the stretches."""
    from collective.report.plots import _figure, _save

    combos = sorted({(k[0], k[1]) for k in pooled})
    figure = _figure(5.6 * len(combos), 4.4)
    panels = figure.subplots(1, len(combos), squeeze=False)[0]
    colours = {"relay": "C0", "generate": "C1", "search": "C2", "speak": "C3"}
    for panel, (shape, source) in zip(panels, combos):
        for policy in sorted({k[2] for k in pooled if k[:2] == (shape, source)}):
            base = "relay" if policy == "shuffle" else policy.removeprefix("replay-")
            rows = sorted((v for k, v in pooled.items() if k[:3] == (shape, source, policy)), key=lambda v: v.bytes_per_link_round)
            error = [[p.gain - p.low for p in rows], [p.high - p.gain for p in rows]]
            style = "o--" if base != policy else "o-"
            panel.errorbar([p.bytes_per_link_round for p in rows], [p.gain for p in rows], yerr=error, fmt=style, capsize=3,
                           color=colours.get(base, "C4"), label=policy, alpha=0.6 if base != policy else 1.0)
        panel.axhline(0, color="black", lw=0.8)
        panel.set_xscale("log")
        panel.set_title(f"{shape}, {source} (bars: 95% CI within the stretches)", fontsize=9)
        panel.set_xlabel("bytes delivered per link per round")
        panel.grid(alpha=0.3)
    panels[0].set_ylabel("communication gain, nats/token")
    panels[0].legend(fontsize=8)
    _save(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--out", default="sweeps/lg23")
    go.add_argument("--shape", default="lagged", choices=list(SHAPES))
    go.add_argument("--source", default="wikitext2", help="wikitext2, or a builtin corpus (pydoc)")
    go.add_argument("--offsets", default="0,4096", help="the stretches' offsets in tokens; the i-th is seed i")
    go.add_argument("--budgets", default="4,8,16,32", help="bus.max_message_tokens values")
    go.add_argument("--policies", default="search,replay-search,relay,shuffle,generate,replay-generate")
    go.add_argument("--steps", type=int, default=10, help="GCG steps of a searched message")
    go.add_argument("--search-width", type=int, default=64)
    go.add_argument("--speak-setting", dest="speak_settings", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    go.add_argument("--wikitext", default=str(WIKITEXT))
    go.add_argument("--threads", type=int, default=1)
    summary = sub.add_parser("summarize")
    summary.add_argument("--out", default="sweeps/lg23")
    args = parser.parse_args()
    run(args) if args.command == "run" else summarize(args)


if __name__ == "__main__":
    main()
