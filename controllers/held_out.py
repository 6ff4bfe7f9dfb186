"""Early stopping and the choice of the returned prompt on held-out data, as a GCG `on_step`.

GCG lowers its objective on the training data; after each step, `HeldOut` scores the
lowest-loss prompt found so far (GCG's best, not the step's own best) with a held-out loss,
keeps the prompt with the lowest held-out loss (the initial prompt included, so a search
never returns a prompt worse on the held-out data than the one it started from) and ends
the search once `patience` steps in a row brought no held-out improvement. A prompt that
did not change since the last step is not scored again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import Tensor

logger = logging.getLogger(__name__)

HeldOutLoss = Callable[[list[int]], float]
"""A prompt's token ids -> its loss on the held-out data."""


class HeldOut:
    """Called after each GCG step with the lowest-loss prompt so far (`controllers.gcg.OnStep`).

    `best_ids`, `best_loss`: the prompt with the lowest held-out loss so far and that loss;
    `initial_loss`: the initial prompt's; `stopped_at`: the step after which `patience` steps
    without an improvement ended the search, None when it ran every one of its `steps`.
    """

    def __init__(self, loss: HeldOutLoss, init: list[int], patience: int, steps: int) -> None:
        self.loss = loss
        self.patience, self.steps = patience, steps
        self.initial_loss = loss(list(init))
        self.best_ids, self.best_loss = list(init), self.initial_loss
        self.last: tuple[list[int], float] = (self.best_ids, self.best_loss)
        self.waited = 0
        self.stopped_at: int | None = None

    def __call__(self, step: int, ids: Tensor) -> bool:
        prompt = [int(i) for i in ids.tolist()]
        loss = self.last[1] if prompt == self.last[0] else self.loss(prompt)  # unchanged: not scored again
        self.last = (prompt, loss)
        if loss < self.best_loss:
            self.best_ids, self.best_loss, self.waited = prompt, loss, 0
        else:
            self.waited += 1
        logger.debug("step %d: held-out loss %.4f (best %.4f)", step, loss, self.best_loss)
        if self.waited >= self.patience and step < self.steps:
            self.stopped_at = step
        return self.stopped_at is not None
