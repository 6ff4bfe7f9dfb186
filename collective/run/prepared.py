"""A prepared run: everything a run needs before its first round, checked on user input.

`prepare(scenario, pool)` builds the topology, loads the models (one copy per distinct
model; every model must share one tokenizer), reads and tokenizes the corpus, resolves
the masked views' placeholders and the fixed controllers' prompts, so that mistakes
surface in seconds with a clear `RunError`. The `Prepared` it returns feeds the round
engine (`RoundEngine.from_prepared`), the controllers' search and the distributed
coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch

from collective.lm.codec import TextCodec
from collective.lm.corpus import load_corpus_text, token_byte_lengths, tokenize_stream
from collective.lm.models import LoadedModel, ModelPool, check_same_tokenizer
from collective.run.bus import link_policies
from collective.scenario import FixedController, GCGController, MaskedView, Scenario, SearchMessage
from topologies import build_topology


class RunError(Exception):
    """A run cannot start or go on; the message is meant for the user."""


@dataclass
class Prepared:
    scenario: Scenario
    models: dict[str, LoadedModel]  # alias -> one loaded copy (shared by nodes)
    graph: nx.DiGraph
    stream: torch.Tensor  # (S,) train part then eval part
    byte_lengths: torch.Tensor  # (S,)
    placeholder_ids: dict[str, int]
    control_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def tokenizer(self) -> TextCodec:
        """The one tokenizer every model shares."""
        return next(iter(self.models.values())).tokenizer


LINKS_SHOWN = 24  # links listed in the error about an override of a link that does not exist


def build_graph(scenario: Scenario) -> nx.DiGraph:
    """The topology's graph (random kinds drawn from the scenario's seed); every `bus.links`
    override must name one of its links, else a `RunError` names it and lists the real ones."""
    graph = _topology(scenario)
    check_link_overrides(scenario, graph)
    check_searched_messages(scenario, graph)
    check_speakers(scenario, graph)
    return graph


def _topology(scenario: Scenario) -> nx.DiGraph:
    spec = scenario.topology
    if spec.kind == "edges":
        graph = nx.DiGraph()
        graph.add_nodes_from(scenario.node_ids)
        for a, b in spec.edges or []:
            graph.add_edge(a, b)
            if not spec.directed:
                graph.add_edge(b, a)
        return graph
    params = dict(spec.params)
    if spec.kind == "file":
        params["path"] = spec.path
    try:
        return build_topology(spec.kind, scenario.node_ids, seed=scenario.seed, directed=spec.directed, **params)
    except (ValueError, TypeError) as exc:
        raise RunError(f"topology: {exc}") from None


def check_link_overrides(scenario: Scenario, graph: nx.DiGraph) -> None:
    """A link override of a link the graph lacks would change nothing: a `RunError` that names
    it and the links there are. Checked on the built graph, since a random topology's links
    depend on the seed (`collective run --seed` too)."""
    for index, link in enumerate(scenario.bus.links):
        if graph.has_edge(link.source, link.target):
            continue
        spec = scenario.topology
        edges = [f"{a} -> {b}" for a, b in graph.edges()]
        shown = ", ".join(edges[:LINKS_SHOWN]) + (f" ... ({len(edges)} in all)" if len(edges) > LINKS_SHOWN else "")
        kind = f"{spec.kind}, {'directed' if spec.directed else 'undirected: each edge is a link each way'}"
        raise RunError(
            f"bus.links[{index}]: there is no link {link.source} -> {link.target} in this topology ({kind}, seed "
            f"{scenario.seed}), so this override would change nothing; override one of its links: {shown or 'none'}"
        )


def check_searched_messages(scenario: Scenario, graph: nx.DiGraph) -> None:
    """A searched message needs readers, and room on every out-link for at least one token
    and one byte: a `RunError` naming the node's field otherwise."""
    policies = link_policies(scenario.bus, graph.edges())
    for index, node in enumerate(scenario.nodes):
        if not isinstance(node.message, SearchMessage):
            continue
        field = f"nodes[{index}].message (node {node.id!r}, policy search)"
        receivers = list(graph.successors(node.id))
        if not receivers:
            raise RunError(
                f"{field}: the node has no out-links in this topology, so no one reads what it searches; "
                "give it out-links or another message policy (e.g. silent)"
            )
        for receiver in receivers:
            link = policies[(node.id, receiver)]
            if link.max_message_tokens < 1 or link.max_message_bytes < 1:
                raise RunError(
                    f"{field}: the link {node.id} -> {receiver} has a budget of {link.max_message_tokens} tokens and "
                    f"{link.max_message_bytes} bytes; a searched message needs at least 1 of each: raise "
                    "bus.max_message_tokens / bus.max_message_bytes (or that link's override in bus.links)"
                )


def check_speakers(scenario: Scenario, graph: nx.DiGraph) -> None:
    """A speaker controller (`objective: speak`) lowers its out-neighbours' NLL through the
    messages it writes: a node with no out-links, or one that does not write its messages
    (policy generate), has nothing to search for; a `RunError` naming the field."""
    for node in scenario.nodes:
        if not (isinstance(node.controller, GCGController) and node.controller.objective == "speak"):
            continue
        field = f"nodes.{node.id}.controller.objective"
        if not list(graph.successors(node.id)):
            raise RunError(
                f"{field}: `speak` searches the prompt for the node's readers, but node {node.id!r} has no out-links "
                f"in this topology ({scenario.topology.kind}); give it out-links or use objective local or collective"
            )
        if node.message.policy != "generate":
            raise RunError(
                f"{field}: `speak` searches the prompt that steers the messages the node writes, but node "
                f"{node.id!r} has message policy {node.message.policy!r}; set its message to {{policy: generate}}"
            )


def refuse_receiver_search(scenario: Scenario) -> None:
    """A distributed node never sees its neighbours' views, so it cannot search a message for
    them (`objective: receiver`): a `RunError` naming the node's field."""
    for index, node in enumerate(scenario.nodes):
        if isinstance(node.message, SearchMessage) and node.message.objective == "receiver":
            raise RunError(
                f"nodes[{index}].message.objective (node {node.id!r}): `receiver` scores the message on the "
                "receivers' own views, which a distributed node cannot see; use `objective: sender` in a "
                "distributed run (or run it embedded, --bus memory)"
            )


def load_models(scenario: Scenario, pool: ModelPool, only: set[str] | None = None) -> dict[str, LoadedModel]:
    used = {node.model for node in scenario.nodes} | {scenario.reference_model}
    if only is not None:
        used &= only
    models = {}
    for alias in scenario.models:
        if alias in used:
            spec = scenario.models[alias]
            models[alias] = pool.get(spec.ref, device=spec.device, dtype=spec.dtype)
    check_same_tokenizer(models)
    return models


def control_ids_for(scenario: Scenario, tokenizer: TextCodec) -> dict[str, list[int]]:
    """Prompts that need no search: none and fixed controllers."""
    controls = {}
    for node in scenario.nodes:
        if isinstance(node.controller, FixedController):
            controls[node.id] = list(tokenizer.encode(node.controller.text, add_special_tokens=False))
        else:
            controls[node.id] = []
    return controls


def placeholder_ids_for(scenario: Scenario, tokenizer: TextCodec) -> dict[str, int]:
    """The one token each masked view shows for a hidden token."""
    placeholders = {}
    for index, node in enumerate(scenario.nodes):
        if isinstance(node.view, MaskedView):
            ids = tokenizer.encode(node.view.placeholder, add_special_tokens=False)
            if len(ids) != 1:
                raise RunError(
                    f"nodes[{index}].view.placeholder: {node.view.placeholder!r} is {len(ids)} tokens for "
                    f"this tokenizer; a placeholder must be exactly one token (try '_' or '?')"
                )
            placeholders[node.id] = int(ids[0])
    return placeholders


def prepare(scenario: Scenario, pool: ModelPool, *, base_dir: Path) -> Prepared:
    graph = build_graph(scenario)
    models = load_models(scenario, pool)
    tokenizer: TextCodec = next(iter(models.values())).tokenizer
    corpus = scenario.corpus
    text = load_corpus_text(corpus.source, corpus.path, base_dir=base_dir)
    needed = corpus.offset_tokens + corpus.train_tokens + corpus.eval_tokens
    stream = tokenize_stream(text, tokenizer, needed)[corpus.offset_tokens :]
    byte_lengths = token_byte_lengths(stream, tokenizer)
    return Prepared(
        scenario, models, graph, stream, byte_lengths, placeholder_ids_for(scenario, tokenizer),
        control_ids_for(scenario, tokenizer),
    )


def needs_search(scenario: Scenario) -> bool:
    return any(isinstance(node.controller, GCGController) for node in scenario.nodes)
