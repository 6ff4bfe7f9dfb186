"""What a run writes to disk or puts on a bus: versioned pydantic records.

- `events.jsonl` holds one `Event` per line: a `RunStart` (who the nodes are, the
  edges), one `RoundEvent` per round (per-node losses, messages, timing) and a `RunEnd`.
  The live view, `collective watch` and the distributed coordinator all consume these,
  so their shape is versioned by `EVENT_SCHEMA_VERSION`.
- `report.json` holds the `Report`: the evaluator's rows with confidence intervals,
  the two gains and the verdict (`REPORT_SCHEMA_VERSION`). Its rows come in `ROW_ORDER`.
- `controls.json` holds the `Controls`: the control prompts a run used and the searches
  that found them (`CONTROLS_SCHEMA_VERSION`).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# events 2: adds NodeRound.message_search (searched messages); version 1 files still read
# events 3: adds RoundEvent.screened (receivers' firewalls), NodeRound.messages_screened_out and the
# attack objectives of MessageSearch; version 1 and 2 files still read (the new fields default empty)
# events 4: adds NodeRound.shuffle_matched (a priming control read as its message's tokens); older files
# still read (None: not recorded)
# events 5: adds RoundEvent.unit ("byte": a collective of several tokenizers, every NLL per byte of the text) and
# RoundEvent.n_bytes (the bytes a byte-unit round's means are over); older files still read ("token", None)
EVENT_SCHEMA_VERSION = 5
# report 2: adds rejected_envelopes; 3: adds each row's n_rounds, each gain's n_rounds (the rounds its
# two sides share), partial_members, best_member_rule and block_rule. Older reports still read: the
# new fields default to None or empty, and `Report.is_partial` works from token counts.
# 4: adds controller_gains and message_searches (empty in older reports).
# 5: adds firewalls (per receiver: its filters, thresholds and fits, what it dropped and rewrote, its time);
# empty in older reports.
# 6: the intervals are no longer a block bootstrap: adds interval_method (the method in words); block_rounds,
# n_boot and block_rule are the bootstrap's of older reports (None / '' from version 6).
# 7: adds the optional yardstick row (row kind `yardstick`: a bigger model with the full view, its NLL per token of
# its own tokenizer) and `yardstick` (the share of the best member's gap to it that the collective closes, in
# bits/byte); None / absent in older reports and in runs without `evaluation.yardstick`.
# 8: adds unit ("byte": a collective of several tokenizers, every row scored on each next byte of the eval text, its
# NLL and gains in nats per byte, its top-1 over bytes); older reports read as "token".
REPORT_SCHEMA_VERSION = 8
# controls 2: adds each search's validation_loss, initial_validation_loss and stopped_at_step (None in version 1)
CONTROLS_SCHEMA_VERSION = 2

Runtime = Literal["embedded", "mqtt"]  # where the nodes ran: this process, or volunteers over MQTT
INCOMPLETE = "INCOMPLETE"  # the file in a run folder that marks it unfinished (and says why)
PARTIAL_MARK = "*"  # how every rendering marks a partial row (`Report.is_partial`)
# what one scored position is: a token of the shared tokenizer, or (several tokenizers) a byte of the text
Unit = Literal["token", "byte"]


def nll_unit(unit: Unit) -> str:
    """How an NLL of a run in `unit` is written: 'nats/token' or 'nats/byte'."""
    return f"nats/{unit}"


class _Record(BaseModel):
    # NaN (e.g. a CI from a single round) must survive a JSON round trip, not become null
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


# ---------------------------------------------------------------------------- events


class MessageRecord(_Record):
    """One message on one link."""

    sender: str
    receiver: str
    round_sent: int
    deliver_round: int
    text: str
    n_tokens: int
    n_bytes: int
    truncated: bool = False
    dropped: bool = False


class NodeInfo(_Record):
    node_id: str
    model: str
    view: str = Field(description="short human description, e.g. 'lagged 64 (lag 32)'")
    message_policy: str
    controller: str
    control_text: str = ""


class RunStart(_Record):
    schema_version: int = EVENT_SCHEMA_VERSION
    kind: Literal["start"] = "start"
    run_id: str
    scenario: str
    seed: int
    nodes: list[NodeInfo]
    edges: list[tuple[str, str]]
    directed: bool
    warmup_rounds: int
    eval_rounds: int
    round_tokens: int
    max_message_tokens: int
    max_message_bytes: int
    aggregator: str
    runtime: Runtime = "embedded"


class MessageSearch(_Record):
    """A searched message's search (message policy `search`): its objective, in nats per span
    token, for the message it started from and the one it sends."""

    objective: Literal["sender", "receiver", "untargeted", "targeted"] = Field(
        description="sender/receiver: a searched message's NLL of the span (lower is better); untargeted: an "
        "attack's readers' NLL of the span (higher hurts them more); targeted: their NLL of the attack's target "
        "(lower: the target is likelier) (events 3)"
    )
    before: float
    after: float
    tokens: int = Field(description="tokens of the message searched")
    steps: int
    seconds: float = Field(description="the node's share of its model's batched search")


class MessageSearchSummary(_Record):
    """A node's searched messages over a run's rounds (warm-up included): the mean objective,
    nats per span token, of the messages they started from and of those sent."""

    messages: int
    mean_before: float
    mean_after: float
    mean_tokens: float
    seconds: float = Field(description="the node's share of the search time, summed over rounds")

    @classmethod
    def of(cls, searches: list[MessageSearch]) -> MessageSearchSummary:
        n = len(searches)
        return cls(
            messages=n, mean_before=sum(s.before for s in searches) / n, mean_after=sum(s.after for s in searches) / n,
            mean_tokens=sum(s.tokens for s in searches) / n, seconds=sum(s.seconds for s in searches),
        )


class ScreenRecord(_Record):
    """What a receiver's firewall did with one message before the receiver read it (events 3):
    recorded in the round the message was read."""

    sender: str
    receiver: str
    round_sent: int
    action: Literal["pass", "drop", "rewrite"]
    filter: str | None = Field(None, description="the filter that dropped or rewrote it (its kind)")
    score: float | None = Field(None, description="perplexity filter: the message's nats per token (highest window)")
    threshold: float | None = Field(None, description="perplexity filter: the threshold it was held to")
    text: str | None = Field(None, description="rewrite: the text the receiver read instead")
    seconds: float = Field(0.0, description="the receiver's firewall time for this message (its share of a batched pass)")


class NodeRound(_Record):
    """One node's round. NLLs are mean nats per token (per byte: the round's `unit`); None when it missed it
    (or, for isolated and plain, when it was not asked for that row)."""

    node_id: str
    nll_collective: float | None
    nll_isolated: float | None
    nll_plain: float | None
    top1_collective: float | None = None
    inbox_tokens: int = Field(0, description="tokens of the rendered inbox the node read")
    bytes_sent: int = Field(0, description="UTF-8 bytes of its messages that links delivered")
    messages_sent: int = Field(0, description="one per out-link, dropped ones included")
    messages_dropped: int = 0
    messages_truncated: int = Field(0, description="cut to a link's token or byte budget")
    missed: bool = False
    last_message: str | None = None
    message_search: MessageSearch | None = Field(None, description="a searched message's objective before and after (events 2)")
    messages_screened_out: int = Field(0, description="messages its firewall dropped before it read them (events 3)")
    shuffle_matched: bool | None = Field(
        None, description="a shuffled message: its receivers read the unshuffled message's tokens, as many (events 4)"
    )


class RoundEvent(_Record):
    schema_version: int = EVENT_SCHEMA_VERSION
    kind: Literal["round"] = "round"
    run_id: str
    round_index: int = Field(description="0-based over all rounds, warm-up first")
    phase: Literal["warmup", "eval"]
    eval_round: int | None = Field(None, description="0-based index among eval rounds")
    start_token: int
    n_tokens: int
    nodes: list[NodeRound]
    messages: list[MessageRecord]
    screened: list[ScreenRecord] = Field(default_factory=list, description="receivers' firewall decisions this round (events 3)")
    nll_collective: float
    nll_silent: float
    nll_reference: float
    wall_seconds: float
    elapsed_seconds: float
    unit: Unit = Field("token", description="what the NLLs are per: a token, or a byte of the text (several tokenizers; events 5)")
    n_bytes: int | None = Field(
        None, description="a byte-unit round: the eval bytes its NLLs are means over (None: a token-unit round, or not recorded)"
    )


class RunEnd(_Record):
    schema_version: int = EVENT_SCHEMA_VERSION
    kind: Literal["end"] = "end"
    run_id: str
    status: Literal["complete", "interrupted", "failed"]
    rounds_done: int
    detail: str = ""


RunRecord = RunStart | RoundEvent | RunEnd  # one line of events.jsonl, one record on the broker
Event = Annotated[RunRecord, Field(discriminator="kind")]
EVENT_ADAPTER: TypeAdapter[RunRecord] = TypeAdapter(Event)


def parse_event(line: str) -> RunRecord:
    return EVENT_ADAPTER.validate_json(line)


# ---------------------------------------------------------------------------- report


class Interval(_Record):
    low: float
    high: float


MemberRow = Literal["member_plain", "member_isolated", "member_collective"]  # one per node
PooledRow = Literal["ensemble_silent", "collective", "reference"]  # one per run
OptionalRow = Literal["yardstick"]  # one per run that asks for it (`evaluation.yardstick`)
RowKind = Literal[MemberRow, PooledRow, OptionalRow]
ROW_ORDER: tuple[RowKind, ...] = get_args(RowKind)  # the order of a report's rows (then node order)
MEMBER_ROWS: tuple[MemberRow, ...] = get_args(MemberRow)
POOLED_ROWS: tuple[PooledRow, ...] = get_args(PooledRow)

ROW_TITLES: dict[str, str] = {
    "member_plain": "member, plain",
    "member_isolated": "member, isolated",
    "member_collective": "member, in collective",
    "ensemble_silent": "ensemble, silent",
    "collective": "collective",
    "reference": "reference, full view",
    "yardstick": "yardstick, full view",
}


class RowReport(_Record):
    row: RowKind
    node_id: str | None = None
    model: str | None = None
    nll: float = Field(description="mean nats per token (per byte in a byte-unit report)")
    nll_ci: Interval
    perplexity: float
    bits_per_byte: float
    top1: float
    n_tokens: int
    n_rounds: int | None = Field(None, description="eval rounds this row scored (None: a report before version 3)")


class Gain(_Record):
    """NLL difference in nats/token (nats/byte in a byte-unit report) with its paired CI: positive = the collective (for a
    controller gain: the member with its prompt) is better than what it is compared with."""

    value: float
    ci: Interval
    versus: str = Field(description="what it is compared with")
    n_rounds: int | None = Field(None, description="eval rounds both sides were scored on (None: before version 3)")


class YardstickGap(_Record):
    """How much of the gap between the best isolated member and the yardstick the collective
    closes, in bits/byte (comparable across tokenizers), on the rounds all three scored (report 7)."""

    model: str = Field(description="the yardstick, as `evaluation.yardstick` names it")
    best_member: str
    share: float | None = Field(
        description="(bpb best - bpb collective) / (bpb best - bpb yardstick); None: undefined, the yardstick is not measurably better (the gap's CI reaches 0)"
    )
    share_ci: Interval = Field(description="its 95% CI (NaN ends: none, too few rounds or undefined)")
    gap_bits_per_byte: float = Field(description="bpb(best member) - bpb(yardstick)")
    gap_ci: Interval
    closed_bits_per_byte: float = Field(description="bpb(best member) - bpb(collective)")
    closed_ci: Interval
    n_rounds: int = Field(description="eval rounds all three rows scored")


class FilterFit(_Record):
    """How a perplexity filter's threshold was fitted on the train part (report 5)."""

    benign_messages: int = Field(description="benign train-part messages scored (those the filters before it let through)")
    mean_tokens: float = Field(description="their mean length in tokens")
    false_drop_rate: float = Field(description="the share of them the threshold was fitted to drop")
    fit_drop_rate: float = Field(description="the share of them above the threshold (in-sample: the quantile on a finite sample)")
    requested_messages: int | None = Field(None, description="fit_messages: windows asked for the fit (and as many held out)")
    windows_available: int | None = Field(
        None, description="distinct, full-length, non-overlapping relay windows in the train part (fit and held out drawn from them)"
    )
    held_out_messages: int | None = Field(None, description="benign train-part messages held out of the fit that reached the filter")
    held_out_drop_rate: float | None = Field(None, description="the share of the held-out ones above the threshold (None: none)")


class FilterReport(_Record):
    """One filter of a receiver's firewall and what it did over the run (warm-up included)."""

    filter: str = Field(description="its kind, numbered when the kind comes twice (as in ScreenRecord.filter)")
    setting: str = Field("", description="its settings in words")
    threshold: float | None = Field(None, description="perplexity: nats per token above which it drops")
    fit: FilterFit | None = Field(None, description="perplexity: how the threshold was fitted (None: given in the scenario)")
    dropped: int = Field(0, description="messages it dropped")
    rewritten: int = Field(0, description="messages it rewrote that were read (a later drop counts as the drop)")


class FirewallReport(_Record):
    """A receiver's firewall over the run's rounds (warm-up included)."""

    filters: list[FilterReport]
    messages_read: int = Field(description="messages that reached the firewall, one per message and round read")
    messages_dropped: int
    messages_rewritten: int
    seconds: float = Field(description="the firewall's time, its share of the batched passes included")
    round_share: float = Field(description="seconds / the run's round time (every node's rounds, one process)")

    @property
    def seconds_per_message(self) -> float:
        return self.seconds / self.messages_read if self.messages_read else 0.0


class Report(_Record):
    schema_version: int = REPORT_SCHEMA_VERSION
    run_id: str
    scenario: str
    seed: int
    runtime: Runtime = "embedded"
    aggregator: str
    n_eval_tokens: int
    n_eval_rounds: int
    round_tokens: int
    eval_bytes: int
    block_rounds: int | None = Field(None, description="bootstrap block length of reports before version 6 (None after)")
    n_boot: int | None = Field(None, description="bootstrap resamples of reports before version 6 (None after)")
    interval_method: str = Field("", description="how every CI was computed, in words ('' before version 6)")
    unit: Unit = Field(
        "token", description="byte: several tokenizers, every row's NLL, top-1 and gain per byte of the text ('token' before version 8)"
    )
    rows: list[RowReport]
    best_member: str
    collective_gain: Gain
    communication_gain: Gain
    verdict: str
    controller_gains: dict[str, Gain] = Field(
        default_factory=dict,
        description="per node with a control prompt: NLL(plain) - NLL(isolated), > 0: the prompt helps its node alone "
        "(empty before version 4)",
    )
    message_searches: dict[str, MessageSearchSummary] = Field(
        default_factory=dict, description="searched messages (policy search), per node: their objective before and after"
    )
    firewalls: dict[str, FirewallReport] = Field(
        default_factory=dict, description="per receiver with a firewall: what it did and cost (empty before version 5)"
    )
    yardstick: YardstickGap | None = Field(
        None, description="the gap to `evaluation.yardstick` the collective closes (None: no yardstick, or before version 7)"
    )
    best_member_rule: str = Field("", description="how the best member was chosen ('' before version 3)")
    partial_members: list[str] = Field(
        default_factory=list, description="members with a partial row (`partial_nodes`: the rows `is_partial` marks)"
    )
    block_rule: str = Field("", description="why the bootstrap blocks are `block_rounds` long ('' before version 3)")
    control_prompts: dict[str, str] = Field(default_factory=dict)
    missed_rounds: dict[str, int] = Field(default_factory=dict)
    # distributed runs: envelopes dropped by who dropped them (coordinator, node ids), by reason
    rejected_envelopes: dict[str, dict[str, int]] = Field(default_factory=dict)
    messages_sent: int = 0
    messages_dropped: int = 0
    messages_truncated: int = 0
    wall_seconds: float = 0.0
    tokens_per_second: float = 0.0

    def row(self, kind: str, node_id: str | None = None) -> RowReport:
        for row in self.rows:
            if row.row == kind and row.node_id == node_id:
                return row
        raise KeyError((kind, node_id))

    def is_partial(self, row: RowReport) -> bool:
        """The row scored fewer tokens than the eval part has: a node missed rounds (this
        reads reports of every version, which all carry token counts). The yardstick row counts
        tokens of its own tokenizer, and a byte-unit report's rows count bytes: they are partial
        when they scored fewer rounds."""
        if row.row == "yardstick" or self.unit == "byte":
            return row.n_rounds is not None and row.n_rounds < self.n_eval_rounds
        return row.n_tokens < self.n_eval_tokens

    def partial_nodes(self) -> list[str]:
        """The members with a partial member row, in row order: the one definition of a
        partial member (what `partial_members` stores)."""
        rows = [row for row in self.rows if row.node_id is not None and row.row in MEMBER_ROWS]
        return list(dict.fromkeys(row.node_id for row in rows if row.node_id is not None and self.is_partial(row)))

    def interval_text(self) -> str:
        """How the CIs were computed: the method in words (version 6 on), or, before 6, the
        block bootstrap used, with its blocks and resamples."""
        if self.schema_version < 6:
            rule = f": {self.block_rule}" if self.block_rule else ""
            return f"95% CIs from a paired block bootstrap over rounds (blocks of {self.block_rounds} rounds{rule}, {self.n_boot} resamples)"
        return f"95% CIs paired over rounds: {self.interval_method or 'method not recorded'}"

    def coverage(self, row: RowReport) -> str:
        """What a row was scored on: '3/10 rounds', or '96/320 tokens' in an older report."""
        if row.n_rounds is not None:
            return f"{row.n_rounds}/{self.n_eval_rounds} rounds"
        return f"{row.n_tokens}/{self.n_eval_tokens} tokens"


# ---------------------------------------------------------------------------- controls


class ControlSearch(_Record):
    """One node's prompt search on the train part (GCG)."""

    node_id: str
    objective: Literal["local", "collective", "speak"]
    control_ids: list[int]
    control_text: str
    loss: float = Field(description="train NLL with the prompt found, nats/token")
    initial_loss: float = Field(description="train NLL with the initial prompt, nats/token")
    steps: int
    wall_seconds: float
    validation_loss: float | None = Field(
        None, description="NLL on the validation slice with the prompt returned (None: no slice, or version 1)"
    )
    initial_validation_loss: float | None = Field(None, description="NLL on the validation slice with the initial prompt")
    stopped_at_step: int | None = Field(
        None, description="the step after which `patience` steps without a validation improvement ended the search"
    )


class Controls(_Record):
    """`controls.json`: the prompt every node used (token ids, and as text where not empty),
    and the searches that found them (none when they were fixed or reused)."""

    schema_version: int = CONTROLS_SCHEMA_VERSION
    control_ids: dict[str, list[int]]
    control_text: dict[str, str] = Field(default_factory=dict)
    searches: list[ControlSearch] = Field(default_factory=list)
