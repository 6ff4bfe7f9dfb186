"""Greedy back-generation and the back-off search of the Magic Words paper (arXiv 2310.04444).

Greedy back-generation grows a control prompt from the front: for a prompt u of j tokens it
tries every allowed token t as a new first token, scores [t] + u with the objective in
batches, keeps the best, and stops at the first prompt that meets the objective. It is
exhaustive over the vocabulary at each length (or over the `candidates` tokens with the most
promising one-hot gradient, a cheaper approximation), and practical for k <= 3.

`backoff_search` runs the measurement's ladder over prompt lengths ks: the empty prompt,
greedy back-generation for k <= `greedy_max_k`, then GCG for each longer k (warm-started from
the greedy prompt), stopping at the first success. `BackoffConfig` holds those settings,
among them an optional budget per search (wall seconds and/or GCG steps over all rungs): a
`SearchClock` that the greedy scans and GCG's `on_step` consult, so that one hard pair cannot
run for many minutes; a search it cut short says at which length (`out_of_budget_k`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from controllers.filters import filter_candidates, model_token_mask
from controllers.gcg import GCGConfig, Progress, confirm_success, one_hot_gradient, run_gcg
from controllers.objectives import ControllerError, Objective, score_batched

logger = logging.getLogger(__name__)

Method = Literal["none", "base", "greedy", "gcg"]
Stop = Callable[[], bool]
"""Asked between units of work; True: stop now and return the best found so far."""


@dataclass
class SearchClock:
    """The budget of one back-off search: wall seconds and/or GCG steps over all its rungs
    (None: no limit), counted from the clock's creation; `cut_k` is the prompt length whose
    search the budget cut short (None while nothing was cut)."""

    seconds: float | None = None
    gcg_steps: int | None = None
    started: float = field(default_factory=time.perf_counter)
    steps_taken: int = 0
    cut_k: int | None = None

    def spent(self) -> bool:
        over_time = self.seconds is not None and time.perf_counter() - self.started >= self.seconds
        return over_time or (self.gcg_steps is not None and self.steps_taken >= self.gcg_steps)

    def gcg_step(self, k: int, step: int, num_steps: int) -> bool:
        """GCG's on_step at length k: count the step; True (stop) once the budget is spent."""
        self.steps_taken += 1
        if step < num_steps and self.spent():
            self.cut_k = k
            return True
        return False


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
    stopped_k: int | None = None  # the length whose scan `stop` cut short (None: ran to its end)


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


def _prepend_candidates(
    pool: Tensor, current: Tensor, tokenizer: PreTrainedTokenizerBase, retokenize: bool
) -> Tensor:
    """Every token of the pool (A,) put before the prompt current (j,): (A', j+1), A' <= A
    when `retokenize` drops the candidates that do not survive a text round trip."""
    candidates = torch.cat([pool[:, None], current.expand(len(pool), -1)], dim=1)  # (A, j+1)
    if retokenize:
        candidates = filter_candidates(candidates, tokenizer, retokenize=True, deduplicate=False)
    return candidates


@dataclass
class _Scan:
    """The outcome of scanning one length's candidates in batches."""

    loss: float
    ids: Tensor  # (j+1,)
    success: bool
    scored: int
    batch_size: int | None
    stopped: bool = False


def _scan(objective: Objective, candidates: Tensor, batch_size: int | None, stop: Stop | None = None) -> _Scan:
    """Score candidates (A, j+1) batch by batch: the first successful one ends the scan (the
    lowest-loss success of its batch), else the lowest loss wins; `stop` is asked after
    each batch but the last."""
    found = _Scan(float("inf"), candidates[0], False, 0, batch_size)
    start = 0
    while start < candidates.shape[0]:
        chunk = candidates[start : start + (found.batch_size or candidates.shape[0])]
        scores, found.batch_size = score_batched(objective, chunk, found.batch_size)
        scores, _ = confirm_success(objective, chunk, scores)  # a claim must survive a plain pass
        start += chunk.shape[0]
        found.scored += chunk.shape[0]
        success = scores.best_success()
        if success is not None:
            win, found.loss = success
            found.ids, found.success = chunk[win], True
            break
        index = int(scores.loss.argmin())
        if float(scores.loss[index]) < found.loss:
            found.loss, found.ids = float(scores.loss[index]), chunk[index]
        if stop is not None and start < candidates.shape[0] and stop():
            found.stopped = True
            break
    return found


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
    stop: Stop | None = None,
) -> GreedyResult:
    """Prepend up to max_k - len(init_ids) tokens, one at a time, each the best of its batch scan.

    Stops at the first prompt meeting the objective (its loss may not be the lowest of its
    scan: any success will do). `progress` is called with (lengths done, lengths total);
    `stop` is asked before each length and between batches (True: return what was found,
    with `stopped_k` the length it cut short).
    """
    config = config or GreedyConfig()
    if max_k < len(init_ids):
        raise ControllerError(f"max_k: {max_k} is shorter than the initial prompt ({len(init_ids)})")
    objective.check_control_length(max_k)
    allowed = (model_token_mask(model, tokenizer, config) if allowed is None else allowed).cpu()
    started = time.perf_counter()
    current = torch.tensor(list(init_ids), dtype=torch.long, device=model.device)  # (j,)
    best_loss, success, scored = float("inf"), False, 0
    losses: list[float] = []
    batch_size: int | None = config.batch_size
    lengths = max_k - len(init_ids)
    stopped_k: int | None = None
    for done in range(lengths):
        if stop is not None and stop():
            stopped_k = current.shape[0] + 1
            break
        pool = _token_pool(model, objective, current, allowed, config.candidates)
        candidates = _prepend_candidates(pool.to(model.device), current, tokenizer, config.filter_retokenize)
        if candidates.shape[0] == 0:
            logger.info("length %d: no candidate survives the filters", current.shape[0] + 1)
            break
        scan = _scan(objective, candidates, batch_size, stop)
        current, best_loss, success = scan.ids, scan.loss, scan.success
        scored, batch_size = scored + scan.scored, scan.batch_size
        losses.append(best_loss)
        if progress is not None:
            progress(done + 1, lengths)
        if success or scan.stopped:
            stopped_k = None if success else current.shape[0]
            break
    ids = [int(i) for i in current.tolist()]
    wall_time_s = time.perf_counter() - started
    return GreedyResult(ids, str(tokenizer.decode(ids)), best_loss, success, losses, scored, wall_time_s, stopped_k)


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
    out_of_budget_k: int | None = None  # not reached: the length whose search the budget cut short


DEFAULT_KS: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 10)


class BackoffConfig(BaseModel):
    """The back-off ladder: the prompt lengths to try, the searches behind them, and the
    budget of one search (None: no limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ks: tuple[int, ...] = DEFAULT_KS
    greedy_max_k: int = Field(default=3, ge=0)
    greedy: GreedyConfig = GreedyConfig()
    gcg: GCGConfig = GCGConfig()
    budget_s: float | None = Field(default=None, ge=0, description="wall seconds per search, all rungs")
    budget_gcg_steps: int | None = Field(default=None, ge=0, description="GCG steps per search, all rungs")

    def search(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        objective: Objective,
        *,
        allowed: Tensor | None = None,
    ) -> BackoffResult:
        """`backoff_search` with these settings."""
        return backoff_search(
            model,
            tokenizer,
            objective,
            self.ks,
            greedy=self.greedy,
            gcg=self.gcg,
            greedy_max_k=self.greedy_max_k,
            allowed=allowed,
            clock=SearchClock(self.budget_s, self.budget_gcg_steps),
        )


class _Ladder:
    """The rungs tried so far and the lowest-loss prompt among them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.attempts: list[Attempt] = []
        self.best: tuple[float, list[int], Method] = (float("inf"), [], "none")

    def record(self, attempt: Attempt, ids: list[int]) -> BackoffResult | None:
        """Book one rung; the result when it met the objective, else None."""
        self.attempts.append(attempt)
        if attempt.success:
            return self.result(True, ids, attempt.loss, attempt.method)
        if attempt.loss < self.best[0]:
            self.best = (attempt.loss, ids, attempt.method)
        return None

    def result(self, reached: bool, ids: list[int], loss: float, method: Method) -> BackoffResult:
        return BackoffResult(
            reached=reached,
            k=len(ids),
            method=method,
            ids=ids,
            text=str(self.tokenizer.decode(ids)),
            loss=loss,
            attempts=self.attempts,
        )

    def give_up(self, max_k: int, out_of_budget_k: int | None = None) -> BackoffResult:
        loss, ids, method = self.best
        if out_of_budget_k is None:
            logger.info("no prompt up to k=%d met the objective; best loss %.4f", max_k, loss)
        else:
            logger.info("the budget ran out at k=%d before a prompt met the objective; best loss %.4f", out_of_budget_k, loss)
        return replace(self.result(False, ids, loss, method), out_of_budget_k=out_of_budget_k)


def _empty_prompt(model: PreTrainedModel, objective: Objective) -> Attempt:
    """Score the empty prompt (k = 0)."""
    started = time.perf_counter()
    empty = torch.zeros(1, 0, dtype=torch.long, device=model.device)
    base = objective.scores(empty)
    loss, ok = float(base.loss[0]), bool(base.success[0]) and objective.confirm(empty[0])
    return Attempt(0, "base", loss, ok, time.perf_counter() - started)


def _gcg_rung(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    objective: Objective,
    k: int,
    gcg: GCGConfig,
    greedy_ids: list[int],
    allowed: Tensor,
    clock: SearchClock,
) -> tuple[Attempt, list[int]]:
    """GCG at length k from the last k greedy tokens, padded at the front with random
    allowed tokens; the search and the padding share the seed gcg.seed * 1_000_003 + k."""
    seed = gcg.seed * 1_000_003 + k
    pool = allowed.nonzero().squeeze(1)  # (A,)
    generator = torch.Generator().manual_seed(seed)
    keep = greedy_ids[-k:] if greedy_ids else []
    pad = pool[torch.randint(0, len(pool), (k - len(keep),), generator=generator)].tolist()
    config = gcg.model_copy(update={"seed": seed})
    result = run_gcg(
        model, tokenizer, objective, config, init_ids=pad + keep, allowed=allowed,
        on_step=lambda step, _ids: clock.gcg_step(k, step, config.num_steps),
    )
    attempt = Attempt(k, "gcg", result.best_loss, result.success, result.wall_time_s)
    return attempt, result.best_ids


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
    clock: SearchClock | None = None,
) -> BackoffResult:
    """Try prompt lengths in increasing order and stop at the first that meets the objective.

    k = 0 scores the empty prompt; 1 <= k <= greedy_max_k uses one run of greedy
    back-generation up to the largest such k; each larger k runs GCG from the greedy prompt
    padded at the front with random allowed tokens (seeded by gcg.seed and k). Once `clock`
    is spent (the empty prompt is always scored) the search stops where it is and, when
    nothing was reached, says at which length (`out_of_budget_k`).
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 0:
        raise ControllerError(f"k: need one or more lengths >= 0, got {list(ks)}")
    objective.check_control_length(ks[-1])
    greedy = greedy or GreedyConfig()
    gcg = gcg or GCGConfig()
    if allowed is None:
        allowed = model_token_mask(model, tokenizer, gcg)
    clock = clock or SearchClock()
    ladder = _Ladder(tokenizer)
    if ks[0] == 0:
        base = _empty_prompt(model, objective)
        ladder.attempts.append(base)
        if base.success:
            return ladder.result(True, [], base.loss, "base")
        ladder.best = (base.loss, [], "base")  # the first best, whatever its loss
    greedy_ks = [k for k in ks if 1 <= k <= greedy_max_k]
    greedy_ids: list[int] = []
    if greedy_ks:
        found = greedy_backgenerate(
            model, tokenizer, objective, greedy_ks[-1], greedy, allowed=allowed, stop=clock.spent
        )
        clock.cut_k = found.stopped_k
        greedy_ids = found.best_ids
        attempt = Attempt(
            len(found.best_ids), "greedy", found.best_loss, found.success, found.wall_time_s
        )
        if (reached := ladder.record(attempt, found.best_ids)) is not None:
            return reached
    for k in (k for k in ks if k > greedy_max_k):
        if clock.cut_k is None and clock.spent():
            clock.cut_k = k  # spent before this rung began
        if clock.cut_k is not None:
            break
        attempt, ids = _gcg_rung(model, tokenizer, objective, k, gcg, greedy_ids, allowed, clock)
        if (reached := ladder.record(attempt, ids)) is not None:
            return reached
    return ladder.give_up(ks[-1], clock.cut_k)
