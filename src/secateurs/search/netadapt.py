"""NetAdapt: shrink one layer per iteration, fine-tune briefly, keep the best (Yang et al. 2018).

NetAdapt ("NetAdapt: Platform-Aware Neural Network Adaptation for Mobile Applications",
ECCV 2018, Algorithm 1) meets a resource budget by many small steps instead of one cut:

1. iteration ``i`` has a target: lower the resource by ``step * decay**i`` of the dense
   model's value (never below the budget's limit);
2. for each layer, find the *fewest* channels whose removal from that layer alone reaches the
   target (the resource is counted, not measured: bisection over the layer's channel count),
   remove them from a copy of the current model (channels chosen by the space's criterion on
   the current weights), fine-tune the copy for ``short_steps`` and evaluate it;
3. keep the candidate with the best score; it is the next iteration's model;
4. stop once the budget is met, then fine-tune the result for ``long_steps``.

The resource is whatever the channel space counts: :class:`~secateurs.Latency` (predicted by
the per-layer look-up table of :mod:`secateurs.graph.latency`, measured once on
this machine and cached, as in the paper), :class:`~secateurs.MACs`,
:class:`~secateurs.Params`, :class:`~secateurs.Bytes` or :class:`~secateurs.Sparsity`. It is
always counted on the *original* model's space with the current widths expressed as a ratio
map, so the table is built once and the limit means the same thing throughout; the candidates
are realised (physically pruned) on the current, fine-tuned model. A layer never loses more
of its original channels than the space's ``max_ratio`` allows.

The candidates of one iteration are independent: a :class:`~secateurs.backends.Backend`
(``backend``, ``workers``, as for the sensitivity scan) cuts, fine-tunes and scores them,
the current model shared once with every worker. Each candidate's fine-tuning starts from a
random state seeded by the search's seed, the iteration and the layer, so the winner, and the
whole search, do not depend on the backend or on the order the candidates finish in.

Unlike the other searches this one produces a trained model: :class:`SearchResult` has it in
``model``, and ``ratios`` says how far each group of the original model was cut (use them
with :func:`secateurs.shrink` to cut a fresh copy the same way).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from secateurs.backends import Backend, Failure, backend_of
from secateurs.budgets import Budget
from secateurs.errors import BudgetError, ConfigError
from secateurs.search.base import (
    SEARCHES,
    AllocationSearch,
    Evaluator,
    Finetuner,
    SearchContext,
    SearchResult,
)
from secateurs.search.space import ChannelSpace, LayerSpace, RatioMap

#: Relative slack when comparing a value with a limit or a target (float counts).
TOLERANCE = 1e-9


def _count(value: object, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"netadapt {name} must be an int >= {least}; got {value!r}")
    return value


def _fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"netadapt {name} must be a number in (0, 1]; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Candidate:
    """One candidate of an iteration: cut ``layer`` of the current model by ``ratio``, then
    fine-tune it from a random state seeded by ``seed``."""

    layer: str
    ratio: float
    seed: int


#: What every candidate of an iteration shares: the current model's space, the fine-tuning
#: and evaluation callables, and the short-term fine-tuning steps.
Shared = tuple[ChannelSpace, Finetuner | None, Evaluator, int]


def try_candidate(shared: Shared, candidate: Candidate) -> tuple[float, nn.Module]:
    """``(score, model)`` of one candidate: cut, fine-tuned for the short-term steps and
    evaluated (the caller checks the score). The caller's random state is left as it was."""
    space, finetune, evaluate, steps = shared
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(candidate.seed)
        model = space.realize({candidate.layer: candidate.ratio})
        if steps > 0:
            assert finetune is not None
            finetune(model, steps)
        return evaluate(model), model


@SEARCHES.register("netadapt")
@dataclass
class NetAdapt(AllocationSearch):
    """NetAdapt over removed channels; needs ``finetune=`` (Yang et al. 2018).

    ``step``: the resource reduction asked of the first iteration, as a fraction of the dense
    model's value (the paper uses about 1-2% of latency on MobileNets; a larger step means
    fewer, coarser iterations). ``decay``: each iteration's reduction is the previous one
    times this (the paper's schedule shrinks the step as the network gets smaller).
    ``short_steps``: fine-tuning steps given to every candidate before it is scored (0: score
    it as cut). ``long_steps``: fine-tuning steps given to the final model. ``max_iterations``:
    a budget not met after this many iterations is a :class:`~secateurs.BudgetError`.
    ``workers`` and ``backend``: how many candidates are tried at once and where (as for
    :class:`~secateurs.search.sensitivity.Sensitivity`: ``local`` for one worker, ``fork``
    for more, or ``ray``).
    """

    step: float = 0.05
    decay: float = 0.96
    short_steps: int = 20
    long_steps: int = 200
    max_iterations: int = 100
    workers: int = 1
    backend: str | Mapping[str, Any] | Backend | None = None

    needs_finetune: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.step = _fraction(self.step, "step (a fraction of the dense value)")
        self.decay = _fraction(self.decay, "decay (the step's factor per iteration)")
        self.short_steps = _count(self.short_steps, "short_steps", 0)
        self.long_steps = _count(self.long_steps, "long_steps", 0)
        self.max_iterations = _count(self.max_iterations, "max_iterations", 1)
        self.backend_: Backend = backend_of(self.backend, self.workers)

    def search(self, space: LayerSpace, budget: Budget, ctx: SearchContext) -> SearchResult:
        if not isinstance(space, ChannelSpace):
            raise ConfigError(
                "netadapt removes channels and fine-tunes the smaller model: use "
                f"space='channels' (got {space.description})"
            )
        if ctx.finetune is None:
            raise ConfigError(
                "netadapt fine-tunes each candidate: pass finetune=<callable(model, steps) that "
                "trains the model in place>"
            )
        criterion = space.config.criterion_
        if criterion.needs_data:
            raise ConfigError(
                f"netadapt re-ranks channels on every fine-tuned model, without calibration "
                f"data; criterion {criterion.registry_name!r} needs data. Use a data-free "
                "criterion (e.g. 'magnitude', 'bn_scale', 'fpgm')"
            )
        run = _Run(self, space, budget, ctx)
        with self.backend_.session():
            return run.search()


class _Run:
    """The state of one NetAdapt search (widths are counted in channels of each group)."""

    def __init__(
        self, options: NetAdapt, space: ChannelSpace, budget: Budget, ctx: SearchContext
    ) -> None:
        self.options = options
        self.space = space
        self.budget = budget
        self.ctx = ctx
        self.original = {layer.name: layer.size for layer in space.layers}
        # the most channels each group may lose in all (the space's cap on the original)
        self.cap = {
            layer.name: round(layer.max_ratio * layer.size + TOLERANCE) for layer in space.layers
        }
        self.widths = dict(self.original)
        self.limit = space.limit(budget)
        self.unit = space.unit(budget)

    def ratios(self, widths: dict[str, int]) -> RatioMap:
        """Widths as fractions removed from the original groups."""
        return {n: (size - widths[n]) / size for n, size in self.original.items()}

    def value(self, widths: dict[str, int]) -> float:
        return self.space.measure(self.budget, self.ratios(widths))

    def met(self, value: float, bound: float) -> bool:
        return value <= bound + TOLERANCE * max(abs(bound), 1.0)

    def current_space(self, model: nn.Module) -> ChannelSpace:
        """The channel space of the current model, ranked by the search space's criterion.

        Its ``max_ratio`` is 1: the cap on what a group may lose is the original one, enforced
        by the search, not a fraction of what is left.
        """
        # the space's selectors are names (never module objects), so they hold on a copy
        config = dataclasses.replace(self.space.config, max_ratio=1.0)
        return ChannelSpace(model, self.space.example_inputs, config)

    def search(self) -> SearchResult:
        opts, ctx = self.options, self.ctx
        dense = self.value(self.widths)
        value = dense
        model = copy.deepcopy(self.space.model)
        iterations: list[dict[str, Any]] = []
        step = opts.step * dense
        while not self.met(value, self.limit):
            i = len(iterations)
            if i >= opts.max_iterations:
                raise BudgetError(
                    f"netadapt did not meet {self.budget} in {opts.max_iterations} iterations: "
                    f"it reached {value:,.4g} {self.unit} (allowed {self.limit:,.4g}). Raise "
                    "max_iterations or step, or lower decay"
                )
            target = max(value - step, self.limit)
            model, record = self.iteration(i, model, value, target)
            value = record["value"]
            iterations.append(record)
            ctx.say(
                f"iteration {i + 1}: {record['layer']} to {record['width']} channels, "
                f"{value:,.4g} {self.unit} (target {target:,.4g}, allowed {self.limit:,.4g}), "
                f"score {record['score']:.4f} of {len(record['candidates'])} candidates"
            )
            step *= opts.decay
        if opts.long_steps > 0:
            assert ctx.finetune is not None
            ctx.finetune(model, opts.long_steps)
        score = ctx.score(model)
        ratios = self.ratios(self.widths)
        return SearchResult(
            method="netadapt",
            ratios=self.space.layer_map(ratios),
            value=self.value(self.widths),
            limit=self.limit,
            unit=self.unit,
            score=score,
            history={
                "dense": dense,
                "widths": dict(self.widths),
                "original_widths": dict(self.original),
                "iterations": iterations,
            },
            model=model,
        )

    def iteration(
        self, i: int, model: nn.Module, value: float, target: float
    ) -> tuple[nn.Module, dict[str, Any]]:
        """One NetAdapt iteration from ``model``: the best single-layer candidate that
        brings the value to ``target`` or below, fine-tuned briefly."""
        ctx = self.ctx
        current = self.current_space(model)
        sizes = {layer.name: layer for layer in current.layers if layer.name in self.original}
        for name, layer in sizes.items():
            self.widths[name] = layer.size  # the truth is the model (they agree)
        planned: list[tuple[Candidate, dict[str, Any]]] = []  # what to try, its record so far
        skipped: list[dict[str, Any]] = []
        for order, (name, layer) in enumerate(sizes.items()):
            size = layer.size
            lost = self.original[name] - size
            room = min(self.cap[name] - lost, round(layer.max_ratio * size + TOLERANCE))
            if room < 1:
                skipped.append({"layer": name, "reason": "at its max_ratio"})
                continue

            def removed(n: int, name: str = name, size: int = size) -> int:
                """Channels actually removed when ``n`` are asked (widths may be rounded)."""
                mask = current.removed({name: n / size}).values()
                return sum(int(m.sum()) for m in mask)

            def value_at(n: int, name: str = name, size: int = size) -> float:
                widths = dict(self.widths)
                widths[name] = size - removed(n)
                return self.value(widths)

            floor = value_at(room)
            if not self.met(floor, target):
                skipped.append({"layer": name, "reason": "cannot give the step", "value": floor})
                continue
            lo, hi = 0, room  # value_at(lo) > target >= value_at(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self.met(value_at(mid), target):
                    hi = mid
                else:
                    lo = mid
            n = removed(hi)
            seed = ctx.seed * 1_000_003 + i * 1009 + order
            record = {"layer": name, "removed": n, "width": size - n, "value": value_at(hi)}
            planned.append((Candidate(name, hi / size, seed), record))
        candidates, best = self.try_all(planned, current)
        if best is None:
            reachable = min((s["value"] for s in skipped if "value" in s), default=value)
            raise BudgetError(
                f"netadapt iteration {i + 1}: no single layer can lower the value from "
                f"{value:,.4g} to {target:,.4g} {self.unit} (one layer alone reaches "
                f"{reachable:,.4g} at best); the smallest value reached is {value:,.4g} "
                f"{self.unit}, the budget allows {self.limit:,.4g}. Lower step or raise the "
                "budget or max_ratio"
            )
        score, new_value, _, name, width, chosen = best
        self.widths[name] = width
        record = {
            "iteration": i + 1,
            "layer": name,
            "width": width,
            "value": new_value,
            "target": target,
            "score": score,
            "candidates": candidates,
            "skipped": skipped,
        }
        return chosen, record

    def try_all(
        self, planned: list[tuple[Candidate, dict[str, Any]]], current: ChannelSpace
    ) -> tuple[list[dict[str, Any]], tuple[float, float, int, str, int, nn.Module] | None]:
        """Fine-tune and score every planned candidate on the search's backend.

        Returns their records (in layer order, each with its ``score``) and the best one as
        ``(score, value, -order, layer, width, model)``: highest score, then lowest value,
        then the first layer; only the best model is kept while the others arrive.
        """
        ctx, opts = self.ctx, self.options
        shared: Shared = (current, ctx.finetune, ctx.evaluate, opts.short_steps)
        best: tuple[float, float, int, str, int, nn.Module] | None = None
        items = [candidate for candidate, _ in planned]
        with closing(opts.backend_.map(try_candidate, items, shared)) as outcomes:
            for k, outcome in outcomes:
                candidate, record = planned[k]
                ctx.evaluations += 1
                if isinstance(outcome, Failure):
                    outcome.raise_(f"fine-tuning or evaluating the candidate for {candidate.layer}")
                score, model = ctx.check(outcome[0]), outcome[1]
                record["score"] = score
                if best is None or (score, -record["value"], -k) > (best[0], -best[1], best[2]):
                    best = (score, record["value"], -k, candidate.layer, record["width"], model)
        return [record for _, record in planned], best
