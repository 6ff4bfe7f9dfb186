"""Where a volunteer's model comes from and where its rounds are computed (`NodeBackend`).

`SoloBackend` is one node in its own process: its own copy of the model, its one request
per round; a host's shared models and batched rounds are `host_batch.HostBackend`. The published
scenario is parsed here once per process (`published_scenario`), however many of a host's
nodes receive it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from collective.distributed.compute_thread import on_compute_thread
from collective.distributed.limits import node_request_bound
from collective.distributed.protocol import Rejected, tokenizer_digest
from collective.run.node import NodeRoundRequest, NodeRoundResult, compute_rounds
from collective.scenario import EvaluationSpec, Scenario, ScenarioError, parse_scenario


@dataclass
class NodeModel:
    """A loaded model as a volunteer uses it (a host shares one among its nodes)."""

    model: Any
    tokenizer: Any
    name: str
    vocab_size: int
    device: str

    @functools.cached_property
    def digest(self) -> str:
        """`tokenizer_digest` of its tokenizer, once per model (a host's nodes share it)."""
        return tokenizer_digest(self.tokenizer)


def load_node_model(ref: str, device: str, dtype: str, cache_dir: Path | None) -> NodeModel:
    from collective.lm.models import load_model

    loaded = load_model(ref, device=device, dtype=dtype, cache_dir=cache_dir)
    return NodeModel(loaded.model, loaded.tokenizer, loaded.name, loaded.vocab_size, str(loaded.device))


@functools.lru_cache(maxsize=4)
def published_scenario(scenario_yaml: str, run_id: str) -> tuple[Scenario, int]:
    """The run's published scenario, parsed and validated once per process however many of
    a host's nodes receive it, and the largest request envelope a node of it takes. Raises
    `Rejected` when it does not validate."""
    import yaml

    try:
        scenario = parse_scenario(yaml.safe_load(scenario_yaml), source=f"run {run_id}")
    except (ScenarioError, ValueError) as exc:
        raise Rejected("malformed", f"the published scenario does not validate: {exc}") from None
    return scenario, node_request_bound(scenario)


class NodeBackend(Protocol):
    """Where a volunteer's model comes from and where its rounds are computed."""

    async def load(self, ref: str, device: str, dtype: str) -> NodeModel: ...

    async def compute(
        self, node_id: str, loaded: NodeModel, request: NodeRoundRequest, evaluation: EvaluationSpec
    ) -> NodeRoundResult: ...


@dataclass(frozen=True)
class SoloBackend:
    """One node in its own process: its own copy of the model, its one request per round."""

    cache_dir: Path | None = None

    async def load(self, ref: str, device: str, dtype: str) -> NodeModel:
        return await on_compute_thread(load_node_model, ref, device, dtype, self.cache_dir)

    async def compute(self, node_id: str, loaded: NodeModel, request: NodeRoundRequest, evaluation: EvaluationSpec) -> NodeRoundResult:
        (result,) = await on_compute_thread(
            compute_rounds, loaded.model, loaded.tokenizer, [request], top_k=evaluation.top_k, batch_tokens=evaluation.batch_tokens
        )
        return result
