"""A small, deterministic training / fine-tuning loop used by the CLI, the demo and benchmarks.

Users with their own loop do not need it: they call ``pruner.step()`` after their optimizer
step. This loop does the same through ``on_step``. Batch size is the loader's business: the
loop consumes whatever ``(inputs, labels)`` batches it is given.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from secateurs.distributed import (
    all_reduce_sum_,
    broadcast_,
    data_parallel,
    is_distributed,
    layout,
    start_epoch,
)
from secateurs.errors import ConfigError, DataError, ModelError

OPTIMIZERS = ("sgd", "adamw")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    """Optimizer and learning-rate schedule of one training run.

    ``optimizer`` is ``"sgd"`` (with ``momentum`` and, if ``nesterov``, Nesterov momentum) or
    ``"adamw"`` (``momentum`` and ``nesterov`` unused). ``cosine`` decays the learning rate from
    ``lr`` to 0 over all steps, updated every step. ``seed`` seeds torch before training so two
    runs with the same config, model and loader end with identical weights. ``clip_grad``:
    the largest norm of the gradient (all parameters together) a step uses, larger ones are
    scaled down to it; ``None`` leaves gradients as they are. Very sparse networks trained
    from scratch need it at a high learning rate: a unit that keeps one or two inputs turns
    a loss spike into a dead or diverged network (the sparse-training benchmark's 99% rows).
    """

    epochs: int = 10
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    cosine: bool = True
    seed: int = 0
    label_smoothing: float = 0.0
    clip_grad: float | None = None

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("epochs", _is_int(self.epochs) and self.epochs >= 0, "an integer >= 0"),
            ("lr", _is_number(self.lr) and self.lr > 0, "a finite number > 0"),
            (
                "optimizer",
                isinstance(self.optimizer, str) and self.optimizer in OPTIMIZERS,
                f"one of {', '.join(OPTIMIZERS)}",
            ),
            ("momentum", _is_number(self.momentum) and 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", _is_number(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            ("nesterov", isinstance(self.nesterov, bool), "true or false"),
            ("cosine", isinstance(self.cosine, bool), "true or false"),
            ("seed", _is_int(self.seed), "an integer"),
            (
                "label_smoothing",
                _is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
                "in [0, 1)",
            ),
            (
                "clip_grad",
                self.clip_grad is None or (_is_number(self.clip_grad) and self.clip_grad > 0),
                "null or a finite number > 0",
            ),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name} = {getattr(self, name)!r} is invalid; must be {allowed}")


def finetune_config(train: TrainConfig, epochs: int, lr_factor: float = 0.1) -> TrainConfig:
    """The config for fine-tuning after pruning: ``train`` with ``epochs`` and a scaled LR.

    Recovery starts from weights that are already good, so by default it runs at a tenth of
    the training learning rate (the literature uses 1/10 to 1/100); everything else is kept.
    """
    if not (_is_number(lr_factor) and lr_factor > 0):
        raise ConfigError(f"lr_factor = {lr_factor!r} is invalid; must be a finite number > 0")
    return dataclasses.replace(train, epochs=epochs, lr=train.lr * lr_factor)


@dataclass
class TrainHistory:
    """What a run did: mean training loss per epoch, optimizer steps taken and wall time."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


class LossTerm(Protocol):
    """Something added to the training loss of every batch: a regularizer, distillation.

    :func:`train` calls it with keywords after the forward pass: ``inputs`` and ``labels``
    of the batch, the model's ``outputs`` and ``step``, the number of optimizer steps taken so
    far (from 0, for coefficient schedules); it returns a scalar tensor. A term may carry a
    ``task_weight`` attribute (1 when absent) that scales the task loss instead of leaving it
    as is; distillation uses it for its ``(1 - alpha) * task_loss``.
    """

    def __call__(self, *, inputs: Any, outputs: Any, labels: Tensor, step: int) -> Tensor: ...


def _task_weight(terms: Sequence[LossTerm]) -> float:
    """The weight of the task loss the terms ask for (at most one term may change it)."""
    weight, owner = 1.0, None
    for term in terms:
        if not callable(term):
            raise ConfigError(
                f"loss_terms entries must be callables (a regularizer, a Distillation); "
                f"got {term!r}"
            )
        value = getattr(term, "task_weight", 1.0)
        if not (_is_number(value) and value >= 0):
            raise ConfigError(
                f"loss term {term!r} has task_weight = {value!r}; must be a finite number >= 0"
            )
        if value != 1.0:
            if owner is not None:
                raise ConfigError(
                    f"two loss terms reweight the task loss ({owner!r} and {term!r}); "
                    "at most one may set task_weight"
                )
            weight, owner = float(value), term
    return weight


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` describes, over ``model``'s trainable parameters.

    Parametrized weights (``torch.nn.utils.parametrize``, as masks use) are trained through
    their ``original`` tensors, which ``model.parameters()`` already yields.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError(
            f"{type(model).__name__} has no trainable parameters (none has requires_grad=True); "
            "unfreeze some before training"
        )
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _split_batch(batch: Any, step: int) -> tuple[Any, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataError(
        f"training batch {step} is a {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; "
        "the loader must yield (inputs, labels) pairs"
    )


def _total_loss(
    loss: Tensor, terms: Sequence[LossTerm], inputs: Any, outputs: Any, labels: Tensor, step: int
) -> Tensor:
    for term in terms:
        value = term(inputs=inputs, outputs=outputs, labels=labels, step=step)
        if not (isinstance(value, Tensor) and value.numel() == 1):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(
                f"loss term {term!r} returned {shape}; it must return a scalar tensor"
            )
        loss = loss + value.reshape(())
    return loss


def train(
    model: nn.Module,
    loader: Iterable[Any],
    config: TrainConfig,
    *,
    on_step: Callable[[int], object] | None = None,
    on_epoch_end: Callable[[int, float], object] | None = None,
    progress: Callable[[int, int], object] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    loss_terms: Sequence[LossTerm] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``(inputs, labels)`` batches for ``config.epochs`` epochs.

    ``on_step(step)`` runs after every optimizer step (call ``pruner.step()`` there; ``step``
    counts from 1), ``on_epoch_end(epoch, mean_loss)`` after every epoch (from 0), and
    ``progress(done, total)`` after every step for progress bars (``total`` is 0 when the loader
    has no length). ``loss_fn(outputs, labels)`` defaults to cross-entropy with the config's
    label smoothing. ``loss_terms`` (regularizers, distillation: see :class:`LossTerm`) are
    added to it: the loss is ``task_weight * loss_fn(outputs, labels) + sum(terms)``, and the
    history records that total. ``optimizer`` replaces the one ``config`` describes (its
    learning rate still follows the config's schedule): pass the one a sparse-training
    :class:`~secateurs.Pruner` resets state in. Batches are moved to the model's device. The model is left in
    the train/eval mode it came in. A non-finite loss stops training with a
    :class:`ConfigError` before the step is taken.

    Under ``torchrun`` (a process group of more than one process) the forward and backward
    passes run through ``DistributedDataParallel``, which averages the gradients so every rank
    takes the same step; ``loader`` is this rank's share of the data (a
    :class:`~secateurs.distributed.ShardedSampler`, or a ``DistributedSampler`` whose epoch is
    set at every epoch). The wrapper is rebuilt after an ``on_step`` that changed the model's
    parameters or buffers (a first mask attached, masks removed), the mean losses are over
    all ranks, and the buffers (BatchNorm statistics) are rank 0's at the end, so every rank
    ends with the same model. In one process nothing of this happens.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig; got {type(config).__name__}")
    try:
        steps_per_epoch: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    if steps_per_epoch is None and config.cosine and config.epochs > 0:
        raise ConfigError(
            "cosine = true needs the total number of steps, but the loader has no len(); "
            "pass a sized loader (a DataLoader) or set cosine = false"
        )
    total = config.epochs * steps_per_epoch if steps_per_epoch is not None else 0
    if loss_terms is not None and not isinstance(loss_terms, Sequence):
        raise ConfigError(
            f"loss_terms must be a list of loss terms; got {type(loss_terms).__name__}"
        )
    terms = list(loss_terms or [])
    task_weight = _task_weight(terms)

    torch.manual_seed(config.seed)
    if loss_fn is None:
        smoothing = config.label_smoothing

        def loss_fn(out: Tensor, y: Tensor) -> Tensor:
            return nn.functional.cross_entropy(out, y, label_smoothing=smoothing)

    if optimizer is None:
        optimizer = make_optimizer(model, config)
    device = _model_device(model)
    history = TrainHistory()
    start = time.perf_counter()
    was_training = model.training
    model.train()
    net = data_parallel(model)
    shape = layout(model) if net is not model else None
    try:
        for epoch in range(config.epochs):
            start_epoch(loader, epoch)
            running, batches = 0.0, 0
            for batch in loader:
                inputs, labels = _split_batch(batch, history.steps)
                if device is not None:
                    inputs = inputs.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                if config.cosine and total:
                    lr = config.lr * 0.5 * (1 + math.cos(math.pi * history.steps / total))
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                if terms:
                    outputs = net(inputs)
                    loss = _total_loss(
                        task_weight * loss_fn(outputs, labels),
                        terms,
                        inputs,
                        outputs,
                        labels,
                        history.steps,
                    )
                else:
                    loss = loss_fn(net(inputs), labels)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ConfigError(
                        f"training diverged: loss {value} at epoch {epoch}, step "
                        f"{history.steps + 1}; lower the learning rate (lr = {config.lr})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                optimizer.step()
                history.steps += 1
                running += value
                batches += 1
                if on_step is not None:
                    on_step(history.steps)
                    if shape is not None and layout(model) != shape:
                        net = model  # drop the old wrapper first: its hooks stay on the weights
                        net = data_parallel(model)
                        shape = layout(model)
                if progress is not None:
                    progress(history.steps, total)
            mean = _mean_over_ranks(running, batches)
            history.losses.append(mean)
            if on_epoch_end is not None:
                on_epoch_end(epoch, mean)
        if shape is not None:
            broadcast_(list(model.buffers()))  # rank 0's BatchNorm statistics everywhere
    finally:
        model.train(was_training)
    history.seconds = time.perf_counter() - start
    return history


def _mean_over_ranks(total: float, batches: int) -> float:
    """The mean batch loss of an epoch, over every rank's batches (this rank's in one
    process): with equal shares of each batch, the mean loss of the global batches."""
    if not is_distributed():
        return total / max(batches, 1)
    sums = torch.tensor([total, float(batches)], dtype=torch.float64)
    all_reduce_sum_([sums])
    return float(sums[0] / sums[1].clamp(min=1))
