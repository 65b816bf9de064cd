"""Budgets: what "small enough" means, turned into a sparsity over the pruned tensors.

A budget is an object so that every allocator and schedule works in one currency (the fraction
of target weights to remove) while users speak in theirs: a sparsity or a parameter count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from secateurs.allocation.base import check_sparsity
from secateurs.errors import BudgetError, ConfigError
from secateurs.registry import Registry
from secateurs.targets import Target

BUDGETS: Registry[Budget] = Registry("budget")


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (a masked tensor counts once, tied ones once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class Budget(ABC):
    """Base class of budgets."""

    registry_name: ClassVar[str]

    @abstractmethod
    def target_sparsity(self, model: nn.Module, targets: Sequence[Target]) -> float:
        """The sparsity over ``targets`` that meets this budget."""


@BUDGETS.register("sparsity")
@dataclass
class Sparsity(Budget):
    """Remove this fraction of the targeted weights."""

    value: float

    def __post_init__(self) -> None:
        self.value = check_sparsity(self.value)

    def target_sparsity(self, model: nn.Module, targets: Sequence[Target]) -> float:
        return self.value


class KeepBudget(Budget):
    """A budget that keeps at most ``keep`` of something: a count (``int``) or a fraction of
    the dense model's amount (``float`` in (0, 1])."""

    keep: int | float

    def __post_init__(self) -> None:
        k = self.keep
        name = type(self).__name__
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ConfigError(f"{name} keep must be an int count or a float fraction; got {k!r}")
        if isinstance(k, float) and not 0 < k <= 1:
            raise ConfigError(f"{name} keep as a fraction must be in (0, 1]; got {k!r}")
        if isinstance(k, int) and k < 1:
            raise ConfigError(f"{name} keep as a count must be >= 1; got {k!r}")

    def limit(self, dense: int) -> int:
        """The largest amount that meets the budget, for a model of ``dense``."""
        return round(self.keep * dense) if isinstance(self.keep, float) else self.keep


@BUDGETS.register("params")
@dataclass
class Params(KeepBudget):
    """Keep at most this many nonzero parameters in the whole model.

    An ``int`` is a count; a ``float`` in (0, 1] is a fraction of the model's parameters.
    Parameters that are not pruned (biases, norms, excluded layers) count as kept.
    """

    keep: int | float

    def target_sparsity(self, model: nn.Module, targets: Sequence[Target]) -> float:
        total = count_parameters(model)
        in_targets = sum(t.numel for t in targets)
        fixed = total - in_targets
        keep = self.limit(total)
        keep_in_targets = keep - fixed
        if keep_in_targets < 1:
            raise BudgetError(
                f"cannot keep only {keep:,} parameters: {fixed:,} parameters are outside the "
                f"pruned tensors; the smallest reachable budget is Params({fixed + 1:,}). "
                "Prune more tensors (params=/include=) or raise the budget."
            )
        return max(0.0, 1.0 - keep_in_targets / in_targets)


@BUDGETS.register("macs")
@dataclass
class MACs(KeepBudget):
    """Keep at most this many multiply-accumulates per forward pass.

    ``MACs(0.5)`` keeps half the MACs of the convolutions and linear layers (a ``float`` in
    (0, 1] is a fraction, an ``int`` a count). MACs only fall when channels are physically
    removed, so this budget is for structural pruning (:func:`secateurs.shrink`), which meets
    it by search.
    """

    keep: int | float

    def target_sparsity(self, model: nn.Module, targets: Sequence[Target]) -> float:
        raise ConfigError(
            "a MACs budget needs channels removed for real: use sc.shrink(model, "
            "example_inputs, budget=sc.MACs(...)) (or a recipe's structural section); element "
            "masks keep every MAC of a dense kernel"
        )
