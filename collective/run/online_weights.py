"""Online member weights: each round, per-position weights that depend only on the members'
losses at earlier positions (earlier rounds included), then learning from the round.

`HedgeWeights` (exponential weights on cumulative loss) and `PerplexityWeights`
(PackLLM-style: a softmax of the mean loss over a trailing window) share the `OnlineWeights`
contract; a `weighted` aggregator (`collective.run.aggregate`) pools with them. Their state
is plain data (`state_dict`) so that a distributed coordinator can keep it.

Shapes: N members, T positions of a round.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from collective.run.pools import present_index


def _fill_absent(losses: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Losses (N, T) as float64, absent rows replaced by the present members' mean loss."""
    losses = losses.double()
    if present is None:
        return losses
    index = present_index(present, losses.shape[0])
    filled = losses.clone()
    mean_present = losses[index].mean(dim=0)  # (T,)
    absent = [i for i in range(losses.shape[0]) if i not in index]
    filled[absent] = mean_present
    return filled


def _check_losses(losses: torch.Tensor, n_members: int, present: torch.Tensor | None) -> None:
    if losses.dim() != 2 or losses.shape[0] != n_members:
        raise ValueError(f"losses must have shape ({n_members}, T), got {tuple(losses.shape)}")
    index = present_index(present, n_members)
    if not bool(torch.isfinite(losses[index]).all()):
        raise ValueError("online weights need finite losses of the present members")


class OnlineWeights(ABC):
    """Per-position member weights that depend only on losses at earlier positions.

    `step(losses, present)` gives this round's weights, then learns from its losses:
    losses (N, T) per-token NLL in nats -> (T, N) float32 weights, row t using only losses
    before position t. present: optional (N,) bool, the members in this round.
    """

    method: ClassVar[str]  # the name in a state dict ("hedge", "perplexity")

    def __init__(self, n_members: int) -> None:
        self.n_members = n_members

    def step(self, losses: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        _check_losses(losses, self.n_members, present)
        return self._step(losses, present)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (floats and lists): the method, the members, and what it learnt."""
        return {"method": self.method, "n_members": self.n_members, **self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method or int(state["n_members"]) != self.n_members:
            raise ValueError(f"not a {self.method} state for {self.n_members} members: {state!r}")
        self._load(state)

    @abstractmethod
    def reset(self) -> None:
        """Forget everything learnt (back to the state of a new instance)."""

    @abstractmethod
    def _step(self, losses: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load(self, state: dict[str, Any]) -> None: ...


class HedgeWeights(OnlineWeights):
    """Hedge (exponential weights) on cumulative per-token losses.

    The weight of member i at position t is softmax_i(-eta * L_i(<t)), where L_i(<t) is its
    total loss (NLL, nats) over all earlier positions of all earlier rounds. With eta = 1
    and log loss this is the Bayesian mixture, whose regret to the best member is at most
    ln N nats in total. A member absent from a round is charged the present members' mean
    loss at each of its positions, so it neither gains nor loses standing while away.
    """

    method = "hedge"

    def __init__(self, n_members: int, eta: float = 1.0) -> None:
        if n_members < 1 or eta < 0:
            raise ValueError("HedgeWeights needs n_members >= 1 and eta >= 0")
        super().__init__(n_members)
        self.eta = float(eta)
        self._cumulative = torch.zeros(n_members, dtype=torch.float64)  # (N,) nats

    def _step(self, losses: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        filled = _fill_absent(losses, present)  # (N, T)
        # Exclusive prefix sums by shifting (not cumsum - loss, whose rounding would let the
        # loss at t leak into the weight at t).
        before = torch.zeros_like(filled)  # (N, T)
        before[:, 1:] = filled.cumsum(dim=1)[:, :-1]
        cumulative = self._cumulative.unsqueeze(1) + before  # (N, T)
        weights = torch.softmax(-self.eta * cumulative, dim=0).transpose(0, 1)  # (T, N)
        total = self._cumulative + filled.sum(dim=1)
        self._cumulative = total - total.min()  # the softmax only sees differences
        return weights.float().contiguous()

    def reset(self) -> None:
        self._cumulative = torch.zeros(self.n_members, dtype=torch.float64)

    def _state(self) -> dict[str, Any]:
        return {"eta": self.eta, "cumulative_loss": [float(x) for x in self._cumulative]}

    def _load(self, state: dict[str, Any]) -> None:
        self.eta = float(state["eta"])
        self._cumulative = torch.tensor(state["cumulative_loss"], dtype=torch.float64)


class PerplexityWeights(OnlineWeights):
    """PackLLM-style weights: softmax over members of -(mean NLL over a trailing window) / τ.

    The weight of member i at position t uses its mean NLL over its last `window_tokens`
    scored positions before t (earlier rounds included). Weights are uniform before any
    loss is seen; a member with no loss yet (others having some) is given the mean of the
    others' window means. An absent member's window is left as it was.
    """

    method = "perplexity"

    def __init__(self, n_members: int, temperature: float = 1.0, window_tokens: int = 512) -> None:
        if n_members < 1 or temperature <= 0 or window_tokens < 1:
            raise ValueError(
                "PerplexityWeights needs n_members >= 1, temperature > 0 and window_tokens >= 1"
            )
        super().__init__(n_members)
        self.temperature = float(temperature)
        self.window_tokens = int(window_tokens)
        self._history: list[list[float]] = [[] for _ in range(n_members)]

    def _step(self, losses: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        index = set(present_index(present, self.n_members))
        n_positions = int(losses.shape[1])
        means = torch.full((self.n_members, n_positions), math.nan, dtype=torch.float64)
        for i in range(self.n_members):
            past = torch.tensor(self._history[i], dtype=torch.float64)  # (h,)
            if i not in index:
                if len(past):
                    means[i] = past.mean()
                continue
            means[i] = self._window_means(i, past, losses[i].double())
        seen = ~torch.isnan(means)  # (N, T)
        any_seen = seen.any(dim=0)  # (T,)
        neutral = torch.where(seen, means, torch.zeros(())).sum(0) / seen.sum(0).clamp(min=1)
        means = torch.where(seen, means, neutral)  # unseen members: the others' mean
        logits = torch.where(any_seen, -means / self.temperature, torch.zeros(()))  # uniform
        return torch.softmax(logits, dim=0).transpose(0, 1).float().contiguous()  # (T, N)

    def _window_means(self, member: int, past: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """(T,) member's mean loss over the window before each position (NaN: none yet); keeps
        the last window of `past` (h,) then `losses` (T,) as its history."""
        h, n_positions, window = len(past), len(losses), self.window_tokens
        seq = torch.cat([past, losses])  # (h + T,)
        prefix = torch.cat([torch.zeros(1, dtype=torch.float64), seq.cumsum(0)])  # (h+T+1,)
        end = torch.arange(h, h + n_positions)  # (T,) positions < end are in the past
        begin = (end - window).clamp(min=0)
        count = (end - begin).double()
        self._history[member] = seq[-window:].tolist()
        return (prefix[end] - prefix[begin]) / count  # NaN where count == 0

    def reset(self) -> None:
        self._history = [[] for _ in range(self.n_members)]

    def _state(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "window_tokens": self.window_tokens,
            "history": [list(h) for h in self._history],
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])
        self.window_tokens = int(state["window_tokens"])
        self._history = [[float(x) for x in h][-self.window_tokens :] for h in state["history"]]
