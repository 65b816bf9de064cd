"""Shared small models for the test suite (kept tiny: the whole suite runs on 2 shared cores)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn


def make_mlp(seed: int = 0) -> nn.Sequential:
    """Linear(16, 32) -> ReLU -> Linear(32, 8); ``seed`` fixes the initial weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test on one intra-op thread (timings and searches comparable across loads), then
    put the previous thread count back. Use with ``pytestmark = pytest.mark.usefixtures``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyCNN(nn.Module):
    """Conv -> BN -> ReLU -> grouped Conv -> Linear, on 3x4x4 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def make_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN()


@pytest.fixture
def mlp() -> nn.Sequential:
    return make_mlp()


@pytest.fixture
def cnn() -> TinyCNN:
    return make_cnn()


@pytest.fixture
def mlp_factory() -> Callable[[int], nn.Sequential]:
    """``mlp_factory(seed)``: identically initialised MLPs for the same seed."""
    return make_mlp


@pytest.fixture
def cnn_factory() -> Callable[[int], TinyCNN]:
    return make_cnn


def make_convnet(seed: int = 0) -> nn.Sequential:
    """Conv(3, 16) -> BN -> ReLU -> Conv(16, 24) -> BN -> ReLU -> pool -> Linear(24, 4): two
    prunable convolutions for the channel searches."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 4),
    )


def self_labelled(
    model: nn.Module, x: torch.Tensor, n: int = 3
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` calibration batches of 32 random inputs shaped like ``x``, labelled by ``model``
    itself (so the dense model's accuracy on them is 1)."""
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        model.eval()
        for _ in range(n):
            xb = torch.randn(32, *x.shape[1:], generator=g)
            out.append((xb, model(xb).argmax(1)))
    return out


def tiny_grid(**overrides: Any) -> dict[str, Any]:
    """A benchmark grid small enough for a test: LeNet-300-100 on a small synthetic set, one
    seed, two methods at two sparsities, cheap evaluation; ``overrides`` replace top keys."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "seeds": [0],
        "models": ["lenet-300-100"],
        "datasets": [{"name": "synthetic", "options": {"n_train": 256, "n_test": 128}}],
        "methods": ["global_magnitude", "random"],
        "budgets": {"sparsity": [0.8, 0.95]},
        "train": {"epochs": 2, "batch_size": 64},
        "finetune": {"epochs": 1},
        "evaluate": {
            "latency": False,
            "export": False,
            "robustness": {"corruptions": ["gaussian_noise"], "severities": [1, 5], "limit": 64},
        },
    }
    raw.update(overrides)
    return raw
