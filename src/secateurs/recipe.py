"""Recipes: a whole pipeline (model, data, train or load, prune, fine-tune, export, report) as YAML.

A recipe is parsed into plain dataclasses and validated completely before any work starts: an
unknown key or a bad value is a :class:`ConfigError` that names the key path, the value and what
is allowed. Method names resolve through the registries, so ``criterion: obd`` or
``structure: {name: nm, n: 2, m: 4}`` work and user-registered methods too. In a recipe, schedule
times (``start``, ``end``, ``every``, ``at``, ``rewind``, ``sparse``, ``dense``) are counted in
epochs of the fine-tuning phase; fractions
are allowed and are converted to optimizer steps when the data set's size is known.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from secateurs.allocation import Allocation, Global, LayerMap
from secateurs.budgets import BUDGETS
from secateurs.checks import check_int, option
from secateurs.compress.codec import CompressConfig
from secateurs.errors import ConfigError
from secateurs.pruner import PruneConfig
from secateurs.registry import build_dataclass
from secateurs.schedules import SCHEDULES, Schedule
from secateurs.search import SEARCHES
from secateurs.shrink import ShrinkConfig
from secateurs.train import REGULARIZERS, Distillation, TrainConfig, finetune_config

MethodSpec = str | dict[str, Any]


@dataclass
class ModelSection:
    """Which network: a zoo name (``lenet-5``) or ``torchvision:<name>``."""

    name: str = "lenet-5"
    #: A ``.safetensors`` state dict to start from instead of training the dense model.
    checkpoint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Which data set, where, and how it is batched."""

    name: str = "fashion-mnist"
    root: str | None = None
    batch_size: int = 128
    #: Use only the first N training / test examples (quick runs); null = all.
    limit_train: int | None = None
    limit_test: int | None = None
    #: Held-out training examples used by data-driven criteria.
    calibration_examples: int = 2048
    #: Text data sets (``english-text``, for language models): tokens per window, and how many
    #: non-overlapping windows calibrate the pruning and score the perplexity (from disjoint
    #: parts of the text). ``batch_size`` is then windows per forward pass.
    window: int = 512
    calibration_windows: int = 64
    evaluation_windows: int = 32


@dataclass
class PruneSection(PruneConfig):
    """The plan: a :class:`~secateurs.pruner.PruneConfig`, with two recipe forms.

    Schedule times (``start``, ``end``, ``every``, ``at``, ``rewind``, ``sparse``, ``dense``)
    are epochs of the fine-tuning phase (fractions allowed), converted to optimizer steps when
    the run knows the data set's size. ``allocation`` may also be an automatic search
    (``sensitivity``, ``amc``, ``netadapt``), which finds per-layer ratios for the budget
    before pruning (scored on the calibration split); the schedule then prunes each layer to
    its ratio. The recipe's top-level ``seed`` seeds it.
    """

    seed: int = field(default=0, init=False)

    def _build_allocation(self) -> Allocation:
        if is_search(self.allocation):
            _check_search(self.allocation)
            return Global()  # the plan is checked with the default until the search is run
        try:
            return super()._build_allocation()
        except ConfigError as exc:
            raise ConfigError(f"{exc}; or a search: {', '.join(SEARCHES.names())}") from None

    def _build_schedule(self) -> Schedule | None:
        _check_schedule(self.schedule if self.schedule is not None else "oneshot")
        return None

    @property
    def searching(self) -> bool:
        """True when the allocation is a search to run before pruning."""
        return is_search(self.allocation)

    def config(
        self, steps_per_epoch: int, seed: int, allocation: Allocation | None = None
    ) -> PruneConfig:
        """This section as a pruning plan: schedule times in steps, the recipe's ``seed``, and
        ``allocation`` (the ratio map a search found) in place of the search."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(PruneConfig)}
        values["seed"] = seed
        values["schedule"] = schedule_in_steps(self.schedule or "oneshot", steps_per_epoch)
        if allocation is not None or self.searching:
            values["allocation"] = allocation
        return PruneConfig(**values)


@dataclass
class TrainSection(TrainConfig):
    """Dense training (:class:`~secateurs.train.TrainConfig`), plus ``regularizers`` added to
    its loss: ``bn_l1`` here is Network Slimming's sparsity training, which drives unneeded
    BatchNorm scales toward zero before the ``bn_scale`` criterion ranks channels by them."""

    regularizers: list[MethodSpec] = field(default_factory=list)


@dataclass
class ShrinkSection(ShrinkConfig):
    """Structural pruning: remove channels for real (:func:`secateurs.shrink`); the options
    are those of :class:`~secateurs.shrink.ShrinkConfig`, plus:

    ``budget``: off unless set (``{name: macs, keep: 0.5}``, ``{name: params, keep: 0.6}`` or
    ``{name: sparsity, value: 0.3}`` for a fraction of channels). It runs after dense
    training and before the ``prune`` section, which may then mask the smaller model further.
    ``steps`` > 1 reaches the budget in equal cuts with ``epochs_between`` epochs of
    fine-tuning after each cut but the last; the ``finetune`` section follows at the end.
    ``allocation`` may also be an automatic search (``sensitivity``, ``amc``, ``netadapt``,
    with their options as ``{name: amc, episodes: 40}``) that finds per-layer ratios meeting
    the budget, scored on the calibration split (training examples, never the test set). The
    recipe's top-level ``seed`` seeds it.
    """

    seed: int = field(default=0, init=False)
    budget: MethodSpec | None = None
    steps: int = 1
    epochs_between: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        with option("steps"):
            check_int(self.steps, "steps", 1)
        with option("epochs_between"):
            check_int(self.epochs_between, "epochs_between", 0)
        with option("budget"):
            if self.budget is not None:
                name = BUDGETS.build(self.budget).registry_name
                if name not in STRUCTURAL_BUDGETS:
                    raise ConfigError(
                        f"budget {self.budget!r} cannot be met by removing channels; "
                        f"structural budgets are {', '.join(STRUCTURAL_BUDGETS)}"
                    )

    def _build_allocation(self) -> str | LayerMap | None:
        if is_search(self.allocation):
            _check_search(self.allocation)
            return None  # found when the recipe runs
        try:
            return super()._build_allocation()
        except ConfigError as exc:
            raise ConfigError(f"{exc}; or a search: {', '.join(SEARCHES.names())}") from None

    @property
    def searching(self) -> bool:
        """True when the allocation is a search to run before shrinking."""
        return is_search(self.allocation)

    def config(self, seed: int, allocation: LayerMap | None = None) -> ShrinkConfig:
        """This section as a :class:`ShrinkConfig`, with the recipe's ``seed`` and
        ``allocation`` (the ratio map a search found) in place of the search."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ShrinkConfig)}
        values["seed"] = seed
        if allocation is not None:
            values["allocation"] = allocation
        elif self.searching:  # a channel space orders channels; the search gives the ratios
            values["allocation"] = "uniform"
        return ShrinkConfig(**values)


@dataclass
class FinetuneSection:
    """Recovery training during and after pruning. Null values follow the ``train`` section,
    except ``lr``, which defaults to a tenth of training's.

    ``regularizers``: terms added to the loss (``l1``, ``l2``, ``group_lasso``, ``bn_l1``, by
    name or ``{name: ..., coefficient: ...}``). ``distill``: options of
    :class:`~secateurs.train.Distillation` (``temperature``, ``alpha``, ``beta``, ``features``)
    to learn from the dense model as a teacher; ``{}`` takes the defaults, null turns it off.
    """

    epochs: int = 5
    lr: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    clip_grad: float | None = None
    regularizers: list[MethodSpec] = field(default_factory=list)
    distill: dict[str, Any] | None = None

    def config(self, train: TrainConfig) -> TrainConfig:
        """The fine-tuning :class:`TrainConfig` derived from the training one."""
        overrides: dict[str, Any] = {
            k: v
            for k, v in (
                ("lr", self.lr),
                ("optimizer", self.optimizer),
                ("momentum", self.momentum),
                ("weight_decay", self.weight_decay),
                ("clip_grad", self.clip_grad),
            )
            if v is not None
        }
        base = finetune_config(train, self.epochs)
        return dataclasses.replace(base, seed=train.seed + 1, **overrides)


@dataclass
class OutputSection:
    """Where results go, and what is measured."""

    dir: str = "runs/{name}"
    report: bool = True
    latency: bool = True
    #: Evaluate on the test set after every fine-tuning epoch (the accuracy/sparsity curve).
    eval_every_epoch: bool = True


@dataclass
class ExportSection:
    """What a run ships besides ``model.safetensors``.

    ``compressed`` writes ``model.sct`` (Deep Compression: sparse positions, shared or linearly
    quantized weights, Huffman coding; see :class:`secateurs.compress.CompressConfig` for
    ``quantization``, ``bits``, ``layer_bits``, ``index_bits`` and ``huffman``). With k-means
    sharing, ``centroid_epochs`` of centroid fine-tuning run first, at ``centroid_lr`` (null: a
    hundredth of the training rate, since a centroid's gradient sums those of every weight
    sharing it) and without weight decay. The accuracy reported for the file is that of the model loaded
    back from it. ``onnx`` writes ``model.onnx``, checked against PyTorch with onnxruntime.
    """

    compressed: bool = False
    quantization: str = "kmeans"
    bits: dict[str, int] = field(default_factory=lambda: {"conv": 8, "fc": 5})
    layer_bits: dict[str, int] = field(default_factory=dict)
    index_bits: int | None = None
    huffman: bool = True
    centroid_epochs: int = 0
    centroid_lr: float | None = None
    onnx: bool = False

    def compress_config(self) -> CompressConfig:
        return CompressConfig(
            quantization=self.quantization,
            bits=dict(self.bits),
            layer_bits=dict(self.layer_bits),
            index_bits=self.index_bits,
            huffman=self.huffman,
        )


@dataclass
class Recipe:
    """A complete, validated pipeline description."""

    name: str = "run"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    shrink: ShrinkSection = field(default_factory=ShrinkSection)
    prune: PruneSection = field(default_factory=PruneSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    output: OutputSection = field(default_factory=OutputSection)
    export: ExportSection = field(default_factory=ExportSection)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, keys a recipe file may hold (round-trips through parse)."""
        return _plain(self)

    def out_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))


_EPOCH_KEYS = ("start", "end", "every", "at", "rewind", "sparse", "dense")
#: Durations, at least one step once converted.
_DURATION_KEYS = ("every", "sparse", "dense")


def _plain(section: Any) -> Any:
    """``dataclasses.asdict`` without the fields a recipe does not set (``init=False``)."""
    if dataclasses.is_dataclass(section) and not isinstance(section, type):
        return {
            f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section) if f.init
        }
    if isinstance(section, (list, tuple)):
        return [_plain(v) for v in section]
    if isinstance(section, Mapping):
        return {k: _plain(v) for k, v in section.items()}
    return section


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:  # one of the named values, e.g. round_to: auto
        return value in typing.get_args(annotation)
    if origin is not None:
        return isinstance(value, origin)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe_type(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("NoneType", "null")


def _build_section(cls: type[Any], raw: Any, path: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"recipe key {path!r} must be a mapping; got {raw!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            raise ConfigError(
                f"unknown recipe key {where!r}; allowed under {path or 'the top level'!r}: "
                f"{', '.join(allowed)}"
            )
        annotation = hints[key]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            values[key] = _build_section(annotation, value, where)
            continue
        if not _type_ok(value, annotation):
            raise ConfigError(
                f"recipe key {where!r} has value {value!r}; expected {_describe_type(annotation)}"
            )
        values[key] = value
    try:
        return cls(**values)
    except ConfigError as exc:
        if exc.key is not None:
            key = f"{path}.{exc.key}" if path else exc.key
            given = values.get(exc.key.split(".")[0], "(default)")
            raise ConfigError(f"recipe key {key!r} has value {given!r}: {exc}") from None
        raise ConfigError(f"recipe section {path!r}: {exc}") from None


def _check_search(spec: Any) -> None:
    """A search spec names a registered search with valid options."""
    SEARCHES.build(spec)


def _check_schedule(spec: Any) -> None:
    """A schedule spec whose times are epochs: names and options checked here, values when
    they are converted to steps."""
    if not isinstance(spec, Mapping):
        SCHEDULES.build(spec)
        return
    options = {k: v for k, v in spec.items() if k not in _EPOCH_KEYS}
    obj = SCHEDULES.build(options)
    allowed: set[str] = (
        {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    )
    bad = [k for k in spec if k in _EPOCH_KEYS and k not in allowed]
    if bad:
        raise ConfigError(f"unknown option(s) {bad} for schedule {spec.get('name')!r}")


STRUCTURAL_BUDGETS = ("macs", "params", "sparsity", "bytes", "latency")


def is_search(spec: Any) -> bool:
    """True when an allocation spec names an automatic search (sensitivity, AMC, NetAdapt)."""
    name = (
        spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, Mapping) else None
    )
    return name in SEARCHES.names()


def _positive(path: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"recipe key {path!r} has value {value!r}; must be {bound}")


def validate(recipe: Recipe) -> Recipe:
    """Check values that types and the sections' own checks cannot (ranges across sections)."""
    for path, value, zero_ok in (
        ("data.batch_size", recipe.data.batch_size, False),
        ("data.limit_train", recipe.data.limit_train, False),
        ("data.limit_test", recipe.data.limit_test, False),
        ("data.calibration_examples", recipe.data.calibration_examples, False),
        ("data.window", recipe.data.window, False),
        ("data.calibration_windows", recipe.data.calibration_windows, False),
        ("data.evaluation_windows", recipe.data.evaluation_windows, False),
        ("finetune.epochs", recipe.finetune.epochs, True),
        ("finetune.lr", recipe.finetune.lr, False),
        ("export.centroid_epochs", recipe.export.centroid_epochs, True),
        ("export.centroid_lr", recipe.export.centroid_lr, False),
        ("shrink.epochs_between", recipe.shrink.epochs_between, True),
    ):
        _positive(path, value, zero_ok)
    if recipe.finetune.optimizer not in (None, "sgd", "adamw"):
        raise ConfigError(
            f"recipe key 'finetune.optimizer' has value {recipe.finetune.optimizer!r}; "
            "allowed: sgd, adamw, or null for the training optimizer"
        )
    for section in ("train", "finetune"):
        for i, spec in enumerate(getattr(recipe, section).regularizers):
            try:
                REGULARIZERS.build(spec)
            except ConfigError as exc:
                raise ConfigError(f"recipe key '{section}.regularizers[{i}]': {exc}") from None
    if recipe.finetune.distill is not None:
        try:
            build_dataclass(Distillation, recipe.finetune.distill, "distillation")
        except ConfigError as exc:
            raise ConfigError(f"recipe key 'finetune.distill': {exc}") from None
    try:
        recipe.export.compress_config()
    except ConfigError as exc:
        raise ConfigError(f"recipe section 'export': {exc}") from None
    if recipe.export.centroid_epochs and recipe.export.quantization != "kmeans":
        raise ConfigError(
            "recipe key 'export.centroid_epochs' needs 'export.quantization: kmeans' "
            f"(centroids exist only with weight sharing); got {recipe.export.quantization!r}"
        )
    return recipe


def parse(raw: Any, source: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from already-loaded YAML/JSON data."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source} must be a YAML mapping at the top level; got {type(raw).__name__}"
        )
    return validate(_build_section(Recipe, raw, ""))


def read_yaml(path: str | Path, what: str) -> tuple[Any, str]:
    """The YAML data in ``path`` (a ``what`` file: recipe, grid) and how to name it in errors;
    a missing file or bad YAML is a ConfigError."""
    p = Path(path)
    source = f"{what} file {str(p)!r}"
    if not p.is_file():
        raise ConfigError(f"{source} does not exist")
    try:
        return yaml.safe_load(p.read_text()), source
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None


def load(path: str | Path) -> Recipe:
    """Read and validate a recipe file (YAML; JSON is YAML too)."""
    raw, source = read_yaml(path, "recipe")
    return parse(raw, source=source)


def dump(recipe: Recipe) -> str:
    """The recipe as YAML (round-trips through :func:`parse`)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def schedule_in_steps(spec: Any, steps_per_epoch: int) -> Any:
    """Convert a recipe schedule's epoch-valued times to optimizer steps (a name or a schedule
    object passes through)."""
    if not isinstance(spec, Mapping):
        return spec
    out = dict(spec)
    for key in _EPOCH_KEYS:
        if key in out:
            value = out[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"recipe key 'prune.schedule.{key}' has value {value!r}; expected a number of epochs"
                )
            steps = round(value * steps_per_epoch)
            out[key] = max(steps, 1) if key in _DURATION_KEYS else steps
    return out
