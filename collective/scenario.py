"""The scenario: one YAML file that says everything a run computes.

`load_scenario(path)` reads YAML, validates it once against the frozen pydantic models
(the parts live in `collective.specs` and are re-exported here) and expands the node list
(defaults, a count-based template, per-node overrides) so that the rest of the code gets a
`Scenario` whose `nodes` are complete `NodeSpec`s. Every problem becomes a `ScenarioError`
whose message (`collective.scenario_errors`) names the file, the YAML path of the field,
what was found and what was expected. A field that is accepted but does nothing any more
(`UNUSED_FIELDS`: older scenarios still load) is a logged warning naming the file and field.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError

from collective.idle_fields import idle_fields
from collective.scenario_errors import (
    FieldError,
    ScenarioError,
    field_names,
    format_field_error,
    format_validation_error,
)
from collective.specs import (
    NODE_ID_PATTERN,
    AggregatorSpec,
    AttackMessage,
    BusSpec,
    CharsetFilter,
    ControllerSpec,
    CorpusSpec,
    EvaluationSpec,
    FirewallFilter,
    FixedController,
    Frozen,
    FullView,
    GCGController,
    GenerateMessage,
    LaggedView,
    LinkOverride,
    MaskedView,
    MessageSpec,
    ModelSpec,
    NoController,
    NodeDefaults,
    NodeEntry,
    NodeOverride,
    NodeSpec,
    NodeTemplate,
    NoView,
    ParaphraseFilter,
    PerplexityFilter,
    RelayMessage,
    ReplayMessage,
    RetokenizeFilter,
    SearchMessage,
    ShuffleMessage,
    SilentMessage,
    TopologySpec,
    ViewSpec,
    WindowView,
)

logger = logging.getLogger(__name__)

# fields a scenario may still hold but that do nothing: (section, field) -> why; loading
# such a file logs a warning naming the file and the field (the CLI prints it on stderr)
UNUSED_FIELDS = {
    ("evaluation", "n_boot"): "unused since report 6: the intervals are no longer a block bootstrap; remove it",
    ("evaluation", "block_rounds"): "unused since report 6: the intervals are no longer a block bootstrap; remove it",
}

__all__ = [
    "NODE_ID_PATTERN",
    "SCENARIO_SCHEMA_VERSION",
    "AggregatorSpec",
    "AttackMessage",
    "BusSpec",
    "CharsetFilter",
    "ControllerSpec",
    "CorpusSpec",
    "EvaluationSpec",
    "FirewallFilter",
    "FixedController",
    "FullView",
    "GCGController",
    "GenerateMessage",
    "LaggedView",
    "LinkOverride",
    "MaskedView",
    "MessageSpec",
    "ModelSpec",
    "NoController",
    "NoView",
    "NodeDefaults",
    "NodeEntry",
    "NodeOverride",
    "NodeSpec",
    "NodeTemplate",
    "ParaphraseFilter",
    "PerplexityFilter",
    "RelayMessage",
    "ReplayMessage",
    "RetokenizeFilter",
    "Scenario",
    "ScenarioError",
    "ScenarioFile",
    "SearchMessage",
    "ShuffleMessage",
    "SilentMessage",
    "TopologySpec",
    "ViewSpec",
    "WindowView",
    "check_node_id",
    "load_scenario",
    "parse_scenario",
    "scenario_json_schema",
]

SCENARIO_SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------- the scenario


def _model_entry_tag(value: Any) -> str:
    return "ref" if isinstance(value, str) else "spec"


def _nodes_tag(value: Any) -> str:
    return "list" if isinstance(value, list) else "template"


# Unions chosen by the input's YAML type, so that an error is reported once, on the branch
# the user meant (a plain union reports every branch's failure, under tags like
# `list[NodeEntry]` that are not in the file).
ModelEntry = Annotated[
    Annotated[ModelSpec, Tag("spec")] | Annotated[str, Tag("ref")], Discriminator(_model_entry_tag)
]
NodesEntry = Annotated[
    Annotated[list[NodeEntry], Tag("list")] | Annotated[NodeTemplate, Tag("template")], Discriminator(_nodes_tag)
]


class ScenarioFile(Frozen):
    """The file as written: node list or template, defaults not yet applied."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,80}$")
    description: str = ""
    seed: int = 0
    corpus: CorpusSpec = CorpusSpec()
    models: dict[str, ModelEntry]
    node_defaults: NodeDefaults = NodeDefaults()
    nodes: NodesEntry
    topology: TopologySpec = TopologySpec()
    bus: BusSpec = BusSpec()
    aggregator: AggregatorSpec = AggregatorSpec()
    evaluation: EvaluationSpec = EvaluationSpec()


class Scenario(Frozen):
    """A validated scenario with every node resolved. This is what the library consumes."""

    schema_version: Literal[1] = 1
    name: str
    description: str = ""
    seed: int
    corpus: CorpusSpec
    models: dict[str, ModelSpec]
    nodes: list[NodeSpec]
    topology: TopologySpec
    bus: BusSpec
    aggregator: AggregatorSpec
    evaluation: EvaluationSpec

    def _order(self) -> tuple[list[str], dict[str, int]]:
        """The node ids in order and id -> position, computed on first use. Kept in the
        instance's __dict__ as a cached_property would be (not a field: equality, dumps and
        the schema ignore it) with the `nodes` list they came from: a copy with other nodes
        (`model_copy(update=...)` copies the __dict__) holds another list and computes its own."""
        cached = self.__dict__.get("_node_order")
        if cached is None or cached[0] is not self.nodes:
            ids = [node.id for node in self.nodes]
            cached = (self.nodes, ids, {node_id: i for i, node_id in enumerate(ids)})
            self.__dict__["_node_order"] = cached
        return cached[1], cached[2]

    @property
    def node_ids(self) -> list[str]:
        """The node ids in order, computed once (a shared list: do not modify it)."""
        return self._order()[0]

    def node_index(self, node_id: str) -> int:
        """The position of node `node_id` in `nodes` (KeyError: no such node)."""
        return self._order()[1][node_id]

    def node(self, node_id: str) -> NodeSpec:
        return self.nodes[self.node_index(node_id)]

    @property
    def reference_model(self) -> str:
        return self.evaluation.reference_model or next(iter(self.models))

    def view_reach(self, node: NodeSpec) -> int:
        """How many tokens before a round this node's view reaches back."""
        return node.view.reach(self.evaluation.context_tokens)

    @property
    def max_reach(self) -> int:
        return max([self.evaluation.context_tokens] + [self.view_reach(n) for n in self.nodes])

    @property
    def eval_rounds(self) -> int:
        return self.corpus.eval_tokens // self.bus.round_tokens

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _resolve_nodes(raw: ScenarioFile) -> list[dict[str, Any]]:
    defaults = raw.node_defaults.model_dump(exclude_none=True)
    if isinstance(raw.nodes, NodeTemplate):
        ids = [f"{raw.nodes.id_prefix}{i}" for i in range(raw.nodes.count)]
        unknown = sorted(set(raw.nodes.overrides) - set(ids))
        if unknown:
            raise FieldError(
                ("nodes", "overrides", unknown[0]),
                f"no node named {unknown[0]!r}; the template makes {ids[0]} .. {ids[-1]}",
            )
        entries = [
            {"id": node_id, **raw.nodes.overrides.get(node_id, NodeOverride()).model_dump(exclude_none=True)}
            for node_id in ids
        ]
    else:
        entries = [entry.model_dump(exclude_none=True) for entry in raw.nodes]
    resolved = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if entry["id"] in seen:
            raise FieldError(("nodes", index, "id"), f"node id {entry['id']!r} appears twice")
        seen.add(entry["id"])
        node = {**defaults, **entry}  # what is still unset takes NodeSpec's built-in default
        if "model" not in node:
            raise FieldError(
                ("nodes", index, "model"), f"node {entry['id']!r} has no `model` and `node_defaults` gives none; set one of them"
            )
        resolved.append(node)
    return resolved


def _pool_and_attack_checks(scenario: Scenario, node_ids: list[str]) -> None:
    """`aggregator.exclude` names nodes and leaves the pools someone; a transfer attack's
    search model is defined."""
    for index, name in enumerate(scenario.aggregator.exclude):
        if name not in node_ids:
            raise FieldError(("aggregator", "exclude", index), f"{name!r} is not a node ({', '.join(node_ids)})")
    if scenario.aggregator.exclude and set(scenario.aggregator.exclude) >= set(node_ids):
        raise FieldError(("aggregator", "exclude"), "every node is excluded from the pools; leave at least one in")
    if scenario.aggregator.kind == "readout" and scenario.aggregator.node in scenario.aggregator.exclude:
        raise FieldError(("aggregator", "exclude"), f"the readout node {scenario.aggregator.node!r} cannot be excluded")
    for index, node in enumerate(scenario.nodes):
        spec = node.message
        if isinstance(spec, AttackMessage) and spec.search_model is not None and spec.search_model not in scenario.models:
            raise FieldError(
                ("nodes", index, "message", "search_model"),
                f"{spec.search_model!r} is not in `models` (defined: {', '.join(scenario.models)})",
            )


def _cross_checks(scenario: Scenario) -> None:
    node_ids = scenario.node_ids
    for index, node in enumerate(scenario.nodes):
        if node.model not in scenario.models:
            raise FieldError(
                ("nodes", index, "model"),
                f"node {node.id!r} uses model {node.model!r}, which `models` does not define "
                f"(defined: {', '.join(scenario.models)})",
            )
    if scenario.evaluation.reference_model and scenario.evaluation.reference_model not in scenario.models:
        raise FieldError(
            ("evaluation", "reference_model"),
            f"{scenario.evaluation.reference_model!r} is not in `models` (defined: {', '.join(scenario.models)})",
        )
    if scenario.aggregator.kind == "readout" and scenario.aggregator.node not in node_ids:
        raise FieldError(
            ("aggregator", "node"), f"readout node {scenario.aggregator.node!r} is not a node ({', '.join(node_ids)})"
        )
    _pool_and_attack_checks(scenario, node_ids)
    _speaker_latency_check(scenario)
    for index, link in enumerate(scenario.bus.links):
        for end in ("source", "target"):
            if getattr(link, end) not in node_ids:
                raise FieldError(("bus", "links", index, end), f"{getattr(link, end)!r} is not a node")
    if scenario.topology.kind == "edges":
        for index, (a, b) in enumerate(scenario.topology.edges or []):
            for name in (a, b):
                if name not in node_ids:
                    raise FieldError(("topology", "edges", index), f"edge endpoint {name!r} is not a node")
    if scenario.eval_rounds < 1:
        raise FieldError(
            ("corpus", "eval_tokens"),
            f"{scenario.corpus.eval_tokens} eval tokens make no whole round of {scenario.bus.round_tokens} tokens",
        )
    needed = scenario.evaluation.warmup_rounds * scenario.bus.round_tokens + scenario.max_reach
    gcg = [n.controller for n in scenario.nodes if isinstance(n.controller, GCGController)]
    # the controllers' training rounds, then their validation slice, are the last rounds of the train part
    train_rounds = max((spec.train_rounds for spec in gcg), default=0)
    validation_rounds = max((spec.validation_rounds for spec in gcg), default=0)
    needed += (train_rounds + validation_rounds) * scenario.bus.round_tokens
    if scenario.corpus.train_tokens < needed:
        raise FieldError(
            ("corpus", "train_tokens"),
            f"found {scenario.corpus.train_tokens}; the warm-up rounds and the longest view need the "
            f"{needed} tokens before the eval part to come from the train part "
            f"({scenario.evaluation.warmup_rounds} warm-up rounds x {scenario.bus.round_tokens} + {scenario.max_reach}"
            + (f" + {train_rounds} controller training rounds" if gcg else "")
            + (f" + {validation_rounds} controller validation rounds" if validation_rounds else "")
            + ")",
        )


def _speaker_latency_check(scenario: Scenario) -> None:
    """A speaker (`objective: speak`) is scored on what its readers read within its
    train_rounds; a message sent in round r is read in round r + latency, so when every
    out-link's latency (the bus default, or this node's link overrides) is at least
    train_rounds, nothing it writes is ever read and the search fails after its model work."""
    for index, node in enumerate(scenario.nodes):
        spec = node.controller
        if not (isinstance(spec, GCGController) and spec.objective == "speak"):
            continue
        overrides = [link.latency_rounds for link in scenario.bus.links if link.source == node.id and link.latency_rounds]
        fastest = min([scenario.bus.latency_rounds, *overrides])
        if spec.train_rounds <= fastest:
            raise FieldError(
                ("nodes", index, "controller", "train_rounds"),
                f"node {node.id!r} speaks (objective: speak) over {spec.train_rounds} train round(s), but its out-links' "
                f"latency is {fastest} round(s), so none of its messages is read within them; set train_rounds above "
                f"{fastest} (or lower bus.latency_rounds)",
            )


@functools.cache
def _scenario_keys() -> frozenset[str]:
    """Every key a scenario file may hold: what a misspelt key is compared with."""
    return frozenset(field_names(ScenarioFile))


def parse_scenario(data: Any, source: str = "<scenario>", base_dir: Path | None = None) -> Scenario:
    """Validate already-parsed YAML data; relative paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a YAML mapping at the top level, found {type(data).__name__}")
    try:
        raw = ScenarioFile.model_validate(data)
    except ValidationError as error:
        raise ScenarioError(format_validation_error(source, error, data, _scenario_keys())) from None
    resolved: dict[str, Any] = {}
    try:
        nodes = _resolve_nodes(raw)
        models = {k: (ModelSpec(ref=v) if isinstance(v, str) else v) for k, v in raw.models.items()}
        corpus, topology = raw.corpus, raw.topology
        if base_dir is not None:
            if corpus.path is not None and not corpus.path.is_absolute():
                corpus = corpus.model_copy(update={"path": (base_dir / corpus.path)})
            if topology.path is not None and not topology.path.is_absolute():
                topology = topology.model_copy(update={"path": (base_dir / topology.path)})
        resolved = {
            **raw.model_dump(exclude={"nodes", "node_defaults", "models", "corpus", "topology"}),
            "models": models,
            "nodes": nodes,
            "corpus": corpus,
            "topology": topology,
        }
        scenario = Scenario.model_validate(resolved)
        _cross_checks(scenario)
    except ValidationError as error:
        raise ScenarioError(format_validation_error(source, error, resolved, _scenario_keys())) from None
    except FieldError as error:
        raise ScenarioError(format_field_error(source, error)) from None
    return scenario


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file. Raises ScenarioError with a user-facing message."""
    path = Path(path)
    if not path.exists():
        raise ScenarioError(f"{path}: no such scenario file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read the file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{path}: this is not valid YAML{where}: {problem}") from None
    scenario = parse_scenario(data, source=str(path), base_dir=path.parent)
    for message in [*unused_fields(data, str(path)), *idle_fields(data, scenario, str(path))]:
        logger.warning("%s", message)
    return scenario


def unused_fields(data: dict[str, Any], source: str) -> list[str]:
    """One line per field of UNUSED_FIELDS that `data` (a valid scenario's YAML) sets:
    `source: evaluation.n_boot is unused since report 6: ...`."""
    found = []
    for (section, name), why in UNUSED_FIELDS.items():
        part = data.get(section)
        if isinstance(part, dict) and name in part:
            found.append(f"{source}: {section}.{name} is {why}")
    return found


def scenario_json_schema() -> dict[str, Any]:
    """JSON Schema of the scenario file, for editors."""
    schema = ScenarioFile.model_json_schema()
    schema["title"] = "collective scenario"
    return schema


def check_node_id(value: str) -> bool:
    return re.fullmatch(NODE_ID_PATTERN, value) is not None
