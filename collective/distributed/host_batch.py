"""A host's shared models and batched rounds: `HostBackend`, the `NodeBackend` of a host's nodes.

One copy per model for all the host's nodes; each round's requests of all its nodes computed
with one `compute_rounds` call per model, its nodes in the scenario's order, as the embedded
runtime does (so a host that holds every node gives the embedded numbers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from collective.distributed.backend import NodeModel, SoloBackend
from collective.distributed.compute_thread import on_compute_thread
from collective.run.node import NodeRoundRequest, NodeRoundResult, compute_rounds
from collective.scenario import EvaluationSpec

BATCH_GRACE_S = 0.5  # after a round's first request, how long a batch waits for the host's other nodes


@dataclass(eq=False)
class _Batch:
    round_index: int
    evaluation: EvaluationSpec
    missing: set[str]  # the nodes expected when the batch opened that have not asked yet
    wanted: dict[str, tuple[NodeModel, NodeRoundRequest, asyncio.Future[NodeRoundResult]]] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


class HostBackend:
    """One copy per model for all the host's nodes; a round's requests batched per model.

    A batch goes when every node in `expected()` (asked once, when the round's first request
    opens the batch) has asked, or BATCH_GRACE_S after that first request (a node welcomed
    mid-round is not asked until the next one). Each request costs O(1), so a round of N nodes
    costs O(N), not O(N^2)."""

    def __init__(
        self,
        cache_dir: Path | None,
        expected: Callable[[], set[str]],
        rank: Callable[[str], int],
        report: Callable[[str], None],
        grace_s: float = BATCH_GRACE_S,
    ) -> None:
        self.solo = SoloBackend(cache_dir)
        self.expected, self.rank, self.report, self.grace_s = expected, rank, report, grace_s
        self._models: dict[tuple[str, str, str], asyncio.Future[NodeModel]] = {}
        self._open: dict[int, _Batch] = {}
        self._running: set[asyncio.Future[None]] = set()

    async def load(self, ref: str, device: str, dtype: str) -> NodeModel:
        key = (ref, device, dtype)
        if key not in self._models:
            self._models[key] = asyncio.ensure_future(self.solo.load(ref, device, dtype))
        return await asyncio.shield(self._models[key])

    @property
    def copies(self) -> int:
        return len(self._models)

    async def compute(self, node_id: str, loaded: NodeModel, request: NodeRoundRequest, evaluation: EvaluationSpec) -> NodeRoundResult:
        batch = self._open.get(request.round_index)
        if batch is None:
            batch = self._open[request.round_index] = _Batch(request.round_index, evaluation, self.expected())
        future: asyncio.Future[NodeRoundResult] = asyncio.get_running_loop().create_future()
        batch.wanted[node_id] = (loaded, request, future)
        batch.missing.discard(node_id)
        if not batch.missing:
            self._launch(batch)
        elif batch.timer is None:
            batch.timer = asyncio.get_running_loop().call_later(self.grace_s, self._launch, batch)
        return await future

    def _launch(self, batch: _Batch) -> None:
        if self._open.get(batch.round_index) is batch:
            del self._open[batch.round_index]
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: _Batch) -> None:
        began = time.perf_counter()
        try:
            results, groups = await on_compute_thread(self._compute, batch)
        except Exception as exc:  # each node's round fails with it (and stops the host with the reason)
            for _, _, future in batch.wanted.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for node_id, (_, _, future) in batch.wanted.items():
            if future.done():
                continue
            if node_id in results:
                future.set_result(results[node_id])
            else:  # never expected: compute_rounds answers every request; fail the node, never hang it
                future.set_exception(RuntimeError(f"round {batch.round_index}: the batch returned no result for {node_id}"))
        took = time.perf_counter() - began
        self.report(f"round {batch.round_index}: {', '.join(n for g in groups for n in g)} in {len(groups)} batch(es), {took:.2f} s")

    def _compute(self, batch: _Batch) -> tuple[dict[str, NodeRoundResult], list[list[str]]]:
        """One `compute_rounds` call per model, its nodes in the scenario's order (as embedded)."""
        by_model: dict[int, list[str]] = {}
        for node_id in sorted(batch.wanted, key=self.rank):
            by_model.setdefault(id(batch.wanted[node_id][0].model), []).append(node_id)
        evaluation, results = batch.evaluation, {}
        for group in by_model.values():
            loaded = batch.wanted[group[0]][0]
            requests = [batch.wanted[n][1] for n in group]
            for result in compute_rounds(
                loaded.model, loaded.tokenizer, requests, top_k=evaluation.top_k, batch_tokens=evaluation.batch_tokens
            ):
                results[result.node_id] = result
        return results, list(by_model.values())
