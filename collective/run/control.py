"""Controllers in a run: search each node's control prompt on the train part only.

`search_controls(prepared)` fills `prepared.control_ids` for every node whose controller
is `gcg` (none and fixed need no search). The end of the train part is laid out as
[... training rounds][validation slice][eval part]: the validation slice is the last
`validation_rounds` rounds of the train part (the largest over the nodes), and a node's
training rounds are the `train_rounds` rounds just before it (the scenario's checks make
sure the train part holds both, after the warm-up rounds and the longest view); the eval
part is never read. In each round, the node reads what it would read if that round were
scored: its view of the text before the round and its reading of the round (a masked
view's placeholders included), and is scored on the round's true tokens.

GCG lowers the objective on the training rounds. After each step, the same objective on
the node's last `validation_rounds` rounds of the slice scores the lowest-loss
prompt found so far (GCG's best, not the step's own best): the search returns the prompt
with the lowest validation loss (the initial one included, so it never returns a prompt
worse on the slice than the one it started from) and stops after `patience` steps without
a validation improvement (`controllers.held_out.HeldOut`; the speak objective's search
stops and chooses the same way).

- `objective: local`: node i's own NLL over the training rounds in its isolated context
  [bos][u_i][view] (no messages), one GCG search.
- `objective: collective`: coordinate descent. For each sweep, for each such node in
  order: run the collective over the training rounds with every current prompt, record
  node i's inbox and every other member's predictions in collective (only those rows and
  the messages are computed; a recording is run again only when a prompt changed since
  the last one), then search u_i to minimise the collective's NLL with those held fixed. The pool in the objective is the run's own pool
  (`collective.run.pools`) with uniform weights: a linear pool for mean and weighted, a
  geometric one for logpool, applied to the members' records with node i's record built
  from its live log-probabilities (its top-K and its exact target log-probability, which
  only a linear pool reads), so the objective is the NLL the run's collective would report
  (for weighted, with uniform rather than the learned weights). Readout: node i's own NLL if it
  is the readout node, else the local objective, since then u_i reaches the answer only
  through messages, which have no gradient.
- `objective: speak`: node i's out-neighbours' NLL in collective through the messages it
  writes, every candidate scored end to end on the collective recorded with the current
  prompts (`collective.run.speaker`), in coordinate-descent sweeps like `collective`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from collective.lm.codec import TextCodec, start_token
from collective.lm.predictions import TokenPredictions
from collective.records import Controls, ControlSearch, MessageRecord
from collective.run.engine import EmbeddedExecutor, Results, RoundEngine
from collective.run.node import NodeRoundRequest, text_ids
from collective.run.observation import Observer
from collective.run.pools import pool_linear, pool_log, uniform_weights
from collective.run.prepared import Prepared, RunError
from collective.run.speaker import Progress, node_progress, search_speaker
from collective.scenario import GCGController, NodeSpec, Scenario
from collective.seeding import derive_seed
from controllers import GCGConfig, MeanObjective, run_gcg, stream_objective
from controllers.filters import retokenizes
from controllers.held_out import HeldOut
from controllers.objectives import LogProbLoss, SequenceObjective

log = logging.getLogger(__name__)


def training_scenario(scenario: Scenario, train_rounds: int) -> Scenario:
    """The same scenario with its eval part moved onto the last rounds of the train part."""
    span = train_rounds * scenario.bus.round_tokens
    corpus = scenario.corpus.model_copy(
        update={"train_tokens": scenario.corpus.train_tokens - span, "eval_tokens": span}
    )
    return scenario.model_copy(update={"corpus": corpus})


def _gcg_specs(scenario: Scenario) -> list[GCGController]:
    return [n.controller for n in scenario.nodes if isinstance(n.controller, GCGController)]


def _initial_ids(spec: GCGController, tokenizer: PreTrainedTokenizerBase, node_id: str = "?") -> list[int]:
    """`init` cut or padded with " x" to `tokens` ids that survive decoding and re-encoding
    (the re-tokenization filter would otherwise reject nearly every candidate)."""
    ids = list(tokenizer.encode(spec.init, add_special_tokens=False))
    filler = int(tokenizer.encode(" x", add_special_tokens=False)[-1])  # " x" after any text stays one token
    ids = (ids + [filler] * spec.tokens)[: spec.tokens]
    if spec.retokenize_filter and not bool(retokenizes(tokenizer, torch.tensor([ids]))[0]):
        raise RunError(
            f"nodes.{node_id}.controller.init: {spec.init!r} cut or padded to {spec.tokens} tokens reads back as "
            f"other tokens, which the re-tokenization filter rejects; pick an init that does not "
            f"(e.g. {' '.join(['x'] * spec.tokens)!r}) or set retokenize_filter: false"
        )
    return ids


def _gcg_config(spec: GCGController, seed: int) -> GCGConfig:
    return GCGConfig(
        num_tokens=spec.tokens, num_steps=spec.steps, search_width=spec.search_width, topk=spec.topk,
        n_replace=spec.n_replace, buffer_size=spec.buffer_size, early_stop=False,
        filter_ascii=spec.ascii_only, filter_retokenize=spec.retokenize_filter, seed=seed,
    )


def with_member(members: TokenPredictions, member: int, log_probs: torch.Tensor, targets: torch.Tensor) -> TokenPredictions:
    """The members' records over B candidate versions of member `member`, as one record of
    B * n positions: candidate b's positions are b*n .. b*n + n - 1.

    members: N members at n positions (row `member` is replaced). log_probs: (B, n, V) the
    member's log-probabilities under each candidate; targets: (n,). Keeps autograd.
    """
    batch, n_positions, _ = log_probs.shape
    k = int(members.topk_ids.shape[-1])
    own_target = log_probs.gather(-1, targets.to(log_probs.device).expand(batch, -1).unsqueeze(-1))  # (B, n, 1)
    own_topk, own_ids = log_probs.topk(k, dim=-1)  # (B, n, K)

    def replaced(rows: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """rows (N, n, ...) repeated for each candidate, (N, B*n, ...), with row `member` = own."""
        repeated = rows.repeat(1, batch, *([1] * (rows.dim() - 2)))
        own = own.reshape(1, batch * n_positions, *rows.shape[2:]).cpu()
        return torch.cat([repeated[:member], own, repeated[member + 1 :]])

    return TokenPredictions(
        replaced(members.target_logprob, own_target), replaced(members.topk_ids, own_ids),
        replaced(members.topk_logprobs, own_topk), members.vocab_size,
    )


def _pool_loss(kind: str, member: int, members: TokenPredictions, targets: torch.Tensor) -> LogProbLoss:
    """Collective NLL (B,) as a function of node `member`'s log-probs (B, n, V), the other
    members' records of this round held fixed: the run's pool with uniform weights."""
    weights = uniform_weights(members.n_members)

    def loss(log_probs: torch.Tensor) -> torch.Tensor:
        batch, n_positions, _ = log_probs.shape
        record = with_member(members, member, log_probs.float(), targets)
        if kind == "logpool":
            pooled = pool_log(record, weights, targets.cpu().repeat(batch))
        else:
            pooled = pool_linear(record, weights)
        return -pooled.target_logprob.view(batch, n_positions).mean(-1).to(log_probs.device)

    return loss


class _Recorder(EmbeddedExecutor):
    """The embedded executor, keeping each round's requests (with inboxes), results and each
    node's visible inbox messages (what a speaker's objective replaces)."""

    def __init__(self, inner: EmbeddedExecutor) -> None:
        super().__init__(inner.scenario, inner.models, inner.bus)
        self.rounds: list[tuple[list[NodeRoundRequest], Results]] = []
        self.visible: list[dict[str, list[MessageRecord]]] = []

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> Results:
        with_inbox = self.with_inboxes(round_index, requests)
        self.visible.append({q.node_id: self.bus.inboxes[q.node_id].visible(round_index) for q in requests})
        results = super().run_round(round_index, requests)
        self.rounds.append((with_inbox, results))
        return results

    def inbox_ids(self, train_round: int, node_id: str, tokenizer: TextCodec) -> list[int]:
        """What node `node_id` read in its inbox in the `train_round`-th training round."""
        request = next(q for q in self.rounds[train_round][0] if q.node_id == node_id)
        return text_ids(tokenizer, request.inbox_text)

    def members(self, train_round: int, node_ids: list[str]) -> TokenPredictions:
        """(N, n) every member's row in collective in that training round, in node order."""
        results = self.rounds[train_round][1]
        rows = [results[n] for n in node_ids]
        if any(row is None for row in rows):
            raise RunError("a node missed a controller-training round")  # the embedded executor never misses
        return TokenPredictions.stack([row.collective for row in rows if row is not None])


def _record(prepared: Prepared, train: Scenario) -> _Recorder:
    """Run the collective over the training rounds with the current prompts, recording it.
    Only what the controllers read is computed: each node's row in collective and its
    message (no isolated or plain rows, no reference, no pools)."""
    span = train.corpus.train_tokens + train.corpus.eval_tokens
    sub = Prepared(
        train, prepared.models, prepared.graph, prepared.stream[:span], prepared.byte_lengths[:span],
        prepared.placeholder_ids, prepared.control_ids,
    )
    recorder = _Recorder(EmbeddedExecutor.from_prepared(sub))
    engine = RoundEngine.from_prepared(sub, recorder, "controller-training")
    for round_index in range(engine.total_rounds):
        requests = [replace(q, want_isolated=False, want_plain=False) for q in engine.requests(round_index)]
        recorder.run_round(round_index, requests)
    recorder.rounds = recorder.rounds[train.evaluation.warmup_rounds :]
    recorder.visible = recorder.visible[train.evaluation.warmup_rounds :]
    return recorder


@dataclass
class _Recordings:
    """The latest recording and the prompts it ran with: a search whose prompts are the same
    (no search in between changed one) reads it again instead of running the rounds again."""

    prompts: dict[str, tuple[int, ...]] | None = None
    recorder: _Recorder | None = None

    def of(self, prepared: Prepared, train: Scenario) -> _Recorder:
        prompts = {node_id: tuple(ids) for node_id, ids in prepared.control_ids.items()}
        if self.recorder is None or prompts != self.prompts:
            self.recorder, self.prompts = _record(prepared, train), prompts
        return self.recorder


@dataclass(frozen=True)
class _Training:
    """The controllers' rounds at the end of the train part: the training rounds (as many as
    the largest `train_rounds`), then the validation slice (the last `n_validation` rounds,
    the largest `validation_rounds`). The scenario whose eval part they all are, where each
    starts, and what every node sees of them."""

    scenario: Scenario
    starts: list[int]
    observer: Observer
    n_validation: int = 0

    @classmethod
    def of(cls, prepared: Prepared) -> _Training:
        scenario = prepared.scenario
        specs = _gcg_specs(scenario)
        n_validation = max((spec.validation_rounds for spec in specs), default=0)
        train = training_scenario(scenario, max(spec.train_rounds for spec in specs) + n_validation)
        observer = Observer(
            prepared.stream, scenario.nodes, seed=scenario.seed, round_tokens=scenario.bus.round_tokens,
            context_tokens=scenario.evaluation.context_tokens, placeholder_ids=prepared.placeholder_ids,
        )
        starts = [train.corpus.train_tokens + r * train.bus.round_tokens for r in range(train.eval_rounds)]
        return cls(train, starts, observer, n_validation)

    def _rounds(self, first: int, n_rounds: int) -> list[tuple[int, int]]:
        return [(first + r, self.starts[first + r]) for r in range(n_rounds)]

    def last(self, n_rounds: int) -> list[tuple[int, int]]:
        """The last `n_rounds` training rounds before the validation slice: (index among all
        rounds here, start) each."""
        return self._rounds(len(self.starts) - self.n_validation - n_rounds, n_rounds)

    def validation(self, n_rounds: int) -> list[tuple[int, int]]:
        """The last `n_rounds` rounds of the validation slice (the train part's last rounds):
        (index among all rounds here, start) each."""
        if n_rounds > self.n_validation:
            raise ValueError(f"{n_rounds} validation rounds asked of a slice of {self.n_validation}")
        return self._rounds(len(self.starts) - n_rounds, n_rounds)


@dataclass(frozen=True)
class _Seen:
    """A view and a round as `ByteMode.request` re-encodes them (no round_bytes kept)."""

    prefix_ids: torch.Tensor
    round_inputs: torch.Tensor
    targets: torch.Tensor
    round_bytes: bytes | None = None


def _objective_parts(
    prepared: Prepared, node: NodeSpec, training: _Training, rounds: list[tuple[int, int]], recorder: _Recorder | None
) -> list[SequenceObjective]:
    """One objective per round of `rounds` (`training.last(n)` or `training.validation(n)`):
    node `node`'s NLL over the round's true tokens after [bos][control][inbox][view][its
    reading of the round], or the collective's NLL through it (see the module docstring).
    The layout is the node's row in `collective.run.node` (isolated when there is no
    recorder, else in collective)."""
    scenario = prepared.scenario
    kind = scenario.aggregator.kind
    loaded = prepared.models[node.model]
    parts = []
    for r, start in rounds:
        seen = training.observer.observe(node.id, start)
        targets = training.observer.targets(start)
        if prepared.byte_mode is not None:  # a local search in a byte-unit run: the node's own tokens
            request = prepared.byte_mode.request(_Seen(seen.prefix_ids, seen.round_inputs, targets), node.model)
            seen, targets = request, request.targets
        inbox = recorder.inbox_ids(r, node.id, loaded.tokenizer) if recorder is not None else []
        pooled: LogProbLoss | None = None
        if recorder is not None and kind != "readout":
            members = recorder.members(r, scenario.node_ids)
            pooled = _pool_loss(kind, scenario.node_index(node.id), members, targets)
        rest = inbox + seen.prefix_ids.tolist() + seen.round_inputs.tolist()
        parts.append(
            stream_objective(
                loaded.model, rest, offset=len(rest) - len(targets), prefix_ids=[start_token(loaded.tokenizer)],
                log_prob_loss=pooled, labels=targets.tolist(),
            )
        )
    return parts


def _loss(objective: MeanObjective, ids: list[int]) -> float:
    """The objective's loss of one prompt."""
    return float(objective.scores(torch.tensor([ids], device=objective.model.device)).loss[0])


def _validation(
    prepared: Prepared, node: NodeSpec, training: _Training, recorder: _Recorder | None, init: list[int]
) -> HeldOut | None:
    """Node `node`'s objective on its validation rounds, as early stopping (None without any)."""
    spec = node.controller
    assert isinstance(spec, GCGController)
    if spec.validation_rounds == 0:
        return None
    rounds = training.validation(spec.validation_rounds)
    objective = MeanObjective(_objective_parts(prepared, node, training, rounds, recorder))
    return HeldOut(lambda ids: _loss(objective, ids), init, spec.patience, spec.steps)


def _search_node(
    prepared: Prepared, node: NodeSpec, sweep: int, training: _Training, recordings: _Recordings, progress: Progress | None
) -> ControlSearch:
    """One GCG search of node `node`'s prompt; updates prepared.control_ids."""
    scenario = prepared.scenario
    spec = node.controller
    assert isinstance(spec, GCGController)
    collective = spec.objective == "collective" and not (
        scenario.aggregator.kind == "readout" and scenario.aggregator.node != node.id
    )
    recorder = recordings.of(prepared, training.scenario) if collective else None
    objective = MeanObjective(_objective_parts(prepared, node, training, training.last(spec.train_rounds), recorder))
    loaded = prepared.models[node.model]
    init = prepared.control_ids.get(node.id) or _initial_ids(spec, loaded.tokenizer, node.id)
    initial_loss = _loss(objective, init)
    validation = _validation(prepared, node, training, recorder, init)
    config = _gcg_config(spec, derive_seed(scenario.seed, "gcg", node.id, sweep) % (2**31))
    result = run_gcg(
        loaded.model, loaded.tokenizer, objective, config, init_ids=init, progress=node_progress(progress, node.id),
        on_step=validation,
    )
    ids, loss = list(result.best_ids), result.best_loss
    if validation is not None and validation.best_ids != ids:
        ids = validation.best_ids
        loss = _loss(objective, ids)
    prepared.control_ids[node.id] = ids
    search = ControlSearch(
        node_id=node.id, objective="collective" if collective else "local", control_ids=ids,
        control_text=str(loaded.tokenizer.decode(ids)), loss=loss, initial_loss=initial_loss, steps=result.steps,
        wall_seconds=result.wall_time_s,
        validation_loss=None if validation is None else validation.best_loss,
        initial_validation_loss=None if validation is None else validation.initial_loss,
        stopped_at_step=None if validation is None else validation.stopped_at,
    )
    _log_search(search)
    return search


def _log_search(search: ControlSearch) -> None:
    held_out = ""
    if search.validation_loss is not None:
        held_out = f", validation loss {search.initial_validation_loss:.4f} -> {search.validation_loss:.4f}"
    if search.stopped_at_step is not None:
        held_out += f", stopped early after step {search.stopped_at_step}"
    log.info(
        "node %s: control %r, train loss %.4f -> %.4f%s",
        search.node_id, search.control_text, search.initial_loss, search.loss, held_out,
    )


def _search_speaker(
    prepared: Prepared, node: NodeSpec, sweep: int, training: _Training, recordings: _Recordings, progress: Progress | None
) -> ControlSearch:
    """A speaker's search (`collective.run.speaker`), on the collective recorded with its
    current prompt (its initial one at first) and every other prompt in place."""
    spec = node.controller
    assert isinstance(spec, GCGController)
    init = prepared.control_ids.get(node.id) or _initial_ids(spec, prepared.models[node.model].tokenizer, node.id)
    prepared.control_ids[node.id] = init
    rounds = ([r for r, _ in training.last(spec.train_rounds)], [r for r, _ in training.validation(spec.validation_rounds)])
    config = _gcg_config(spec, derive_seed(prepared.scenario.seed, "gcg", node.id, sweep) % (2**31))
    recorder = recordings.of(prepared, training.scenario)
    return search_speaker(prepared, node, recorder, rounds, init, config, spec.patience, progress)


def search_controls(prepared: Prepared, progress: Progress | None = None) -> list[ControlSearch]:
    """Search every gcg node's prompt on the train part; updates prepared.control_ids."""
    scenario = prepared.scenario
    gcg_nodes = [n for n in scenario.nodes if isinstance(n.controller, GCGController)]
    if not gcg_nodes:
        return []
    training = _Training.of(prepared)
    sweeps = max(n.controller.sweeps for n in gcg_nodes if isinstance(n.controller, GCGController))
    found: dict[str, ControlSearch] = {}
    recordings = _Recordings()
    for sweep in range(sweeps):
        for node in gcg_nodes:
            spec = node.controller
            assert isinstance(spec, GCGController)
            if sweep < spec.sweeps and (spec.objective != "local" or sweep == 0):
                search = _search_speaker if spec.objective == "speak" else _search_node
                found[node.id] = search(prepared, node, sweep, training, recordings, progress)
    return list(found.values())


def load_controls(run_dir: Path, scenario: Scenario) -> dict[str, list[int]]:
    """Control prompts an earlier run found (`--controllers-from RUN_DIR`)."""
    path = run_dir / "controls.json"
    if not path.exists():
        raise RunError(f"{path}: no such file; --controllers-from needs a run folder that holds controls.json")
    try:
        ids = Controls.model_validate_json(path.read_text(encoding="utf-8")).control_ids
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise RunError(f"{path}: not a controls file written by collective ({exc})") from None
    unknown = sorted(set(ids) - set(scenario.node_ids))
    if unknown:
        raise RunError(f"{path}: prompts for nodes {unknown} that this scenario does not have")
    return ids
