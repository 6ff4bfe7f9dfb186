"""One run end to end: a prepared run (`collective.run.prepared`), the round engine, the
evaluator, and the run folder.

`run_prepared(prepared, run_dir)` writes the control prompts, runs the rounds (every round
record goes to events.jsonl as it happens, and onto the broker for a distributed run),
evaluates, and writes the report, its plots and its markdown; `search_and_run` searches
the controllers' prompts first (a sweep's cell, a hostile comparison's variant). An interruption or a failure
leaves the folder marked incomplete, with a run-end record that says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from collective.evaluate.evaluator import build_report, describe_aggregator
from collective.records import (
    Controls,
    ControlSearch,
    NodeInfo,
    Report,
    RoundEvent,
    RunEnd,
    RunRecord,
    RunStart,
    Runtime,
)
from collective.run.engine import EmbeddedExecutor, EngineResult, Executor, RoundEngine
from collective.run.prepared import (
    Prepared,
    RunError,
    build_graph,
    control_ids_for,
    load_models,
    needs_search,
    prepare,
)
from collective.run.rundir import RunDir, run_id_for

__all__ = [
    "EventPublisher",
    "Prepared",
    "RejectionCounter",
    "RunError",
    "RunResult",
    "build_graph",
    "control_ids_for",
    "load_models",
    "needs_search",
    "prepare",
    "run_prepared",
    "run_start_event",
    "search_and_run",
]

log = logging.getLogger(__name__)


def run_start_event(prepared: Prepared, run_id: str, runtime: Runtime = "embedded") -> RunStart:
    scenario = prepared.scenario
    context_tokens = scenario.evaluation.context_tokens
    return RunStart(
        run_id=run_id,
        scenario=scenario.name,
        seed=scenario.seed,
        nodes=[
            NodeInfo(
                node_id=node.id,
                model=node.model,
                view=node.view.describe(context_tokens),
                message_policy=node.message.policy,
                controller=node.controller.kind,
                control_text=prepared.node_tokenizer(node.id).decode(prepared.control_ids.get(node.id, [])),
            )
            for node in scenario.nodes
        ],
        edges=[(a, b) for a, b in prepared.graph.edges()],
        directed=scenario.topology.directed,
        warmup_rounds=scenario.evaluation.warmup_rounds,
        eval_rounds=scenario.eval_rounds,
        round_tokens=scenario.bus.round_tokens,
        max_message_tokens=scenario.bus.max_message_tokens,
        max_message_bytes=scenario.bus.max_message_bytes,
        aggregator=describe_aggregator(scenario),
        runtime=runtime,
    )


def controls_record(prepared: Prepared, searches: Sequence[ControlSearch] = ()) -> Controls:
    """What controls.json holds: every node's prompt (as text where it has one), and the searches."""
    text = {node_id: prepared.node_tokenizer(node_id).decode(ids) for node_id, ids in prepared.control_ids.items() if ids}
    return Controls(control_ids=prepared.control_ids, control_text=text, searches=list(searches))


@runtime_checkable
class EventPublisher(Protocol):
    """An executor that also publishes every run record events.jsonl gets (the distributed
    coordinator does, for `collective watch --broker`). It must not block or raise."""

    def publish_event(self, record: RunRecord) -> None: ...


@runtime_checkable
class RejectionCounter(Protocol):
    """An executor that validates what it receives (the distributed coordinator) and counts
    what it dropped: {who dropped it: {reason: count}}, for the report."""

    def rejected_envelopes(self) -> dict[str, dict[str, int]]: ...


@dataclass
class RunResult:
    run_dir: Path
    report: Report | None
    engine: EngineResult
    status: str


class _RunRecords:
    """Where a run's records go: events.jsonl, the broker (a distributed run), the caller."""

    def __init__(
        self, folder: RunDir, run_id: str, publisher: EventPublisher | None, on_event: Callable[[RoundEvent], None] | None
    ) -> None:
        self.folder, self.run_id, self.publisher, self.on_event = folder, run_id, publisher, on_event
        self.rounds_written = 0  # round records in events.jsonl: what an interrupted run did

    def emit(self, record: RunRecord) -> None:
        self.folder.event(record)
        if self.publisher is not None:
            try:
                self.publisher.publish_event(record)
            except Exception as exc:  # watchers are optional; the run goes on
                log.warning("could not publish the %s record: %r", record.kind, exc)

    def round(self, event: RoundEvent) -> None:
        self.emit(event)
        self.rounds_written += 1
        if self.on_event is not None:
            self.on_event(event)

    def end(self, status: Literal["complete", "interrupted", "failed"], rounds_done: int, detail: str = "") -> None:
        self.emit(RunEnd(run_id=self.run_id, status=status, rounds_done=rounds_done, detail=detail))

    def abandon(self, status: Literal["interrupted", "failed"], why: str, detail: str = "", rounds_done: int | None = None) -> None:
        """End the run without a report: the folder stays marked incomplete, saying `why`."""
        self.end(status, self.rounds_written if rounds_done is None else rounds_done, detail)
        self.folder.mark_incomplete(why)
        self.folder.close()


def run_prepared(
    prepared: Prepared,
    run_dir: Path,
    *,
    executor: Executor | None = None,
    runtime: Runtime = "embedded",
    on_event: Callable[[RoundEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    report_hooks: list[Callable[[Path, Report], None]] | None = None,
    control_searches: Sequence[ControlSearch] = (),
) -> RunResult:
    """Run the rounds, evaluate, write the run folder. KeyboardInterrupt leaves it incomplete."""
    scenario = prepared.scenario
    run_id = run_id_for(run_dir)
    folder = RunDir(run_dir).open(scenario.resolved_yaml())
    controls = controls_record(prepared, control_searches)
    folder.write_json("controls.json", controls)
    engine = RoundEngine.from_prepared(prepared, executor or EmbeddedExecutor.from_prepared(prepared), run_id)
    publisher = executor if isinstance(executor, EventPublisher) else None
    records = _RunRecords(folder, run_id, publisher, on_event)
    records.emit(run_start_event(prepared, run_id, runtime))
    try:
        result = engine.run(on_event=records.round, should_stop=should_stop)
    except KeyboardInterrupt:
        records.abandon("interrupted", "interrupted by Ctrl-C before the last round: no report was written", "Ctrl-C")
        raise
    except BaseException as exc:
        records.abandon("failed", f"failed: {exc!r}", repr(exc))
        raise
    if result.rounds_done < engine.total_rounds:
        why = f"stopped after {result.rounds_done} of {engine.total_rounds} rounds: no report"
        records.abandon("interrupted", why, rounds_done=result.rounds_done)
        return RunResult(run_dir, None, result, "interrupted")
    rejected = executor.rejected_envelopes() if isinstance(executor, RejectionCounter) else None
    report = build_report(
        scenario, result, run_id=run_id, runtime=runtime, control_prompts=controls.control_text, rejected_envelopes=rejected,
        firewalls=prepared.firewalls, firewall_fits=prepared.firewall_fits,
    )
    _write_report(folder, report, report_hooks or [])
    records.end("complete", result.rounds_done)
    folder.close()
    folder.finish()
    return RunResult(run_dir, report, result, "complete")


def search_and_run(
    prepared: Prepared, run_dir: Path, known: tuple[Mapping[str, list[int]], Sequence[ControlSearch]] | None = None
) -> list[ControlSearch]:
    """A run as `collective run` makes it: the gcg controllers searched on the train part
    (their prompts and searches go into controls.json), then `run_prepared`. With `known`
    (prompts and the searches that found them, another run's), nothing is searched and
    those prompts are used. Returns the searches written."""
    from collective.run.control import search_controls

    if known is None:
        searches = search_controls(prepared) if needs_search(prepared.scenario) else []
    else:
        prompts, found = known
        prepared.control_ids.update(prompts)
        searches = list(found)
    run_prepared(prepared, run_dir, control_searches=searches)
    return searches


def _write_report(folder: RunDir, report: Report, hooks: list[Callable[[Path, Report], None]]) -> None:
    """report.json, the plots (a plot that fails logs a warning, never fails the run),
    report.md, then the caller's hooks."""
    from collective.report.plots import write_run_plots
    from collective.report.report_view import report_markdown

    folder.write_json("report.json", report)
    images = write_run_plots(folder.path, report)
    folder.write_text("report.md", report_markdown(report, images))
    for hook in hooks:
        hook(folder.path, report)
