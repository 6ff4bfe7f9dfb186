"""Greedy back-generation and the back-off search of the Magic Words paper (arXiv 2310.04444).

Greedy back-generation grows a control prompt from the front: for a prompt u of j tokens it
tries every allowed token t as a new first token, scores [t] + u with the objective in
batches, keeps the best, and stops at the first prompt that meets the objective. It is
exhaustive over the vocabulary at each length (or over the `candidates` tokens with the most
promising one-hot gradient, a cheaper approximation), and practical for k <= 3.

`backoff_search` runs the measurement's ladder over prompt lengths ks: the empty prompt,
greedy back-generation for k <= `greedy_max_k`, then GCG for each longer k (warm-started from
the greedy prompt), stopping at the first success.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from controllers.filters import allowed_token_mask, filter_candidates
from controllers.gcg import GCGConfig, Progress, one_hot_gradient, run_gcg
from controllers.objectives import ControllerError, Objective, input_embedding, score_batched

logger = logging.getLogger(__name__)

Method = Literal["none", "base", "greedy", "gcg"]


class GreedyConfig(BaseModel):
    """Settings of greedy back-generation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(default=256, ge=1, description="candidate prompts per forward")
    candidates: int | None = Field(
        default=None,
        ge=1,
        description="None: try every allowed token; N: only the N with the best one-hot gradient",
    )
    filter_special: bool = True
    filter_ascii: bool = True
    filter_retokenize: bool = False


@dataclass(frozen=True)
class GreedyResult:
    """The best prompt found by back-generation; `losses[j]` is the best loss at length j+1."""

    best_ids: list[int]
    best_text: str
    best_loss: float
    success: bool
    losses: list[float] = field(default_factory=list)
    candidates_scored: int = 0
    wall_time_s: float = 0.0


def _token_pool(
    model: PreTrainedModel,
    objective: Objective,
    current: Tensor,
    allowed: Tensor,
    candidates: int | None,
) -> Tensor:
    """The tokens (A,) to try as the new first token before `current` (j,)."""
    pool = allowed.nonzero().squeeze(1)  # (A,)
    if candidates is None or candidates >= len(pool):
        return pool
    # Linearize the loss around an arbitrary allowed token at the new position; the
    # gradient's ranking picks the tokens worth scoring exactly.
    probe = torch.cat([pool[:1].to(current.device), current])  # (j+1,)
    grad = one_hot_gradient(model, objective, probe)[0].float().cpu()  # (V,)
    grad[~allowed] = float("inf")
    return (-grad).topk(candidates).indices  # (candidates,)


def greedy_backgenerate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    objective: Objective,
    max_k: int,
    config: GreedyConfig | None = None,
    *,
    init_ids: Sequence[int] = (),
    allowed: Tensor | None = None,
    progress: Progress | None = None,
) -> GreedyResult:
    """Prepend up to max_k - len(init_ids) tokens, one at a time, each the best of its batch scan.

    Stops at the first prompt meeting the objective (its loss may not be the lowest of its
    scan: any success will do). `progress` is called with (lengths done, lengths total).
    """
    config = config or GreedyConfig()
    weight, _ = input_embedding(model)
    if max_k < len(init_ids):
        raise ControllerError(
            f"max_k: {max_k} is shorter than the initial prompt ({len(init_ids)})"
        )
    objective.check_control_length(max_k)
    if allowed is None:
        allowed = allowed_token_mask(
            tokenizer,
            weight.shape[0],
            no_special=config.filter_special,
            ascii_only=config.filter_ascii,
        )
    allowed = allowed.cpu()
    started = time.perf_counter()
    device = model.device
    current = torch.tensor(list(init_ids), dtype=torch.long, device=device)  # (j,)
    best_loss = float("inf")
    success = False
    losses: list[float] = []
    scored = 0
    batch_size: int | None = config.batch_size
    lengths = max_k - len(init_ids)
    for done in range(lengths):
        pool = _token_pool(model, objective, current, allowed, config.candidates).to(device)
        candidates = torch.cat([pool[:, None], current.expand(len(pool), -1)], dim=1)  # (A, j+1)
        if config.filter_retokenize:
            candidates = filter_candidates(
                candidates, tokenizer, retokenize=True, deduplicate=False
            )
        if candidates.shape[0] == 0:
            logger.info("length %d: no candidate survives the filters", current.shape[0] + 1)
            break
        step_loss, step_ids = float("inf"), candidates[0]
        start = 0
        while start < candidates.shape[0]:
            chunk = candidates[start : start + (batch_size or candidates.shape[0])]
            scores, batch_size = score_batched(objective, chunk, batch_size)
            start += chunk.shape[0]
            scored += chunk.shape[0]
            if bool(scores.success.any()):
                masked = torch.where(
                    scores.success, scores.loss, torch.full_like(scores.loss, float("inf"))
                )
                win = int(masked.argmin())
                step_loss, step_ids, success = float(masked[win]), chunk[win], True
                break
            index = int(scores.loss.argmin())
            if float(scores.loss[index]) < step_loss:
                step_loss, step_ids = float(scores.loss[index]), chunk[index]
        current = step_ids
        best_loss = step_loss
        losses.append(step_loss)
        if progress is not None:
            progress(done + 1, lengths)
        if success:
            break
    ids = [int(i) for i in current.tolist()]
    return GreedyResult(
        best_ids=ids,
        best_text=str(tokenizer.decode(ids)),
        best_loss=best_loss,
        success=success,
        losses=losses,
        candidates_scored=scored,
        wall_time_s=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class Attempt:
    """One rung of the back-off ladder."""

    k: int
    method: Method
    loss: float
    success: bool
    wall_time_s: float


@dataclass(frozen=True)
class BackoffResult:
    """The shortest prompt found that meets the objective, or the lowest-loss one if none did.

    `k` is the length of `ids` (0 for the empty prompt); `method` is "base" when the empty
    prompt already succeeds and "none" when no attempt was made.
    """

    reached: bool
    k: int
    method: Method
    ids: list[int]
    text: str
    loss: float
    attempts: list[Attempt] = field(default_factory=list)


DEFAULT_KS: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 10)


def backoff_search(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    objective: Objective,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    greedy: GreedyConfig | None = None,
    gcg: GCGConfig | None = None,
    greedy_max_k: int = 3,
    allowed: Tensor | None = None,
) -> BackoffResult:
    """Try prompt lengths in increasing order and stop at the first that meets the objective.

    k = 0 scores the empty prompt; 1 <= k <= greedy_max_k uses one run of greedy
    back-generation up to the largest such k; each larger k runs GCG from the greedy prompt
    padded at the front with random allowed tokens (seeded by gcg.seed and k).
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 0:
        raise ControllerError(f"k: need one or more lengths >= 0, got {list(ks)}")
    objective.check_control_length(ks[-1])
    greedy = greedy or GreedyConfig()
    gcg = gcg or GCGConfig()
    weight, _ = input_embedding(model)
    if allowed is None:
        allowed = allowed_token_mask(
            tokenizer, weight.shape[0], no_special=gcg.filter_special, ascii_only=gcg.filter_ascii
        )
    attempts: list[Attempt] = []
    best: tuple[float, list[int], Method] = (float("inf"), [], "none")

    def finish(reached: bool, ids: list[int], loss: float, method: Method) -> BackoffResult:
        return BackoffResult(
            reached=reached,
            k=len(ids),
            method=method,
            ids=ids,
            text=str(tokenizer.decode(ids)),
            loss=loss,
            attempts=attempts,
        )

    if ks[0] == 0:
        started = time.perf_counter()
        base = objective.scores(torch.zeros(1, 0, dtype=torch.long, device=model.device))
        loss, ok = float(base.loss[0]), bool(base.success[0])
        attempts.append(Attempt(0, "base", loss, ok, time.perf_counter() - started))
        if ok:
            return finish(True, [], loss, "base")
        best = (loss, [], "base")

    greedy_ks = [k for k in ks if 1 <= k <= greedy_max_k]
    greedy_ids: list[int] = []
    if greedy_ks:
        found = greedy_backgenerate(
            model, tokenizer, objective, greedy_ks[-1], greedy, allowed=allowed
        )
        greedy_ids = found.best_ids
        attempts.append(
            Attempt(
                len(found.best_ids), "greedy", found.best_loss, found.success, found.wall_time_s
            )
        )
        if found.success:
            return finish(True, found.best_ids, found.best_loss, "greedy")
        if found.best_loss < best[0]:
            best = (found.best_loss, found.best_ids, "greedy")

    pool = allowed.nonzero().squeeze(1)  # (A,)
    for k in (k for k in ks if k > greedy_max_k):
        generator = torch.Generator().manual_seed(gcg.seed * 1_000_003 + k)
        keep = greedy_ids[-k:] if greedy_ids else []
        pad = pool[torch.randint(0, len(pool), (k - len(keep),), generator=generator)].tolist()
        result = run_gcg(
            model,
            tokenizer,
            objective,
            gcg.model_copy(update={"seed": gcg.seed * 1_000_003 + k}),
            init_ids=pad + keep,
            allowed=allowed,
        )
        attempts.append(Attempt(k, "gcg", result.best_loss, result.success, result.wall_time_s))
        if result.success:
            return finish(True, result.best_ids, result.best_loss, "gcg")
        if result.best_loss < best[0]:
            best = (result.best_loss, result.best_ids, "gcg")
    logger.info("no prompt up to k=%d met the objective; best loss %.4f", ks[-1], best[0])
    return finish(False, best[1], best[0], best[2])
