"""Erdős–Rényi-Kernel allocation (Evci et al. 2020, after Mocanu et al. 2018's Erdős–Rényi).

Each layer keeps a density proportional to ``sum(shape) / prod(shape)``: for a convolution
``(c_out + c_in + k_h + k_w) / (c_out * c_in * k_h * k_w)``, for a Linear ``(out + in) /
(out * in)``. Large layers are pruned more than small ones, which keeps the number of
connections per neuron balanced, and is the standard initial distribution of sparse training
(SET, RigL). A layer whose density would exceed 1 is kept dense and the others are rescaled.

At very high sparsity ERK starves the smallest-fan-in layers of a network: at 99% LeNet-5's
first convolution (150 weights, 25 inputs per filter) keeps 12 weights, two per filter.
``min_fan_in`` sets a floor: every layer keeps on average at least that many inputs per output
unit (its density at least ``min_fan_in / fan_in``), paid for by the other layers, so that the
overall density is still the one asked. 0 (the default here) is ERK as published; the sparse
training schedules pass their own floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from secateurs.allocation.base import ALLOCATIONS, Allocation, Pool
from secateurs.checks import check_nonnegative
from secateurs.targets import Target


def erk_densities(
    shapes: Sequence[Sequence[int]], density: float, floors: Sequence[float] | None = None
) -> list[float]:
    """Per-layer densities with ERK proportions whose weighted mean is ``density``.

    ``floors``: the least density of each layer (clipped to [0, 1]). A layer whose ERK density
    would fall below its floor takes the floor, one above 1 stays dense, and the others share
    what is left in ERK proportions. When the floors alone exceed the budget they are scaled
    down together to fit it.
    """
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / size if size else 0.0 for s, size in zip(shapes, sizes, strict=True)]
    budget = min(max(density, 0.0), 1.0) * sum(sizes)
    low = [min(1.0, max(0.0, f)) for f in (floors or [0.0] * len(sizes))]
    floor_cost = sum(f * n for f, n in zip(low, sizes, strict=True))
    if floor_cost > budget:
        low = [f * budget / floor_cost for f in low]

    def at(eps: float) -> list[float]:
        return [min(1.0, max(lo, eps * r)) for lo, r in zip(low, raw, strict=True)]

    def used(eps: float) -> float:
        return sum(d * n for d, n in zip(at(eps), sizes, strict=True))

    # The densities are clip(eps * raw, floor, 1), their total increasing in eps: bisect for
    # the eps that spends the budget, then solve it exactly for the layers left unclipped.
    lo_eps, hi_eps = 0.0, max((1.0 / r for r in raw if r > 0), default=0.0)
    for _ in range(100):
        mid = (lo_eps + hi_eps) / 2
        lo_eps, hi_eps = (mid, hi_eps) if used(mid) < budget else (lo_eps, mid)
    eps = hi_eps
    dens = at(eps)
    free = [i for i, d in enumerate(dens) if low[i] < d < 1.0]
    scaled = sum(raw[i] * sizes[i] for i in free)
    if scaled > 0:
        fixed = sum(dens[i] * sizes[i] for i in range(len(sizes)) if i not in free)
        eps = (budget - fixed) / scaled
        for i in free:
            dens[i] = min(1.0, max(low[i], eps * raw[i]))
    return dens


def fan_in(target: Target) -> int:
    """Inputs per output unit of a target's tensor (for a ConvTranspose or GPT-2 ``Conv1D``,
    whose dim 0 is the input side, the output dim is 1)."""
    shape = target.shape
    if len(shape) < 2:
        return 1
    out = shape[1] if target.transposed else shape[0]
    return max(1, math.prod(shape) // max(1, out))


@ALLOCATIONS.register("erk")
@dataclass
class ERK(Allocation):
    """Erdős–Rényi-Kernel: per-layer density proportional to sum(shape) / prod(shape), with
    at least ``min_fan_in`` kept inputs per output unit on average in every layer."""

    min_fan_in: float = 0.0

    def __post_init__(self) -> None:
        self.min_fan_in = check_nonnegative(self.min_fan_in, "erk min_fan_in")

    def pools(self, targets: Sequence[Target], sparsity: float) -> list[Pool]:
        floors = [self.min_fan_in / fan_in(t) for t in targets]
        densities = erk_densities([t.shape for t in targets], 1.0 - sparsity, floors)
        return [Pool((i,), min(1.0 - d, 1.0 - 1e-12)) for i, d in enumerate(densities)]
