"""Shared small models for the test suite (kept tiny: the whole suite runs on 2 shared cores)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
