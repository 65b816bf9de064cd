"""Outlier-weighted layerwise sparsity (OWL, Yin et al. 2024).

LLM layers differ in how many *outlier* features they carry: weights whose Wanda score
``|W_ij| * ||X_j||`` is far above the layer's mean. Pruning every layer to the same sparsity
removes a share of those from the layers that rely on them most. OWL gives each layer (a
transformer block: every weight inside it together) a density that grows with its outlier
ratio ``D_l`` (the fraction of its scores above ``m`` times their mean): the ratios are scaled
to ``[0, 2 * lam]``, centred so that the mean density is the target's, so sparsities stay
within ``lam`` of the target. Uniform allocation is ``lam = 0``.

The allocation needs the scores before it can split the budget: the pruner computes Wanda
scores on the calibration data (from the dense model's activations, in one pass) and calls
:meth:`OWL.fit`; :meth:`OWL.pools` then gives every tensor its layer's sparsity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from secateurs.allocation.base import ALLOCATIONS, Allocation, Pool
from secateurs.errors import ConfigError
from secateurs.targets import Target


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """The fraction of ``scores`` (all of a layer's, together) above ``m`` times their mean."""
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    if flat.numel() == 0:
        return 0.0
    return float((flat > m * flat.mean()).float().mean())


@ALLOCATIONS.register("owl")
@dataclass
class OWL(Allocation):
    """OWL: per-layer sparsity from each layer's share of outlier Wanda scores (see module).

    ``m``: the outlier threshold as a multiple of the layer's mean score (the paper's M, 5);
    ``lam``: how far a layer's sparsity may move from the target (the paper's lambda, 0.08).
    Works with the layer-wise criteria (``wanda``, ``sparsegpt``); the layers are the model's
    repeated blocks when it has them, else each tensor.
    """

    #: The pruner must compute scores and call :meth:`fit` before :meth:`pools`.
    needs_scores: ClassVar[bool] = True

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, (int, float)) or self.m <= 0:
            raise ConfigError(
                f"owl m (outlier threshold, times the mean) must be > 0; got {self.m!r}"
            )
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)):
            raise ConfigError(f"owl lam must be a number in [0, 0.5); got {self.lam!r}")
        if not 0 <= self.lam < 0.5:
            raise ConfigError(f"owl lam must be a number in [0, 0.5); got {self.lam!r}")
        self.layers_: dict[str, str] = {}
        self.ratios_: dict[str, float] = {}

    def fit(self, scores: Mapping[str, Tensor], layer_of: Mapping[str, str]) -> OWL:
        """Measure each layer's outlier ratio: ``scores`` by tensor name, ``layer_of`` maps a
        tensor to its layer (its block). Returns ``self``."""
        by_layer: dict[str, list[Tensor]] = {}
        for name, s in scores.items():
            by_layer.setdefault(layer_of[name], []).append(s)
        self.layers_ = dict(layer_of)
        self.ratios_ = {layer: outlier_ratio(s, self.m) for layer, s in by_layer.items()}
        return self

    def layer_sparsities(self, sizes: Mapping[str, int], sparsity: float) -> dict[str, float]:
        """Each layer's sparsity for an overall ``sparsity``: ratios scaled to ``[0, 2 lam]``,
        centred on the target density (weighted by the layers' ``sizes``), clipped to [0, 1)."""
        if not self.ratios_:
            raise ConfigError(
                "owl needs the layers' outlier ratios first: prune with a layer-wise criterion "
                "(wanda, sparsegpt) and data=, which computes them (OWL.fit)"
            )
        layers = list(self.ratios_)
        ratio = torch.tensor([self.ratios_[k] for k in layers], dtype=torch.float64)
        span = float(ratio.max() - ratio.min())
        scaled = (ratio - ratio.min()) / span * (2 * self.lam) if span > 0 else ratio * 0
        weight = torch.tensor([float(sizes[k]) for k in layers], dtype=torch.float64)
        density = scaled - float((scaled * weight).sum() / weight.sum()) + (1.0 - sparsity)
        return {
            k: min(max(1.0 - float(d), 0.0), 1.0 - 1e-6)
            for k, d in zip(layers, density, strict=True)
        }

    def pools(self, targets: Sequence[Target], sparsity: float) -> list[Pool]:
        sizes: dict[str, int] = {}
        for t in targets:
            if t.name not in self.layers_:
                raise ConfigError(f"owl was fitted without {t.name}; fit it on these targets")
            layer = self.layers_[t.name]
            sizes[layer] = sizes.get(layer, 0) + t.numel
        per_layer = self.layer_sparsities(sizes, sparsity)
        return [Pool((i,), per_layer[self.layers_[t.name]]) for i, t in enumerate(targets)]
