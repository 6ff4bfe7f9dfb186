"""Views: what each node sees of the stream (partial observation).

A round covers stream positions [start, start + R). Every node that observes the
stream reads the round's own tokens causally (teacher forcing: position t is predicted
from tokens before t); its *view* decides what it sees of the text before the round:

- full:    the last `tokens` (default `context_tokens`) before the round
- window:  the last `tokens` before the round
- lagged:  `tokens` tokens ending `lag` before the round (it misses the `lag` most recent)
- masked:  the last `tokens`, each kept with probability `keep`, else a placeholder; the
           mask also hides the round's own input tokens (never the scored targets), and is
           drawn once per stream position, so a token hidden from a node stays hidden
- none:    nothing before the round: only messages tell it about the past

`Observer.observe(node_id, start)` returns a node's `Observation` for one round; which
positions a view shows is the view spec's own `span` (`collective.specs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from collective.scenario import MaskedView, NodeSpec
from collective.seeding import generator


@dataclass(frozen=True)
class Observation:
    """prefix_ids: (P,) the view before the round; round_inputs: (R,) the round as this node reads it."""

    prefix_ids: torch.Tensor
    round_inputs: torch.Tensor

    @property
    def seen_ids(self) -> torch.Tensor:
        """Everything the node has seen by the end of the round, in order."""
        return torch.cat([self.prefix_ids, self.round_inputs])


class Observer:
    """Cuts each node's view out of the token stream.

    stream: (S,) int64 token ids of the whole run (train part, then eval part).
    placeholder_ids: node id -> the token id a masked view shows for a hidden token.
    """

    def __init__(
        self,
        stream: torch.Tensor,
        nodes: list[NodeSpec],
        *,
        seed: int,
        round_tokens: int,
        context_tokens: int,
        placeholder_ids: dict[str, int],
    ) -> None:
        self.stream = stream
        self.round_tokens = round_tokens
        self.context_tokens = context_tokens
        self._nodes = {node.id: node for node in nodes}
        self._keep: dict[str, torch.Tensor] = {}
        self._placeholder = placeholder_ids
        for node in nodes:
            if isinstance(node.view, MaskedView):
                draws = torch.rand(len(stream), generator=generator(seed, "mask", node.id))  # (S,)
                self._keep[node.id] = draws < node.view.keep

    def _masked(self, node_id: str, lo: int, hi: int) -> torch.Tensor:
        """stream[lo:hi] as the node sees it (a masked view's hidden tokens replaced)."""
        ids = self.stream[lo:hi]
        keep = self._keep.get(node_id)
        if keep is None:
            return ids
        return torch.where(keep[lo:hi], ids, torch.full_like(ids, self._placeholder[node_id]))

    def observe(self, node_id: str, start: int) -> Observation:
        lo, hi = self._nodes[node_id].view.span(start, self.context_tokens)
        end = start + self.round_tokens
        return Observation(
            prefix_ids=self._masked(node_id, lo, hi).clone(), round_inputs=self._masked(node_id, start, end).clone()
        )

    def reference(self, start: int) -> Observation:
        """The full-view reference: the last `context_tokens` before the round, unmasked."""
        return Observation(
            prefix_ids=self.stream[max(0, start - self.context_tokens) : start].clone(),
            round_inputs=self.stream[start : start + self.round_tokens].clone(),
        )

    def targets(self, start: int) -> torch.Tensor:
        """(R,) the true tokens of the round: what every row is scored on."""
        return self.stream[start : start + self.round_tokens].clone()
