"""What a node computes in one round, batched over the nodes that share a model.

A `NodeRoundRequest` carries only what the node may see: its control prompt, its inbox
(the messages it reads this round, which its firewall screens first, one batched pass per
model filter for all the nodes: `collective.run.firewall`; or an inbox a caller rendered),
its view of the text before the round and its reading of the round.
`compute_rounds` scores the node's three contexts (in collective, isolated, plain) in
one batched teacher-forced pass, deduplicating identical sequences (without a control
prompt the isolated and plain contexts are the same), then writes each node's outgoing
message (a searched message: every searching node of the model in one batched search,
`collective.run.messages`). The embedded runtime calls it once per model per round with every node; a
volunteer machine calls it with its one node. That is why both runtimes agree. A runtime
may ask for fewer rows (`want_isolated`, `want_plain`; the engine always asks for all):
a row not asked for comes back None, and the engine then books it as missing and leaves
the node out of that row's pool.

Every context starts with the tokenizer's BOS (or EOS) token, then:
  in collective: [control][inbox][view]   isolated: [control][view]   plain: [view]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from collective.lm.byte_rows import byte_rows
from collective.lm.codec import TextCodec, pad_id, start_token, stop_ids
from collective.lm.models import LoadedModel
from collective.lm.predictions import TokenPredictions
from collective.lm.scoring import ScoreItem, Speak, score_and_speak, score_items
from collective.outcomes import NodeRoundResult
from collective.records import MessageRecord, MessageSearch
from collective.run.bus import enforce_budget
from collective.run.firewall import InboxRead, ReadInbox, read_inboxes
from collective.run.messages import (
    ReceiverContext,
    SearchInput,
    filler_ids,
    search_round_messages,
    stable_ids,
)
from collective.run.shuffle import ShuffledMessage, shuffle_message
from collective.scenario import (
    AttackMessage,
    BusSpec,
    FirewallFilter,
    GenerateMessage,
    MessageSpec,
    RelayMessage,
    ReplayMessage,
    SearchMessage,
    ShuffleMessage,
)
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
    message_bytes: int = 1 << 30  # the out-links' byte budget (a searched message stays within it)
    message_frame: tuple[str, str] = ("", "\n")  # a reader's inbox text before and after the message
    receivers: tuple[ReceiverContext, ...] = ()  # a receiver-aware searched message's readers
    # The inbox as messages (the embedded runtime): screened by `firewall`, then rendered with
    # the bus's template and header. A request without messages reads `inbox_text` as given.
    inbox_messages: tuple[MessageRecord, ...] = ()
    firewall: tuple[FirewallFilter, ...] = ()  # fitted: every perplexity filter has its threshold
    inbox_template: str = BusSpec.model_fields["inbox_template"].default
    inbox_header: str = ""
    placeholder_id: int | None = None  # a masked view's token for a hidden one: a searched message does not score it
    replay_text: str | None = None  # `replay`: the text the node sent in this round of the replayed run
    # a byte-unit run (`collective.run.byte_mode`): the round's bytes; every row is then the
    # node's next-byte distribution at each of them (prefix_ids, round_inputs: its own tokens)
    round_bytes: bytes | None = None


def token_ids(values: Sequence[int]) -> torch.Tensor:
    """Token ids (n,) long, the dtype every context is built in."""
    return torch.tensor(list(values), dtype=torch.long)


def text_ids(tokenizer: TextCodec, text: str) -> list[int]:
    """A text as a node reads it (a rendered inbox, a speak prompt): its tokens, no special
    tokens added."""
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def context_ids(start: int, control_ids: Sequence[int], inbox: Sequence[int], prefix_ids: torch.Tensor) -> torch.Tensor:
    """A row's context (T,): [start][control][inbox][view], the view prefix_ids (P,); the
    isolated row has no inbox, the plain row neither control nor inbox."""
    return torch.cat([token_ids([start, *control_ids, *inbox]), prefix_ids])


class _Sequences:
    """The distinct sequences to score, in order: an identical sequence (context, reading and
    targets) gets the slot it already has, so it is scored once."""

    def __init__(self) -> None:
        self.items: list[ScoreItem] = []
        self._slot: dict[tuple[tuple[int, ...], ...], int] = {}

    def add(self, context: torch.Tensor, request: NodeRoundRequest) -> int:
        key = (tuple(context.tolist()), tuple(request.round_inputs.tolist()), tuple(request.targets.tolist()))
        if key not in self._slot:
            self._slot[key] = len(self.items)
            self.items.append(ScoreItem(context, request.round_inputs, request.targets))
        return self._slot[key]


@torch.no_grad()
def compute_rounds(
    model: torch.nn.Module, tokenizer: TextCodec, requests: list[NodeRoundRequest], *,
    top_k: int, batch_tokens: int, search_models: Mapping[str, LoadedModel] | None = None,
) -> list[NodeRoundResult]:
    """Score and speak for every request (all nodes must share this model; a transfer attack
    searches on `search_models`, which only the embedded runtime passes: see `_searched`)."""
    bos = start_token(tokenizer)
    pad = pad_id(tokenizer)
    read = _read_inboxes(model, tokenizer, requests, batch_tokens)
    sequences = _Sequences()
    # The rows that cannot depend on messages (isolated, plain) are scored in their own
    # batches: a batch's shape (padding, size) changes the floating-point results a little,
    # and those rows must come out the same whatever the bus does.
    without_bus = [
        (
            sequences.add(context_ids(bos, r.control_ids, [], r.prefix_ids), r) if r.want_isolated else None,
            sequences.add(context_ids(bos, [], [], r.prefix_ids), r) if r.want_plain else None,
        )
        for r in requests
    ]
    n_without_bus = len(sequences.items)
    collective_contexts = [context_ids(bos, r.control_ids, inbox.ids, r.prefix_ids) for r, inbox in zip(requests, read)]
    # Speakers' collective rows are scored together with the writing of their message, so
    # the message reuses the scoring pass's KV cache; they are never deduplicated.
    speakers = [i for i, r in enumerate(requests) if _writes(r.message)]
    listeners = {i: sequences.add(collective_contexts[i], r) for i, r in enumerate(requests) if i not in speakers}
    parts = (sequences.items[:n_without_bus], sequences.items[n_without_bus:])
    token_rows = _token_rows(requests)  # else byte rows, by `_row_reader`
    scored = _score_parts(model, parts, pad, top_k, batch_tokens) if token_rows else None
    collective_rows = {} if scored is None else {i: scored.select([slot]) for i, slot in listeners.items()}
    said: dict[int, list[int]] = {}
    if speakers:
        spoken_preds, spoken = score_and_speak(
            model,
            [ScoreItem(collective_contexts[i], requests[i].round_inputs, requests[i].targets) for i in speakers],
            [speak_settings(requests[i], tokenizer) for i in speakers],
            pad_id=pad, top_k=top_k, stop_ids=stop_ids(tokenizer), batch_tokens=batch_tokens,
        )
        if token_rows:  # a byte-unit run reads every row from its byte rows
            collective_rows |= {i: spoken_preds.select([k]) for k, i in enumerate(speakers)}
        said = dict(zip(speakers, spoken))
    searched = _searched(model, tokenizer, requests, said, bos, batch_tokens, search_models)
    texts = {i: _message_text(r, said.get(i), tokenizer) for i, r in enumerate(requests) if i not in searched}
    row = _row_reader(model, tokenizer, requests, sequences, collective_contexts, scored, batch_tokens)
    return [
        NodeRoundResult(
            node_id=request.node_id,
            round_index=request.round_index,
            collective=collective_rows[index] if index in collective_rows else row(index, None),
            isolated=None if isolated is None else row(index, isolated),
            plain=None if plain is None else row(index, plain),
            message_text=searched[index][0] if index in searched else _text(texts[index]),
            inbox_tokens=len(read[index].ids),
            message_search=searched[index][1] if index in searched else None,
            screened=read[index].screened,
            shuffle_matched=texts[index].matched if isinstance(texts.get(index), ShuffledMessage) else None,  # type: ignore[union-attr]
        )
        for index, (request, (isolated, plain)) in enumerate(zip(requests, without_bus))
    ]


def _score_parts(
    model: torch.nn.Module, parts: tuple[list[ScoreItem], ...], pad: int, top_k: int, batch_tokens: int
) -> TokenPredictions | None:
    """The token rows of every part's sequences, each part in batches of its own; None when
    there is nothing to score (every node speaks and no isolated or plain row is asked for)."""
    scored = [score_items(model, part, pad_id=pad, top_k=top_k, batch_tokens=batch_tokens) for part in parts if part]
    return TokenPredictions.stack(scored) if scored else None


RowReader = Callable[[int, int | None], TokenPredictions]


def _row_reader(
    model: torch.nn.Module, tokenizer: TextCodec, requests: list[NodeRoundRequest], sequences: _Sequences,
    collective_contexts: list[torch.Tensor], scored: TokenPredictions | None, batch_tokens: int,
) -> RowReader:
    """(request index, slot of a sequence, or None for the request's collective context) ->
    its row: the scored token row, or in a byte-unit run the byte row of that context (every
    distinct context of the call in batched tree passes, `byte_rows`)."""
    if _token_rows(requests):
        def token_row(index: int, slot: int | None) -> TokenPredictions:
            assert slot is not None and scored is not None, "a token row's collective row comes from its scoring pass"
            return scored.select([slot])

        return token_row
    data = {r.round_bytes for r in requests}
    if len(data) != 1 or None in data:
        raise ValueError("the requests of one call must all score the same round's bytes")

    def context(index: int, slot: int | None) -> tuple[int, ...]:
        return tuple((sequences.items[slot].context if slot is not None else collective_contexts[index]).tolist())

    keys: dict[tuple[int, ...], int] = {}
    for item in sequences.items:
        keys.setdefault(tuple(item.context.tolist()), len(keys))
    for index in range(len(requests)):
        keys.setdefault(context(index, None), len(keys))
    rows = byte_rows(model, tokenizer, [torch.tensor(k) for k in keys], data.pop() or b"", batch_nodes=batch_tokens)
    return lambda index, slot: rows[keys[context(index, slot)]]


def _token_rows(requests: list[NodeRoundRequest]) -> bool:
    """Whether the rows are token rows (else, in a byte-unit run, byte rows)."""
    return all(r.round_bytes is None for r in requests)


def _text(message: str | ShuffledMessage | None) -> str | None:
    return message.text if isinstance(message, ShuffledMessage) else message


def _read_inboxes(model: torch.nn.Module, tokenizer: TextCodec, requests: list[NodeRoundRequest], batch_tokens: int) -> list[ReadInbox]:
    """Each node's inbox as it reads it: its messages through its firewall (one batched pass
    per model filter for all the nodes), rendered; or the `inbox_text` a caller rendered."""
    for request in requests:
        if request.firewall and request.inbox_text and not request.inbox_messages:
            raise ValueError(f"node {request.node_id}: a firewall screens `inbox_messages`, but the request has only inbox text")
    reads = [
        InboxRead(r.node_id, r.seed, r.inbox_messages, r.firewall, r.inbox_template, r.inbox_header) for r in requests if r.inbox_messages
    ]
    screened = iter(read_inboxes(model, tokenizer, reads, batch_tokens=batch_tokens))
    return [
        next(screened) if r.inbox_messages
        else ReadInbox(text_ids(tokenizer, r.inbox_text), [])
        for r in requests
    ]


def _writes(message: MessageSpec) -> bool:
    """Whether the node's model writes text after the round (a searched message may start from it)."""
    return isinstance(message, GenerateMessage) or (isinstance(message, SearchMessage) and message.init == "generate")


def _searched(
    model: torch.nn.Module,
    tokenizer: TextCodec,
    requests: list[NodeRoundRequest],
    said: dict[int, list[int]],
    start: int,
    batch_tokens: int,
    search_models: Mapping[str, LoadedModel] | None = None,
) -> dict[int, tuple[str, MessageSearch]]:
    """Every searching or attacking node's message and search record, the nodes with the same
    search settings and search model searched together: this model, or for a transfer attack
    `search_models[its search_model]` (of the same tokenizer, checked when the run was prepared)."""
    groups: dict[tuple[str | None, tuple[object, ...]], list[int]] = {}
    for index, request in enumerate(requests):
        spec = request.message
        if isinstance(spec, SearchMessage | AttackMessage) and request.message_tokens > 0:
            alias = spec.search_model if isinstance(spec, AttackMessage) else None
            groups.setdefault((alias, spec.search_settings), []).append(index)
    found: dict[int, tuple[str, MessageSearch]] = {}
    for (alias, _), members in groups.items():
        searcher, codec = model, tokenizer
        if alias is not None:
            if search_models is None or alias not in search_models:
                raise ValueError(
                    f"node {requests[members[0]].node_id}: a transfer attack searches on model {alias!r}, which this "
                    "runtime was not given (only an embedded run passes its models; a distributed run refuses it)"
                )
            searcher, codec = search_models[alias].model, search_models[alias].tokenizer
        items = [_search_input(requests[i], said.get(i), codec) for i in members]
        round_tokens = len(requests[members[0]].round_inputs)
        done = search_round_messages(searcher, codec, items, start=start, round_tokens=round_tokens, batch_tokens=batch_tokens)
        found |= dict(zip(members, done))
    return found


def _search_input(request: NodeRoundRequest, spoken: list[int] | None, tokenizer: TextCodec) -> SearchInput:
    spec = request.message
    assert isinstance(spec, SearchMessage | AttackMessage)
    budget = request.message_tokens
    if spec.init == "relay":
        start = stable_ids(relayed_ids(request), tokenizer, budget)
    elif spec.init == "generate":
        start = stable_ids(spoken or [], tokenizer, budget)
    else:
        start = []
    return SearchInput(
        node_id=request.node_id, round_index=request.round_index, seed=request.seed, spec=spec,
        seen_ids=torch.cat([request.prefix_ids, request.round_inputs]), start_ids=start or filler_ids(tokenizer, budget),
        frame=request.message_frame, max_bytes=request.message_bytes, receivers=request.receivers,
        placeholder_id=request.placeholder_id,
    )


def _message_text(request: NodeRoundRequest, spoken: list[int] | None, tokenizer: TextCodec) -> str | ShuffledMessage | None:
    """What the node says this round: the text it wrote, the tail of what it saw, either
    shuffled as its receivers read it (the priming controls), or nothing."""
    spec = request.message
    if spoken is not None:
        text = tokenizer.decode(spoken, skip_special_tokens=True)
        return shuffled(request, text, tokenizer) if isinstance(spec, GenerateMessage) and spec.shuffle else text
    if isinstance(spec, RelayMessage):
        return tokenizer.decode(relayed_ids(request), skip_special_tokens=True)
    if isinstance(spec, ShuffleMessage):
        return shuffled(request, relay_text(request, tokenizer), tokenizer)
    if isinstance(spec, ReplayMessage) and request.replay_text:
        return shuffled(request, request.replay_text, tokenizer) if spec.shuffle else request.replay_text
    return None


def relayed_ids(request: NodeRoundRequest) -> list[int]:
    """The token ids a relay sends: the last B tokens the node read (B its token budget)."""
    seen = torch.cat([request.prefix_ids, request.round_inputs])
    return seen[len(seen) - min(len(seen), request.message_tokens) :].tolist()


def relay_text(request: NodeRoundRequest, tokenizer: TextCodec) -> str:
    """The relay's text as its tightest out-link delivers it (cut to the token and byte budgets)."""
    text = tokenizer.decode(relayed_ids(request), skip_special_tokens=True)
    return enforce_budget(text, tokenizer, request.message_tokens, request.message_bytes)[0]


def shuffled(request: NodeRoundRequest, text: str, tokenizer: TextCodec) -> ShuffledMessage:
    """`text` shuffled as a receiver reads it (`collective.run.shuffle`), in an order drawn from
    a generator seeded by (seed, node, round), never the global RNG: a run is repeatable, each
    node and round draws its own order, and a volunteer draws the same as the embedded run."""
    draw = generator(request.seed, "shuffle", request.node_id, request.round_index)
    return shuffle_message(text, tokenizer, request.message_frame, request.message_tokens, draw)


def speak_settings(request: NodeRoundRequest, tokenizer: TextCodec) -> Speak:
    """How the node writes: its generate settings, or a searched message's start (greedy)."""
    spec = request.message
    assert isinstance(spec, GenerateMessage | SearchMessage)
    speak_ids = token_ids(text_ids(tokenizer, spec.speak_prompt))
    if isinstance(spec, SearchMessage):
        return Speak(continuation=speak_ids, max_new_tokens=request.message_tokens)
    sampled = spec.sampling == "sample"
    return Speak(
        continuation=speak_ids,
        max_new_tokens=min(spec.max_tokens or request.message_tokens, request.message_tokens),
        generator=generator(request.seed, "speak", request.node_id, request.round_index) if sampled else None,
        temperature=spec.temperature,
    )
