"""The pruning methods a benchmark grid can name, found through a registry.

Each method is a small dataclass whose fields are the options a grid may set. It prunes a copy
of the dense model to one budget point and returns a :class:`Pruned`: the model to fine-tune,
an optional per-step hook (for schedules that prune during fine-tuning) and a ``finish``
step that leaves a plain ``nn.Module`` (masks baked in). The harness owns everything else
(the dense weights, the fine-tuning, the measurements), so every method is compared on the
same work. A new method is one registered class; ``secateurs`` passes structure, criterion,
allocation and schedule options straight to :class:`secateurs.Pruner`, so most new methods
need no class at all.

Budget kinds: ``sparsity`` is the fraction of the targeted weights removed; ``params`` and
``macs`` are the fraction of the model's parameters / multiply-accumulates kept.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import secateurs as sc
from secateurs.errors import ConfigError
from secateurs.metrics import profile
from secateurs.recipe import PruneSection
from secateurs.registry import Registry
from secateurs.shrink import ShrinkConfig

#: Budget kinds a grid may declare.
BUDGET_KINDS = ("sparsity", "params", "macs")

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class BudgetPoint:
    """One budget of a grid: ``kind`` (one of :data:`BUDGET_KINDS`) and its ``value``."""

    kind: str
    value: float

    @property
    def label(self) -> str:
        """``"sparsity=0.9"``: the budget's part of a run's key."""
        return f"{self.kind}={self.value:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}


@dataclass
class PruneContext:
    """What a method may use besides the model: an example input, data, the seed.

    ``train_loader`` is the fine-tuning loader (its batches serve as calibration data for
    data-driven criteria); ``steps_per_epoch`` and ``finetune_epochs`` let a schedule be given
    in epochs. A method that needs the fine-tuning optimizer (sparse training resets its
    state) gets it from :meth:`optimizer`, and fine-tuning then uses that same optimizer.
    """

    example: Tensor
    train_loader: Iterable[Any]
    steps_per_epoch: int
    finetune_epochs: int
    seed: int
    loss_fn: LossFn
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    optimizer_: torch.optim.Optimizer | None = field(default=None, init=False)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The fine-tuning optimizer of ``model`` (created once, then shared with the loop)."""
        if self.optimizer_ is None:
            self.optimizer_ = self.make_optimizer(model)
        return self.optimizer_


def _identity(model: nn.Module) -> nn.Module:
    return model


@dataclass
class Pruned:
    """A method's result: the model to fine-tune, a per-step hook, and how to finish it.

    ``on_step(step)`` runs after every fine-tuning optimizer step; ``finish(model)`` runs
    after fine-tuning and returns a plain module (masks baked in). ``info`` is recorded in the
    run's config (a searched ratio, search time).
    """

    model: nn.Module
    on_step: Callable[[int], object] | None = None
    finish: Callable[[nn.Module], nn.Module] = _identity
    info: dict[str, Any] = field(default_factory=dict)


class BenchMethod(ABC):
    """A pruning method the harness can run at one budget point."""

    #: Budget kinds the method accepts (a grid giving it another is rejected up front).
    budget_kinds: ClassVar[tuple[str, ...]] = ()
    #: Whether it removes channels (the model gets smaller) rather than masking weights.
    structural: ClassVar[bool] = False

    @abstractmethod
    def prune(self, model: nn.Module, budget: BudgetPoint, ctx: PruneContext) -> Pruned:
        """Prune ``model`` (a copy the harness owns) to ``budget``."""

    def check(self) -> None:  # noqa: B027 - most methods have nothing to check
        """Raise :class:`ConfigError` if the options cannot work (called before any run)."""


METHODS: Registry[BenchMethod] = Registry("bench method")


def _sc_budget(budget: BudgetPoint) -> dict[str, Any]:
    if budget.kind == "sparsity":
        return {"sparsity": budget.value}
    if budget.kind == "params":
        return {"budget": sc.Params(budget.value)}
    return {"budget": sc.MACs(budget.value)}


def _finish_masks(model: nn.Module) -> nn.Module:
    return sc.make_permanent_(model)


@dataclass
class _OneShot(BenchMethod):
    """Shared body of the one-shot element baselines: ``sc.prune_`` with a fixed plan."""

    budget_kinds: ClassVar[tuple[str, ...]] = ("sparsity", "params")
    criterion: ClassVar[Any] = "magnitude"
    allocation: ClassVar[Any] = "global"

    def prune(self, model: nn.Module, budget: BudgetPoint, ctx: PruneContext) -> Pruned:
        sc.prune_(
            model,
            criterion=self.criterion,
            allocation=self.allocation,
            seed=ctx.seed,
            **_sc_budget(budget),
        )
        return Pruned(model, finish=_finish_masks)


@METHODS.register("random")
@dataclass
class RandomPruning(_OneShot):
    """Random pruning, the same fraction in every layer: the floor any criterion must beat."""

    criterion: ClassVar[Any] = "random"
    allocation: ClassVar[Any] = "uniform"


@METHODS.register("global_magnitude")
@dataclass
class GlobalMagnitude(_OneShot):
    """One-shot magnitude pruning with one threshold over all layers (Han et al. 2015)."""

    criterion: ClassVar[Any] = "magnitude"
    allocation: ClassVar[Any] = "global"


@METHODS.register("layer_magnitude")
@dataclass
class LayerMagnitude(_OneShot):
    """One-shot magnitude pruning, the same sparsity in every layer."""

    criterion: ClassVar[Any] = "magnitude"
    allocation: ClassVar[Any] = "uniform"


@METHODS.register("secateurs")
@dataclass
class SecateursMethod(PruneSection, BenchMethod):
    """Any secateurs plan: the options of a recipe's ``prune:`` section
    (:class:`~secateurs.pruner.PruneConfig`: structure, criterion, allocation, schedule,
    include, exclude, ...), passed to ``sc.Pruner``.

    Options are registry specs as a recipe writes them (``criterion: {name: taylor}``). A
    schedule's times (``start``, ``end``, ``every``...) are in fine-tuning epochs, as in a
    recipe; a schedule other than one-shot prunes during fine-tuning. The budget comes from
    the grid's budget point, the seed from the run.
    """

    budget_kinds: ClassVar[tuple[str, ...]] = ("sparsity", "params")

    def check(self) -> None:
        """Options are checked when the method is built; the budget belongs to the grid."""
        if self.sparsity is not None or self.budget is not None:
            raise ConfigError(
                "a bench method takes its budget from the grid's budgets, not its own "
                "sparsity/budget options"
            )
        if self.searching:
            raise ConfigError("allocation searches are not a bench method option")

    def prune(self, model: nn.Module, budget: BudgetPoint, ctx: PruneContext) -> Pruned:
        config = dataclasses.replace(
            self.config(ctx.steps_per_epoch, ctx.seed), **_sc_budget(budget)
        )
        pruner = sc.Pruner(model, config=config, data=ctx.train_loader, loss_fn=ctx.loss_fn)
        steps = ctx.finetune_epochs * ctx.steps_per_epoch
        if pruner.last_step > steps:
            raise ConfigError(
                f"the schedule's last event is at step {pruner.last_step} but fine-tuning has "
                f"only {steps} steps ({ctx.finetune_epochs} epochs x {ctx.steps_per_epoch}); "
                "end the schedule earlier or raise finetune.epochs"
            )
        pruner.step()
        # the pruner resets the optimizer state of weights it grows, revives or rewinds
        pruner.optimizer = ctx.optimizer(model)
        one_shot = isinstance(pruner.schedule_, sc.OneShot)
        on_step = None if one_shot else (lambda _step: pruner.step())
        return Pruned(model, on_step=on_step, finish=_finish_masks)


def _prunable_pairs(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@METHODS.register("torch_prune")
@dataclass
class TorchPrune(BenchMethod):
    """Peer: ``torch.nn.utils.prune.global_unstructured`` with L1 over every Linear/Conv2d."""

    budget_kinds: ClassVar[tuple[str, ...]] = ("sparsity",)

    def prune(self, model: nn.Module, budget: BudgetPoint, ctx: PruneContext) -> Pruned:
        import torch.nn.utils.prune as tprune

        pairs = _prunable_pairs(model)
        tprune.global_unstructured(pairs, pruning_method=tprune.L1Unstructured, amount=budget.value)

        def finish(m: nn.Module) -> nn.Module:
            for module, name in _prunable_pairs(m):
                if tprune.is_pruned(module):
                    tprune.remove(module, name)
            return m

        return Pruned(model, finish=finish)


def _classifier(model: nn.Module) -> list[nn.Module]:
    """The last Linear layer: its outputs are the classes, never removed."""
    linears: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _macs(model: nn.Module, example: Tensor) -> int:
    return int(profile(model, example).totals["macs"] or 0)


#: Torch-Pruning importance criteria by option value.
_TP_IMPORTANCE: dict[str, Callable[[], Any]] = {
    "l2": lambda: __import__("torch_pruning").importance.GroupMagnitudeImportance(p=2),
    "l1": lambda: __import__("torch_pruning").importance.GroupMagnitudeImportance(p=1),
    "bn_scale": lambda: __import__("torch_pruning").importance.BNScaleImportance(),
}


@METHODS.register("torch_pruning")
@dataclass
class TorchPruning(BenchMethod):
    """Peer: Torch-Pruning (DepGraph) channel pruning, its ratio bisected to the MACs budget.

    ``importance``: ``l2``, ``l1`` or ``bn_scale``; ``global_pruning`` as in its MetaPruner.
    The bisection (``search_steps`` trials) is the harness's doing and is recorded apart
    from the time of the final prune.
    """

    budget_kinds: ClassVar[tuple[str, ...]] = ("macs",)
    structural: ClassVar[bool] = True

    importance: str = "l2"
    global_pruning: bool = False
    search_steps: int = 12

    def check(self) -> None:
        if self.importance not in _TP_IMPORTANCE:
            raise ConfigError(
                f"torch_pruning importance {self.importance!r} is unknown; allowed: "
                f"{', '.join(_TP_IMPORTANCE)}"
            )
        if isinstance(self.search_steps, bool) or not isinstance(self.search_steps, int):
            raise ConfigError(
                f"torch_pruning search_steps must be an int; got {self.search_steps!r}"
            )
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            raise ConfigError(
                "method torch_pruning needs the Torch-Pruning package: pip install torch-pruning"
            ) from None

    def _run(self, model: nn.Module, example: Tensor, ratio: float) -> nn.Module:
        import torch_pruning as tp

        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=_TP_IMPORTANCE[self.importance](),
            pruning_ratio=ratio,
            global_pruning=self.global_pruning,
            ignored_layers=_classifier(model),
        )
        pruner.step()
        return model

    def prune(self, model: nn.Module, budget: BudgetPoint, ctx: PruneContext) -> Pruned:
        t0 = time.perf_counter()
        dense = _macs(model, ctx.example)
        lo, hi = 0.0, 0.95
        for _ in range(self.search_steps):
            mid = (lo + hi) / 2
            trial = self._run(copy.deepcopy(model), ctx.example, mid)
            if _macs(trial, ctx.example) <= budget.value * dense:
                hi = mid
            else:
                lo = mid
        search = time.perf_counter() - t0
        small = self._run(model, ctx.example, hi)
        return Pruned(small, info={"pruning_ratio": hi, "search_seconds": search})


@METHODS.register("shrink")
@dataclass
class Shrink(ShrinkConfig, BenchMethod):
    """secateurs structural pruning: ``sc.shrink`` removes channels to a MACs/params budget.

    Options are those of :class:`~secateurs.shrink.ShrinkConfig` (``criterion``, default L2
    group magnitude; ``allocation``: ``uniform`` or ``global``; ``max_ratio``, ``round_to``,
    ``include``, ``exclude``, ...); data-driven criteria get the fine-tuning batches as
    calibration data. The seed comes from the run.
    """

    budget_kinds: ClassVar[tuple[str, ...]] = ("macs", "params")
    structural: ClassVar[bool] = True

    def check(self) -> None:
        if not isinstance(self.allocation, str):
            raise ConfigError(
                f"shrink allocation {self.allocation!r} is invalid; allowed: uniform, global"
            )

    def prune(self, model: nn.Module, budget: BudgetPoint, ctx: PruneContext) -> Pruned:
        sc_budget = sc.MACs(budget.value) if budget.kind == "macs" else sc.Params(budget.value)
        small = sc.shrink(
            model,
            ctx.example,
            sc_budget,
            dataclasses.replace(self, seed=ctx.seed),
            data=ctx.train_loader,
            loss_fn=ctx.loss_fn,
        )
        return Pruned(small)
