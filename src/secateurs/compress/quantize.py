"""Linear (uniform, symmetric) quantization of kept weights, one scale per output channel.

The alternative to weight sharing when a fixed grid is wanted (int8, int4): each row ``i`` of a
tensor is stored as integers ``q`` in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` and one float
scale, ``w ≈ q * scale[i]``, with ``scale[i] = max|w_i| / (2**(bits-1) - 1)``. Zero is on the
grid, so pruned weights stay exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from secateurs.compress.formats import check_bits
from secateurs.errors import ConfigError, ModelError


@dataclass
class LinearQuantized:
    """A tensor as per-row scales and signed integer levels."""

    shape: tuple[int, ...]
    scales: Tensor  #: float32 [shape[0]]
    levels: Tensor  #: int32, shaped like the tensor
    bits: int

    @property
    def max_level(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def to_dense(self) -> Tensor:
        view = (-1,) + (1,) * (len(self.shape) - 1)
        return self.levels.to(torch.float32) * self.scales.view(view)


def quantize_linear(t: Tensor, bits: int = 8) -> LinearQuantized:
    """Quantize ``t`` (rank >= 1) per row to ``bits``-bit symmetric levels (bits in 2..16)."""
    bits = check_bits(bits, "linear quantization bits")
    if bits < 2:
        raise ConfigError("linear quantization needs at least 2 bits (one sign, one level)")
    if t.dim() == 0:
        raise ModelError("a 0-d tensor has no rows to quantize; store it as it is")
    w = t.detach().to(torch.float32).cpu()
    top = (1 << (bits - 1)) - 1
    rows = w.reshape(w.shape[0], -1)
    scales = rows.abs().amax(dim=1) / top if rows.numel() else torch.zeros(w.shape[0])
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    levels = torch.round(rows / safe[:, None]).clamp(-top, top).to(torch.int32)
    return LinearQuantized(tuple(t.shape), scales, levels.reshape(w.shape), bits)
