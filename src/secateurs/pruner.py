"""The pruner: a plan (structure, criterion, allocation, budget, schedule) applied to a model.

Data flows one way: the plan and the model's current weights decide masks; masks are computed
for every target before any is attached, so an error leaves the model untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.allocation import ALLOCATIONS, Allocation, Global, select_lowest
from secateurs.budgets import BUDGETS, Budget, Sparsity
from secateurs.calibration import LossFn, calibrate, dense_gradients
from secateurs.checks import check_sparsity
from secateurs.criteria import CRITERIA, ChannelCriterion, Criterion, Magnitude
from secateurs.errors import ConfigError
from secateurs.masks import remove_mask, set_mask
from secateurs.registry import to_spec
from secateurs.schedules import (
    SCHEDULES,
    Densify,
    DropGrow,
    OneShot,
    PruneTo,
    Remask,
    Rewind,
    Schedule,
    Snapshot,
)
from secateurs.sparse_training import WeightSnapshot, drop_and_grow, reset_optimizer_state
from secateurs.structures import STRUCTURES, Elements, GroupScores, Structure
from secateurs.targets import Selector, Target, find_targets

#: Pools up to this many elements keep their group scores between selection passes.
_CACHE_LIMIT = 1 << 25

Spec = str | Mapping[str, Any]


def compute_masks(
    targets: Sequence[Target],
    sparsity: float,
    *,
    structure: Structure,
    criterion: Criterion,
    allocation: Allocation,
    stats: Mapping[str, Mapping[str, Tensor]] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Keep-masks (bool, shaped like each tensor) that prune ``targets`` to ``sparsity``.

    Already-pruned groups stay pruned: the obtained sparsity is never below the current one.
    """
    for t in targets:
        structure.check(t)
    out: dict[str, Tensor] = {}
    for pool in allocation.pools(targets, sparsity):
        s = check_sparsity(pool.sparsity)
        if s < structure.min_sparsity() - 1e-9:
            raise ConfigError(
                f"{type(structure).__name__} always prunes at least {structure.min_sparsity():.4g}"
                f" of each tensor; asked {s:.4g}"
            )
        members = [targets[i] for i in pool.members]
        total = sum(t.numel for t in members)
        already = sum(int((~t.mask).sum()) for t in members if t.mask is not None)
        k = max(round(s * total), already)
        fns = [_score_fn(t, structure, criterion, allocation, stats, seed, total) for t in members]
        for t, prune in zip(members, select_lowest(fns, k), strict=True):
            out[t.name] = structure.expand(prune.logical_not_(), t)
    return out


def _score_fn(
    target: Target,
    structure: Structure,
    criterion: Criterion,
    allocation: Allocation,
    stats: Mapping[str, Mapping[str, Tensor]] | None,
    seed: int,
    pool_size: int,
) -> Callable[[], GroupScores]:
    def compute() -> GroupScores:
        with torch.no_grad():
            scores = criterion.scores(target, None if stats is None else stats[target.name], seed)
            groups = structure.group_scores(scores.cpu(), target, _cpu(target.mask))
            return allocation.transform(groups)

    if pool_size > _CACHE_LIMIT:
        return compute
    cached = compute()
    return lambda: cached


def _cpu(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.cpu()


def _nonzeros(target: Target) -> int:
    """Nonzeros of the effective tensor ``raw * mask``, without materialising it."""
    with torch.no_grad():
        mask = target.mask
        raw = target.raw
        return int(torch.count_nonzero(raw if mask is None else raw[mask]))


@dataclass
class PruneEvent:
    """One schedule event: when, what (``prune``, ``remask``, ``drop_grow``, ``densify``,
    ``snapshot``, ``rewind``), the sparsity asked, and the sparsity measured afterwards."""

    step: int
    target: float
    measured: float
    kind: str = "prune"


def _element_criterion(criterion: Criterion) -> Criterion:
    """``criterion``, unless it only scores whole channels (then it belongs to ``shrink``)."""
    if isinstance(criterion, ChannelCriterion):
        raise ConfigError(
            f"criterion {criterion.registry_name!r} scores whole channels of a traced model; "
            "use it with sc.shrink(model, example_inputs, budget=..., criterion=...), not for "
            "masks"
        )
    return criterion


@dataclass
class Pruner:
    """Prunes ``model`` according to a plan, one-shot or on a schedule inside a training loop.

    Typical use::

        pruner = sc.Pruner(model, sparsity=0.95, schedule=sc.Gradual(end=10_000, every=100))
        for batch in loader:
            ...; optimizer.step(); pruner.step()
        sc.make_permanent_(model)

    Every method argument accepts an object, a registry name (``criterion="obd"``) or a
    mapping ``{"name": ..., **options}``. ``sparsity`` is shorthand for ``Sparsity(sparsity)``;
    with an N:M structure and neither given, the sparsity is the pattern's ``1 - n/m``.
    Data-driven criteria (Taylor, OBD) need ``data`` (an iterable of ``(inputs, labels)``) and
    ``loss_fn``; they are calibrated on ``calibration_batches`` batches at each pruning event.
    RigL needs them too, for its dense gradients.

    Schedules that move, revive or rewind weights (SET, RigL, lottery tickets, DSD, IHT) should
    be given the training ``optimizer``: the momentum and Adam moments of a grown or rewound
    weight are reset, as the methods prescribe. Call ``step()`` once before the first
    optimizer step too, so step 0 (a sparse initialisation, the lottery's rewind point) sees
    the initial weights.
    """

    model: nn.Module = field(repr=False)
    sparsity: float | None = None
    budget: Budget | Spec | None = None
    structure: Structure | Spec | None = None
    criterion: Criterion | Spec | None = None
    allocation: Allocation | Spec | None = None
    schedule: Schedule | Spec | None = None
    include: Sequence[Selector] | None = None
    exclude: Sequence[Selector] | None = None
    params: Sequence[str] | None = None
    data: Iterable[Any] | None = field(default=None, repr=False)
    loss_fn: LossFn | None = field(default=None, repr=False)
    calibration_batches: int = 16
    seed: int = 0
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    steps_done: int = field(default=0, init=False)
    history: list[PruneEvent] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.structure_ = STRUCTURES.build(self.structure or Elements())
        self.criterion_ = _element_criterion(CRITERIA.build(self.criterion or Magnitude()))
        self.allocation_ = ALLOCATIONS.build(self.allocation or Global())
        self.schedule_ = SCHEDULES.build(self.schedule or OneShot())
        if self.sparsity is not None and self.budget is not None:
            raise ConfigError("give either sparsity= or budget=, not both")
        budget: Budget | Spec | None = self.budget
        if budget is None and self.sparsity is not None:
            budget = Sparsity(self.sparsity)
        if budget is None:
            floor = self.structure_.min_sparsity()
            if floor == 0:
                raise ConfigError(
                    "no target given: pass sparsity=<fraction in [0, 1)> or "
                    "budget=sc.Sparsity(...)/sc.Params(...)"
                )
            budget = Sparsity(floor)
        self.budget_ = BUDGETS.build(budget)
        self.targets = find_targets(self.model, self.include, self.exclude, self.params)
        for t in self.targets:
            self.structure_.check(t)
        self.final_sparsity = self.budget_.target_sparsity(self.model, self.targets)
        floor = self.structure_.min_sparsity()
        if self.final_sparsity < floor - 1e-9:
            raise ConfigError(
                f"{type(self.structure_).__name__} prunes at least {floor:.4g} of each tensor; "
                f"the budget asks for {self.final_sparsity:.4g}"
            )
        for part in (self.criterion_, self.schedule_):
            if part.needs_data and self.data is None:
                raise ConfigError(
                    f"{type(part).__name__} needs calibration data: pass "
                    "data=<DataLoader of (inputs, labels)> and loss_fn=<callable(output, labels)>"
                )
        if self.schedule_.moves_weights and not isinstance(self.structure_, Elements):
            raise ConfigError(
                f"schedule {type(self.schedule_).__name__} drops and grows single weights; "
                f"it works with structure 'elements', not {type(self.structure_).__name__}"
            )
        self._snapshot: WeightSnapshot | None = None

    # -- driving -------------------------------------------------------------------------
    def step(self) -> bool:
        """Advance the schedule by one step and carry out its events. True if any happened."""
        events = self.schedule_.events_at(self.steps_done, self.final_sparsity)
        for event in events:
            _HANDLERS[type(event)](self, event)
        self.steps_done += 1
        return bool(events)

    @property
    def last_step(self) -> int:
        """The last step at which the schedule does anything."""
        return self.schedule_.last_step(self.final_sparsity)

    @property
    def done(self) -> bool:
        """True once the schedule has no event left."""
        return self.steps_done > self.last_step

    def _record(self, kind: str, target: float) -> None:
        self.history.append(PruneEvent(self.steps_done, target, self.measured_sparsity(), kind))

    def _on_prune_to(self, event: PruneTo) -> None:
        self.prune_to(max(event.sparsity, self.structure_.min_sparsity()))

    def _on_remask(self, event: Remask) -> None:
        criterion = (
            _element_criterion(CRITERIA.build(event.criterion))
            if event.criterion
            else self.criterion_
        )
        allocation = ALLOCATIONS.build(event.allocation) if event.allocation else None
        self.densify(record=False)
        self.prune_to(event.sparsity, criterion=criterion, allocation=allocation, kind="remask")

    def _on_drop_grow(self, event: DropGrow) -> None:
        self.drop_and_grow(event.fraction, event.grow)

    def _on_densify(self, event: Densify) -> None:
        self.densify()

    def _on_snapshot(self, event: Snapshot) -> None:
        self._snapshot = WeightSnapshot(self.model)
        self._record("snapshot", self.measured_sparsity())

    def _on_rewind(self, event: Rewind) -> None:
        if self._snapshot is None:
            raise ConfigError(
                "the schedule rewinds but no snapshot was taken: call pruner.step() from the "
                "first step on (step 0 is the rewind point by default)"
            )
        self._snapshot.restore(self.model)
        reset_optimizer_state(self.optimizer, (p for p in self.model.parameters()))
        self._record("rewind", self.measured_sparsity())

    def densify(self, record: bool = True) -> None:
        """Remove the masks of every target; pruned weights restart from zero."""
        for t in self.targets:
            remove_mask(t.module, t.attr)
        if record:
            self._record("densify", 0.0)

    def drop_and_grow(self, fraction: float, grow: str) -> None:
        """One SET/RigL update of every target (see :func:`secateurs.sparse_training.drop_and_grow`)."""
        gradients: dict[str, Tensor] = {}
        if grow == "gradient":
            if self.data is None:
                raise ConfigError("growing by gradient needs data= and loss_fn=")
            gradients = dense_gradients(
                self.model, self.targets, self.data, self.loss_fn, self.calibration_batches
            )
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps_done)
        updates = []
        for t in self.targets:
            mask = t.mask if t.mask is not None else torch.ones_like(t.raw, dtype=torch.bool)
            new_mask, grown = drop_and_grow(
                t.raw,
                mask.cpu(),
                fraction,
                grow,
                gradient=gradients.get(t.name),
                generator=generator,
            )
            updates.append((t, new_mask, grown, mask.cpu() ^ new_mask | grown))
        changed: dict[int, Tensor] = {}
        for t, new_mask, grown, moved in updates:
            with torch.no_grad():
                t.raw.masked_fill_(grown.to(t.raw.device), 0)
            set_mask(t.module, t.attr, new_mask)
            changed[id(t.raw)] = moved
        reset_optimizer_state(self.optimizer, changed)
        self._record("drop_grow", self.final_sparsity)

    def prune_to(
        self,
        sparsity: float,
        *,
        criterion: Criterion | None = None,
        allocation: Allocation | None = None,
        kind: str = "prune",
    ) -> dict[str, Tensor]:
        """Prune the targets to ``sparsity`` now (never un-pruning anything); return the masks.

        ``criterion`` and ``allocation`` replace the pruner's own for this call.
        """
        sparsity = check_sparsity(sparsity)
        criterion = criterion or self.criterion_
        stats = None
        if criterion.needs_data:
            if self.data is None:
                raise ConfigError(f"{type(criterion).__name__} needs data= and loss_fn=")
            stats = calibrate(
                self.model,
                self.targets,
                criterion,
                self.data,
                self.loss_fn,
                self.calibration_batches,
            )
        new_masks = compute_masks(
            self.targets,
            sparsity,
            structure=self.structure_,
            criterion=criterion,
            allocation=allocation or self.allocation_,
            stats=stats,
            seed=self.seed + len(self.history),
        )
        # the masks before, only when there is optimizer state to reset (cloning is not free)
        before = (
            {t.name: t.mask.clone() if t.mask is not None else None for t in self.targets}
            if self.optimizer is not None
            else {}
        )
        for t in self.targets:
            set_mask(t.module, t.attr, new_masks[t.name])
        self._reset_pruned_state(before)
        self._record(kind, sparsity)
        return new_masks

    def _reset_pruned_state(self, before: Mapping[str, Tensor | None]) -> None:
        """Zero the optimizer state of weights that were just pruned (they may be revived)."""
        if self.optimizer is None:
            return
        changed = {}
        for t in self.targets:
            mask = t.mask
            if mask is None:
                continue
            previous = before[t.name]
            pruned_now = ~mask if previous is None else previous & ~mask
            changed[id(t.raw)] = pruned_now
        reset_optimizer_state(self.optimizer, changed)

    def measured_sparsity(self) -> float:
        """Fraction of zeros in the targeted tensors, counted from the weights themselves."""
        total = sum(t.numel for t in self.targets)
        return (total - sum(_nonzeros(t) for t in self.targets)) / total

    def plan(self) -> dict[str, Any]:
        """The plan as plain data (names and options), e.g. for a report."""
        return {
            "structure": to_spec(self.structure_),
            "criterion": to_spec(self.criterion_),
            "allocation": to_spec(self.allocation_),
            "schedule": to_spec(self.schedule_),
            "budget": to_spec(self.budget_),
            "final_sparsity": self.final_sparsity,
            "targets": [t.name for t in self.targets],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])


_HANDLERS: dict[type, Callable[[Pruner, Any], None]] = {
    PruneTo: Pruner._on_prune_to,
    Remask: Pruner._on_remask,
    DropGrow: Pruner._on_drop_grow,
    Densify: Pruner._on_densify,
    Snapshot: Pruner._on_snapshot,
    Rewind: Pruner._on_rewind,
}


def prune_(
    model: nn.Module,
    sparsity: float | None = None,
    **options: Any,
) -> nn.Module:
    """Prune ``model`` once, in place, and return it (masks stay attached).

    ``sc.prune_(model, sparsity=0.9)`` is global magnitude pruning of every Linear/Conv/
    Embedding/attention weight. Options are those of :class:`Pruner` (``structure``,
    ``criterion``, ``allocation``, ``budget``, ``include``, ``exclude``, ``params``, ``data``,
    ``loss_fn``, ``calibration_batches``, ``seed``). Call :func:`make_permanent_` to bake the masks in.
    """
    if "schedule" in options:
        raise ConfigError("prune_ is one-shot; use sc.Pruner(..., schedule=...) for schedules")
    pruner = Pruner(model, sparsity, **options)
    masked = any(t.mask is not None for t in pruner.targets)
    total = sum(t.numel for t in pruner.targets)
    slack = max(pruner.structure_.largest_group(t) for t in pruner.targets) / 2 / total
    if masked and pruner.final_sparsity + slack < (current := pruner.measured_sparsity()):
        raise ConfigError(
            f"the selected tensors already have sparsity {current:.4f}, above the {pruner.final_sparsity:.4f} "
            "asked; pruning never regrows weights. Start from the dense model, or ask for more."
        )
    pruner.prune_to(pruner.final_sparsity)
    return model
