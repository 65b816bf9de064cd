"""Running a model: the helpers every part of secateurs uses to call a model on inputs.

A model is called with one tensor, positional tensors (a tuple or list) or keyword tensors
(a mapping); :func:`call` does that, :func:`run_example` does it once in eval mode without
gradients and turns a failure into a :class:`~secateurs.ModelError` that names the inputs.
:class:`EvalMode` puts a model in eval mode and gives each module its own mode back, and
:func:`device_of` / :func:`to_device` move batches to where the model lives. Nothing here
measures anything (that is :mod:`secateurs.metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.errors import ConfigError, DataError, ModelError, SecateursError

#: What a model is called with: one tensor, positional tensors, or keyword tensors.
Inputs = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]

DEFAULT_HINT = "a batch of one real example is enough"


def call(model: nn.Module, inputs: Inputs) -> Any:
    """Run ``model`` on inputs given as a tensor, a tuple/list (positional) or a mapping."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    raise ConfigError(
        f"example_inputs must be a Tensor, a tuple of tensors or a mapping of keyword tensors; "
        f"got {type(inputs).__name__}"
    )


def forward_error(
    model: nn.Module, inputs: Inputs, exc: Exception, hint: str = DEFAULT_HINT
) -> ModelError:
    """The error to raise when ``model`` fails on ``inputs``: what was given, what to pass."""
    shapes = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
    return ModelError(
        f"{type(model).__name__} failed on the example inputs ({shapes}): {exc}. Pass inputs "
        f"the model accepts, on the model's device ({hint})."
    )


class EvalMode:
    """Put every module in eval mode and restore each module's own mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


def run_example(model: nn.Module, example_inputs: Inputs, hint: str = DEFAULT_HINT) -> Any:
    """Run ``model`` once on ``example_inputs`` in eval mode without gradients (each module's
    mode restored after); a failure is a :class:`ModelError` naming the inputs and ``hint``."""
    with EvalMode(model), torch.no_grad():
        try:
            return call(model, example_inputs)
        except SecateursError:
            raise
        except Exception as exc:
            raise forward_error(model, example_inputs, exc, hint) from exc


def first_tensor(inputs: Inputs) -> Tensor | None:
    """The first tensor among ``inputs`` (the one whose batch size and device count)."""
    if isinstance(inputs, Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return next((v for v in values if isinstance(v, Tensor)), None)


def device_of(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a model without any)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


def to_device(x: Any, device: torch.device | None) -> Any:
    """``x`` (a tensor, or tuples, lists and mappings of them) moved to ``device``."""
    if device is None:
        return x
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def split_batch(batch: Any, who: str = "calibration") -> tuple[Any, Any]:
    """``(inputs, labels)`` of a batch, or a :class:`DataError` saying what a batch must be."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataError(
        f"{who} batches must be (inputs, labels) pairs as a DataLoader over a "
        f"TensorDataset yields; got {type(batch).__name__}"
    )
