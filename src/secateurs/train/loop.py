"""A small, deterministic training / fine-tuning loop used by the CLI, the demo and benchmarks.

Users with their own loop do not need it: they call ``pruner.step()`` after their optimizer step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    """Optimizer and schedule of one training run. ``cosine`` decays the LR to 0 per step."""

    epochs: int = 10
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    cosine: bool = True
    seed: int = 0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("epochs", isinstance(self.epochs, int) and self.epochs >= 0, "an integer >= 0"),
            ("lr", isinstance(self.lr, (int, float)) and self.lr > 0, "a number > 0"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name} = {getattr(self, name)!r} is invalid; must be {allowed}")


def finetune_config(train: TrainConfig, epochs: int, lr_factor: float = 0.1) -> TrainConfig:
    """Fine-tuning after pruning: by default a tenth of the training learning rate."""
    return dataclasses.replace(train, epochs=epochs, lr=train.lr * lr_factor)


@dataclass
class TrainHistory:
    """Mean training loss per epoch, steps taken and wall time."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def train(
    model: nn.Module,
    loader: Iterable[Any],
    config: TrainConfig,
    *,
    on_step: Callable[[int], object] | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> TrainHistory:
    """Train ``model`` on ``(inputs, labels)`` batches for ``config.epochs`` epochs.

    ``on_step(step)`` runs after every optimizer step (call ``pruner.step()`` there),
    ``on_epoch_end(epoch, mean_loss)`` after every epoch, ``progress(done, total)`` for bars.
    """
    torch.manual_seed(config.seed)
    if loss_fn is None:

        def loss_fn(out: Tensor, y: Tensor) -> Tensor:
            return nn.functional.cross_entropy(out, y, label_smoothing=config.label_smoothing)

    optimizer = make_optimizer(model, config)
    steps_per_epoch = len(loader)  # type: ignore[arg-type]
    total = config.epochs * steps_per_epoch
    history = TrainHistory()
    start = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        for epoch in range(config.epochs):
            running, batches = 0.0, 0
            for inputs, labels in loader:
                if config.cosine and total:
                    lr = config.lr * 0.5 * (1 + math.cos(math.pi * history.steps / total))
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                loss = loss_fn(model(inputs), labels)
                if not torch.isfinite(loss):
                    raise ConfigError(
                        f"training diverged (loss {loss.item()}) at epoch {epoch}, step "
                        f"{history.steps}; lower the learning rate ({config.lr})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history.steps += 1
                running += float(loss.detach())
                batches += 1
                if on_step is not None:
                    on_step(history.steps)
                if progress is not None:
                    progress(history.steps, total)
            history.losses.append(running / max(batches, 1))
            if on_epoch_end is not None:
                on_epoch_end(epoch, history.losses[-1])
    finally:
        model.train(was_training)
    history.seconds = time.perf_counter() - start
    return history
