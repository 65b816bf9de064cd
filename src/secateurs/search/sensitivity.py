"""Sensitivity analysis: prune one layer at a time, measure the damage, then pick a threshold.

For each layer L and each ratio r of a grid (default 0, 0.1, ..., 0.9), prune only L by r,
evaluate on a held-out calibration split, restore (Han et al. 2015; Li et al. 2017 for
channels). Each layer's curve gives its accuracy drop as a function of its ratio. One
threshold T on the drop then gives every layer the largest ratio whose drop stays under T
(linear between grid points, on the curve made non-decreasing so a lucky dip cannot pull a
layer past a worse point); T is bisected until the budget is met, which needs no evaluation
since the budget is counted from the ratio map alone.

The scan is embarrassingly parallel and its work unit, :class:`ScanTask` (one layer, one
ratio) run by :func:`run_task`, is self-contained: a :class:`~secateurs.backends.Backend`
runs the tasks (``backend``: ``local`` in this process, ``fork`` in forked worker processes,
which need neither the model nor the evaluator to pickle, or ``ray`` on a Ray cluster), with
the space and the evaluator shared once with every worker. The curves and the ratio map do not
depend on the backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from secateurs.backends import Backend, Failure, backend_of
from secateurs.budgets import Budget
from secateurs.errors import BudgetError, ConfigError
from secateurs.search.base import (
    SEARCHES,
    AllocationSearch,
    SearchContext,
    SearchResult,
)
from secateurs.search.space import LayerSpace, RatioMap

#: ``{layer: [(ratio, score), ...]}`` in ratio order, ratio 0 first.
Curves = dict[str, list[tuple[float, float]]]
BISECTION_STEPS = 60
#: Slope added to every drop curve, per unit of ratio (far below any measurable drop).
TIE = 1e-9


@dataclass(frozen=True)
class ScanTask:
    """One unit of the scan: prune ``layer`` alone by ``ratio`` and evaluate."""

    layer: str
    ratio: float


def run_task(space: LayerSpace, task: ScanTask, evaluate: Callable[[nn.Module], float]) -> float:
    """The score of the model with only ``task.layer`` pruned by ``task.ratio`` (restored
    afterwards)."""
    with space.applied({task.layer: task.ratio}) as model:
        return evaluate(model)


def _scan_one(shared: tuple[LayerSpace, Callable[[nn.Module], float]], task: ScanTask) -> float:
    """:func:`run_task` as a backend task: the space and the evaluator are the shared object."""
    space, evaluate = shared
    return run_task(space, task, evaluate)


def _default_grid() -> tuple[float, ...]:
    return tuple(round(0.1 * i, 1) for i in range(10))


@SEARCHES.register("sensitivity")
@dataclass
class Sensitivity(AllocationSearch):
    """Per-layer sensitivity scan, then one drop threshold bisected to meet the budget.

    ``ratios``: the grid each layer is scanned at (0 is always included). ``workers``: how
    many evaluations run at once. ``backend``: where they run, a name of
    :data:`~secateurs.backends.BACKENDS` (``local``, ``fork``, ``ray``), ``{"name": ...,
    **options}`` (``{"name": "ray", "address": "10.0.0.5:6379"}``) or a
    :class:`~secateurs.backends.Backend`; by default ``local`` for one worker, ``fork`` for
    more. A layer is scanned only up to its ``max_ratio``.
    """

    ratios: Sequence[float] = field(default_factory=_default_grid)
    workers: int = 1
    backend: str | Mapping[str, Any] | Backend | None = None

    def __post_init__(self) -> None:
        grid = list(self.ratios)
        if not grid or any(
            isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1 for r in grid
        ):
            raise ConfigError(
                f"sensitivity ratios must be a non-empty list of numbers in [0, 1); got {grid!r}"
            )
        self.ratios = tuple(sorted({0.0, *(float(r) for r in grid)}))
        self.backend_: Backend = backend_of(self.backend, self.workers)

    # -- the scan -----------------------------------------------------------------------
    def tasks(self, space: LayerSpace) -> list[ScanTask]:
        """Every (layer, ratio) to evaluate, ratio 0 excluded (that is the baseline)."""
        return [
            ScanTask(layer.name, r)
            for layer in space.layers
            for r in self.ratios
            if 0 < r <= layer.max_ratio + 1e-12
        ]

    def scan(self, space: LayerSpace, ctx: SearchContext) -> tuple[float, Curves]:
        """The unpruned score and every layer's curve of scores."""
        baseline = ctx.score(space.model)
        tasks = self.tasks(space)
        scores = self._run(space, tasks, ctx)
        curves: Curves = {layer.name: [(0.0, baseline)] for layer in space.layers}
        for task, score in zip(tasks, scores, strict=True):
            curves[task.layer].append((task.ratio, score))
        for name, curve in curves.items():
            worst = min(s for _, s in curve)
            ctx.say(f"{name}: {len(curve)} ratios, worst drop {baseline - worst:.4f}")
        return baseline, curves

    def _run(self, space: LayerSpace, tasks: list[ScanTask], ctx: SearchContext) -> list[float]:
        """Every task's score, in task order, whatever order the backend finishes them in; the
        first failure stops the scan as a clear error."""
        scores: list[float] = [0.0] * len(tasks)
        with closing(self.backend_.map(_scan_one, tasks, (space, ctx.evaluate))) as outcomes:
            for i, outcome in outcomes:
                ctx.evaluations += 1
                if isinstance(outcome, Failure):
                    outcome.raise_("the evaluation function")
                scores[i] = ctx.check(outcome)
        return scores

    # -- the threshold ------------------------------------------------------------------
    def search(self, space: LayerSpace, budget: Budget, ctx: SearchContext) -> SearchResult:
        baseline, curves = self.scan(space, ctx)
        drops = {name: _envelope(baseline, curve) for name, curve in curves.items()}
        limit = space.limit(budget)

        def ratios_at(t: float) -> RatioMap:
            return {name: _largest_under(d, t) for name, d in drops.items()}

        top = max(max(d for _, d in env) for env in drops.values())
        loosest = ratios_at(top + 1.0)
        if space.measure(budget, loosest) > limit * (1 + 1e-9):
            raise BudgetError(
                f"no ratio map from the scanned grid meets {budget}: pruning every layer to its "
                f"largest scanned ratio leaves {space.measure(budget, loosest):,.4g} "
                f"{space.unit(budget)} (allowed {limit:,.4g}). The smallest reachable value on "
                f"this grid is {space.measure(budget, loosest):,.4g}; add larger ratios or raise "
                "the budget"
            )
        lo, hi = 0.0, top + 1.0
        if space.measure(budget, ratios_at(lo)) <= limit:
            hi = lo
        else:
            for _ in range(BISECTION_STEPS):
                mid = (lo + hi) / 2
                if space.measure(budget, ratios_at(mid)) <= limit:
                    hi = mid
                else:
                    lo = mid
        ratios = ratios_at(hi)
        with space.applied(ratios) as model:
            score = ctx.score(model)
        ctx.say(
            f"threshold {hi:.4f}: {space.measure(budget, ratios):,.4g} {space.unit(budget)} "
            f"(allowed {limit:,.4g}), score {score:.4f} (unpruned {baseline:.4f})"
        )
        return SearchResult(
            method="sensitivity",
            ratios=space.layer_map(ratios),
            value=space.measure(budget, ratios),
            limit=limit,
            unit=space.unit(budget),
            score=score,
            history={
                "baseline": baseline,
                "threshold": hi,
                "curves": {n: [list(p) for p in c] for n, c in curves.items()},
            },
        )


def _envelope(baseline: float, curve: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``(ratio, drop)`` made increasing in the ratio: the running maximum of the drop, plus a
    tiny slope (:data:`TIE` per unit of ratio) so that flat stretches (layers that lose nothing)
    do not all jump to their largest ratio at one threshold: the budget is then met closely
    instead of overshot, with such layers pruned alike."""
    out, worst = [], 0.0
    for r, score in sorted(curve):
        worst = max(worst, baseline - score)
        out.append((r, worst + TIE * r))
    return out


def _largest_under(env: list[tuple[float, float]], t: float) -> float:
    """The largest ratio whose (interpolated) drop is at most ``t``."""
    best = 0.0
    for (r0, d0), (r1, d1) in itertools.pairwise(env):
        if d1 <= t:
            best = r1
            continue
        if d0 <= t < d1:
            best = r0 + (r1 - r0) * (t - d0) / (d1 - d0)
        break
    return best
