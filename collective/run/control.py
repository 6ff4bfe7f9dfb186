"""Controllers in a run: search each node's control prompt on the train part only.

`search_controls(prepared)` fills `prepared.control_ids` for every node whose controller
is `gcg` (none and fixed need no search). Training rounds are the last `train_rounds`
rounds of the train part; the eval part is never read.

- `objective: local`: node i's own NLL over the training rounds in its isolated context
  [bos][u_i][view] (no messages), one GCG search.
- `objective: collective`: coordinate descent. For each sweep, for each such node in
  order: run the collective over the training rounds with every current prompt, record
  node i's inbox and every other member's predictions, then search u_i to minimise the
  collective's NLL with those held fixed. The pool in the objective is the scenario's
  aggregator (mean and weighted as a uniform linear pool, logpool as a geometric pool;
  readout: node i's own NLL if it is the readout node, else the local objective, since
  then u_i reaches the answer only through messages, which have no gradient).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from collective.lm.predictions import TokenPredictions
from collective.run.aggregate import log_tail_share
from collective.run.engine import EmbeddedExecutor, RoundEngine
from collective.run.node import NodeRoundRequest, NodeRoundResult, start_token
from collective.run.observation import Observer
from collective.run.runner import Prepared, RunError, embedded_executor
from collective.scenario import GCGController, Scenario
from collective.seeding import derive_seed
from controllers import GCGConfig, MeanObjective, run_gcg, stream_objective
from controllers.filters import retokenizes

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (node_id, step, total_steps)


@dataclass(frozen=True)
class ControlSearch:
    node_id: str
    objective: str
    control_ids: list[int]
    control_text: str
    loss: float
    initial_loss: float
    steps: int
    wall_seconds: float


def training_scenario(scenario: Scenario, train_rounds: int) -> Scenario:
    """The same scenario with its eval part moved onto the last rounds of the train part."""
    span = train_rounds * scenario.bus.round_tokens
    corpus = scenario.corpus.model_copy(
        update={"train_tokens": scenario.corpus.train_tokens - span, "eval_tokens": span}
    )
    return scenario.model_copy(update={"corpus": corpus})


def _train_rounds(scenario: Scenario) -> int:
    return max(n.controller.train_rounds for n in scenario.nodes if isinstance(n.controller, GCGController))


def check_train_part(scenario: Scenario) -> None:
    rounds = _train_rounds(scenario)
    needed = scenario.max_reach + (scenario.evaluation.warmup_rounds + rounds) * scenario.bus.round_tokens
    if scenario.corpus.train_tokens < needed:
        raise RunError(
            f"corpus.train_tokens: found {scenario.corpus.train_tokens}; the controllers' {rounds} training "
            f"rounds plus warm-up and the longest view need {needed}"
        )


def _initial_ids(spec: GCGController, tokenizer: object, node_id: str = "?") -> list[int]:
    """`init` cut or padded with " x" to `tokens` ids that survive decoding and re-encoding
    (the re-tokenization filter would otherwise reject nearly every candidate)."""
    encode = tokenizer.encode  # type: ignore[attr-defined]
    ids = list(encode(spec.init, add_special_tokens=False))
    filler = int(encode(" x", add_special_tokens=False)[-1])  # " x" after any text stays one token
    ids = (ids + [filler] * spec.tokens)[: spec.tokens]
    if spec.retokenize_filter and not bool(retokenizes(tokenizer, torch.tensor([ids]))[0]):  # type: ignore[arg-type]
        raise RunError(
            f"nodes.{node_id}.controller.init: {spec.init!r} cut or padded to {spec.tokens} tokens reads back as "
            f"other tokens, which the re-tokenization filter rejects; pick an init that does not "
            f"(e.g. {' '.join(['x'] * spec.tokens)!r}) or set retokenize_filter: false"
        )
    return ids


def _gcg_config(spec: GCGController, seed: int) -> GCGConfig:
    return GCGConfig(
        num_tokens=spec.tokens,
        num_steps=spec.steps,
        search_width=spec.search_width,
        topk=spec.topk,
        n_replace=spec.n_replace,
        buffer_size=spec.buffer_size,
        early_stop=False,
        filter_ascii=spec.ascii_only,
        filter_retokenize=spec.retokenize_filter,
        seed=seed,
    )


def dense_log_probs(preds: TokenPredictions, member: int) -> torch.Tensor:
    """(T, V) log-probs of one member rebuilt from its record (tail spread uniformly)."""
    tail = log_tail_share(preds.topk_logprobs[member], preds.vocab_size)  # (T,)
    dense = tail[:, None].expand(-1, preds.vocab_size).clone()  # (T, V)
    return dense.scatter_(1, preds.topk_ids[member], preds.topk_logprobs[member])


def _pool_loss(
    kind: str, member: int, others: TokenPredictions, targets: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Collective NLL as a function of node `member`'s log-probs (B, n, V), others fixed.

    others: the record of all N members for this round (row `member` is ignored).
    """
    n_members = others.n_members
    rest = [j for j in range(n_members) if j != member]
    weight = 1.0 / n_members
    if kind == "logpool":
        fixed = torch.zeros(others.n_positions, others.vocab_size)  # (n, V)
        for j in rest:
            fixed += weight * dense_log_probs(others, j)

        def geometric(log_probs: torch.Tensor) -> torch.Tensor:
            mixed = weight * log_probs.float() + fixed.to(log_probs.device)  # (B, n, V)
            log_pool = mixed - torch.logsumexp(mixed, dim=-1, keepdim=True)
            picked = log_pool.gather(-1, targets.to(log_probs.device)[None, :, None].expand(len(log_probs), -1, 1))
            return -picked.squeeze(-1).mean(-1)  # (B,)

        return geometric
    other_lp = others.target_logprob[rest]  # (N-1, n)

    def linear(log_probs: torch.Tensor) -> torch.Tensor:
        own = log_probs.float().gather(-1, targets.to(log_probs.device)[None, :, None].expand(len(log_probs), -1, 1))
        own = own.squeeze(-1)  # (B, n)
        stacked = torch.cat([own[:, None, :], other_lp.to(own.device)[None].expand(len(own), -1, -1)], dim=1)
        pooled = torch.logsumexp(stacked + math.log(weight), dim=1)  # (B, n)
        return -pooled.mean(-1)

    return linear


class _Recorder(EmbeddedExecutor):
    """The embedded executor, keeping each round's requests (with inboxes) and results."""

    def __init__(self, inner: EmbeddedExecutor) -> None:
        super().__init__(inner.scenario, inner.models, inner.bus)
        self.rounds: list[tuple[list[NodeRoundRequest], dict[str, NodeRoundResult | None]]] = []

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> dict[str, NodeRoundResult | None]:
        from dataclasses import replace

        with_inbox = [replace(r, inbox_text=self.bus.render_inbox(r.node_id, round_index)) for r in requests]
        results = super().run_round(round_index, requests)
        self.rounds.append((with_inbox, results))
        return results


def _record(prepared: Prepared, train: Scenario) -> _Recorder:
    span = train.corpus.train_tokens + train.corpus.eval_tokens
    sub = Prepared(
        train, prepared.models, prepared.graph, prepared.stream[:span], prepared.byte_lengths[:span],
        prepared.placeholder_ids, prepared.control_ids,
    )
    inner = embedded_executor(sub)
    assert isinstance(inner, EmbeddedExecutor)
    recorder = _Recorder(inner)
    engine = RoundEngine(
        train, prepared.graph, sub.stream, sub.byte_lengths, recorder, sub.lm(train.reference_model),
        prepared.control_ids, prepared.placeholder_ids, "controller-training",
    )
    engine.run()
    recorder.rounds = recorder.rounds[train.evaluation.warmup_rounds :]
    return recorder


def search_controls(prepared: Prepared, progress: Progress | None = None) -> list[ControlSearch]:
    """Search every gcg node's prompt on the train part; updates prepared.control_ids."""
    scenario = prepared.scenario
    gcg_nodes = [n for n in scenario.nodes if isinstance(n.controller, GCGController)]
    if not gcg_nodes:
        return []
    check_train_part(scenario)
    train = training_scenario(scenario, _train_rounds(scenario))
    observer = Observer(
        prepared.stream, scenario.nodes, seed=scenario.seed, round_tokens=scenario.bus.round_tokens,
        context_tokens=scenario.evaluation.context_tokens, placeholder_ids=prepared.placeholder_ids,
    )
    starts = [train.corpus.train_tokens + r * train.bus.round_tokens for r in range(train.eval_rounds)]
    node_index = {node_id: i for i, node_id in enumerate(scenario.node_ids)}
    sweeps = max(n.controller.sweeps for n in gcg_nodes if isinstance(n.controller, GCGController))
    found: dict[str, ControlSearch] = {}
    for sweep in range(sweeps):
        for node in gcg_nodes:
            spec = node.controller
            assert isinstance(spec, GCGController)
            if sweep >= spec.sweeps or (spec.objective == "local" and sweep > 0):
                continue
            loaded = prepared.models[node.model]
            model, tokenizer = loaded.model, loaded.tokenizer
            bos = [start_token(tokenizer)]
            parts = []
            kind = scenario.aggregator.kind
            collective = spec.objective == "collective" and not (
                kind == "readout" and scenario.aggregator.node != node.id
            )
            recorder = _record(prepared, train) if collective else None
            for r, start in enumerate(starts[: spec.train_rounds]):
                seen = observer.observe(node.id, start)
                targets = observer.targets(start)
                if recorder is None or kind == "readout":
                    inbox: list[int] = []
                    if recorder is not None:
                        request = next(q for q in recorder.rounds[r][0] if q.node_id == node.id)
                        inbox = list(tokenizer.encode(request.inbox_text, add_special_tokens=False)) if request.inbox_text else []
                    rest = inbox + seen.prefix_ids.tolist() + targets.tolist()
                    parts.append(stream_objective(model, rest, offset=len(rest) - len(targets), prefix_ids=bos))
                    continue
                requests, results = recorder.rounds[r]
                request = next(q for q in requests if q.node_id == node.id)
                inbox = list(tokenizer.encode(request.inbox_text, add_special_tokens=False)) if request.inbox_text else []
                members = TokenPredictions.stack(
                    [(results[n] or results[node.id]).collective for n in scenario.node_ids]  # type: ignore[union-attr]
                )
                rest = inbox + seen.prefix_ids.tolist() + targets.tolist()
                parts.append(
                    stream_objective(
                        model, rest, offset=len(rest) - len(targets), prefix_ids=bos,
                        log_prob_loss=_pool_loss(kind, node_index[node.id], members, targets),
                    )
                )
            objective = MeanObjective(parts)
            init = prepared.control_ids.get(node.id) or _initial_ids(spec, tokenizer, node.id)
            initial_loss = float(objective.scores(torch.tensor([init], device=model.device)).loss[0])
            config = _gcg_config(spec, derive_seed(scenario.seed, "gcg", node.id, sweep) % (2**31))

            def tick(step: int, total: int, node_id: str = node.id) -> None:
                if progress is not None:
                    progress(node_id, step, total)

            result = run_gcg(model, tokenizer, objective, config, init_ids=init, progress=tick)
            prepared.control_ids[node.id] = list(result.best_ids)
            found[node.id] = ControlSearch(
                node.id, spec.objective if collective else "local", list(result.best_ids), result.best_text,
                result.best_loss, initial_loss, result.steps, result.wall_time_s,
            )
            log.info("node %s: control %r, train loss %.4f -> %.4f", node.id, result.best_text, initial_loss, result.best_loss)
    return list(found.values())


def load_controls(run_dir: Path, scenario: Scenario) -> dict[str, list[int]]:
    """Control prompts an earlier run found (`--controllers-from RUN_DIR`)."""
    path = run_dir / "controls.json"
    if not path.exists():
        raise RunError(f"{path}: no such file; --controllers-from needs a run folder that holds controls.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ids = {str(k): [int(t) for t in v] for k, v in data["control_ids"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: not a controls file written by collective ({exc})") from None
    unknown = sorted(set(ids) - set(scenario.node_ids))
    if unknown:
        raise RunError(f"{path}: prompts for nodes {unknown} that this scenario does not have")
    return ids
