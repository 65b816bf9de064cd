"""Structures: which weights are pruned together.

A structure turns element-wise importance scores into one score per *group* and a group-level
keep decision back into an element mask. Group scores are the mean of their elements' scores,
so groups of different sizes (ragged edge blocks, layers of different widths) compare fairly
under a global threshold. A group that is already fully pruned scores ``-inf``: pruning never
revives a weight.

All structures see a tensor in *canonical* layout ``[out, in, *rest]``; ConvTranspose weights,
stored ``[in, out, *rest]``, are swapped first, and 1-D tensors are treated as ``[n, 1]``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from secateurs.errors import ConfigError, ModelError
from secateurs.registry import Registry
from secateurs.targets import Target

NEG_INF = float("-inf")


@dataclass
class GroupScores:
    """One score per group (flat) and how many elements each group holds."""

    scores: Tensor  #: float32, shape [G]; -inf marks a group that must be pruned
    sizes: Tensor | int  #: int64 [G], or one int when every group has the same size

    def total(self) -> int:
        if isinstance(self.sizes, int):
            return self.sizes * self.scores.numel()
        return int(self.sizes.sum())


def canonical(t: Tensor, transposed: bool) -> Tensor:
    """View ``t`` as ``[out, in, *rest]``."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    return t.transpose(0, 1) if transposed else t


def uncanonical(t: Tensor, shape: tuple[int, ...], transposed: bool) -> Tensor:
    if len(shape) == 1:
        return t.reshape(shape)
    return (t.transpose(0, 1) if transposed else t).contiguous()


class Structure(ABC):
    """Base class: how a tensor's elements are grouped for pruning."""

    registry_name: ClassVar[str]

    def min_sparsity(self) -> float:
        """The smallest sparsity this structure can produce (N:M forces ``1 - N/M``)."""
        return 0.0

    def largest_group(self, target: Target) -> int:
        """Elements in the largest group of ``target`` (the rounding unit of its sparsity)."""
        return 1

    def check(self, target: Target) -> None:  # noqa: B027 - most structures fit any tensor
        """Raise :class:`ModelError` when ``target`` cannot take this structure."""

    @abstractmethod
    def group_scores(self, scores: Tensor, target: Target, mask: Tensor | None) -> GroupScores:
        """Reduce element ``scores`` (shaped like the tensor) to group scores.

        ``mask`` is the current keep-mask of the tensor, or ``None`` when it is unpruned.
        """

    @abstractmethod
    def expand(self, keep: Tensor, target: Target) -> Tensor:
        """Turn a flat bool keep-vector over groups into an element mask shaped like the tensor."""


STRUCTURES: Registry[Structure] = Registry("structure", Structure)


@STRUCTURES.register("elements")
@dataclass
class Elements(Structure):
    """Fine-grained (unstructured) pruning: every weight is its own group."""

    def group_scores(self, scores: Tensor, target: Target, mask: Tensor | None) -> GroupScores:
        flat = scores.reshape(-1).to(torch.float32)
        if mask is not None:
            flat = flat.masked_fill(~mask.reshape(-1), NEG_INF)
        return GroupScores(flat, 1)

    def expand(self, keep: Tensor, target: Target) -> Tensor:
        return keep.reshape(target.shape)


@STRUCTURES.register("nm")
@dataclass
class NM(Structure):
    """N:M semi-structured sparsity: at most ``n`` nonzeros in every ``m`` consecutive weights.

    Blocks run along the input dimension (dim 1 of ``[out, in, *kernel]``), one kernel position
    at a time, which is the layout sparse tensor cores consume (2:4 on NVIDIA Ampere and
    later). The weights outside each block's top ``n`` are forced out; a sparsity above
    ``1 - n/m`` prunes further among the survivors, never breaking the pattern.
    """

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or isinstance(self.n, bool):
            raise ConfigError(f"NM needs integers n and m; got n={self.n!r}, m={self.m!r}")
        if not 0 < self.n < self.m:
            raise ConfigError(
                f"NM(n={self.n}, m={self.m}) is invalid: need 0 < n < m (for example NM(2, 4))"
            )

    def min_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def check(self, target: Target) -> None:
        shape = target.shape
        if len(shape) < 2:
            raise ModelError(
                f"{target.name} of shape {shape} is 1-D; {self.n}:{self.m} sparsity needs an "
                "input dimension. Exclude it or use structure Elements."
            )
        d_in = shape[0] if target.transposed else shape[1]
        if d_in % self.m:
            raise ModelError(
                f"{target.name} of shape {shape} has {d_in} inputs, not divisible by M={self.m}, "
                f"so it cannot hold {self.n}:{self.m} blocks. Exclude it "
                f"(exclude=[{target.module_name!r}]) or choose an M that divides {d_in}."
            )

    def _blocks(self, t: Tensor, transposed: bool) -> Tensor:
        """``[out, *rest, in/m, m]``: blocks along the input dim, last axis inside a block."""
        c = canonical(t, transposed)
        c = c.movedim(1, -1)
        return c.reshape(*c.shape[:-1], c.shape[-1] // self.m, self.m)

    def group_scores(self, scores: Tensor, target: Target, mask: Tensor | None) -> GroupScores:
        self.check(target)
        s = scores.to(torch.float32)
        if mask is not None:
            s = s.masked_fill(~mask, NEG_INF)
        blocks = self._blocks(s, target.transposed)
        order = blocks.argsort(dim=-1, descending=True, stable=True)
        ranks = order.argsort(dim=-1, stable=True)
        blocks = blocks.masked_fill(ranks >= self.n, NEG_INF)
        return GroupScores(self._unblocks(blocks, target).reshape(-1), 1)

    def _unblocks(self, blocks: Tensor, target: Target) -> Tensor:
        c = blocks.reshape(*blocks.shape[:-2], -1).movedim(-1, 1)
        return uncanonical(c, target.shape, target.transposed)

    def expand(self, keep: Tensor, target: Target) -> Tensor:
        return keep.reshape(target.shape)


@STRUCTURES.register("blocks")
@dataclass
class Blocks(Structure):
    """Blocks of ``shape[0]`` outputs x ``shape[1]`` inputs, all trailing (kernel) dims whole.

    ``Blocks((1, 4))`` prunes 1x4 vectors along the input, ``Blocks((4, 4))`` tiles, and on a
    convolution ``Blocks((1, 1))`` prunes whole kernels (one output x one input channel).
    Dimensions that do not divide leave smaller blocks at the edge.
    """

    shape: tuple[int, int] = (1, 4)

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if len(shape) != 2 or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise ConfigError(
                f"Blocks shape must be two positive integers (outputs, inputs); got {self.shape!r}"
            )
        self.shape = (int(shape[0]), int(shape[1]))

    def block_shape(self, target: Target) -> tuple[int, int]:
        return self.shape

    def largest_group(self, target: Target) -> int:
        _, _, b0, b1, rest = self._layout(target)
        return b0 * b1 * rest

    def _layout(self, target: Target) -> tuple[int, int, int, int, int]:
        c_shape = canonical(torch.empty(target.shape, device="meta"), target.transposed).shape
        d0, d1 = int(c_shape[0]), int(c_shape[1])
        b0, b1 = self.block_shape(target)
        b0, b1 = min(b0, d0), min(b1, d1)
        return d0, d1, b0, b1, math.prod(c_shape[2:])

    def group_scores(self, scores: Tensor, target: Target, mask: Tensor | None) -> GroupScores:
        d0, d1, b0, b1, rest = self._layout(target)
        s = canonical(scores.to(torch.float32), target.transposed).reshape(d0, d1, rest).sum(-1)
        g0, g1 = -(-d0 // b0), -(-d1 // b1)
        sums = _block_sum(s, b0, b1, g0, g1)
        counts = _block_sum(torch.ones(d0, d1), b0, b1, g0, g1) * rest
        means = sums / counts
        if mask is not None:
            alive = canonical(mask, target.transposed).reshape(d0, d1, rest).sum(-1)
            dead = _block_sum(alive.to(torch.float32), b0, b1, g0, g1) == 0
            means = means.masked_fill(dead, NEG_INF)
        sizes = counts.reshape(-1).to(torch.int64)
        uniform = bool((sizes == sizes[0]).all())
        return GroupScores(means.reshape(-1), int(sizes[0]) if uniform else sizes)

    def expand(self, keep: Tensor, target: Target) -> Tensor:
        d0, d1, b0, b1, _ = self._layout(target)
        g0, g1 = -(-d0 // b0), -(-d1 // b1)
        k = keep.reshape(g0, g1).repeat_interleave(b0, 0).repeat_interleave(b1, 1)[:d0, :d1]
        c_shape = canonical(torch.empty(target.shape, device="meta"), target.transposed).shape
        k = k.reshape(d0, d1, *([1] * (len(c_shape) - 2))).expand(c_shape)
        return uncanonical(k, target.shape, target.transposed)


def _block_sum(x: Tensor, b0: int, b1: int, g0: int, g1: int) -> Tensor:
    padded = torch.zeros(g0 * b0, g1 * b1, dtype=x.dtype, device=x.device)
    padded[: x.shape[0], : x.shape[1]] = x
    return padded.reshape(g0, b0, g1, b1).sum((1, 3))


@STRUCTURES.register("channels")
@dataclass
class Channels(Blocks):
    """Whole output channels (rows, ``dim=0``) or input channels (columns, ``dim=1``), as masks.

    This zeroes channels but keeps the tensor's shape; physically removing them (and the
    coupled channels of neighbouring layers) is the job of structural surgery.
    """

    dim: int = 0
    shape: tuple[int, int] = field(default=(1, 1), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dim not in (0, 1):
            raise ConfigError(f"Channels dim must be 0 (outputs) or 1 (inputs); got {self.dim!r}")

    def block_shape(self, target: Target) -> tuple[int, int]:
        big = max(target.shape) if target.shape else 1
        return (1, big) if self.dim == 0 else (big, 1)
