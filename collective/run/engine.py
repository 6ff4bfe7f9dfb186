"""The round engine: the stream advances one round at a time, in a fixed order.

Each round: (1) every node's observation is cut from the stream; (2) an executor
computes every node's predictions and message (the embedded executor batches all nodes
sharing a model into one forward pass and runs the in-memory bus; the distributed one
asks volunteer machines); (3) the engine scores the full-view reference, pools the
members into the silent ensemble and the collective, (4) books per-round statistics of
every evaluator row (eval rounds only) and (5) emits a `RoundEvent`.

The first `warmup_rounds` rounds come from the end of the train part, so that inboxes
and online weights start warm; only eval rounds are booked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import networkx as nx
import torch

from collective.evaluate.metrics import RoundStats, round_stats
from collective.lm.predictions import TokenPredictions
from collective.lm.scoring import ScoreItem, score_items
from collective.records import NodeRound, RoundEvent
from collective.run.aggregate import Aggregator, PooledPrediction, make_aggregator
from collective.run.bus import InMemoryBus
from collective.run.node import NodeRoundRequest, NodeRoundResult, compute_rounds, start_token
from collective.run.observation import Observer
from collective.scenario import Scenario

log = logging.getLogger(__name__)

ROW_KINDS = ("member_plain", "member_isolated", "member_collective", "ensemble_silent", "collective", "reference")


@dataclass
class LoadedLM:
    """What the engine needs of a loaded model."""

    model: torch.nn.Module
    tokenizer: object
    name: str


RowKey = tuple[str, str | None]


@dataclass
class EngineResult:
    books: dict[RowKey, list[RoundStats]]
    rounds_done: int
    eval_rounds_done: int
    missed_rounds: dict[str, int]
    messages_sent: int
    messages_dropped: int
    messages_truncated: int
    wall_seconds: float
    eval_tokens: int
    eval_bytes: int


class Executor(Protocol):
    """Runs the nodes' part of a round; returns None for a node that missed it."""

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]: ...


class EmbeddedExecutor:
    """All nodes in this process: one batched pass per distinct model, the in-memory bus."""

    def __init__(self, scenario: Scenario, models: dict[str, LoadedLM], bus: InMemoryBus) -> None:
        self.scenario = scenario
        self.models = models
        self.bus = bus

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        by_model: dict[str, list[NodeRoundRequest]] = {}
        for request in requests:
            request = _with_inbox(request, self.bus.render_inbox(request.node_id, round_index))
            by_model.setdefault(self.scenario.node(request.node_id).model, []).append(request)
        results: dict[str, NodeRoundResult | None] = {}
        for alias, group in by_model.items():
            lm = self.models[alias]
            for result in compute_rounds(
                lm.model,
                lm.tokenizer,
                group,
                top_k=self.scenario.evaluation.top_k,
                batch_tokens=self.scenario.evaluation.batch_tokens,
            ):
                results[result.node_id] = result
        # messages are sent after every node has read its inbox: latency >= 1 round
        for request in requests:
            done = results[request.node_id]
            if done is not None and done.message_text is not None:
                done.messages = self.bus.send(request.node_id, done.message_text, round_index)
        return results


def _with_inbox(request: NodeRoundRequest, inbox_text: str) -> NodeRoundRequest:
    from dataclasses import replace

    return replace(request, inbox_text=inbox_text)


class RoundEngine:
    """Runs warm-up and eval rounds of one scenario over a tokenized stream."""

    def __init__(
        self,
        scenario: Scenario,
        graph: nx.DiGraph,
        stream: torch.Tensor,
        byte_lengths: torch.Tensor,
        executor: Executor,
        reference: LoadedLM,
        control_ids: dict[str, list[int]],
        placeholder_ids: dict[str, int],
        run_id: str,
    ) -> None:
        self.scenario = scenario
        self.graph = graph
        self.stream = stream
        self.byte_lengths = byte_lengths
        self.executor = executor
        self.reference = reference
        self.control_ids = control_ids
        self.run_id = run_id
        self.round_tokens = scenario.bus.round_tokens
        self.eval_start = scenario.corpus.train_tokens
        self.observer = Observer(
            stream,
            scenario.nodes,
            seed=scenario.seed,
            round_tokens=self.round_tokens,
            context_tokens=scenario.evaluation.context_tokens,
            placeholder_ids=placeholder_ids,
        )
        node_ids = scenario.node_ids
        spec = scenario.aggregator
        readout = node_ids.index(spec.node) if spec.kind == "readout" and spec.node else None
        self.collective_pool: Aggregator = make_aggregator(
            spec.kind, len(node_ids), readout_index=readout, method=spec.method, eta=spec.eta,
            temperature=spec.temperature, window_tokens=spec.window_tokens,
        )
        self.silent_pool: Aggregator = self.collective_pool.clone()
        self.link_budget = {
            node: min(
                [self.executor_budget(node, succ) for succ in graph.successors(node)] or [scenario.bus.max_message_tokens]
            )
            for node in node_ids
        }

    def executor_budget(self, sender: str, receiver: str) -> int:
        for link in self.scenario.bus.links:
            if (link.source, link.target) == (sender, receiver) and link.max_message_tokens is not None:
                return link.max_message_tokens
        return self.scenario.bus.max_message_tokens

    @property
    def total_rounds(self) -> int:
        return self.scenario.evaluation.warmup_rounds + self.scenario.eval_rounds

    def round_start(self, round_index: int) -> int:
        return self.eval_start + (round_index - self.scenario.evaluation.warmup_rounds) * self.round_tokens

    def requests(self, round_index: int) -> list[NodeRoundRequest]:
        start = self.round_start(round_index)
        targets = self.observer.targets(start)
        requests = []
        for node in self.scenario.nodes:
            seen = self.observer.observe(node.id, start)
            requests.append(
                NodeRoundRequest(
                    node_id=node.id,
                    round_index=round_index,
                    control_ids=self.control_ids.get(node.id, []),
                    prefix_ids=seen.prefix_ids,
                    round_inputs=seen.round_inputs,
                    targets=targets,
                    message=node.message,
                    message_tokens=self.link_budget[node.id],
                    seed=self.scenario.seed,
                )
            )
        return requests

    def run(
        self,
        on_event: Callable[[RoundEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EngineResult:
        node_ids = self.scenario.node_ids
        books: dict[RowKey, list[RoundStats]] = {}
        for node_id in node_ids:
            for kind in ("member_plain", "member_isolated", "member_collective"):
                books[(kind, node_id)] = []
        for kind in ("ensemble_silent", "collective", "reference"):
            books[(kind, None)] = []
        missed = dict.fromkeys(node_ids, 0)
        sent = dropped = truncated = 0
        began = time.perf_counter()
        rounds_done = eval_done = 0
        eval_tokens = eval_bytes = 0
        warmup = self.scenario.evaluation.warmup_rounds
        for round_index in range(self.total_rounds):
            if should_stop is not None and should_stop():
                break
            round_began = time.perf_counter()
            start = self.round_start(round_index)
            targets = self.observer.targets(start)
            results = self.executor.run_round(round_index, self.requests(round_index))
            present = torch.tensor([results.get(n) is not None for n in node_ids])
            reference = self._reference(start, targets)
            collective_members = self._stack(results, "collective", targets)
            isolated_members = self._stack(results, "isolated", targets)
            collective = self.collective_pool.pool(collective_members, present)
            silent = self.silent_pool.pool(isolated_members, present)
            phase = "eval" if round_index >= warmup else "warmup"
            token_bytes = self.byte_lengths[start : start + self.round_tokens]
            if phase == "eval":
                eval_done += 1
                eval_tokens += len(targets)
                eval_bytes += int(token_bytes.sum())
                nan_row = torch.full((len(targets),), float("nan"))
                for node_id in node_ids:
                    result = results.get(node_id)
                    if result is None:
                        missed[node_id] += 1
                    for kind, attr in (("member_plain", "plain"), ("member_isolated", "isolated"), ("member_collective", "collective")):
                        preds = getattr(result, attr) if result is not None else None
                        if preds is None:
                            books[(kind, node_id)].append(round_stats(nan_row, targets, targets, token_bytes))
                        else:
                            books[(kind, node_id)].append(
                                round_stats(preds.target_logprob[0], preds.topk_ids[0, :, 0], targets, token_bytes)
                            )
                for kind, pooled in (("collective", collective), ("ensemble_silent", silent)):
                    books[(kind, None)].append(round_stats(pooled.target_logprob, pooled.top1, targets, token_bytes))
                books[("reference", None)].append(
                    round_stats(reference.target_logprob[0], reference.topk_ids[0, :, 0], targets, token_bytes)
                )
            messages = [m for r in results.values() if r is not None for m in r.messages]
            sent += len(messages)
            dropped += sum(m.dropped for m in messages)
            truncated += sum(m.truncated for m in messages)
            rounds_done += 1
            if on_event is not None:
                on_event(
                    self._event(round_index, phase, warmup, start, results, messages, collective, silent, reference, round_began, began)
                )
        return EngineResult(
            books=books,
            rounds_done=rounds_done,
            eval_rounds_done=eval_done,
            missed_rounds=missed,
            messages_sent=sent,
            messages_dropped=dropped,
            messages_truncated=truncated,
            wall_seconds=time.perf_counter() - began,
            eval_tokens=eval_tokens,
            eval_bytes=eval_bytes,
        )

    def _reference(self, start: int, targets: torch.Tensor) -> TokenPredictions:
        seen = self.observer.reference(start)
        bos = torch.tensor([start_token(self.reference.tokenizer)])
        pad = getattr(self.reference.tokenizer, "pad_token_id", None)
        return score_items(
            self.reference.model,
            [ScoreItem(torch.cat([bos, seen.prefix_ids]), seen.round_inputs, targets)],
            pad_id=int(pad if pad is not None else bos.item()),
            top_k=self.scenario.evaluation.top_k,
            batch_tokens=self.scenario.evaluation.batch_tokens,
        )

    def _stack(self, results: dict[str, NodeRoundResult | None], attr: str, targets: torch.Tensor) -> TokenPredictions:
        """(N, T) members in node order; an absent member gets a placeholder row (masked by `present`)."""
        rows: list[TokenPredictions] = []
        template: TokenPredictions | None = None
        for result in results.values():
            if result is not None:
                template = getattr(result, attr) or result.collective
                break
        if template is None:
            raise RuntimeError("no node answered this round")
        for node_id in self.scenario.node_ids:
            result = results.get(node_id)
            preds = getattr(result, attr) if result is not None else None
            if preds is None and result is not None:
                preds = result.collective  # isolated not requested: same context
            rows.append(preds if preds is not None else template)
        return TokenPredictions.stack(rows)

    def _event(
        self,
        round_index: int,
        phase: str,
        warmup: int,
        start: int,
        results: dict[str, NodeRoundResult | None],
        messages: list,
        collective: PooledPrediction,
        silent: PooledPrediction,
        reference: TokenPredictions,
        round_began: float,
        began: float,
    ) -> RoundEvent:
        nodes = []
        for node_id in self.scenario.node_ids:
            result = results.get(node_id)
            if result is None:
                nodes.append(NodeRound(node_id=node_id, nll_collective=None, nll_isolated=None, nll_plain=None, missed=True))
                continue
            own = [m for m in result.messages if m.sender == node_id]

            def mean_nll(preds: TokenPredictions | None) -> float | None:
                return None if preds is None else float(-preds.target_logprob.mean())

            nodes.append(
                NodeRound(
                    node_id=node_id,
                    nll_collective=mean_nll(result.collective),
                    nll_isolated=mean_nll(result.isolated),
                    nll_plain=mean_nll(result.plain),
                    inbox_tokens=result.inbox_tokens,
                    bytes_sent=sum(m.n_bytes for m in own if not m.dropped),
                    messages_sent=len(own),
                    messages_dropped=sum(m.dropped for m in own),
                    messages_truncated=sum(m.truncated for m in own),
                    last_message=result.message_text,
                )
            )
        now = time.perf_counter()
        return RoundEvent(
            run_id=self.run_id,
            round_index=round_index,
            phase="eval" if phase == "eval" else "warmup",
            eval_round=round_index - warmup if phase == "eval" else None,
            start_token=start,
            n_tokens=self.round_tokens,
            nodes=nodes,
            messages=messages,
            nll_collective=_nanmean(collective.target_logprob),
            nll_silent=_nanmean(silent.target_logprob),
            nll_reference=float(-reference.target_logprob.mean()),
            wall_seconds=now - round_began,
            elapsed_seconds=now - began,
        )


def _nanmean(target_logprob: torch.Tensor) -> float:
    return float(-target_logprob.nanmean()) if not bool(torch.isnan(target_logprob).all()) else float("nan")
