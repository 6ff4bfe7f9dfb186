"""`collective hostile`'s record as people read it: a rich table for the terminal, Markdown
for hostile.md. Both are pure functions of a `HostileReport` and share their cells: one table
of the numbers (the headline, adversarial damage = attack - benign, first; each seed's value
with its paired CI, and with several seeds the mean with its t interval), one of the
variants (collective NLL, the firewalls' drops, the run folder), then notes (which number
is the headline, what each is, the intervals, the thresholds fitted once, what was skipped).
"""

from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from collective.evaluate.hostile_record import (
    HEADLINE_RULE,
    NUMBERS,
    FirewallFit,
    HostileReport,
    Number,
    ScreenCounts,
)

Cells = tuple[list[str], list[list[str]]]  # headers, rows


def _value(number: Number | None) -> str:
    if number is None or not math.isfinite(number.value):
        return "-"
    if not (math.isfinite(number.low) and math.isfinite(number.high)):
        return f"{number.value:+.3f}"
    return f"{number.value:+.3f} [{number.low:+.3f}, {number.high:+.3f}]"


def _nll(number: Number) -> str:
    return _value(number).replace("+", "")  # an NLL is never negative: no sign


def _over_seeds(report: HostileReport) -> bool:
    return len(report.seeds) > 1


def number_cells(report: HostileReport) -> Cells:
    """One row per number: each seed's value [95% CI], and the mean over seeds [t interval]."""
    headers = ["number (nats/token)", *(f"seed {s.seed}" for s in report.seeds)]
    if _over_seeds(report):
        headers.append("mean over seeds (t interval)")
    rows = []
    for number in NUMBERS:
        label = f"{number.title} ({number.minuend} - {number.subtrahend})"
        row = [label, *(_value(seed.numbers.get(number.name)) for seed in report.seeds)]
        if _over_seeds(report):
            row.append(_value(report.numbers_over_seeds.get(number.name)))
        rows.append(row)
    return headers, rows


def _screens(counts: list[ScreenCounts]) -> list[str]:
    hostile = f"{sum(c.hostile_dropped for c in counts)}/{sum(c.hostile_screened for c in counts)}"
    benign = f"{sum(c.benign_dropped for c in counts)}/{sum(c.benign_screened for c in counts)}"
    return [hostile, benign, str(sum(c.rewritten for c in counts))]


def variant_cells(report: HostileReport, *, wide: bool = True) -> Cells:
    """One row per variant: its collective NLL per seed, the firewalls' drops (summed over
    seeds) and, `wide`, what it changes and its run folder (the first seed's)."""
    headers = ["variant", *(("hostile message", "firewalls", "attacker pooled") if wide else ())]
    headers += [f"seed {s.seed}" for s in report.seeds]
    if _over_seeds(report):
        headers.append("mean over seeds (t interval)")
    folder = "run folder (first seed)" if _over_seeds(report) else "run folder"
    headers += ["hostile drops", "benign drops", "rewritten", *((folder,) if wide else ())]
    rows = []
    for first in report.seeds[0].variants:
        same = [v for seed in report.seeds for v in seed.variants if v.name == first.name]
        row = [first.name]
        if wide:
            row += [first.message, "on" if first.firewall else "off", "yes" if first.attacker_pooled else "no"]
        row += [_nll(v.collective_nll) for v in same]
        if _over_seeds(report):
            row.append(_nll(report.nll_over_seeds[first.name]))
        rows.append(row + _screens([v.screens for v in same]) + ([first.run_dir] if wide else []))
    return headers, rows


def fit_line(found: FirewallFit) -> str:
    """`firewall of a, filter 0: threshold 5.210 nats/token, fitted on 64 benign train messages
    (held out: 4.7% of 64 above it; 120 distinct train windows, 64 asked for each half)`."""
    head = f"firewall of {found.node}, filter {found.filter_index}: threshold {found.threshold:.3f} nats/token"
    fit = found.fit
    if fit is None:
        return f"{head}, given in the scenario"
    held = "-" if fit.held_out_drop_rate is None else f"{fit.held_out_drop_rate:.1%}"
    return (
        f"{head}, fitted on {fit.benign_messages} benign train messages at {fit.false_drop_rate:.0%} false drops "
        f"(held out: {held} of {fit.held_out_messages} above it; {fit.windows_available} distinct train windows, "
        f"{fit.requested_messages} asked for each half)"
    )


def notes(report: HostileReport) -> list[str]:
    seed = report.seeds[0]
    lines = [HEADLINE_RULE, *(n.definition for n in NUMBERS)]
    if report.note:
        lines.insert(0, report.note)
    lines.append(f"CIs: paired over {seed.n_eval_rounds} eval rounds: {seed.interval_method}")
    if seed.firewall_fits:
        lines.append(
            "firewall thresholds: fitted once per seed on the scenario as written (the attack variant) and the same "
            f"in every firewall-on variant; seed {seed.seed}:"
        )
        lines += [f"  {fit_line(found)}" for found in seed.firewall_fits]
    lines.append(f"silent ensemble: the same in every variant within {max(s.silent_ensemble_spread for s in report.seeds):.1e} nats/token")
    if _over_seeds(report):
        lines.append(f"over seeds: {report.over_seeds_rule}")
    lines.append("drops: messages a receiver's firewall dropped / screened in the eval rounds, by sender (hostile or benign)")
    return lines


def _title(report: HostileReport) -> str:
    return f"{report.scenario}: hostile node(s) {', '.join(report.hostile_nodes)}; values [95% CI] in nats/token"


def hostile_table(report: HostileReport) -> Group:
    """The numbers, the variants (without the columns their names say) and the notes."""
    tables = []
    for title, (headers, rows) in ((_title(report), number_cells(report)), ("variants: collective NLL [95% CI], firewalls' drops", variant_cells(report, wide=False))):
        table = Table(title=title, title_justify="left")
        for index, header in enumerate(headers):
            table.add_column(header, justify="left" if index == 0 else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    folders = "seed-S/<variant>/" if _over_seeds(report) else "<variant>/"
    lines = [*notes(report), f"run folders: {folders} beside hostile.json"]
    return Group(*tables, *(Text(line) for line in lines))


def _markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def hostile_markdown(report: HostileReport) -> str:
    lines = [f"# {_title(report)}", "", f"Scenario file: `{report.scenario_file}`", ""]
    lines += _markdown_table(*number_cells(report)) + ["", "## Variants", ""]
    lines += _markdown_table(*variant_cells(report)) + [""]
    lines += [f"- {line}" for line in notes(report)]
    return "\n".join(lines) + "\n"
