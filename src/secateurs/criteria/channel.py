"""Scoring channel groups: how important each channel of each group is.

Two kinds of criteria score channels:

* every element-wise criterion (magnitude, random, Taylor, OBD, ...) scores a channel as the
  sum of its elements' scores over *all* tensors of the group (the producing filters, their
  biases and norm entries, the consuming layers' input slices): group magnitude, group
  Taylor, group Fisher;
* a :class:`ChannelCriterion` scores channels directly from what only whole channels have:
  BatchNorm scaling factors, activation statistics, filter geometry, reconstruction error.

Scores are float32, one per channel, higher = more important.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from secateurs.calibration import CALIBRATION_BATCHES, LossFn, calibrate
from secateurs.criteria.base import Criterion, Stats
from secateurs.errors import ConfigError
from secateurs.graph.groups import ChannelGraph, Member
from secateurs.graph.state import TensorRef
from secateurs.running import Inputs
from secateurs.targets import Target


@dataclass
class ChannelContext:
    """What a channel criterion may look at."""

    model: nn.Module
    graph: ChannelGraph
    example_inputs: Inputs
    data: Iterable[Any] | None = None  #: calibration batches of ``(inputs, labels)``
    loss_fn: LossFn | None = None
    calibration_batches: int = CALIBRATION_BATCHES
    seed: int = 0
    #: a group a channel criterion cannot measure is an error instead of scored by L2
    strict: bool = False
    cache: dict[str, Any] = field(default_factory=dict)
    #: groups scored by L2 magnitude because the criterion could not measure them, and why
    fallbacks: list[str] = field(default_factory=list)

    def tensor(self, ref: TensorRef) -> Tensor:
        """The parameter or buffer ``ref`` names."""
        module = self.model.get_submodule(ref.module)
        t = getattr(module, ref.name)
        assert isinstance(t, Tensor)
        return t

    def target(self, ref: TensorRef) -> Target:
        return Target(ref.qualname, ref.module, self.model.get_submodule(ref.module), ref.name)

    def batches(self, who: str) -> Iterable[Any]:
        if self.data is None:
            raise ConfigError(
                f"criterion {who!r} needs calibration data: pass data=<a DataLoader of "
                "(inputs, labels)> to shrink"
            )
        return self.data


def per_channel(member: Member, values: Tensor, size: int) -> Tensor:
    """Sum a per-position vector along ``member.dim`` into the group's ``size`` channels."""
    return add_per_channel_(torch.zeros(size, dtype=torch.float32), member, values)


def add_per_channel_(total: Tensor, member: Member, values: Tensor) -> Tensor:
    """Add a per-position vector along ``member.dim`` into ``total`` (one entry per channel)."""
    if member.complete:  # every position is a channel: no masking
        return total.index_add_(0, member.channel, values.to(total.dtype))
    inside = member.channel >= 0
    return total.index_add_(0, member.channel[inside], values[inside].to(total.dtype))


def reduce_to_dim(t: Tensor, dim: int) -> Tensor:
    """Sum ``t`` over every dimension except ``dim``: one value per position of ``dim``
    (a reduction in place, not a transposed copy of a whole weight)."""
    others = [d for d in range(t.dim()) if d != dim % t.dim()]
    return t.sum(dim=others) if others else t.clone()


class ChannelCriterion(Criterion):
    """A criterion defined on whole channels; it scores groups, not elements."""

    def scores(self, target: Target, stats: Stats | None, seed: int) -> Tensor:
        raise ConfigError(
            f"criterion {self.registry_name!r} scores whole channels; use it with sc.shrink "
            "(structural pruning), not for element masks"
        )

    @abstractmethod
    def channel_scores(self, ctx: ChannelContext) -> dict[int, Tensor]:
        """``{group index: float32 [group size]}`` for every prunable group of ``ctx.graph``."""

    #: Whether :meth:`refit` adjusts the kept weights itself (then shrink's ``reconstruct``
    #: does not refit a second time).
    refits: ClassVar[bool] = False

    def refit(self, ctx: ChannelContext, removed: dict[int, Tensor]) -> set[str]:
        """Adjust kept weights to compensate for ``removed`` before surgery (default: none);
        return the names of the layers adjusted."""
        return set()


def _element_scores(criterion: Criterion, ctx: ChannelContext) -> dict[int, Tensor]:
    groups = ctx.graph.prunable_groups
    refs = {m.ref for g in groups for m in g.members if m.ref.is_parameter}
    targets = {ref: ctx.target(ref) for ref in sorted(refs, key=lambda r: r.qualname)}
    stats: dict[str, dict[str, Tensor]] = {}
    if criterion.needs_data:
        stats = calibrate(
            ctx.model,
            list(targets.values()),
            criterion,
            ctx.batches(getattr(criterion, "registry_name", type(criterion).__name__)),
            ctx.loss_fn,
            ctx.calibration_batches,
        )
    dims: dict[TensorRef, set[int]] = {ref: set() for ref in targets}
    for g in groups:
        for m in g.members:
            if m.ref in targets:
                dims[m.ref].add(m.dim)
    # one tensor's element scores at a time, reduced to every dim a group needs and then
    # freed: holding them all (a second copy of the network) made each a fresh allocation
    reduced: dict[tuple[TensorRef, int], Tensor] = {}
    for ref, t in targets.items():
        scores = criterion.scores(t, stats.get(t.name), ctx.seed).detach()
        for dim in sorted(dims[ref]):
            reduced[(ref, dim)] = reduce_to_dim(scores, dim)
        del scores
    out: dict[int, Tensor] = {}
    for g in groups:
        total = torch.zeros(g.size, dtype=torch.float32)
        for m in g.members:
            if m.ref in targets:
                add_per_channel_(total, m, reduced[(m.ref, m.dim)])
        out[g.index] = total
    return out


def channel_scores(criterion: Criterion, ctx: ChannelContext) -> dict[int, Tensor]:
    """One importance score per channel of every prunable group."""
    if isinstance(criterion, ChannelCriterion):
        scores = criterion.channel_scores(ctx)
    else:
        scores = _element_scores(criterion, ctx)
    for g in ctx.graph.prunable_groups:
        s = scores.get(g.index)
        if s is None or s.shape != (g.size,):
            raise ConfigError(
                f"criterion {type(criterion).__name__} gave no score for group {g.index} "
                f"({g.name}, {g.size} channels)"
            )
        if not bool(torch.isfinite(s).all()):
            raise ConfigError(
                f"criterion {type(criterion).__name__} gave non-finite scores for {g.name}; "
                "check the calibration data and loss"
            )
    return scores
