"""Linear layers with prepacked weights for the decode steps on CPU.

A decode step multiplies a few rows (one per message being written) by every weight matrix of
the model: the step is bound by reading the weights from memory. On CPU, PyTorch's float32
`linear` (MKL sgemm) streams a big weight at a small batch well below the memory's rate
(measured on the 2-core EPYC: 8.7 GB/s, against 21 GB/s for a plain sum over the same
weights); oneDNN's linear on a weight reordered once into its blocked layout reads it at
15.5 GB/s. `packed_linears(model)` swaps every `nn.Linear` of the model to that kernel for the
duration of a `with` block and restores it after. The packed copies are made once per model
and kept beside it (one more copy of the linear weights in memory, so only for models whose
linear weights take at most MAX_PACKED_BYTES). `decoding.decode` uses it by default.

The results are the same product summed in another order: within float32 rounding of the plain
`linear` (tests/test_decode.py), so a greedy or sampled token can differ only on a near-tie.
Used only on CPU, float32, where oneDNN is available; elsewhere the block changes nothing.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_PACKED: weakref.WeakKeyDictionary[torch.nn.Module, list[tuple[torch.nn.Linear, torch.Tensor]]] = weakref.WeakKeyDictionary()
BATCH_HINT = 4  # the batch size oneDNN lays the weights out for: a round's speakers
MAX_PACKED_BYTES = 2 << 30  # a bigger model decodes with its plain linears: the copy would cost too much memory


def packable(model: torch.nn.Module) -> bool:
    """Whether the model's weights are float32 on the CPU, its linear weights at most
    MAX_PACKED_BYTES, and oneDNN's packed linear exists."""
    weight = next(model.parameters())
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    return (
        linear_bytes <= MAX_PACKED_BYTES
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    """inputs (..., in) -> (..., out) through the packed weight."""
    return torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")


def _packs(model: torch.nn.Module) -> list[tuple[torch.nn.Linear, torch.Tensor]]:
    if model not in _PACKED:
        _PACKED[model] = [
            (module, torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), BATCH_HINT))
            for module in model.modules()
            if isinstance(module, torch.nn.Linear)
        ]
    return _PACKED[model]


@contextmanager
def packed_linears(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block, every nn.Linear of `model` runs on its packed weight (CPU float32 only)."""
    if not enabled or not packable(model):
        yield
        return
    packs = _packs(model)
    for module, packed in packs:
        module.forward = functools.partial(_packed_forward, packed, module.bias)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, _ in packs:
            module.__dict__.pop("forward", None)
