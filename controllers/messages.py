"""Batched search of the messages nodes send: GCG over many tasks at once.

A task is one sender's message of k tokens and the readers it is written for. Each reader is
a part, a token layout

    [prefix] [message (k tokens)] [rest]

whose loss is the mean NLL of the part's `labels`, predicted at the last len(labels)
positions of `rest` (each from everything before it). A task's objective is
sum_p weight_p * meanNLL_p; a negative weight asks the search to make that reader worse.

One step, for every task together:

1. `message_gradients`: one forward and backward pass over every task's parts, right-padded
   into batches of at most `batch_tokens` padded tokens, gives the gradient of each task's
   objective w.r.t. the one-hot matrix of its message (k, V), through the embedding's scale;
2. per task, `sample_candidates` with the task's own generator (seeded by `task.seed`, so
   that a task's draws do not depend on the others in the batch), then the filters:
   duplicates, text round trip, `max_bytes`; ASCII and special tokens through `allowed`;
3. `candidate_losses`: every task's candidates (x parts) scored in as few forward passes as
   `batch_tokens` allows; each task moves to its best candidate when that is better.

Rows are packed longest first, and a task's objective is summed over its parts in part
order from per-row values, so that searching tasks one by one or batched gives the same
numbers up to the floating-point effects of a different batch shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from controllers.filters import filter_candidates, model_token_mask
from controllers.gcg import sample_candidates
from controllers.objectives import ControllerError, embed_ids, input_embedding, model_context_length

logger = logging.getLogger(__name__)
IGNORE = -1  # a label not scored (a position its reader's sender could not see)


@dataclass(frozen=True)
class MessagePart:
    """One reader of a message: [prefix_ids][message][rest_ids], scoring `labels` at the last
    len(labels) positions of rest_ids (labels may differ from the tokens read there; a label
    IGNORE is not scored, at least one is), each label's NLL counted at most `max_nll` nats:
    bounds a part with a negative weight."""

    prefix_ids: list[int]
    rest_ids: list[int]
    labels: list[int]
    weight: float = 1.0
    max_nll: float | None = None


@dataclass(frozen=True)
class MessageTask:
    """One message to search: its readers, its starting message (k = len(init_ids)), the seed
    of its generator, the longest decoded text (UTF-8 bytes) a candidate may have, and
    `accept`: a candidate's ids are kept only if accept(ids) (the caller's check that its
    readers read the ids it scores)."""

    parts: list[MessagePart]
    init_ids: list[int]
    seed: int
    max_bytes: int | None = None
    accept: Callable[[list[int]], bool] | None = None


class MessageSearchConfig(BaseModel):
    """Search settings, shared by every task of a call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=4, ge=0)
    search_width: int = Field(default=32, ge=1, description="candidates sampled per task and step")
    topk: int = Field(default=32, ge=1, description="tokens per position to sample replacements from")
    n_replace: int = Field(default=1, ge=1, description="positions replaced per candidate")
    filter_ascii: bool = True
    filter_retokenize: bool = True
    filter_special: bool = True
    batch_tokens: int = Field(default=8192, ge=1, description="padded tokens per forward pass")


@dataclass(frozen=True)
class MessageSearchResult:
    """The lowest-loss message seen (`loss` <= `initial_loss`), the best loss after each step,
    and the tokens this task's candidates put through forward passes."""

    ids: list[int]
    text: str
    initial_loss: float
    loss: float
    losses: list[float]
    scored_tokens: int


Progress = Callable[[int, int], None]
"""Called with (done steps, total steps)."""


# -- checks -----------------------------------------------------------------------------------


def check_tasks(model: PreTrainedModel, tasks: Sequence[MessageTask]) -> None:
    """Raise ControllerError naming the task, part and field of the first bad input."""
    vocab = input_embedding(model)[0].shape[0]
    limit = model_context_length(model)
    for i, task in enumerate(tasks):
        if len(task.init_ids) < 1:
            raise ControllerError(f"tasks[{i}].init_ids: empty; a message needs k >= 1 tokens")
        if not task.parts:
            raise ControllerError(f"tasks[{i}].parts: none; a message needs at least one reader")
        if task.max_bytes is not None and task.max_bytes < 1:
            raise ControllerError(f"tasks[{i}].max_bytes: {task.max_bytes}; must be >= 1 or None")
        _check_ids(f"tasks[{i}].init_ids", task.init_ids, vocab)
        for j, part in enumerate(task.parts):
            _check_part(f"tasks[{i}].parts[{j}]", part, vocab)
            total = len(part.prefix_ids) + len(task.init_ids) + len(part.rest_ids)
            if limit is not None and total > limit:
                raise ControllerError(f"tasks[{i}].parts[{j}]: {total} tokens, longer than the model context "
                                      f"({limit} positions); shorten the prefix or the rest")


def _check_part(where: str, part: MessagePart, vocab: int) -> None:
    if all(label == IGNORE for label in part.labels):
        raise ControllerError(f"{where}.labels: empty or all IGNORE; a part scores at least one token")
    if len(part.labels) > len(part.rest_ids):
        raise ControllerError(f"{where}.labels: {len(part.labels)} labels but rest_ids has {len(part.rest_ids)} "
                              "tokens; labels are predicted at the last len(labels) positions of rest_ids")
    if not math.isfinite(part.weight):
        raise ControllerError(f"{where}.weight: {part.weight}; must be a finite number")
    if part.max_nll is not None and not 0 < part.max_nll < math.inf:
        raise ControllerError(f"{where}.max_nll: {part.max_nll}; must be a finite number above 0, or None")
    for name in ("prefix_ids", "rest_ids", "labels"):
        _check_ids(f"{where}.{name}", [i for i in getattr(part, name) if name != "labels" or i != IGNORE], vocab)


def _check_ids(where: str, ids: Sequence[int], vocab: int) -> None:
    bad = [i for i in ids if not 0 <= int(i) < vocab]
    if bad:
        raise ControllerError(f"{where}: token id {bad[0]} outside the vocabulary (0..{vocab - 1})")


# -- packed forward passes --------------------------------------------------------------------


def pack_rows(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Row indices grouped into batches of at most `batch_tokens` padded tokens (a longer row
    goes alone), longest rows first so that little is padding; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def mean_nll(
    model: PreTrainedModel, lengths: Sequence[int], labels: Sequence[Sequence[int]],
    caps: Sequence[float | None] | None = None, **inputs: Tensor,
) -> Tensor:
    """Mean NLL (B,) of each right-padded row's labels but IGNORE, read at the last len(labels)
    of its `lengths` real positions, each label's NLL at most caps[b] (None: no cap); `inputs`
    is input_ids (B, L) or inputs_embeds (B, L, d).

    Logits are computed only at the scored positions (a boolean `logits_to_keep`, which
    flattens them row by row) and the log-softmax runs in float32 or the model's float64."""
    batch, width = len(lengths), max(lengths)
    attention = torch.zeros(batch, width, dtype=torch.long)  # (B, L)
    keep = torch.zeros(batch, width, dtype=torch.bool)  # (B, L)
    counts = [len(row_labels) for row_labels in labels]
    for row, (length, count) in enumerate(zip(lengths, counts, strict=True)):
        attention[row, :length] = 1
        keep[row, length - count - 1 : length - 1] = True
    device = model.device
    out = model(
        **inputs,
        attention_mask=attention.to(device),
        use_cache=False,
        logits_to_keep=keep.to(device),
    )
    logits = out.logits  # (M, V), M = sum(counts)
    log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    targets = torch.tensor([t for row_labels in labels for t in row_labels], device=device)  # (M,)
    nll = -log_probs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # (M,)
    nll = torch.where(targets == IGNORE, torch.zeros_like(nll), nll)  # (M,) an ignored label adds nothing
    rows = torch.repeat_interleave(torch.arange(batch), torch.tensor(counts)).to(device)  # (M,) each label's row
    if caps is not None and any(cap is not None for cap in caps):  # min(inf, cap) = cap; no gradient above it
        bound = torch.tensor([math.inf if cap is None else cap for cap in caps], dtype=nll.dtype, device=device)  # (B,)
        nll = torch.minimum(nll, bound[rows])  # (M,)
    # into (B, n_max) by plain indexing (unique indices, no atomic adds: deterministic on GPU)
    cols = torch.cat([torch.arange(count) for count in counts]).to(device)  # (M,)
    per_row = torch.zeros(batch, max(counts), dtype=nll.dtype, device=device)
    per_row = per_row.index_put((rows, cols), nll)  # (B, n_max)
    scored = [sum(t != IGNORE for t in row_labels) for row_labels in labels]
    return per_row.sum(dim=1) / torch.tensor(scored, dtype=nll.dtype, device=device)


def _pad_ids(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """Rows of ids right-padded with 0 (masked out) -> (B, L) long."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return ids.to(device)


@torch.no_grad()
def row_losses(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    batch_tokens: int,
    caps: Sequence[float | None] | None = None,
) -> Tensor:
    """Mean NLL (R,) of each sequence's labels (scored at its last len(labels) positions, capped
    at caps[r]), in as few forward passes of at most `batch_tokens` padded tokens as packing allows."""
    lengths = [len(sequence) for sequence in sequences]
    result: list[Tensor | None] = [None] * len(sequences)
    for batch in pack_rows(lengths, batch_tokens):
        ids = _pad_ids([sequences[i] for i in batch], model.device)  # (B, L)
        row_caps = None if caps is None else [caps[i] for i in batch]  # None: the language game's rows, uncapped
        nll = mean_nll(model, [lengths[i] for i in batch], [labels[i] for i in batch], row_caps, input_ids=ids)
        for position, index in enumerate(batch):
            result[index] = nll[position]
    return torch.stack([value for value in result if value is not None]).cpu()


# -- the objective and its gradient -----------------------------------------------------------


def candidate_losses(
    model: PreTrainedModel,
    tasks: Sequence[MessageTask],
    candidates: Sequence[Tensor],
    batch_tokens: int,
) -> list[Tensor]:
    """Each task's objective for each of its candidates: candidates[t] (C_t, k_t) -> (C_t,),
    all tasks' rows scored together. A task with no candidates gets an empty tensor."""
    sequences: list[list[int]] = []
    labels: list[list[int]] = []
    caps: list[float | None] = []
    for task, messages in zip(tasks, candidates, strict=True):
        for message in messages.tolist():
            for part in task.parts:
                sequences.append(list(part.prefix_ids) + message + list(part.rest_ids))
                labels.append(list(part.labels))
                caps.append(part.max_nll)
    nll = row_losses(model, sequences, labels, batch_tokens, caps) if sequences else torch.zeros(0)
    losses: list[Tensor] = []
    start = 0
    for task, messages in zip(tasks, candidates, strict=True):
        n_parts, n_candidates = len(task.parts), messages.shape[0]
        block = nll[start : start + n_candidates * n_parts].view(n_candidates, n_parts)  # (C, P)
        weights = torch.tensor([part.weight for part in task.parts], dtype=block.dtype)  # (P,)
        loss = (block * weights).sum(dim=1)  # (C,)
        losses.append(torch.where(loss.isnan(), math.inf, loss))  # a message the model scores NaN is never taken
        start += n_candidates * n_parts
    return losses


def message_losses(
    model: PreTrainedModel,
    tasks: list[MessageTask],
    messages: list[list[int]],
    *,
    batch_tokens: int = 8192,
) -> Tensor:
    """The objective (N,) of messages[i] for tasks[i], no gradient."""
    if len(messages) != len(tasks):
        raise ControllerError(f"messages: {len(messages)} messages for {len(tasks)} tasks")
    check_tasks(model, tasks)
    for i, message in enumerate(messages):
        if len(message) < 1:
            raise ControllerError(f"messages[{i}]: empty; a message needs at least one token")
    if not tasks:
        return torch.zeros(0)
    rows = [torch.tensor([list(message)], dtype=torch.long) for message in messages]
    return torch.cat(candidate_losses(model, tasks, rows, batch_tokens))


def _spliced_loss(
    model: PreTrainedModel, rows: Sequence[tuple[MessagePart, Tensor]], padded_ids: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """The weighted loss of one batch of rows (part, message (k,)) whose padded ids are
    `padded_ids` (B, L), and the rows' message embeddings (k, d) as leaves."""
    embeds = embed_ids(model, padded_ids).detach()  # (B, L, d), scaled like the model's
    leaves, spliced = [], []
    for position, (part, message) in enumerate(rows):
        start, end = len(part.prefix_ids), len(part.prefix_ids) + message.shape[0]
        leaf = embeds[position, start:end].clone().requires_grad_(True)  # (k, d)
        leaves.append(leaf)
        spliced.append(torch.cat([embeds[position, :start], leaf, embeds[position, end:]]))
    lengths = [len(part.prefix_ids) + message.shape[0] + len(part.rest_ids) for part, message in rows]
    labels, caps = [part.labels for part, _ in rows], [part.max_nll for part, _ in rows]
    nll = mean_nll(model, lengths, labels, caps, inputs_embeds=torch.stack(spliced))
    weights = torch.tensor([part.weight for part, _ in rows], dtype=nll.dtype, device=nll.device)
    return (nll * weights).sum(), leaves


def message_gradients(
    model: PreTrainedModel,
    tasks: Sequence[MessageTask],
    messages: Sequence[Tensor],
    batch_tokens: int = 8192,
) -> list[Tensor]:
    """Gradient (k_t, V) of each task's objective w.r.t. the one-hot matrix of messages[t] (k_t,).

    The model embeds a message as scale * one_hot @ W (`input_embedding`), so the one-hot
    gradient is scale * dL/dE @ W.T with dL/dE the gradient at the message's embeddings.
    Every (task, part) row gets its own leaf, and a task's rows are summed in part order,
    so that the result does not depend on which rows share a forward pass."""
    weight, scale = input_embedding(model)
    weight = weight.detach()  # (V, d); the model's own parameters may require grad
    owners = [t for t, task in enumerate(tasks) for _ in task.parts]
    rows = [(part, messages[t].cpu()) for t, task in enumerate(tasks) for part in task.parts]
    sequences = [list(part.prefix_ids) + message.tolist() + list(part.rest_ids) for part, message in rows]
    row_grads: dict[int, Tensor] = {}
    for batch in pack_rows([len(sequence) for sequence in sequences], batch_tokens):
        with torch.enable_grad():
            ids = _pad_ids([sequences[i] for i in batch], model.device)  # (B, L)
            loss, leaves = _spliced_loss(model, [rows[i] for i in batch], ids)
            grads = torch.autograd.grad(loss, leaves)
        row_grads.update(zip(batch, grads, strict=True))
    result: list[Tensor] = []
    for t in range(len(tasks)):
        d_embeds = torch.stack([row_grads[i] for i, owner in enumerate(owners) if owner == t]).sum(dim=0)  # (k, d)
        result.append((d_embeds @ weight.T) * scale)  # (k, V)
    return result


# -- the search -------------------------------------------------------------------------------


@dataclass
class TaskState:
    """One task during a search: its message, that message's loss, the per-step records and
    its generator."""

    ids: Tensor  # (k,) long, CPU
    loss: float
    generator: torch.Generator
    losses: list[float]
    scored_tokens: int = 0


def _filter(
    tokenizer: PreTrainedTokenizerBase, candidates: Tensor, task: MessageTask, config: MessageSearchConfig
) -> Tensor:
    """Candidates (W, k) -> (W', k): no duplicates, the text round trip, the byte limit, `accept`."""
    kept = filter_candidates(candidates, tokenizer, retokenize=config.filter_retokenize)
    texts = tokenizer.batch_decode(kept.tolist())
    fits = [
        (task.max_bytes is None or len(text.encode("utf-8")) <= task.max_bytes) and (task.accept is None or task.accept(ids))
        for ids, text in zip(kept.tolist(), texts, strict=True)
    ]
    return kept[torch.tensor(fits, dtype=torch.bool)] if kept.shape[0] else kept


def _step(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[MessageTask],
    states: Sequence[TaskState],
    config: MessageSearchConfig,
    not_allowed: Tensor,
) -> None:
    """One step for every task: gradients, sampling, filters, scoring, the move."""
    grads = message_gradients(model, tasks, [state.ids for state in states], config.batch_tokens)
    candidates = []
    for task, state, grad in zip(tasks, states, grads, strict=True):
        sampled = sample_candidates(
            state.ids, grad, config.search_width, config.topk, config.n_replace, not_allowed, state.generator
        )  # (W, k)
        candidates.append(_filter(tokenizer, sampled, task, config))  # (W', k)
    losses = candidate_losses(model, tasks, candidates, config.batch_tokens)
    for task, state, found, loss in zip(tasks, states, candidates, losses, strict=True):
        k = found.shape[1]
        state.scored_tokens += found.shape[0] * sum(len(p.prefix_ids) + k + len(p.rest_ids) for p in task.parts)
        if found.shape[0] == 0:
            logger.debug("a task had every candidate filtered out; it keeps its message")
        elif float(loss.min()) < state.loss:
            best = int(loss.argmin())
            state.ids, state.loss = found[best], float(loss[best])
        state.losses.append(state.loss)


def _allowed_mask(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: MessageSearchConfig, allowed: Tensor | None
) -> Tensor:
    vocab = input_embedding(model)[0].shape[0]
    if allowed is None:
        allowed = model_token_mask(model, tokenizer, config)
    if allowed.shape != (vocab,):
        raise ControllerError(f"allowed: mask of shape {tuple(allowed.shape)} does not match the vocabulary ({vocab} embedding rows)")
    if not bool(allowed.any()):
        raise ControllerError("filters: no token is allowed in a message")
    return allowed.cpu()


def search_messages(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[MessageTask],
    config: MessageSearchConfig,
    *,
    allowed: Tensor | None = None,
    progress: Progress | None = None,
) -> list[MessageSearchResult]:
    """Search every task's message together (see the module docstring); one result per task.

    `allowed` (V,) bool overrides the token filters (reuse it across calls: building it
    decodes the whole vocabulary). Filters apply to candidates: a task's starting message is
    returned unchanged when no candidate beats it, whatever it is."""
    check_tasks(model, tasks)
    if not tasks:
        return []
    not_allowed = ~_allowed_mask(model, tokenizer, config, allowed)
    initial = candidate_losses(model, tasks, [torch.tensor([task.init_ids], dtype=torch.long) for task in tasks], config.batch_tokens)
    states = [
        TaskState(torch.tensor(task.init_ids, dtype=torch.long), float(loss[0]), torch.Generator().manual_seed(task.seed), [])
        for task, loss in zip(tasks, initial, strict=True)
    ]
    for step in range(config.steps):
        _step(model, tokenizer, tasks, states, config, not_allowed)
        logger.debug("message search step %d: losses %s", step + 1, [round(s.loss, 4) for s in states])
        if progress is not None:
            progress(step + 1, config.steps)
    return [
        MessageSearchResult(
            ids=[int(i) for i in state.ids.tolist()], text=str(tokenizer.decode(state.ids.tolist())),
            initial_loss=float(loss[0]), loss=state.loss, losses=state.losses, scored_tokens=state.scored_tokens,
        )
        for state, loss in zip(states, initial, strict=True)
    ]
