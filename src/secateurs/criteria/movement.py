"""Movement pruning: the weights that training pushes away from zero are the ones to keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from secateurs.criteria.base import CRITERIA, Criterion, Stats, add_stat
from secateurs.errors import ConfigError
from secateurs.targets import Target


@CRITERIA.register("movement")
@dataclass
class Movement(Criterion):
    """Movement pruning (Sanh et al. 2020): ``S = -sum_t W_t * dL/dW_t`` over fine-tuning.

    Magnitude asks which weights are large *now*, which after pre-training says little about
    the task being fine-tuned; movement asks which weights fine-tuning moves away from zero (a
    positive score) and which toward it (negative). It is a first-order, training-time
    criterion: with :class:`~secateurs.Pruner` and a :class:`~secateurs.Gradual` schedule,
    every ``pruner.step()`` after an optimizer step adds ``-W * grad`` of that step (call it
    while the gradients are still set, before ``zero_grad``), and each pruning event ranks by
    the sum so far. Pruned weights score 0 afterwards (their effective value is 0) and stay
    pruned.
    """

    observes_training: ClassVar[bool] = True

    def observe(self, stats: dict[str, Tensor], target: Target) -> None:
        grad = target.raw.grad
        if grad is None:
            return
        with torch.no_grad():
            add_stat(stats, "movement", -(target.weight.detach() * grad).to(torch.float32))

    def scores(self, target: Target, stats: Stats | None, seed: int) -> Tensor:
        if not stats or "movement" not in stats:
            raise ConfigError(
                "movement pruning ranks weights by how fine-tuning moves them, and no gradient "
                "was seen yet: prune during training (sc.Pruner with a schedule such as "
                "sc.Gradual) and call pruner.step() after optimizer.step(), before zero_grad()"
            )
        return stats["movement"].clone()
