"""``shrink``: structural pruning end to end, a smaller dense model out.

The steps are the axes of the design, each a separate piece:

1. trace the model into coupled channel groups (:func:`secateurs.graph.build_graph`);
2. score every channel with a criterion (:func:`secateurs.criteria.channel_scores`);
3. decide how many channels each group loses: ``uniform`` (the same fraction everywhere) or
   ``global`` (one ranking of scores normalised per group), capped per group by
   ``max_ratio``, with kept widths rounded up to multiples of ``round_to``;
4. search the amount so the budget is met: a channel fraction (:class:`~secateurs.Sparsity`),
   a parameter count (:class:`~secateurs.Params`) or MACs (:class:`~secateurs.MACs`), counted
   from the graph without running the model, by bisection;
5. surgery on a copy: the caller's model is never changed.

``steps > 1`` prunes iteratively, calling ``finetune(model, step)`` between steps so accuracy
can recover before the next cut.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.budgets import BUDGETS, Budget, Bytes, Latency, MACs, Params, Sparsity
from secateurs.calibration import LossFn
from secateurs.checks import check_sparsity
from secateurs.criteria import (
    CRITERIA,
    ChannelContext,
    ChannelCriterion,
    Criterion,
    Magnitude,
    channel_scores,
)
from secateurs.errors import BudgetError, ConfigError, SecateursError
from secateurs.graph.groups import ChannelGraph, ChannelGroup, build_graph
from secateurs.graph.latency import LatencyTable
from secateurs.graph.surgery import ChannelPlan, apply_plan_, check_forward, plan_from_removed
from secateurs.running import Inputs, run_example

StructuralBudget = Sparsity | Params | MACs | Bytes | Latency
ALLOCATIONS = ("uniform", "global")
SEARCH_STEPS = 30


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
        }


def _criterion(criterion: Criterion | str | dict[str, Any] | None) -> Criterion:
    if criterion is None:
        return Magnitude(p=2)
    if isinstance(criterion, Criterion):
        return criterion
    return CRITERIA.build(criterion)


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


def _ignored(model: nn.Module, ignored_layers: Sequence[str | nn.Module]) -> set[str]:
    """Module names matching ``ignored_layers`` (names, regexes or module objects)."""
    names = {id(m): n for n, m in model.named_modules()}
    out: set[str] = set()
    for item in ignored_layers:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ConfigError(
                    f"ignored layer {type(item).__name__} is not a module of this model"
                )
            out.add(names[id(item)])
            continue
        pattern = re.compile(item)
        hits = [n for n in names.values() if n == item or pattern.fullmatch(n)]
        if not hits:
            sample = ", ".join(n for n in list(names.values())[1:8])
            raise ConfigError(
                f"ignored layer {item!r} matches no module; module names look like: {sample}"
            )
        out.update(hits)
    return out


def _frozen(group: ChannelGroup, ignored: set[str]) -> bool:
    """A group whose channels an ignored layer produces (its rows, its norm entries)."""
    return any(m.dim == 0 and m.ref.module in ignored for m in group.members)


@dataclass
class _Candidates:
    """Per group: channels in removal order and how many may go at most."""

    group: ChannelGroup
    order: Tensor  #: prunable channels, least important first
    normalised: Tensor  #: their scores divided by the group's mean score
    cap: int

    def kept_after(self, n: int, round_to: int | None) -> int:
        """How many to remove so that ``n`` are asked for and the kept width is rounded."""
        n = min(n, self.cap)
        if round_to and n > 0:
            kept = math.ceil((self.group.size - n) / round_to) * round_to
            n = max(0, self.group.size - kept)
        return n


def _candidates(
    graph: ChannelGraph, scores: dict[int, Tensor], ignored: set[str], max_ratio: float
) -> list[_Candidates]:
    out = []
    for g in graph.prunable_groups:
        if _frozen(g, ignored):
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


def _map_ratio(name: str, ratios: Mapping[str, float]) -> float:
    """The fraction of group ``name`` to remove: its entry, else the first regex matching it."""
    if name in ratios:
        return ratios[name]
    for pattern, ratio in ratios.items():
        if re.fullmatch(pattern, name):
            return ratio
    return 0.0


def check_ratio_map(ratios: Mapping[str, float], names: Sequence[str]) -> None:
    """Every key names a group (exactly or as a regex) and every ratio is in [0, 1)."""
    for key, value in ratios.items():
        check_sparsity(value, f"the ratio of {key!r}")
        try:
            hit = key in names or any(re.fullmatch(key, n) for n in names)
        except re.error as exc:
            raise ConfigError(f"ratio map key {key!r} is not a valid regex: {exc}") from None
        if not hit:
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(
                f"ratio map key {key!r} names no removable channel group; groups are named by "
                f"the layer that produces them: {sample}"
            )


def _removal(
    cands: list[_Candidates],
    amount: float,
    allocation: str | Mapping[str, float],
    round_to: int | None,
) -> dict[int, Tensor]:
    """Channels to remove for ``amount`` in [0, 1] of the removable ones, or, when
    ``allocation`` is a ratio map (group name or regex -> fraction removed), for that map."""
    counts: dict[int, int] = {}
    if not cands:
        return {}
    if isinstance(allocation, Mapping):
        for c in cands:
            ratio = _map_ratio(c.group.name, allocation)
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
    removed = {}
    for c in cands:
        n = c.kept_after(counts[c.group.index], round_to)
        if n > 0:
            mask = torch.zeros(c.group.size, dtype=torch.bool)
            mask[c.order[:n]] = True
            removed[c.group.index] = mask
    return removed


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
    allocation: str | Mapping[str, float],
    round_to: int | None,
) -> dict[int, Tensor]:
    value, limit, unit = measure
    if isinstance(allocation, Mapping):
        # a ratio map found by a search (or written by hand) is taken as it is; the budget
        # must hold, since nothing is searched
        removed = _removal(cands, 1.0, allocation, round_to)
        if value(removed) > limit:
            raise BudgetError(
                f"the ratio map leaves {value(removed):,.0f} {unit}, above the budget's "
                f"{limit:,.0f}; raise its ratios or the budget"
            )
        return removed
    full = _removal(cands, 1.0, allocation, round_to)
    if value(full) > limit:
        raise BudgetError(
            f"cannot reach {limit:,.0f} {unit}: removing every removable channel (within "
            f"max_ratio, ignored layers and pinned channels) leaves {value(full):,.0f}. Raise "
            "the budget, max_ratio, or prune layers that are ignored"
        )
    if value({}) <= limit:
        return {}
    lo, hi = 0.0, 1.0
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        if value(_removal(cands, mid, allocation, round_to)) <= limit:
            hi = mid
        else:
            lo = mid
    return _give_back(cands, _removal(cands, hi, allocation, round_to), value, limit, round_to)


def _give_back(
    cands: list[_Candidates],
    removed: dict[int, Tensor],
    value: Callable[[dict[int, Tensor]], float],
    limit: float,
    round_to: int | None,
) -> dict[int, Tensor]:
    """Put back the most important removed channels (a ``round_to`` step at a time) while the
    budget still holds: one step of the search can overshoot by a whole channel per group."""
    step = round_to or 1
    by_index = {c.group.index: c for c in cands}
    changed = True
    tries = 0
    while changed and tries < 20 * max(len(removed), 1):
        changed = False
        for gi in sorted(removed, key=lambda i: -int(removed[i].sum())):
            tries += 1
            c, mask = by_index[gi], removed[gi]
            n = int(mask.sum()) - step
            trial = dict(removed)
            if n > 0:
                fewer = torch.zeros_like(mask)
                fewer[c.order[:n]] = True
                trial[gi] = fewer
            else:
                del trial[gi]
            if value(trial) <= limit:
                removed, changed = trial, True
    return removed


@dataclass
class ShrinkConfig:
    """How channels are chosen (everything but the budget and the data).

    ``criterion``: a criterion object, registry name or ``{name: ..., **options}`` (default
    L2 group magnitude). ``allocation``: ``uniform``, ``global`` or a ratio map ``{group name
    or regex: fraction of its channels to remove}`` (what :func:`secateurs.search_allocation`
    finds; groups are named by the layer producing them). ``max_ratio``: the most a
    group may lose. ``round_to``: kept widths rounded up to a multiple. ``ignored_layers``:
    module names, regexes or modules whose output channels stay. ``strict``: an op without a
    channel rule is an error instead of keeping its channels.
    """

    criterion: Criterion | str | dict[str, Any] | None = None
    allocation: str | Mapping[str, float] = "uniform"
    max_ratio: float = 0.9
    round_to: int | None = None
    ignored_layers: Sequence[str | nn.Module] = ()
    calibration_batches: int = 8
    seed: int = 0
    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.allocation, Mapping) and self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"allocation {self.allocation!r} is not allowed; use one of {ALLOCATIONS} or a "
                "ratio map {group name: fraction removed} (sc.search_allocation finds one by "
                "sensitivity analysis, AMC or NetAdapt)"
            )
        if not 0 < self.max_ratio <= 1:
            raise ConfigError(f"max_ratio must be in (0, 1]; got {self.max_ratio!r}")
        r = self.round_to
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ConfigError(f"round_to must be a positive int (e.g. 8) or None; got {r!r}")
        self.criterion_ = _criterion(self.criterion)


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
    cfg = config or ShrinkConfig()
    budget = _budget(budget)
    graph, cands, ctx = channel_candidates(model, example_inputs, cfg, data, loss_fn, graph)
    measure = channel_measure(budget, graph, model, example_inputs)
    removed = _search(cands, measure, cfg.allocation, cfg.round_to)
    if isinstance(cfg.criterion_, ChannelCriterion) and removed:
        cfg.criterion_.refit(ctx, removed)
    return plan_from_removed(graph, removed), graph, removed


def channel_candidates(
    model: nn.Module,
    example_inputs: Inputs,
    config: ShrinkConfig,
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    graph: ChannelGraph | None = None,
) -> tuple[ChannelGraph, list[_Candidates], ChannelContext]:
    """The graph, and the removable channels of each group in the order they would go."""
    ignored = _ignored(model, config.ignored_layers)
    graph = graph or build_graph(model, example_inputs, strict=config.strict)
    if not graph.prunable_groups:
        raise ConfigError(
            f"{type(model).__name__} has no removable channels: every channel is pinned "
            f"({_pinned_summary(graph)})"
        )
    ctx = ChannelContext(
        model, graph, example_inputs, data, loss_fn, config.calibration_batches, config.seed
    )
    scores = channel_scores(config.criterion_, ctx)
    cands = _candidates(graph, scores, ignored, config.max_ratio)
    if isinstance(config.allocation, Mapping):
        check_ratio_map(config.allocation, [c.group.name for c in cands])
    return graph, cands, ctx


def _pinned_summary(graph: ChannelGraph) -> str:
    reasons = sorted({r for g in graph.groups for r in g.pinned_because})
    return "; ".join(reasons[:5]) or "no groups found"


def shrink(
    model: nn.Module,
    example_inputs: Inputs,
    budget: BudgetSpec,
    criterion: Criterion | str | dict[str, Any] | None = None,
    allocation: str | Mapping[str, float] = "uniform",
    max_ratio: float = 0.9,
    round_to: int | None = None,
    ignored_layers: Sequence[str | nn.Module] = (),
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    calibration_batches: int = 8,
    seed: int = 0,
    steps: int = 1,
    finetune: Callable[[nn.Module, int], None] | None = None,
    report: bool = False,
    strict: bool = False,
) -> Any:
    """Remove channels from a copy of ``model`` until ``budget`` is met; return the copy.

    ``budget``: ``sc.MACs(0.5)`` keeps half the MACs, ``sc.Params(0.6)`` 60% of the
    parameters, ``sc.Sparsity(0.3)`` removes 30% of the removable channels, ``sc.Bytes`` and
    ``sc.Latency`` bound the stored bytes and the latency measured on this machine (predicted
    by a per-layer look-up table). ``allocation``: ``"uniform"``, ``"global"`` or a ratio map
    from :func:`secateurs.search_allocation` (applied as it is, in one step). ``criterion``:
    any registered criterion (default L2 group magnitude); data-driven ones need ``data``
    (batches of ``(inputs, labels)``) and, for gradients, ``loss_fn``. ``ignored_layers``:
    module names, regexes or modules whose output channels stay. Operations secateurs has no
    channel rule for keep their channels (listed in the report's ``unhandled``); ``strict=True``
    makes them an error. With ``report=True`` the
    result is ``(model, ShrinkReport)``; the report's plan replays the surgery on a fresh
    instance of the original class (:func:`secateurs.graph.apply_plan_`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1; got {steps!r}")
    if isinstance(allocation, Mapping) and steps > 1:
        raise ConfigError("a ratio map is applied in one step: use steps=1 with it")
    budget = _budget(budget)
    # module objects only identify layers of `model`, not of its copy: use exact names
    ignored_names = [re.escape(n) for n in sorted(_ignored(model, ignored_layers))]
    config = ShrinkConfig(
        criterion, allocation, max_ratio, round_to, ignored_names, calibration_batches, seed, strict
    )
    start = time.perf_counter()
    small = copy.deepcopy(model)
    graph0 = build_graph(small, example_inputs, strict=strict)
    shapes = {ref.qualname: s for ref, s in graph0.shapes.items()}
    measure0 = channel_measure(budget, graph0, small, example_inputs) if steps > 1 else None
    plan = ChannelPlan()
    last_graph, removed = graph0, dict[int, Tensor]()
    for step in range(1, steps + 1):
        step_plan, last_graph, removed = plan_shrink(
            small,
            example_inputs,
            _step_budget(budget, step, steps, measure0) if measure0 else budget,
            config,
            data,
            loss_fn,
            graph0 if step == 1 else None,
        )
        apply_plan_(small, step_plan)
        plan = step_plan if step == 1 else plan.merged(step_plan, shapes)
        out = check_forward(small, lambda: run_example(small, example_inputs), f"step {step}")
        _check_outputs(graph0.output_shapes, out)
        if finetune is not None and step < steps:
            finetune(small, step)
    result = ShrinkReport(
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
    )
    return (small, result) if report else small


def plan_channel_count(graph: ChannelGraph, plan: ChannelPlan) -> int:
    """How many channels of ``graph`` a plan removes (counted on each group's producer)."""
    total = 0
    for g in graph.prunable_groups:
        m = g.members[0]
        gone = set(plan.removed.get(m.ref.qualname, {}).get(m.dim, []))
        total += len({int(m.channel[i]) for i in gone if int(m.channel[i]) >= 0})
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
