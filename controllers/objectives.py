"""What a control prompt is searched for: objectives, batched over candidate prompts.

An objective scores control prompts u of k tokens placed in a fixed token layout

    [prefix] [control u] [rest]          (rest = [suffix][target], or a stretch of the stream)

where the loss is read off the last `n_scored` tokens of `rest`, each predicted from
everything before it. Two entry points, both batched over candidates:

- `scores(control_ids (B, k)) -> Scores(loss (B,), success (B,))`, no gradient, used to
  rank candidates;
- `embed_loss(control_embeds (1, k, d)) -> ()`, differentiable, the embedding-level forward
  through which the GCG engine takes the one-hot gradient.

The prefix never changes, so its key/value cache is computed once and copied per batch
(a transformers `DynamicCache` is mutated by forward). Only the logits of the scored
positions are computed (`logits_to_keep` as an index tensor).

`SequenceObjective` covers the target-string objective (control before or after a context)
and the stream objective; `MeanObjective` averages several (universal prompts).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

LogProbLoss = Callable[[Tensor], Tensor]
"""Maps a node's log-probs (B, n, V) at the scored positions to a loss (B,); differentiable."""


class ControllerError(ValueError):
    """A bad option or input for a controller; the message names the option."""


@dataclass(frozen=True)
class Scores:
    """Per-candidate loss (B,) float32 and whether the candidate meets the objective (B,) bool."""

    loss: Tensor
    success: Tensor

    def best_success(self) -> tuple[int, float] | None:
        """The index and loss of the lowest-loss candidate that meets the objective, or None
        when none does."""
        if not bool(self.success.any()):
            return None
        masked = torch.where(self.success, self.loss, torch.full_like(self.loss, float("inf")))
        win = int(masked.argmin())
        return win, float(masked[win])


class Objective(Protocol):
    """The protocol the GCG engine and the greedy search use."""

    @property
    def model(self) -> PreTrainedModel: ...

    def scores(self, control_ids: Tensor) -> Scores:
        """control_ids (B, k) -> Scores with loss (B,) and success (B,)."""
        ...

    def embed_loss(self, control_embeds: Tensor) -> Tensor:
        """control_embeds (1, k, d), already scaled as the model's embedding would -> scalar."""
        ...

    def check_control_length(self, k: int) -> None:
        """Raise ControllerError if k control tokens do not fit in the model's context."""
        ...

    def confirm(self, control_ids: Tensor) -> bool:
        """control_ids (k,) -> whether the prompt meets the objective in one plain forward
        pass (input ids, no cache, every logit): the check behind a claimed success."""
        ...


def input_embedding(model: PreTrainedModel) -> tuple[Tensor, float]:
    """The input embedding matrix (V, d) and the scale the embedding module multiplies by.

    Gemma3's `Gemma3TextScaledWordEmbedding` multiplies looked-up rows by `embed_scale`
    (sqrt(d)); a one-hot gradient that skipped it would be wrong by that factor and, through
    the nonlinearity, in direction as well.
    """
    try:
        module = model.get_input_embeddings()
    except (NotImplementedError, AttributeError) as err:
        raise ControllerError(f"model: {type(model).__name__} has no input embeddings") from err
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ControllerError(
            f"model: {type(model).__name__} has no input embedding matrix "
            f"(get_input_embeddings() returned {type(module).__name__})"
        )
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return weight, 1.0
    return weight, float(scale.item() if isinstance(scale, Tensor) else scale)


def embed_ids(model: PreTrainedModel, ids: Tensor) -> Tensor:
    """ids (B, T) -> embeddings (B, T, d) exactly as the model's forward would embed them."""
    return model.get_input_embeddings()(ids)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes a key/value cache: transformers 5.x
    renamed `past_key_values` to `cache`; accept either."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def model_context_length(model: PreTrainedModel) -> int | None:
    """Maximum number of positions the model accepts, or None when the config does not say."""
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos] when the tokenizer adds a BOS token on its own, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a")["input_ids"]
    return [int(bos)] if probe and probe[0] == bos else []


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    message = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in message or "can't allocate memory" in message
    )


class SequenceObjective:
    """Mean NLL of the last `n_scored` tokens of [prefix][control][rest].

    The default loss is the mean NLL of those tokens and success means every one of them is
    the greedy argmax (teacher-forced, which is the same as the greedy continuation producing
    them). A `log_prob_loss` replaces the loss (success is then always False): it receives
    this node's log-probs (B, n, V) at the n scored positions, so that a collective objective
    can pool them with other nodes' fixed predictions.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        prefix_ids: Sequence[int],
        rest_ids: Sequence[int],
        n_scored: int,
        *,
        log_prob_loss: LogProbLoss | None = None,
        use_prefix_cache: bool = True,
        labels: Sequence[int] | None = None,
    ) -> None:
        if not 1 <= n_scored <= len(rest_ids):
            raise ControllerError(f"n_scored: {n_scored} must be in 1..{len(rest_ids)}")
        if labels is not None and len(labels) != n_scored:
            raise ControllerError(f"labels: {len(labels)} tokens, expected n_scored = {n_scored}")
        input_embedding(model)  # fail early on a model without input embeddings
        self._model = model
        device = model.device
        self.prefix_ids = torch.tensor(list(prefix_ids), dtype=torch.long, device=device)  # (P,)
        self.rest_ids = torch.tensor(list(rest_ids), dtype=torch.long, device=device)  # (R,)
        self.n_scored = n_scored
        # the scored tokens, when they differ from what the model reads there (a masked view)
        self._labels = None if labels is None else torch.tensor(list(labels), dtype=torch.long, device=device)
        self.log_prob_loss = log_prob_loss
        self.use_prefix_cache = use_prefix_cache and len(prefix_ids) > 0
        self._prefix_kv: Cache | None = None
        self._cache_arg = cache_kwarg(model)

    @property
    def model(self) -> PreTrainedModel:
        return self._model

    @property
    def labels(self) -> Tensor:
        """The scored tokens (n,): the last n_scored of rest_ids unless given apart."""
        return self.rest_ids[-self.n_scored :] if self._labels is None else self._labels

    def check_control_length(self, k: int) -> None:
        limit = model_context_length(self._model)
        total = len(self.prefix_ids) + k + len(self.rest_ids)
        if limit is not None and total > limit:
            raise ControllerError(
                f"k: {k} control tokens make a sequence of {total} tokens, longer than the "
                f"model context ({limit} positions)"
            )

    # -- the prefix cache -------------------------------------------------------------------

    @torch.no_grad()
    def _prefix_cache_1(self) -> Cache:
        """The prefix's key/value cache for one row, computed once."""
        if self._prefix_kv is None:
            out = self._model(input_ids=self.prefix_ids[None], use_cache=True)
            self._prefix_kv = out.cache if "cache" in out else out.past_key_values
        return self._prefix_kv

    def _prefix_cache(self, batch: int) -> Cache:
        """A fresh cache holding the prefix for `batch` rows (forward mutates a cache).

        Copied from the prefix's own cache object rather than rebuilt from its tensors: a
        sliding-window layer (Gemma3) keeps only its window but counts every position seen.
        """
        cache = copy.deepcopy(self._prefix_cache_1())
        if batch > 1:
            cache.batch_repeat_interleave(batch)  # each layer (B, heads, P, head_dim)
        return cache

    # -- forward ----------------------------------------------------------------------------

    def _forward(self, batch: int, length: int, **inputs: Tensor) -> Tensor:
        """One forward over `length` new positions (after the cached prefix, if any) ->
        logits (B, n, V) at the n positions that predict the labels."""
        first = length - self.n_scored - 1
        if first < 0:
            raise ControllerError(
                "k: the first scored token needs a token before it (a prefix, a control prompt "
                "or some context)"
            )
        # An index tensor, not an int: slicing the last positions leaves a non-contiguous view
        # that CPU bf16 matmul turns into a batched copy of the whole lm_head (20x slower).
        keep = torch.arange(first, length - 1, device=self._model.device)  # (n,)
        if self.use_prefix_cache:
            cache = {self._cache_arg: self._prefix_cache(batch)}
            out = self._model(**inputs, use_cache=True, logits_to_keep=keep, **cache)
        else:
            out = self._model(**inputs, use_cache=False, logits_to_keep=keep)
        return out.logits

    def _scored_logits(self, control_embeds: Tensor) -> Tensor:
        """control_embeds (B, k, d) -> logits (B, n, V) at the positions predicting the labels."""
        batch = control_embeds.shape[0]
        rest = embed_ids(self._model, self.rest_ids[None]).expand(batch, -1, -1)  # (B, R, d)
        parts = [control_embeds, rest]
        if not self.use_prefix_cache:
            parts.insert(0, embed_ids(self._model, self.prefix_ids[None]).expand(batch, -1, -1))
        inputs = torch.cat(parts, dim=1)  # (B, [P+]k+R, d)
        return self._forward(batch, inputs.shape[1], inputs_embeds=inputs)

    def _scored_logits_from_ids(self, control_ids: Tensor) -> Tensor:
        """control_ids (B, k) -> logits (B, n, V); same as `_scored_logits` on their embeddings."""
        batch = control_ids.shape[0]
        parts = [control_ids, self.rest_ids[None].expand(batch, -1)]
        if not self.use_prefix_cache:
            parts.insert(0, self.prefix_ids[None].expand(batch, -1))
        ids = torch.cat(parts, dim=1)  # (B, [P+]k+R)
        return self._forward(batch, ids.shape[1], input_ids=ids)

    def _loss(self, logits: Tensor) -> Tensor:
        """logits (B, n, V) -> loss (B,) in float32, or float64 for a float64 model."""
        precise = logits.to(torch.promote_types(logits.dtype, torch.float32))
        log_probs = F.log_softmax(precise, dim=-1)  # (B, n, V)
        if self.log_prob_loss is not None:
            return self.log_prob_loss(log_probs)
        labels = self.labels[None, :, None].expand(logits.shape[0], -1, 1)  # (B, n, 1)
        return -log_probs.gather(-1, labels).squeeze(-1).mean(dim=-1)

    @torch.no_grad()
    def scores(self, control_ids: Tensor) -> Scores:
        control_ids = control_ids.to(self._model.device)
        logits = self._scored_logits_from_ids(control_ids)  # (B, n, V)
        loss = self._loss(logits)
        if self.log_prob_loss is not None:
            success = torch.zeros(loss.shape[0], dtype=torch.bool, device=loss.device)
        else:
            success = (logits.argmax(dim=-1) == self.labels[None]).all(dim=-1)  # (B,)
        return Scores(loss=loss, success=success)

    def embed_loss(self, control_embeds: Tensor) -> Tensor:
        return self._loss(self._scored_logits(control_embeds)).sum()

    @torch.no_grad()
    def confirm(self, control_ids: Tensor) -> bool:
        """Success recomputed the plain way: [prefix][control][rest] as input ids in one
        uncached forward with every position's logits. The prefix cache, `logits_to_keep`
        and batching each round differently, so in bfloat16 a near-tie can flip."""
        if self.log_prob_loss is not None:
            return False
        ids = torch.cat([self.prefix_ids, control_ids.to(self.prefix_ids.device), self.rest_ids])
        logits = self._model(input_ids=ids[None], use_cache=False).logits[0]  # (T, V)
        predicted = logits[len(ids) - self.n_scored - 1 : -1].argmax(dim=-1)  # (n,)
        return bool((predicted == self.labels).all())


class MeanObjective:
    """The mean loss over several objectives on one model; success = every part succeeds.

    This is the universal-prompt objective: one control prompt for many (context, target) pairs.
    """

    def __init__(self, parts: Sequence[Objective]) -> None:
        if not parts:
            raise ControllerError(
                "pairs: a mean objective needs at least one (context, target) pair"
            )
        models = {id(part.model) for part in parts}
        if len(models) != 1:
            raise ControllerError("pairs: every part of a mean objective must use the same model")
        self.parts = list(parts)

    @property
    def model(self) -> PreTrainedModel:
        return self.parts[0].model

    def check_control_length(self, k: int) -> None:
        for part in self.parts:
            part.check_control_length(k)

    def scores(self, control_ids: Tensor) -> Scores:
        each = [part.scores(control_ids) for part in self.parts]
        loss = torch.stack([s.loss for s in each]).mean(dim=0)  # (B,)
        success = torch.stack([s.success for s in each]).all(dim=0)  # (B,)
        return Scores(loss=loss, success=success)

    def embed_loss(self, control_embeds: Tensor) -> Tensor:
        return torch.stack([part.embed_loss(control_embeds) for part in self.parts]).mean()

    def confirm(self, control_ids: Tensor) -> bool:
        return all(part.confirm(control_ids) for part in self.parts)


def target_objective(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: str,
    *,
    prefix: str = "",
    suffix: str = "",
    prefix_ids: Sequence[int] | None = None,
    use_prefix_cache: bool = True,
) -> SequenceObjective:
    """NLL of `target` after [bos][prefix][control][suffix].

    The control is a suffix of a context (`prefix=context`, as in GCG attacks) or a prefix
    placed before x0 (`suffix=x0`, as in the Magic Words paper). `prefix_ids`, when given,
    replaces [bos][prefix] with explicit ids.
    """
    target_ids = encode(tokenizer, target)
    if not target_ids:
        raise ControllerError(f"target: {target!r} tokenizes to no tokens")
    if prefix_ids is None:
        prefix_ids = default_prefix_ids(tokenizer) + (encode(tokenizer, prefix) if prefix else [])
    suffix_ids = encode(tokenizer, suffix) if suffix else []
    return SequenceObjective(
        model,
        prefix_ids,
        suffix_ids + target_ids,
        len(target_ids),
        use_prefix_cache=use_prefix_cache,
    )


def stream_objective(
    model: PreTrainedModel,
    stream_ids: Sequence[int],
    *,
    offset: int = 1,
    prefix_ids: Sequence[int] = (),
    log_prob_loss: LogProbLoss | None = None,
    use_prefix_cache: bool = True,
    labels: Sequence[int] | None = None,
) -> SequenceObjective:
    """A node's NLL over a stretch of the stream: layout [prefix][control][stream].

    The loss is the mean NLL of `stream_ids[offset:]`, each predicted from the control and the
    stream before it (tokens before `offset` are context only). `prefix_ids` is usually [bos].
    `labels` (as many as `stream_ids[offset:]`) are scored instead when what the model reads
    differs from the true tokens (a masked view reads placeholders).
    """
    if not 0 <= offset < len(stream_ids):
        raise ControllerError(f"offset: {offset} must be in 0..{len(stream_ids) - 1}")
    return SequenceObjective(
        model,
        prefix_ids,
        stream_ids,
        len(stream_ids) - offset,
        log_prob_loss=log_prob_loss,
        use_prefix_cache=use_prefix_cache,
        labels=labels,
    )


def score_batched(
    objective: Objective, candidates: Tensor, batch_size: int | None = None
) -> tuple[Scores, int | None]:
    """Score candidates (B, k) in batches, halving the batch size on out-of-memory.

    Returns the scores (B,) and the batch size to use next time: `batch_size` unchanged
    unless it had to shrink (None means all candidates in one batch).
    """
    total = candidates.shape[0]
    size = total if batch_size is None else max(1, min(batch_size, total))
    shrunk = False
    losses: list[Tensor] = []
    successes: list[Tensor] = []
    start = 0
    while start < total:
        try:
            part = objective.scores(candidates[start : start + size])
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_out_of_memory(err) or size == 1:
                raise
            size, shrunk = max(1, size // 2), True
            logger.warning("out of memory scoring candidates; batch size now %d", size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        losses.append(part.loss)
        successes.append(part.success)
        start += size
    next_size = size if shrunk else batch_size
    if not losses:
        empty = torch.zeros(0)
        return Scores(loss=empty, success=empty.bool()), next_size
    return Scores(loss=torch.cat(losses), success=torch.cat(successes)), next_size
