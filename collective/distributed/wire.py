"""Records on the wire (`WireModel`) and the prediction rows a result carries.

Tensors travel as base64 of little-endian float32/int32 arrays (`TensorBlob`): exact round
trips. A token row is a `TokenPredictions` record as it is (`PredictionsWire`: the target's
log-probability, the top-K ids and their log-probabilities). A byte row (a byte-unit run,
`collective.lm.byte_rows`) keeps all 256 candidates, so it travels as the (N, B, 256) float32
log-probabilities of the next byte in byte-value order and nothing else (`ByteRowsWire`): no
ids (the position is the byte value) and no target (the receiver knows the round's bytes and
reads it off). Its receiver rebuilds exactly the record the node computed: half the bytes of
the token form, and a round of B bytes costs 4 * ceil(1024 B / 3) base64 characters a row.
"""

from __future__ import annotations

import base64
import math
import sys
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from collective.lm.byte_rows import BYTE_VALUES, as_predictions
from collective.lm.predictions import TokenPredictions

BASE64 = r"^[A-Za-z0-9+/]*={0,2}$"
NORMALIZED_TOL = 1e-3  # |log sum_b p(b)| a received byte row may be off by (float32 sums are ~1e-6)


class WireModel(BaseModel):
    """A record on the wire: unknown fields are refused, nothing changes after parsing."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- tensors


_DTYPES: dict[str, tuple[torch.dtype, int]] = {"float32": (torch.float32, 4), "int32": (torch.int32, 4)}


class TensorBlob(WireModel):
    """A tensor as base64 of its little-endian bytes (float32 and int32 round-trip exactly)."""

    dtype: Literal["float32", "int32"]
    shape: list[Annotated[int, Field(ge=0, le=1 << 24)]] = Field(max_length=4)
    # base64, checked when decoded (`to_tensor`: strict, a ValueError) rather than by a pattern
    # here: the pattern was most of what validating a result cost the coordinator
    data: str

    @model_validator(mode="after")
    def _size_matches(self) -> TensorBlob:
        expected = math.prod(self.shape) * _DTYPES[self.dtype][1]
        # base64 of n bytes is 4 * ceil(n / 3) characters
        if len(self.data) != 4 * ((expected + 2) // 3):
            raise ValueError(f"data holds {len(self.data)} base64 characters, shape {self.shape} needs {expected} bytes")
        return self

    @staticmethod
    def from_tensor(tensor: torch.Tensor, dtype: Literal["float32", "int32"]) -> TensorBlob:
        torch_dtype = _DTYPES[dtype][0]
        array = tensor.detach().to("cpu", torch_dtype).contiguous()
        raw = array.numpy().tobytes() if sys.byteorder == "little" else array.numpy().byteswap().tobytes()
        return TensorBlob(dtype=dtype, shape=list(array.shape), data=base64.b64encode(raw).decode("ascii"))

    def to_tensor(self) -> torch.Tensor:
        """The tensor; raises ValueError (binascii.Error) when `data` is not strict base64."""
        raw = bytearray(base64.b64decode(self.data, validate=True))  # a fresh buffer the tensor may keep
        torch_dtype = _DTYPES[self.dtype][0]
        if not raw:
            return torch.zeros(self.shape, dtype=torch_dtype)
        tensor = torch.frombuffer(raw, dtype=torch_dtype).reshape(self.shape)
        return tensor if sys.byteorder == "little" else tensor.byteswap()  # type: ignore[attr-defined]


class PredictionsWire(WireModel):
    """A `TokenPredictions` record on the wire. Shapes: (N, T), (N, T, K), (N, T, K)."""

    target_logprob: TensorBlob
    topk_ids: TensorBlob
    topk_logprobs: TensorBlob
    vocab_size: int = Field(ge=1, lt=1 << 31)

    @model_validator(mode="after")
    def _shapes_agree(self) -> PredictionsWire:
        n_t = self.target_logprob.shape
        if len(n_t) != 2 or self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[:2] != n_t:
            raise ValueError(
                f"inconsistent shapes {self.target_logprob.shape}, {self.topk_ids.shape}, {self.topk_logprobs.shape}"
            )
        if len(self.topk_ids.shape) != 3 or self.target_logprob.dtype != "float32" or self.topk_ids.dtype != "int32":
            raise ValueError("expected float32 (N, T) log-probs and int32 (N, T, K) ids")
        return self

    @staticmethod
    def from_predictions(preds: TokenPredictions) -> PredictionsWire:
        return PredictionsWire(
            target_logprob=TensorBlob.from_tensor(preds.target_logprob, "float32"),
            topk_ids=TensorBlob.from_tensor(preds.topk_ids, "int32"),
            topk_logprobs=TensorBlob.from_tensor(preds.topk_logprobs, "float32"),
            vocab_size=preds.vocab_size,
        )

    def to_predictions(self) -> TokenPredictions:
        return TokenPredictions(
            self.target_logprob.to_tensor(),
            self.topk_ids.to_tensor().long(),
            self.topk_logprobs.to_tensor(),
            self.vocab_size,
        )


def check_predictions(preds: TokenPredictions, *, n_positions: int, top_k: int, vocab_size: int) -> str | None:
    """Why a received record cannot be one member's round of this run, or None when it can."""
    if preds.n_members != 1 or preds.n_positions != n_positions:
        return f"expected 1 member x {n_positions} positions, got {preds.n_members} x {preds.n_positions}"
    if preds.vocab_size != vocab_size:
        return f"vocabulary of {preds.vocab_size} tokens, the run's model has {vocab_size}"
    if preds.topk_ids.shape[-1] != min(top_k, vocab_size):
        return f"{preds.topk_ids.shape[-1]} candidates per position, the run keeps {min(top_k, vocab_size)}"
    if preds.topk_ids.numel():
        low, high = torch.aminmax(preds.topk_ids)
        if int(low) < 0 or int(high) >= vocab_size:
            return "a candidate token id outside the vocabulary"
    for name, values in (("target", preds.target_logprob), ("top-k", preds.topk_logprobs)):
        if not bool((values <= 1e-3).all()):  # NaN compares False: caught here too
            return f"{name} log-probabilities that are NaN or above 0"
    return None


# ---------------------------------------------------------------------------- byte rows


def bytes_wire(data: bytes) -> str:
    """Raw bytes (a round may end inside a UTF-8 character) as base64 text."""
    return base64.b64encode(data).decode("ascii")


def wire_bytes(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


class ByteRowsWire(WireModel):
    """N byte rows on the wire: log p(next byte = b) at each of the round's B bytes, (N, B, 256)
    float32 in byte-value order (see the module docstring)."""

    byte_logprobs: TensorBlob

    @model_validator(mode="after")
    def _shape(self) -> ByteRowsWire:
        shape = self.byte_logprobs.shape
        if len(shape) != 3 or shape[2] != BYTE_VALUES or self.byte_logprobs.dtype != "float32":
            raise ValueError(f"byte rows are float32 (N, B, {BYTE_VALUES}), got {self.byte_logprobs.dtype} {shape}")
        return self

    @staticmethod
    def from_predictions(preds: TokenPredictions) -> ByteRowsWire:
        """From a byte row record (V = K = 256: its candidates are every byte value, sorted)."""
        if preds.vocab_size != BYTE_VALUES or preds.topk_ids.shape[-1] != BYTE_VALUES:
            raise ValueError(f"a byte row has {BYTE_VALUES} candidates of {BYTE_VALUES}, got {preds.topk_ids.shape[-1]} of {preds.vocab_size}")
        by_value = torch.empty_like(preds.topk_logprobs).scatter_(-1, preds.topk_ids, preds.topk_logprobs)  # (N, B, 256)
        return ByteRowsWire(byte_logprobs=TensorBlob.from_tensor(by_value, "float32"))

    def to_predictions(self, data: bytes) -> TokenPredictions:
        """The record `byte_rows` made: targets read at the round's bytes `data`, candidates
        sorted as `as_predictions` sorts them. Raises ValueError when B is not len(data)."""
        by_value = self.byte_logprobs.to_tensor()  # (N, B, 256)
        if by_value.shape[1] != len(data):
            raise ValueError(f"byte rows of {by_value.shape[1]} bytes for a round of {len(data)}")
        return TokenPredictions.stack([as_predictions(row, data) for row in by_value])


def check_byte_row(preds: TokenPredictions, *, n_bytes: int) -> str | None:
    """Why a received byte row cannot be one member's round of B = n_bytes bytes, or None."""
    problem = check_predictions(preds, n_positions=n_bytes, top_k=BYTE_VALUES, vocab_size=BYTE_VALUES)
    if problem is not None:
        return problem
    total = torch.logsumexp(preds.topk_logprobs.double(), dim=-1)  # (1, B)
    if bool((total.abs() > NORMALIZED_TOL).any()):
        return f"next-byte probabilities that do not sum to 1 (log of the sum up to {float(total.abs().max()):.3g})"
    return None
