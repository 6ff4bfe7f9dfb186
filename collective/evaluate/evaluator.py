"""The evaluator: the engine's per-round statistics in, the `Report` out.

Rows (DESIGN.md): each member plain, isolated and in collective, the silent ensemble,
the collective and the full-view reference, all on the same eval tokens. Confidence
intervals come from one paired block bootstrap over whole rounds (the same resampled
rounds for every row), seeded from the scenario seed.
"""

from __future__ import annotations

import math

from collective.evaluate.metrics import RoundStats, block_bootstrap, gains, summarize, verdict
from collective.records import Gain, Interval, Report, RowReport
from collective.run.engine import EngineResult, RowKey
from collective.scenario import Scenario
from collective.seeding import generator


def row_name(key: RowKey) -> str:
    kind, node_id = key
    return f"{kind}:{node_id}" if node_id is not None else kind


def _interval(low: float, high: float) -> Interval:
    return Interval(low=low, high=high)


def build_report(
    scenario: Scenario,
    result: EngineResult,
    *,
    run_id: str,
    runtime: str = "embedded",
    control_prompts: dict[str, str] | None = None,
    rejected_envelopes: dict[str, dict[str, int]] | None = None,
) -> Report:
    if result.eval_rounds_done == 0:
        raise ValueError("no eval round finished: there is nothing to report")
    stats: dict[str, RoundStats] = {row_name(key): RoundStats.concat(parts) for key, parts in result.books.items()}
    isolated = [row_name(("member_isolated", node_id)) for node_id in scenario.node_ids]
    headline = gains(
        stats,
        isolated=isolated,
        silent="ensemble_silent",
        collective="collective",
        generator=generator(scenario.seed, "bootstrap"),
        block_rounds=scenario.evaluation.block_rounds,
        n_boot=scenario.evaluation.n_boot,
    )
    every_row = block_bootstrap(
        stats,
        generator=generator(scenario.seed, "bootstrap"),
        block_rounds=scenario.evaluation.block_rounds,
        n_boot=scenario.evaluation.n_boot,
    )
    rows = []
    for key in result.books:
        name = row_name(key)
        summary = summarize(stats[name])
        estimate = every_row.nll[name]
        kind, node_id = key
        model = scenario.node(node_id).model if node_id is not None else (
            scenario.reference_model if kind == "reference" else None
        )
        rows.append(
            RowReport(
                row=kind,  # type: ignore[arg-type]
                node_id=node_id,
                model=model,
                nll=summary.nll,
                nll_ci=_interval(estimate.low, estimate.high),
                perplexity=summary.ppl if math.isfinite(summary.ppl) else float("inf"),
                bits_per_byte=summary.bits_per_byte,
                top1=summary.top1_accuracy,
                n_tokens=summary.n_tokens,
            )
        )
    order = {kind: i for i, kind in enumerate(
        ["member_plain", "member_isolated", "member_collective", "ensemble_silent", "collective", "reference"]
    )}
    node_order = {node_id: i for i, node_id in enumerate(scenario.node_ids)}
    rows.sort(key=lambda r: (order[r.row], node_order.get(r.node_id or "", -1)))
    best_member = headline.best_member.split(":", 1)[1]
    cg, mg = headline.collective_gain, headline.communication_gain
    return Report(
        run_id=run_id,
        scenario=scenario.name,
        seed=scenario.seed,
        runtime=runtime,  # type: ignore[arg-type]
        aggregator=describe_aggregator(scenario),
        n_eval_tokens=result.eval_tokens,
        n_eval_rounds=result.eval_rounds_done,
        round_tokens=scenario.bus.round_tokens,
        eval_bytes=result.eval_bytes,
        block_rounds=headline.bootstrap.block_rounds,
        n_boot=scenario.evaluation.n_boot,
        rows=rows,
        best_member=best_member,
        collective_gain=Gain(value=cg.value, ci=_interval(cg.low, cg.high), versus=f"best isolated member ({best_member})"),
        communication_gain=Gain(value=mg.value, ci=_interval(mg.low, mg.high), versus="silent ensemble"),
        verdict=verdict(cg, mg, best_member),
        control_prompts=control_prompts or {},
        missed_rounds={k: v for k, v in result.missed_rounds.items() if v},
        rejected_envelopes={k: dict(v) for k, v in (rejected_envelopes or {}).items() if v},
        messages_sent=result.messages_sent,
        messages_dropped=result.messages_dropped,
        messages_truncated=result.messages_truncated,
        wall_seconds=result.wall_seconds,
        tokens_per_second=result.eval_tokens / result.wall_seconds if result.wall_seconds > 0 else 0.0,
    )


def describe_aggregator(scenario: Scenario) -> str:
    spec = scenario.aggregator
    if spec.kind == "readout":
        return f"readout: {spec.node}"
    if spec.kind == "weighted":
        return f"weighted ({spec.method})"
    return spec.kind
