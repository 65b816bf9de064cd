"""Collect what a data-driven criterion needs from calibration batches.

Gradients are taken with ``torch.autograd.grad`` with respect to the targets' raw parameters,
so the user's ``.grad`` fields, optimizer and BatchNorm running statistics are left untouched
(the model runs in eval mode and is put back in its previous mode afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.criteria.base import Criterion
from secateurs.errors import ConfigError, DataError
from secateurs.metrics import EvalMode
from secateurs.targets import Target

LossFn = Callable[[Any, Any], Tensor]


def calibrate(
    model: nn.Module,
    targets: Sequence[Target],
    criterion: Criterion,
    data: Iterable[Any],
    loss_fn: LossFn | None,
    max_batches: int = 16,
) -> dict[str, dict[str, Tensor]]:
    """Run up to ``max_batches`` batches of ``(inputs, labels)`` and accumulate statistics.

    Returns ``{target name: {statistic: tensor}}`` for :meth:`Criterion.scores`.
    """
    if loss_fn is None:
        raise ConfigError(
            f"criterion {type(criterion).__name__} needs loss_fn=<callable(output, labels)>"
        )
    if max_batches < 1:
        raise ConfigError(f"calibration batches must be >= 1; got {max_batches}")
    stats: dict[str, dict[str, Tensor]] = {t.name: {} for t in targets}
    params = [t.raw for t in targets]
    seen = 0
    with EvalMode(model):
        for batch in data:
            if seen >= max_batches:
                break
            inputs, labels = _split(batch)
            with torch.enable_grad():
                loss = loss_fn(model(inputs), labels)
                if not torch.isfinite(loss):
                    raise DataError(f"calibration loss is {loss.item()} on batch {seen}")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for target, grad in zip(targets, grads, strict=True):
                criterion.accumulate(
                    stats[target.name],
                    target,
                    torch.zeros_like(target.raw) if grad is None else grad,
                )
            seen += 1
    if seen == 0:
        raise DataError("calibration data is empty: the loader yielded no batch")
    return stats


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataError(
        "calibration batches must be (inputs, labels) pairs as a DataLoader over a "
        f"TensorDataset yields; got {type(batch).__name__}"
    )
