"""What a node computes in one round, batched over the nodes that share a model.

A `NodeRoundRequest` carries only what the node may see: its control prompt, its
rendered inbox, its view of the text before the round and its reading of the round.
`compute_rounds` scores the node's three contexts (in collective, isolated, plain) in
one batched teacher-forced pass, deduplicating identical sequences (without a control
prompt the isolated and plain contexts are the same), then writes each node's outgoing
message. The embedded runtime calls it once per model per round with every node; a
volunteer machine calls it with its one node. That is why both runtimes agree.

Every context starts with the tokenizer's BOS (or EOS) token, then:
  in collective: [control][inbox][view]   isolated: [control][view]   plain: [view]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from collective.lm.predictions import TokenPredictions
from collective.lm.scoring import ScoreItem, Speak, score_and_speak, score_items
from collective.records import MessageRecord
from collective.scenario import GenerateMessage, MessageSpec, RelayMessage
from collective.seeding import generator


@dataclass(frozen=True)
class NodeRoundRequest:
    node_id: str
    round_index: int
    control_ids: list[int]
    prefix_ids: torch.Tensor  # (P,) the view before the round
    round_inputs: torch.Tensor  # (R,) the round as the node reads it
    targets: torch.Tensor  # (R,) true tokens, for scoring only
    message: MessageSpec
    message_tokens: int  # the out-links' token budget: relay length, generation cap
    seed: int
    inbox_text: str = ""
    want_plain: bool = True
    want_isolated: bool = True


@dataclass
class NodeRoundResult:
    node_id: str
    round_index: int
    collective: TokenPredictions  # one member row each
    isolated: TokenPredictions | None
    plain: TokenPredictions | None
    message_text: str | None
    inbox_tokens: int
    messages: list[MessageRecord] = field(default_factory=list)


def start_token(tokenizer: object) -> int:
    """The token every context starts with: a document boundary.

    `<|endoftext|>` where the vocabulary has it (GPT-2 style and SmolLM2 tokenizers, whose
    BOS is a chat-turn marker), else BOS (Gemma, Llama), else EOS.
    """
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is not None:
        found = convert("<|endoftext|>")
        if isinstance(found, int) and found != getattr(tokenizer, "unk_token_id", None):
            return found
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has no BOS, EOS or PAD token to start a context with")


def _ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


@torch.no_grad()
def compute_rounds(
    model: torch.nn.Module,
    tokenizer: object,
    requests: list[NodeRoundRequest],
    *,
    top_k: int,
    batch_tokens: int,
) -> list[NodeRoundResult]:
    """Score and speak for every request (all nodes must share this model)."""
    bos = _ids([start_token(tokenizer)])
    pad_id = int(getattr(tokenizer, "pad_token_id", None) or bos.item())
    encode = tokenizer.encode  # type: ignore[attr-defined]
    items: list[ScoreItem] = []
    index_of: dict[tuple[int, ...], int] = {}
    slots: list[tuple[int, int | None, int | None]] = []
    inbox_lengths: list[int] = []

    def slot(context: torch.Tensor, request: NodeRoundRequest) -> int:
        key = tuple(context.tolist()) + (-1,) + tuple(request.round_inputs.tolist()) + (-2,) + tuple(request.targets.tolist())
        if key not in index_of:
            index_of[key] = len(items)
            items.append(ScoreItem(context, request.round_inputs, request.targets))
        return index_of[key]

    # The rows that cannot depend on messages (isolated, plain) are scored in their own
    # batches: a batch's shape (padding, size) changes the floating-point results a little,
    # and those rows must come out the same whatever the bus does.
    without_bus = [
        (
            slot(torch.cat([bos, _ids(request.control_ids), request.prefix_ids]), request) if request.want_isolated else None,
            slot(torch.cat([bos, request.prefix_ids]), request) if request.want_plain else None,
        )
        for request in requests
    ]
    n_without_bus = len(items)
    # Speakers' collective rows are scored together with the writing of their message, so
    # the message reuses the scoring pass's KV cache; they are never deduplicated.
    speaker_items: list[ScoreItem] = []
    speaks: list[Speak] = []
    speaker_slot: dict[int, int] = {}
    collective_slots: list[int | None] = []
    for index, request in enumerate(requests):
        inbox = _ids(encode(request.inbox_text, add_special_tokens=False)) if request.inbox_text else _ids([])
        inbox_lengths.append(len(inbox))
        collective_ctx = torch.cat([bos, _ids(request.control_ids), inbox, request.prefix_ids])
        if isinstance(request.message, GenerateMessage):
            speaker_slot[index] = len(speaker_items)
            speaker_items.append(ScoreItem(collective_ctx, request.round_inputs, request.targets))
            speaks.append(_speak(request, encode))
            collective_slots.append(None)
        else:
            collective_slots.append(slot(collective_ctx, request))
    scored = TokenPredictions.stack(
        [
            score_items(model, part, pad_id=pad_id, top_k=top_k, batch_tokens=batch_tokens)
            for part in (items[:n_without_bus], items[n_without_bus:])
            if part
        ]
    )
    spoken_preds: TokenPredictions | None = None
    spoken: list[list[int]] = []
    if speaker_items:
        spoken_preds, spoken = score_and_speak(
            model, speaker_items, speaks, pad_id=pad_id, top_k=top_k, stop_ids=_stop_ids(tokenizer),
            batch_tokens=batch_tokens,
        )
    decode = tokenizer.decode  # type: ignore[attr-defined]
    texts: list[str | None] = []
    for index, request in enumerate(requests):
        if index in speaker_slot:
            texts.append(decode(spoken[speaker_slot[index]], skip_special_tokens=True))
        elif isinstance(request.message, RelayMessage):
            seen = torch.cat([request.prefix_ids, request.round_inputs])
            tail = seen[len(seen) - min(len(seen), request.message_tokens) :]
            texts.append(decode(tail.tolist(), skip_special_tokens=True))
        else:
            texts.append(None)
    for index, (isolated, plain) in enumerate(without_bus):
        collective = collective_slots[index]
        slots.append((collective if collective is not None else -1, isolated, plain))
    results = []
    for index, (request, (c, i, p), n_inbox, text) in enumerate(zip(requests, slots, inbox_lengths, texts)):
        results.append(
            NodeRoundResult(
                node_id=request.node_id,
                round_index=request.round_index,
                collective=scored.select([c]) if c >= 0 else spoken_preds.select([speaker_slot[index]]),  # type: ignore[union-attr]
                isolated=scored.select([i]) if i is not None else None,
                plain=scored.select([p]) if p is not None else None,
                message_text=text,
                inbox_tokens=n_inbox,
            )
        )
    return results


def _stop_ids(tokenizer: object) -> list[int]:
    """A message ends at the end of a turn or document (EOS, BOS, the start token)."""
    names = ("eos_token_id", "bos_token_id")
    found = {int(t) for t in (getattr(tokenizer, n, None) for n in names) if t is not None}
    found.add(start_token(tokenizer))
    return sorted(found)


def _speak(request: NodeRoundRequest, encode: Callable[..., list[int]]) -> Speak:
    spec = request.message
    assert isinstance(spec, GenerateMessage)
    speak_ids = _ids(encode(spec.speak_prompt, add_special_tokens=False)) if spec.speak_prompt else _ids([])
    sampled = spec.sampling == "sample"
    return Speak(
        continuation=speak_ids,
        max_new_tokens=min(spec.max_tokens or request.message_tokens, request.message_tokens),
        generator=generator(request.seed, "speak", request.node_id, request.round_index) if sampled else None,
        temperature=spec.temperature,
    )
