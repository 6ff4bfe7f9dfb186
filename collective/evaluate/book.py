"""The round book: every report row's statistics, one entry per eval round, in one place.

Each eval round the round engine books the members' three rows (plain, isolated, in
collective), the silent ensemble, the collective and the full-view reference (and, in a run with `evaluation.yardstick`, the
yardstick's statistics, which the engine computes: its tokens are its own), keyed by a
typed `RowKey`; the evaluator reads the book back as one `RoundStats` per row. A member
with no prediction in a round (it missed the round, or was not asked for that row) is
booked as missing: its positions are not scored.

Row kinds and their order are `collective.records.RowKind` and `ROW_ORDER`; the book
keeps its rows in booking order (each node's member rows, then the pooled rows), the
report sorts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from collective.evaluate.metrics import (
    RoundStats,
    member_round_stats,
    members_round_stats,
    pooled_round_stats,
)
from collective.lm.predictions import TokenPredictions
from collective.outcomes import NodeRoundResult, PooledPrediction
from collective.records import (
    MEMBER_ROWS,
    POOLED_ROWS,
    MemberRow,
    MessageSearch,
    RowKind,
    ScreenRecord,
    Unit,
)


class RowKey(NamedTuple):
    """One row of the report: a member row of node `node_id`, or a pooled row (no node)."""

    kind: RowKind
    node_id: str | None = None


def row_keys(node_ids: Sequence[str], yardstick: bool = False) -> list[RowKey]:
    """Every row of a run of these nodes (and its yardstick's), in booking order."""
    members = [RowKey(kind, node_id) for node_id in node_ids for kind in MEMBER_ROWS]
    return members + [RowKey(kind) for kind in POOLED_ROWS] + ([RowKey("yardstick")] if yardstick else [])


def member_predictions(result: NodeRoundResult | None, kind: MemberRow) -> TokenPredictions | None:
    """A node's row of one round: None when it missed the round or was not asked for it."""
    if result is None:
        return None
    if kind == "member_plain":
        return result.plain
    return result.isolated if kind == "member_isolated" else result.collective


class RoundBook:
    """Per-round statistics of every report row (eval rounds only)."""

    def __init__(self, node_ids: Sequence[str], yardstick: bool = False) -> None:
        self.node_ids = list(node_ids)
        self._rounds: dict[RowKey, list[RoundStats]] = {key: [] for key in row_keys(node_ids, yardstick)}

    @classmethod
    def from_rounds(cls, rounds: Mapping[tuple[RowKind, str | None], Sequence[RoundStats]]) -> RoundBook:
        """A book of rounds already booked (hand-made statistics, in the given row order)."""
        book = cls([])
        book._rounds = {RowKey(*key): list(stats) for key, stats in rounds.items()}
        book.node_ids = list(dict.fromkeys(key.node_id for key in book._rounds if key.node_id is not None))
        return book

    def add_round(
        self,
        results: Mapping[str, NodeRoundResult | None],
        *,
        silent: PooledPrediction,
        collective: PooledPrediction,
        reference: TokenPredictions,
        targets: torch.Tensor,
        token_bytes: torch.Tensor,
        yardstick: RoundStats | None = None,
    ) -> None:
        """Book one eval round. targets, token_bytes: (T,) the round's true tokens and their
        UTF-8 lengths; every row is scored on them (the yardstick on their bytes, in its own
        tokens: one round of statistics, given exactly when the book has a yardstick row)."""
        if (yardstick is None) == (RowKey("yardstick") in self._rounds):
            raise ValueError("a book with a yardstick row needs its statistics every round, and only such a book")
        for kind in MEMBER_ROWS:
            rows = [member_predictions(results.get(node_id), kind) for node_id in self.node_ids]
            for node_id, stats in zip(self.node_ids, members_round_stats(rows, targets, token_bytes)):
                self._add(RowKey(kind, node_id), stats)
        self._add(RowKey("ensemble_silent"), pooled_round_stats(silent, targets, token_bytes))
        self._add(RowKey("collective"), pooled_round_stats(collective, targets, token_bytes))
        self._add(RowKey("reference"), member_round_stats(reference, 0, targets, token_bytes))
        if yardstick is not None:
            self._add(RowKey("yardstick"), yardstick)

    def _add(self, key: RowKey, stats: RoundStats) -> None:
        self._rounds[key].append(stats)

    @property
    def keys(self) -> list[RowKey]:
        return list(self._rounds)

    def stats(self) -> dict[RowKey, RoundStats]:
        """Each row's rounds as one RoundStats, in booking order."""
        return {key: RoundStats.concat(parts) for key, parts in self._rounds.items()}


@dataclass
class EngineResult:
    """What the round engine hands the evaluator: the book and the run's totals."""

    book: RoundBook
    rounds_done: int
    eval_rounds_done: int
    missed_rounds: dict[str, int]
    messages_sent: int
    messages_dropped: int
    messages_truncated: int
    wall_seconds: float
    eval_tokens: int
    eval_bytes: int
    message_searches: dict[str, list[MessageSearch]] = field(default_factory=dict)  # node -> every round's search
    screened: dict[str, list[ScreenRecord]] = field(default_factory=dict)  # receiver -> its firewall's records, every round
    unit: Unit = "token"  # what the book's positions are: tokens, or bytes (`collective.run.byte_mode`)
