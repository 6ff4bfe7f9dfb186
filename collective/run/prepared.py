"""A prepared run: everything a run needs before its first round, checked on user input.

`prepare(scenario, pool)` builds the topology, loads the models (one copy per distinct
model; every model must share one tokenizer), reads and tokenizes the corpus, resolves
the masked views' placeholders and the fixed controllers' prompts, fits the firewalls'
perplexity thresholds on the train part (`collective.run.firewall_fit`) and loads the
optional yardstick (`evaluation.yardstick`, `load_yardstick`: its tokenizer may differ, its
token bytes must be readable), so that mistakes surface in seconds with a clear `RunError`.
The `Prepared` it returns feeds the round engine (`RoundEngine.from_prepared`), the
controllers' search and the distributed coordinator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch

from collective.lm.byte_vocab import ByteVocabError, byte_vocab
from collective.lm.codec import TextCodec
from collective.lm.corpus import load_corpus_text, token_byte_lengths, tokenize_stream
from collective.lm.models import (
    LoadedModel,
    ModelLoadError,
    ModelPool,
    TokenizerMismatchError,
    check_same_tokenizer,
)
from collective.records import FilterFit
from collective.run.bus import link_policies
from collective.run.byte_mode import ByteMode, ByteUnitError, Unit, byte_mode_for, run_unit
from collective.run.firewall_fit import fit_firewalls
from collective.run.replay import ReplayError, replay_texts
from collective.run.yardstick import Yardstick
from collective.scenario import (
    AttackMessage,
    FirewallFilter,
    FixedController,
    GCGController,
    MaskedView,
    NodeSpec,
    Scenario,
    SearchMessage,
)
from collective.scenario_errors import RunError
from topologies import build_topology


@dataclass
class Prepared:
    scenario: Scenario
    models: dict[str, LoadedModel]  # alias -> one loaded copy (shared by nodes)
    graph: nx.DiGraph
    stream: torch.Tensor  # (S,) train part then eval part
    byte_lengths: torch.Tensor  # (S,)
    placeholder_ids: dict[str, int]
    control_ids: dict[str, list[int]] = field(default_factory=dict)
    # node -> its firewall with every threshold set (fitted ones filled in), for each node that
    # has one; a Prepared built without it (the controllers' training runs) screens nothing
    firewalls: dict[str, tuple[FirewallFilter, ...]] = field(default_factory=dict)
    firewall_fits: dict[str, dict[int, FilterFit]] = field(default_factory=dict)  # node -> filter index -> fit
    yardstick: Yardstick | None = None  # `evaluation.yardstick`, loaded once (None: none, or a controllers' training run)
    replay_texts: dict[str, dict[int, str | None]] = field(default_factory=dict)  # `replay` nodes: round -> text
    byte_mode: ByteMode | None = None  # a byte-unit run (`collective.run.byte_mode`); None: token unit

    @property
    def unit(self) -> Unit:
        return "token" if self.byte_mode is None else "byte"

    @property
    def tokenizer(self) -> TextCodec:
        """The stream tokenizer: the first model's (in a token-unit run, the one every model shares)."""
        return next(iter(self.models.values())).tokenizer

    def node_tokenizer(self, node_id: str) -> TextCodec:
        """The tokenizer of the node's model (its control prompt's, its messages')."""
        return self.models[self.scenario.node(node_id).model].tokenizer


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
    """A searched message or an attack needs readers, and room on every out-link for at least
    one token and one byte: a `RunError` naming the node's field otherwise."""
    policies = link_policies(scenario.bus, graph.edges())
    for index, node in enumerate(scenario.nodes):
        if not isinstance(node.message, SearchMessage | AttackMessage):
            continue
        field = f"nodes[{index}].message (node {node.id!r}, policy {node.message.policy})"
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
                    f"{link.max_message_bytes} bytes; a searched or attack message needs at least 1 of each: raise "
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
    them (`objective: receiver`, an attack's threat `white-box`; nor does it hold a second
    model for a `transfer` attack): a `RunError` naming the node's field. A firewall runs
    distributed: the receiving node screens its inbox with the filters the coordinator fitted
    (`collective.distributed`)."""
    for index, node in enumerate(scenario.nodes):
        if isinstance(node.message, SearchMessage) and node.message.objective == "receiver":
            raise RunError(
                f"nodes[{index}].message.objective (node {node.id!r}): `receiver` scores the message on the "
                "receivers' own views, which a distributed node cannot see; use `objective: sender` in a "
                "distributed run (or run it embedded, --bus memory)"
            )
        refuse_distributed_attack(index, node)


def refuse_distributed_attack(index: int, node: NodeSpec) -> None:
    """An attack in a distributed run: threat `white-box` needs the readers' views, which a
    node cannot see, and `transfer` a second model, which a node does not hold: a `RunError`
    naming the node's field (model-only works distributed)."""
    spec = node.message
    if not isinstance(spec, AttackMessage) or spec.threat == "model-only":
        return
    why = (
        "scores the message on the readers' own views, which a distributed node cannot see"
        if spec.threat == "white-box"
        else f"searches on a second model ({spec.search_model!r}), which a distributed node does not hold"
    )
    raise RunError(
        f"nodes[{index}].message.threat (node {node.id!r}): `{spec.threat}` {why}; use `threat: model-only` in a "
        "distributed run (the attacker's own view stands in for its readers'), or run it embedded (--bus memory)"
    )


def check_attack_targets(scenario: Scenario, tokenizer: TextCodec) -> None:
    """A targeted attack's `target` must be text the tokenizer encodes to tokens that read
    back as the same text (the readers are scored on those tokens): a `RunError` otherwise."""
    for index, node in enumerate(scenario.nodes):
        spec = node.message
        if not isinstance(spec, AttackMessage) or spec.target is None:
            continue
        ids = tokenizer.encode(spec.target, add_special_tokens=False)
        back = tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
        if ids and back == spec.target:
            continue
        found = "encodes to no token" if not ids else f"encodes to {len(ids)} token(s) that read back as {back!r}"
        raise RunError(
            f"nodes[{index}].message.target (node {node.id!r}): {spec.target!r} {found} with this tokenizer, so the "
            "readers cannot be scored on it; use plain text that the tokenizer encodes and decodes unchanged "
            "(no special tokens such as the end-of-text marker, no text the tokenizer normalizes)"
        )


def check_transfer_models(scenario: Scenario, models: dict[str, LoadedModel]) -> None:
    """A transfer attack's search model must share the tokenizer of the model its readers run
    (the message is searched as token ids on one and read as the same ids by the other): a
    `RunError` naming both aliases otherwise. Aliases not loaded here are skipped."""
    for index, node in enumerate(scenario.nodes):
        spec = node.message
        if not isinstance(spec, AttackMessage) or spec.search_model not in models or node.model not in models:
            continue
        try:
            check_same_tokenizer({node.model: models[node.model], spec.search_model: models[spec.search_model]})
        except TokenizerMismatchError as exc:
            raise RunError(
                f"nodes[{index}].message.search_model (node {node.id!r}, threat transfer): the search model "
                f"{spec.search_model!r} and the readers' model {node.model!r} do not share a tokenizer ({exc}); "
                f"a transfer attack needs a search model of the same tokenizer family as {node.model!r}"
            ) from None


def load_models(
    scenario: Scenario, pool: ModelPool, only: set[str] | None = None, *, one_tokenizer: bool = True
) -> dict[str, LoadedModel]:
    """One loaded copy of each model the run uses; one_tokenizer: they must share a tokenizer
    (`prepare` checks that itself, after reading `evaluation.unit`)."""
    searched_on = {n.message.search_model for n in scenario.nodes if isinstance(n.message, AttackMessage)} - {None}
    used = {node.model for node in scenario.nodes} | {scenario.reference_model} | searched_on
    if only is not None:
        used &= only
    models = {}
    for alias in scenario.models:
        if alias in used:
            spec = scenario.models[alias]
            models[alias] = pool.get(spec.ref, device=spec.device, dtype=spec.dtype)
    check_transfer_models(scenario, models)
    if one_tokenizer:
        check_same_tokenizer(models)
    return models


def control_ids_for(scenario: Scenario, tokenizers: TextCodec | Mapping[str, TextCodec]) -> dict[str, list[int]]:
    """Prompts that need no search: none and fixed controllers, in the tokenizer every model
    shares, or per model alias (a byte-unit run)."""
    controls = {}
    for node in scenario.nodes:
        if isinstance(node.controller, FixedController):
            tokenizer = tokenizers[node.model] if isinstance(tokenizers, Mapping) else tokenizers
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
    models = load_models(scenario, pool, one_tokenizer=False)
    mode = _byte_mode(scenario, models)
    tokenizer: TextCodec = next(iter(models.values())).tokenizer
    check_attack_targets(scenario, tokenizer)
    corpus = scenario.corpus
    text = load_corpus_text(corpus.source, corpus.path, base_dir=base_dir)
    needed = corpus.offset_tokens + corpus.train_tokens + corpus.eval_tokens
    stream = tokenize_stream(text, tokenizer, needed)[corpus.offset_tokens :]
    byte_lengths = token_byte_lengths(stream, tokenizer)
    placeholders = placeholder_ids_for(scenario, tokenizer)
    try:
        fitted = fit_firewalls(scenario, models, graph, stream, placeholders)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    controls = control_ids_for(scenario, tokenizer if mode is None else {a: lm.tokenizer for a, lm in models.items()})
    return Prepared(
        scenario, models, graph, stream, byte_lengths, placeholders, controls,
        firewalls=fitted.filters, firewall_fits=fitted.fits,
        yardstick=load_yardstick(scenario, pool, models, stream, byte_lengths),
        replay_texts=_replays(scenario, base_dir), byte_mode=mode,
    )


def _byte_mode(scenario: Scenario, models: dict[str, LoadedModel]) -> ByteMode | None:
    """The run's byte mode (None: a token-unit run, whose models must share a tokenizer)."""
    try:
        if run_unit(scenario, models) == "token":
            check_same_tokenizer(models)
            return None
        return byte_mode_for(scenario, models, next(iter(models)))
    except ByteUnitError as exc:
        raise RunError(str(exc)) from None


def _replays(scenario: Scenario, base_dir: Path) -> dict[str, dict[int, str | None]]:
    try:
        return replay_texts(scenario, base_dir)
    except ReplayError as exc:
        raise RunError(str(exc)) from None


YARDSTICK_FIELD = "evaluation.yardstick"


def load_yardstick(
    scenario: Scenario, pool: ModelPool, models: dict[str, LoadedModel], stream: torch.Tensor, byte_lengths: torch.Tensor
) -> Yardstick | None:
    """The scenario's yardstick, loaded once from the pool (an alias of `models` with its dtype
    and device, else a model ref as `models` takes it), or None. With another tokenizer than
    the stream's, both tokenizers' token bytes must be recoverable (`byte_vocab`) and the
    stream's must count the eval part's bytes as the rows do. Any failure: a `RunError` naming
    the field and the model."""
    name = scenario.evaluation.yardstick
    if name is None:
        return None
    spec = scenario.models.get(name)
    ref, device, dtype = (spec.ref, spec.device, spec.dtype) if spec is not None else (name, "auto", "auto")
    try:
        lm = pool.get(ref, device=device, dtype=dtype)
    except (ModelLoadError, OSError, ValueError) as exc:
        raise RunError(
            f"{YARDSTICK_FIELD}: the yardstick {name!r} (model {ref!r}) could not be loaded: {exc}; name an alias of "
            "`models` or a model that loads offline (an installed alias, a local folder or a .gguf file)"
        ) from None
    stream_lm = next(iter(models.values()))
    try:
        check_same_tokenizer({"stream": stream_lm, "yardstick": lm})
        return Yardstick(lm, name)
    except TokenizerMismatchError:
        pass
    try:
        stream_vocab, vocab = byte_vocab(stream_lm.tokenizer), byte_vocab(lm.tokenizer)
    except ByteVocabError as exc:
        raise RunError(
            f"{YARDSTICK_FIELD}: the yardstick {name!r} (model {ref!r}) has another tokenizer than the stream's "
            f"({stream_lm.name}), so it is scored on the same text in bytes, but {exc}; use a byte-level BPE or a "
            "byte-fallback SentencePiece model"
        ) from None
    eval_part = stream[scenario.corpus.train_tokens :]
    if len(stream_vocab.decode(eval_part.tolist())) != int(byte_lengths[scenario.corpus.train_tokens :].sum()):
        raise RunError(
            f"{YARDSTICK_FIELD}: the stream tokenizer's token bytes do not add up to the eval part's byte count, "
            f"so the yardstick {name!r} cannot be scored on the same bytes as the other rows"
        )
    return Yardstick(lm, name, stream_vocab=stream_vocab, vocab=vocab)


def needs_search(scenario: Scenario) -> bool:
    return any(isinstance(node.controller, GCGController) for node in scenario.nodes)
