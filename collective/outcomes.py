"""What one round computes, in memory: the contract between the runtimes that compute it
(the embedded nodes, `collective.run.node`; a volunteer over MQTT) and whatever reads it
(the engine's pools, the round book and the evaluator, the wire).

`NodeRoundResult` is one node's part of a round (its member rows, the message it wrote,
what its firewall did); `PooledPrediction` is one pool's prediction (`collective.run.pools`
computes it). Neither module that reads them needs the runtime that made them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from collective.lm.predictions import TokenPredictions
from collective.records import MessageRecord, MessageSearch, ScreenRecord


@dataclass
class NodeRoundResult:
    """One node's part of a round: its member rows (a row it was not asked for is None), the
    message it wrote and what the bus did with it, and its firewall's screen records."""

    node_id: str
    round_index: int
    collective: TokenPredictions  # one member row each
    isolated: TokenPredictions | None
    plain: TokenPredictions | None
    message_text: str | None
    inbox_tokens: int
    messages: list[MessageRecord] = field(default_factory=list)
    message_search: MessageSearch | None = None
    screened: list[ScreenRecord] = field(default_factory=list)  # what its firewall did to each inbox message
    # a shuffled message (`shuffle`, `generate` with `shuffle: true`): whether its receivers read
    # the unshuffled message's tokens, as many (`collective.run.shuffle`); None: not shuffled
    shuffle_matched: bool | None = None


@dataclass(frozen=True)
class PooledPrediction:
    """The pooled (collective) prediction at T positions.

    target_logprob: (T,) float32, log p(y_t) of the realized token under the pool.
    top1: (T,) int64, the pool's most likely token (-1 where there is no prediction).
    weights: (T, N) float32 member weights used at each position (0 for absent members),
        or None.
    """

    target_logprob: torch.Tensor
    top1: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def n_positions(self) -> int:
        return int(self.target_logprob.shape[0])
