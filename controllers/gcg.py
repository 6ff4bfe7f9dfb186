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
is remembered once `confirm_success` has checked the claim with one plain forward pass (the
objective's scores come from the prefix cache and a batch, which in bfloat16 can flip a
near-tie); a refuted claim is counted and the search goes on. With `early_stop` the run
ends at the first confirmed success and returns that prompt, otherwise the result is the
lowest-loss successful prompt, or the lowest-loss prompt when none succeeded.

`GCG.run` is the loop over steps; `Found` keeps what the steps found (the best prompt, the
best successful one, the per-step losses) and turns it into the `GCGResult`. An `on_step`
callback sees the lowest-loss prompt after each step and may end the search (a caller's
early stopping, e.g. on held-out data). All randomness comes from a `torch.Generator`
seeded with `GCGConfig.seed`.
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

from controllers.filters import filter_candidates, model_token_mask, retokenizes
from controllers.objectives import (
    ControllerError,
    Objective,
    Scores,
    input_embedding,
    score_batched,
)

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with (done, total) after each unit of work."""
OnStep = Callable[[int, Tensor], bool]
"""Called with (step, the lowest-loss prompt so far (k,)) after each step; True ends the search."""


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
    refuted_successes: int = 0  # claims of success that the plain forward pass did not confirm


@dataclass
class Found:
    """What a search has found so far: the lowest-loss prompt, the lowest-loss prompt that
    met the objective and the step that first met it, and the per-step records."""

    best_loss: float
    best_ids: Tensor  # (k,)
    success_loss: float | None = None
    success_ids: Tensor | None = None  # (k,)
    first_success_step: int | None = None
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    refuted: int = 0

    @classmethod
    def start(cls, ids: Tensor, scores: Scores) -> Found:
        """The initial prompt ids (k,) and its scores (1,); step 0 when it already succeeds."""
        found = cls(best_loss=float(scores.loss[0]), best_ids=ids)
        if bool(scores.success[0]):
            found.success_loss, found.success_ids = found.best_loss, ids
            found.first_success_step = 0
        return found

    def observe(self, step: int, candidates: Tensor, scores: Scores) -> int:
        """Fold in one step's candidates (W', k) and their scores (W',); returns the index of
        the step's lowest-loss candidate."""
        index = int(scores.loss.argmin())
        step_loss = float(scores.loss[index])
        if step_loss < self.best_loss:
            self.best_loss, self.best_ids = step_loss, candidates[index]
        success = scores.best_success()
        if success is not None:
            win, loss = success
            if self.success_loss is None or loss < self.success_loss:
                self.success_loss, self.success_ids = loss, candidates[win]
            if self.first_success_step is None:
                self.first_success_step = step
        return index

    def result(
        self, tokenizer: PreTrainedTokenizerBase, steps: int, wall_time_s: float
    ) -> GCGResult:
        """The lowest-loss successful prompt, or the lowest-loss prompt when none succeeded."""
        if self.success_ids is not None and self.success_loss is not None:
            final_ids, final_loss, success = self.success_ids, self.success_loss, True
        else:
            final_ids, final_loss, success = self.best_ids, self.best_loss, False
            logger.info(
                "no prompt met the objective in %d steps; best loss %.4f", steps, self.best_loss
            )
        ids_list = [int(i) for i in final_ids.tolist()]
        return GCGResult(
            best_ids=ids_list,
            best_text=str(tokenizer.decode(ids_list)),
            best_loss=final_loss,
            success=success,
            losses=self.losses,
            steps=steps,
            wall_time_s=wall_time_s,
            step_times_s=self.step_times,
            first_success_step=self.first_success_step,
            refuted_successes=self.refuted,
        )


def confirm_success(objective: Objective, candidates: Tensor, scores: Scores) -> tuple[Scores, bool]:
    """The scores (B,) of candidates (B, k) with success kept for at most one candidate: the
    lowest-loss one the objective claims, when `objective.confirm` (one plain forward pass)
    agrees. Returns them and whether a claim was refuted."""
    claim = scores.best_success()
    success = torch.zeros_like(scores.success)
    if claim is None:
        return Scores(loss=scores.loss, success=success), False
    win, loss = claim
    if objective.confirm(candidates[win]):
        success[win] = True
        return Scores(loss=scores.loss, success=success), False
    logger.info("a claimed success (loss %.4f) failed the plain forward check; searching on", loss)
    return Scores(loss=scores.loss, success=success), True


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
            allowed = model_token_mask(model, tokenizer, config)
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

    def _start_ids(self, init_ids: Tensor | list[int] | None) -> Tensor:
        """The first prompt (k,): `init_ids`, checked, or k = num_tokens random allowed tokens."""
        if init_ids is None:
            current = self.initial_ids(self.config.num_tokens)
        else:
            current = torch.as_tensor(init_ids, dtype=torch.long).to(self.model.device)
        if current.dim() != 1 or current.shape[0] < 1:
            raise ControllerError("init_ids: need a 1-d sequence of at least one token id")
        self.objective.check_control_length(current.shape[0])
        if self.config.filter_retokenize and not bool(
            retokenizes(self.tokenizer, current[None].cpu())[0]
        ):
            text = self.tokenizer.decode(current.tolist())
            raise ControllerError(
                f"init: the initial prompt {text!r} does not survive decoding and re-encoding, so with the "
                "re-tokenization filter on nearly every candidate (which keeps the other tokens) is filtered "
                "out too; start from a prompt that does (e.g. 'x x x x') or switch filter_retokenize off"
            )
        return current

    def _step(self, step: int, found: Found) -> float:
        """One step from the buffer's best prompt; returns the loss the step records (the
        buffer's best when every candidate was filtered out)."""
        config = self.config
        current = self.buffer[0][1]  # (k,)
        grad = one_hot_gradient(self.model, self.objective, current)  # (k, V)
        candidates = sample_candidates(
            current,
            grad,
            config.search_width,
            config.topk,
            config.n_replace,
            ~self.allowed,
            self.generator,
        )  # (W, k)
        candidates = filter_candidates(
            candidates, self.tokenizer, retokenize=config.filter_retokenize
        )  # (W', k)
        if candidates.shape[0] == 0:
            logger.warning("step %d: every candidate was filtered out; resampling", step)
            return self.buffer[0][0]
        scores, self.batch_size = score_batched(self.objective, candidates, self.batch_size)
        scores, refuted = confirm_success(self.objective, candidates, scores)
        found.refuted += refuted
        index = found.observe(step, candidates, scores)
        step_loss = float(scores.loss[index])
        self._add_to_buffer(step_loss, candidates[index])
        logger.debug("step %d: loss %.4f best %.4f", step, step_loss, found.best_loss)
        return step_loss

    def run(
        self,
        init_ids: Tensor | list[int] | None = None,
        progress: Progress | None = None,
        on_step: OnStep | None = None,
    ) -> GCGResult:
        config = self.config
        started = time.perf_counter()
        current = self._start_ids(init_ids)
        init_scores, self.batch_size = score_batched(self.objective, current[None], self.batch_size)
        init_scores, refuted = confirm_success(self.objective, current[None], init_scores)
        found = Found.start(current, init_scores)
        found.refuted += refuted
        self.buffer = [(found.best_loss, current)]
        step = 0
        while step < config.num_steps and not (config.early_stop and found.success_ids is not None):
            step_start = time.perf_counter()
            step += 1
            found.losses.append(self._step(step, found))
            found.step_times.append(time.perf_counter() - step_start)
            if progress is not None:
                progress(step, config.num_steps)
            if on_step is not None and on_step(step, found.best_ids):
                break
        return found.result(self.tokenizer, step, time.perf_counter() - started)


def run_gcg(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    objective: Objective,
    config: GCGConfig | None = None,
    init_ids: Tensor | list[int] | None = None,
    progress: Progress | None = None,
    *,
    allowed: Tensor | None = None,
    on_step: OnStep | None = None,
) -> GCGResult:
    """Search a control prompt that minimizes `objective` (see the module docstring).

    `init_ids` (k,) sets the starting prompt and its length; otherwise k = config.num_tokens
    random allowed tokens. `allowed` (V,) bool overrides the token filters (reuse it across
    runs: computing it decodes the whole vocabulary). `on_step(step, best_ids)` runs after
    each step; when it returns True the search ends there.
    """
    if objective.model is not model:
        raise ControllerError("objective: was built for a different model than the one given")
    return GCG(model, tokenizer, objective, config or GCGConfig(), allowed=allowed).run(
        init_ids, progress, on_step
    )
