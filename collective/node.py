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

from dataclasses import dataclass, field

import torch

from collective.lm import ScoreItem, generate, score_items
from collective.predictions import TokenPredictions
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
    collective_contexts: list[torch.Tensor] = []

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
    for request, (isolated, plain) in zip(requests, without_bus):
        inbox = _ids(encode(request.inbox_text, add_special_tokens=False)) if request.inbox_text else _ids([])
        inbox_lengths.append(len(inbox))
        collective_ctx = torch.cat([bos, _ids(request.control_ids), inbox, request.prefix_ids])
        collective_contexts.append(collective_ctx)
        slots.append((slot(collective_ctx, request), isolated, plain))
    scored = TokenPredictions.stack(
        [
            score_items(model, part, pad_id=pad_id, top_k=top_k, batch_tokens=batch_tokens)
            for part in (items[:n_without_bus], items[n_without_bus:])
            if part
        ]
    )
    texts = _messages(model, tokenizer, requests, collective_contexts, pad_id)
    results = []
    for request, (c, i, p), n_inbox, text in zip(requests, slots, inbox_lengths, texts):
        results.append(
            NodeRoundResult(
                node_id=request.node_id,
                round_index=request.round_index,
                collective=scored.select([c]),
                isolated=scored.select([i]) if i is not None else None,
                plain=scored.select([p]) if p is not None else None,
                message_text=text,
                inbox_tokens=n_inbox,
            )
        )
    return results


def _messages(
    model: torch.nn.Module,
    tokenizer: object,
    requests: list[NodeRoundRequest],
    contexts: list[torch.Tensor],
    pad_id: int,
) -> list[str | None]:
    decode = tokenizer.decode  # type: ignore[attr-defined]
    encode = tokenizer.encode  # type: ignore[attr-defined]
    texts: list[str | None] = [None] * len(requests)
    speakers: list[int] = []
    for index, request in enumerate(requests):
        seen = torch.cat([request.prefix_ids, request.round_inputs])
        if isinstance(request.message, RelayMessage):
            tail = seen[len(seen) - min(len(seen), request.message_tokens) :]
            texts[index] = decode(tail.tolist(), skip_special_tokens=True)
        elif isinstance(request.message, GenerateMessage):
            speakers.append(index)
    if not speakers:
        return texts
    prompts, gens, temps, caps = [], [], [], []
    for index in speakers:
        request = requests[index]
        spec = request.message
        assert isinstance(spec, GenerateMessage)
        speak = _ids(encode(spec.speak_prompt, add_special_tokens=False)) if spec.speak_prompt else _ids([])
        prompts.append(torch.cat([contexts[index], request.round_inputs, speak]))
        sampled = spec.sampling == "sample"
        gens.append(generator(request.seed, "speak", request.node_id, request.round_index) if sampled else None)
        temps.append(spec.temperature)
        caps.append(min(spec.max_tokens or request.message_tokens, request.message_tokens))
    stop_ids = sorted(
        {int(t) for t in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)) if t is not None}
    )
    new_ids = generate(
        model, prompts, max_new_tokens=max(caps), pad_id=pad_id, stop_ids=stop_ids, generators=gens, temperatures=temps
    )
    for index, ids, cap in zip(speakers, new_ids, caps):
        texts[index] = decode(ids[:cap], skip_special_tokens=True)
    return texts
