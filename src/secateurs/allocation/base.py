"""Allocation: how much of its tensor each layer gives up.

An allocation splits the targets into *pools*; each pool is pruned to its own sparsity with one
threshold over its groups. Uniform makes every layer its own pool at the same sparsity, Global
puts every layer in one pool (one threshold across layers), LAMP is Global over layer-normalised
scores, and LayerMap gives each layer the sparsity of the first regex that matches its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from secateurs.checks import check_sparsity
from secateurs.errors import ConfigError
from secateurs.registry import Registry
from secateurs.selection import check_patterns, first_match, preview
from secateurs.structures import NEG_INF, GroupScores
from secateurs.targets import Target


@dataclass(frozen=True)
class Pool:
    """Targets (by index) pruned together to one sparsity."""

    members: tuple[int, ...]
    sparsity: float


class Allocation(ABC):
    """Base class: partition targets into pools and (optionally) rescale group scores."""

    registry_name: ClassVar[str]
    #: True when the allocation must see importance scores first (:class:`~secateurs.allocation
    #: .owl.OWL`: its ``fit`` is called before ``pools``).
    needs_scores: ClassVar[bool] = False

    @abstractmethod
    def pools(self, targets: Sequence[Target], sparsity: float) -> list[Pool]:
        """Split ``targets`` into pools for an overall ``sparsity``."""

    def fit(self, scores: Mapping[str, Tensor], layer_of: Mapping[str, str]) -> Allocation:
        """See the targets' importance ``scores`` (by tensor name; ``layer_of`` maps a tensor to
        its layer) before :meth:`pools`; only allocations that :attr:`needs_scores` use it."""
        return self

    def transform(self, groups: GroupScores) -> GroupScores:
        """Rescale one layer's group scores before they are compared (identity by default)."""
        return groups


ALLOCATIONS: Registry[Allocation] = Registry("allocation", Allocation)


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

    def fit(self, scores: Mapping[str, Tensor], layer_of: Mapping[str, str]) -> Allocation:
        """See the targets' importance ``scores`` (by tensor name; ``layer_of`` maps a tensor to
        its layer) before :meth:`pools`; only allocations that :attr:`needs_scores` use it."""
        return self

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
@dataclass(eq=False)
class LayerMap(Allocation, Mapping[str, float]):
    """Explicit per-layer amounts: ``{layer name or regex: sparsity}``, else ``default``.

    The one per-layer map of secateurs: masks prune each tensor to its entry
    (``sc.prune_(model, allocation=LayerMap(...))``), :func:`secateurs.shrink` removes that
    fraction of each channel group's channels (groups are named by the layer producing them),
    and the searches of :mod:`secateurs.search` return one (``SearchResult.ratios``) that
    works for both. A layer takes the entry keyed by its exact name (module or tensor name);
    otherwise the first key that matches it as a regular expression (``re.fullmatch``);
    otherwise ``default``. For masks, ``default=None`` means the overall sparsity given to the
    pruner; for channels, no entry means no channel removed. Every key must match a layer.

    It reads as a mapping of its entries (``m["conv1"]``, ``dict(m)``) and equals a plain
    mapping with the same entries when its ``default`` is ``None`` or 0.
    """

    ratios: Mapping[str, float] = field(default_factory=dict)
    default: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ratios, Mapping):
            raise ConfigError(
                f"LayerMap ratios must be a mapping of layer name or regex -> sparsity; got "
                f"{self.ratios!r}"
            )
        check_patterns(self.ratios, "LayerMap")
        self.ratios = {
            k: check_sparsity(v, f"LayerMap sparsity for {k!r}") for k, v in self.ratios.items()
        }
        if self.default is not None:
            self.default = check_sparsity(self.default, "LayerMap default")

    # -- as a mapping ----------------------------------------------------------------------
    def __getitem__(self, key: str) -> float:
        return self.ratios[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ratios)

    def __len__(self) -> int:
        return len(self.ratios)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LayerMap):
            return dict(self.ratios) == dict(other.ratios) and self.default == other.default
        if isinstance(other, Mapping):
            return self.default in (None, 0.0) and dict(self.ratios) == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    # -- lookup ----------------------------------------------------------------------------
    def entry(self, *names: str) -> tuple[str, float] | None:
        """``(key, value)`` of the entry for a layer known by ``names``, or None."""
        return first_match(self.ratios, *names)

    def value(self, *names: str, default: float) -> float:
        """The amount for a layer known by ``names`` (``default`` when no entry and no
        ``self.default``)."""
        found = self.entry(*names)
        if found is not None:
            return found[1]
        return default if self.default is None else self.default

    def check_keys(self, layers: Sequence[Sequence[str]], what: str) -> None:
        """Every key names one of ``layers`` (each known by one or more names)."""
        for key in self.ratios:
            if not any(first_match({key: 0.0}, *names) for names in layers):
                shown = [names[0] for names in layers]
                raise ConfigError(
                    f"LayerMap key {key!r} matches no {what}; {what}s: {preview(shown)}"
                )

    def pools(self, targets: Sequence[Target], sparsity: float) -> list[Pool]:
        layers = [(t.module_name, t.name) for t in targets]
        self.check_keys(layers, "prunable layer")
        return [Pool((i,), self.value(*names, default=sparsity)) for i, names in enumerate(layers)]

    def mean_sparsity(self, targets: Sequence[Target]) -> float | None:
        """The overall sparsity this map gives ``targets`` (None when it depends on the
        pruner's sparsity: no ``default`` and a layer without an entry)."""
        total = kept = 0.0
        for t in targets:
            found = self.entry(t.module_name, t.name)
            if found is None and self.default is None:
                return None
            ratio = found[1] if found is not None else self.default
            assert ratio is not None
            total += t.numel
            kept += ratio * t.numel
        return kept / total if total else 0.0
