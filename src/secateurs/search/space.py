"""The layers an automatic allocation gives ratios to, and what a ratio map costs and does.

Sensitivity analysis, AMC and NetAdapt all search over *ratio maps*: for each prunable layer,
the fraction of it to remove. They need three things from the model, and a :class:`LayerSpace`
gives them, the same way for element masks (:class:`ElementSpace`) and for removed channels
(:class:`ChannelSpace`):

* the layers, with what a search agent may look at (:class:`Layer`: type, widths, kernel,
  stride, parameters, MACs);
* the budget's quantity for any ratio map, counted without evaluating the model
  (:meth:`LayerSpace.measure`), so a search can bisect or clamp for free;
* the model pruned by a ratio map, temporarily (:meth:`LayerSpace.applied`, restored on exit
  even when the evaluation raises) and for good (:meth:`LayerSpace.realize`).

A ratio map found on a space feeds the usual machinery: element maps become a
:class:`~secateurs.LayerMap` allocation, channel maps the ``allocation=`` of
:func:`secateurs.shrink`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.allocation.base import LayerMap, Uniform
from secateurs.budgets import Budget, Bytes, Latency, MACs, Params, Sparsity
from secateurs.calibration import LossFn, calibrate
from secateurs.errors import BudgetError, ConfigError
from secateurs.graph.surgery import apply_plan_, mask_plan_, plan_from_removed
from secateurs.metrics import csr_size, profile
from secateurs.pruner import PruneConfig, Pruner, compute_masks
from secateurs.registry import config_of
from secateurs.running import Inputs
from secateurs.shrink import ShrinkConfig, _removal, by_name, channel_candidates, channel_measure
from secateurs.structures import NM
from secateurs.targets import find_targets

RatioMap = dict[str, float]

#: The most of one layer's weights an element search may remove (see :class:`ElementSpace`).
MAX_ELEMENT_RATIO = 0.99


@dataclass(frozen=True)
class Layer:
    """One prunable layer as a search sees it (AMC's layer embedding is built from this)."""

    name: str  #: tensor name (elements) or the name of the layer producing the channels
    kind: str  #: module type, e.g. ``Conv2d``
    in_channels: int
    out_channels: int
    kernel: int  #: kernel height * width (1 for linear layers)
    stride: int
    params: int  #: parameters that leave with the whole layer
    macs: int  #: MACs that leave with the whole layer
    size: int  #: how many units the ratio applies to (elements or channels)
    max_ratio: float  #: the largest fraction that may go


class LayerSpace(ABC):
    """Base class: the searchable layers of one model and how ratio maps act on it."""

    model: nn.Module
    layers: list[Layer]
    #: budget types this space can count
    budgets: tuple[type[Budget], ...]

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @abstractmethod
    def measure(self, budget: Budget, ratios: Mapping[str, float]) -> float:
        """The budget's quantity (bytes, MACs, ...) after pruning by ``ratios``."""

    @abstractmethod
    def limit(self, budget: Budget) -> float:
        """The largest quantity that meets ``budget``."""

    @abstractmethod
    def unit(self, budget: Budget) -> str:
        """What :meth:`measure` counts, for messages."""

    @abstractmethod
    @contextmanager
    def applied(self, ratios: Mapping[str, float]) -> Iterator[nn.Module]:
        """The model pruned by ``ratios`` (zeros, the masked equivalent) until the block ends."""

    @abstractmethod
    def realize(self, ratios: Mapping[str, float]) -> nn.Module:
        """A pruned copy of the model that can be trained (masks kept / channels removed)."""

    def check(self, budget: Budget) -> None:
        """Refuse a budget this space cannot count, or one no ratio map can meet."""
        if not isinstance(budget, self.budgets):
            allowed = ", ".join(f"sc.{b.__name__}" for b in self.budgets)
            raise ConfigError(
                f"a {type(budget).__name__} budget cannot be met by {self.description}; "
                f"allowed: {allowed}"
            )
        floor = self.measure(budget, self.max_ratios())
        if floor > self.limit(budget) * (1 + 1e-9):
            raise BudgetError(
                f"no ratio map meets {budget}: the budget allows {self.limit(budget):,.4g} "
                f"{self.unit(budget)}, and pruning every layer as far as allowed (max_ratio) "
                f"leaves {floor:,.4g}. The smallest reachable value is {floor:,.4g} "
                f"{self.unit(budget)}."
            )

    def max_ratios(self) -> RatioMap:
        return {layer.name: layer.max_ratio for layer in self.layers}

    def clean(self, ratios: Mapping[str, float]) -> RatioMap:
        """``ratios`` for every layer (missing ones 0), clipped to each layer's range."""
        unknown = sorted(set(ratios) - set(self.names))
        if unknown:
            raise ConfigError(
                f"ratio map names unknown layer(s) {unknown[:5]}; layers are {self.names[:8]}"
            )
        return {
            layer.name: min(max(float(ratios.get(layer.name, 0.0)), 0.0), layer.max_ratio)
            for layer in self.layers
        }

    def layer_map(self, ratios: Mapping[str, float]) -> LayerMap:
        """``ratios`` as the allocation that prunes each layer to its ratio (by exact name; a
        layer it does not name loses nothing): what ``prune_`` and ``shrink`` take."""
        return LayerMap(self.clean(ratios), default=0.0)

    @property
    def description(self) -> str:
        return type(self).__name__

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of every parameter and buffer, to put the model back after a failed search."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self, state: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(state[k])


# --------------------------------------------------------------------------- elements


def _geometry(module: nn.Module, weight: Tensor) -> tuple[int, int, int, int]:
    """(in, out, kernel area, stride) of a weight, for the layer embedding."""
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        return module.in_channels, module.out_channels, kernel, int(module.stride[0])
    if weight.dim() >= 2:
        return int(weight.shape[1]), int(weight.shape[0]), 1, 1
    return int(weight.numel()), 1, 1, 1


class ElementSpace(LayerSpace):
    """Ratio maps over element (or block) masks: each target tensor is one layer.

    The plan is a :class:`~secateurs.pruner.PruneConfig` (``config=`` or its keywords):
    its ``structure`` (any mask structure but N:M, whose ratio the pattern fixes),
    ``criterion`` (how one layer's weights are ranked; data-driven ones are calibrated once
    on ``data``), ``include`` / ``exclude`` and ``seed``. A layer may lose at most
    ``max_ratio`` of its weights (0.99 by default, where ``shrink`` keeps a tenth of a
    layer's channels: a masked layer keeps every connection path). The budget counts: sparsity
    over the targets, parameters (nonzeros), or bytes (each tensor the cheaper of dense and
    CSR).
    """

    budgets = (Sparsity, Params, Bytes)

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs | None = None,
        config: PruneConfig | None = None,
        *,
        max_ratio: float = MAX_ELEMENT_RATIO,
        data: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        **options: Any,
    ) -> None:
        self.model = model
        self.config = config = config_of(PruneConfig, config, options, "the element space")
        self.structure = config.structure_
        if isinstance(self.structure, NM):
            raise ConfigError(
                "N:M structures fix every layer's ratio at 1 - n/m; there is no per-layer ratio "
                "to search. Use structure 'elements', 'blocks' or 'channels'"
            )
        self.criterion = config.criterion_
        if isinstance(max_ratio, bool) or not isinstance(max_ratio, float | int):
            raise ConfigError(f"max_ratio must be a number in (0, 1); got {max_ratio!r}")
        if not 0 < max_ratio < 1:
            raise ConfigError(f"max_ratio must be in (0, 1); got {max_ratio!r}")
        self.targets = find_targets(model, config.include, config.exclude, config.params)
        self.seed = config.seed
        self.stats = None
        if self.criterion.needs_data:
            if data is None:
                raise ConfigError(f"criterion {self.criterion.registry_name!r} needs data=")
            self.stats = calibrate(
                model, self.targets, self.criterion, data, loss_fn, config.calibration_batches
            )
        per_layer = _layer_costs(model, example_inputs)
        self._by_name = {t.name: t for t in self.targets}
        self.layers = []
        for t in self.targets:
            in_c, out_c, kernel, stride = _geometry(t.module, t.raw)
            macs = per_layer.get(t.module_name, 0)
            self.layers.append(
                Layer(
                    t.name,
                    type(t.module).__name__,
                    in_c,
                    out_c,
                    kernel,
                    stride,
                    t.numel,
                    macs,
                    t.numel,
                    max_ratio,
                )
            )
        self._numel = {t.name: t.numel for t in self.targets}
        self._itemsize = {t.name: t.raw.element_size() for t in self.targets}
        self._rows = {t.name: int(t.shape[0]) if t.raw.dim() else 1 for t in self.targets}
        distinct = {id(p): p for p in model.parameters()}.values()
        in_targets = {id(t.raw) for t in self.targets}
        self._fixed_params = sum(p.numel() for p in distinct if id(p) not in in_targets)
        self._fixed_bytes = sum(
            p.numel() * p.element_size() for p in distinct if id(p) not in in_targets
        )
        self._masks: dict[tuple[str, int], Tensor] = {}

    @property
    def description(self) -> str:
        return f"element masks ({type(self.structure).__name__})"

    def _removed(self, name: str, ratio: float) -> int:
        return round(ratio * self._numel[name])

    def measure(self, budget: Budget, ratios: Mapping[str, float]) -> float:
        r = self.clean(ratios)
        kept = {n: self._numel[n] - self._removed(n, r[n]) for n in self._numel}
        if isinstance(budget, Sparsity):
            return sum(kept.values()) / sum(self._numel.values())
        if isinstance(budget, Params):
            return float(self._fixed_params + sum(kept.values()))
        if isinstance(budget, Bytes):
            total = self._fixed_bytes
            for n, k in kept.items():
                item = self._itemsize[n]
                total += min(self._numel[n] * item, csr_size(k, self._rows[n], item))
            return float(total)
        raise ConfigError(f"{self.description} cannot count a {type(budget).__name__} budget")

    def limit(self, budget: Budget) -> float:
        if isinstance(budget, Sparsity):
            return 1.0 - budget.value
        dense = self.measure(budget, {}) if isinstance(budget, Params) else self._dense_bytes()
        assert isinstance(budget, (Params, Bytes))
        return float(budget.limit(round(dense)))

    def _dense_bytes(self) -> float:
        return float(
            self._fixed_bytes + sum(self._numel[n] * self._itemsize[n] for n in self._numel)
        )

    def unit(self, budget: Budget) -> str:
        return {Sparsity: "of the weights kept", Params: "parameters", Bytes: "bytes"}[type(budget)]

    def mask(self, name: str, ratio: float) -> Tensor:
        """The keep-mask of layer ``name`` at ``ratio`` (cached: a scan asks for it often)."""
        key = (name, self._removed(name, ratio))
        if key not in self._masks:
            t = self._by_name[name]
            stats = None if self.stats is None else {name: self.stats[name]}
            masks = compute_masks(
                [t],
                ratio,
                structure=self.structure,
                criterion=self.criterion,
                allocation=Uniform(),
                stats=stats,
                seed=self.seed,
            )
            self._masks[key] = masks[name]
        return self._masks[key]

    @contextmanager
    def applied(self, ratios: Mapping[str, float]) -> Iterator[nn.Module]:
        r = self.clean(ratios)
        saved: dict[str, Tensor] = {}
        try:
            with torch.no_grad():
                for name, ratio in r.items():
                    if self._removed(name, ratio) == 0:
                        continue
                    raw = self._by_name[name].raw
                    saved[name] = raw.detach().clone()
                    raw.mul_(self.mask(name, ratio).to(raw.device, raw.dtype))
            yield self.model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    self._by_name[name].raw.copy_(value)

    def realize(self, ratios: Mapping[str, float]) -> nn.Module:
        model = copy.deepcopy(self.model)
        plan = dataclasses.replace(
            self.config,
            sparsity=None,
            budget=None,
            allocation=self.layer_map(ratios),
            schedule=None,
            criterion=self.criterion,
        )
        Pruner(model, config=plan).prune_to_final()
        return model


def _layer_costs(model: nn.Module, example_inputs: Inputs | None) -> dict[str, int]:
    """Dense MACs per module name (empty without example inputs)."""
    if example_inputs is None:
        return {}
    stats = profile(model, example_inputs)
    return {layer.name: int(layer.macs or 0) for layer in stats.layers}


# --------------------------------------------------------------------------- channels


class ChannelSpace(LayerSpace):
    """Ratio maps over removed channels: each removable channel group is one layer.

    Channels leave in the order of the :class:`~secateurs.shrink.ShrinkConfig`'s criterion
    (``config=`` or its keywords); the budget counts kept channels (sparsity), parameters,
    MACs, bytes or latency predicted by a per-layer look-up table, all without running the
    model.
    """

    budgets = (Sparsity, Params, MACs, Bytes, Latency)

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        config: ShrinkConfig | None = None,
        *,
        data: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        **options: Any,
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.config = by_name(config_of(ShrinkConfig, config, options, "the channel space"), model)
        self.graph, self.cands, _ = channel_candidates(
            model, example_inputs, self.config, data, loss_fn
        )
        self.layers = [self._layer(c) for c in self.cands]
        self._measures: dict[tuple[type, Any], Any] = {}

    def _layer(self, cand: Any) -> Layer:
        g = cand.group
        everything = {g.index: torch.ones(g.size, dtype=torch.bool)}
        name = g.name
        try:
            module = self.model.get_submodule(name)
        except AttributeError:
            module = None
        weight = getattr(module, "weight", None)
        if module is not None and isinstance(weight, Tensor):
            in_c, _, kernel, stride = _geometry(module, weight)
        else:
            in_c, kernel, stride = g.size, 1, 1
        return Layer(
            name=name,
            kind=type(module).__name__ if module is not None else "Parameter",
            in_channels=in_c,
            out_channels=g.size,
            kernel=kernel,
            stride=stride,
            params=self.graph.params() - self.graph.params(everything),
            macs=self.graph.macs() - self.graph.macs(everything),
            size=g.size,
            max_ratio=cand.cap / g.size,
        )

    @property
    def description(self) -> str:
        return "removing channels"

    def removed(self, ratios: Mapping[str, float]) -> dict[int, Tensor]:
        """The channel masks (by group index) that ``ratios`` removes."""
        return _removal(
            self.cands, 1.0, LayerMap(self.clean(ratios), default=0.0), self.config.round_to
        )

    def _measure(self, budget: Budget) -> tuple[Callable[[dict[int, Tensor]], float], float, str]:
        key = (type(budget), getattr(budget, "keep", getattr(budget, "value", None)))
        if key not in self._measures:
            self._measures[key] = channel_measure(
                budget,  # type: ignore[arg-type]
                self.graph,
                self.model,
                self.example_inputs,
            )
        return self._measures[key]

    def measure(self, budget: Budget, ratios: Mapping[str, float]) -> float:
        value, _, _ = self._measure(budget)
        return value(self.removed(ratios))

    def limit(self, budget: Budget) -> float:
        return self._measure(budget)[1]

    def unit(self, budget: Budget) -> str:
        return self._measure(budget)[2]

    @contextmanager
    def applied(self, ratios: Mapping[str, float]) -> Iterator[nn.Module]:
        plan = plan_from_removed(self.graph, self.removed(ratios))
        saved = {
            name: p.detach().clone()
            for name, p in self.model.named_parameters()
            if name in plan.removed
        }
        try:
            mask_plan_(self.model, plan)
            yield self.model
        finally:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def realize(self, ratios: Mapping[str, float]) -> nn.Module:
        model = copy.deepcopy(self.model)
        return apply_plan_(model, plan_from_removed(self.graph, self.removed(ratios)))
