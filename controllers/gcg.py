"""Greedy coordinate gradient (GCG, Zou et al. 2023) over a control prompt of k tokens.

One step:

1. the gradient of the objective with respect to the one-hot matrix of the current prompt
   (k, V), taken through the input embedding matrix and its scale;
2. `sample_candidates`: `search_width` copies of the prompt, each with `n_replace` positions
   replaced by one of the `topk` tokens with the most negative gradient at that position;
3. `filter_candidates`: drop duplicates and prompts that do not survive a text round trip;
4. score every candidate with the objective (batched, batch halved on out-of-memory) and
   keep the best in a buffer; the next step starts from the buffer's best.

A candidate that meets the objective's success condition (every target token the argmax)
is remembered; with `early_stop` the run ends there and returns that prompt, otherwise the
result is the lowest-loss successful prompt, or the lowest-loss prompt when none succeeded.

All randomness comes from a `torch.Generator` seeded with `GCGConfig.seed`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from controllers.filters import allowed_token_mask, filter_candidates, retokenizes
from controllers.objectives import ControllerError, Objective, input_embedding, score_batched

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with (done, total) after each unit of work."""


class GCGConfig(BaseModel):
    """Search settings. Validation errors name the field (pydantic's are ValueErrors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_tokens: int = Field(
        default=20, ge=1, description="k, the prompt length, when no init_ids are given"
    )
    num_steps: int = Field(default=100, ge=0)
    search_width: int = Field(default=64, ge=1, description="candidates scored per step")
    topk: int = Field(
        default=64, ge=1, description="tokens per position to sample replacements from"
    )
    n_replace: int = Field(default=1, ge=1, description="positions replaced per candidate")
    buffer_size: int = Field(
        default=0, ge=0, description="0: always move to the step's best candidate"
    )
    early_stop: bool = True
    filter_special: bool = True
    filter_ascii: bool = True
    filter_retokenize: bool = True
    batch_size: int | None = Field(
        default=None, ge=1, description="candidates per forward; None: all"
    )
    seed: int = 0


@dataclass(frozen=True)
class GCGResult:
    """The outcome of one search. `best_loss` is the objective's loss of `best_ids`."""

    best_ids: list[int]
    best_text: str
    best_loss: float
    success: bool
    losses: list[float] = field(default_factory=list)  # the best candidate's loss, per step
    steps: int = 0
    wall_time_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    first_success_step: int | None = None  # 0 means the initial prompt already succeeded


def sample_candidates(
    ids: Tensor,
    grad: Tensor,
    search_width: int,
    topk: int,
    n_replace: int,
    not_allowed: Tensor | None,
    generator: torch.Generator,
) -> Tensor:
    """Sample `search_width` single-step variations of a prompt from its one-hot gradient.

    ids (k,) long; grad (k, V); not_allowed (V,) bool or None. Each candidate replaces
    `n_replace` distinct positions (clamped to k) with tokens drawn uniformly from the `topk`
    allowed tokens of most negative gradient at that position. Returns (search_width, k) long,
    on ids' device. Random draws use `generator` (a CPU generator) only.
    """
    k, vocab = grad.shape
    scores = -grad.detach().float().cpu()  # (k, V): higher = more promising
    if not_allowed is not None:
        scores[:, not_allowed.cpu()] = -float("inf")
        n_allowed = int((~not_allowed).sum())
        if n_allowed == 0:
            raise ControllerError("filters: no token is allowed in the control prompt")
        topk = min(topk, n_allowed)
    topk = min(topk, vocab)
    n_replace = min(n_replace, k)
    top_ids = scores.topk(topk, dim=1).indices  # (k, topk)
    positions = torch.rand(search_width, k, generator=generator).argsort(dim=1)[:, :n_replace]
    # positions (W, n_replace), distinct within a row
    choice = torch.randint(
        0, topk, (search_width, n_replace), generator=generator
    )  # (W, n_replace)
    values = top_ids[positions, choice]  # (W, n_replace)
    candidates = ids.detach().cpu().repeat(search_width, 1)  # (W, k)
    candidates.scatter_(1, positions, values)
    return candidates.to(ids.device)


def one_hot_gradient(model: PreTrainedModel, objective: Objective, ids: Tensor) -> Tensor:
    """Gradient (k, V) of the objective's loss w.r.t. the one-hot matrix of ids (k,).

    The control embeddings are one_hot @ W * scale, where scale is the embedding module's
    `embed_scale` (1 for most models), so that they equal the model's own embedding of ids.
    """
    weight, scale = input_embedding(model)
    with torch.enable_grad():
        one_hot = torch.zeros(
            ids.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device
        )
        one_hot.scatter_(1, ids[:, None].to(weight.device), 1.0)  # (k, V)
        one_hot.requires_grad_(True)
        embeds = one_hot @ weight  # (k, d)
        if scale != 1.0:
            embeds = embeds * torch.tensor(scale, dtype=weight.dtype, device=weight.device)
        loss = objective.embed_loss(embeds[None])  # (1, k, d) -> ()
        (grad,) = torch.autograd.grad(loss, [one_hot])
    return grad  # (k, V)


class GCG:
    """The state of one search: the allowed tokens, the generator, the buffer, the best prompts."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        objective: Objective,
        config: GCGConfig,
        *,
        allowed: Tensor | None = None,
    ) -> None:
        weight, _ = input_embedding(model)
        self.model = model
        self.tokenizer = tokenizer
        self.objective = objective
        self.config = config
        if allowed is None:
            allowed = allowed_token_mask(
                tokenizer,
                weight.shape[0],
                no_special=config.filter_special,
                ascii_only=config.filter_ascii,
            )
        if allowed.shape != (weight.shape[0],):
            raise ControllerError(
                f"allowed: mask of shape {tuple(allowed.shape)} does not match the vocabulary "
                f"({weight.shape[0]} embedding rows)"
            )
        if not bool(allowed.any()):
            raise ControllerError("filters: no token is allowed in the control prompt")
        self.allowed = allowed.cpu()  # (V,)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.batch_size = config.batch_size
        self.buffer: list[tuple[float, Tensor]] = []

    def initial_ids(self, k: int) -> Tensor:
        """k allowed tokens drawn with the generator; a draw that survives retokenization if
        one is found in a few tries."""
        pool = self.allowed.nonzero().squeeze(1)  # (A,)
        ids = pool[torch.randint(0, len(pool), (k,), generator=self.generator)]
        for _ in range(20):
            if not self.config.filter_retokenize or bool(retokenizes(self.tokenizer, ids[None])[0]):
                break
            ids = pool[torch.randint(0, len(pool), (k,), generator=self.generator)]
        return ids.to(self.model.device)

    def _add_to_buffer(self, loss: float, ids: Tensor) -> None:
        if self.config.buffer_size == 0:
            self.buffer = [(loss, ids)]
            return
        if len(self.buffer) < self.config.buffer_size:
            self.buffer.append((loss, ids))
        elif loss < self.buffer[-1][0]:
            self.buffer[-1] = (loss, ids)
        self.buffer.sort(key=lambda item: item[0])

    def run(
        self, init_ids: Tensor | list[int] | None = None, progress: Progress | None = None
    ) -> GCGResult:
        config = self.config
        started = time.perf_counter()
        if init_ids is None:
            current = self.initial_ids(config.num_tokens)
        else:
            current = torch.as_tensor(init_ids, dtype=torch.long).to(self.model.device)
        if current.dim() != 1 or current.shape[0] < 1:
            raise ControllerError("init_ids: need a 1-d sequence of at least one token id")
        self.objective.check_control_length(current.shape[0])
        if config.filter_retokenize and not bool(retokenizes(self.tokenizer, current[None].cpu())[0]):
            text = self.tokenizer.decode(current.tolist())
            raise ControllerError(
                f"init: the initial prompt {text!r} does not survive decoding and re-encoding, so with the "
                "re-tokenization filter on nearly every candidate (which keeps the other tokens) is filtered "
                "out too; start from a prompt that does (e.g. 'x x x x') or switch filter_retokenize off"
            )
        not_allowed = ~self.allowed

        init_scores, self.batch_size = score_batched(self.objective, current[None], self.batch_size)
        best_loss, best_ids = float(init_scores.loss[0]), current
        success_loss, success_ids = None, None
        first_success_step = None
        if bool(init_scores.success[0]):
            success_loss, success_ids, first_success_step = best_loss, current, 0
        self.buffer = [(best_loss, current)]

        losses: list[float] = []
        step_times: list[float] = []
        step = 0
        while step < config.num_steps and not (config.early_stop and success_ids is not None):
            step_start = time.perf_counter()
            grad = one_hot_gradient(self.model, self.objective, current)  # (k, V)
            candidates = sample_candidates(
                current,
                grad,
                config.search_width,
                config.topk,
                config.n_replace,
                not_allowed,
                self.generator,
            )  # (W, k)
            candidates = filter_candidates(
                candidates, self.tokenizer, retokenize=config.filter_retokenize
            )  # (W', k)
            step += 1
            if candidates.shape[0] == 0:
                logger.warning("step %d: every candidate was filtered out; resampling", step)
                losses.append(self.buffer[0][0])
                step_times.append(time.perf_counter() - step_start)
                if progress is not None:
                    progress(step, config.num_steps)
                continue
            scores, self.batch_size = score_batched(self.objective, candidates, self.batch_size)
            index = int(scores.loss.argmin())
            step_loss = float(scores.loss[index])
            if step_loss < best_loss:
                best_loss, best_ids = step_loss, candidates[index]
            if bool(scores.success.any()):
                masked = torch.where(
                    scores.success, scores.loss, torch.full_like(scores.loss, float("inf"))
                )
                win = int(masked.argmin())
                if success_loss is None or float(masked[win]) < success_loss:
                    success_loss, success_ids = float(masked[win]), candidates[win]
                if first_success_step is None:
                    first_success_step = step
            self._add_to_buffer(step_loss, candidates[index])
            current = self.buffer[0][1]
            losses.append(step_loss)
            step_times.append(time.perf_counter() - step_start)
            logger.debug("step %d: loss %.4f best %.4f", step, step_loss, best_loss)
            if progress is not None:
                progress(step, config.num_steps)

        if success_ids is not None and success_loss is not None:
            final_ids, final_loss, success = success_ids, success_loss, True
        else:
            final_ids, final_loss, success = best_ids, best_loss, False
            logger.info("no prompt met the objective in %d steps; best loss %.4f", step, best_loss)
        ids_list = [int(i) for i in final_ids.tolist()]
        return GCGResult(
            best_ids=ids_list,
            best_text=str(self.tokenizer.decode(ids_list)),
            best_loss=final_loss,
            success=success,
            losses=losses,
            steps=step,
            wall_time_s=time.perf_counter() - started,
            step_times_s=step_times,
            first_success_step=first_success_step,
        )


def run_gcg(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    objective: Objective,
    config: GCGConfig | None = None,
    init_ids: Tensor | list[int] | None = None,
    progress: Progress | None = None,
    *,
    allowed: Tensor | None = None,
) -> GCGResult:
    """Search a control prompt that minimizes `objective` (see the module docstring).

    `init_ids` (k,) sets the starting prompt and its length; otherwise k = config.num_tokens
    random allowed tokens. `allowed` (V,) bool overrides the token filters (reuse it across
    runs: computing it decodes the whole vocabulary).
    """
    if objective.model is not model:
        raise ControllerError("objective: was built for a different model than the one given")
    return GCG(model, tokenizer, objective, config or GCGConfig(), allowed=allowed).run(
        init_ids, progress
    )
