"""The compact record of what a node predicted over a stretch of the stream.

A node's full next-token distribution is V floats per position; across many nodes and
a 262k vocabulary that is too much to keep, and far too much to send over a bus. Every
aggregator and metric of the evaluator needs only: the log-probability of the token that
really came next, and the node's top-K candidates. The remaining (tail) mass is
`1 - sum(exp(topk_logprobs))`, spread uniformly over the V - K other tokens whenever a
pool needs a probability the record does not hold (the member's *recorded distribution*,
defined in `collective.run.pools`). The embedded and the distributed runtimes both
produce this record, so both evaluate identically.

Shapes: N nodes (or rows), T positions, K candidates, V vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_TOP_K = 64


@dataclass(frozen=True)
class TokenPredictions:
    """Predictions of N members at T positions.

    target_logprob: (N, T) float32, log p_i(y_t) of the realized token y_t.
    topk_ids: (N, T, K) int64, each member's K most likely tokens, most likely first.
    topk_logprobs: (N, T, K) float32, their log-probabilities (descending).
    vocab_size: V, needed to spread the tail mass.
    """

    target_logprob: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    vocab_size: int

    @property
    def n_members(self) -> int:
        return int(self.target_logprob.shape[0])

    @property
    def n_positions(self) -> int:
        return int(self.target_logprob.shape[1])

    def select(self, index: list[int]) -> TokenPredictions:
        """The records of the members at `index`, in that order."""
        idx = torch.tensor(index, dtype=torch.long)
        return TokenPredictions(
            self.target_logprob[idx], self.topk_ids[idx], self.topk_logprobs[idx], self.vocab_size
        )

    @staticmethod
    def stack(records: list[TokenPredictions]) -> TokenPredictions:
        """Members of several records (same T, K, V) as one record."""
        return TokenPredictions(
            torch.cat([r.target_logprob for r in records]),
            torch.cat([r.topk_ids for r in records]),
            torch.cat([r.topk_logprobs for r in records]),
            records[0].vocab_size,
        )


@torch.no_grad()
def predictions_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, top_k: int = DEFAULT_TOP_K
) -> TokenPredictions:
    """Compress raw logits into a TokenPredictions record.

    logits: (N, T, V) next-token logits at each scored position.
    targets: (N, T) or (T,) the realized next tokens.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    if targets.dim() == 1:
        targets = targets.unsqueeze(0).expand(logprobs.shape[0], -1)
    target_logprob = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    k = min(top_k, logprobs.shape[-1])
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)  # (N, T, K)
    return TokenPredictions(target_logprob, topk_ids, topk_logprobs, int(logprobs.shape[-1]))
