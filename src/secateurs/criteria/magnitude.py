"""Data-free criteria: weight magnitude and the random baseline."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from secateurs.criteria.base import CRITERIA, Criterion, Stats
from secateurs.errors import ConfigError
from secateurs.targets import Target


@CRITERIA.register("magnitude")
@dataclass
class Magnitude(Criterion):
    """``|w|^p``: small weights matter least (Han et al. 2015). ``p=1`` is L1, ``p=2`` L2.

    Reduced over a group by the structure, this is group-wise L1/L2 magnitude.
    """

    p: int = 1

    def __post_init__(self) -> None:
        if self.p not in (1, 2):
            raise ConfigError(f"Magnitude p must be 1 (L1) or 2 (L2); got {self.p!r}")

    def scores(self, target: Target, stats: Stats | None, seed: int) -> Tensor:
        w = target.weight.detach().to(torch.float32)
        return w.abs() if self.p == 1 else w.square()  # one pass over the weight, not two


@CRITERIA.register("random")
@dataclass
class Random(Criterion):
    """Uniform random scores: the baseline every criterion must beat.

    Each tensor draws from its own generator seeded by (seed, tensor name), so the result
    does not depend on which other layers are pruned or in what order.
    """

    def scores(self, target: Target, stats: Stats | None, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(target.name.encode()))
        return torch.rand(target.shape, generator=g, dtype=torch.float32)
