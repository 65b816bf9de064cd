"""Assertions shared by several test modules."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import secateurs as sc


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, state: dict[str, Tensor]) -> None:
    """The model has no masks and exactly the state it had when ``state`` was taken."""
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def shrunk(model: nn.Module, example: Any, **options: Any) -> tuple[nn.Module, sc.ShrinkReport]:
    """``sc.shrink`` and the report it records on the smaller model."""
    small = sc.shrink(model, example, **options)
    return small, sc.report_of(small, sc.ShrinkReport)
