"""Regularizers that push weights toward prunability, as a term added to the training loss.

Each regularizer is a plain dataclass found by name in :data:`REGULARIZERS` (``l1``, ``l2``,
``group_lasso``, ``bn_l1``), so a recipe can say ``{name: group_lasso, coefficient: 1e-3}``.
It is bound to a model once and then called with the training step::

    reg = REGULARIZERS.build({"name": "group_lasso", "coefficient": 1e-3}).bind(model)
    loss = task_loss + reg(step)

The value is computed from the *effective* (masked) weights, so it is differentiable with
respect to the raw parameters behind a mask and pruned weights contribute nothing to it (nor
receive any gradient from it). Every regularizer is also a loss term of
:func:`secateurs.train.train` (``loss_terms=[reg]``), where ``step`` is the number of
optimizer steps taken so far.

The coefficient follows a schedule: ``constant``; ``linear``, a warm-up from 0 to
``coefficient`` over ``warmup`` steps (a strong penalty from step 0 would fight the task loss
before the model has found its footing); or ``cosine``, a decay from ``coefficient`` to 0 over
``steps`` steps (push toward sparsity early, then let the task loss recover accuracy).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from secateurs.errors import ConfigError, ModelError
from secateurs.masks import raw_parameter
from secateurs.registry import Registry
from secateurs.selection import Candidate, Selector, compile_selectors, select
from secateurs.structures import NM, STRUCTURES, Structure, canonical, uncanonical
from secateurs.targets import Target, find_targets

#: Names of the coefficient schedules a regularizer accepts.
COEFFICIENT_SCHEDULES = ("constant", "linear", "cosine")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Regularizer(ABC):
    """Base class: a penalty on a model's weights, scaled by a scheduled coefficient.

    ``include`` / ``exclude`` select the tensors like :func:`secateurs.find_targets` does
    (regexes over module or tensor names, or module types); every pattern must match.
    Call :meth:`bind` once, then ``reg(step)`` for the scaled penalty.
    """

    registry_name: ClassVar[str]
    #: How much a loss term scales the task loss in :func:`~secateurs.train.train`: unchanged.
    task_weight: ClassVar[float] = 1.0

    coefficient: float = 1e-4
    schedule: str = "constant"
    warmup: int = 0
    steps: int = 0
    include: Sequence[Selector] | None = None
    exclude: Sequence[Selector] | None = None

    def __post_init__(self) -> None:
        name = getattr(type(self), "registry_name", type(self).__name__)
        c = self.coefficient
        if not (isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)):
            raise ConfigError(f"{name}: coefficient = {c!r} is invalid; must be a finite number")
        if c < 0:
            raise ConfigError(f"{name}: coefficient = {c!r} is invalid; must be >= 0")
        if self.schedule not in COEFFICIENT_SCHEDULES:
            raise ConfigError(
                f"{name}: schedule = {self.schedule!r} is invalid; "
                f"must be one of {', '.join(COEFFICIENT_SCHEDULES)}"
            )
        for key in ("warmup", "steps"):
            value = getattr(self, key)
            if not (_is_int(value) and value >= 0):
                raise ConfigError(f"{name}: {key} = {value!r} is invalid; must be an integer >= 0")
        if self.schedule == "linear" and self.warmup < 1:
            raise ConfigError(f"{name}: schedule 'linear' needs warmup >= 1 (steps of warm-up)")
        if self.schedule == "cosine" and self.steps < 1:
            raise ConfigError(f"{name}: schedule 'cosine' needs steps >= 1 (steps of decay)")
        if self.warmup and self.schedule != "linear":
            raise ConfigError(
                f"{name}: warmup is used only by schedule 'linear'; got schedule {self.schedule!r}"
            )
        if self.steps and self.schedule != "cosine":
            raise ConfigError(
                f"{name}: steps is used only by schedule 'cosine'; got schedule {self.schedule!r}"
            )
        compile_selectors(self.include, "include")
        compile_selectors(self.exclude, "exclude")
        self.targets_: list[Target] = []

    # -- binding -------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> Self:
        """Select the tensors of ``model`` this regularizer penalises; returns ``self``.

        Binding again replaces the previous selection. Raises before anything is kept when a
        selector matches nothing or the model has nothing to regularize.
        """
        targets = self._select(model)
        self._prepare(targets)
        self.targets_ = targets
        return self

    def _select(self, model: nn.Module) -> list[Target]:
        return find_targets(model, self.include, self.exclude)

    def _prepare(self, targets: list[Target]) -> None:  # noqa: B027 - most need nothing
        """Precompute whatever :meth:`penalty` needs per target (raise on a misfit)."""

    # -- value ---------------------------------------------------------------------------
    def coefficient_at(self, step: int) -> float:
        """The scheduled coefficient at ``step`` (optimizer steps taken so far, from 0)."""
        if self.schedule == "linear":
            return self.coefficient * min(1.0, max(step, 0) / self.warmup)
        if self.schedule == "cosine":
            progress = min(max(step, 0), self.steps) / self.steps
            return self.coefficient * 0.5 * (1.0 + math.cos(math.pi * progress))
        return float(self.coefficient)

    @abstractmethod
    def _penalty(self, target: Target) -> Tensor:
        """The unscaled penalty of one tensor, a float32 scalar."""

    def penalty(self) -> Tensor:
        """The unscaled penalty summed over the bound tensors (a float32 scalar)."""
        if not self.targets_:
            raise ConfigError(
                f"{type(self).__name__} is not bound to a model; call .bind(model) first"
            )
        total = self._penalty(self.targets_[0])
        for target in self.targets_[1:]:
            total = total + self._penalty(target).to(total.device)
        return total

    def __call__(
        self,
        step: int = 0,
        *,
        inputs: Any = None,
        outputs: Any = None,
        labels: Any = None,
    ) -> Tensor:
        """``coefficient_at(step) * penalty()``: the scalar to add to the loss.

        The keyword arguments make a regularizer a :class:`~secateurs.train.LossTerm`; the
        batch does not enter the penalty and is ignored.
        """
        return self.coefficient_at(step) * self.penalty()


REGULARIZERS: Registry[Regularizer] = Registry("regularizer", Regularizer)


@REGULARIZERS.register("l1")
@dataclass
class L1(Regularizer):
    """``coefficient * sum |w|`` over the selected weights: pushes single weights to zero."""

    def _penalty(self, target: Target) -> Tensor:
        return target.weight.float().abs().sum()


@REGULARIZERS.register("l2")
@dataclass
class L2(Regularizer):
    """``coefficient / 2 * sum w**2`` over the selected weights.

    Its gradient, ``coefficient * w``, equals weight decay of the same value, but it goes
    through the loss, so it can be scheduled and limited to some layers.
    """

    def _penalty(self, target: Target) -> Tensor:
        return 0.5 * target.weight.float().pow(2).sum()


@dataclass
class _Groups:
    """A tensor's groups: a ``[G, S]`` gather index (``numel`` pads ragged groups) and ``sqrt |g|``."""

    index: Tensor
    scale: Tensor


@REGULARIZERS.register("group_lasso")
@dataclass
class GroupLasso(Regularizer):
    """``coefficient * sum_g sqrt(|g|) * ||w_g||_2`` over the groups of a structure.

    The groups are those a pruning structure prunes together, so a group the penalty drives
    to zero is one that structure can remove at no cost: ``channels`` (output channels /
    rows; ``{name: channels, dim: 1}`` for input channels / columns), ``blocks``, or ``nm``
    (each block of ``m`` consecutive inputs). The ``sqrt(|g|)`` factor (Yuan & Lin) keeps
    large and small groups on an equal footing. A fully zero group contributes 0 and gets a
    zero (sub)gradient.
    """

    structure: Structure | str | Mapping[str, Any] = "channels"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.structure_: Structure = STRUCTURES.build(self.structure)
        self._groups: dict[str, _Groups] = {}

    def _prepare(self, targets: list[Target]) -> None:
        groups: dict[str, _Groups] = {}
        for target in targets:
            self.structure_.check(target)
            ids, count = group_ids(self.structure_, target)
            groups[target.name] = _gather_index(ids.reshape(-1), count)
        self._groups = groups

    def _penalty(self, target: Target) -> Tensor:
        weight = target.weight
        groups = self._groups[target.name]
        if groups.index.device != weight.device:
            groups = _Groups(groups.index.to(weight.device), groups.scale.to(weight.device))
            self._groups[target.name] = groups
        squares = weight.float().pow(2).reshape(-1)
        padded = torch.cat([squares, squares.new_zeros(1)])
        sums = padded[groups.index].sum(1)
        alive = sums > 0
        # sqrt has an infinite derivative at 0: take it only where the group is nonzero.
        norms = torch.where(alive, torch.sqrt(torch.where(alive, sums, 1.0)), 0.0)
        return (groups.scale * norms).sum()


def group_ids(structure: Structure, target: Target) -> tuple[Tensor, int]:
    """The group of every element of ``target`` under ``structure``, and the number of groups.

    Returns an int64 tensor shaped like the tensor. N:M groups are the blocks of ``m``
    consecutive inputs; any other structure's groups are read from its own
    ``group_scores`` / ``expand`` (expanding the group numbers instead of a keep-vector).
    """
    shape = target.shape
    if isinstance(structure, NM):
        structure.check(target)
        c_shape = canonical(torch.empty(shape, device="meta"), target.transposed).shape
        rows, inputs = int(c_shape[0]), int(c_shape[1])
        rest = math.prod(c_shape[2:])
        blocks = inputs // structure.m
        ids = torch.arange(rows * blocks * rest).reshape(rows, blocks, rest)
        ids = ids.repeat_interleave(structure.m, dim=1).reshape(c_shape)
        return uncanonical(ids, shape, target.transposed), rows * blocks * rest
    name = type(structure).__name__
    try:
        count = structure.group_scores(torch.zeros(shape), target, None).scores.numel()
        ids = structure.expand(torch.arange(count), target)
    except (RuntimeError, TypeError, IndexError) as exc:
        raise ConfigError(
            f"structure {name} cannot define groups of {target.name} for group lasso: {exc}"
        ) from None
    if (
        tuple(ids.shape) != shape
        or ids.dtype != torch.int64
        or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= count))
    ):
        raise ConfigError(
            f"structure {name} cannot define groups of {target.name} for group lasso: its "
            "expand() does not map group numbers onto the tensor"
        )
    return ids.contiguous(), count


def _gather_index(ids: Tensor, count: int) -> _Groups:
    """Turn per-element group ids into a ``[count, largest]`` gather index, padded with ``numel``.

    Summing gathered rows is deterministic (no atomic scatter), unlike ``index_add``.
    """
    numel = ids.numel()
    sizes = torch.bincount(ids, minlength=count)
    largest = int(sizes.max()) if count else 0
    order = torch.argsort(ids, stable=True)
    if count and bool((sizes == largest).all()):
        index = order.reshape(count, largest)
    else:
        starts = torch.cumsum(sizes, 0) - sizes
        sorted_ids = ids[order]
        position = torch.arange(numel) - starts[sorted_ids]
        index = torch.full((count, largest), numel, dtype=torch.int64)
        index[sorted_ids, position] = order
    return _Groups(index, sizes.to(torch.float32).sqrt())


@REGULARIZERS.register("bn_l1")
@dataclass
class BNL1(Regularizer):
    """``coefficient * sum |gamma|`` over BatchNorm scales (Network Slimming, Liu et al. 2017).

    Driving a channel's BatchNorm scale to zero silences that channel, which the ``bn_scale``
    criterion then prunes. ``include`` / ``exclude`` select BatchNorm layers by module name,
    tensor name (``bn1.weight``) or type; layers without a learnable scale are skipped.
    """

    def _select(self, model: nn.Module) -> list[Target]:
        candidates = [
            Candidate(name, f"{name}.weight" if name else "weight", module)
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            # affine=False: no scale to shrink
            and isinstance(getattr(module, "weight", None), Tensor)
        ]
        chosen = select(candidates, self.include, self.exclude, "BatchNorm layer", model)
        seen: set[int] = set()
        targets: list[Target] = []
        for c in chosen:
            raw = raw_parameter(c.module, "weight")
            if id(raw) not in seen:
                seen.add(id(raw))
                targets.append(Target(c.tensor_name, c.module_name, c.module, "weight"))
        if not targets:
            raise ModelError(
                f"{type(model).__name__} has no BatchNorm layer with a learnable scale "
                "(affine=True) selected, so bn_l1 has nothing to penalise; use l1 or "
                "group_lasso instead, or loosen include/exclude"
            )
        return targets

    def _penalty(self, target: Target) -> Tensor:
        return target.weight.float().abs().sum()
