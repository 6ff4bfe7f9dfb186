"""The evaluator: the engine's round book in, the `Report` out.

Rows (DESIGN.md): each member plain, isolated and in collective, the silent ensemble,
the collective and the full-view reference (and the optional yardstick, on the same text in
its own tokens), all on the same eval tokens (a member that
missed rounds is scored on the others, and its rows say on how many). Every row's CI and
every gain (collective, communication, and each prompted node's controller gain, plain
minus isolated) come from paired intervals over whole eval rounds (`gains.gains`,
`intervals.py`: deterministic, no generator). Rows come out in `ROW_ORDER`, then node order. Each
receiver's firewall is summed up from its screen records (what each filter dropped and
rewrote, its time as a share of the run's round time) with the thresholds the run used.
With a yardstick, the share of the best member's gap to it that the collective closes
(bits/byte, `intervals.gap_share`) is the report's `yardstick` and a sentence of the verdict.
A run of several tokenizers is scored per byte (`EngineResult.unit`): the report says so
(`Report.unit`), and its verdict reads the gains in bits/byte.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from collective.evaluate.book import EngineResult, RowKey
from collective.evaluate.gains import (
    RULE_COMPLETE,
    Gains,
    gains,
    missed_rounds_note,
    verdict,
    yardstick_line,
)
from collective.evaluate.intervals import PairedIntervals, gap_share
from collective.evaluate.metrics import Estimate, RoundStats, summarize
from collective.message_specs import describe_filter, filter_labels
from collective.records import (
    MEMBER_ROWS,
    ROW_ORDER,
    FilterFit,
    FilterReport,
    FirewallReport,
    Gain,
    Interval,
    MessageSearchSummary,
    Report,
    RowReport,
    Runtime,
    ScreenRecord,
    YardstickGap,
)
from collective.scenario import FirewallFilter, PerplexityFilter, Scenario


def _ci(estimate: Estimate) -> Interval:
    return Interval(low=estimate.low, high=estimate.high)


def build_report(
    scenario: Scenario,
    result: EngineResult,
    *,
    run_id: str,
    runtime: Runtime = "embedded",
    control_prompts: dict[str, str] | None = None,
    rejected_envelopes: dict[str, dict[str, int]] | None = None,
    firewalls: dict[str, tuple[FirewallFilter, ...]] | None = None,
    firewall_fits: dict[str, dict[int, FilterFit]] | None = None,
) -> Report:
    if result.eval_rounds_done == 0:
        raise ValueError("no eval round finished: there is nothing to report")
    stats = result.book.stats()
    prompted = [node_id for node_id in scenario.node_ids if (control_prompts or {}).get(node_id)]
    headline = gains(
        stats,
        isolated=[RowKey("member_isolated", node_id) for node_id in scenario.node_ids],
        silent=RowKey("ensemble_silent"),
        collective=RowKey("collective"),
        controlled=[(RowKey("member_plain", node_id), RowKey("member_isolated", node_id)) for node_id in prompted],
    )
    best_member = "" if headline.best_member is None else headline.best_member.node_id or ""
    cg, mg = headline.collective_gain, headline.communication_gain
    missed = unscored_rounds(scenario, stats)
    note = missed_rounds_note(missed, result.eval_rounds_done, cg, mg, headline.best_member_rule)
    gap = yardstick_gap(scenario, stats, headline)
    report = Report(
        run_id=run_id,
        scenario=scenario.name,
        seed=scenario.seed,
        runtime=runtime,
        aggregator=describe_aggregator(scenario),
        n_eval_tokens=result.eval_tokens,
        n_eval_rounds=result.eval_rounds_done,
        round_tokens=scenario.bus.round_tokens,
        eval_bytes=result.eval_bytes,
        interval_method=headline.intervals.method,
        unit=result.unit,
        rows=row_reports(scenario, stats, headline.intervals),
        best_member=best_member,
        collective_gain=_gain(cg, f"best isolated member ({best_member or 'none'})"),
        communication_gain=_gain(mg, "silent ensemble"),
        verdict=verdict(cg, mg, best_member or None, note, result.unit) + (f" {gap[1]}" if gap else ""),
        yardstick=gap[0] if gap else None,
        controller_gains={
            key.node_id or "": _gain(estimate, "plain member (no prompt)") for key, estimate in headline.controller_gains.items()
        },
        message_searches={node_id: MessageSearchSummary.of(found) for node_id, found in result.message_searches.items() if found},
        firewalls=firewall_reports(result, firewalls or {}, firewall_fits or {}),
        best_member_rule=best_member_rule(headline, missed, result.eval_rounds_done),
        control_prompts=control_prompts or {},
        missed_rounds={k: v for k, v in result.missed_rounds.items() if v},
        rejected_envelopes={k: dict(v) for k, v in (rejected_envelopes or {}).items() if v},
        **_counts(result),
    )
    return report.model_copy(update={"partial_members": report.partial_nodes()})


def yardstick_gap(
    scenario: Scenario, stats: dict[RowKey, RoundStats], headline: Gains[RowKey]
) -> tuple[YardstickGap, str] | None:
    """The gap to the yardstick the collective closes and its sentence (None: no yardstick row,
    or no best member)."""
    key, best = RowKey("yardstick"), headline.best_member
    if key not in stats or best is None or scenario.evaluation.yardstick is None:
        return None
    found = gap_share(stats[best], stats[RowKey("collective")], stats[key], headline.collective_gain.confidence)
    record = YardstickGap(
        model=scenario.evaluation.yardstick, best_member=best.node_id or "",
        share=found.share.value if found.defined else None, share_ci=_ci(found.share),
        gap_bits_per_byte=found.gap.value, gap_ci=_ci(found.gap),
        closed_bits_per_byte=found.closed.value, closed_ci=_ci(found.closed), n_rounds=found.gap.n_rounds or 0,
    )
    return record, yardstick_line(found, scenario.evaluation.yardstick)


def _counts(result: EngineResult) -> dict[str, Any]:
    """The report's message and time counters."""
    return {
        "messages_sent": result.messages_sent,
        "messages_dropped": result.messages_dropped,
        "messages_truncated": result.messages_truncated,
        "wall_seconds": result.wall_seconds,
        "tokens_per_second": result.eval_tokens / result.wall_seconds if result.wall_seconds > 0 else 0.0,
    }


def firewall_reports(
    result: EngineResult, firewalls: dict[str, tuple[FirewallFilter, ...]], fits: dict[str, dict[int, FilterFit]]
) -> dict[str, FirewallReport]:
    """Per receiver with a firewall: `firewalls` are the filters the run screened with (every
    threshold set), `fits` how the fitted thresholds were fitted (both from `Prepared`)."""
    return {
        node_id: firewall_report(filters, result.screened.get(node_id, []), fits.get(node_id, {}), result.wall_seconds)
        for node_id, filters in firewalls.items()
    }


def firewall_report(
    filters: tuple[FirewallFilter, ...], screened: list[ScreenRecord], fits: dict[int, FilterFit], round_seconds: float
) -> FirewallReport:
    """One receiver's firewall: each filter with its threshold (and fit) and what it dropped and
    rewrote, from the receiver's screen records of every round."""
    labels = filter_labels(filters)
    seconds = sum(s.seconds for s in screened)
    return FirewallReport(
        filters=[
            FilterReport(
                filter=label, setting=describe_filter(spec), threshold=spec.threshold if isinstance(spec, PerplexityFilter) else None,
                fit=fits.get(index),
                dropped=sum(s.action == "drop" and s.filter == label for s in screened),
                rewritten=sum(s.action == "rewrite" and label in (s.filter or "").split("+") for s in screened),
            )
            for index, (spec, label) in enumerate(zip(filters, labels))
        ],
        messages_read=len(screened),
        messages_dropped=sum(s.action == "drop" for s in screened),
        messages_rewritten=sum(s.action == "rewrite" for s in screened),
        seconds=seconds,
        round_share=seconds / round_seconds if round_seconds > 0 else 0.0,
    )


def _gain(estimate: Estimate, versus: str) -> Gain:
    return Gain(value=estimate.value, ci=_ci(estimate), versus=versus, n_rounds=estimate.n_rounds)


def unscored_rounds(scenario: Scenario, stats: dict[RowKey, RoundStats]) -> dict[str, int]:
    """Per node, the eval rounds in which one of its member rows scored nothing (0: none)."""
    out = {}
    for node_id in scenario.node_ids:
        rows = [stats[key] for key in (RowKey(kind, node_id) for kind in MEMBER_ROWS) if key in stats]
        scored = torch.stack([row.scored_rounds for row in rows]).all(0) if rows else torch.ones(0, dtype=torch.bool)
        out[node_id] = int((~scored).sum())
    return out


def best_member_rule(headline: Gains[RowKey], missed: dict[str, int], n_rounds: int) -> str:
    """The rule in words, naming the members it left out."""
    left_out = [f"{node_id} (missed {count} of {n_rounds})" for node_id, count in missed.items() if count]
    if headline.best_member_rule == RULE_COMPLETE and left_out:
        return f"{RULE_COMPLETE}; not eligible: {', '.join(left_out)}"
    return headline.best_member_rule


def row_reports(
    scenario: Scenario, stats: dict[RowKey, RoundStats], intervals: PairedIntervals[RowKey]
) -> list[RowReport]:
    """One report row per booked row, in ROW_ORDER and then node order."""
    node_order = {node_id: i for i, node_id in enumerate(scenario.node_ids)}
    keys = sorted(stats, key=lambda key: (ROW_ORDER.index(key.kind), node_order.get(key.node_id or "", -1)))
    rows = []
    for key in keys:
        summary = summarize(stats[key])
        if key.node_id is not None:
            model: str | None = scenario.node(key.node_id).model
        else:
            model = {"reference": scenario.reference_model, "yardstick": scenario.evaluation.yardstick}.get(key.kind)
        rows.append(
            RowReport(
                row=key.kind,
                node_id=key.node_id,
                model=model,
                nll=summary.nll,
                nll_ci=_ci(intervals.nll[key]),
                perplexity=summary.ppl if math.isfinite(summary.ppl) else float("inf"),
                bits_per_byte=summary.bits_per_byte,
                top1=summary.top1_accuracy,
                n_tokens=summary.n_tokens,
                n_rounds=int(stats[key].scored_rounds.sum()),
            )
        )
    return rows


def describe_aggregator(scenario: Scenario) -> str:
    spec = scenario.aggregator
    if spec.kind == "readout":
        return f"readout: {spec.node}"
    if spec.kind == "weighted":
        return f"weighted ({spec.method})"
    return spec.kind
