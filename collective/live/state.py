"""`LiveState`: everything the live view shows, folded from the event stream.

`LiveState.empty().apply(run_start).apply(round_0).apply(round_1)...` is a pure fold: each
`apply` returns a new snapshot and leaves the old one untouched, so a view can never see a
half-updated state, and a replay reaches exactly the state the live run showed.

Running means ("so far") cover the eval rounds, as the report does; while the run is
still warming up they cover the warm-up rounds, and they restart at the first eval round.
Every round has the same number of tokens, so the mean of round means is the token mean
and the collective's "so far" number converges to the report's collective row. In a run of
several tokenizers (`unit` byte) every NLL is per byte and rounds hold unequal numbers of
bytes: the mean of round means then approximates the report's row (which weights by bytes).

A view that starts late (a watcher attached to a distributed run mid-run) sees the start
record and then rounds from some round k on: the round counter, the tokens done and the
ETA count the rounds it never saw (from `round_index`); the means and per-node numbers
cover the rounds it saw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from collective.records import NodeInfo, RoundEvent, RunEnd, RunRecord, RunStart, Unit

# Rounds of per-round history kept for sparklines; older rounds only live in the running means.
HISTORY_ROUNDS = 120


@dataclass(frozen=True)
class RunningMean:
    """Mean of the finite values seen (a missed round or a NaN does not count)."""

    total: float = 0.0
    count: int = 0

    def add(self, value: float | None) -> RunningMean:
        if value is None or not math.isfinite(value):
            return self
        return RunningMean(self.total + value, self.count + 1)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


def _push(history: tuple[float, ...], value: float | None) -> tuple[float, ...]:
    """Append one round (NaN for a missing value), keeping the last HISTORY_ROUNDS."""
    point = value if value is not None and math.isfinite(value) else math.nan
    return (*history[-(HISTORY_ROUNDS - 1) :], point)


@dataclass(frozen=True)
class NodeState:
    """One node as the view shows it: who it is and how its rounds went so far."""

    info: NodeInfo
    nll_collective: RunningMean = RunningMean()
    nll_isolated: RunningMean = RunningMean()
    last_nll: float | None = None  # this round's NLL in the collective (nats/token)
    history_isolated: tuple[float, ...] = ()
    bytes_sent: int = 0
    messages_sent: int = 0
    messages_dropped: int = 0
    messages_truncated: int = 0
    rounds_missed: int = 0
    missed_now: bool = False
    last_message: str | None = None
    screened_out: int = 0  # messages its firewall dropped before it read them (events 3)

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def hostile(self) -> bool:
        """An attacker (message policy `attack`): its messages are searched to hurt its readers."""
        return self.info.message_policy == "attack"

    @property
    def gain_from_messages(self) -> float | None:
        """Isolated minus in-collective NLL so far (positive: the inbox helped this node)."""
        iso, col = self.nll_isolated.mean, self.nll_collective.mean
        return None if iso is None or col is None else iso - col

    def budget_use(self, max_message_bytes: int) -> float | None:
        """Bytes delivered over what the delivered messages could have carried (0..1)."""
        delivered = self.messages_sent - self.messages_dropped
        if delivered <= 0 or max_message_bytes <= 0:
            return None
        return self.bytes_sent / (delivered * max_message_bytes)

    @property
    def status(self) -> str:
        if self.missed_now:
            return "missed"
        if self.hostile:
            return "hostile"
        if self.info.message_policy == "silent":
            return "silent"
        return "ok"


@dataclass(frozen=True)
class LiveState:
    """A snapshot of a run as seen from its events. Build with `empty()` or `started(start)`."""

    start: RunStart | None = None
    nodes: tuple[NodeState, ...] = ()
    rounds_done: int = 0
    phase: str = "waiting"  # waiting | warmup | eval
    last_round: RoundEvent | None = None
    collective: RunningMean = RunningMean()
    silent: RunningMean = RunningMean()
    reference: RunningMean = RunningMean()
    history_collective: tuple[float, ...] = ()
    history_silent: tuple[float, ...] = ()
    history_reference: tuple[float, ...] = ()
    tokens_done: int = 0
    elapsed_seconds: float = 0.0
    active_links: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    dropped_links: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    screened_links: frozenset[tuple[str, str]] = field(default_factory=frozenset)  # the receiver's firewall dropped it
    end: RunEnd | None = None
    unit: Unit = "token"  # what the NLLs are per: the last round's (a run of several tokenizers: byte)

    # ------------------------------------------------------------------ building

    @classmethod
    def empty(cls) -> LiveState:
        return cls()

    @classmethod
    def started(cls, start: RunStart) -> LiveState:
        return cls(start=start, nodes=tuple(NodeState(info) for info in start.nodes))

    @classmethod
    def fold(cls, events: Iterable[RunRecord]) -> LiveState:
        state = cls.empty()
        for event in events:
            state = state.apply(event)
        return state

    def apply(self, event: RunRecord) -> LiveState:
        """The state after one more event (a new `RunStart` begins a fresh state)."""
        if isinstance(event, RunStart):
            return LiveState.started(event)
        if isinstance(event, RunEnd):
            return replace(self, end=event, active_links=frozenset(), dropped_links=frozenset(), screened_links=frozenset())
        return self._apply_round(event)

    def _apply_round(self, event: RoundEvent) -> LiveState:
        # rounds this view never saw (it attached late, or a broker outage lost them) still happened
        unseen = max(0, event.round_index - self.rounds_done)
        # The first eval round restarts the running means: "so far" means eval so far.
        fresh = event.phase == "eval" and self.phase != "eval"
        by_id = {node.node_id: node for node in event.nodes}
        nodes = []
        for old in self.nodes:
            node = NodeState(old.info) if fresh else old
            # keep the per-round history across the warm-up/eval boundary (it feeds sparklines)
            node = replace(node, history_isolated=old.history_isolated)
            update = by_id.get(node.node_id)
            if update is None:
                nodes.append(replace(node, missed_now=True, rounds_missed=node.rounds_missed + 1))
                continue
            nodes.append(
                replace(
                    node,
                    nll_collective=node.nll_collective.add(update.nll_collective),
                    nll_isolated=node.nll_isolated.add(update.nll_isolated),
                    last_nll=update.nll_collective,
                    history_isolated=_push(node.history_isolated, update.nll_isolated),
                    bytes_sent=node.bytes_sent + update.bytes_sent,
                    messages_sent=node.messages_sent + update.messages_sent,
                    messages_dropped=node.messages_dropped + update.messages_dropped,
                    messages_truncated=node.messages_truncated + update.messages_truncated,
                    rounds_missed=node.rounds_missed + int(update.missed),
                    missed_now=update.missed,
                    last_message=update.last_message if update.last_message is not None else node.last_message,
                    screened_out=node.screened_out + update.messages_screened_out,
                )
            )
        base = replace(self, collective=RunningMean(), silent=RunningMean(), reference=RunningMean()) if fresh else self
        return replace(
            self,
            nodes=tuple(nodes),
            rounds_done=self.rounds_done + unseen + 1,
            phase=event.phase,
            last_round=event,
            collective=base.collective.add(event.nll_collective),
            silent=base.silent.add(event.nll_silent),
            reference=base.reference.add(event.nll_reference),
            history_collective=_push(self.history_collective, event.nll_collective),
            history_silent=_push(self.history_silent, event.nll_silent),
            history_reference=_push(self.history_reference, event.nll_reference),
            tokens_done=self.tokens_done + (unseen + 1) * event.n_tokens,
            elapsed_seconds=event.elapsed_seconds,
            active_links=frozenset((m.sender, m.receiver) for m in event.messages if not m.dropped),
            dropped_links=frozenset((m.sender, m.receiver) for m in event.messages if m.dropped),
            screened_links=frozenset((s.sender, s.receiver) for s in event.screened if s.action == "drop"),
            unit=event.unit,
        )

    # ------------------------------------------------------------------ derived numbers

    @property
    def total_rounds(self) -> int | None:
        return None if self.start is None else self.start.warmup_rounds + self.start.eval_rounds

    @property
    def eval_rounds_done(self) -> int:
        if self.start is None:
            return 0
        return max(0, self.rounds_done - self.start.warmup_rounds)

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def tokens_per_second(self) -> float | None:
        if self.elapsed_seconds <= 0 or self.tokens_done == 0:
            return None
        return self.tokens_done / self.elapsed_seconds

    @property
    def eta_seconds(self) -> float | None:
        """Remaining rounds times the mean wall time per round so far."""
        total = self.total_rounds
        if total is None or self.rounds_done == 0 or self.finished:
            return None
        return (total - self.rounds_done) * self.elapsed_seconds / self.rounds_done

    def best_member(self) -> NodeState | None:
        """The member with the lowest isolated NLL so far (the collective gain's yardstick),
        among the members that missed no round, as the report chooses it; members that did
        miss one count only when every member did."""
        scored = [node for node in self.nodes if node.nll_isolated.mean is not None]
        ranked = [node for node in scored if not node.rounds_missed] or scored
        return min(ranked, key=lambda node: node.nll_isolated.mean or 0.0) if ranked else None

    @property
    def collective_gain(self) -> float | None:
        """Best isolated member's NLL minus the collective's, so far (positive: the collective is ahead)."""
        best = self.best_member()
        if best is None or best.nll_isolated.mean is None or self.collective.mean is None:
            return None
        return best.nll_isolated.mean - self.collective.mean

    @property
    def communication_gain(self) -> float | None:
        """Silent ensemble's NLL minus the collective's, so far."""
        if self.silent.mean is None or self.collective.mean is None:
            return None
        return self.silent.mean - self.collective.mean
