"""Schedules: when pruning happens, and what happens then.

A schedule maps a step count (the number of ``Pruner.step()`` calls so far, normally one per
optimizer step) to the *events* of that step. The three ways to sparsify share this one
interface:

* after training (``oneshot``) and during training (``iterative``, ``gradual``, ``lottery``)
  only ever prune more: their events are :class:`PruneTo`, and the lottery ticket adds
  :class:`Snapshot` and :class:`Rewind` (back to early weights after each round);
* sparse from the start (``static``, ``set``, ``rigl``) begin with a :class:`Remask` from a
  random sparse initialisation, then move connections with :class:`DropGrow`;
* alternating dense and sparse phases (``dsd``, ``iht``) add :class:`Densify`.

Events are plain data; :class:`~secateurs.pruner.Pruner` carries them out. Simple schedules
only implement :meth:`Schedule.sparsity_at`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from secateurs.checks import check_fraction, check_int, check_nonnegative, check_sparsity
from secateurs.errors import ConfigError
from secateurs.registry import Registry

#: How a sparse initialisation's kept weights are scaled (see :class:`ScaleInit`).
INIT_RULES = ("rescale", "none")
#: How a drop-and-grow update shares the dropped weights between layers: ``none`` (each layer
#: regrows its own) or ``momentum`` (in proportion to the mean optimizer momentum magnitude of
#: each layer's live weights).
REDISTRIBUTE_RULES = ("none", "momentum")
#: How a drop-and-grow schedule's moved fraction changes over its updates: ``constant`` (SET as
#: published) or ``cosine`` (RigL's ``fraction/2 * (1 + cos(pi * t / end))``).
DECAY_RULES = ("constant", "cosine")
#: The per-layer densities a sparse-from-scratch schedule starts from (see :class:`_SparseInit`).
DISTRIBUTIONS = ("erk", "uniform", "lamp")
#: Where SET grows: ``random`` (anywhere dead, as published) or ``live`` (at random among the
#: dead positions a gradient reaches; see :class:`SET`).
SET_GROW_RULES = ("random", "live")

# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class PruneTo:
    """Prune to ``sparsity`` by the pruner's criterion and allocation; never regrows."""

    sparsity: float


@dataclass(frozen=True)
class Remask:
    """Masks computed afresh from the current (unmasked) weights: a sparse initialisation
    (``criterion="random"``) or hard thresholding (``"magnitude"``). ``allocation`` overrides
    the pruner's (``None`` keeps it). Weights may be revived."""

    sparsity: float
    criterion: str | None = None
    allocation: str | Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ScaleInit:
    """Rescale the kept weights of a fresh sparse initialisation for their kept fan-in
    (``rule``, one of :data:`INIT_RULES`)."""

    rule: str


@dataclass(frozen=True)
class DropGrow:
    """In every layer, drop the ``fraction`` of live weights with the smallest magnitude and
    grow as many dead ones (``grow="random"``: SET; ``"gradient"``: largest dense-gradient
    magnitude, RigL). Grown weights start at zero, or with ``grow_scale`` > 0 drawn from a
    normal distribution whose standard deviation is ``grow_scale`` times that of the layer's
    live weights; the sparsity is unchanged.
    ``redistribute`` (one of :data:`REDISTRIBUTE_RULES`): ``none``
    regrows in every layer what it dropped; ``momentum`` shares all the drops between layers."""

    fraction: float
    grow: str
    redistribute: str = "none"
    grow_scale: float = 0.0


@dataclass(frozen=True)
class Densify:
    """Remove the masks: every weight trains again (pruned ones restart from zero)."""


@dataclass(frozen=True)
class Snapshot:
    """Remember the model's weights now (the lottery ticket's rewind point)."""


@dataclass(frozen=True)
class Rewind:
    """Set the surviving weights back to the snapshot (the masks stay)."""


Event = PruneTo | Remask | ScaleInit | DropGrow | Densify | Snapshot | Rewind


class Schedule(ABC):
    """Base class of pruning schedules."""

    registry_name: ClassVar[str]
    #: True when some event needs calibration data (RigL's dense gradients); see
    #: :attr:`needs_data`, which a schedule whose options decide it overrides.
    _needs_data: ClassVar[bool] = False
    #: True when the schedule drops and grows single weights (element structure only).
    moves_weights: ClassVar[bool] = False

    @property
    def needs_data(self) -> bool:
        """True when some event of this schedule needs the pruner's calibration data."""
        return self._needs_data

    @abstractmethod
    def sparsity_at(self, step: int, final: float) -> float | None:
        """Sparsity to prune to at ``step`` (given the final sparsity), or None."""

    @abstractmethod
    def last_step(self, final: float | None = None) -> int:
        """The last step at which this schedule does anything (some depend on the final
        sparsity: the lottery ticket's number of rounds)."""

    def check(self, final: float) -> None:  # noqa: B027 - most schedules fit any sparsity
        """Raise :class:`ConfigError` when this schedule cannot reach ``final`` (the pruner's
        target sparsity) as configured."""

    def events_at(self, step: int, final: float) -> list[Event]:
        """What happens at ``step``, in order. By default: prune to :meth:`sparsity_at`."""
        target = self.sparsity_at(step, final)
        return [] if target is None else [PruneTo(target)]


SCHEDULES: Registry[Schedule] = Registry("schedule", Schedule)


@SCHEDULES.register("oneshot")
@dataclass
class OneShot(Schedule):
    """Prune to the final sparsity once, at step ``at``."""

    at: int = 0

    def __post_init__(self) -> None:
        check_int(self.at, "OneShot at", 0)

    def sparsity_at(self, step: int, final: float) -> float | None:
        return final if step == self.at else None

    def last_step(self, final: float | None = None) -> int:
        return self.at


@SCHEDULES.register("iterative")
@dataclass
class Iterative(Schedule):
    """``rounds`` pruning rounds ``every`` steps apart, with training between them.

    Each round removes the same fraction of the weights still alive, so round ``r`` of ``R``
    reaches ``1 - (1 - final) ** (r / R)`` (Han et al. 2015's prune/retrain loop).
    """

    rounds: int = 5
    every: int = 1000
    start: int = 0

    def __post_init__(self) -> None:
        check_int(self.rounds, "Iterative rounds", 1)
        check_int(self.every, "Iterative every", 1)
        check_int(self.start, "Iterative start", 0)

    def sparsity_at(self, step: int, final: float) -> float | None:
        offset = step - self.start
        if offset < 0 or offset % self.every or offset // self.every >= self.rounds:
            return None
        r = offset // self.every + 1
        return 1.0 - (1.0 - final) ** (r / self.rounds)

    def last_step(self, final: float | None = None) -> int:
        return self.start + (self.rounds - 1) * self.every


@SCHEDULES.register("gradual")
@dataclass
class Gradual(Schedule):
    """Gradual magnitude pruning (Zhu & Gupta 2017), exactly their cubic schedule.

    At ``t = start + j * every`` for ``t <= end``:
    ``s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** 3``, where
    ``end - start = n * every`` in the paper's notation. Pruning is fast at first, while
    there are many redundant weights, and slows down as few remain.

    Train at the **training learning rate** while the mask tightens (Zhu & Gupta prune
    during training, not fine-tuning): the surviving weights must move to take over from the
    pruned ones. On LeNet-300-100 at 99%, the README's loop reached 88.18% at the training
    rate and 86.90% at a tenth of it (``benchmarks/bench_finegrained.py``, "defaults" rows).
    """

    start: int = 0
    end: int = 1000
    every: int = 100
    initial: float = 0.0

    def __post_init__(self) -> None:
        check_int(self.start, "Gradual start", 0)
        check_int(self.every, "Gradual every", 1)
        check_int(self.end, "Gradual end", self.start + 1)
        self.initial = check_sparsity(self.initial, "Gradual initial")

    def sparsity_at(self, step: int, final: float) -> float | None:
        if step < self.start or step > self.end:
            return None
        if (step - self.start) % self.every and step != self.end:
            return None
        progress = (step - self.start) / (self.end - self.start)
        return final + (self.initial - final) * (1.0 - progress) ** 3

    def check(self, final: float) -> None:
        if self.initial > final:
            raise ConfigError(
                f"Gradual initial sparsity {self.initial:.4g} is above the final {final:.4g}; "
                "pruning never regrows weights: give initial <= the target sparsity"
            )

    def last_step(self, final: float | None = None) -> int:
        return self.end


@SCHEDULES.register("lottery")
@dataclass
class Lottery(Schedule):
    """Lottery tickets (Frankle & Carbin 2019): iterative magnitude pruning with rewinding.

    The weights are remembered at step ``rewind`` (0: the initialisation; a few hundred steps:
    Frankle et al. 2020's late rewinding). Every ``every`` steps a round removes ``rate`` of the
    weights still alive (the last round lands exactly on the final sparsity) and sets the
    survivors back to the remembered values; training then starts again from there. Rounds
    follow from the rate unless ``rounds`` is given. Global or per-layer pruning is the
    pruner's allocation (``global`` / ``uniform``).
    """

    every: int = 1000
    rate: float = 0.2
    rewind: int = 0
    rounds: int | None = None

    def __post_init__(self) -> None:
        check_int(self.every, "Lottery every", 1)
        self.rate = check_fraction(self.rate, "Lottery rate")
        check_int(self.rewind, "Lottery rewind", 0)
        if self.rewind >= self.every:
            raise ConfigError(
                f"Lottery rewind step {self.rewind} is not before the first round at step "
                f"{self.every}; rewind to an earlier step or prune later"
            )
        if self.rounds is not None:
            check_int(self.rounds, "Lottery rounds", 1)

    def round_count(self, final: float) -> int:
        if self.rounds is not None:
            return self.rounds
        if final <= 0:
            return 1
        return max(1, math.ceil(math.log(1 - final) / math.log(1 - self.rate) - 1e-9))

    def sparsity_at(self, step: int, final: float) -> float | None:
        if step <= 0 or step % self.every:
            return None
        r = step // self.every
        rounds = self.round_count(final)
        if r > rounds:
            return None
        if r == rounds:
            return final
        if self.rounds is not None:
            return 1.0 - (1.0 - final) ** (r / rounds)
        return min(final, 1.0 - (1.0 - self.rate) ** r)

    def events_at(self, step: int, final: float) -> list[Event]:
        events: list[Event] = [Snapshot()] if step == self.rewind else []
        target = self.sparsity_at(step, final)
        if target is not None:
            events += [PruneTo(target), Rewind()]
        return events

    def last_step(self, final: float | None = None) -> int:
        if final is None and self.rounds is None:
            raise ConfigError("Lottery's last step depends on the final sparsity; pass it")
        return self.every * self.round_count(final or 0.0)


@dataclass
class _SparseInit(Schedule):
    """Shared by the schedules that train sparse from step 0: a random sparse initialisation
    at step 0, its per-layer densities by ``distribution``: ``erk`` (Erdős–Rényi-Kernel, the
    published start of SET and RigL), ``uniform`` (every layer the same sparsity) or ``lamp``
    (LAMP's global threshold over the random initial scores: each layer keeps about the same
    number of weights, a small one fewer: close to the per-layer counts that gradual pruning
    with LAMP and sparse momentum both end at on LeNet-5 and LeNet-300-100 at 99%, where ERK
    leaves LeNet-5's first convolution and classifier a few dozen weights).

    At 98-99% sparsity two things starve a network trained sparse from scratch (Evci et al.
    2022, "Gradient flow in sparse neural networks"): ERK leaves the smallest layers a handful
    of weights (LeNet-5's first convolution 2 per filter at 99%), and a dense initialisation
    whose scale assumes every input is connected makes each unit's output shrink with its
    density, so the signal vanishes within a few layers. ``min_fan_in``: every layer keeps on
    average at least this many inputs per output unit (ERK only; 0 for ERK as published).
    ``init``: ``rescale`` (default) multiplies each output unit's kept weights by
    ``sqrt(fan_in / kept fan_in)``, which gives every unit the output variance of the dense
    initialisation; ``none`` keeps the dense initialisation's values.
    """

    distribution: str = "erk"
    min_fan_in: float = 4.0
    init: str = "rescale"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"{name} distribution {self.distribution!r} is unknown; allowed: "
                f"{', '.join(DISTRIBUTIONS)}"
            )
        self.min_fan_in = check_nonnegative(self.min_fan_in, f"{name} min_fan_in")
        if self.init not in INIT_RULES:
            raise ConfigError(
                f"{name} init {self.init!r} is unknown; allowed: {', '.join(INIT_RULES)}"
            )

    def sparsity_at(self, step: int, final: float) -> float | None:
        return final if step == 0 else None

    def events_at(self, step: int, final: float) -> list[Event]:
        if step != 0:
            return []
        allocation: str | dict[str, Any] = self.distribution
        if self.distribution == "erk" and self.min_fan_in:
            allocation = {"name": "erk", "min_fan_in": self.min_fan_in}
        events: list[Event] = [Remask(final, "random", allocation)]
        if self.init != "none":
            events.append(ScaleInit(self.init))
        return events

    def last_step(self, final: float | None = None) -> int:
        return 0


@SCHEDULES.register("static")
@dataclass
class Static(_SparseInit):
    """Fixed sparse training: a random sparse initialisation (``distribution``: ERK, uniform or
    LAMP) kept throughout."""


@dataclass
class _SparseFromStart(_SparseInit):
    """The sparse initialisation, then, every ``every`` steps before ``end``, a drop-and-grow
    update of ``fraction`` of each layer's live weights.

    ``redistribute``: ``none`` (as published) keeps every layer's count of live weights;
    ``momentum`` (sparse momentum, Dettmers & Zettlemoyer 2019) shares the dropped weights
    between layers in proportion to the mean optimizer momentum magnitude of each layer's live
    weights, so the per-layer densities move from the initial distribution to where training
    pulls; the total stays the sparsity asked. It needs an optimizer with momentum.

    ``decay`` (one of :data:`DECAY_RULES`): ``constant`` moves ``fraction`` at every update,
    ``cosine`` decays it to 0 at ``end``, so the last updates barely disturb a network that has
    little training left to use what they grow.

    ``grow_scale``: grown weights start at zero (0, RigL's choice) or drawn at random with a
    standard deviation of ``grow_scale`` times that of the layer's live weights (SET as
    published draws them at random): a random weight feeds its unit at once, where a zero one
    must first be moved by a gradient that is zero wherever the unit is dead.
    """

    every: int = 100
    end: int = 1000
    fraction: float = 0.3
    redistribute: str = "none"
    decay: str = "constant"
    grow_scale: float = 0.0

    _grow: ClassVar[str] = "random"
    moves_weights = True

    @property
    def grow_rule(self) -> str:
        """Where this schedule's updates grow (one of ``sparse_training.GROW_RULES``)."""
        return self._grow

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.every, f"{type(self).__name__} every", 1)
        check_int(self.end, f"{type(self).__name__} end", 1)
        self.fraction = check_fraction(self.fraction, f"{type(self).__name__} fraction")
        if self.redistribute not in REDISTRIBUTE_RULES:
            raise ConfigError(
                f"{type(self).__name__} redistribute {self.redistribute!r} is unknown; "
                f"allowed: {', '.join(REDISTRIBUTE_RULES)}"
            )
        if self.decay not in DECAY_RULES:
            raise ConfigError(
                f"{type(self).__name__} decay {self.decay!r} is unknown; "
                f"allowed: {', '.join(DECAY_RULES)}"
            )
        self.grow_scale = check_nonnegative(self.grow_scale, f"{type(self).__name__} grow_scale")

    def fraction_at(self, step: int) -> float:
        """The share of each layer's live weights the update at ``step`` moves."""
        if self.decay == "cosine":
            return self.fraction / 2 * (1 + math.cos(math.pi * step / self.end))
        return self.fraction

    def events_at(self, step: int, final: float) -> list[Event]:
        if step == 0:
            return super().events_at(step, final)
        if step % self.every or step >= self.end:
            return []
        return [
            DropGrow(self.fraction_at(step), self.grow_rule, self.redistribute, self.grow_scale)
        ]

    def last_step(self, final: float | None = None) -> int:
        return max(0, ((self.end - 1) // self.every) * self.every)


@SCHEDULES.register("set")
@dataclass
class SET(_SparseFromStart):
    """Sparse Evolutionary Training (Mocanu et al. 2018): every ``every`` steps until ``end``,
    drop ``fraction`` of each layer's live weights with the smallest magnitude and regrow as
    many at random (``decay: cosine`` decays the fraction as RigL does).

    ``grow`` (one of :data:`SET_GROW_RULES`): ``random`` (as published) grows anywhere dead;
    ``live`` grows at random among the dead positions whose dense gradient is nonzero, so no
    share of the budget lands on a connection from a silent input or into a dead unit, where
    it would sit at zero until dropped again (at 99% on LeNet-5 SET as published ends with
    17-20% of its budget exactly zero, ``live`` with 2-6%). ``live`` reads a dense gradient
    on the pruner's ``data`` at each update, as RigL does; the growth itself stays random.
    """

    grow: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grow not in SET_GROW_RULES:
            raise ConfigError(
                f"SET grow {self.grow!r} is unknown; allowed: {', '.join(SET_GROW_RULES)}"
            )

    @property
    def grow_rule(self) -> str:
        return self.grow

    @property
    def needs_data(self) -> bool:
        return self.grow == "live"


@SCHEDULES.register("rigl")
@dataclass
class RigL(_SparseFromStart):
    """Rigging the Lottery (Evci et al. 2020): drop by magnitude, regrow where the dense
    gradient is largest. The drop fraction decays as ``fraction/2 * (1 + cos(pi * t / end))``
    (``decay: cosine``, the default here) and updates stop at ``end``. The dense gradient is
    computed on calibration batches only at update steps (the pruner's ``data``); the model
    otherwise never runs dense."""

    decay: str = "cosine"
    _needs_data = True
    _grow = "gradient"


@SCHEDULES.register("dsd")
@dataclass
class DSD(Schedule):
    """Dense-Sparse-Dense training (Han et al. 2017): train dense, prune to the final sparsity
    at ``start`` and train sparse, then at ``end`` remove the masks and train dense again (at a
    lower learning rate, the user's choice). The result is dense: DSD buys accuracy, not size."""

    start: int = 0
    end: int = 1000

    def __post_init__(self) -> None:
        check_int(self.start, "DSD start", 0)
        check_int(self.end, "DSD end", self.start + 1)

    def sparsity_at(self, step: int, final: float) -> float | None:
        return final if step == self.start else None

    def events_at(self, step: int, final: float) -> list[Event]:
        if step == self.end:
            return [Densify()]
        return super().events_at(step, final)

    def last_step(self, final: float | None = None) -> int:
        return self.end


@SCHEDULES.register("iht")
@dataclass
class IHT(Schedule):
    """Iterative hard thresholding (Jin et al. 2016): ``cycles`` of a sparse phase (the
    largest-magnitude weights at the final sparsity, chosen afresh) of ``sparse`` steps and a
    dense phase of ``dense`` steps, from ``start``; a last hard threshold ends sparse."""

    sparse: int = 500
    dense: int = 500
    cycles: int = 2
    start: int = 0

    def __post_init__(self) -> None:
        check_int(self.sparse, "IHT sparse", 1)
        check_int(self.dense, "IHT dense", 1)
        check_int(self.cycles, "IHT cycles", 1)
        check_int(self.start, "IHT start", 0)

    def sparsity_at(self, step: int, final: float) -> float | None:
        offset = step - self.start
        period = self.sparse + self.dense
        if offset < 0 or offset > self.cycles * period or offset % period:
            return None
        return final

    def events_at(self, step: int, final: float) -> list[Event]:
        if self.sparsity_at(step, final) is not None:
            return [Remask(final, "magnitude")]
        offset = step - self.start
        period = self.sparse + self.dense
        if 0 <= offset < self.cycles * period and offset % period == self.sparse:
            return [Densify()]
        return []

    def last_step(self, final: float | None = None) -> int:
        return self.start + self.cycles * (self.sparse + self.dense)
