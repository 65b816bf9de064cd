"""``shrink``: structural pruning end to end, a smaller dense model out.

The steps are the axes of the design, each a separate piece:

1. trace the model into coupled channel groups (:func:`secateurs.graph.build_graph`);
2. score every channel with a criterion (:func:`secateurs.criteria.channel_scores`);
3. decide how many channels each group loses: ``uniform`` (the same fraction everywhere) or
   ``global`` (one ranking of scores normalised per group), capped per group by
   ``max_ratio``, with kept widths rounded up to multiples of ``round_to`` (by default 16 or 8
   by group width, what CPU kernels run fastest: :func:`round_step`);
4. search the amount so the budget is met: a channel fraction (:class:`~secateurs.Sparsity`),
   a parameter count (:class:`~secateurs.Params`) or MACs (:class:`~secateurs.MACs`), counted
   from the graph without running the model, by bisection;
5. surgery on a copy: the caller's model is never changed;
6. with data, reconstruction without training: the layers that read a cut group refitted by
   least squares to the original outputs; BatchNorm statistics re-estimated only after a
   layer that could not be refitted.

``steps > 1`` prunes iteratively, calling ``finetune(model, step)`` between steps so accuracy
can recover before the next cut.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from secateurs.allocation import LayerMap
from secateurs.budgets import BUDGETS, Budget, Bytes, Latency, MACs, Params, Sparsity
from secateurs.calibration import CALIBRATION_BATCHES, LossFn, recalibrate_batchnorm_
from secateurs.checks import check_int, option
from secateurs.criteria import (
    CRITERIA,
    ChannelContext,
    ChannelCriterion,
    ChannelOBS,
    Criterion,
    Magnitude,
    channel_scores,
)
from secateurs.criteria.structural import refit_readers
from secateurs.errors import BudgetError, ConfigError, SecateursError
from secateurs.graph.groups import ChannelGraph, ChannelGroup, build_graph
from secateurs.graph.labels import segments
from secateurs.graph.latency import LatencyTable
from secateurs.graph.surgery import ChannelPlan, apply_plan_, check_forward, plan_from_removed
from secateurs.provenance import record
from secateurs.registry import config_of
from secateurs.running import Inputs, run_example
from secateurs.selection import Candidate, Selection, Selector, compile_selectors

StructuralBudget = Sparsity | Params | MACs | Bytes | Latency
ALLOCATIONS = ("uniform", "global")
SEARCH_STEPS = 30
#: Positions drawn from the calibration batches for each layer's least-squares refit.
RECONSTRUCT_SAMPLES = 4096
REFITTED_KEY = "shrink.refitted"


@dataclass
class ShrinkReport:
    """What :func:`shrink` did: the replayable plan and the sizes before and after."""

    plan: ChannelPlan
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    channels_removed: int
    channels_prunable: int
    groups: int
    seconds: float
    removed_per_group: dict[str, int] = field(default_factory=dict)
    unhandled: list[str] = field(default_factory=list)
    #: groups the channel criterion could not measure, scored by L2 magnitude (and why)
    fallbacks: list[str] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "channels_removed": self.channels_removed,
            "channels_prunable": self.channels_prunable,
            "groups": self.groups,
            "seconds": self.seconds,
            "removed_per_group": self.removed_per_group,
            "unhandled": self.unhandled,
            "fallbacks": self.fallbacks,
        }


BudgetSpec = Budget | str | Mapping[str, Any]


def _budget(budget: BudgetSpec) -> StructuralBudget:
    if isinstance(budget, (str, Mapping)):
        budget = BUDGETS.build(budget)
    if isinstance(budget, (Sparsity, Params, MACs, Bytes, Latency)):
        return budget
    raise ConfigError(
        f"budget must be sc.Sparsity(fraction of channels to remove), sc.Params(keep), "
        f"sc.MACs(keep), sc.Bytes(keep) or sc.Latency(keep); got {budget!r}"
    )


def _frozen_groups(graph: ChannelGraph, model: nn.Module, config: ShrinkConfig) -> set[int]:
    """Groups whose channels stay: one of the layers producing them (whose output rows, or
    norm entries, the group holds) is excluded, or ``include`` is given and picks none."""
    selection = Selection(config.include, config.exclude)
    if not selection:
        return set()
    modules = dict(model.named_modules())
    frozen = set()
    for g in graph.prunable_groups:
        producers = [
            Candidate(name, f"{name}.weight" if name else "weight", modules[name])
            for name in sorted({m.ref.module for m in g.members if m.dim == 0})
            if name in modules
        ]
        included = [selection.included(c) for c in producers]
        excluded = [selection.excluded(c) for c in producers]
        if any(excluded) or (selection.include and not any(included)):
            frozen.add(g.index)
    names = sorted({m.ref.module for g in graph.prunable_groups for m in g.members if m.dim == 0})
    selection.check_used("channel-producing layer", model, names)
    return frozen


#: ``round_to``: a fixed multiple, ``"auto"`` (by group width, :func:`round_step`) or exact.
RoundTo = int | Literal["auto"] | None


def round_step(size: int, round_to: RoundTo) -> int:
    """The multiple a group of ``size`` channels keeps its width at (1: exact).

    ``"auto"``, the default: 16 in groups of 64 channels or more, 8 in groups of 32-63, exact
    below: a step is at most a quarter of the group, so the budget search still has widths to
    choose from. Kept widths that are not multiples of 8 or 16 run slowly in oneDNN's
    convolutions and far worse in onnxruntime's blocked ones (there the four benchmark CNNs cut
    to half their MACs with exact widths ran 1.4-3.0x slower than with multiples of 16,
    MobileNetV2 and VGG-BN slower than dense)."""
    if round_to == "auto":
        return 16 if size >= 64 else 8 if size >= 32 else 1
    return round_to or 1


@dataclass
class _Candidates:
    """Per group: channels in removal order and how many may go at most."""

    group: ChannelGroup
    order: Tensor  #: prunable channels, least important first
    normalised: Tensor  #: their scores divided by the group's mean score
    cap: int

    def kept_after(self, n: int, round_to: RoundTo) -> int:
        """How many to remove so that ``n`` are asked for and the kept width is rounded."""
        n = min(n, self.cap)
        step = round_step(self.group.size, round_to)
        if step > 1 and n > 0:
            kept = math.ceil((self.group.size - n) / step) * step
            n = max(0, self.group.size - kept)
        return n


def _candidates(
    graph: ChannelGraph, scores: dict[int, Tensor], frozen: set[int], max_ratio: float
) -> list[_Candidates]:
    out = []
    for g in graph.prunable_groups:
        if g.index in frozen:
            continue
        s = scores[g.index].clone()
        idx = g.prunable.nonzero().flatten()
        order = idx[torch.argsort(s[idx], stable=True)]
        cap = min(len(idx), g.size - 1, math.floor(max_ratio * g.size))
        if cap < 1:
            continue
        mean = s[idx].abs().mean()
        normalised = s[order] / (mean if float(mean) > 0 else 1.0)
        out.append(_Candidates(g, order, normalised, cap))
    return out


def _removal(
    cands: list[_Candidates],
    amount: float,
    allocation: str | LayerMap,
    round_to: RoundTo,
) -> dict[int, Tensor]:
    """Channels to remove for ``amount`` in [0, 1] of the removable ones, or, when
    ``allocation`` is a :class:`LayerMap` (group name or regex -> fraction removed), for it."""
    return _Masks(cands)(_counts(cands, amount, allocation, round_to))


def _counts(
    cands: list[_Candidates],
    amount: float,
    allocation: str | LayerMap,
    round_to: RoundTo,
) -> dict[int, int]:
    """How many channels :func:`_removal` takes from each group (groups losing none left out)."""
    counts: dict[int, int] = {}
    if not cands:
        return {}
    if isinstance(allocation, LayerMap):
        for c in cands:
            ratio = allocation.value(c.group.name, default=0.0)
            counts[c.group.index] = math.floor(ratio * c.group.size + 1e-9)
    elif allocation == "uniform":
        for c in cands:
            counts[c.group.index] = math.floor(amount * c.group.size + 1e-9)
    else:
        pool = torch.cat([c.normalised for c in cands]) if cands else torch.zeros(0)
        owner = torch.cat([torch.full((len(c.order),), i) for i, c in enumerate(cands)])
        rank = torch.cat([torch.arange(len(c.order)) for c in cands])
        capped = rank < torch.cat([torch.full((len(c.order),), c.cap) for c in cands])
        pool, owner = pool[capped], owner[capped]
        k = math.floor(amount * len(pool) + 1e-9)
        chosen = owner[torch.argsort(pool, stable=True)[:k]]
        per = torch.bincount(chosen, minlength=len(cands))
        for i, c in enumerate(cands):
            counts[c.group.index] = int(per[i])
    out = {}
    for c in cands:
        n = c.kept_after(counts[c.group.index], round_to)
        if n > 0:
            out[c.group.index] = n
    return out


class _Masks:
    """Removal masks from per-group counts: every group's removal order in one flat tensor,
    so a budget search that builds masks for dozens of counts pays a few tensor ops each,
    not two per group."""

    def __init__(self, cands: list[_Candidates]) -> None:
        self.cands = cands
        self.sizes = [c.group.size for c in cands]
        starts = list(itertools.accumulate(self.sizes, initial=0))[:-1]
        self.flat = torch.cat(
            [c.order + s for c, s in zip(cands, starts, strict=True)] or [torch.zeros(0).long()]
        )
        self.owner, self.rank = segments([len(c.order) for c in cands])

    def __call__(self, counts: dict[int, int]) -> dict[int, Tensor]:
        """Per group in ``counts``: a mask of its ``counts[group]`` least important channels."""
        n = [counts.get(c.group.index, 0) for c in self.cands]
        flat = torch.zeros(sum(self.sizes), dtype=torch.bool)
        flat[self.flat[self.rank < torch.tensor(n, dtype=torch.long)[self.owner]]] = True
        parts = flat.split(self.sizes)
        return {c.group.index: parts[i] for i, c in enumerate(self.cands) if n[i] > 0}


Measure = Callable[[dict[int, Tensor]], float]


def channel_measure(
    budget: StructuralBudget,
    graph: ChannelGraph,
    model: nn.Module,
    example_inputs: Inputs,
) -> tuple[Measure, float, str]:
    """``(value of a removal, the largest allowed value, unit)`` for ``budget``.

    Counted from the graph without running the model, except latency, which a per-layer
    look-up table measured once (and cached) predicts.
    """
    return _MEASURES[type(budget)](budget, graph, model, example_inputs)


def _macs(budget: Any, graph: ChannelGraph, *_: Any) -> tuple[Measure, float, str]:
    return (lambda r: float(graph.macs(r))), float(budget.limit(graph.macs())), "MACs"


def _params(budget: Any, graph: ChannelGraph, *_: Any) -> tuple[Measure, float, str]:
    return (lambda r: float(graph.params(r))), float(budget.limit(graph.params())), "parameters"


def _bytes(
    budget: Any, graph: ChannelGraph, model: nn.Module, _: Any
) -> tuple[Measure, float, str]:
    item = max((p.element_size() for p in model.parameters()), default=4)
    dense = graph.params() * item
    return (lambda r: float(graph.params(r) * item)), float(budget.limit(dense)), "bytes"


def _channels(budget: Any, graph: ChannelGraph, *_: Any) -> tuple[Measure, float, str]:
    total = sum(g.num_prunable for g in graph.prunable_groups)

    def kept_channels(r: dict[int, Tensor]) -> float:
        return float(total - sum(int(m.sum()) for m in r.values()))

    return kept_channels, (1.0 - budget.value) * total, "prunable channels"


def _latency(
    budget: Any, graph: ChannelGraph, model: nn.Module, example_inputs: Inputs
) -> tuple[Measure, float, str]:
    table = LatencyTable.build(model, example_inputs, graph)
    dense = table.estimate(graph.shapes_after())
    limit = budget.keep * dense if isinstance(budget.keep, float) else budget.keep / 1000.0
    return (lambda r: table.estimate(graph.shapes_after(r))), limit, "ms (predicted)"


_MEASURES: dict[type, Callable[..., tuple[Measure, float, str]]] = {
    MACs: _macs,
    Params: _params,
    Bytes: _bytes,
    Sparsity: _channels,
    Latency: _latency,
}


def _search(
    cands: list[_Candidates],
    measure: tuple[Measure, float, str],
    allocation: str | LayerMap,
    round_to: RoundTo,
    monotone: bool = True,
) -> dict[int, Tensor]:
    """The removal that fits ``measure``'s limit: a bisection on the fraction removed, then
    :func:`_give_back`. ``monotone``: the measure never falls when a channel is put back
    (counts do; a latency table's prediction need not)."""
    value, limit, unit = measure
    if isinstance(allocation, LayerMap):
        # a ratio map found by a search (or written by hand) is taken as it is; the budget
        # must hold, since nothing is searched
        removed = _removal(cands, 1.0, allocation, round_to)
        if value(removed) > limit:
            raise BudgetError(
                f"the ratio map leaves {value(removed):,.0f} {unit}, above the budget's "
                f"{limit:,.0f}; raise its ratios or the budget"
            )
        return removed
    masks = _Masks(cands)
    seen: dict[tuple[tuple[int, int], ...], float] = {}

    def measured(counts: dict[int, int]) -> float:
        # the bisection lands on the same whole-channel counts many times: measure each once
        key = tuple(counts.items())
        if key not in seen:
            seen[key] = value(masks(counts))
        return seen[key]

    full = _counts(cands, 1.0, allocation, round_to)
    if measured(full) > limit:
        raise BudgetError(
            f"cannot reach {limit:,.0f} {unit}: removing every removable channel (within "
            f"max_ratio, ignored layers and pinned channels) leaves {measured(full):,.0f}. Raise "
            "the budget, max_ratio, or prune layers that are ignored"
        )
    if value({}) <= limit:
        return {}
    lo, hi = 0.0, 1.0
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        if measured(_counts(cands, mid, allocation, round_to)) <= limit:
            hi = mid
        else:
            lo = mid
    return _give_back(
        masks, _counts(cands, hi, allocation, round_to), value, limit, round_to, monotone
    )


def _give_back(
    masks: _Masks,
    counts: dict[int, int],
    value: Callable[[dict[int, Tensor]], float],
    limit: float,
    round_to: RoundTo,
    monotone: bool = True,
) -> dict[int, Tensor]:
    """Put back the most important removed channels (a ``round_to`` step at a time) while the
    budget still holds: one step of the search can overshoot by a whole channel per group.
    ``counts``: channels removed per group; the result is the masks of the counts that fit.

    With a ``monotone`` measure a group whose step back broke the budget is not tried again:
    the other groups only get channels back, so its step can only cost more later."""
    steps = {c.group.index: round_step(c.group.size, round_to) for c in masks.cands}
    stuck: set[int] = set()
    changed = True
    tries = 0
    while changed and tries < 20 * max(len(counts), 1):
        changed = False
        for gi in sorted(counts, key=lambda i: -counts[i]):
            tries += 1  # a skipped group counts as a try: the cap stops where it always did
            if gi in stuck:
                continue
            trial = dict(counts)
            if counts[gi] > steps[gi]:
                trial[gi] = counts[gi] - steps[gi]
            else:
                del trial[gi]
            if value(masks(trial)) <= limit:
                counts, changed = trial, True
            elif monotone:
                stuck.add(gi)
    return masks(counts)


@dataclass
class ShrinkConfig:
    """How channels are chosen (everything but the budget, the data and the steps).

    The one description of shrinking options: :func:`shrink` takes them as keywords (or
    ``config=``), a recipe's ``shrink:`` section is this config plus ``budget``, ``steps`` and
    ``epochs_between``, and the channel search space of :mod:`secateurs.search` cuts its
    candidates with it.

    * ``criterion``: an object, registry name or ``{name: ..., **options}``. Default: when the
      cut is reconstructed (data given), ``channel_obs``, which ranks channels by the error
      left once their readers compensate, the compensation the reconstruction then performs
      (on the benchmark's VGG-BN and ResNet-20 it beat L2 magnitude, both reconstructed, on
      all 6 model-seed pairs after fine-tuning, for a few more seconds); otherwise ``magnitude`` with ``p=2``, the group L2
      norm of the channel-pruning literature (masks default to ``p=1``; see
      :class:`~secateurs.pruner.PruneConfig`). Searches over this config rank candidates with
      ``magnitude`` unless a criterion is named.
    * ``allocation``: ``uniform`` (the same fraction of every group), ``global`` (one ranking
      of scores normalised per group) or a :class:`~secateurs.LayerMap` ``{group name or regex:
      fraction of its channels to remove}`` (a plain mapping is taken as one; groups are named
      by the layer that produces them; :func:`secateurs.search_allocation` finds one).
    * ``max_ratio``: the most a group may lose (0.9: a layer keeps at least a tenth of its
      channels, where element masks may take 99% of a layer; a one-channel bottleneck rarely
      recovers).
    * ``round_to``: kept widths rounded up to a multiple (what fast kernels like): an int,
      ``None`` (exact widths) or ``"auto"`` (the default; :func:`round_step`: 16 in groups of
      64 channels or more, 8 in groups of 32-63, exact below). At half the MACs, exported to
      onnxruntime, exact widths left ResNet-18/50 at 0.57-0.67 of the speedup the MACs promise
      and MobileNetV2 slower than dense; multiples of 16 reached 0.92-1.02 on the ResNets
      (README, structural pruning). ``"auto"`` keeps 32-63-channel groups in multiples of 8,
      which onnxruntime runs slower than 16 (VGG-BN, MobileNetV2): pass 16 for it there.
    * ``include`` / ``exclude``: which layers may lose output channels (regexes over module
      names, module types or modules; :mod:`secateurs.selection`). Where the time goes is not
      where the MACs are: on torchvision's MobileNetV2, cutting only the expansion layers
      (``include=[r"features\\.\\d+\\.conv\\.0\\.0"]``) ran at 1.05-1.20x the MACs' speedup at
      batch 64 where the uniform cut of every group ran at 0.83-0.86x (README, structural
      pruning), since the narrow residual widths it spares are memory-bound.
    * ``calibration_batches``: batches a data-driven criterion reads. ``seed``: random ones.
    * ``strict``: an op without a channel rule is an error, and so is a group a channel
      criterion cannot measure (instead of scoring it by L2 magnitude, reported).
    * ``reconstruct``: compensate for the cut without training. Every layer that reads a cut
      group is refitted by least squares, in forward order, so that its output on the kept
      inputs matches the original model's output (ThiNet's refit, at ``reconstruct_samples``
      positions drawn from the calibration batches); after surgery a BatchNorm fed by a layer
      that could not be refitted (grouped or 3-D convolutions) has its statistics
      re-estimated on those batches (after a refitted layer that measured worse: the
      least-squares fit already matches the original activations). ``None`` (the default):
      on when ``data`` is given; ``True`` without data is an error. A criterion that refits by itself
      (``regression``) is not refitted twice.
    """

    criterion: Criterion | str | Mapping[str, Any] | None = None
    allocation: str | Mapping[str, float] = "uniform"
    max_ratio: float = 0.9
    round_to: RoundTo = "auto"
    include: Sequence[Selector] | None = None
    exclude: Sequence[Selector] | None = None
    calibration_batches: int = CALIBRATION_BATCHES
    seed: int = 0
    strict: bool = False
    reconstruct: bool | None = None
    reconstruct_samples: int = RECONSTRUCT_SAMPLES

    def __post_init__(self) -> None:
        with option("allocation"):
            self.allocation_ = self._build_allocation()
        with option("max_ratio"):
            m = self.max_ratio
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1:
                raise ConfigError(f"max_ratio must be a number in (0, 1]; got {m!r}")
        with option("round_to"):
            r = self.round_to
            if (
                r is not None
                and r != "auto"
                and (isinstance(r, bool) or not isinstance(r, int) or r < 1)
            ):
                raise ConfigError(
                    f"round_to must be a positive int (e.g. 8), 'auto' or None; got {r!r}"
                )
        with option("calibration_batches"):
            check_int(self.calibration_batches, "calibration_batches", 1)
        with option("seed"):
            check_int(self.seed, "seed", 0)
        with option("strict"):
            if not isinstance(self.strict, bool):
                raise ConfigError(f"strict must be true or false; got {self.strict!r}")
        with option("reconstruct"):
            if self.reconstruct is not None and not isinstance(self.reconstruct, bool):
                raise ConfigError(
                    f"reconstruct must be true, false or null (on when data is given); "
                    f"got {self.reconstruct!r}"
                )
        with option("reconstruct_samples"):
            check_int(self.reconstruct_samples, "reconstruct_samples", 1)
        for key in ("include", "exclude"):
            with option(key):
                compile_selectors(getattr(self, key), key)
        with option("criterion"):
            self.criterion_: Criterion = CRITERIA.build(self.criterion, Magnitude(p=2))

    def criterion_for(self, data: Iterable[Any] | None) -> Criterion:
        """The criterion :func:`shrink` ranks channels with, given its ``data``: the one
        named, else ``channel_obs`` when the cut is reconstructed, else L2 magnitude."""
        if self.criterion is None and _reconstructs(self, data):
            return ChannelOBS()
        return self.criterion_

    def _build_allocation(self) -> str | LayerMap | None:
        """``uniform``, ``global`` or the ratio map as a :class:`LayerMap` (a recipe's section
        also takes a search, found later)."""
        a = self.allocation
        if isinstance(a, Mapping):
            return a if isinstance(a, LayerMap) else LayerMap(dict(a), default=0.0)
        if a not in ALLOCATIONS:
            raise ConfigError(
                f"allocation {a!r} is not allowed; use one of {ALLOCATIONS} or a ratio map "
                "{group name: fraction removed} (sc.search_allocation finds one by "
                "sensitivity analysis, AMC or NetAdapt)"
            )
        return a


def _step_budget(
    budget: StructuralBudget,
    step: int,
    steps: int,
    measure0: tuple[Measure, float, str],
) -> StructuralBudget:
    """The budget after ``step`` of ``steps`` equal cuts (amounts taken on the original model,
    as counts, so that each step's budget means the same on the smaller model)."""
    if steps == 1:
        return budget
    frac = step / steps
    if isinstance(budget, Sparsity):
        # each step removes an equal share of the original channels from what is left
        share = budget.value / steps
        return Sparsity(min(share / (1.0 - share * (step - 1)), 0.999))
    value, limit, _ = measure0
    total = value({})
    keep = total - (total - limit) * frac
    if isinstance(budget, Latency):
        return Latency(max(1, round(keep * 1000.0)))  # ms -> the int form, microseconds
    return type(budget)(max(1, round(keep)))


def plan_shrink(
    model: nn.Module,
    example_inputs: Inputs,
    budget: BudgetSpec,
    config: ShrinkConfig | None = None,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    graph: ChannelGraph | None = None,
) -> tuple[ChannelPlan, ChannelGraph, dict[int, Tensor]]:
    """Decide which channels to remove (without removing them): plan, graph and masks.

    Criteria with a :meth:`~ChannelCriterion.refit` step (regression) adjust the kept
    weights of ``model`` in place, so call this on the copy you will prune. ``graph``: the
    model's graph when it is already built (it is traced otherwise).
    """
    plan, graph_, removed, _ = _plan(
        model, example_inputs, budget, config or ShrinkConfig(), data, loss_fn, graph
    )
    return plan, graph_, removed


def _plan(
    model: nn.Module,
    example_inputs: Inputs,
    budget: BudgetSpec,
    cfg: ShrinkConfig,
    data: Iterable[Any] | None,
    loss_fn: LossFn | None,
    graph: ChannelGraph | None,
) -> tuple[ChannelPlan, ChannelGraph, dict[int, Tensor], ChannelContext]:
    budget = _budget(budget)
    criterion = cfg.criterion_for(data)
    graph, cands, ctx = channel_candidates(
        model, example_inputs, cfg, data, loss_fn, graph, criterion
    )
    measure = channel_measure(budget, graph, model, example_inputs)
    assert cfg.allocation_ is not None, "a recipe section's search runs before plan_shrink"
    monotone = not isinstance(budget, Latency)  # a latency table's prediction need not be
    removed = _search(cands, measure, cfg.allocation_, cfg.round_to, monotone)
    if removed:
        if isinstance(criterion, ChannelCriterion) and criterion.refits:
            ctx.cache[REFITTED_KEY] = criterion.refit(ctx, removed)
        elif _reconstructs(cfg, data):
            ctx.cache[REFITTED_KEY] = refit_readers(ctx, removed, cfg.reconstruct_samples)
    return plan_from_removed(graph, removed), graph, removed, ctx


def channel_candidates(
    model: nn.Module,
    example_inputs: Inputs,
    config: ShrinkConfig,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    graph: ChannelGraph | None = None,
    criterion: Criterion | None = None,
) -> tuple[ChannelGraph, list[_Candidates], ChannelContext]:
    """The graph, and the removable channels of each group in the order they would go
    (ranked by ``criterion``, by default the config's ``criterion_``)."""
    graph = graph or build_graph(model, example_inputs, strict=config.strict)
    if not graph.prunable_groups:
        raise ConfigError(
            f"{type(model).__name__} has no removable channels: every channel is pinned "
            f"({_pinned_summary(graph)})"
        )
    frozen = _frozen_groups(graph, model, config)
    ctx = ChannelContext(
        model,
        graph,
        example_inputs,
        data,
        loss_fn,
        config.calibration_batches,
        config.seed,
        config.strict,
    )
    scores = channel_scores(criterion or config.criterion_, ctx)
    cands = _candidates(graph, scores, frozen, config.max_ratio)
    if isinstance(config.allocation_, LayerMap):
        config.allocation_.check_keys([(c.group.name,) for c in cands], "removable channel group")
    return graph, cands, ctx


def _pinned_summary(graph: ChannelGraph) -> str:
    reasons = sorted({r for g in graph.groups for r in g.pinned_because})
    return "; ".join(reasons[:5]) or "no groups found"


def shrink(
    model: nn.Module,
    example_inputs: Inputs,
    budget: BudgetSpec,
    config: ShrinkConfig | None = None,
    *,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    steps: int = 1,
    finetune: Callable[[nn.Module, int], None] | None = None,
    **options: Any,
) -> nn.Module:
    """Remove channels from a copy of ``model`` until ``budget`` is met; return the copy.

    ``budget``: ``sc.MACs(0.5)`` keeps half the MACs, ``sc.Params(0.6)`` 60% of the
    parameters, ``sc.Sparsity(0.3)`` removes 30% of the removable channels, ``sc.Bytes`` and
    ``sc.Latency`` bound the stored bytes and the latency measured on this machine (predicted
    by a per-layer look-up table). How channels are chosen is a :class:`ShrinkConfig`, given as
    keywords (``criterion``, ``allocation``, ``max_ratio``, ``round_to``, ``include``,
    ``exclude``, ``calibration_batches``, ``seed``, ``strict``, ``reconstruct``,
    ``reconstruct_samples``) or as ``config=``. Data-driven criteria need ``data`` (batches
    of ``(inputs, labels)``) and, for gradients, ``loss_fn``; with ``data`` the cut is also
    reconstructed (least-squares refit of the layers reading cut channels) unless
    ``reconstruct=False``, and channels are then ranked by ``channel_obs`` unless a
    criterion is named. ``steps > 1`` cuts in equal steps, calling ``finetune(model, step)``
    between them (a ratio map is applied in one step).

    The copy is a plain module of the same classes with fewer channels. What was done is
    recorded on it: ``sc.report_of(small, sc.ShrinkReport)`` gives the MACs and parameters
    before and after, ops without a channel rule (their channels kept), groups a channel
    criterion scored by L2 magnitude instead, and the replayable :class:`ChannelPlan` that
    :func:`secateurs.export_safetensors` stores so the file loads into a fresh instance of
    the original class.
    """
    config = by_name(config_of(ShrinkConfig, config, options, "shrink"), model)
    check_int(steps, "steps", 1)
    if isinstance(config.allocation_, LayerMap) and steps > 1:
        raise ConfigError("a ratio map is applied in one step: use steps=1 with it")
    if config.reconstruct and data is None:
        raise ConfigError(
            "reconstruct=True refits layers on calibration data: pass data=<a DataLoader of "
            "(inputs, labels)>, or reconstruct=False"
        )
    budget = _budget(budget)
    start = time.perf_counter()
    sharing = data is None and not any(m.training for m in model.modules())
    small = _copy_sharing(model) if sharing else copy.deepcopy(model)
    graph0 = build_graph(small, example_inputs, strict=config.strict)
    shapes = {ref.qualname: s for ref, s in graph0.shapes.items()}
    measure0 = channel_measure(budget, graph0, small, example_inputs) if steps > 1 else None
    plan = ChannelPlan()
    last_graph, removed = graph0, dict[int, Tensor]()
    fallbacks: list[str] = []
    for step in range(1, steps + 1):
        step_plan, last_graph, removed, step_fallbacks, refitted = _plan_step(
            small,
            example_inputs,
            _step_budget(budget, step, steps, measure0) if measure0 else budget,
            config,
            data,
            loss_fn,
            graph0 if step == 1 else None,
        )
        fallbacks += step_fallbacks
        apply_plan_(small, step_plan)
        if sharing and step == 1:
            _unshare_(small, model)
        if _reconstructs(config, data):
            assert data is not None
            norms = _unreconstructed_batchnorms(small, example_inputs, step_plan, refitted)
            if norms:
                batches = itertools.islice(data, config.calibration_batches)
                recalibrate_batchnorm_(small, batches, only=norms)
        plan = step_plan if step == 1 else plan.merged(step_plan, shapes)
        out = check_forward(small, lambda: run_example(small, example_inputs), f"step {step}")
        _check_outputs(graph0.output_shapes, out)
        if finetune is not None and step < steps:
            finetune(small, step)
    record(
        small,
        ShrinkReport(
            plan=plan,
            macs_before=graph0.macs(),
            macs_after=last_graph.macs(removed),
            params_before=graph0.params(),
            params_after=last_graph.params(removed),
            channels_removed=plan_channel_count(graph0, plan),
            channels_prunable=sum(g.num_prunable for g in graph0.prunable_groups),
            groups=len(graph0.prunable_groups),
            seconds=time.perf_counter() - start,
            removed_per_group=_per_group(last_graph, removed) if steps == 1 else {},
            unhandled=sorted({f"{u.op} in {u.module}" for u in graph0.unhandled}),
            fallbacks=fallbacks,
        ),
    )
    return small


def _tensors(model: nn.Module) -> Iterable[Tensor]:
    return itertools.chain(model.parameters(), model.buffers())


def _copy_sharing(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``model``'s own objects.

    Copying every weight only for surgery to replace most of them by sliced copies costs
    ``shrink`` a second allocation of the whole network. On the data-free path of an
    eval-mode model nothing writes to a tensor before surgery (tracing and scoring read,
    surgery assigns new tensors), so the copy shares them until :func:`_unshare_` copies the
    ones surgery kept.
    """
    return copy.deepcopy(model, {id(t): t for t in _tensors(model)})


def _unshare_(small: nn.Module, model: nn.Module) -> None:
    """Give ``small`` its own copy of every parameter and buffer it still shares with
    ``model`` (ties between tensors kept: one copy per shared object)."""
    originals = {id(t) for t in _tensors(model)}
    copies: dict[int, Tensor] = {}
    for module in small.modules():
        tables: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
        for table in tables:
            for name, t in table.items():
                if t is not None and id(t) in originals:
                    if id(t) not in copies:
                        copies[id(t)] = copy.deepcopy(t)
                    table[name] = copies[id(t)]


def _unreconstructed_batchnorms(
    model: nn.Module, example_inputs: Inputs, plan: ChannelPlan, refitted: set[str]
) -> list[nn.Module]:
    """The BatchNorm layers that read the output of a layer which lost input channels, mixes
    channels (not a depthwise convolution) and was not refitted: their statistics no longer
    hold. A refitted layer's outputs match the original ones, so its BatchNorm keeps the
    original statistics (re-estimating them would undo the least-squares fit's shrinkage and
    compound down the network: measured, a ResNet-20 at half the MACs went from 0.025 to 0.74
    relative output error)."""
    readers: list[nn.Module] = []
    for name, module in model.named_modules():
        if name in refitted or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        in_dim = 0 if isinstance(module, nn.modules.conv._ConvNd) and module.transposed else 1
        cut = in_dim in plan.removed.get(f"{name}.weight" if name else "weight", {})
        groups = getattr(module, "groups", 1)
        depthwise = groups > 1 and groups == getattr(module, "in_channels", 0)
        if cut and not depthwise:
            readers.append(module)
    if not readers:
        return []
    outputs: dict[int, Tensor] = {}  # kept alive, so that an id is not reused
    found: list[nn.Module] = []

    def produced(module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            outputs[id(out)] = out

    def reads(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and id(x) in outputs and module not in found:
            found.append(module)

    handles = [m.register_forward_hook(produced) for m in readers]
    handles += [
        m.register_forward_pre_hook(reads)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        with torch.no_grad():
            run_example(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return found


def _reconstructs(config: ShrinkConfig, data: Iterable[Any] | None) -> bool:
    """Whether a cut is reconstructed: ``reconstruct``, or (when it is None) data given."""
    return data is not None and config.reconstruct is not False


def by_name(config: ShrinkConfig, model: nn.Module) -> ShrinkConfig:
    """``config`` with the module objects among its selectors replaced by their exact names in
    ``model``: a module object identifies a layer of ``model``, not of a copy being cut."""
    names = {id(m): n for n, m in model.named_modules()}
    changes: dict[str, Any] = {}
    for key in ("include", "exclude"):
        value = getattr(config, key)
        items = [value] if isinstance(value, (str, type, nn.Module)) else list(value or [])
        if not any(isinstance(item, nn.Module) for item in items):
            continue
        converted: list[Selector] = []
        for item in items:
            if isinstance(item, nn.Module):
                if id(item) not in names:
                    raise ConfigError(
                        f"{key}: the {type(item).__name__} given is not a module of this model"
                    )
                item = re.escape(names[id(item)])
            converted.append(item)
        changes[key] = converted
    return dataclasses.replace(config, **changes) if changes else config


def _plan_step(
    model: nn.Module,
    example_inputs: Inputs,
    budget: BudgetSpec,
    config: ShrinkConfig,
    data: Iterable[Any] | None,
    loss_fn: LossFn | None,
    graph: ChannelGraph | None,
) -> tuple[ChannelPlan, ChannelGraph, dict[int, Tensor], list[str], set[str]]:
    """One cut: :func:`plan_shrink`, the groups its criterion could not measure and the layers
    reconstruction refitted."""
    config = dataclasses.replace(config)  # a fresh criterion object and context per step
    plan, graph_, removed, ctx = _plan(model, example_inputs, budget, config, data, loss_fn, graph)
    return plan, graph_, removed, list(ctx.fallbacks), ctx.cache.get(REFITTED_KEY, set())


def plan_channel_count(graph: ChannelGraph, plan: ChannelPlan) -> int:
    """How many channels of ``graph`` a plan removes (counted on each group's producer)."""
    total = 0
    for g in graph.prunable_groups:
        m = g.members[0]
        gone = plan.removed.get(m.ref.qualname, {}).get(m.dim, [])
        if gone:
            channels = m.channel[torch.tensor(gone, dtype=torch.long)]
            total += int(torch.unique(channels[channels >= 0]).numel())
    return total


def _per_group(graph: ChannelGraph, removed: dict[int, Tensor]) -> dict[str, int]:
    return {graph.groups[i].name: int(mask.sum()) for i, mask in removed.items()}


def _check_outputs(expected: list[tuple[int, ...]], out: Any) -> None:
    shapes = [tuple(t.shape) for t in _flat(out)]
    if shapes != expected:
        raise SecateursError(
            f"removing channels changed the model's output shapes ({expected} -> {shapes}); "
            "this is a bug in secateurs' graph rules: please report the model"
        )


def _flat(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flat(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat(v)]
    return []
