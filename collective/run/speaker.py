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
read", the message a reader without node i's view would most likely use. The search is
GCG's own loop (`controllers.run_gcg`) over `EndToEnd`, which takes its gradient from the
surrogate and scores candidates by the true objective: each step samples `search_width`
candidates around the buffer's best, filters them as GCG does, scores them all end to end
and keeps the best (a buffer of `buffer_size` prompts). The surrogate only proposes; the
true objective alone decides what is kept.

Validation. After each step, the lowest-training-loss prompt found so far is scored on the
validation rounds by the same end-to-end objective (`controllers.held_out.HeldOut`, as
`objective: local` and `collective` do): the prompt returned is the one with the lowest
validation loss, the initial prompt included, and the search stops after `patience` steps
in a row without a validation improvement. With `validation_rounds: 0` the search runs
every step and returns the prompt with the lowest training loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel

from collective.lm.codec import pad_id, start_token, stop_ids
from collective.lm.scoring import ScoreItem, score_and_speak, score_items
from collective.records import ControlSearch, MessageRecord
from collective.run.bus import LinkPolicy, enforce_budget, link_policies, render_messages
from collective.run.node import (
    NodeRoundRequest,
    NodeRoundResult,
    context_ids,
    relayed_ids,
    speak_settings,
    text_ids,
)
from collective.run.prepared import Prepared, RunError
from collective.scenario import NodeSpec
from controllers import GCGConfig, MeanObjective, run_gcg, stream_objective
from controllers.held_out import HeldOut
from controllers.objectives import Scores

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (node_id, step, total_steps)


def node_progress(progress: Progress | None, node_id: str) -> Callable[[int, int], None] | None:
    """GCG's progress callback (step, total) for node `node_id`'s search (None: no progress)."""
    return None if progress is None else lambda step, total: progress(node_id, step, total)


class Recording(Protocol):
    """A run of the collective over the training rounds (control's `_Recorder`): per
    recorded round, every node's request with its inbox and the results, and each node's
    visible inbox messages."""

    rounds: list[tuple[list[NodeRoundRequest], dict[str, NodeRoundResult | None]]]
    visible: list[dict[str, list[MessageRecord]]]


def _request(recording: Recording, index: int, node_id: str) -> NodeRoundRequest:
    return next(q for q in recording.rounds[index][0] if q.node_id == node_id)


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
        inboxes = [text_ids(tokenizer, q.inbox_text) for q in self.writes]
        items, speaks = [], []
        for ids in candidates.tolist():
            for q, inbox in zip(self.writes, inboxes, strict=True):
                items.append(ScoreItem(context_ids(bos, ids, inbox, q.prefix_ids), q.round_inputs, q.targets))
                speaks.append(speak_settings(q, tokenizer))
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
                context = context_ids(start_token(tokenizer), q.control_ids, text_ids(tokenizer, key[2]), q.prefix_ids)
                items.append(ScoreItem(context, q.round_inputs, q.targets))
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
        rest = text_ids(tokenizer, q.inbox_text) + q.prefix_ids.tolist() + q.round_inputs.tolist()
        rest += speak_settings(q, tokenizer).continuation.tolist() + relay
        parts.append(stream_objective(loaded.model, rest, offset=len(rest) - len(relay), prefix_ids=[start_token(tokenizer)]))
    return MeanObjective(parts)


class EndToEnd:
    """The speak objective as GCG's `Objective`: candidates (B, k) scored end to end
    (`SpeakObjective.losses`), the one-hot gradient taken through `relay_surrogate`. No
    candidate meets a success condition (there is no argmax target), so GCG never stops
    early. `seen` keeps the training loss of every prompt scored (prompt ids -> loss)."""

    def __init__(self, objective: SpeakObjective) -> None:
        self.objective = objective
        self.surrogate = relay_surrogate(objective)
        self.seen: dict[tuple[int, ...], float] = {}

    @property
    def model(self) -> PreTrainedModel:
        return self.surrogate.model

    def scores(self, control_ids: torch.Tensor) -> Scores:
        loss = self.objective.losses(control_ids.cpu())  # (B,)
        self.seen |= {tuple(ids): value for ids, value in zip(control_ids.tolist(), loss.tolist(), strict=True)}
        return Scores(loss=loss, success=torch.zeros(len(loss), dtype=torch.bool))

    def embed_loss(self, control_embeds: torch.Tensor) -> torch.Tensor:
        return self.surrogate.embed_loss(control_embeds)

    def check_control_length(self, k: int) -> None:
        self.surrogate.check_control_length(k)

    def confirm(self, control_ids: torch.Tensor) -> bool:
        return False


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
    train, held_out = rounds
    path = f"nodes.{node.id}.controller"
    objective = EndToEnd(SpeakObjective(prepared, node.id, recording, train, f"{path}.train_rounds"))
    validation = None
    if held_out:
        slice_objective = SpeakObjective(prepared, node.id, recording, held_out, f"{path}.validation_rounds")
        validation = HeldOut(
            lambda ids: float(slice_objective.losses(torch.tensor([ids]))[0]), init, patience, config.num_steps
        )
    loaded = objective.objective.loaded
    result = run_gcg(
        loaded.model, loaded.tokenizer, objective, config, init_ids=init, progress=node_progress(progress, node.id),
        on_step=validation,
    )
    ids = result.best_ids if validation is None else validation.best_ids
    loss, initial_loss = objective.seen[tuple(ids)], objective.seen[tuple(init)]
    prepared.control_ids[node.id] = ids
    text = loaded.tokenizer.decode(ids)
    log.info("node %s (speak): control %r, receivers' train NLL %.4f -> %.4f", node.id, text, initial_loss, loss)
    return ControlSearch(
        node_id=node.id, objective="speak", control_ids=ids, control_text=text, loss=loss,
        initial_loss=initial_loss, steps=result.steps, wall_seconds=result.wall_time_s,
        validation_loss=None if validation is None else validation.best_loss,
        initial_validation_loss=None if validation is None else validation.initial_loss,
        stopped_at_step=None if validation is None else validation.stopped_at,
    )
