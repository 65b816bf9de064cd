"""Criteria that need gradients from calibration data: first-order Taylor and OBD."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from secateurs.criteria.base import CRITERIA, Criterion, Stats, add_stat
from secateurs.errors import ConfigError
from secateurs.targets import Target


def _require(stats: Stats | None, key: str, who: str) -> Tensor:
    if stats is None or key not in stats:
        raise ConfigError(
            f"criterion {who!r} needs calibration data: pass data=<a DataLoader> and "
            "loss_fn=<callable(output, target)> so gradients can be collected"
        )
    return stats[key]


@CRITERIA.register("taylor")
@dataclass
class Taylor(Criterion):
    """First-order Taylor: ``sum over batches |w * dL/dw|`` (Molchanov et al. 2017/2019).

    Estimates how much the loss changes when a weight is set to zero, to first order.
    """

    needs_data = True

    def accumulate(self, stats: dict[str, Tensor], target: Target, grad: Tensor) -> None:
        add_stat(stats, "taylor", (target.weight.detach() * grad).abs().to(torch.float32))

    def scores(self, target: Target, stats: Stats | None, seed: int) -> Tensor:
        return _require(stats, "taylor", "taylor").clone()


@CRITERIA.register("obd")
@dataclass
class OBD(Criterion):
    """Optimal Brain Damage (LeCun et al. 1990): ``1/2 * F_ii * w_i^2``.

    The Hessian diagonal is approximated by the empirical Fisher diagonal, the mean of squared
    mini-batch gradients over the calibration batches. At a minimum the first-order term
    vanishes, so this second-order term is the predicted loss increase of removing ``w_i``.
    """

    needs_data = True

    def accumulate(self, stats: dict[str, Tensor], target: Target, grad: Tensor) -> None:
        add_stat(stats, "fisher", grad.detach().to(torch.float32).square())
        add_stat(stats, "batches", torch.ones(()))

    def scores(self, target: Target, stats: Stats | None, seed: int) -> Tensor:
        fisher = _require(stats, "fisher", "obd") / _require(stats, "batches", "obd")
        w = target.weight.detach().to(torch.float32)
        return 0.5 * fisher * w.square()
