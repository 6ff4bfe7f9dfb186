"""Byte-unit runs: a collective whose models do not share one tokenizer (or `evaluation.unit:
byte`) is scored on the next byte of the text, so that every row means the same thing.

- The stream is tokenized once with the *stream tokenizer* (the first model of `models` that
  the run uses); rounds (`bus.round_tokens`), views (`tokens`, `lag`) and `context_tokens` are
  counted in its tokens, so a round is a span of bytes, the same for every node.
- A node whose tokenizer is another one reads the same bytes in its own tokens: the view
  before the round and the round are each decoded to bytes (`ByteVocab`) and encoded on their
  own with its tokenizer (`encode_span`).
- Every row (the members' three rows, the reference, the yardstick) is the model's
  next-byte distribution at every byte of the round (`collective.lm.byte_rows`): 256
  log-probabilities per byte, so pools are exact, and the book's positions are bytes (NLL in
  nats/byte; bits/byte = nats/byte / ln 2).
- Messages stay text; a link's token budget counts the *sender's* tokens, its byte budget
  bytes; the receiver reads the text with its own tokenizer.

A GCG controller with `objective: local` searches as in any run, on the node's own NLL over its
view of the train part in its own tokens (`collective.run.control`). Not in a byte-unit run
(refused with the field named, `check_byte_unit`): masked views, searched and attack messages,
firewalls and GCG objectives `collective` and `speak`, which score token ids of one tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from collective.lm.byte_rows import byte_rows, byte_targets, vocab_of
from collective.lm.byte_vocab import ByteVocab, ByteVocabError, encode_span
from collective.lm.codec import start_token
from collective.lm.models import LoadedModel, TokenizerMismatchError, check_same_tokenizer
from collective.lm.predictions import TokenPredictions
from collective.scenario import AttackMessage, GCGController, MaskedView, Scenario, SearchMessage

Unit = Literal["token", "byte"]
UNIT_FIELD = "evaluation.unit"


class ByteUnitError(ValueError):
    """A scenario that cannot run in bytes; the message names the field."""


def shares_tokenizer(models: Mapping[str, LoadedModel]) -> bool:
    try:
        check_same_tokenizer(models)
    except TokenizerMismatchError:
        return False
    return True


def run_unit(scenario: Scenario, models: Mapping[str, LoadedModel]) -> Unit:
    """The unit the run is scored in: `evaluation.unit`, where `auto` is `byte` exactly when
    the models the nodes and the reference use do not share one tokenizer."""
    asked = scenario.evaluation.unit
    used = {node.model for node in scenario.nodes} | {scenario.reference_model}
    mixed = not shares_tokenizer({alias: lm for alias, lm in models.items() if alias in used})
    if asked == "token" and mixed:
        raise ByteUnitError(
            f"{UNIT_FIELD}: `token` pools next-token distributions over one vocabulary, but the models "
            f"({', '.join(sorted(used))}) do not share a tokenizer; use `byte` (or leave it `auto`)"
        )
    return "byte" if asked == "byte" or mixed else "token"


def check_byte_unit(scenario: Scenario) -> None:
    """The parts of a scenario that a byte-unit run cannot score: a `ByteUnitError` naming them."""
    for index, node in enumerate(scenario.nodes):
        where = f"nodes[{index}] (node {node.id!r})"
        if isinstance(node.view, MaskedView):
            raise ByteUnitError(
                f"{where}.view: a masked view hides tokens of the stream tokenizer, which a node with another "
                "tokenizer does not read; in a byte-unit run use full, window, lagged or none"
            )
        if isinstance(node.message, SearchMessage | AttackMessage):
            raise ByteUnitError(
                f"{where}.message: policy {node.message.policy} searches token ids scored on one tokenizer; in a "
                "byte-unit run use silent, relay, shuffle, generate or replay"
            )
        if node.firewall:
            raise ByteUnitError(
                f"{where}.firewall: the perplexity filters are fitted in tokens of one tokenizer; a byte-unit run "
                "has none (remove it, or give every model the same tokenizer)"
            )
        if isinstance(node.controller, GCGController) and node.controller.objective != "local":
            raise ByteUnitError(
                f"{where}.controller.objective: `{node.controller.objective}` searches on the collective's pool of "
                "token distributions of one tokenizer; in a byte-unit run a GCG search is `local` (the node's own "
                "NLL in its own tokens), or give the node a fixed prompt"
            )


@dataclass(frozen=True)
class ByteMode:
    """How a byte-unit run reads the stream. stream: the stream tokenizer's byte table;
    models: alias -> loaded model (for its tokenizer); stream_alias: the stream tokenizer's model."""

    stream_vocab: ByteVocab
    models: Mapping[str, LoadedModel]
    stream_alias: str
    same: Mapping[str, bool]  # alias -> whether it has the stream tokenizer (reads the stream's own ids)

    def text(self, stream_ids: torch.Tensor) -> bytes:
        return self.stream_vocab.decode(stream_ids.tolist())

    def reads_stream(self, alias: str) -> bool:
        return self.same[alias]

    def ids(self, alias: str, stream_ids: torch.Tensor) -> torch.Tensor:
        """(P',) the same bytes as stream ids (P,) in the tokens of model `alias`."""
        if self.reads_stream(alias):
            return stream_ids.clone()
        tokenizer = self.models[alias].tokenizer
        return torch.tensor(encode_span(tokenizer, vocab_of(tokenizer), self.text(stream_ids)), dtype=torch.long)

    def request(self, request: Any, alias: str) -> Any:
        """A node's round request (`NodeRoundRequest`) in model `alias`'s tokens, with the
        round's bytes to score: its view and its reading of the round re-encoded."""
        data = self.text(request.round_inputs)
        round_ids = self.ids(alias, request.round_inputs)
        return replace(
            request, prefix_ids=self.ids(alias, request.prefix_ids), round_inputs=round_ids, targets=round_ids,
            round_bytes=data,
        )

    def full_view_row(self, lm: LoadedModel, reads_stream: bool, prefix_ids: torch.Tensor, data: bytes) -> TokenPredictions:
        """(1, B) the byte row of a model with the full view (the reference, the yardstick) given
        the stream ids (P,) before the round; reads_stream: it has the stream tokenizer."""
        tokenizer = lm.tokenizer
        if reads_stream:
            prefix = prefix_ids
        else:
            prefix = torch.tensor(encode_span(tokenizer, vocab_of(tokenizer), self.text(prefix_ids)), dtype=torch.long)
        context = torch.cat([torch.tensor([start_token(tokenizer)]), prefix])
        return byte_rows(lm.model, tokenizer, [context], data)[0]


def byte_mode_for(scenario: Scenario, models: Mapping[str, LoadedModel], stream_alias: str) -> ByteMode:
    """The run's `ByteMode`; every model's token bytes must be recoverable (`byte_vocab`)."""
    check_byte_unit(scenario)
    for alias, lm in models.items():
        try:
            vocab_of(lm.tokenizer)
        except ByteVocabError as exc:
            raise ByteUnitError(
                f"models.{alias}: a byte-unit run reads every model's tokens as bytes, but {exc}; use a byte-level "
                "BPE or a byte-fallback SentencePiece model"
            ) from None
    stream = models[stream_alias]
    same = {alias: shares_tokenizer({stream_alias: stream, alias: lm}) for alias, lm in models.items()}
    return ByteMode(vocab_of(stream.tokenizer), models, stream_alias, same)


def round_targets(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) the round's bytes as targets and (B,) their lengths (one byte each)."""
    targets = byte_targets(data)
    return targets, torch.ones_like(targets)
