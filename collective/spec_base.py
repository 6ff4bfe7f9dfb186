"""The base of every scenario spec (split out so that the spec modules share it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """The base of every spec: unknown keys are errors, and a validated value never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
