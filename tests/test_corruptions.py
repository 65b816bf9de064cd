"""Deterministic image corruptions used by the benchmark's robustness measurement."""

from __future__ import annotations

import itertools

import pytest
import torch

from secateurs.bench import CORRUPTIONS, SEVERITIES, corrupt
from secateurs.errors import ConfigError

NAMES = ["gaussian_noise", "blur", "contrast", "brightness", "pixelate"]


def images(n: int = 8, channels: int = 1, size: int = 28) -> torch.Tensor:
    """Smooth, normalised-looking images (like real ones: neighbouring pixels correlate)."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, channels, 7, 7, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return (x - 0.3) / 0.45


def test_all_five_are_registered() -> None:
    assert sorted(CORRUPTIONS.names()) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_range_are_preserved(name: str) -> None:
    x = images(channels=3)
    for severity in SEVERITIES:
        y = corrupt(x, name, severity)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= float(x.min()) - 1e-5
        assert float(y.max()) <= float(x.max()) + 1e-5
        assert not torch.equal(y, x)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_global_rng_untouched(name: str) -> None:
    x = images()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(corrupt(x, name, 3, seed=5), corrupt(x, name, 3, seed=5))
    assert torch.equal(torch.get_rng_state(), state)
    if name == "gaussian_noise":
        assert not torch.equal(corrupt(x, name, 3, seed=5), corrupt(x, name, 3, seed=6))


@pytest.mark.parametrize("name", NAMES)
def test_severity_is_monotone_in_its_effect(name: str) -> None:
    x = images(n=16)
    change = [float((corrupt(x, name, s) - x).abs().mean()) for s in SEVERITIES]
    assert all(a < b for a, b in itertools.pairwise(change)), change


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown corruption 'fog'.*blur"):
        corrupt(images(), "fog", 1)
    with pytest.raises(ConfigError, match="severity 6 is invalid; allowed: 1, 2, 3, 4, 5"):
        corrupt(images(), "blur", 6)
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        corrupt(torch.zeros(28, 28), "blur", 1)
