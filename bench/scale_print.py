"""bench/scale.py's output: the table, the spread over the repeats, the fits and the plot of a sweep.

`points` are bench/scale.py's points (each measure the median of its repeats, `repeats` each
repeat's numbers, `load` the load averages around them); `fits` are `scale_fit.growth`'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

CONFIGS = ("one host", "per host")
FITTED = ("overhead_ms", "bus_ms", "engine_ms", "coord_cpu_ms", "mqtt_cpu_ms", "broker_cpu_ms", "hosts_cpu_ms", "bytes_out")


def spread(point: dict[str, Any], name: str) -> tuple[float, float]:
    """min and max of a measure over the point's repeats."""
    values = [r[name] for r in point["repeats"]]
    return min(values), max(values)


def print_table(points: list[dict[str, Any]]) -> None:
    print("\n| nodes | config | hosts | round ms | compute ms | overhead ms | bus ms | engine ms | ms/node | coord cpu ms "
          "| mqtt cpu ms | hosts cpu ms | broker cpu ms | broker % | KiB in | KiB out | coord MiB (+growth) | host MiB | join s |")
    print("| ---: | --- | ---: |" + " ---: |" * 16)
    for p in points:
        share = 100 * p["broker_cpu_ms"] / p["overhead_ms"] if p["overhead_ms"] > 0 else math.nan
        print(f"| {p['nodes']} | {p['config']} | {p['hosts']} | {p['round_ms']:.1f} | {p['compute_ms']:.1f} | "
              f"{p['overhead_ms']:.1f} | {p['bus_ms']:.1f} | {p['engine_ms']:.1f} | {p['ms_per_node']:.3f} | {p['coord_cpu_ms']:.1f} | {p['mqtt_cpu_ms']:.1f} | {p['hosts_cpu_ms']:.0f} | {p['broker_cpu_ms']:.1f} | "
              f"{share:.0f} | {p['bytes_in'] / 1024:.0f} | {p['bytes_out'] / 1024:.0f} | "
              f"{p['coord_mib']:.0f} (+{p['coord_growth_mib']:.0f}) | {p['host_mib']:.0f} | {p['join_s']:.1f} |")


def print_growth(fits: dict[str, dict[str, dict[str, Any]]]) -> None:
    for config, measures in fits.items():
        for name, fit in measures.items():
            if not fit["segments"]:
                continue
            segments = ", ".join(f"{n0}->{n1} {e:.2f}" for n0, n1, e in fit["segments"])
            n0, n1, top = fit["segments"][-1]
            low, high = fit["top_range"]
            print(f"{config}, {name}: a + b*N fit a = {fit['a']:.2f}, b = {fit['b']:.4f} per node; "
                  f"log-log slope by segment {segments}; top segment {n0}->{n1}: {top:.2f} "
                  f"(over the repeats {low:.2f}..{high:.2f})")


def print_spread(points: list[dict[str, Any]]) -> None:
    print("\nspread over the repeats (min..max):")
    for p in points:
        ranges = ", ".join(f"{name} {spread(p, name)[0]:.1f}..{spread(p, name)[1]:.1f}" for name in ("round_ms", *FITTED))
        print(f"  {p['nodes']} nodes, {p['config']} ({len(p['repeats'])} runs, load {min(p['load']):.1f}..{max(p['load']):.1f}): {ranges}")


def plot(points: list[dict[str, Any]], path: Path) -> None:
    from collective.report.plots import _figure, _save

    figure = _figure(11, 4.2)
    left, right = figure.subplots(1, 2)
    for config, marker in zip(CONFIGS, ("o", "s")):
        mine = sorted((p for p in points if p["config"] == config), key=lambda p: p["nodes"])
        if not mine:
            continue
        nodes = [p["nodes"] for p in mine]
        for name, style in (("overhead_ms", "-"), ("bus_ms", "--"), ("engine_ms", "-."), ("broker_cpu_ms", ":")):
            left.plot(nodes, [p[name] for p in mine], style, marker=marker, label=f"{config}: {name.replace('_ms', '')}")
        right.plot(nodes, [p["ms_per_node"] for p in mine], "-", marker=marker, label=config)
    low, top = min(p["nodes"] for p in points), max(p["nodes"] for p in points)
    left.plot([low, top], [low, top], color="grey", lw=0.8, label="1 ms per node")
    left.set(xscale="log", yscale="log", xlabel="nodes", ylabel="ms per round", title="coordinator and bus per round")
    right.axhline(1.0, color="grey", lw=0.8, label="target: 1 ms per node")
    right.set(xscale="log", xlabel="nodes", ylabel="overhead ms per node per round", title="overhead per node")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    _save(figure, path)
