"""The message and firewall parts of a scenario: what a node sends after a round (`MessageSpec`)
and the filters a receiver applies to a message before reading it (`FirewallFilter`).
`collective.specs` re-exports them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from collective.spec_base import Frozen

# ---------------------------------------------------------------------------- messages


class GenerateMessage(Frozen):
    """The node's model writes one message a round, broadcast to its out-neighbours."""

    policy: Literal["generate"] = "generate"
    speak_prompt: str = Field("\nIn short:", description="appended after the node's context before it writes")
    sampling: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0.0)
    max_tokens: int | None = Field(None, ge=1, description="at most the bus budget; default: the budget")
    shuffle: bool = Field(
        False,
        description=(
            "its tokens in a seeded order, as `shuffle` orders a relay; not matched across runs (the writers read "
            "shuffled inboxes and write other text): the matched control of written messages is `replay`"
        ),
    )


class RelayMessage(Frozen):
    """The last B tokens of the node's view, verbatim (B = the link's token budget)."""

    policy: Literal["relay"] = "relay"


class ShuffleMessage(Frozen):
    """A priming control: the relay's tokens in an order drawn per node and round from the
    scenario seed, so the message has the relay's tokens and length but says nothing of
    their order. The order is drawn so that a receiver, which encodes its rendered inbox as
    one string, reads the same tokens, as many, as it reads of the relay (matched for at
    least 99% of messages: `collective.run.shuffle`). A gain the control shows as well is
    priming, not communication. (A written message's matched control: `replay` of the plain run.)"""

    policy: Literal["shuffle"] = "shuffle"


class ReplayMessage(Frozen):
    """A written message's priming control matched across runs: each round, the text this
    node sent in the same round of a finished run (its `events.jsonl`), shuffled as `shuffle`
    orders a relay. In a run of `generate` with `shuffle: true` the writers read shuffled
    inboxes and write other text; a replay sends the plain run's own text, so the receivers
    read its tokens, as many, in another order. `shuffle: false` replays it verbatim (the
    receivers then read exactly what they read in that run: a check of the replay)."""

    policy: Literal["replay"] = "replay"
    run: str = Field(
        description="a finished run folder (relative: to the scenario file's folder) of the same stream, rounds and node"
    )
    shuffle: bool = Field(True, description="reorder the replayed text as `shuffle` reorders a relay")


class SilentMessage(Frozen):
    policy: Literal["silent"] = "silent"


class MessageSearchSettings(Frozen):
    """The settings of a message's greedy coordinate search, shared by `search` and `attack`:
    nodes with the same settings (and search model) are searched together."""

    steps: int = Field(4, ge=1, description="GCG steps per message")
    search_width: int = Field(32, ge=1, description="candidates scored per step")
    topk: int = Field(32, ge=1, description="tokens per position to sample replacements from")
    n_replace: int = Field(1, ge=1)
    ascii_only: bool = Field(True, description="only ASCII tokens in the message")
    retokenize_filter: bool = Field(True, description="only messages that read back as the same tokens")

    @property
    def search_settings(self) -> tuple[int, int, int, int, bool, bool]:
        return (self.steps, self.search_width, self.topk, self.n_replace, self.ascii_only, self.retokenize_filter)


class SearchMessage(MessageSearchSettings):
    """The node searches its message every round: greedy coordinate gradient over the
    message's tokens (as many as the out-links' token budget), starting from `init`, to make
    what the sender just read as predictable as possible to a reader of the message.

    objective `sender`: the NLL of the sender's last `span_tokens` read tokens after
    [start][the inbox rendering of the message] (what a reader who saw nothing else would
    learn). `receiver`: the same tokens scored by each out-neighbour's model context as the
    scenario defines it, [start][its control][the message][its view before those tokens],
    averaged over out-neighbours; only an embedded run can know the receivers' views (a
    distributed node cannot, and is refused)."""

    policy: Literal["search"] = "search"
    objective: Literal["sender", "receiver"] = "sender"
    span_tokens: int | None = Field(None, ge=1, description="recent read tokens the message should carry; default: the round just read")
    init: Literal["relay", "generate", "filler"] = Field("relay", description="the message the search starts from")
    speak_prompt: str = Field("\nIn short:", description="init generate: appended after the node's context before it writes")


class AttackMessage(MessageSearchSettings):
    """A hostile node: its message is searched every round (the batched search of `search`,
    with the readers' parts weighted negatively) to hurt the nodes that read it.

    The attacker never sees the tokens of the round its message will be read in: it scores
    its readers on the last `span_tokens` tokens it read (default: the round just read), the
    proxy for the coming round. objective `untargeted`: raise the readers' mean NLL of that
    span; `targeted`: make them predict `target` (its tokens, teacher-forced, right after
    their context). Threat models (what the search may use):
    `white-box`: each reader's control prompt and view (only an embedded run knows them);
    `model-only`: the readers' model but not their views: the attacker's own view stands in;
    `transfer`: as model-only, but the search runs on `search_model`, another model alias
    of the same tokenizer."""

    policy: Literal["attack"] = "attack"
    objective: Literal["untargeted", "targeted"] = Field(
        "untargeted", description="untargeted: raise the readers' NLL; targeted: make them predict `target`"
    )
    target: str | None = Field(None, min_length=1, description="targeted only: the text the readers should predict next")
    threat: Literal["white-box", "model-only", "transfer"] = Field(
        "white-box", description="white-box: knows the readers' contexts; model-only: their model only; transfer: another model"
    )
    search_model: str | None = Field(None, description="transfer only: the model alias the search runs on (same tokenizer)")
    benign: Literal["relay", "generate", "silent"] = Field(
        "relay", description="what the node sends when the attack is switched off (`collective hostile`'s benign runs)"
    )
    span_tokens: int | None = Field(None, ge=1, description="recent read tokens the readers are scored on; default: the round just read")
    init: Literal["relay", "filler"] = Field("relay", description="the message the search starts from")

    @model_validator(mode="after")
    def _fields_of_the_objective(self) -> AttackMessage:
        if self.objective == "targeted" and self.target is None:
            raise ValueError("objective `targeted` needs `target: \"some text\"` (what the readers should predict)")
        if self.objective == "untargeted" and self.target is not None:
            raise ValueError("`target` is only for objective `targeted`; remove it or set `objective: targeted`")
        if self.threat == "transfer" and self.search_model is None:
            raise ValueError("threat `transfer` needs `search_model: ALIAS` (a key of `models` with the readers' tokenizer)")
        if self.threat != "transfer" and self.search_model is not None:
            raise ValueError("`search_model` is only for threat `transfer`")
        return self


MessageSpec = Annotated[
    GenerateMessage | RelayMessage | ShuffleMessage | ReplayMessage | SearchMessage | AttackMessage | SilentMessage,
    Field(discriminator="policy"),
]


# ---------------------------------------------------------------------------- firewalls


class PerplexityFilter(Frozen):
    """Drops a message whose per-token NLL under the receiver's model (nats per token, the log
    of its perplexity, scored from [start][message]) is above `threshold`; with `window`, the
    highest mean over windows of that many tokens (Jain et al. 2023, arXiv 2309.00614)."""

    kind: Literal["perplexity"] = "perplexity"
    threshold: float | None = Field(
        None, description="nats per token (> 0) above which a message is dropped; unset: fitted on the train part"
    )
    false_drop_rate: float = Field(0.05, gt=0.0, lt=1.0, description="fitting: the share of benign train-part messages dropped")
    window: int | None = Field(None, ge=2, description="windowed variant: tokens per window (unset: the whole message)")
    fit_messages: int = Field(64, ge=8, description="fitting: benign messages drawn from the train part")

    @field_validator("threshold")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError(
                f"got {value}; a threshold is a log-perplexity in nats per token, above 0 (e.g. 6.0), "
                "or leave it out to fit it on the train part"
            )
        return value


class RetokenizeFilter(Frozen):
    """Rewrites a message's tokens: its text is cut at random character boundaries (each with
    probability `split_rate`, seeded per message) and each piece encoded on its own, so that a
    token sequence a search crafted reaches the context as other, smaller tokens (a stand-in
    for the BPE-dropout re-tokenization of Jain et al. 2023)."""

    kind: Literal["retokenize"] = "retokenize"
    split_rate: float = Field(0.2, gt=0.0, le=1.0, description="probability of a cut between two characters")


class CharsetFilter(Frozen):
    """Drops (or strips) characters outside a set: `printable` ASCII and whitespace, `ascii`,
    or `latin` (ASCII plus the Latin-1 supplement and Latin Extended-A)."""

    kind: Literal["charset"] = "charset"
    allow: Literal["printable", "ascii", "latin"] = "printable"
    action: Literal["drop", "strip"] = Field("drop", description="drop the message, or strip the characters outside the set")


class ParaphraseFilter(Frozen):
    """Rewrites a message in the receiver's own words: its model continues
    [start][message][prompt] greedily for as many tokens as the message had."""

    kind: Literal["paraphrase"] = "paraphrase"
    prompt: str = Field("\nIn other words:", min_length=1, description="placed after the message before the model rewrites it")


FirewallFilter = Annotated[
    PerplexityFilter | RetokenizeFilter | CharsetFilter | ParaphraseFilter, Field(discriminator="kind")
]


def filter_labels(filters: Sequence[FirewallFilter]) -> list[str]:
    """Each filter's name in records and the report: its kind, numbered (`perplexity#2`) when
    the kind comes more than once in the firewall."""
    kinds = [f.kind for f in filters]
    return [kind if kinds.count(kind) == 1 else f"{kind}#{i + 1}" for i, kind in enumerate(kinds)]


def describe_filter(spec: FirewallFilter) -> str:
    """A filter's settings in words (the threshold apart)."""
    if isinstance(spec, PerplexityFilter):
        return f"windows of {spec.window} tokens" if spec.window else "whole message"
    if isinstance(spec, RetokenizeFilter):
        return f"split rate {spec.split_rate:g}"
    if isinstance(spec, CharsetFilter):
        return f"{spec.allow}, {spec.action}"
    return f"prompt {spec.prompt!r}"
