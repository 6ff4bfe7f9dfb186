"""The round engine: the stream advances one round at a time, in a fixed order.

Each round: (1) every node's request is cut from the stream (its observation, its control
prompt, its message budget, its fitted firewall); (2) an executor computes every node's
predictions and message (the embedded executor gives each node the messages it reads, which
its firewall screens, batches all nodes sharing a model into one forward pass and runs the
in-memory bus; the distributed one asks volunteer machines); (3) the engine
scores the full-view reference and pools the members into the silent ensemble and the
collective; (4) an eval round goes into the `RoundBook` the evaluator reads, with the
optional yardstick's score of it (`run/yardstick.py`: one more forward pass, eval rounds only); (5) a
`RoundEvent` (with the firewalls' screen records) goes to whoever listens (the run folder,
the live view).

The first `warmup_rounds` rounds come from the end of the train part, so that inboxes
and online weights start warm; only eval rounds are booked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import networkx as nx
import torch

from collective.evaluate.book import EngineResult, RoundBook
from collective.evaluate.metrics import RoundStats, member_round_stats
from collective.lm.codec import start_token
from collective.lm.models import LoadedModel
from collective.lm.predictions import TokenPredictions
from collective.lm.scoring import ScoreItem, score_items
from collective.records import MessageRecord, MessageSearch, NodeRound, RoundEvent, ScreenRecord
from collective.run.aggregate import Aggregator, make_aggregator
from collective.run.bus import (
    InMemoryBus,
    message_byte_budgets,
    message_token_budgets,
    render_messages,
)
from collective.run.byte_mode import ByteMode, round_targets
from collective.run.messages import ReceiverContext, message_frame
from collective.run.node import NodeRoundRequest, NodeRoundResult, compute_rounds
from collective.run.observation import Observer
from collective.run.pools import PooledPrediction
from collective.run.prepared import Prepared
from collective.run.yardstick import Yardstick
from collective.scenario import AttackMessage, FirewallFilter, NodeSpec, Scenario, SearchMessage

log = logging.getLogger(__name__)

Results = dict[str, NodeRoundResult | None]  # node id -> its part of a round (None: missed)


class Executor(Protocol):
    """Runs the nodes' part of a round; returns None for a node that missed it."""

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> Results: ...


class EmbeddedExecutor:
    """All nodes in this process: one batched pass per distinct model, the in-memory bus."""

    def __init__(self, scenario: Scenario, models: dict[str, LoadedModel], bus: InMemoryBus) -> None:
        self.scenario = scenario
        self.models = models
        self.bus = bus

    @classmethod
    def from_prepared(cls, prepared: Prepared) -> EmbeddedExecutor:
        scenario = prepared.scenario
        codecs = {n.id: prepared.node_tokenizer(n.id) for n in scenario.nodes} if prepared.byte_mode is not None else None
        bus = InMemoryBus(prepared.graph, scenario.bus, prepared.tokenizer, scenario.seed, codecs=codecs)
        return cls(scenario, prepared.models, bus)

    def with_inboxes(self, round_index: int, requests: list[NodeRoundRequest]) -> list[NodeRoundRequest]:
        """The requests with each node's inbox this round: the messages it reads (which its
        firewall screens in `compute_rounds`) and, for callers that read it, their rendering
        before any firewall (what the node reads when it has none)."""
        visible = {r.node_id: self.bus.inboxes[r.node_id].visible(round_index) for r in requests}
        template, header = self.bus.spec.inbox_template, self.bus.spec.inbox_header
        return [
            replace(r, inbox_text=render_messages(visible[r.node_id], template, header), inbox_messages=tuple(visible[r.node_id]))
            for r in requests
        ]

    def run_round(self, round_index: int, requests: list[NodeRoundRequest]) -> Results:
        by_model: dict[str, list[NodeRoundRequest]] = {}
        for request in self.with_inboxes(round_index, requests):
            by_model.setdefault(self.scenario.node(request.node_id).model, []).append(request)
        results: Results = {}
        evaluation = self.scenario.evaluation
        for alias, group in by_model.items():
            lm = self.models[alias]
            for result in compute_rounds(
                lm.model, lm.tokenizer, group, top_k=evaluation.top_k, batch_tokens=evaluation.batch_tokens,
                search_models=self.models,
            ):
                results[result.node_id] = result
        # messages are sent after every node has read its inbox: latency >= 1 round
        for request in requests:
            done = results[request.node_id]
            if done is not None and done.message_text is not None:
                done.messages = self.bus.send(request.node_id, done.message_text, round_index)
        return results


@dataclass(frozen=True)
class RoundPools:
    """What one round pooled: the silent ensemble (isolated rows), the collective (rows in
    collective) and the full-view reference."""

    silent: PooledPrediction
    collective: PooledPrediction
    reference: TokenPredictions


@dataclass
class _Tally:
    """Counts over the whole run, for the report."""

    missed: dict[str, int]
    rounds_done: int = 0
    eval_rounds_done: int = 0
    eval_tokens: int = 0
    eval_bytes: int = 0
    messages: list[MessageRecord] = field(default_factory=list)
    searches: dict[str, list[MessageSearch]] = field(default_factory=dict)
    screened: dict[str, list[ScreenRecord]] = field(default_factory=dict)

    def add(self, results: Results, node_ids: list[str]) -> tuple[list[MessageRecord], list[ScreenRecord]]:
        """Count one round; returns its messages and its screen records (receivers in node
        order), which its event carries as they are."""
        messages = [m for r in results.values() if r is not None for m in r.messages]
        self.messages.extend(messages)
        for node_id, result in results.items():
            if result is not None and result.message_search is not None:
                self.searches.setdefault(node_id, []).append(result.message_search)
        screened = [s for node_id in node_ids if (r := results.get(node_id)) is not None for s in r.screened]
        for record in screened:
            self.screened.setdefault(record.receiver, []).append(record)
        self.rounds_done += 1
        return messages, screened

    def add_eval(self, results: Results, targets: torch.Tensor, token_bytes: torch.Tensor) -> None:
        """Count what an eval round scored, and who missed it."""
        self.eval_rounds_done += 1
        self.eval_tokens += len(targets)
        self.eval_bytes += int(token_bytes.sum())
        for node_id in self.missed:
            self.missed[node_id] += results.get(node_id) is None


class RoundEngine:
    """Runs warm-up and eval rounds of one scenario over a tokenized stream."""

    def __init__(
        self,
        scenario: Scenario,
        graph: nx.DiGraph,
        stream: torch.Tensor,
        byte_lengths: torch.Tensor,
        executor: Executor,
        reference: LoadedModel,
        control_ids: dict[str, list[int]],
        placeholder_ids: dict[str, int],
        run_id: str,
        firewalls: dict[str, tuple[FirewallFilter, ...]] | None = None,
        yardstick: Yardstick | None = None,
        replay_texts: dict[str, dict[int, str | None]] | None = None,
        byte_mode: ByteMode | None = None,
    ) -> None:
        self.scenario = scenario
        self.byte_mode = byte_mode  # a byte-unit run: rows are next-byte distributions
        self.replay_texts = replay_texts or {}  # node -> round -> its replayed text (`Prepared.replay_texts`)
        self.yardstick = yardstick  # scored on eval rounds only (`Prepared.yardstick`)
        self.firewalls = firewalls or {}  # node -> its fitted filters (`Prepared.firewalls`)
        self.graph = graph
        self.stream = stream
        self.byte_lengths = byte_lengths
        self.executor = executor
        self.reference = reference
        self.control_ids = control_ids
        self.placeholder_ids = placeholder_ids
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
        self.message_tokens = message_token_budgets(scenario.bus, graph)
        self.message_bytes = message_byte_budgets(scenario.bus, graph)

    @classmethod
    def from_prepared(cls, prepared: Prepared, executor: Executor, run_id: str) -> RoundEngine:
        """The engine of a prepared run: its stream, graph, prompts and reference model."""
        scenario = prepared.scenario
        return cls(
            scenario, prepared.graph, prepared.stream, prepared.byte_lengths, executor,
            prepared.models[scenario.reference_model], prepared.control_ids, prepared.placeholder_ids, run_id,
            firewalls=prepared.firewalls, yardstick=prepared.yardstick, replay_texts=prepared.replay_texts,
            byte_mode=prepared.byte_mode,
        )

    @property
    def total_rounds(self) -> int:
        return self.scenario.evaluation.warmup_rounds + self.scenario.eval_rounds

    def round_start(self, round_index: int) -> int:
        return self.eval_start + (round_index - self.scenario.evaluation.warmup_rounds) * self.round_tokens

    def phase(self, round_index: int) -> Literal["warmup", "eval"]:
        return "eval" if round_index >= self.scenario.evaluation.warmup_rounds else "warmup"

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
                    message_tokens=self.message_tokens[node.id],
                    seed=self.scenario.seed,
                    message_bytes=self.message_bytes[node.id],
                    message_frame=message_frame(
                        self.scenario.bus.inbox_template, self.scenario.bus.inbox_header, node.id, round_index
                    ),
                    receivers=self._receivers(node, start, len(seen.seen_ids)),
                    firewall=self.firewalls.get(node.id, ()),
                    inbox_template=self.scenario.bus.inbox_template,
                    inbox_header=self.scenario.bus.inbox_header,
                    placeholder_id=self.placeholder_ids.get(node.id),
                    replay_text=self.replay_texts.get(node.id, {}).get(round_index),
                )
            )
            if self.byte_mode is not None:
                requests[-1] = self.byte_mode.request(requests[-1], node.model)
        return requests

    def _receivers(self, node: NodeSpec, start: int, n_seen: int) -> tuple[ReceiverContext, ...]:
        """The readers of a receiver-aware searched message or a white-box attack: each
        out-neighbour's control prompt and its view of the text before the span the message is
        scored on (the last `span_tokens` of the `n_seen` tokens the sender read), or, for a
        targeted attack, before the span's end, where the coming round and the target follow."""
        spec = node.message
        if isinstance(spec, AttackMessage) and spec.threat == "white-box":
            to_span_end = spec.objective == "targeted"
        elif isinstance(spec, SearchMessage) and spec.objective == "receiver":
            to_span_end = False
        else:
            return ()
        span_end = start + self.round_tokens
        at = span_end if to_span_end else span_end - min(spec.span_tokens or self.round_tokens, n_seen)
        return tuple(
            ReceiverContext(j, self.control_ids.get(j, []), self.observer.observe(j, at).prefix_ids)
            for j in self.graph.successors(node.id)
        )

    def run(
        self,
        on_event: Callable[[RoundEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EngineResult:
        book = RoundBook(self.scenario.node_ids, yardstick=self.yardstick is not None)
        tally = _Tally(missed=dict.fromkeys(self.scenario.node_ids, 0))
        began = time.perf_counter()
        for round_index in range(self.total_rounds):
            if should_stop is not None and should_stop():
                break
            round_began = time.perf_counter()
            start = self.round_start(round_index)
            targets, token_bytes = self._targets(start)
            results = self.executor.run_round(round_index, self.requests(round_index))
            pools = self.pool(start, targets, results)
            if self.phase(round_index) == "eval":
                book.add_round(
                    results, silent=pools.silent, collective=pools.collective, reference=pools.reference,
                    targets=targets, token_bytes=token_bytes, yardstick=self._yardstick(start, token_bytes),
                )
                tally.add_eval(results, targets, token_bytes)
            messages, screened = tally.add(results, self.scenario.node_ids)
            if on_event is not None:
                on_event(self._event(round_index, results, messages, screened, pools, round_began, began))
        return EngineResult(
            book=book,
            rounds_done=tally.rounds_done,
            eval_rounds_done=tally.eval_rounds_done,
            missed_rounds=tally.missed,
            messages_sent=len(tally.messages),
            messages_dropped=sum(m.dropped for m in tally.messages),
            messages_truncated=sum(m.truncated for m in tally.messages),
            wall_seconds=time.perf_counter() - began,
            eval_tokens=tally.eval_tokens,
            eval_bytes=tally.eval_bytes,
            message_searches=tally.searches,
            screened=tally.screened,
            unit="token" if self.byte_mode is None else "byte",
        )

    def _targets(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) what the round's rows are scored on (tokens, or bytes) and (T,) their UTF-8 lengths."""
        targets = self.observer.targets(start)
        if self.byte_mode is not None:
            return round_targets(self.byte_mode.text(targets))
        return targets, self.byte_lengths[start : start + self.round_tokens]

    def pool(self, start: int, targets: torch.Tensor, results: Results) -> RoundPools:
        """The round's pooled rows. A node without a row (it missed the round, or was not
        asked for that row) is left out of that row's pool, as the book leaves it unscored."""
        collective = self.collective_pool.pool(*self._members(results, "collective"), targets=targets)
        silent = self.silent_pool.pool(*self._members(results, "isolated"), targets=targets)
        return RoundPools(silent=silent, collective=collective, reference=self._reference(start, targets))

    def _reference(self, start: int, targets: torch.Tensor) -> TokenPredictions:
        seen = self.observer.reference(start)
        if self.byte_mode is not None:
            alias = self.scenario.reference_model
            reads = self.byte_mode.reads_stream(alias)
            return self.byte_mode.full_view_row(self.reference, reads, seen.prefix_ids, self.byte_mode.text(seen.round_inputs))
        bos = torch.tensor([start_token(self.reference.tokenizer)])
        pad = getattr(self.reference.tokenizer, "pad_token_id", None)
        return score_items(
            self.reference.model,
            [ScoreItem(torch.cat([bos, seen.prefix_ids]), seen.round_inputs, targets)],
            pad_id=int(pad if pad is not None else bos.item()),
            top_k=self.scenario.evaluation.top_k,
            batch_tokens=self.scenario.evaluation.batch_tokens,
        )

    def _yardstick(self, start: int, token_bytes: torch.Tensor) -> RoundStats | None:
        """The yardstick's statistics of the round at `start` (None: no yardstick): the full view's
        text before it, then the round's text."""
        if self.yardstick is None:
            return None
        seen = self.observer.reference(start)
        evaluation = self.scenario.evaluation
        if self.byte_mode is not None:
            data = self.byte_mode.text(seen.round_inputs)
            row = self.byte_mode.full_view_row(self.yardstick.lm, self.yardstick.same_tokenizer, seen.prefix_ids, data)
            return member_round_stats(row, 0, *round_targets(data))
        return self.yardstick.score(
            seen.prefix_ids, seen.round_inputs, token_bytes, top_k=evaluation.top_k, batch_tokens=evaluation.batch_tokens
        )

    def _members(
        self, results: Results, context: Literal["collective", "isolated"]
    ) -> tuple[TokenPredictions, torch.Tensor]:
        """(N, T) members' rows of one context in node order, and the (N,) mask of the members
        that have one and are pooled (an absent member's row is a copy of a present one, masked
        out; a member in `aggregator.exclude` is masked out too)."""
        rows = {n: getattr(r, context) for n, r in results.items() if r is not None and getattr(r, context) is not None}
        if not rows:
            raise RuntimeError(f"no node has a {context} row this round")
        stand_in = next(iter(rows.values()))
        node_ids = self.scenario.node_ids
        excluded = self.scenario.aggregator.exclude  # their messages travel; their predictions stay out
        present = torch.tensor([n in rows and n not in excluded for n in node_ids])
        return TokenPredictions.stack([rows.get(n, stand_in) for n in node_ids]), present

    def _event(
        self,
        round_index: int,
        results: Results,
        messages: list[MessageRecord],
        screened: list[ScreenRecord],
        pools: RoundPools,
        round_began: float,
        began: float,
    ) -> RoundEvent:
        """The round's event; its messages and screen records as the tally took them."""
        phase = self.phase(round_index)
        now = time.perf_counter()
        return RoundEvent(
            run_id=self.run_id,
            round_index=round_index,
            phase=phase,
            eval_round=round_index - self.scenario.evaluation.warmup_rounds if phase == "eval" else None,
            start_token=self.round_start(round_index),
            n_tokens=self.round_tokens,
            nodes=[node_round(node_id, results.get(node_id)) for node_id in self.scenario.node_ids],
            messages=messages,
            screened=screened,
            nll_collective=_nanmean_nll(pools.collective.target_logprob),
            nll_silent=_nanmean_nll(pools.silent.target_logprob),
            nll_reference=float(-pools.reference.target_logprob.mean()),
            wall_seconds=now - round_began,
            elapsed_seconds=now - began,
            unit="token" if self.byte_mode is None else "byte",
            n_bytes=None if self.byte_mode is None else pools.reference.n_positions,
        )


def node_round(node_id: str, result: NodeRoundResult | None) -> NodeRound:
    """One node's line of a round event: its mean NLLs and what it sent."""
    if result is None:
        return NodeRound(node_id=node_id, nll_collective=None, nll_isolated=None, nll_plain=None, missed=True)
    own = [m for m in result.messages if m.sender == node_id]
    return NodeRound(
        node_id=node_id, nll_collective=_mean_nll(result.collective), nll_isolated=_mean_nll(result.isolated),
        nll_plain=_mean_nll(result.plain), inbox_tokens=result.inbox_tokens,
        bytes_sent=sum(m.n_bytes for m in own if not m.dropped), messages_sent=len(own),
        messages_dropped=sum(m.dropped for m in own), messages_truncated=sum(m.truncated for m in own),
        last_message=result.message_text, message_search=result.message_search,
        messages_screened_out=sum(s.action == "drop" for s in result.screened),
        shuffle_matched=result.shuffle_matched,
    )


def _mean_nll(preds: TokenPredictions | None) -> float | None:
    return None if preds is None else float(-preds.target_logprob.mean())


def _nanmean_nll(target_logprob: torch.Tensor) -> float:
    return float(-target_logprob.nanmean()) if not bool(torch.isnan(target_logprob).all()) else float("nan")
