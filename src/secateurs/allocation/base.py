"""Allocation: how much of its tensor each layer gives up.

An allocation splits the targets into *pools*; each pool is pruned to its own sparsity with one
threshold over its groups. Uniform makes every layer its own pool at the same sparsity, Global
puts every layer in one pool (one threshold across layers), LAMP is Global over layer-normalised
scores, and LayerMap gives each layer the sparsity of the first regex that matches its name.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from secateurs.checks import check_sparsity
from secateurs.errors import ConfigError
from secateurs.registry import Registry
from secateurs.structures import NEG_INF, GroupScores
from secateurs.targets import Target

ALLOCATIONS: Registry[Allocation] = Registry("allocation")


@dataclass(frozen=True)
class Pool:
    """Targets (by index) pruned together to one sparsity."""

    members: tuple[int, ...]
    sparsity: float


class Allocation(ABC):
    """Base class: partition targets into pools and (optionally) rescale group scores."""

    registry_name: ClassVar[str]

    @abstractmethod
    def pools(self, targets: Sequence[Target], sparsity: float) -> list[Pool]:
        """Split ``targets`` into pools for an overall ``sparsity``."""

    def transform(self, groups: GroupScores) -> GroupScores:
        """Rescale one layer's group scores before they are compared (identity by default)."""
        return groups


@ALLOCATIONS.register("uniform")
@dataclass
class Uniform(Allocation):
    """Every layer loses the same fraction of its weights."""

    def pools(self, targets: Sequence[Target], sparsity: float) -> list[Pool]:
        return [Pool((i,), sparsity) for i in range(len(targets))]


@ALLOCATIONS.register("global")
@dataclass
class Global(Allocation):
    """One threshold across all layers: the lowest scores anywhere go first.

    A strong baseline (Blalock et al. 2020; Hoefler et al. 2021), but it can empty a layer
    whose scores are small on the whole; LAMP corrects for that.
    """

    def pools(self, targets: Sequence[Target], sparsity: float) -> list[Pool]:
        return [Pool(tuple(range(len(targets))), sparsity)]


@ALLOCATIONS.register("lamp")
@dataclass
class LAMP(Global):
    """Layer-Adaptive Magnitude-based Pruning (Lee et al. 2021).

    Each layer's score ``s_u`` becomes ``s_u^2 / sum_{v >= u} s_v^2`` (sum over the layer's
    scores not smaller than ``s_u``) before one global threshold. With magnitude scores this is
    the paper's LAMP: every layer keeps its largest weight, and layer-wise sparsities follow
    from the weights instead of from their scale.
    """

    def transform(self, groups: GroupScores) -> GroupScores:
        s = groups.scores
        finite = torch.isfinite(s)
        values = s[finite].to(torch.float64).square()
        order = torch.argsort(values, stable=True)
        sorted_sq = values[order]
        suffix = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
        lamp_sorted = sorted_sq / suffix.clamp_min(torch.finfo(torch.float64).tiny)
        lamp = torch.empty_like(values)
        lamp[order] = lamp_sorted
        out = torch.full_like(s, NEG_INF)
        out[finite] = lamp.to(torch.float32)
        return GroupScores(out, groups.sizes)


@ALLOCATIONS.register("layer_map")
@dataclass
class LayerMap(Allocation):
    """Explicit per-layer sparsities: ``{regex: sparsity}``, first match wins, else ``default``.

    Regexes are matched (``re.fullmatch``) against the module name and the tensor name. When
    ``default`` is None the overall sparsity given to the pruner is the default. Every pattern
    must match at least one layer.
    """

    ratios: Mapping[str, float] = field(default_factory=dict)
    default: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ratios, Mapping):
            raise ConfigError(
                f"LayerMap ratios must be a mapping regex -> sparsity; got {self.ratios!r}"
            )
        for pattern, value in self.ratios.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(
                    f"LayerMap pattern {pattern!r} is not a valid regex: {exc}"
                ) from None
            check_sparsity(value, f"LayerMap sparsity for {pattern!r}")
        if self.default is not None:
            check_sparsity(self.default, "LayerMap default")

    def pools(self, targets: Sequence[Target], sparsity: float) -> list[Pool]:
        default = sparsity if self.default is None else self.default
        used: set[str] = set()
        pools = []
        for i, t in enumerate(targets):
            value = default
            for pattern, ratio in self.ratios.items():
                if re.fullmatch(pattern, t.module_name) or re.fullmatch(pattern, t.name):
                    value = ratio
                    used.add(pattern)
                    break
            pools.append(Pool((i,), value))
        unused = [p for p in self.ratios if p not in used]
        if unused:
            names = ", ".join(t.module_name for t in targets[:8])
            raise ConfigError(
                f"LayerMap pattern(s) {', '.join(map(repr, unused))} match no prunable layer; "
                f"layers are: {names}{', ...' if len(targets) > 8 else ''}"
            )
        return pools
