"""Fitting the firewalls' perplexity thresholds on the train part, once per run, before the
first round (`collective.run.prepared.prepare` calls `fit_firewalls`).

A `PerplexityFilter` without `threshold` is fitted from benign messages: `fit_messages`
relays of the receiver's in-neighbours at rounds of the train part (never the eval part):
each the last B tokens the sender read through its own view (a masked view's placeholders
included), B its message budget cut to that link's; the in-links taken in turn, the round
starts drawn from the scenario seed, decoded to text and cut to the link's budgets as they
would travel. A shuffling sender's are shuffled; a sender that writes or searches its
messages is stood in for by its relay (an attacker by its `benign` policy); a silent one
sends none. Each goes through
the filters before it in the receiver's firewall, then is scored like a message by the
receiver's model (`collective.run.firewall.message_nll`: every benign message of every
receiver of a model in one batched pass); the threshold is the (1 - false_drop_rate)
empirical quantile of their scores (the windowed score for the windowed variant), so that at
most that share of them would be dropped.
"""

from __future__ import annotations

import math
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
)
from collective.seeding import generator


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


def benign_messages(
    scenario: Scenario, graph: nx.DiGraph, observer: Observer, tokenizer: TextCodec, receiver: str, index: int
) -> list[MessageRecord]:
    """The benign messages a receiver's filter `index` is fitted on: what its in-neighbours
    relay (the last B tokens of what they read, through their own views: a masked view's
    placeholders included, as their real relays carry them) at rounds that start at train-part
    positions drawn from the scenario seed, decoded and cut to the link's budgets as they
    would travel; the in-links taken in turn (sender: that in-link's sender; round_sent: -1,
    -2, ... so that no seed they draw is a real message's). `observer` holds the train part
    only, so nothing after it can be read."""
    spec = scenario.node(receiver).firewall[index]
    assert isinstance(spec, PerplexityFilter)
    bus = scenario.bus
    train = len(observer.stream)
    policies = link_policies(bus, graph.edges())
    budgets = message_token_budgets(bus, graph)
    links = [
        (sender, min(budgets[sender], policies[(sender, receiver)].max_message_tokens), policies[(sender, receiver)].max_message_bytes)
        for sender in graph.predecessors(receiver)
        if _benign_policy(scenario.node(sender).message) != "silent"
    ]
    links = [link for link in links if link[1] > 0]
    field = f"nodes.{receiver}.firewall[{index}] (perplexity)"
    if not links:
        raise ValueError(
            f"{field}: no in-neighbour sends a benign message to fit the threshold on (every sender is silent "
            "or has a 0-token budget); give the filter a `threshold`"
        )
    longest = max(tokens for _, tokens, _ in links)
    if train < max(longest, bus.round_tokens):
        raise ValueError(
            f"{field}: fitting needs train-part windows of {longest} tokens (the in-links' budget), but "
            f"corpus.train_tokens is {train}; raise corpus.train_tokens or give the filter a `threshold`"
        )
    gen = generator(scenario.seed, "firewall-fit", receiver, index)
    out = []
    for m in range(spec.fit_messages):
        sender, tokens, max_bytes = links[m % len(links)]
        at = int(torch.randint(0, train - bus.round_tokens + 1, (1,), generator=gen))  # the round's start
        seen = observer.observe(sender, at)
        relayed = torch.cat([seen.prefix_ids, seen.round_inputs])[-tokens:]
        if _benign_policy(scenario.node(sender).message) == "shuffle":
            relayed = relayed[torch.randperm(len(relayed), generator=gen)]
        text = tokenizer.decode(relayed.tolist(), skip_special_tokens=True)
        text, n_tokens, n_bytes, _ = enforce_budget(text, tokenizer, tokens, max_bytes)
        out.append(
            MessageRecord(
                sender=sender, receiver=receiver, round_sent=-1 - m, deliver_round=0, text=text, n_tokens=n_tokens, n_bytes=n_bytes
            )
        )
    return out


def fitted_threshold(scores: torch.Tensor, spec: PerplexityFilter, mean_tokens: float) -> tuple[float, FilterFit]:
    """The (1 - false_drop_rate) empirical quantile of the benign scores (n,): the smallest
    score with at least that share of the scores at or below it, so that at most
    `false_drop_rate` of them lie above it (and are dropped); and the fit's record."""
    ordered = scores.sort().values  # (n,)
    rank = math.ceil((1.0 - spec.false_drop_rate) * len(ordered) - 1e-9)  # 1-based; the epsilon keeps 0.95 * 20 at 19
    threshold = float(ordered[max(rank, 1) - 1])
    return threshold, FilterFit(
        benign_messages=len(scores), mean_tokens=mean_tokens, false_drop_rate=spec.false_drop_rate,
        fit_drop_rate=float((scores > threshold).double().mean()),
    )


def _fit_model(loaded: LoadedModel, scenario: Scenario, graph: nx.DiGraph, train: Observer, due: dict[str, int], fitted: FittedFirewalls) -> None:
    """Fit filter `due[node]` of every node of one model: the benign messages through the filters
    before it, then every survivor of every node scored in one pass."""
    tok, batch_tokens = loaded.tokenizer, scenario.evaluation.batch_tokens
    reads = [
        InboxRead(node, scenario.seed, tuple(benign_messages(scenario, graph, train, tok, node, k)), fitted.filters[node][:k], "", "")
        for node, k in due.items()
    ]
    kept = [[s for s in items if s.dropped_by is None] for items in screen(loaded.model, tok, reads, batch_tokens=batch_tokens)]
    ids = [[s.token_ids(tok) for s in items] for items in kept]
    nll = message_nll(loaded.model, tok, [row for rows in ids for row in rows], batch_tokens=batch_tokens)
    at = 0
    for (node, k), rows in zip(due.items(), ids, strict=True):
        spec = fitted.filters[node][k]
        assert isinstance(spec, PerplexityFilter)
        if not rows:
            raise ValueError(
                f"nodes.{node}.firewall[{k}] (perplexity): the filters before it dropped every benign train-part "
                "message, so there is nothing to fit its threshold on; give it a `threshold` or loosen them"
            )
        scores = torch.tensor([message_score(values, spec.window) for values in nll[at : at + len(rows)]], dtype=torch.float64)
        at += len(rows)
        threshold, fit = fitted_threshold(scores, spec, sum(map(len, rows)) / len(rows))
        fitted.fits.setdefault(node, {})[k] = fit
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
