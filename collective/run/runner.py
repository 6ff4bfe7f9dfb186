"""One run end to end: prepare (models, tokenizer check, corpus, topology, controllers),
the round engine, the evaluator, and the run folder.

`prepare(scenario)` does everything that can fail on user input before any round
runs, so mistakes surface in seconds with a clear `RunError`. `run_prepared(...)` then
runs the rounds and writes the folder; an interruption leaves it marked incomplete.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import networkx as nx
import torch

from collective.evaluate.evaluator import build_report, describe_aggregator
from collective.lm.corpus import load_corpus_text, token_byte_lengths, tokenize_stream
from collective.lm.models import LoadedModel, ModelPool, check_same_tokenizer
from collective.records import NodeInfo, Report, RoundEvent, RunEnd, RunStart
from collective.run.bus import InMemoryBus
from collective.run.engine import EmbeddedExecutor, EngineResult, Executor, LoadedLM, RoundEngine
from collective.run.observation import describe_view
from collective.run.rundir import RunDir, run_id_for
from collective.scenario import FixedController, GCGController, MaskedView, Scenario
from topologies import build_topology

log = logging.getLogger(__name__)


class RunError(Exception):
    """A run cannot start or go on; the message is meant for the user."""


@dataclass
class Prepared:
    scenario: Scenario
    models: dict[str, LoadedModel]  # alias -> one loaded copy (shared by nodes)
    graph: nx.DiGraph
    stream: torch.Tensor  # (S,) train part then eval part
    byte_lengths: torch.Tensor  # (S,)
    placeholder_ids: dict[str, int]
    control_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tokenizer(self) -> object:
        return next(iter(self.models.values())).tokenizer

    def lm(self, alias: str) -> LoadedLM:
        loaded = self.models[alias]
        return LoadedLM(loaded.model, loaded.tokenizer, loaded.name)


def build_graph(scenario: Scenario) -> nx.DiGraph:
    spec = scenario.topology
    if spec.kind == "edges":
        graph = nx.DiGraph()
        graph.add_nodes_from(scenario.node_ids)
        for a, b in spec.edges or []:
            graph.add_edge(a, b)
            if not spec.directed:
                graph.add_edge(b, a)
        return graph
    params = dict(spec.params)
    if spec.kind == "file":
        params["path"] = spec.path
    try:
        return build_topology(spec.kind, scenario.node_ids, seed=scenario.seed, directed=spec.directed, **params)
    except (ValueError, TypeError) as exc:
        raise RunError(f"topology: {exc}") from None


def load_models(scenario: Scenario, pool: ModelPool, only: set[str] | None = None) -> dict[str, LoadedModel]:
    used = {node.model for node in scenario.nodes} | {scenario.reference_model}
    if only is not None:
        used &= only
    models = {}
    for alias in scenario.models:
        if alias in used:
            spec = scenario.models[alias]
            models[alias] = pool.get(spec.ref, device=spec.device, dtype=spec.dtype)
    check_same_tokenizer(models)
    return models


def control_ids_for(scenario: Scenario, tokenizer: object) -> dict[str, list[int]]:
    """Prompts that need no search: none and fixed controllers."""
    encode = tokenizer.encode  # type: ignore[attr-defined]
    controls = {}
    for node in scenario.nodes:
        if isinstance(node.controller, FixedController):
            controls[node.id] = list(encode(node.controller.text, add_special_tokens=False))
        else:
            controls[node.id] = []
    return controls


def prepare(scenario: Scenario, pool: ModelPool, *, base_dir: Path) -> Prepared:
    graph = build_graph(scenario)
    models = load_models(scenario, pool)
    tokenizer = next(iter(models.values())).tokenizer
    corpus = scenario.corpus
    text = load_corpus_text(corpus.source, corpus.path, base_dir=base_dir)
    needed = corpus.offset_tokens + corpus.train_tokens + corpus.eval_tokens
    stream = tokenize_stream(text, tokenizer, needed)[corpus.offset_tokens :]
    byte_lengths = token_byte_lengths(stream, tokenizer)
    placeholders = {}
    for index, node in enumerate(scenario.nodes):
        if isinstance(node.view, MaskedView):
            ids = tokenizer.encode(node.view.placeholder, add_special_tokens=False)
            if len(ids) != 1:
                raise RunError(
                    f"nodes[{index}].view.placeholder: {node.view.placeholder!r} is {len(ids)} tokens for "
                    f"this tokenizer; a placeholder must be exactly one token (try '_' or '?')"
                )
            placeholders[node.id] = int(ids[0])
    return Prepared(scenario, models, graph, stream, byte_lengths, placeholders, control_ids_for(scenario, tokenizer))


def needs_search(scenario: Scenario) -> bool:
    return any(isinstance(node.controller, GCGController) for node in scenario.nodes)


def run_start_event(prepared: Prepared, run_id: str, runtime: str = "embedded") -> RunStart:
    scenario = prepared.scenario
    decode = prepared.tokenizer.decode  # type: ignore[attr-defined]
    return RunStart(
        run_id=run_id,
        scenario=scenario.name,
        seed=scenario.seed,
        nodes=[
            NodeInfo(
                node_id=node.id,
                model=node.model,
                view=describe_view(node, scenario.evaluation.context_tokens),
                message_policy=node.message.policy,
                controller=node.controller.kind,
                control_text=decode(prepared.control_ids.get(node.id, [])),
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
        runtime=runtime,  # type: ignore[arg-type]
    )


@runtime_checkable
class EventPublisher(Protocol):
    """An executor that also publishes every run record events.jsonl gets (the distributed
    coordinator does, for `collective watch --broker`). It must not block or raise."""

    def publish_event(self, record: RunStart | RoundEvent | RunEnd) -> None: ...


@runtime_checkable
class RejectionCounter(Protocol):
    """An executor that validates what it receives (the distributed coordinator) and counts
    what it dropped: {who dropped it: {reason: count}}, for the report."""

    def rejected_envelopes(self) -> dict[str, dict[str, int]]: ...


def embedded_executor(prepared: Prepared) -> Executor:
    bus = InMemoryBus(prepared.graph, prepared.scenario.bus, prepared.tokenizer, prepared.scenario.seed)  # type: ignore[arg-type]
    return EmbeddedExecutor(prepared.scenario, {a: prepared.lm(a) for a in prepared.models}, bus)


@dataclass
class RunResult:
    run_dir: Path
    report: Report | None
    engine: EngineResult
    status: str


def run_prepared(
    prepared: Prepared,
    run_dir: Path,
    *,
    executor: Executor | None = None,
    runtime: str = "embedded",
    on_event: Callable[[RoundEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    report_hooks: list[Callable[[Path, Report], None]] | None = None,
    control_searches: list[dict] | None = None,
) -> RunResult:
    """Run the rounds, evaluate, write the run folder. KeyboardInterrupt leaves it incomplete."""
    scenario = prepared.scenario
    run_id = run_id_for(run_dir)
    folder = RunDir(run_dir).open(scenario.resolved_yaml())
    decode = prepared.tokenizer.decode  # type: ignore[attr-defined]
    prompts = {node_id: decode(ids) for node_id, ids in prepared.control_ids.items() if ids}
    folder.write_json(
        "controls.json",
        {
            "schema_version": 1,
            "control_ids": prepared.control_ids,
            "control_text": prompts,
            "searches": control_searches or [],
        },
    )
    engine = RoundEngine(
        scenario,
        prepared.graph,
        prepared.stream,
        prepared.byte_lengths,
        executor or embedded_executor(prepared),
        prepared.lm(scenario.reference_model),
        prepared.control_ids,
        prepared.placeholder_ids,
        run_id,
    )

    written: list[int] = []  # round events in events.jsonl: what an interrupted run did
    publisher = executor if isinstance(executor, EventPublisher) else None

    def emit(event: RunStart | RoundEvent | RunEnd) -> None:
        """One record into events.jsonl and, for a distributed run, onto the broker."""
        folder.event(event)
        if publisher is not None:
            try:
                publisher.publish_event(event)
            except Exception as exc:  # watchers are optional; the run goes on
                log.warning("could not publish the %s record: %r", event.kind, exc)

    def record(event: RoundEvent) -> None:
        emit(event)
        written.append(event.round_index)
        if on_event is not None:
            on_event(event)

    emit(run_start_event(prepared, run_id, runtime))
    try:
        result = engine.run(on_event=record, should_stop=should_stop)
    except KeyboardInterrupt:
        emit(RunEnd(run_id=run_id, status="interrupted", rounds_done=len(written), detail="Ctrl-C"))
        folder.mark_incomplete("interrupted by Ctrl-C before the last round: no report was written")
        folder.close()
        raise
    except BaseException as exc:
        emit(RunEnd(run_id=run_id, status="failed", rounds_done=len(written), detail=repr(exc)))
        folder.mark_incomplete(f"failed: {exc!r}")
        folder.close()
        raise
    if result.rounds_done < engine.total_rounds:
        emit(RunEnd(run_id=run_id, status="interrupted", rounds_done=result.rounds_done))
        folder.mark_incomplete(f"stopped after {result.rounds_done} of {engine.total_rounds} rounds: no report")
        folder.close()
        return RunResult(run_dir, None, result, "interrupted")
    rejected = executor.rejected_envelopes() if isinstance(executor, RejectionCounter) else None
    report = build_report(
        scenario, result, run_id=run_id, runtime=runtime, control_prompts=prompts, rejected_envelopes=rejected
    )
    folder.write_json("report.json", report)
    from collective.report.plots import write_run_plots
    from collective.report.report_view import report_markdown

    images = write_run_plots(run_dir, report)  # a plot that fails logs a warning, never fails the run
    folder.write_text("report.md", report_markdown(report, images))
    for hook in report_hooks or []:
        hook(run_dir, report)
    emit(RunEnd(run_id=run_id, status="complete", rounds_done=result.rounds_done))
    folder.close()
    folder.finish()
    return RunResult(run_dir, report, result, "complete")
