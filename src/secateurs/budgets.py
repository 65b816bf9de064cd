"""Budgets: what "small enough" means, turned into a sparsity over the pruned tensors.

A budget is an object so that every allocator and schedule works in one currency (the fraction
of target weights to remove) while users speak in theirs: a sparsity, a parameter count, MACs,
bytes on disk or measured latency. The plain mask allocators turn a budget into a sparsity
(:meth:`Budget.target_sparsity`); the searches of :mod:`secateurs.search.base` and
:func:`secateurs.shrink` count the budget's own quantity for each candidate ratio map
(:mod:`secateurs.search.space`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from secateurs.checks import check_sparsity
from secateurs.errors import BudgetError, ConfigError
from secateurs.registry import Registry
from secateurs.targets import Target


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (a masked tensor counts once, tied ones once)."""
    return sum(p.numel() for p in _distinct(model))


class Budget(ABC):
    """Base class of budgets."""

    registry_name: ClassVar[str]

    @abstractmethod
    def target_sparsity(self, model: nn.Module, targets: Sequence[Target]) -> float:
        """The sparsity over ``targets`` that meets this budget."""


BUDGETS: Registry[Budget] = Registry("budget", Budget)


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


@BUDGETS.register("bytes")
@dataclass
class Bytes(KeepBudget):
    """Keep at most this many bytes of stored parameters.

    An ``int`` is a byte count; a ``float`` in (0, 1] a fraction of the dense model's bytes.
    A tensor with element masks is counted as the cheaper of dense storage and CSR (values plus
    32-bit column indices and row pointers, :func:`secateurs.metrics.csr_bytes`), which is
    what a sparse export stores; a model with channels removed is counted dense.
    """

    keep: int | float

    def target_sparsity(self, model: nn.Module, targets: Sequence[Target]) -> float:
        total = sum(p.numel() * p.element_size() for p in _distinct(model))
        in_targets = sum(t.numel * t.raw.element_size() for t in targets)
        keep_in_targets = self.limit(total) - (total - in_targets)
        # CSR pays 4 index bytes per nonzero on top of the value and 4 per row pointer:
        # solve for the density that fits
        itemsize = max(t.raw.element_size() for t in targets)
        pointers = sum(4 * ((t.shape[0] if t.shape else 1) + 1) for t in targets)
        density = (keep_in_targets - pointers) / (in_targets / itemsize * (itemsize + 4))
        if keep_in_targets < 1 or density <= 0:
            raise BudgetError(
                f"cannot store the model in {self.limit(total):,} bytes: {total - in_targets:,} "
                "bytes are outside the pruned tensors and CSR needs row pointers. Prune more "
                "tensors or raise the budget."
            )
        # above the dense/CSR crossover the tensors stay dense and nothing needs removing
        return 0.0 if keep_in_targets >= in_targets else max(0.0, 1.0 - density)


@BUDGETS.register("latency")
@dataclass
class Latency(KeepBudget):
    """Keep the measured forward latency on this machine at most this much.

    A ``float`` in (0, 1] is a fraction of the dense model's latency; an ``int`` is
    microseconds. Only removing channels changes latency with dense kernels, so this budget is
    for structural pruning, where it is met with a per-layer latency look-up table measured
    once and cached (:mod:`secateurs.graph.latency`).
    """

    keep: int | float

    def target_sparsity(self, model: nn.Module, targets: Sequence[Target]) -> float:
        raise ConfigError(
            "a Latency budget needs channels removed for real: element masks keep dense "
            "kernels, whose time does not change. Use sc.shrink(model, example_inputs, "
            "budget=sc.Latency(...)) or a structural search (sc.search_allocation)"
        )


def _distinct(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())
