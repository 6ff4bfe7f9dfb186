"""Fitting the firewalls' perplexity thresholds on the train part, once per run, before the
first round (`collective.run.prepared.prepare` calls `fit_firewalls`).

A `PerplexityFilter` without `threshold` is fitted from benign messages: relays of the
receiver's in-neighbours at rounds of the train part (never the eval part): each the last B
tokens the sender read through its own view (a masked view's placeholders included), B its
message budget cut to that link's. The sample is honest: the rounds are chosen so that the
relays are full length (as long as the senders' relays ever are) and read distinct,
non-overlapping stretches of the train part (`distinct_starts`), every round used once; up
to `2 x fit_messages` of them are drawn from the scenario seed and split in two halves, the
in-links taken in turn in each: the threshold is fitted on one half and its drop rate
measured on the other (held out), so that the rate says what the threshold does to benign
text it was not fitted on. When the train part holds fewer windows, what there is is used
(half and half), and the fit's record says how many. Each message is decoded to text and cut
to the link's budgets as it would travel. A shuffling sender's are shuffled; a sender that
writes or searches its messages is stood in for by its relay (an attacker by its `benign`
policy); a silent one sends none. Each goes through the filters before it in the receiver's
firewall, then is scored like a message by the receiver's model
(`collective.run.firewall.message_nll`: every benign message of every receiver of a model in
one batched pass); the threshold is the (1 - false_drop_rate) empirical quantile of the fit
half's scores (the windowed score for the windowed variant), so that at most that share of
them would be dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import torch

from collective.lm.codec import TextCodec
from collective.lm.models import LoadedModel
from collective.records import FilterFit, MessageRecord
from collective.run.bus import enforce_budget, link_policies, message_token_budgets
from collective.run.firewall import InboxRead, message_nll, message_score, screen
from collective.run.observation import Observer
from collective.scenario import (
    AttackMessage,
    FirewallFilter,
    MessageSpec,
    PerplexityFilter,
    Scenario,
    ShuffleMessage,
    SilentMessage,
    ViewSpec,
)
from collective.seeding import generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FittedFirewalls:
    """Every receiver's firewall with its thresholds filled in, and how each fitted one was fitted."""

    filters: dict[str, tuple[FirewallFilter, ...]]  # node -> its filters, every threshold set
    fits: dict[str, dict[int, FilterFit]]  # node -> filter index -> its fit


def _unfitted(filters: tuple[FirewallFilter, ...]) -> int | None:
    """The index of the first perplexity filter without a threshold (None: all set)."""
    return next((i for i, f in enumerate(filters) if isinstance(f, PerplexityFilter) and f.threshold is None), None)


def _benign_policy(spec: MessageSpec) -> str:
    """How an in-neighbour's benign message is drawn: a relay or its shuffle from the sender's
    own view, nothing from a silent sender; a written or searched message (and an attacker's
    benign policy) is stood in for by the relay of the same view."""
    if isinstance(spec, AttackMessage):
        return "silent" if spec.benign == "silent" else "relay"
    if isinstance(spec, SilentMessage):
        return "silent"
    return "shuffle" if isinstance(spec, ShuffleMessage) else "relay"


@dataclass(frozen=True)
class FitSample:
    """The benign messages a filter is fitted on (`fit`) and those its drop rate is measured on
    (`held_out`), from distinct rounds; `windows_available`: the distinct, full-length,
    non-overlapping relay windows the train part holds."""

    fit: list[MessageRecord]
    held_out: list[MessageRecord]
    windows_available: int


def relay_reach(view: ViewSpec, start: int, round_tokens: int, context_tokens: int, tokens: int) -> tuple[int, int, int]:
    """The stream positions a relay of a round that starts at `start` reads: the last `tokens`
    of [the view's span][the round's tokens], as (first position, last position, length)."""
    lo, hi = view.span(start, context_tokens)
    length = min(tokens, hi - lo + round_tokens)
    first = start + round_tokens - length if length <= round_tokens else hi - (length - round_tokens)
    return first, start + round_tokens - 1, length


def distinct_starts(links: Sequence[tuple[ViewSpec, int]], train_tokens: int, round_tokens: int, context_tokens: int) -> list[int]:
    """The round starts, earliest first, whose relays over every link (its sender's view, its
    budget in tokens) are full length (as long as at the last round of the train part) and
    read stream positions after every earlier start's (so that no two rounds' relays share
    or interleave a position); every round lies within the train part."""
    last = train_tokens - round_tokens
    if last < 0:
        return []
    full = [relay_reach(view, last, round_tokens, context_tokens, tokens)[2] for view, tokens in links]
    starts: list[int] = []
    after = -1  # the last position an earlier start's relays read
    for at in range(last + 1):
        reach = [relay_reach(view, at, round_tokens, context_tokens, tokens) for view, tokens in links]
        if all(length == want for (_, _, length), want in zip(reach, full, strict=True)) and min(r[0] for r in reach) > after:
            starts.append(at)
            after = max(r[1] for r in reach)
    return starts


BenignLink = tuple[str, int, int]  # an in-link's sender, its relay's tokens, the link's byte budget


def benign_links(scenario: Scenario, graph: nx.DiGraph, receiver: str, field: str) -> list[BenignLink]:
    """The in-links of `receiver` that carry benign messages: (sender, tokens, max bytes), the
    tokens its relay quotes (the sender's budget, cut to this link's), a silent sender's or a
    0-token link left out; a `ValueError` (naming `field`) when none is left."""
    policies = link_policies(scenario.bus, graph.edges())
    budgets = message_token_budgets(scenario.bus, graph)
    links = [
        (sender, min(budgets[sender], policies[(sender, receiver)].max_message_tokens), policies[(sender, receiver)].max_message_bytes)
        for sender in graph.predecessors(receiver)
        if _benign_policy(scenario.node(sender).message) != "silent"
    ]
    links = [link for link in links if link[1] > 0]
    if not links:
        raise ValueError(
            f"{field}: no in-neighbour sends a benign message to fit the threshold on (every sender is silent "
            "or has a 0-token budget); give the filter a `threshold`"
        )
    return links


def benign_messages(
    scenario: Scenario, graph: nx.DiGraph, observer: Observer, tokenizer: TextCodec, receiver: str, index: int
) -> FitSample:
    """The benign messages a receiver's filter `index` is fitted and checked on: what its
    in-neighbours relay (the last B tokens of what they read, through their own views: a masked
    view's placeholders included, as their real relays carry them) at rounds of the train part
    drawn from `distinct_starts` with the scenario seed, each round once: up to `fit_messages`
    to fit and as many held out (half and half of what there is when fewer), the in-links
    taken in turn in each half; decoded and cut to the link's budgets as they would travel
    (sender: that in-link's sender; round_sent: -1, -2, ... so that no seed they draw is a
    real message's). `observer` holds the train part only, so nothing after it can be read."""
    spec = scenario.node(receiver).firewall[index]
    assert isinstance(spec, PerplexityFilter)
    bus = scenario.bus
    train = len(observer.stream)
    field = f"nodes.{receiver}.firewall[{index}] (perplexity)"
    links = benign_links(scenario, graph, receiver, field)
    longest = max(tokens for _, tokens, _ in links)
    context = scenario.evaluation.context_tokens
    starts = distinct_starts([(scenario.node(s).view, t) for s, t, _ in links], train, bus.round_tokens, context)
    if train < max(longest, bus.round_tokens) or not starts:
        raise ValueError(
            f"{field}: fitting needs train-part windows of {longest} tokens (the in-links' budget), but "
            f"corpus.train_tokens is {train}; raise corpus.train_tokens or give the filter a `threshold`"
        )
    gen = generator(scenario.seed, "firewall-fit", receiver, index)
    drawn = [starts[i] for i in torch.randperm(len(starts), generator=gen)[: 2 * spec.fit_messages].tolist()]
    if len(drawn) < 2 * spec.fit_messages:
        log.warning(
            "%s: the train part holds %d distinct full-length relay windows, fewer than the %d asked for (fit_messages "
            "%d to fit, as many held out): fitted on %d, held out %d", field, len(starts), 2 * spec.fit_messages,
            spec.fit_messages, len(drawn) - len(drawn) // 2, len(drawn) // 2,
        )
    halves = (drawn[: len(drawn) - len(drawn) // 2], drawn[len(drawn) - len(drawn) // 2 :])
    out: list[list[MessageRecord]] = [[], []]
    for half, rounds in zip(out, halves, strict=True):
        for m, at in enumerate(rounds):
            sent = -1 - len(out[0]) - len(out[1])
            half.append(_relay(scenario, observer, tokenizer, gen, links[m % len(links)], receiver, at, sent))
    return FitSample(out[0], out[1], len(starts))


def _relay(
    scenario: Scenario, observer: Observer, tokenizer: TextCodec, gen: torch.Generator, link: BenignLink, receiver: str,
    at: int, sent: int,
) -> MessageRecord:
    """The link's sender's relay of the round at `at` (shuffled with `gen` for a shuffling
    sender), decoded and cut to the link's budgets, as a record sent in round `sent`."""
    sender, tokens, max_bytes = link
    seen = observer.observe(sender, at)
    relayed = torch.cat([seen.prefix_ids, seen.round_inputs])[-tokens:]
    if _benign_policy(scenario.node(sender).message) == "shuffle":
        relayed = relayed[torch.randperm(len(relayed), generator=gen)]
    text = tokenizer.decode(relayed.tolist(), skip_special_tokens=True)
    text, n_tokens, n_bytes, _ = enforce_budget(text, tokenizer, tokens, max_bytes)
    return MessageRecord(sender=sender, receiver=receiver, round_sent=sent, deliver_round=0, text=text, n_tokens=n_tokens, n_bytes=n_bytes)


def fitted_threshold(scores: torch.Tensor, spec: PerplexityFilter) -> float:
    """The (1 - false_drop_rate) empirical quantile of the fit half's benign scores (n,): the
    smallest score with at least that share of the scores at or below it, so that at most
    `false_drop_rate` of them lie above it (and are dropped)."""
    ordered = scores.sort().values  # (n,)
    rank = math.ceil((1.0 - spec.false_drop_rate) * len(ordered) - 1e-9)  # 1-based; the epsilon keeps 0.95 * 20 at 19
    return float(ordered[max(rank, 1) - 1])


def drop_rate(scores: torch.Tensor, threshold: float) -> float | None:
    """The share of scores (n,) above the threshold; None for no score."""
    return float((scores > threshold).double().mean()) if len(scores) else None


def _fit_model(loaded: LoadedModel, scenario: Scenario, graph: nx.DiGraph, train: Observer, due: dict[str, int], fitted: FittedFirewalls) -> None:
    """Fit filter `due[node]` of every node of one model: the benign messages (fit and held-out
    halves) through the filters before it, then every survivor of every node scored in one
    pass; the threshold from the fit half, the drop rate measured on the held-out half."""
    tok, batch_tokens = loaded.tokenizer, scenario.evaluation.batch_tokens
    samples = {node: benign_messages(scenario, graph, train, tok, node, k) for node, k in due.items()}
    reads = [
        InboxRead(node, scenario.seed, (*samples[node].fit, *samples[node].held_out), fitted.filters[node][:k], "", "")
        for node, k in due.items()
    ]
    kept = [[s for s in items if s.dropped_by is None] for items in screen(loaded.model, tok, reads, batch_tokens=batch_tokens)]
    ids = [[s.token_ids(tok) for s in items] for items in kept]
    nll = message_nll(loaded.model, tok, [row for rows in ids for row in rows], batch_tokens=batch_tokens)
    at = 0
    for (node, k), items, rows in zip(due.items(), kept, ids, strict=True):
        spec = fitted.filters[node][k]
        assert isinstance(spec, PerplexityFilter)
        scores = torch.tensor([message_score(values, spec.window) for values in nll[at : at + len(rows)]], dtype=torch.float64)
        at += len(rows)
        held = torch.tensor([s.message.round_sent < -len(samples[node].fit) for s in items], dtype=torch.bool)  # (n,)
        if not bool((~held).any()):
            raise ValueError(
                f"nodes.{node}.firewall[{k}] (perplexity): the filters before it dropped every benign train-part "
                "message, so there is nothing to fit its threshold on; give it a `threshold` or loosen them"
            )
        threshold = fitted_threshold(scores[~held], spec)
        fit_tokens = [len(row) for row, h in zip(rows, held.tolist(), strict=True) if not h]
        fitted.fits.setdefault(node, {})[k] = FilterFit(
            benign_messages=len(fit_tokens), mean_tokens=sum(fit_tokens) / len(fit_tokens), false_drop_rate=spec.false_drop_rate,
            fit_drop_rate=drop_rate(scores[~held], threshold) or 0.0, requested_messages=spec.fit_messages,
            windows_available=samples[node].windows_available, held_out_messages=int(held.sum()),
            held_out_drop_rate=drop_rate(scores[held], threshold),
        )
        chain = list(fitted.filters[node])
        chain[k] = spec.model_copy(update={"threshold": threshold})
        fitted.filters[node] = tuple(chain)


def fit_firewalls(
    scenario: Scenario, models: dict[str, LoadedModel], graph: nx.DiGraph, stream: torch.Tensor,
    placeholder_ids: dict[str, int] | None = None,
) -> FittedFirewalls:
    """Every node's firewall with each unset threshold fitted on `stream`'s train part (only its
    first `corpus.train_tokens` tokens are read; `placeholder_ids`: what each masked view shows
    for a hidden token). A `ValueError` names the filter that cannot be fitted."""
    fitted = FittedFirewalls({node.id: node.firewall for node in scenario.nodes if node.firewall}, {})
    train = Observer(
        stream[: scenario.corpus.train_tokens], scenario.nodes, seed=scenario.seed, round_tokens=scenario.bus.round_tokens,
        context_tokens=scenario.evaluation.context_tokens, placeholder_ids=placeholder_ids or {},
    )
    while due := {node: k for node, filters in fitted.filters.items() if (k := _unfitted(filters)) is not None}:
        by_model: dict[str, dict[str, int]] = {}
        for node, k in due.items():
            by_model.setdefault(scenario.node(node).model, {})[node] = k
        for alias, nodes in by_model.items():
            _fit_model(models[alias], scenario, graph, train, nodes, fitted)
    return fitted
