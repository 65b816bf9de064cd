"""Automatic per-layer ratios: searches that turn a budget into a ratio map.

Layers differ in how much they can lose, and hand-tuned ratios do not transfer. A search
(:class:`AllocationSearch`, registered in :data:`SEARCHES`: ``sensitivity``, ``amc``,
``netadapt``) walks a :class:`~secateurs.search.space.LayerSpace` and returns a
:class:`SearchResult` whose ``ratios`` feed the usual pruning: a
:class:`~secateurs.LayerMap` for masks, ``allocation=`` of :func:`secateurs.shrink` for
channels. :func:`search_allocation` is the one entry point.

Every search is guarded the same way: the evaluation must return a finite number (else a
:class:`~secateurs.ModelError`), the calibration split must not be empty, and whatever goes
wrong, the model's parameters and buffers are put back as they were before the search.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from secateurs.allocation import LayerMap
from secateurs.budgets import BUDGETS, Budget
from secateurs.calibration import LossFn, batchnorm_recalibrated
from secateurs.errors import ConfigError, DataError, ModelError, SecateursError
from secateurs.metrics import evaluate
from secateurs.registry import Registry
from secateurs.running import Inputs
from secateurs.search.space import ChannelSpace, ElementSpace, LayerSpace

#: ``evaluate(model) -> score``, higher is better (accuracy, or minus the loss).
Evaluator = Callable[[nn.Module], float]
#: ``finetune(model, steps)``: train a (pruned) model in place for a short while.
Finetuner = Callable[[nn.Module, int], None]
#: ``progress(message)``: one line per episode / iteration.
Progress = Callable[[str], None]


@dataclass
class SearchResult:
    """What a search found: a ratio map that meets the budget, and how it got there.

    ``ratios``: layer name -> fraction removed, a :class:`~secateurs.LayerMap` (layers it
    does not name lose nothing) that ``sc.shrink`` (channels) and ``sc.prune_`` (masks) take
    as ``allocation=``. ``value``/``limit``: the budget's quantity for
    the map and the most allowed (``unit`` says what it counts). ``score``: the evaluation of
    the pruned model without fine-tuning (when the search measured it). ``history``: what the
    search recorded per step (curves, episodes, iterations), JSON-ready. ``model``: a pruned,
    fine-tuned model when the search produces one (NetAdapt), else None.
    """

    method: str
    ratios: LayerMap
    value: float
    limit: float
    unit: str
    score: float | None = None
    seconds: float = 0.0
    evaluations: int = 0
    history: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.ratios, LayerMap):
            self.ratios = LayerMap(dict(self.ratios), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON form (without the model)."""
        return {
            "method": self.method,
            "ratios": dict(self.ratios),
            "value": self.value,
            "limit": self.limit,
            "unit": self.unit,
            "score": self.score,
            "seconds": self.seconds,
            "evaluations": self.evaluations,
            "history": self.history,
        }


@dataclass
class SearchContext:
    """What a search may use besides the space and the budget."""

    evaluate: Evaluator  #: checked: raises ModelError on a non-finite score
    finetune: Finetuner | None = None
    progress: Progress | None = None
    seed: int = 0
    evaluations: int = 0

    def score(self, model: nn.Module) -> float:
        """Evaluate ``model``, counting the call; a failure or NaN is a clear error."""
        self.evaluations += 1
        try:
            value = self.evaluate(model)
        except SecateursError:
            raise
        except Exception as exc:
            raise ModelError(f"the evaluation function raised {type(exc).__name__}: {exc}") from exc
        return self.check(value)

    @staticmethod
    def check(value: object) -> float:
        """``value`` as a float, if it is a finite number (what an evaluation must return)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelError(f"the evaluation function must return a number; got {value!r}")
        if not math.isfinite(value):
            raise ModelError(
                f"the evaluation function returned {value}; it must be a finite score (higher "
                "is better). Check the model's outputs on the calibration split"
            )
        return float(value)

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


class AllocationSearch(ABC):
    """Base class: find a ratio map on ``space`` that meets ``budget``."""

    registry_name: ClassVar[str]
    #: True when the search fine-tunes (it then needs ``finetune=``)
    needs_finetune: ClassVar[bool] = False

    @abstractmethod
    def search(self, space: LayerSpace, budget: Budget, ctx: SearchContext) -> SearchResult:
        """Search; ``space.check(budget)`` has passed; leave the model as it was."""


SEARCHES: Registry[AllocationSearch] = Registry("allocation search", AllocationSearch)


def accuracy_evaluator(
    data: Iterable[Any],
    metric: str = "accuracy",
    calibration_batches: int | None = None,
    loss_fn: LossFn | None = None,
    adapt_bn: bool = True,
) -> Evaluator:
    """An evaluator over a held-out calibration split of ``(inputs, labels)`` batches.

    ``metric``: ``accuracy`` (top-1) or ``loss`` (the score is minus the mean loss, so higher
    stays better). The first ``calibration_batches`` batches (all by default) are kept in memory once, so
    every evaluation sees the same examples. ``adapt_bn``: before each evaluation, re-estimate
    the BatchNorm statistics on those batches (restored afterwards; see
    :func:`~secateurs.calibration.batchnorm_recalibrated`). Without it a VGG-BN with half its
    MACs removed scores near chance whatever the ratios, and the searches have nothing to go
    on; with it the score ranks candidates by how they do after fine-tuning.
    """
    if metric not in ("accuracy", "loss"):
        raise ConfigError(f"metric must be 'accuracy' or 'loss'; got {metric!r}")
    kept = []
    for i, batch in enumerate(data):
        if calibration_batches is not None and i >= calibration_batches:
            break
        kept.append(batch)
    if not kept:
        raise DataError(
            "the calibration split is empty: pass data= with at least one (inputs, labels) "
            "batch held out from training"
        )

    def run(model: nn.Module) -> float:
        with batchnorm_recalibrated(model, kept) if adapt_bn else nullcontext():
            result = evaluate(model, kept, loss_fn=loss_fn)
        return result.accuracy if metric == "accuracy" else -result.loss

    return run


SPACES: dict[str, Callable[..., LayerSpace]] = {"elements": ElementSpace, "channels": ChannelSpace}


def search_allocation(
    model: nn.Module,
    example_inputs: Inputs | None,
    budget: Budget | str | Mapping[str, Any],
    method: AllocationSearch | str | Mapping[str, Any] = "sensitivity",
    *,
    space: str | LayerSpace = "channels",
    data: Iterable[Any] | None = None,
    evaluate: Evaluator | None = None,
    finetune: Finetuner | None = None,
    progress: Progress | None = None,
    seed: int = 0,
    adapt_bn: bool = True,
    **space_options: Any,
) -> SearchResult:
    """Find per-layer ratios that meet ``budget`` by sensitivity analysis, AMC or NetAdapt.

    ``space``: ``"channels"`` (removed channels; ``space_options`` are those of
    :class:`~secateurs.shrink.ShrinkConfig`: ``criterion``, ``max_ratio``, ``round_to``,
    ``include``, ``exclude``, ...) or ``"elements"`` (masks; those of
    :class:`~secateurs.pruner.PruneConfig`: ``structure``, ``criterion``, ``include``,
    ``exclude``, ...), or a space already built; ``loss_fn`` among them is used by
    data-driven criteria, which read ``data`` too. ``evaluate(model) -> score`` (higher is better) defaults to top-1
    accuracy on ``data``, a held-out calibration split, with the BatchNorm statistics of each
    candidate re-estimated on it first (``adapt_bn``; see :func:`accuracy_evaluator`).
    ``finetune(model, steps)`` is needed
    by NetAdapt. The model is left as it was, also when the search fails.

    ``result.ratios`` is a :class:`~secateurs.LayerMap`: ``sc.shrink(model, x, budget,
    allocation=result.ratios)`` removes channels by it, ``sc.prune_(model,
    allocation=result.ratios)`` masks by it.
    """
    searcher = SEARCHES.build(method)
    budget_ = BUDGETS.build(budget)
    if evaluate is None:
        if data is None:
            raise ConfigError(
                "a search needs to evaluate candidates: pass data=<held-out (inputs, labels) "
                "batches> or evaluate=<callable(model) -> score>"
            )
        evaluate = accuracy_evaluator(data, adapt_bn=adapt_bn)
    if searcher.needs_finetune and finetune is None:
        raise ConfigError(
            f"{searcher.registry_name} fine-tunes each candidate: pass finetune=<callable("
            "model, steps) that trains the model in place>"
        )
    if isinstance(space, str):
        if example_inputs is None and space == "channels":
            raise ConfigError("removing channels needs example_inputs to trace the model")
        if space not in SPACES:
            raise ConfigError(f"space must be one of {sorted(SPACES)}; got {space!r}")
        space_ = SPACES[space](model, example_inputs, data=data, seed=seed, **space_options)
    else:
        space_ = space
    space_.check(budget_)
    state = space_.snapshot()
    ctx = SearchContext(evaluate, finetune, progress, seed)
    start = time.perf_counter()
    try:
        result = searcher.search(space_, budget_, ctx)
    except BaseException:
        space_.restore(state)
        raise
    space_.restore(state)
    result.seconds = time.perf_counter() - start
    result.evaluations = ctx.evaluations
    return result
