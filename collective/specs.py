"""The parts of a scenario: frozen pydantic specs of the corpus, models, views, messages,
controllers, nodes, topology, bus, aggregator and evaluation.

`collective.scenario` assembles them into the `ScenarioFile` a user writes and the
resolved `Scenario` the library consumes. A view spec also says what it shows
(`reach`, `span`, `describe`), so that the observer, the scenario's checks and the run
records read one definition.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from collective.message_specs import (
    AttackMessage,
    CharsetFilter,
    FirewallFilter,
    GenerateMessage,
    MessageSpec,
    ParaphraseFilter,
    PerplexityFilter,
    RelayMessage,
    ReplayMessage,
    RetokenizeFilter,
    SearchMessage,
    ShuffleMessage,
    SilentMessage,
)
from collective.spec_base import Frozen

__all__ = [  # the message and firewall specs live in collective.message_specs; Frozen in spec_base
    "AttackMessage", "CharsetFilter", "FirewallFilter", "Frozen", "GenerateMessage", "MessageSpec", "ParaphraseFilter",
    "PerplexityFilter", "RelayMessage", "ReplayMessage", "RetokenizeFilter", "SearchMessage", "ShuffleMessage", "SilentMessage",
]

NODE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


# ---------------------------------------------------------------------------- corpus


class CorpusSpec(Frozen):
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


class ModelSpec(Frozen):
    ref: str = Field(description="alias (smollm2-135m, gemma3-270m), Hugging Face id, local folder or .gguf file")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on the CPU (faster there)"
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1 ...")


# ---------------------------------------------------------------------------- views


class _View(Frozen):
    """What a node sees of the text before a round: the stream positions [start - reach,
    start - lag), clipped at the start of the stream."""

    if TYPE_CHECKING:
        kind: str  # every view has its own literal `kind`, its first field

    def reach(self, context_tokens: int) -> int:
        """How many tokens before a round the view reaches back (`context_tokens`: what a
        full view without its own `tokens` sees)."""
        return 0

    def lag_tokens(self) -> int:
        """How many of the most recent tokens before a round the view misses."""
        return 0

    def span(self, start: int, context_tokens: int) -> tuple[int, int]:
        """Stream positions [lo, hi) the view shows before a round that starts at `start`."""
        return max(0, start - self.reach(context_tokens)), max(0, start - self.lag_tokens())

    def describe(self, context_tokens: int) -> str:
        """A few words for the run records: the kind, the tokens shown, e.g. 'lagged 64 (lag 32)'."""
        return f"{self.kind} {self.reach(context_tokens) - self.lag_tokens()}{self._detail()}"

    def _detail(self) -> str:
        return ""


class FullView(_View):
    """The last `tokens` tokens before the round (default: evaluation.context_tokens)."""

    kind: Literal["full"] = "full"
    tokens: int | None = Field(None, ge=1)

    def reach(self, context_tokens: int) -> int:
        return self.tokens or context_tokens


class WindowView(_View):
    """The last `tokens` tokens before the round."""

    kind: Literal["window"] = "window"
    tokens: int = Field(ge=0)

    def reach(self, context_tokens: int) -> int:
        return self.tokens


class LaggedView(_View):
    """A window of `tokens` tokens that ends `lag` tokens before the round: a delayed sensor."""

    kind: Literal["lagged"] = "lagged"
    tokens: int = Field(ge=1)
    lag: int = Field(ge=1)

    def reach(self, context_tokens: int) -> int:
        return self.tokens + self.lag

    def lag_tokens(self) -> int:
        return self.lag

    def _detail(self) -> str:
        return f" (lag {self.lag})"


class MaskedView(_View):
    """The last `tokens` tokens, each kept with probability `keep`, else `placeholder` (seeded)."""

    kind: Literal["masked"] = "masked"
    tokens: int = Field(ge=1)
    keep: float = Field(ge=0.0, le=1.0)
    placeholder: str = Field("_", min_length=1)

    def reach(self, context_tokens: int) -> int:
        return self.tokens

    def _detail(self) -> str:
        return f" (keep {self.keep:g})"


class NoView(_View):
    """Nothing of the text before the round: the node knows only what messages tell it."""

    kind: Literal["none"] = "none"

    def describe(self, context_tokens: int) -> str:
        return "none"


ViewSpec = Annotated[FullView | WindowView | LaggedView | MaskedView | NoView, Field(discriminator="kind")]


# ---------------------------------------------------------------------------- controllers


class NoController(Frozen):
    kind: Literal["none"] = "none"


class FixedController(Frozen):
    kind: Literal["fixed"] = "fixed"
    text: str = Field(min_length=1)


class GCGController(Frozen):
    """Greedy coordinate gradient over `tokens` control tokens, on the train part only."""

    kind: Literal["gcg"] = "gcg"
    tokens: int = Field(8, ge=1, le=64)
    steps: int = Field(20, ge=1)
    search_width: int = Field(64, ge=1)
    topk: int = Field(64, ge=1)
    n_replace: int = Field(1, ge=1)
    buffer_size: int = Field(4, ge=1)
    objective: Literal["local", "collective", "speak"] = Field(
        "local",
        description="local: the node's own NLL; collective: the pooled NLL through it; speak: its out-neighbours' "
        "NLL in collective through the messages it writes (scored end to end)",
    )
    train_rounds: int = Field(4, ge=1, description="train rounds the objective is measured on")
    validation_rounds: int = Field(
        2, ge=0, description="train rounds after the training rounds, held out to choose the returned prompt and stop early (0: none)"
    )
    patience: int = Field(3, ge=1, description="steps without a validation improvement before the search stops")
    init: str = Field("x x x x x x x x", description="initial prompt text (cut or padded to `tokens`)")
    sweeps: int = Field(1, ge=1, description="coordinate-descent sweeps over nodes (objective: collective or speak)")
    ascii_only: bool = True
    retokenize_filter: bool = True


ControllerSpec = Annotated[NoController | FixedController | GCGController, Field(discriminator="kind")]


# ---------------------------------------------------------------------------- nodes


# What a node's setting is when neither the node nor `node_defaults` gives one (the model
# has no such default: it must be named). A node's own value wins over `node_defaults`,
# which wins over these.
DEFAULT_VIEW = FullView()  # the last evaluation.context_tokens tokens
DEFAULT_MESSAGE = SilentMessage()
DEFAULT_CONTROLLER = NoController()
_MODEL_HELP = "a key of `models`; a node without one takes node_defaults.model (one of them is required)"
_VIEW_HELP = "what the node sees before a round; a node without one takes node_defaults.view, else {kind: full}"
_MESSAGE_HELP = "what the node sends after a round; a node without one takes node_defaults.message, else {policy: silent}"
_CONTROLLER_HELP = "the node's control prompt; a node without one takes node_defaults.controller, else {kind: none}"
_FIREWALL_HELP = (
    "filters applied in order to each message before the node reads it; a node without one takes "
    "node_defaults.firewall, else none"
)


class NodeSpec(Frozen):
    """One node, fully resolved."""

    id: str = Field(pattern=NODE_ID_PATTERN)
    model: str
    view: ViewSpec = DEFAULT_VIEW
    message: MessageSpec = DEFAULT_MESSAGE
    controller: ControllerSpec = DEFAULT_CONTROLLER
    firewall: tuple[FirewallFilter, ...] = ()


class NodeDefaults(Frozen):
    """Settings every node takes unless it sets its own."""

    model: str | None = Field(None, description=_MODEL_HELP)
    view: ViewSpec | None = Field(None, description=_VIEW_HELP)
    message: MessageSpec | None = Field(None, description=_MESSAGE_HELP)
    controller: ControllerSpec | None = Field(None, description=_CONTROLLER_HELP)
    firewall: list[FirewallFilter] | None = Field(None, description=_FIREWALL_HELP)


class NodeEntry(Frozen):
    """A node in the `nodes:` list; unset fields come from `node_defaults`, then the built-in defaults."""

    id: str = Field(pattern=NODE_ID_PATTERN)
    model: str | None = Field(None, description=_MODEL_HELP)
    view: ViewSpec | None = Field(None, description=_VIEW_HELP)
    message: MessageSpec | None = Field(None, description=_MESSAGE_HELP)
    controller: ControllerSpec | None = Field(None, description=_CONTROLLER_HELP)
    firewall: list[FirewallFilter] | None = Field(None, description=_FIREWALL_HELP)


class NodeOverride(NodeDefaults):
    pass  # one node's settings in a template: the same fields as the defaults they override


class NodeTemplate(Frozen):
    """`count` nodes named `{id_prefix}{i}`, from `node_defaults`, with per-node overrides."""

    count: int = Field(ge=1, le=4096)
    id_prefix: str = Field("n", pattern=r"^[A-Za-z_-][A-Za-z0-9_-]{0,31}$")
    overrides: dict[str, NodeOverride] = Field(default_factory=dict)


# ---------------------------------------------------------------------------- topology, bus


class TopologySpec(Frozen):
    kind: str = Field("ring", description="ring, line, star, complete, grid, small_world, scale_free, random_regular, erdos_renyi, file, edges")
    directed: bool = False
    params: dict[str, Any] = Field(default_factory=dict, description="the builder's parameters, e.g. {k: 4, p: 0.1}")
    path: Path | None = Field(
        None, description="kind file: an edge list or GraphML file (also accepted as params.path), relative to the scenario's folder"
    )
    edges: list[tuple[str, str]] | None = Field(None, description="explicit edges for kind: edges")

    @model_validator(mode="before")
    @classmethod
    def _file_path_from_params(cls, data: Any) -> Any:
        """`{kind: file, params: {path: x}}` is the same as `{kind: file, path: x}`: the file's
        path moves out of `params` (given both ways, it must be the same path)."""
        if not isinstance(data, dict) or data.get("kind") != "file":
            return data
        params = data.get("params")
        if not isinstance(params, dict) or "path" not in params:
            return data
        given = data.get("path")
        if given is not None and Path(str(given)) != Path(str(params["path"])):
            raise ValueError(f"kind `file` got two paths, {given!r} and params.path {params['path']!r}; give one")
        rest = {key: value for key, value in params.items() if key != "path"}
        return {**data, "path": params["path"], "params": rest}

    @model_validator(mode="after")
    def _kind_needs(self) -> TopologySpec:
        if self.kind == "file" and self.path is None:
            raise ValueError(
                "kind `file` needs the graph file: `topology: {kind: file, path: graph.graphml}` "
                "(or `params: {path: graph.edgelist}`), relative to the scenario's folder"
            )
        if self.kind == "edges" and not self.edges:
            raise ValueError("kind `edges` needs `edges: [[a, b], ...]`")
        return self


class LinkOverride(Frozen):
    source: str
    target: str
    max_message_tokens: int | None = Field(None, ge=0)
    max_message_bytes: int | None = Field(None, ge=0)
    latency_rounds: int | None = Field(None, ge=1)
    drop_rate: float | None = Field(None, ge=0.0, le=1.0)


class BusSpec(Frozen):
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


class AggregatorSpec(Frozen):
    kind: Literal["mean", "logpool", "weighted", "readout"] = "mean"
    method: Literal["hedge", "perplexity"] = Field("hedge", description="weighted only")
    eta: float = Field(1.0, gt=0.0, description="weighted/hedge learning rate per token")
    temperature: float = Field(1.0, gt=0.0, description="weighted/perplexity softmax temperature")
    window_tokens: int = Field(256, ge=1, description="weighted/perplexity trailing window")
    node: str | None = Field(None, description="readout only: the node whose prediction is the answer")
    exclude: list[str] = Field(
        default_factory=list, description="nodes whose predictions stay out of the pools (their messages still travel)"
    )

    @model_validator(mode="after")
    def _readout_needs_node(self) -> AggregatorSpec:
        if self.kind == "readout" and not self.node:
            raise ValueError("kind `readout` needs `node: NODE_ID`")
        if self.kind != "readout" and self.node:
            raise ValueError("`node` is only for kind `readout`")
        return self


class EvaluationSpec(Frozen):
    context_tokens: int = Field(256, ge=1, description="what a `full` view and the reference see before a round")
    warmup_rounds: int = Field(2, ge=0, description="unscored rounds (from the train part) so inboxes fill")
    reference_model: str | None = Field(None, description="model alias for the full-view reference (default: the first)")
    yardstick: str | None = Field(
        None,
        description="a bigger model with the full view, scored in bits/byte on the same eval text: an alias of "
        "`models` or any model ref they accept (alias, Hugging Face id, local folder, .gguf); its tokenizer may differ",
    )
    # unused since report version 6: accepted so that older scenarios load, with a warning
    # (collective.scenario.UNUSED_FIELDS)
    block_rounds: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="unused since report version 6 (the CIs are no longer a block bootstrap); remove it"
    )
    n_boot: int = Field(
        2000, ge=100, description="unused since report version 6 (the CIs are no longer a block bootstrap); remove it"
    )
    top_k: int = Field(64, ge=1, description="candidates kept per position for pooling (a byte-unit run keeps all 256)")
    unit: Literal["auto", "token", "byte"] = Field(
        "auto",
        description="what every row is scored on: the next token (one tokenizer), or the next byte (models with "
        "different tokenizers); auto: byte exactly when the nodes' and the reference's models do not share a tokenizer",
    )
    batch_tokens: int = Field(8192, ge=256, description="padded tokens per forward pass (memory bound)")

