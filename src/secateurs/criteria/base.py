"""The criterion interface: how important is each weight.

A criterion gives one non-negative score per element, additive over a group (a structure
averages them). Data-driven criteria declare what they need from calibration batches by
implementing :meth:`Criterion.accumulate`, called once per batch with each target's gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

from torch import Tensor

from secateurs.registry import Registry
from secateurs.targets import Target

#: Per-target statistics gathered on calibration data, keyed by statistic name.
Stats = Mapping[str, Tensor]


class Criterion(ABC):
    """Base class of importance criteria."""

    registry_name: ClassVar[str]
    #: True when :meth:`scores` needs statistics from calibration data (gradients).
    needs_data: ClassVar[bool] = False
    #: True when the criterion learns from training itself: :meth:`observe` is called at every
    #: ``Pruner.step()`` (movement pruning).
    observes_training: ClassVar[bool] = False

    @abstractmethod
    def scores(self, target: Target, stats: Stats | None, seed: int) -> Tensor:
        """Element-wise importance of ``target``'s tensor (same shape, float32, >= 0).

        ``seed`` makes random criteria reproducible; deterministic ones ignore it.
        """

    def accumulate(self, stats: dict[str, Tensor], target: Target, grad: Tensor) -> None:
        """Fold one calibration batch's gradient of ``target`` into ``stats``."""
        raise NotImplementedError(f"{type(self).__name__} uses no calibration data")

    def observe(self, stats: dict[str, Tensor], target: Target) -> None:
        """Fold the current training step of ``target`` (its weight and gradient) into
        ``stats`` (only for criteria that :attr:`observes_training`)."""
        raise NotImplementedError(f"{type(self).__name__} does not learn from training steps")


CRITERIA: Registry[Criterion] = Registry("criterion", Criterion)


def add_stat(stats: dict[str, Tensor], key: str, value: Tensor) -> None:
    """``stats[key] += value``, creating the entry on first use."""
    if key in stats:
        stats[key].add_(value)
    else:
        stats[key] = value.detach().clone()
