"""Deterministic corruptions of image batches, to measure what pruning costs in robustness.

After Hendrycks & Dietterich's ImageNet-C / CIFAR-10-C, in pure torch: Gaussian noise, blur,
contrast, brightness and pixelation (block averaging), each at severities 1 (mild) to 5 (strong). Inputs are
``(N, C, H, W)`` float batches in any value range (data sets here are normalised with the
training mean and standard deviation): each batch is mapped to [0, 1] using the range of the
clean batch, corrupted there, clipped and mapped back, so the output has the input's shape,
dtype and value range. The same batch, corruption, severity and seed always give the same
tensor, on any machine, without touching the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from secateurs.errors import ConfigError
from secateurs.registry import Registry

#: Severities every corruption accepts.
SEVERITIES = (1, 2, 3, 4, 5)

Corruption = Callable[[Tensor, int, torch.Generator], Tensor]

#: Corruptions by name; each maps a batch in [0, 1] to a batch in [0, 1].
CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def _level(values: tuple[float, ...], severity: int) -> float:
    return values[severity - 1]


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Additive white noise, standard deviation 0.08 to 0.38 of the value range."""
    sigma = _level((0.08, 0.12, 0.18, 0.26, 0.38), severity)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x + sigma * noise


def _gaussian_kernel(sigma: float, dtype: torch.dtype) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


@CORRUPTIONS.register("blur")
def blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Gaussian blur (separable, reflect padding), sigma 0.5 to 2.0 pixels."""
    sigma = _level((0.5, 0.75, 1.0, 1.5, 2.0), severity)
    k = _gaussian_kernel(sigma, x.dtype)
    channels, radius = x.shape[1], (len(k) - 1) // 2
    pad_h, pad_w = min(radius, x.shape[2] - 1), min(radius, x.shape[3] - 1)
    out = x
    if pad_w:
        kw = k[radius - pad_w : radius + pad_w + 1]
        kw = (kw / kw.sum()).view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
        out = F.conv2d(F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect"), kw, groups=channels)
    if pad_h:
        kh = k[radius - pad_h : radius + pad_h + 1]
        kh = (kh / kh.sum()).view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
        out = F.conv2d(F.pad(out, (0, 0, pad_h, pad_h), mode="reflect"), kh, groups=channels)
    return out


@CORRUPTIONS.register("contrast")
def contrast(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Contrast reduced towards each image's mean, to 75% down to 15%."""
    factor = _level((0.75, 0.5, 0.4, 0.3, 0.15), severity)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


@CORRUPTIONS.register("brightness")
def brightness(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Every pixel brighter by 0.1 to 0.5 of the value range (clipped at white)."""
    return x + _level((0.1, 0.2, 0.3, 0.4, 0.5), severity)


@CORRUPTIONS.register("pixelate")
def pixelate(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Each 2x2 to 6x6 block of pixels replaced by its mean (edges padded by replication).

    Integer blocks keep the effect monotone in severity; a fractional resize would alias.
    """
    k = int(_level((2, 3, 4, 5, 6), severity))
    h, w = x.shape[2], x.shape[3]
    padded = F.pad(x, (0, (-w) % k, 0, (-h) % k), mode="replicate")
    blocks = F.avg_pool2d(padded, k)
    return blocks.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)[:, :, :h, :w]


def corrupt(x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """``x`` (``(N, C, H, W)``, float) corrupted by ``name`` at ``severity`` (1..5).

    The result has ``x``'s shape, dtype and value range (``[x.min(), x.max()]``); random
    corruptions draw from a private generator seeded with ``seed``.
    """
    fn: Corruption = CORRUPTIONS.get(name)  # type: ignore[assignment]
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ConfigError(
            f"severity {severity!r} is invalid; allowed: {', '.join(map(str, SEVERITIES))}"
        )
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ConfigError(
            "corruptions take a float image batch of shape (N, C, H, W); got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    source = x.detach().cpu()
    lo, hi = float(source.min()), float(source.max())
    span = hi - lo if hi > lo else 1.0
    unit = (source - lo) / span
    generator = torch.Generator().manual_seed(seed)
    out = fn(unit, severity, generator).clamp(0.0, 1.0)
    return (out * span + lo).to(device=x.device, dtype=x.dtype)
