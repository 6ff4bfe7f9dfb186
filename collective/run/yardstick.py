"""The yardstick: one bigger model with the full view, scored on the same eval text (optional).

Each eval round the coordinator scores the round's text given the text of the last
`context_tokens` stream tokens before it (what the full-view reference sees), in one forward pass
(`score_items`), and books the round's summed NLL, its tokens (of the yardstick's own tokenizer),
its top-1 hits and the round's UTF-8 bytes (the same bytes every other row is scored on), so that
its bits/byte compares with every row's whatever its tokenizer.

- Same tokenizer as the stream: it is scored on the stream's own tokens, exactly like the
  reference (no re-tokenization, no boundary effect).
- Another tokenizer: the context's and the round's stream tokens are decoded to their bytes
  (`ByteVocab` of the stream tokenizer) and each is encoded on its own with the yardstick's
  tokenizer (`encode_span`: complete characters canonically, a character cut by a round
  boundary as byte tokens). So a token boundary is forced at the round's start: the yardstick
  cannot merge across it, and its bits/byte is a slight over-estimate (scenarios/README.md,
  evaluation, gives the measured size). Every round checks that its tokens spell the round's
  bytes exactly.

Shapes: T stream tokens of a round, C context tokens, U yardstick tokens of the round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from collective.evaluate.metrics import RoundStats, member_round_stats
from collective.lm.byte_vocab import ByteVocab, encode_span
from collective.lm.codec import start_token
from collective.lm.models import LoadedModel
from collective.lm.scoring import ScoreItem, score_items


@dataclass(frozen=True)
class Yardstick:
    """A loaded yardstick and how it reads the stream.

    name: as `evaluation.yardstick` gives it. stream_vocab, vocab: the bytes of the stream's and
    the yardstick's tokens; both None when the yardstick shares the stream's tokenizer (it then
    reads the stream's own tokens).
    """

    lm: LoadedModel
    name: str
    stream_vocab: ByteVocab | None = None
    vocab: ByteVocab | None = None

    @property
    def same_tokenizer(self) -> bool:
        return self.vocab is None

    def tokens(self, context_ids: torch.Tensor, round_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The yardstick's (context, round) token ids for stream ids (C,), (T,): the same ids
        with the stream's tokenizer, else each part's bytes encoded on their own (C',), (U,)."""
        if self.stream_vocab is None or self.vocab is None:
            return context_ids, round_ids
        tokenizer = self.lm.tokenizer
        round_bytes = self.stream_vocab.decode(round_ids.tolist())
        context = encode_span(tokenizer, self.vocab, self.stream_vocab.decode(context_ids.tolist()))
        ids = encode_span(tokenizer, self.vocab, round_bytes)
        if self.vocab.decode(ids) != round_bytes:
            raise RuntimeError(f"yardstick {self.name!r}: its tokens of a round do not spell the round's bytes")
        return torch.tensor(context, dtype=torch.long), torch.tensor(ids, dtype=torch.long)

    def score(
        self, context_ids: torch.Tensor, round_ids: torch.Tensor, token_bytes: torch.Tensor, *, top_k: int, batch_tokens: int
    ) -> RoundStats:
        """One round's statistics. context_ids (C,), round_ids (T,): the stream's tokens before
        the round (the full view) and of the round; token_bytes (T,) the round tokens' UTF-8
        lengths, whose sum is the row's bytes. Its NLL is per token of its own tokenizer."""
        context, targets = self.tokens(context_ids, round_ids)
        bos = torch.tensor([start_token(self.lm.tokenizer)])
        pad = getattr(self.lm.tokenizer, "pad_token_id", None)
        preds = score_items(
            self.lm.model,
            [ScoreItem(torch.cat([bos, context]), targets, targets)],
            pad_id=int(pad if pad is not None else bos.item()),
            top_k=top_k,
            batch_tokens=batch_tokens,
        )
        stats = member_round_stats(preds, 0, targets, torch.zeros_like(targets))
        n_bytes = token_bytes.long().sum().reshape(1)  # (1,): the round's bytes, as every row counts them
        return RoundStats(stats.nll_sum, stats.n_tokens, stats.n_correct, n_bytes, stats.n_missing)
