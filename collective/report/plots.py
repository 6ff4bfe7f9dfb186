"""PNG plots of a run, and the node layout that the terminal view and the PNGs share.

At the end of every run `write_run_plots(run_dir, report)` reads the run's `events.jsonl`
and writes three PNGs into the run folder, which `report.md` then embeds:

- `nll_per_round.png`: each member's NLL in the collective and the collective's, silent
  ensemble's and reference's, per round and as running means over the eval rounds;
- `gains.png`: every report row's NLL with its 95% CI (a partial row, scored on fewer
  than all eval rounds, is marked `*` with its round count and drawn hollow), and the two
  headline gains;
- `topology.png`: the graph, each node coloured by its final gain from messages
  (isolated minus in-collective NLL), links drawn as wide as the messages they carried.

`plot_reach(summaries, out_path)` draws `collective reach`'s fraction-reached curves
against the paper's points from plain data. Drawing uses matplotlib's object API on an
Agg canvas (no pyplot, no global backend switch). A plot that fails logs a warning and
is left out; it never fails the run.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx

from collective.records import Gain, Report, RoundEvent, RowReport, RunStart, nll_unit
from collective.report.report_view import row_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

NLL_PLOT = "nll_per_round.png"
GAINS_PLOT = "gains.png"
TOPOLOGY_PLOT = "topology.png"


# ---------------------------------------------------------------------------- layout


@functools.lru_cache(maxsize=16)
def _layout(nodes: tuple[str, ...], edges: tuple[tuple[str, str], ...]) -> tuple[tuple[float, float], ...]:
    graph = nx.Graph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    degrees = {d for _, d in graph.degree()}
    if len(nodes) <= 2 or (degrees == {2} and nx.is_connected(graph)):
        positions = nx.circular_layout(graph)  # rings read best as rings
    else:
        # seeded spring layout: numpy only (Kamada-Kawai would pull in scipy, ~1 s to import,
        # and is not a dependency), deterministic, ~10 ms for 32 nodes
        positions = nx.spring_layout(graph, seed=0, iterations=100)
    xs = [float(positions[n][0]) for n in nodes]
    ys = [float(positions[n][1]) for n in nodes]

    def scale(values: list[float]) -> list[float]:
        low, high = min(values), max(values)
        return [0.5 if high - low < 1e-9 else (v - low) / (high - low) for v in values]

    return tuple(zip(scale(xs), scale(ys)))


def node_positions(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> dict[str, tuple[float, float]]:
    """Each node's place in the unit square (x right, y up), from a networkx layout.

    Rings get a circle, other graphs a seeded spring layout. Cached per topology,
    deterministic, and shared by the terminal view and the PNGs.
    """
    key_nodes = tuple(nodes)
    key_edges = tuple(sorted({(a, b) if a <= b else (b, a) for a, b in edges if a != b}))
    return dict(zip(key_nodes, _layout(key_nodes, key_edges)))


# ---------------------------------------------------------------------------- drawing helpers


def _figure(width_inches: float, height_inches: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_inches, height_inches), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)  # render off-screen without touching pyplot's global state
    return figure


def _save(figure: Figure, out_path: Path) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, format="png")
    return out_path


def _running_mean(values: Sequence[float]) -> list[float]:
    out, total, count = [], 0.0, 0
    for value in values:
        if math.isfinite(value):
            total, count = total + value, count + 1
        out.append(total / count if count else math.nan)
    return out


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


# ---------------------------------------------------------------------------- the run's plots


def plot_nll_per_round(start: RunStart, rounds: Sequence[RoundEvent], out_path: Path, best_member: str | None = None) -> Path:
    """Left: each round's NLL for every member (in the collective), the collective, the
    silent ensemble, the reference and the best member alone (the report's `best_member`;
    without one, the member with the lowest mean over the eval rounds it was scored on).
    Right: the same as running means over the eval rounds. A member that missed rounds
    has gaps, and its legend entry says how many eval rounds it missed."""
    from matplotlib.ticker import MaxNLocator

    rounds = sorted(rounds, key=lambda event: event.round_index)
    x = [event.round_index + 1 for event in rounds]
    node_ids = [node.node_id for node in start.nodes]
    member: dict[str, list[float]] = {n: [] for n in node_ids}
    alone: dict[str, list[float]] = {n: [] for n in node_ids}
    for event in rounds:
        by_id = {node.node_id: node for node in event.nodes}
        for node_id in node_ids:
            node = by_id.get(node_id)
            member[node_id].append(_nan(node.nll_collective if node else None))
            alone[node_id].append(_nan(node.nll_isolated if node else None))
    is_eval = [event.phase == "eval" for event in rounds]

    def eval_mean(values: list[float]) -> float:
        kept = [v for v, e in zip(values, is_eval) if e and math.isfinite(v)]
        return sum(kept) / len(kept) if kept else math.inf

    best = best_member if best_member in node_ids else min(node_ids, key=lambda n: eval_mean(alone[n])) if node_ids else None
    member_labels = {n: f"{n} in collective{_missed_text(member[n], is_eval)}" for n in node_ids}
    summary = {
        "collective": ([e.nll_collective for e in rounds], {"color": "black", "lw": 2.4}),
        "silent ensemble": ([e.nll_silent for e in rounds], {"color": "tab:blue", "lw": 1.6, "ls": "--"}),
        "reference, full view": ([e.nll_reference for e in rounds], {"color": "tab:green", "lw": 1.4, "ls": ":"}),
    }
    if best is not None:
        summary[f"best member alone ({best})"] = (alone[best], {"color": "tab:orange", "lw": 1.6, "ls": "-."})

    figure = _figure(11, 4.2)
    per_round, running = figure.subplots(1, 2, sharey=True)
    many = len(node_ids) > 8
    palette = [f"C{i % 10}" for i in range(len(node_ids))]
    first_eval = next((xi for xi, e in zip(x, is_eval) if e), None)
    for axes, transform, title in (
        (per_round, lambda v: v, "per round"),
        (running, lambda v: _running_mean([vi if e else math.nan for vi, e in zip(v, is_eval)]), "running mean over eval rounds"),
    ):
        for index, node_id in enumerate(node_ids):
            style = {"color": "0.6", "alpha": 0.35, "lw": 0.8} if many else {"color": palette[index], "alpha": 0.7, "lw": 1.0}
            label = (f"members in collective ({len(node_ids)})" if index == 0 else None) if many else member_labels[node_id]
            axes.plot(x, transform(member[node_id]), label=label, **style)
        for label, (values, style) in summary.items():
            axes.plot(x, transform(list(values)), label=label, **style)
        if first_eval is not None and first_eval > 1:
            axes.axvspan(0.5, first_eval - 0.5, color="0.92", zorder=0, label="warm-up" if axes is per_round else None)
        axes.set_title(title)
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    per_round.set_ylabel(f"NLL ({nll_unit('byte' if any(e.unit == 'byte' for e in rounds) else 'token')})")
    running.legend(fontsize=7, loc="upper right", ncol=1 if not many or len(summary) < 5 else 2)
    figure.suptitle(f"{start.scenario}: NLL per round (seed {start.seed}, {start.aggregator})")
    return _save(figure, out_path)


def _missed_text(values: Sequence[float], is_eval: Sequence[bool]) -> str:
    """' (missed 7 eval rounds)' for a member without a score in 7 eval rounds, else ''."""
    missed = sum(e and not math.isfinite(v) for v, e in zip(values, is_eval))
    return f" (missed {missed} eval rounds)" if missed else ""


def _ci_color(low: float, high: float) -> str:
    if low > 0:
        return "tab:green"
    if high < 0:
        return "tab:red"
    return "0.45"


def plot_gains(report: Report, out_path: Path) -> Path:
    """Left: the NLL of each of `forest_rows` with its 95% CI. Right: the collective and
    communication gains with their CIs against zero (in the report's unit)."""
    rows, per = forest_rows(report), nll_unit(report.unit)
    labels = gains_plot_labels(report, rows)
    figure = _figure(11, max(3.2, 0.26 * len(rows) + 1.4))
    forest, gains = figure.subplots(1, 2, width_ratios=(3, 2))
    y = list(range(len(rows)))[::-1]
    for yi, row in zip(y, rows):
        color = "black" if row.row == "collective" else "tab:blue" if row.row == "ensemble_silent" else "0.35"
        forest.errorbar(
            row.nll, yi, xerr=[[row.nll - row.nll_ci.low], [row.nll_ci.high - row.nll]],
            fmt="o", color=color, ms=4, capsize=2, mfc="white" if report.is_partial(row) else color,  # hollow: partial
        )
    forest.set_yticks(y, labels, fontsize=7 if len(rows) > 12 else 9)
    forest.set_xlabel(f"NLL ({per}), 95% CI")
    forest.grid(axis="x", alpha=0.3)
    forest.set_title("rows" if len(rows) == len(report.rows) else "rows (members: isolated only)")
    names = [
        f"{title}\n{gain.versus}" + (f"\n{gain.n_rounds}/{report.n_eval_rounds} shared rounds" if _shared_fewer(report, gain) else "")
        for title, gain in (("collective gain", report.collective_gain), ("communication gain", report.communication_gain))
    ]
    for yi, gain in zip((1, 0), (report.collective_gain, report.communication_gain)):
        low, high = gain.ci.low, gain.ci.high
        color = _ci_color(low, high)
        gains.barh(yi, gain.value, color=color, alpha=0.35, height=0.5)
        if math.isfinite(low) and math.isfinite(high):
            gains.errorbar(gain.value, yi, xerr=[[gain.value - low], [high - gain.value]], fmt="o", color=color, capsize=4)
        gains.annotate(f"{gain.value:+.3f}", (gain.value, yi + 0.3), ha="center", fontsize=9)
    gains.axvline(0, color="black", lw=0.8)
    gains.set_yticks([1, 0], names, fontsize=8)
    gains.set_ylim(-0.7, 1.7)
    gains.set_xlabel(f"{per} (positive: the collective is better)")
    gains.set_title("gains, 95% CI")
    gains.grid(axis="x", alpha=0.3)
    figure.suptitle(_wrap(report.verdict, 120), fontsize=9)
    return _save(figure, out_path)


def forest_rows(report: Report) -> list[RowReport]:
    """The gains plot's rows: members' isolated rows only past 6 members; the yardstick where its NLL
    is in the rows' unit (a byte-unit report, or one tokenizer: as many tokens as the eval part)."""
    n_members = len({row.node_id for row in report.rows if row.node_id})
    rows = [row for row in report.rows if row.node_id is None or n_members <= 6 or row.row == "member_isolated"]
    return [row for row in rows if row.row != "yardstick" or report.unit == "byte" or row.n_tokens == report.n_eval_tokens]


def gains_plot_labels(report: Report, rows: Sequence[RowReport]) -> list[str]:
    """The forest plot's row labels: a partial row is marked and says what it was scored on."""
    return [row_label(report, row) + (f" ({report.coverage(row)})" if report.is_partial(row) else "") for row in rows]


def _shared_fewer(report: Report, gain: Gain) -> bool:
    return gain.n_rounds is not None and gain.n_rounds < report.n_eval_rounds


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def member_gains(report: Report) -> dict[str, float]:
    """Each node's gain from messages: its isolated NLL minus its NLL in the collective."""
    gains = {}
    for row in report.rows:
        if row.row == "member_isolated" and row.node_id is not None:
            try:
                gains[row.node_id] = row.nll - report.row("member_collective", row.node_id).nll
            except KeyError:
                continue
    return gains


def messages_carried(rounds: Sequence[RoundEvent]) -> dict[tuple[str, str], int]:
    """The number of messages delivered on each directed link (sender, receiver)."""
    carried: dict[tuple[str, str], int] = {}
    for event in rounds:
        for message in event.messages:
            if not message.dropped:
                key = (message.sender, message.receiver)
                carried[key] = carried.get(key, 0) + 1
    return carried


def _draw_links(
    axes: Any, start: RunStart, positions: Mapping[str, tuple[float, float]], carried: Mapping[tuple[str, str], int]
) -> None:
    """One line per link (a pair of opposite links drawn once), as wide as its messages; an
    arrow on a one-way link of a directed graph."""
    busiest = max(carried.values(), default=0)
    edges = set(start.edges)
    drawn: set[tuple[str, str]] = set()
    for a, b in start.edges:
        if a == b or a not in positions or b not in positions:
            continue
        both = (b, a) in edges
        key = (min(a, b), max(a, b))
        if both and key in drawn:
            continue
        drawn.add(key)
        count = carried.get((a, b), 0) + (carried.get((b, a), 0) if both else 0)
        width = 0.6 + 4.0 * count / busiest if busiest else 0.8
        arrow = "-|>" if start.directed and not both else "-"
        axes.annotate(
            "", xy=positions[b], xytext=positions[a],
            arrowprops={"arrowstyle": arrow, "lw": width, "color": "0.55", "shrinkA": 12, "shrinkB": 12},
        )


def _draw_nodes(
    axes: Any, node_ids: Sequence[str], positions: Mapping[str, tuple[float, float]], gains: Mapping[str, float]
) -> Any:
    """The nodes coloured by gain on a scale centred on 0 (grey without one), each labelled
    with its id and gain; returns the coloured scatter for the colour bar."""
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    spread = max([abs(g) for g in gains.values()] + [1e-3])
    norm = TwoSlopeNorm(vmin=-spread, vcenter=0.0, vmax=spread)

    xs = [positions[n][0] for n in node_ids]
    ys = [positions[n][1] for n in node_ids]
    colors = [gains.get(n, math.nan) for n in node_ids]
    small = len(node_ids) <= 12
    marker = 900 if small else 380
    points = axes.scatter(xs, ys, c=colors, cmap=colormaps["RdBu"], norm=norm, s=marker, edgecolors="black", linewidths=0.8, zorder=3)
    unknown = [i for i, gain in enumerate(colors) if not math.isfinite(gain)]  # a node without both rows: grey
    if unknown:
        axes.scatter([xs[i] for i in unknown], [ys[i] for i in unknown], color="0.85", s=marker, edgecolors="black", linewidths=0.8, zorder=3)
    for node_id, x, y in zip(node_ids, xs, ys):
        gain = gains.get(node_id, math.nan)
        dark = math.isfinite(gain) and abs(gain) > 0.6 * spread
        axes.annotate(
            node_id, (x, y), ha="center", va="center", fontsize=9 if small else 6,
            color="white" if dark else "black", zorder=4,
        )
        if math.isfinite(gain):
            axes.annotate(
                f"{gain:+.3f}", (x, y), xytext=(0, -17 if small else -11), textcoords="offset points",
                ha="center", va="top", fontsize=8 if small else 5.5, zorder=4,
            )
    return points


def plot_topology(start: RunStart, report: Report, out_path: Path, rounds: Sequence[RoundEvent] = ()) -> Path:
    """The graph in the terminal view's layout: nodes coloured by their final gain from
    messages, links as wide as the number of messages delivered on them."""
    node_ids = [node.node_id for node in start.nodes]
    positions = node_positions(node_ids, start.edges)
    carried = messages_carried(rounds)
    size = 6.5 if len(node_ids) <= 12 else 8.5
    figure = _figure(size + 1.4, size)
    axes = figure.subplots()
    _draw_links(axes, start, positions, carried)
    points = _draw_nodes(axes, node_ids, positions, member_gains(report))
    colorbar = figure.colorbar(points, ax=axes, shrink=0.7)
    colorbar.set_label(f"gain from messages: isolated − in collective NLL ({nll_unit(report.unit)})", fontsize=8)
    axes.set_xlim(-0.1, 1.1)
    axes.set_ylim(-0.1, 1.1)
    axes.set_aspect("equal")
    axes.axis("off")
    axes.set_title(
        f"{start.scenario}: collective gain {report.collective_gain.value:+.3f}, "
        f"communication gain {report.communication_gain.value:+.3f} {nll_unit(report.unit)}\n"
        f"link width: messages delivered ({sum(carried.values())} in all)",
        fontsize=9,
    )
    return _save(figure, out_path)


def write_run_plots(run_dir: Path, report: Report) -> list[tuple[str, str]]:
    """Draw the run's PNGs into its folder; returns (title, file name) for report.md.

    Never raises: a plot that cannot be drawn logs a warning and is left out.
    """
    images: list[tuple[str, str]] = []
    try:
        from collective.live.replay import EVENTS_FILE, read_events

        events = read_events(run_dir / EVENTS_FILE)
        start = next(event for event in events if isinstance(event, RunStart))
        rounds = [event for event in events if isinstance(event, RoundEvent)]
    except Exception as exc:  # noqa: BLE001 - plots must never fail the run
        log.warning("no plots for %s: cannot read its events (%s)", run_dir, exc)
        return images
    jobs = (
        ("NLL per round", NLL_PLOT, lambda path: plot_nll_per_round(start, rounds, path, report.best_member or None)),
        ("Gains", GAINS_PLOT, lambda path: plot_gains(report, path)),
        ("Topology and per-node gains", TOPOLOGY_PLOT, lambda path: plot_topology(start, report, path, rounds)),
    )
    for title, name, draw in jobs:
        try:
            draw(run_dir / name)
            images.append((title, name))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not draw %s for %s: %s", name, run_dir, exc)
    return images


# ---------------------------------------------------------------------------- reach


def _field(record: Any, name: str, default: Any = None) -> Any:
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def plot_reach(summary_rows: Sequence[Any], out_path: Path, published: Sequence[Any] | None = None, title: str = "") -> Path:
    """Fraction of (x0, y) pairs reached with at most k prompt tokens, one curve per target kind.

    summary_rows: plain records (mappings or objects such as `controllers.reach.ReachSummary`)
        with `targets` (str), `fraction` ({k: fraction reached}) and optionally `n_pairs`.
    published: the paper's points, records with `model`, `targets`, `k`, `low`, `high`;
        by default each summary's own `published` field. Drawn as markers (a bar for a range)
        in the colour of their target kind.
    """
    figure = _figure(7.5, 4.8)
    axes = figure.subplots()
    colors: dict[str, str] = {}
    points: list[Any] = list(published) if published is not None else []
    for index, summary in enumerate(summary_rows):
        targets = str(_field(summary, "targets", f"curve {index}"))
        colors.setdefault(targets, f"C{len(colors)}")
        fraction = {int(k): float(v) for k, v in dict(_field(summary, "fraction", {})).items()}
        ks = sorted(fraction)
        n_pairs = _field(summary, "n_pairs")
        label = f"{targets} targets" + (f" (n={n_pairs})" if n_pairs else "")
        axes.plot(ks, [fraction[k] for k in ks], marker="o", color=colors[targets], label=label)
        if published is None:
            points.extend(_field(summary, "published", ()) or ())
    groups: dict[tuple[str, int], list[tuple[str, float, float]]] = {}
    for point in points:
        key = (str(_field(point, "targets")), int(_field(point, "k")))
        entry = (str(_field(point, "model")), float(_field(point, "low")), float(_field(point, "high")))
        if entry not in groups.setdefault(key, []):
            groups[key].append(entry)
    for (targets, k), entries in groups.items():
        color = colors.setdefault(targets, f"C{len(colors)}")
        for index, (_model, low, high) in enumerate(entries):
            middle = (low + high) / 2
            axes.errorbar(k + 0.18 * index, middle, yerr=[[middle - low], [high - middle]], fmt="*", ms=10, color=color, capsize=3)
        # one label per target kind, so that close points do not print over each other
        text = ", ".join(
            f"{model} {100 * low:.1f}%" if low == high else f"{model} {100 * low:.0f}-{100 * high:.0f}%"
            for model, low, high in entries
        )
        y = sum((low + high) / 2 for _, low, high in entries) / len(entries)
        axes.annotate(
            f"paper, {targets}: {text}", (k, y), xytext=(-10, -12 if targets == "true" else 0), textcoords="offset points",
            ha="right", va="center", fontsize=7, color=color,
        )
    axes.set_xlabel("k (prompt tokens, at most)")
    axes.set_ylabel("fraction of pairs reached")
    axes.set_ylim(0, 1.05)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    axes.set_title(title or "k-ε controllability (stars: Bhargava et al. 2023, k ≤ 10)", fontsize=10)
    return _save(figure, out_path)
