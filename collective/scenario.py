"""The scenario: one YAML file that says everything a run computes.

`load_scenario(path)` reads YAML, validates it once against the frozen pydantic models
below and expands the node list (defaults, a count-based template, per-node overrides)
so that the rest of the code gets a `Scenario` whose `nodes` are complete `NodeSpec`s.
Every problem becomes a `ScenarioError` whose message names the file, the YAML path of
the field, what was found and what was expected.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

SCENARIO_SCHEMA_VERSION = 1
NODE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class ScenarioError(Exception):
    """A user mistake in a scenario file; the message is meant to be shown as is."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- corpus


class CorpusSpec(_Frozen):
    """Where the text comes from and how it is split (in tokens of the shared tokenizer)."""

    source: str = Field(
        "builtin:pydoc",
        description="builtin:pydoc (ships with Python), wikitext2, file, or hf:DATASET[:CONFIG][:SPLIT]",
    )
    path: Path | None = Field(None, description="text file for `file`, or the wiki.test.raw for `wikitext2`")
    train_tokens: int = Field(2048, ge=0, description="tokens controllers may look at (also feeds warm-up rounds)")
    eval_tokens: int = Field(512, ge=1, description="tokens only the evaluator scores, right after the train part")
    offset_tokens: int = Field(0, ge=0, description="tokens skipped at the start of the corpus")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in ("builtin:pydoc", "wikitext2", "file") or value.startswith("hf:"):
            return value
        raise ValueError("expected one of builtin:pydoc, wikitext2, file, hf:DATASET[:CONFIG][:SPLIT]")

    @model_validator(mode="after")
    def _file_needs_path(self) -> CorpusSpec:
        if self.source == "file" and self.path is None:
            raise ValueError("source `file` needs `path: some/text.txt`")
        return self


# ---------------------------------------------------------------------------- models


class ModelSpec(_Frozen):
    ref: str = Field(description="alias (smollm2-135m, gemma3-270m), Hugging Face id, local folder or .gguf file")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on the CPU (faster there)"
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1 ...")


# ---------------------------------------------------------------------------- views


class FullView(_Frozen):
    """The last `tokens` tokens before the round (default: evaluation.context_tokens)."""

    kind: Literal["full"] = "full"
    tokens: int | None = Field(None, ge=1)


class WindowView(_Frozen):
    """The last `tokens` tokens before the round."""

    kind: Literal["window"] = "window"
    tokens: int = Field(ge=0)


class LaggedView(_Frozen):
    """A window of `tokens` tokens that ends `lag` tokens before the round: a delayed sensor."""

    kind: Literal["lagged"] = "lagged"
    tokens: int = Field(ge=1)
    lag: int = Field(ge=1)


class MaskedView(_Frozen):
    """The last `tokens` tokens, each kept with probability `keep`, else `placeholder` (seeded)."""

    kind: Literal["masked"] = "masked"
    tokens: int = Field(ge=1)
    keep: float = Field(ge=0.0, le=1.0)
    placeholder: str = Field("_", min_length=1)


class NoView(_Frozen):
    """Nothing of the text before the round: the node knows only what messages tell it."""

    kind: Literal["none"] = "none"


ViewSpec = Annotated[FullView | WindowView | LaggedView | MaskedView | NoView, Field(discriminator="kind")]


# ---------------------------------------------------------------------------- messages


class GenerateMessage(_Frozen):
    """The node's model writes one message a round, broadcast to its out-neighbours."""

    policy: Literal["generate"] = "generate"
    speak_prompt: str = Field("\nIn short:", description="appended after the node's context before it writes")
    sampling: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0.0)
    max_tokens: int | None = Field(None, ge=1, description="at most the bus budget; default: the budget")


class RelayMessage(_Frozen):
    """The last B tokens of the node's view, verbatim (B = the link's token budget)."""

    policy: Literal["relay"] = "relay"


class SilentMessage(_Frozen):
    policy: Literal["silent"] = "silent"


MessageSpec = Annotated[GenerateMessage | RelayMessage | SilentMessage, Field(discriminator="policy")]


# ---------------------------------------------------------------------------- controllers


class NoController(_Frozen):
    kind: Literal["none"] = "none"


class FixedController(_Frozen):
    kind: Literal["fixed"] = "fixed"
    text: str = Field(min_length=1)


class GCGController(_Frozen):
    """Greedy coordinate gradient over `tokens` control tokens, on the train part only."""

    kind: Literal["gcg"] = "gcg"
    tokens: int = Field(8, ge=1, le=64)
    steps: int = Field(20, ge=1)
    search_width: int = Field(64, ge=1)
    topk: int = Field(64, ge=1)
    n_replace: int = Field(1, ge=1)
    buffer_size: int = Field(4, ge=1)
    objective: Literal["local", "collective"] = "local"
    train_rounds: int = Field(4, ge=1, description="train rounds the objective is measured on")
    init: str = Field("x x x x x x x x", description="initial prompt text (cut or padded to `tokens`)")
    sweeps: int = Field(1, ge=1, description="coordinate-descent sweeps over nodes (objective: collective)")
    ascii_only: bool = True
    retokenize_filter: bool = True


ControllerSpec = Annotated[NoController | FixedController | GCGController, Field(discriminator="kind")]


# ---------------------------------------------------------------------------- nodes


class NodeSpec(_Frozen):
    """One node, fully resolved."""

    id: str = Field(pattern=NODE_ID_PATTERN)
    model: str
    view: ViewSpec
    message: MessageSpec
    controller: ControllerSpec = NoController()


class NodeDefaults(_Frozen):
    model: str | None = None
    view: ViewSpec | None = None
    message: MessageSpec | None = None
    controller: ControllerSpec | None = None


class NodeEntry(_Frozen):
    """A node in the `nodes:` list; unset fields come from `node_defaults`."""

    id: str = Field(pattern=NODE_ID_PATTERN)
    model: str | None = None
    view: ViewSpec | None = None
    message: MessageSpec | None = None
    controller: ControllerSpec | None = None


class NodeOverride(_Frozen):
    model: str | None = None
    view: ViewSpec | None = None
    message: MessageSpec | None = None
    controller: ControllerSpec | None = None


class NodeTemplate(_Frozen):
    """`count` nodes named `{id_prefix}{i}`, from `node_defaults`, with per-node overrides."""

    count: int = Field(ge=1, le=4096)
    id_prefix: str = Field("n", pattern=r"^[A-Za-z_-][A-Za-z0-9_-]{0,31}$")
    overrides: dict[str, NodeOverride] = Field(default_factory=dict)


# ---------------------------------------------------------------------------- topology, bus


class TopologySpec(_Frozen):
    kind: str = Field("ring", description="ring, line, star, complete, grid, small_world, scale_free, random_regular, erdos_renyi, file, edges")
    directed: bool = False
    params: dict[str, Any] = Field(default_factory=dict, description="the builder's parameters, e.g. {k: 4, p: 0.1}")
    path: Path | None = Field(None, description="edge list or GraphML file for kind: file")
    edges: list[tuple[str, str]] | None = Field(None, description="explicit edges for kind: edges")

    @model_validator(mode="after")
    def _kind_needs(self) -> TopologySpec:
        if self.kind == "file" and self.path is None:
            raise ValueError("kind `file` needs `path: graph.graphml` (or an edge list)")
        if self.kind == "edges" and not self.edges:
            raise ValueError("kind `edges` needs `edges: [[a, b], ...]`")
        return self


class LinkOverride(_Frozen):
    source: str
    target: str
    max_message_tokens: int | None = Field(None, ge=0)
    max_message_bytes: int | None = Field(None, ge=0)
    latency_rounds: int | None = Field(None, ge=1)
    drop_rate: float | None = Field(None, ge=0.0, le=1.0)


class BusSpec(_Frozen):
    round_tokens: int = Field(32, ge=1, description="stream tokens per round")
    max_message_tokens: int = Field(24, ge=0, description="token budget of one message on a link")
    max_message_bytes: int = Field(160, ge=0, description="UTF-8 byte budget of one message on a link")
    latency_rounds: int = Field(1, ge=1, description="a message sent at the end of round r is read in round r + latency")
    drop_rate: float = Field(0.0, ge=0.0, le=1.0, description="probability a message is lost (seeded per link and round)")
    retain: int = Field(1, ge=1, description="messages kept per neighbour in a receiver's inbox")
    inbox_template: str = Field("{sender}: {text}\n", description="how one message is rendered into the inbox")
    inbox_header: str = Field("", description="text placed before the rendered messages (when any)")
    links: list[LinkOverride] = Field(default_factory=list)

    @field_validator("inbox_template")
    @classmethod
    def _template_has_text(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("the template must contain {text} (and may contain {sender}, {round})")
        try:
            value.format(sender="a", text="b", round=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{sender}}, {{text}} and {{round}} may be used ({exc})") from None
        return value


# ---------------------------------------------------------------------------- aggregation, evaluation


class AggregatorSpec(_Frozen):
    kind: Literal["mean", "logpool", "weighted", "readout"] = "mean"
    method: Literal["hedge", "perplexity"] = Field("hedge", description="weighted only")
    eta: float = Field(1.0, gt=0.0, description="weighted/hedge learning rate per token")
    temperature: float = Field(1.0, gt=0.0, description="weighted/perplexity softmax temperature")
    window_tokens: int = Field(256, ge=1, description="weighted/perplexity trailing window")
    node: str | None = Field(None, description="readout only: the node whose prediction is the answer")

    @model_validator(mode="after")
    def _readout_needs_node(self) -> AggregatorSpec:
        if self.kind == "readout" and not self.node:
            raise ValueError("kind `readout` needs `node: NODE_ID`")
        if self.kind != "readout" and self.node:
            raise ValueError("`node` is only for kind `readout`")
        return self


class EvaluationSpec(_Frozen):
    context_tokens: int = Field(256, ge=1, description="what a `full` view and the reference see before a round")
    warmup_rounds: int = Field(2, ge=0, description="unscored rounds (from the train part) so inboxes fill")
    reference_model: str | None = Field(None, description="model alias for the full-view reference (default: the first)")
    block_rounds: int = Field(1, ge=1, description="bootstrap block length in whole rounds")
    n_boot: int = Field(2000, ge=100)
    top_k: int = Field(64, ge=1, description="candidates kept per position for pooling")
    batch_tokens: int = Field(8192, ge=256, description="padded tokens per forward pass (memory bound)")


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


class ScenarioFile(_Frozen):
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


class Scenario(_Frozen):
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

    @property
    def node_ids(self) -> list[str]:
        return [node.id for node in self.nodes]

    def node(self, node_id: str) -> NodeSpec:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    @property
    def reference_model(self) -> str:
        return self.evaluation.reference_model or next(iter(self.models))

    def view_reach(self, node: NodeSpec) -> int:
        """How many tokens before a round this node's view reaches back."""
        view = node.view
        if isinstance(view, FullView):
            return view.tokens or self.evaluation.context_tokens
        if isinstance(view, LaggedView):
            return view.tokens + view.lag
        if isinstance(view, (WindowView, MaskedView)):
            return view.tokens
        return 0

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
            raise _FieldError(
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
            raise _FieldError(("nodes", index, "id"), f"node id {entry['id']!r} appears twice")
        seen.add(entry["id"])
        node = {**defaults, **entry}
        for key in ("model", "view", "message"):
            if key not in node:
                raise _FieldError(
                    ("nodes", index, key),
                    f"node {entry['id']!r} has no `{key}` and `node_defaults` gives none; set one of them",
                )
        resolved.append(node)
    return resolved


class _FieldError(Exception):
    def __init__(self, loc: tuple[Any, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def _cross_checks(scenario: Scenario) -> None:
    node_ids = scenario.node_ids
    for index, node in enumerate(scenario.nodes):
        if node.model not in scenario.models:
            raise _FieldError(
                ("nodes", index, "model"),
                f"node {node.id!r} uses model {node.model!r}, which `models` does not define "
                f"(defined: {', '.join(scenario.models)})",
            )
    if scenario.evaluation.reference_model and scenario.evaluation.reference_model not in scenario.models:
        raise _FieldError(
            ("evaluation", "reference_model"),
            f"{scenario.evaluation.reference_model!r} is not in `models` (defined: {', '.join(scenario.models)})",
        )
    if scenario.aggregator.kind == "readout" and scenario.aggregator.node not in node_ids:
        raise _FieldError(
            ("aggregator", "node"), f"readout node {scenario.aggregator.node!r} is not a node ({', '.join(node_ids)})"
        )
    for index, link in enumerate(scenario.bus.links):
        for end in ("source", "target"):
            if getattr(link, end) not in node_ids:
                raise _FieldError(("bus", "links", index, end), f"{getattr(link, end)!r} is not a node")
    if scenario.topology.kind == "edges":
        for index, (a, b) in enumerate(scenario.topology.edges or []):
            for name in (a, b):
                if name not in node_ids:
                    raise _FieldError(("topology", "edges", index), f"edge endpoint {name!r} is not a node")
    if scenario.eval_rounds < 1:
        raise _FieldError(
            ("corpus", "eval_tokens"),
            f"{scenario.corpus.eval_tokens} eval tokens make no whole round of {scenario.bus.round_tokens} tokens",
        )
    needed = scenario.evaluation.warmup_rounds * scenario.bus.round_tokens + scenario.max_reach
    train_rounds = [n.controller.train_rounds for n in scenario.nodes if isinstance(n.controller, GCGController)]
    if train_rounds:  # the controllers' training rounds are the last ones of the train part
        needed += max(train_rounds) * scenario.bus.round_tokens
    if scenario.corpus.train_tokens < needed:
        raise _FieldError(
            ("corpus", "train_tokens"),
            f"found {scenario.corpus.train_tokens}; the warm-up rounds and the longest view need the "
            f"{needed} tokens before the eval part to come from the train part "
            f"({scenario.evaluation.warmup_rounds} warm-up rounds x {scenario.bus.round_tokens} + {scenario.max_reach}"
            + (f" + {max(train_rounds)} controller training rounds" if train_rounds else "")
            + ")",
        )


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _clean_loc(loc: tuple[Any, ...], data: Any, missing: bool = False) -> tuple[Any, ...]:
    """The YAML path of a pydantic error location: the parts that are keys or indexes of the
    input data. Union tags pydantic inserts (`view.lagged.lag`, `nodes.list[0]`) are not in
    the data and are dropped; so is nothing else, whatever a key's spelling. The last part is
    kept when it names a required field that is absent (`missing`)."""
    cleaned: list[Any] = []
    current = data
    for index, part in enumerate(loc):
        if isinstance(current, dict):
            if part in current:
                cleaned.append(part)
                current = current[part]
            elif missing and index == len(loc) - 1:
                cleaned.append(part)
        elif isinstance(current, list):
            if isinstance(part, int) and 0 <= part < len(current):
                cleaned.append(part)
                current = current[part]
        elif isinstance(current, BaseModel):  # a validated object: keep pydantic's location
            cleaned.append(part)
    return tuple(cleaned)


def _scenario_keys() -> set[str]:
    """Every field name of every model in this module: what a misspelt key is compared with."""
    return {
        name
        for value in globals().values()
        if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel
        for name in value.model_fields
    }


def _key_hint(key: str, loc: tuple[Any, ...]) -> str:
    """`(did you mean 'round_tokens'?)`, where templates of nodes and topology parameters go,
    or where the docs are."""
    if len(loc) == 2 and loc[0] == "topology" and not difflib.get_close_matches(key, TopologySpec.model_fields, cutoff=0.7):
        return f" (a topology's parameters go under `params:`, e.g. `params: {{{key}: ...}}`)"
    if len(loc) == 1 and ("template" in key or key in ("count", "node_count", "n_nodes")):
        return " (a template of N nodes is written `nodes: {count: N}`, shared settings go in `node_defaults`)"
    close = difflib.get_close_matches(key, sorted(_scenario_keys()), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}? see scenarios/README.md)"
    return " (check its spelling and the docs in scenarios/README.md)"


def _format_validation_error(source: str, error: ValidationError, data: Any) -> str:
    lines = [f"{source}: the scenario is not valid ({error.error_count()} problem(s)):"]
    for item in error.errors():
        loc = _clean_loc(item["loc"], data, missing=item["type"] == "missing")
        found = item.get("input")
        shown = repr(found) if not isinstance(found, dict) else "a mapping"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key" + _key_hint(str(item["loc"][-1]), loc)
        elif item["type"] == "missing":
            message = "this field is required"
            shown = "nothing"
        lines.append(f"  - {_format_loc(loc)}: {message}; found {shown}")
    return "\n".join(lines)


def parse_scenario(data: Any, source: str = "<scenario>", base_dir: Path | None = None) -> Scenario:
    """Validate already-parsed YAML data; relative paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a YAML mapping at the top level, found {type(data).__name__}")
    try:
        raw = ScenarioFile.model_validate(data)
    except ValidationError as error:
        raise ScenarioError(_format_validation_error(source, error, data)) from None
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
        raise ScenarioError(_format_validation_error(source, error, resolved)) from None
    except _FieldError as error:
        raise ScenarioError(f"{source}: {_format_loc(error.loc)}: {error.message}") from None
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
    return parse_scenario(data, source=str(path), base_dir=path.parent)


def scenario_json_schema() -> dict[str, Any]:
    """JSON Schema of the scenario file, for editors."""
    schema = ScenarioFile.model_json_schema()
    schema["title"] = "collective scenario"
    return schema


def check_node_id(value: str) -> bool:
    return re.fullmatch(NODE_ID_PATTERN, value) is not None
