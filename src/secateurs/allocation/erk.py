"""Erdős–Rényi-Kernel allocation (Evci et al. 2020, after Mocanu et al. 2018's Erdős–Rényi).

Each layer keeps a density proportional to ``sum(shape) / prod(shape)``: for a convolution
``(c_out + c_in + k_h + k_w) / (c_out * c_in * k_h * k_w)``, for a Linear ``(out + in) /
(out * in)``. Large layers are pruned more than small ones, which keeps the number of
connections per neuron balanced, and is the standard initial distribution of sparse training
(SET, RigL). A layer whose density would exceed 1 is kept dense and the others are rescaled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from secateurs.allocation.base import ALLOCATIONS, Allocation, Pool
from secateurs.targets import Target


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Per-layer densities with ERK proportions whose weighted mean is ``density``."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) if math.prod(s) else 0.0 for s in shapes]
    dense: set[int] = set()
    total = sum(sizes)
    eps = 0.0
    while True:
        budget = density * total - sum(sizes[i] for i in dense)
        scaled = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        if scaled <= 0:
            break
        eps = budget / scaled
        over = {i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1}
        if not over:
            break
        dense |= over
    out = []
    for i in range(len(sizes)):
        out.append(1.0 if i in dense else min(1.0, max(0.0, eps * raw[i])))
    return out


@ALLOCATIONS.register("erk")
@dataclass
class ERK(Allocation):
    """Erdős–Rényi-Kernel: per-layer density proportional to sum(shape) / prod(shape)."""

    def pools(self, targets: Sequence[Target], sparsity: float) -> list[Pool]:
        densities = erk_densities([t.shape for t in targets], 1.0 - sparsity)
        return [Pool((i,), min(1.0 - d, 1.0 - 1e-12)) for i, d in enumerate(densities)]
