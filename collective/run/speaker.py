"""Speaker controllers (`controller: {kind: gcg, objective: speak}`): search node i's control
prompt u_i on the train part so that the messages node i writes lower its out-neighbours'
NLL in collective. Node i's message policy is `generate` (the scenario's checks make sure),
so u_i reaches its readers only through the text it writes.

What is held fixed. `collective.run.control` runs the collective once over the training
rounds with every current prompt (node i's included) and records each node's request (its
inbox as read, its view, the round) and each receiver's visible inbox messages per round
(a `Recording`). A candidate u changes node i's messages only: its own inbox, the
receivers' other messages and every other prompt stay as recorded, so a change that would
come back to node i around a cycle of the topology is not modelled.

The true objective of a candidate u on a set of rounds G (the training rounds, or the
validation slice): for each round r of G, node i writes its message as the run would
(`score_and_speak` after [start][u][inbox][view][round][speak prompt], greedy, or sampled
with the run's own generator seeded per node and round, so all candidates share it); each
out-link cuts it to its budget (`enforce_budget`), and it replaces node i's message in
the receiver's inbox in the round the receiver reads it (r + the link's latency; a
dropped message stays dropped). Each receiver j is scored in collective,
[start][u_j][inbox][view][round], on every round of G whose inbox shows a message node i
sent in G: messages sent in the last rounds of G are read after G and are left out (with
latency L, the last L rounds of G only send; `train_rounds` must exceed L). The loss is
the mean NLL over these (receiver, round) pairs, each the mean over the round's tokens.
Every candidate is scored end to end this way: one batched generation over all
candidates and rounds, then one batched scoring of the receivers' sequences per model
(an identical sequence is scored once per search: a prompt change that leaves the
messages as they were costs no scoring).

Proposals. Sampling a message leaves no gradient path from u to the receivers, so the
candidates come from the gradient of a surrogate, `relay_surrogate`: node i's NLL of
writing its relay (the last B tokens it read, B its message budget) right after its speak
prompt, [start][u][inbox][view][round][speak prompt][relay], i.e. "say what you just
read", the message a reader without node i's view would most likely use. Each step
samples `search_width` candidates, each with `n_replace` positions swapped to one of the
`topk` allowed tokens of most negative one-hot gradient (`controllers.sample_candidates`,
with GCG's token and re-tokenization filters), scores them all by the true objective and
moves to the best (a buffer of `buffer_size` prompts, as GCG keeps). The surrogate only
proposes; the true objective alone decides what is kept.

Validation. Each step's best is scored on the validation rounds by the same end-to-end
objective; the prompt returned is the one with the lowest validation loss, the initial
prompt included, and the search stops after `patience` steps without a validation
improvement. With `validation_rounds: 0` the search runs every step and returns the
prompt with the lowest training loss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from collective.lm.codec import TextCodec, pad_id, start_token, stop_ids
from collective.lm.scoring import ScoreItem, score_and_speak, score_items
from collective.records import ControlSearch, MessageRecord
from collective.run.bus import LinkPolicy, enforce_budget, link_policies, render_messages
from collective.run.node import NodeRoundRequest, NodeRoundResult, _speak, relayed_ids
from collective.run.prepared import Prepared, RunError
from collective.scenario import NodeSpec
from controllers import (
    GCGConfig,
    MeanObjective,
    one_hot_gradient,
    sample_candidates,
    stream_objective,
)
from controllers.filters import filter_candidates, model_token_mask

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (node_id, step, total_steps)


class Recording(Protocol):
    """A run of the collective over the training rounds (control's `_Recorder`): per
    recorded round, every node's request with its inbox and the results, and each node's
    visible inbox messages."""

    rounds: list[tuple[list[NodeRoundRequest], dict[str, NodeRoundResult | None]]]
    visible: list[dict[str, list[MessageRecord]]]


def _request(recording: Recording, index: int, node_id: str) -> NodeRoundRequest:
    return next(q for q in recording.rounds[index][0] if q.node_id == node_id)


def _ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _encode(tokenizer: TextCodec, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


@dataclass(frozen=True)
class _Read:
    """Receiver `request.node_id` reading, in recorded round `index`, an inbox that shows a
    message the speaker sent in the objective's rounds."""

    index: int
    request: NodeRoundRequest
    messages: list[MessageRecord]


class SpeakObjective:
    """Node `speaker`'s true objective on the recorded rounds `rounds` (indexes into the
    recording): the mean NLL in collective of its out-neighbours through the messages it
    writes with each candidate prompt (see the module docstring). `field` names the
    scenario field to change when no message of the speaker is read within the rounds."""

    def __init__(self, prepared: Prepared, speaker: str, recording: Recording, rounds: list[int], field: str) -> None:
        self.prepared = prepared
        self.speaker = speaker
        self.loaded = prepared.models[prepared.scenario.node(speaker).model]
        own = [_request(recording, r, speaker) for r in rounds]
        sent = {q.round_index for q in own}
        self.reads = [
            _Read(r, _request(recording, r, j), recording.visible[r][j])
            for r in rounds for j in prepared.graph.successors(speaker)
            if any(m.sender == speaker and m.round_sent in sent for m in recording.visible[r][j])
        ]
        if not self.reads:
            raise RunError(
                f"{field}: no message node {speaker} sends in these {len(rounds)} rounds is read within them (link "
                f"latency or drops); set it above the out-links' bus.latency_rounds"
            )
        read = {m.round_sent for x in self.reads for m in x.messages if m.sender == speaker}
        self.writes = [q for q in own if q.round_index in read]  # the rounds whose message is read
        self.policies: dict[tuple[str, str], LinkPolicy] = link_policies(prepared.scenario.bus, prepared.graph.edges())
        self._nll: dict[tuple[str, int, str], float] = {}  # (receiver, round, inbox text) -> NLL

    @torch.no_grad()
    def messages(self, candidates: torch.Tensor) -> list[dict[int, str]]:
        """What node i writes with each candidate (B, k): per candidate, round sent -> text."""
        tokenizer = self.loaded.tokenizer
        bos = start_token(tokenizer)
        inboxes = [_encode(tokenizer, q.inbox_text) for q in self.writes]
        items, speaks = [], []
        for ids in candidates.tolist():
            for q, inbox in zip(self.writes, inboxes, strict=True):
                items.append(ScoreItem(torch.cat([_ids([bos, *ids, *inbox]), q.prefix_ids]), q.round_inputs, q.targets))
                speaks.append(_speak(q, tokenizer))
        _, spoken = score_and_speak(
            self.loaded.model, items, speaks, pad_id=pad_id(tokenizer), top_k=1, stop_ids=stop_ids(tokenizer),
            batch_tokens=self.prepared.scenario.evaluation.batch_tokens,
        )
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in spoken]
        n = len(self.writes)
        return [{q.round_index: texts[b * n + w] for w, q in enumerate(self.writes)} for b in range(len(candidates))]

    def inbox(self, read: _Read, said: dict[int, str]) -> str:
        """The receiver's inbox text in that round with node i's messages replaced by `said`."""
        bus = self.prepared.scenario.bus
        policy = self.policies[(self.speaker, read.request.node_id)]
        shown = [
            m.model_copy(update={"text": enforce_budget(
                said[m.round_sent], self.loaded.tokenizer, policy.max_message_tokens, policy.max_message_bytes
            )[0]})
            if m.sender == self.speaker and m.round_sent in said else m
            for m in read.messages
        ]
        return render_messages(shown, bus.inbox_template, bus.inbox_header)

    def losses(self, candidates: torch.Tensor) -> torch.Tensor:
        """The true loss (B,) of candidate prompts (B, k), end to end."""
        keys = [
            [(read.request.node_id, read.index, self.inbox(read, said)) for read in self.reads]
            for said in self.messages(candidates)
        ]
        self._score({key: read for row in keys for key, read in zip(row, self.reads, strict=True)})
        return torch.tensor([sum(self._nll[key] for key in row) / len(row) for row in keys])

    @torch.no_grad()
    def _score(self, reads: dict[tuple[str, int, str], _Read]) -> None:
        """Score the receivers' sequences not scored yet, one batched pass per model."""
        by_model: dict[str, list[tuple[str, int, str]]] = {}
        for key in reads:
            if key not in self._nll:
                by_model.setdefault(self.prepared.scenario.node(key[0]).model, []).append(key)
        for alias, keys in by_model.items():
            loaded = self.prepared.models[alias]
            tokenizer = loaded.tokenizer
            items = []
            for key in keys:
                q = reads[key].request
                context = _ids([start_token(tokenizer), *q.control_ids, *_encode(tokenizer, key[2])])
                items.append(ScoreItem(torch.cat([context, q.prefix_ids]), q.round_inputs, q.targets))
            scored = score_items(
                loaded.model, items, pad_id=pad_id(tokenizer), top_k=1,
                batch_tokens=self.prepared.scenario.evaluation.batch_tokens,
            )
            nll = -scored.target_logprob.mean(-1)  # (n,)
            self._nll |= {key: float(value) for key, value in zip(keys, nll.tolist(), strict=True)}


def relay_surrogate(objective: SpeakObjective) -> MeanObjective:
    """The proposals' surrogate, with a gradient path: node i's NLL of writing its relay right
    after its speak prompt, [start][u][inbox][view][round][speak prompt][relay], over the
    rounds whose message the true objective reads."""
    loaded = objective.loaded
    tokenizer = loaded.tokenizer
    parts = []
    for q in objective.writes:
        relay = relayed_ids(q)
        rest = _encode(tokenizer, q.inbox_text) + q.prefix_ids.tolist() + q.round_inputs.tolist()
        rest += _speak(q, tokenizer).continuation.tolist() + relay
        parts.append(stream_objective(loaded.model, rest, offset=len(rest) - len(relay), prefix_ids=[start_token(tokenizer)]))
    return MeanObjective(parts)


@dataclass
class Proposer:
    """Candidate prompts from the surrogate's one-hot gradient, filtered as GCG filters them."""

    objective: SpeakObjective
    config: GCGConfig
    surrogate: MeanObjective = field(init=False)
    allowed: torch.Tensor = field(init=False)  # (V,) bool
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        loaded = self.objective.loaded
        self.surrogate = relay_surrogate(self.objective)
        self.allowed = model_token_mask(loaded.model, loaded.tokenizer, self.config)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def propose(self, current: torch.Tensor) -> torch.Tensor:
        """Candidates (W', k) around the prompt current (k,)."""
        config = self.config
        grad = one_hot_gradient(self.objective.loaded.model, self.surrogate, current)  # (k, V)
        candidates = sample_candidates(
            current, grad, config.search_width, config.topk, config.n_replace, ~self.allowed, self.generator
        )  # (W, k)
        return filter_candidates(candidates.cpu(), self.objective.loaded.tokenizer, retokenize=config.filter_retokenize)


@dataclass
class _Chosen:
    """The prompt to return: the lowest validation loss seen (the training loss without a
    validation slice), the initial prompt included."""

    ids: torch.Tensor  # (k,)
    loss: float
    validation_loss: float | None

    def consider(self, ids: torch.Tensor, loss: float, validation: SpeakObjective | None) -> bool:
        """Fold in a step's best; returns whether it is the new choice."""
        if validation is None:
            if loss >= self.loss:
                return False
            self.ids, self.loss = ids, loss
            return True
        held_out = float(validation.losses(ids[None])[0])
        assert self.validation_loss is not None
        if held_out >= self.validation_loss:
            return False
        self.ids, self.loss, self.validation_loss = ids, loss, held_out
        return True


def _keep(buffer: list[tuple[float, torch.Tensor]], loss: float, ids: torch.Tensor, size: int) -> list[tuple[float, torch.Tensor]]:
    """GCG's buffer: the `size` lowest-loss prompts (0: only the latest step's best)."""
    if size == 0:
        return [(loss, ids)]
    return sorted([*buffer, (loss, ids)], key=lambda item: item[0])[:size]


def search_speaker(
    prepared: Prepared,
    node: NodeSpec,
    recording: Recording,
    rounds: tuple[list[int], list[int]],
    init: list[int],
    config: GCGConfig,
    patience: int,
    progress: Progress | None = None,
) -> ControlSearch:
    """Search node `node`'s prompt from `init` for the speak objective on the recorded
    (training, validation) rounds; updates prepared.control_ids. `config` carries the steps,
    width, top-k, filters, buffer size and seed."""
    began = time.perf_counter()
    train, held_out = rounds
    path = f"nodes.{node.id}.controller"
    objective = SpeakObjective(prepared, node.id, recording, train, f"{path}.train_rounds")
    validation = SpeakObjective(prepared, node.id, recording, held_out, f"{path}.validation_rounds") if held_out else None
    proposer = Proposer(objective, config)
    start = torch.tensor(init, dtype=torch.long)
    initial_loss = float(objective.losses(start[None])[0])
    initial_validation = None if validation is None else float(validation.losses(start[None])[0])
    chosen = _Chosen(start, initial_loss, initial_validation)
    buffer = [(initial_loss, start)]
    waited, step, stopped = 0, 0, None
    while step < config.num_steps:
        step += 1
        candidates = proposer.propose(buffer[0][1])
        improved = False
        if len(candidates):
            losses = objective.losses(candidates)
            best = int(losses.argmin())
            buffer = _keep(buffer, float(losses[best]), candidates[best], config.buffer_size)
            improved = chosen.consider(candidates[best], float(losses[best]), validation)
        waited = 0 if improved else waited + 1
        if progress is not None:
            progress(node.id, step, config.num_steps)
        if validation is not None and waited >= patience and step < config.num_steps:
            stopped = step
            break
    ids = [int(i) for i in chosen.ids.tolist()]
    prepared.control_ids[node.id] = ids
    text = objective.loaded.tokenizer.decode(ids)
    log.info("node %s (speak): control %r, receivers' train NLL %.4f -> %.4f", node.id, text, initial_loss, chosen.loss)
    return ControlSearch(
        node_id=node.id, objective="speak", control_ids=ids, control_text=text, loss=chosen.loss,
        initial_loss=initial_loss, steps=step, wall_seconds=time.perf_counter() - began,
        validation_loss=chosen.validation_loss, initial_validation_loss=initial_validation, stopped_at_step=stopped,
    )
