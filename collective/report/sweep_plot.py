"""`gain_vs_bandwidth.png` of a sweep: the communication and collective gains (mean over
seeds, with the mean of the seeds' CI ends, which is not a CI of the mean) against the
bytes links actually delivered per link and round, one line per message policy (the value of a `...message.policy` override; one line when
the sweep does not vary the policy)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from collective.evaluate.sweep import CellSummary, mean_over_seeds
from collective.report.plots import _figure, _save

SWEEP_PLOT = "gain_vs_bandwidth.png"


def policy_of(cell: CellSummary) -> str:
    policies = [str(value) for path, value in cell.settings.items() if path.endswith("message.policy")]
    return ",".join(policies) or "all cells"


def plot_gain_vs_bandwidth(cells: Sequence[CellSummary], out_path: Path) -> Path:
    lines: dict[str, list[CellSummary]] = {}
    for mean in mean_over_seeds(cells):
        lines.setdefault(policy_of(mean), []).append(mean)
    units = sorted({cell.unit for cell in cells})
    per = "nats/token or nats/byte (cells of several tokenizers)" if len(units) > 1 else f"nats/{units[0] if units else 'token'}"
    figure = _figure(11, 4.2)
    panels = figure.subplots(1, 2, sharex=True)
    for panel, title in zip(panels, ("communication gain", "collective gain")):
        for policy, points in lines.items():
            points = sorted(points, key=lambda p: p.bytes_per_link_round)
            x = [p.bytes_per_link_round for p in points]
            gain = [p.communication_gain if panel is panels[0] else p.collective_gain for p in points]
            ci = [p.communication_ci if panel is panels[0] else p.collective_ci for p in points]
            error = [[g - low for g, (low, _) in zip(gain, ci)], [high - g for g, (_, high) in zip(gain, ci)]]
            panel.errorbar(x, gain, yerr=error, fmt="o-", capsize=3, label=policy)
        panel.axhline(0, color="black", lw=0.8)
        panel.set_xlabel("bytes delivered per link per round")
        panel.set_ylabel(f"{per} (positive: better), mean over seeds")
        panel.set_title(f"{title}: mean; bars: mean of the seeds' CI ends, not a CI")
        panel.grid(alpha=0.3)
    panels[0].legend(title="message policy", fontsize=8)
    return _save(figure, out_path)
