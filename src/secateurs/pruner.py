"""The pruner: a plan (structure, criterion, allocation, budget, schedule) applied to a model.

Data flows one way: the plan and the model's current weights decide masks; masks are computed
for every target before any is attached, so an error leaves the model untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.allocation import ALLOCATIONS, Allocation, Global, LayerMap, Uniform, select_lowest
from secateurs.budgets import BUDGETS, Budget, Sparsity
from secateurs.calibration import CALIBRATION_BATCHES, LossFn, calibrate, dense_gradients
from secateurs.checks import check_int, check_sparsity, option
from secateurs.criteria import (
    CRITERIA,
    ChannelCriterion,
    Criterion,
    LayerwiseCriterion,
    Magnitude,
    Wanda,
)
from secateurs.criteria.layerwise import check_layer
from secateurs.distributed import all_reduce_sum_, is_distributed
from secateurs.errors import ConfigError
from secateurs.masks import remove_mask, set_mask
from secateurs.oneshot import (
    Progress,
    column_norms,
    layer_of,
    layerwise_targets,
    prune_layerwise_,
)
from secateurs.provenance import record
from secateurs.registry import config_of, to_spec
from secateurs.schedules import (
    SCHEDULES,
    Densify,
    DropGrow,
    OneShot,
    PruneTo,
    Remask,
    Rewind,
    ScaleInit,
    Schedule,
    Snapshot,
)
from secateurs.selection import Selector, compile_selectors
from secateurs.sparse_training import (
    GRADIENT_RULES,
    WeightSnapshot,
    drop_and_grow,
    drop_count,
    random_start,
    rescale_for_kept_fan_in_,
    reset_optimizer_state,
)
from secateurs.sparse_training import redistribute as redistribute_counts
from secateurs.structures import NM, STRUCTURES, Elements, GroupScores, Structure
from secateurs.targets import Target, find_targets

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
    """One schedule event: when, what (``prune``, ``remask``, ``scale_init``, ``drop_grow``,
    ``densify``, ``snapshot``, ``rewind``), the sparsity asked, and the sparsity measured
    afterwards."""

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
class PruneConfig:
    """A pruning plan: what is pruned, how much, how it is scored and shared, and when.

    The one description of pruning options: :func:`prune_` and :class:`Pruner` take them as
    keywords (or ``config=``), a recipe's ``prune:`` section is this config (with schedule
    times in epochs), and the element search space of :mod:`secateurs.search` prunes its
    candidates with it. Every method option takes an object, a registry name
    (``criterion="obd"``) or ``{"name": ..., **options}``; ``None`` is the default below, and
    anything else that names no method (``""``, ``{}``, a number) is a
    :class:`~secateurs.ConfigError`.

    * ``sparsity`` (a fraction in [0, 1)) or ``budget`` (``sc.Params``, ``sc.Bytes``, ...):
      how much; with an N:M structure and neither, the pattern's ``1 - n/m``; with a
      :class:`LayerMap` that has a ``default``, the map says it all.
    * ``structure``: elements (default), ``nm``, ``blocks``, ``channels`` (as masks).
    * ``criterion``: magnitude (default, ``p=1``: for masks the order of |w| and w**2 is the
      same, and LAMP's layer normalisation is defined on |w|).
    * ``allocation``: ``global`` (default), ``uniform``, ``lamp``, ``erk``, ``owl`` or a
      :class:`LayerMap`; ``uniform`` is the default of the layer-wise criteria (``wanda``,
      ``sparsegpt``, ``obs``), which prune each layer on its own.
    * ``schedule``: ``oneshot`` (default) or any of :data:`secateurs.SCHEDULES`.
    * ``include`` / ``exclude`` select the layers (:mod:`secateurs.selection`); ``params``
      adds other parameters by regex over their names (a bias, a bare ``nn.Parameter``).
    * ``calibration_batches``: batches of ``data`` a data-driven criterion reads per event.
    * ``seed``: random criteria and schedules draw from it.
    """

    sparsity: float | None = None
    budget: Budget | Spec | None = None
    structure: Structure | Spec | None = None
    criterion: Criterion | Spec | None = None
    allocation: Allocation | Spec | None = None
    schedule: Schedule | Spec | None = None
    include: Sequence[Selector] | None = None
    exclude: Sequence[Selector] | None = None
    params: Sequence[str] | None = None
    calibration_batches: int = CALIBRATION_BATCHES
    seed: int = 0

    def __post_init__(self) -> None:
        with option("structure"):
            self.structure_: Structure = STRUCTURES.build(self.structure, Elements())
        with option("criterion"):
            self.criterion_ = _element_criterion(CRITERIA.build(self.criterion, Magnitude()))
        with option("allocation"):
            self.allocation_: Allocation = self._build_allocation()
        with option("schedule"):
            self.schedule_ = self._build_schedule()
        with option("sparsity"):
            if self.sparsity is not None:
                check_sparsity(self.sparsity)
                if self.budget is not None:
                    raise ConfigError("give either sparsity= or budget=, not both")
        with option("budget"):
            self.budget_: Budget | None = (
                None if self.budget is None else BUDGETS.build(self.budget)
            )
        for key in ("include", "exclude", "params"):
            with option(key):
                compile_selectors(getattr(self, key), key)
        with option("calibration_batches"):
            check_int(self.calibration_batches, "calibration_batches", 1)
        with option("seed"):
            check_int(self.seed, "seed", 0)
        schedule = self.schedule_
        if (
            schedule is not None
            and schedule.moves_weights
            and not isinstance(self.structure_, Elements)
        ):
            raise ConfigError(
                f"schedule {type(schedule).__name__} drops and grows single weights; "
                f"it works with structure 'elements', not {type(self.structure_).__name__}"
            )

    def _build_allocation(self) -> Allocation:
        """The allocation object (a recipe's section may name a search instead). Layer-wise
        criteria prune each layer to its own sparsity: their default is ``uniform``."""
        layerwise = isinstance(self.criterion_, LayerwiseCriterion)
        allocation = ALLOCATIONS.build(self.allocation, Uniform() if layerwise else Global())
        if layerwise and isinstance(allocation, Global):
            raise ConfigError(
                f"{self.criterion_.registry_name} prunes each layer to its own sparsity from its "
                f"inputs; allocation {allocation.registry_name!r} ranks weights across layers. "
                "Use uniform, owl, erk or a LayerMap"
            )
        return allocation

    def _build_schedule(self) -> Schedule | None:
        """The schedule object (a recipe's section, whose times are epochs, checks its own)."""
        return SCHEDULES.build(self.schedule, OneShot())


class Pruner:
    """Prunes ``model`` according to a plan, one-shot or on a schedule inside a training loop.

    Typical use::

        pruner = sc.Pruner(model, sparsity=0.95, schedule=sc.Gradual(end=10_000, every=100))
        for batch in loader:
            ...; optimizer.step(); pruner.step()
        sc.make_permanent_(model)

    The plan is a :class:`PruneConfig`, given as keywords or as ``config=``. Pruning while
    training recovers best at the **training learning rate**: with gradual pruning (Zhu &
    Gupta) the weights must keep moving as the mask tightens; a tenth of the rate lost 1.3
    points on LeNet-300-100 at 99% (see the README's fine-grained benchmark). Fine-tuning
    *after* one-shot pruning is where a tenth of the rate belongs.

    Data-driven criteria (Taylor, OBD) need ``data`` (an iterable of ``(inputs, labels)``) and
    ``loss_fn``; they are calibrated on ``calibration_batches`` batches at each pruning event.
    RigL needs them too, for its dense gradients. Schedules that move, revive or rewind
    weights (SET, RigL, lottery tickets, DSD, IHT) should be given the training
    ``optimizer``: the momentum and Adam moments of a grown or rewound weight are reset, as the
    methods prescribe. Call ``step()`` once before the first optimizer step too, so step 0 (a
    sparse initialisation, the lottery's rewind point) sees the initial weights.

    Data-parallel (``torchrun``): build a pruner on every rank, each with its own share of the
    calibration ``data``; the statistics of data-aware criteria (calibration gradients, RigL's
    dense gradients, movement scores, layer input Hessians) are summed over the ranks before
    masks are chosen, so every rank gets the same masks. Attaching a weight's first mask (or
    removing masks) changes the model's parameters, and a ``DistributedDataParallel`` wrapper
    built before then no longer reduces that weight's gradient: in your own loop, wrap the
    model after that event or wrap it again (:func:`secateurs.train.train` rewraps by itself).

    Pruning never regrows a weight: asking for less than the sparsity the targets already
    have (a schedule starting below it, ``prune_to`` a lower value) is a ConfigError.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        *,
        config: PruneConfig | None = None,
        data: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        progress: Progress | None = None,
        **options: Any,
    ) -> None:
        if sparsity is not None:
            options["sparsity"] = sparsity
        self.config = config = config_of(PruneConfig, config, options, "the pruner")
        self.model = model
        self.data = data
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.progress = progress
        self.steps_done = 0
        #: what a training-time criterion (movement) has observed, by target name
        self._observed: dict[str, dict[str, Tensor]] = {}
        self.history: list[PruneEvent] = []
        self._snapshot: WeightSnapshot | None = None
        if config.schedule_ is None:
            raise ConfigError("a recipe's prune section must be converted to steps first")
        self.structure_ = config.structure_
        self.criterion_ = config.criterion_
        self.allocation_ = config.allocation_
        self.schedule_: Schedule = config.schedule_
        self.targets = find_targets(model, config.include, config.exclude, config.params)
        if isinstance(self.criterion_, LayerwiseCriterion) and config.include is None:
            self.targets = layerwise_targets(model, self.targets)
        for t in self.targets:
            self.structure_.check(t)
        self.budget_, self.final_sparsity = self._final_sparsity()
        floor = self.structure_.min_sparsity()
        if self.final_sparsity < floor - 1e-9:
            raise ConfigError(
                f"{type(self.structure_).__name__} prunes at least {floor:.4g} of each tensor; "
                f"the budget asks for {self.final_sparsity:.4g}"
            )
        self.schedule_.check(self.final_sparsity)
        if isinstance(self.criterion_, LayerwiseCriterion):
            for t in self.targets:
                check_layer(t)
            if not isinstance(self.structure_, (Elements, NM)):
                raise ConfigError(
                    f"{self.criterion_.registry_name} prunes single weights or N:M blocks; "
                    f"structure {type(self.structure_).__name__} is not one of them"
                )
        for part in (self.criterion_, self.schedule_):
            if part.needs_data and data is None:
                raise ConfigError(
                    f"{type(part).__name__} needs calibration data: pass "
                    "data=<DataLoader of (inputs, labels)> and loss_fn=<callable(output, labels)>"
                )

    def _final_sparsity(self) -> tuple[Budget, float]:
        """The budget and the sparsity over the targets that meets it."""
        budget = self.config.budget_
        if budget is None and self.config.sparsity is not None:
            budget = Sparsity(self.config.sparsity)
        if budget is None:
            allocation = self.allocation_
            mean = (
                allocation.mean_sparsity(self.targets) if isinstance(allocation, LayerMap) else None
            )
            floor = self.structure_.min_sparsity()
            if mean is None and floor == 0:
                raise ConfigError(
                    "no target given: pass sparsity=<fraction in [0, 1)>, "
                    "budget=sc.Sparsity(...)/sc.Params(...), or a LayerMap with a default"
                )
            budget = Sparsity(min(max(mean or 0.0, floor), 1 - 1e-9))
        return budget, budget.target_sparsity(self.model, self.targets)

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def calibration_batches(self) -> int:
        return self.config.calibration_batches

    # -- driving -------------------------------------------------------------------------
    def step(self) -> bool:
        """Advance the schedule by one step and carry out its events. True if any happened."""
        if self.criterion_.observes_training:
            for t in self.targets:
                self.criterion_.observe(self._observed.setdefault(t.name, {}), t)
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

    def _on_scale_init(self, event: ScaleInit) -> None:
        """Scale a fresh sparse initialisation for each unit's kept fan-in (rule ``rescale``)."""
        for t in self.targets:
            if t.mask is not None:
                rescale_for_kept_fan_in_(t.raw, t.mask, t.transposed)
        self._record("scale_init", self.measured_sparsity())

    def _on_drop_grow(self, event: DropGrow) -> None:
        self.drop_and_grow(event.fraction, event.grow, event.redistribute, event.grow_scale)

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

    def drop_and_grow(
        self, fraction: float, grow: str, redistribute: str = "none", grow_scale: float = 0.0
    ) -> None:
        """One SET/RigL update of every target (see :func:`secateurs.sparse_training.drop_and_grow`).

        ``redistribute="momentum"`` shares the weights dropped in all layers between them by
        the mean momentum magnitude of each layer's live weights (:func:`redistribute`).
        ``grow_scale``: grown weights start at zero (0) or at random, their standard deviation
        ``grow_scale`` times that of the layer's surviving live weights."""
        gradients: dict[str, Tensor] = {}
        if grow in GRADIENT_RULES:
            if self.data is None:
                raise ConfigError(
                    f"grow rule {grow!r} reads the dense gradient: pass data= and loss_fn="
                )
            gradients = dense_gradients(
                self.model, self.targets, self.data, self.loss_fn, self.calibration_batches
            )
        masks = [
            (t.mask if t.mask is not None else torch.ones_like(t.raw, dtype=torch.bool)).cpu()
            for t in self.targets
        ]
        grow_counts: list[int | None] = [None] * len(self.targets)
        if redistribute == "momentum":
            drops = [drop_count(int(m.sum()), fraction) for m in masks]
            room = [m.numel() - int(m.sum()) + d for m, d in zip(masks, drops, strict=True)]
            scores = [self._mean_momentum(t, m) for t, m in zip(self.targets, masks, strict=True)]
            grow_counts = list(redistribute_counts(drops, scores, room))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps_done)
        updates = []
        for t, mask, count in zip(self.targets, masks, grow_counts, strict=True):
            new_mask, grown = drop_and_grow(
                t.raw,
                mask,
                fraction,
                grow,
                gradient=gradients.get(t.name),
                generator=generator,
                grow_count=count,
            )
            updates.append((t, new_mask, grown, mask ^ new_mask | grown))
        changed: dict[int, Tensor] = {}
        for (t, new_mask, grown, moved), mask in zip(updates, masks, strict=True):
            on_device = grown.to(t.raw.device)
            with torch.no_grad():
                t.raw.masked_fill_(on_device, 0)
                # zeros filled above; with grow_scale the draws go in their place
                if grow_scale > 0 and (n_grown := int(grown.sum())):
                    survivors = mask & new_mask & ~grown
                    start = random_start(t.raw, survivors, n_grown, grow_scale, generator)
                    t.raw.masked_scatter_(on_device, start.to(t.raw.device))
            set_mask(t.module, t.attr, new_mask)
            changed[id(t.raw)] = moved
        reset_optimizer_state(self.optimizer, changed)
        self._record("drop_grow", self.final_sparsity)

    def _mean_momentum(self, target: Target, mask: Tensor) -> float:
        """Mean magnitude of the optimizer's momentum (SGD's buffer, Adam's first moment)
        over a target's live weights; what sparse momentum shares the regrowth by."""
        if self.optimizer is None:
            raise ConfigError(
                "redistribute: momentum needs the optimizer: pass optimizer= to the Pruner"
            )
        group = next(
            (g for g in self.optimizer.param_groups if any(p is target.raw for p in g["params"])),
            None,
        )
        keeps_momentum = group is not None and (bool(group.get("momentum", 0)) or "betas" in group)
        if not keeps_momentum:
            raise ConfigError(
                "redistribute: momentum needs an optimizer that keeps a momentum of "
                f"{target.name} (SGD with momentum > 0, Adam and its kin); "
                f"{type(self.optimizer).__name__} here keeps none"
            )
        state = self.optimizer.state.get(target.raw) or {}
        buffer = next(
            (
                state[key]
                for key in ("momentum_buffer", "exp_avg")
                if isinstance(state.get(key), Tensor) and state[key].shape == target.raw.shape
            ),
            None,
        )
        live = mask.to(target.raw.device)
        if buffer is None or not bool(live.any()):
            return 0.0  # before the first optimizer step: every layer regrows its own
        return float(buffer.detach().abs()[live].mean())

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
        total = sum(t.numel for t in self.targets)
        masked = sum(int((~t.mask).sum()) for t in self.targets if t.mask is not None)
        # each tensor (one pool per layer at most) may round by half its largest group
        slack = sum(self.structure_.largest_group(t) for t in self.targets) / 2 / total
        if masked / total > sparsity + slack:
            raise ConfigError(
                f"the selected tensors already have {masked / total:.4f} of their weights "
                f"pruned, more than the {sparsity:.4f} asked; pruning never regrows weights. "
                "Start from the dense model, or ask for at least the current sparsity (a "
                "schedule's initial sparsity included)."
            )
        criterion = criterion or self.criterion_
        allocation = allocation or self.allocation_
        if isinstance(criterion, LayerwiseCriterion):
            masks = self._prune_layerwise(criterion, allocation, sparsity)
            self._record(kind, sparsity)
            return masks
        stats: Mapping[str, Mapping[str, Tensor]] | None = None
        if criterion.observes_training:
            stats = self._observed_stats()
        elif criterion.needs_data:
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
            allocation=allocation,
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

    def _observed_stats(self) -> dict[str, dict[str, Tensor]]:
        """What the training-time criterion observed, per target; under ``torchrun`` summed
        over the ranks (into a copy: each rank keeps accumulating its own), so that every
        rank ranks the same scores."""
        observed = {t.name: self._observed.get(t.name, {}) for t in self.targets}
        if not is_distributed():
            return observed
        summed = {
            name: {k: v.clone() for k, v in stats.items()} for name, stats in observed.items()
        }
        all_reduce_sum_(summed[t.name][k] for t in self.targets for k in sorted(summed[t.name]))
        return summed

    def _prune_layerwise(
        self, criterion: LayerwiseCriterion, allocation: Allocation, sparsity: float
    ) -> dict[str, Tensor]:
        """Prune every target on its own from its inputs (the one-shot engine)."""
        if self.data is None:
            raise ConfigError(
                f"{criterion.registry_name} needs calibration data: pass data=<batches the "
                "model takes> (token ids, (inputs, labels) pairs or keyword mappings)"
            )
        if allocation.needs_scores:
            norms = column_norms(self.model, self.targets, self.data, self.calibration_batches)
            scores = {t.name: Wanda().scores(t, norms[t.name], self.seed) for t in self.targets}
            allocation.fit(scores, layer_of(self.model, self.targets))
        pattern = None
        if isinstance(self.structure_, NM):
            if sparsity > self.structure_.min_sparsity() + 1e-9:
                raise ConfigError(
                    f"{criterion.registry_name} prunes exactly {self.structure_.n}:"
                    f"{self.structure_.m}; a sparsity above {self.structure_.min_sparsity():.4g} "
                    "is not a pattern it makes"
                )
            pattern = (self.structure_.n, self.structure_.m)
        sparsities: dict[str, float] = {}
        for pool in allocation.pools(self.targets, sparsity):
            if len(pool.members) != 1:
                raise ConfigError(
                    f"{criterion.registry_name} prunes each layer to its own sparsity; allocation "
                    f"{allocation.registry_name!r} pools layers together. Use uniform, owl, erk "
                    "or a LayerMap"
                )
            sparsities[self.targets[pool.members[0]].name] = check_sparsity(pool.sparsity)
        report = prune_layerwise_(
            self.model,
            self.targets,
            criterion,
            sparsities,
            self.data,
            pattern=pattern,
            sequential=criterion.sequential,
            calibration_batches=self.calibration_batches,
            progress=self.progress,
        )
        record(self.model, report)
        return {t.name: t.mask.clone() for t in self.targets if t.mask is not None}

    def prune_to_final(self) -> dict[str, Tensor]:
        """Prune the targets to the plan's final sparsity now (what :func:`prune_` does)."""
        return self.prune_to(self.final_sparsity)

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
    ScaleInit: Pruner._on_scale_init,
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
    Embedding/attention weight. Options are those of :class:`PruneConfig` (``structure``,
    ``criterion``, ``allocation``, ``budget``, ``include``, ``exclude``, ``params``,
    ``calibration_batches``, ``seed``; or ``config=``), plus ``data`` and ``loss_fn`` for
    data-driven criteria. Pruning a pruned model further never revives a weight; asking for
    less than it has is an error. Call :func:`make_permanent_` to bake the masks in.
    """
    if "schedule" in options:
        raise ConfigError("prune_ is one-shot; use sc.Pruner(..., schedule=...) for schedules")
    Pruner(model, sparsity, **options).prune_to_final()
    return model
