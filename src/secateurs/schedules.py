"""Schedules: when pruning happens, and to what sparsity at each point.

A schedule maps a step count (the number of ``Pruner.step()`` calls so far, normally one per
optimizer step) to the sparsity to reach at that step, or ``None`` when nothing happens then.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from secateurs.allocation.base import check_sparsity
from secateurs.errors import ConfigError
from secateurs.registry import Registry

SCHEDULES: Registry[Schedule] = Registry("schedule")


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


class Schedule(ABC):
    """Base class of pruning schedules."""

    registry_name: ClassVar[str]

    @abstractmethod
    def sparsity_at(self, step: int, final: float) -> float | None:
        """Sparsity to prune to at ``step`` (given the final sparsity), or None."""

    @abstractmethod
    def last_step(self) -> int:
        """The last step at which this schedule prunes."""


@SCHEDULES.register("oneshot")
@dataclass
class OneShot(Schedule):
    """Prune to the final sparsity once, at step ``at``."""

    at: int = 0

    def __post_init__(self) -> None:
        _check_int(self.at, "OneShot at", 0)

    def sparsity_at(self, step: int, final: float) -> float | None:
        return final if step == self.at else None

    def last_step(self) -> int:
        return self.at


@SCHEDULES.register("iterative")
@dataclass
class Iterative(Schedule):
    """``rounds`` pruning rounds ``every`` steps apart, with training between them.

    Each round removes the same fraction of the weights still alive, so round ``r`` of ``R``
    reaches ``1 - (1 - final) ** (r / R)`` (Han et al. 2015's prune/retrain loop).
    """

    rounds: int = 5
    every: int = 1000
    start: int = 0

    def __post_init__(self) -> None:
        _check_int(self.rounds, "Iterative rounds", 1)
        _check_int(self.every, "Iterative every", 1)
        _check_int(self.start, "Iterative start", 0)

    def sparsity_at(self, step: int, final: float) -> float | None:
        offset = step - self.start
        if offset < 0 or offset % self.every or offset // self.every >= self.rounds:
            return None
        r = offset // self.every + 1
        return 1.0 - (1.0 - final) ** (r / self.rounds)

    def last_step(self) -> int:
        return self.start + (self.rounds - 1) * self.every


@SCHEDULES.register("gradual")
@dataclass
class Gradual(Schedule):
    """Gradual magnitude pruning (Zhu & Gupta 2017), exactly their cubic schedule.

    At ``t = start + j * every`` for ``t <= end``:
    ``s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** 3``, where
    ``end - start = n * every`` in the paper's notation. Pruning is fast at first, while
    there are many redundant weights, and slows down as few remain.
    """

    start: int = 0
    end: int = 1000
    every: int = 100
    initial: float = 0.0

    def __post_init__(self) -> None:
        _check_int(self.start, "Gradual start", 0)
        _check_int(self.every, "Gradual every", 1)
        _check_int(self.end, "Gradual end", self.start + 1)
        self.initial = check_sparsity(self.initial, "Gradual initial")

    def sparsity_at(self, step: int, final: float) -> float | None:
        if step < self.start or step > self.end:
            return None
        if (step - self.start) % self.every and step != self.end:
            return None
        progress = (step - self.start) / (self.end - self.start)
        return final + (self.initial - final) * (1.0 - progress) ** 3

    def last_step(self) -> int:
        return self.end
