"""What calibration batches tell about a model: criterion statistics and BatchNorm statistics.

Gradients are taken with ``torch.autograd.grad`` with respect to the targets' raw parameters,
so the user's ``.grad`` fields, optimizer and BatchNorm running statistics are left untouched
(the model runs in eval mode and is put back in its previous mode afterwards).

:func:`recalibrate_batchnorm_` re-estimates BatchNorm running statistics of a pruned model on
calibration batches (adaptive BatchNorm; ``shrink``'s reconstruction keeps them), and
:func:`batchnorm_recalibrated` does so for the duration of a block, so that a search's candidate
is scored as it would be after fine-tuning starts, not with the dense model's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.distributed import all_reduce_sum_
from secateurs.errors import ConfigError, DataError
from secateurs.running import EvalMode, call, device_of, split_batch, to_device
from secateurs.targets import Target

LossFn = Callable[[Any, Any], Tensor]

#: Calibration batches a data-driven criterion reads per pruning event (pruning and shrinking).
CALIBRATION_BATCHES = 16


class GradientStatistic(Protocol):
    """What :func:`calibrate` feeds: a criterion folding one batch's gradient into its stats."""

    def accumulate(self, stats: dict[str, Tensor], target: Target, grad: Tensor) -> None:
        """Fold the gradient of ``target`` on one batch into ``stats``."""


def calibrate(
    model: nn.Module,
    targets: Sequence[Target],
    criterion: GradientStatistic,
    data: Iterable[Any],
    loss_fn: LossFn | None,
    calibration_batches: int = CALIBRATION_BATCHES,
) -> dict[str, dict[str, Tensor]]:
    """Run up to ``calibration_batches`` batches of ``(inputs, labels)`` and accumulate statistics.

    Returns ``{target name: {statistic: tensor}}`` for :meth:`Criterion.scores`. Under
    ``torchrun`` each rank reads its own ``data`` and the statistics are summed over the ranks
    (every statistic a criterion accumulates is a sum: of scores, of squared gradients, of
    batches), so every rank scores from the same numbers and chooses the same masks.
    """
    if loss_fn is None:
        raise ConfigError(
            f"criterion {type(criterion).__name__} needs loss_fn=<callable(output, labels)>"
        )
    stats: dict[str, dict[str, Tensor]] = {t.name: {} for t in targets}
    params: list[Tensor] = [t.raw for t in targets]
    for grads in _batch_gradients(model, lambda: params, data, loss_fn, calibration_batches):
        for target, grad in zip(targets, grads, strict=True):
            criterion.accumulate(
                stats[target.name],
                target,
                torch.zeros_like(target.raw) if grad is None else grad,
            )
    all_reduce_sum_(stats[t.name][key] for t in targets for key in sorted(stats[t.name]))
    return stats


def dense_gradients(
    model: nn.Module,
    targets: Sequence[Target],
    data: Iterable[Any],
    loss_fn: LossFn | None,
    calibration_batches: int = 1,
) -> dict[str, Tensor]:
    """Gradient of the loss with respect to each target's *effective* tensor, summed over up to
    ``calibration_batches`` batches: dense, so pruned positions get a gradient too (what RigL grows by).

    Masked weights are ``raw * mask``; the gradient of ``raw`` is zero where the mask is. With
    parametrizations cached for the pass, the effective tensor is one node of the graph and
    its gradient is the dense one. Nothing of the model's state is changed. Under ``torchrun``
    the sums are over every rank's batches (each rank reads its own ``data``).
    """
    if loss_fn is None:
        raise ConfigError("dense gradients need loss_fn=<callable(output, labels)>")
    out: dict[str, Tensor] = {}

    def effective() -> list[Tensor]:
        return [t.weight for t in targets]

    with parametrize.cached():
        for grads in _batch_gradients(model, effective, data, loss_fn, calibration_batches):
            for target, grad in zip(targets, grads, strict=True):
                g = torch.zeros_like(target.raw) if grad is None else grad.detach()
                out[target.name] = out[target.name] + g if target.name in out else g.clone()
    all_reduce_sum_(out[t.name] for t in targets)
    return out


def _batch_gradients(
    model: nn.Module,
    wrt: Callable[[], list[Tensor]],
    data: Iterable[Any],
    loss_fn: LossFn,
    calibration_batches: int,
) -> Iterator[tuple[Tensor | None, ...]]:
    """Per batch, the gradients of the loss with respect to ``wrt()``, in eval mode (batches
    are moved to the model's device)."""
    if calibration_batches < 1:
        raise ConfigError(f"calibration batches must be >= 1; got {calibration_batches}")
    seen = 0
    device = device_of(model)
    with EvalMode(model):
        for batch in data:
            if seen >= calibration_batches:
                break
            inputs, labels = split_batch(batch)
            inputs, labels = to_device(inputs, device), to_device(labels, device)
            with torch.enable_grad():
                tensors = wrt()
                loss = loss_fn(model(inputs), labels)
                if not torch.isfinite(loss):
                    raise DataError(f"calibration loss is {loss.item()} on batch {seen}")
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            yield grads
            seen += 1
    if seen == 0:
        raise DataError("calibration data is empty: the loader yielded no batch")


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def recalibrate_batchnorm_(
    model: nn.Module, data: Iterable[Any], only: Iterable[nn.Module] | None = None
) -> nn.Module:
    """Re-estimate ``model``'s BatchNorm running statistics on ``data`` in place; return it.

    Each BatchNorm layer (of ``only``, when given; the others keep theirs and run in eval
    mode) is reset and averaged cumulatively over every batch of ``(inputs, labels)`` pairs in
    ``data``, with only those layers in training mode (dropout stays off) and no gradient;
    momenta and modes are put back afterwards. A model without BatchNorm (or with
    ``track_running_stats=False``) is returned unchanged.
    """
    chosen = None if only is None else {id(m) for m in only}
    norms = [m for m in _batchnorms(model) if chosen is None or id(m) in chosen]
    if not norms:
        return model
    momenta = [m.momentum for m in norms]
    device = device_of(model)
    try:
        with EvalMode(model), torch.no_grad():
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            seen = 0
            for batch in data:
                inputs, _ = split_batch(batch)
                call(model, to_device(inputs, device))
                seen += 1
            if seen == 0:
                raise DataError(
                    "BatchNorm recalibration needs at least one (inputs, labels) batch; the "
                    "calibration data yielded none"
                )
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return model


@contextmanager
def batchnorm_recalibrated(model: nn.Module, data: Iterable[Any]) -> Iterator[nn.Module]:
    """``model`` with its BatchNorm running statistics re-estimated on ``data`` (see
    :func:`recalibrate_batchnorm_`), until the block ends (then the statistics, momenta and
    modes are put back exactly).

    Removing channels or weights shifts the distribution each BatchNorm layer normalises; with
    the dense model's statistics a pruned VGG scores near chance before any training, and the
    scores of different candidates stop saying which one will recover best. Re-estimating the
    statistics, with no gradient step, restores that link (adaptive BatchNorm, Li et al. 2020,
    "EagleEye").
    """
    norms = _batchnorms(model)
    saved = [(m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)}) for m in norms]
    try:
        recalibrate_batchnorm_(model, data)
        yield model
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, b in m.named_buffers(recurse=False):
                    b.copy_(buffers[k])
