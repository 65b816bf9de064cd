"""A benchmark grid: models x datasets x methods x budgets x seeds, declared in YAML.

Example (every section but ``name``, ``models``, ``datasets``, ``methods`` and ``budgets`` is
optional)::

    name: fashion-lenets
    seeds: [0, 1, 2]
    models: [lenet-300-100, {name: vgg-bn, options: {width: 0.5}}]
    datasets: [{name: fashion-mnist, train_limit: 10000, test_limit: 2000}]
    methods:
      - random
      - global_magnitude
      - {name: lamp-gradual, method: secateurs, allocation: lamp,
         schedule: {name: gradual, start: 0, end: 1, every: 0.25}}
      - {name: shrink}
    budgets: {sparsity: [0.9, 0.95], macs: [0.5]}
    train: {epochs: 3, lr: 0.05, batch_size: 128}
    finetune: {epochs: 1, lr_factor: 0.1}
    evaluate: {latency: true, latency_batch: 1, export: true,
               robustness: {corruptions: [gaussian_noise, blur], severities: [1, 3, 5]}}

Every name is checked when the grid is parsed, before anything runs: an unknown model,
data set, method, budget kind or option is a :class:`ConfigError` naming what is allowed, and
so is a method given a budget kind it cannot take (element methods take ``sparsity``/``params``,
channel methods ``macs``/``params``). Each method runs at every grid budget of a kind it
accepts, or at its own ``budgets`` when it gives them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateurs.bench.corruptions import CORRUPTIONS, SEVERITIES
from secateurs.bench.methods import BUDGET_KINDS, METHODS, BenchMethod, BudgetPoint
from secateurs.bench.records import DENSE, make_key
from secateurs.data import DATASETS
from secateurs.errors import ConfigError
from secateurs.recipe import read_yaml
from secateurs.registry import build_dataclass
from secateurs.train import TrainConfig
from secateurs.zoo import MODELS, TORCHVISION_PREFIX, build_model


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_keys(raw: Mapping[str, Any], allowed: list[str], where: str) -> None:
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
        )


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _section(cls: type[Any], raw: Any, where: str) -> Any:
    """A dataclass section from a mapping (or None: the defaults), naming any bad key."""
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping; got {raw!r}")
    _check_keys(raw, _fields(cls), where)
    return build_dataclass(cls, dict(raw), where)


@dataclass
class ModelEntry:
    """A zoo model by name (``secateurs methods`` lists none; see ``secateurs.zoo.MODELS``)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetEntry:
    """A registered data set, its loader options, and the train/test subsets a grid uses.

    ``train_limit`` / ``test_limit`` keep the first examples of each split (None: all).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    train_limit: int | None = None
    test_limit: int | None = None

    def __post_init__(self) -> None:
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            if value is not None and not (_is_int(value) and value >= 1):
                raise ConfigError(
                    f"dataset {self.name!r}: {key} = {value!r} is invalid; must be an integer >= 1"
                )


@dataclass
class MethodEntry:
    """A method of the grid: its label in the results, its registry name, options, budgets."""

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    budgets: list[BudgetPoint] = field(default_factory=list)

    def build(self) -> BenchMethod:
        """A fresh method object with this entry's options."""
        cls = METHODS.get(self.method)
        built: BenchMethod = build_dataclass(cls, self.options, where=f"method {self.name!r}")
        return built

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, **self.options}


@dataclass
class TrainSpec:
    """Dense training: :class:`secateurs.train.TrainConfig` fields (its seed is the grid's)."""

    epochs: int = 3
    lr: float = 0.05
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    cosine: bool = True
    label_smoothing: float = 0.0
    clip_grad: float | None = None

    def __post_init__(self) -> None:
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ConfigError(f"train.batch_size = {self.batch_size!r} is invalid; must be >= 1")
        self.config(0)  # TrainConfig checks the rest

    def config(self, seed: int) -> Any:
        """The :class:`TrainConfig` of the dense model of one seed."""
        values = dataclasses.asdict(self)
        values.pop("batch_size")
        return TrainConfig(seed=seed, **values)


@dataclass
class FinetuneSpec:
    """Fine-tuning after pruning, identical for every method: the training config with
    ``epochs`` and the learning rate times ``lr_factor``."""

    epochs: int = 1
    lr_factor: float = 0.1

    def __post_init__(self) -> None:
        if not (_is_int(self.epochs) and self.epochs >= 0):
            raise ConfigError(f"finetune.epochs = {self.epochs!r} is invalid; must be >= 0")
        if not (_is_number(self.lr_factor) and self.lr_factor > 0):
            raise ConfigError(f"finetune.lr_factor = {self.lr_factor!r} is invalid; must be > 0")


@dataclass
class RobustnessSpec:
    """Corrupted copies of the first ``limit`` test examples (an empty list turns it off)."""

    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS.names()))
    severities: list[int] = field(default_factory=lambda: [1, 3, 5])
    limit: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.corruptions, list):
            raise ConfigError(f"robustness.corruptions must be a list; got {self.corruptions!r}")
        for name in self.corruptions:
            CORRUPTIONS.get(name)
        if not isinstance(self.severities, list) or any(
            s not in SEVERITIES or isinstance(s, bool) for s in self.severities
        ):
            raise ConfigError(
                f"robustness.severities = {self.severities!r} is invalid; must be a list of "
                f"{', '.join(map(str, SEVERITIES))}"
            )
        if not (_is_int(self.limit) and self.limit >= 1):
            raise ConfigError(f"robustness.limit = {self.limit!r} is invalid; must be >= 1")
        if not _is_int(self.seed):
            raise ConfigError(f"robustness.seed = {self.seed!r} is invalid; must be an integer")


@dataclass
class EvaluateSpec:
    """What is measured besides accuracy: latency, a file export, robustness."""

    latency: bool = True
    latency_batch: int = 1
    latency_repeats: int = 20
    latency_threads: int | None = 1
    export: bool = True
    robustness: RobustnessSpec = field(default_factory=RobustnessSpec)

    def __post_init__(self) -> None:
        if isinstance(self.robustness, Mapping):
            self.robustness = _section(RobustnessSpec, self.robustness, "evaluate.robustness")
        for key in ("latency_batch", "latency_repeats"):
            if not (_is_int(getattr(self, key)) and getattr(self, key) >= 1):
                raise ConfigError(f"evaluate.{key} = {getattr(self, key)!r}; must be >= 1")
        if self.latency_threads is not None and not (
            _is_int(self.latency_threads) and self.latency_threads >= 1
        ):
            raise ConfigError(
                f"evaluate.latency_threads = {self.latency_threads!r}; must be >= 1 or null"
            )


@dataclass(frozen=True)
class Point:
    """One run of the grid; ``method`` is None for the dense reference."""

    model: ModelEntry
    dataset: DatasetEntry
    method: MethodEntry | None
    budget: BudgetPoint | None
    seed: int

    @property
    def key(self) -> str:
        return make_key(
            self.model.name,
            self.dataset.name,
            self.method.name if self.method else DENSE,
            self.budget.label if self.budget else DENSE,
            self.seed,
        )


@dataclass
class Grid:
    """A parsed, validated grid (see the module docstring for its YAML form)."""

    name: str
    models: list[ModelEntry]
    datasets: list[DatasetEntry]
    methods: list[MethodEntry]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: TrainSpec = field(default_factory=TrainSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    threads: int | None = None

    def points(self, model: ModelEntry, dataset: DatasetEntry, seed: int) -> list[Point]:
        """The dense reference and every (method, budget) of one (model, dataset, seed)."""
        out = [Point(model, dataset, None, None, seed)]
        for method in self.methods:
            out += [Point(model, dataset, method, b, seed) for b in method.budgets]
        return out

    def all_points(self) -> list[Point]:
        return [
            p
            for d in self.datasets
            for m in self.models
            for s in self.seeds
            for p in self.points(m, d, s)
        ]

    def to_dict(self) -> dict[str, Any]:
        """The grid as plain data (what a record's config quotes)."""
        return {
            "name": self.name,
            "models": [dataclasses.asdict(m) for m in self.models],
            "datasets": [dataclasses.asdict(d) for d in self.datasets],
            "methods": [m.to_dict() for m in self.methods],
            "seeds": list(self.seeds),
            "train": dataclasses.asdict(self.train),
            "finetune": dataclasses.asdict(self.finetune),
            "evaluate": dataclasses.asdict(self.evaluate),
            "threads": self.threads,
        }


TOP_KEYS = [
    "name",
    "models",
    "datasets",
    "methods",
    "budgets",
    "seeds",
    "train",
    "finetune",
    "evaluate",
    "threads",
]


def _list(raw: Mapping[str, Any], key: str, source: str) -> list[Any]:
    value = raw.get(key)
    if value is None:
        raise ConfigError(f"{source}: '{key}' is required (a list)")
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: '{key}' must be a non-empty list; got {value!r}")
    return value


def _named(item: Any, where: str, allowed: list[str]) -> dict[str, Any]:
    """``"name"`` or ``{name: ..., ...}`` as a dict with a string ``name``."""
    if isinstance(item, str):
        return {"name": item}
    if isinstance(item, Mapping) and isinstance(item.get("name"), str):
        _check_keys(item, allowed, f"{where} {item['name']!r}")
        return dict(item)
    raise ConfigError(f"{where} entries must be a name or a mapping with 'name'; got {item!r}")


def _parse_model(item: Any) -> ModelEntry:
    entry = _named(item, "models", ["name", "options"])
    name, options = entry["name"], entry.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"model {name!r}: options must be a mapping; got {options!r}")
    if not name.startswith(TORCHVISION_PREFIX):
        MODELS.get(name)  # unknown -> ConfigError listing the zoo
    build_model(name, **options)  # checks the options (random weights, cheap)
    return ModelEntry(name, dict(options))


def _parse_dataset(item: Any) -> DatasetEntry:
    entry = _named(item, "datasets", _fields(DatasetEntry))
    loader = DATASETS.get(entry["name"])
    options = entry.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"dataset {entry['name']!r}: options must be a mapping")
    allowed = list(inspect.signature(loader).parameters)
    _check_keys(options, allowed, f"dataset {entry['name']!r} options")
    entry["options"] = dict(options)
    built: DatasetEntry = build_dataclass(DatasetEntry, entry, f"dataset {entry['name']!r}")
    return built


def _parse_budgets(raw: Any, where: str) -> list[BudgetPoint]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            f"{where} must be a mapping of budget kind to a list of values, e.g. "
            f"{{sparsity: [0.9, 0.95], macs: [0.5]}}; got {raw!r}"
        )
    out: list[BudgetPoint] = []
    for kind, values in raw.items():
        if kind not in BUDGET_KINDS:
            raise ConfigError(
                f"{where}: unknown budget kind {kind!r}; allowed: {', '.join(BUDGET_KINDS)}"
            )
        values = values if isinstance(values, list) else [values]
        for value in values:
            ok = _is_number(value) and (0 <= value < 1 if kind == "sparsity" else 0 < value <= 1)
            if not ok:
                allowed = (
                    "in [0, 1) (fraction removed)"
                    if kind == "sparsity"
                    else ("in (0, 1] (fraction kept)")
                )
                raise ConfigError(f"{where}: {kind} = {value!r} is invalid; must be {allowed}")
            out.append(BudgetPoint(str(kind), float(value)))
    return out


def _parse_method(item: Any, budgets: list[BudgetPoint] | None) -> MethodEntry:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
        raise ConfigError(f"methods entries must be a name or a mapping with 'name'; got {item!r}")
    options = dict(item)
    label = options.pop("name")
    kind = options.pop("method", label)
    if not isinstance(kind, str):
        raise ConfigError(f"method {label!r}: 'method' must be a registered name; got {kind!r}")
    if kind == DENSE or label == DENSE:
        raise ConfigError(f"{DENSE!r} is the reference every grid runs; it is not a method name")
    if "|" in label:
        raise ConfigError(f"method label {label!r} must not contain '|' (it separates key parts)")
    cls = METHODS.get(kind)  # unknown -> ConfigError listing the registered methods
    own = options.pop("budgets", None)
    entry = MethodEntry(label, kind, options)
    entry.build().check()
    accepted = cls.budget_kinds
    if own is not None:
        chosen = _parse_budgets(own, f"method {label!r} budgets")
        wrong = sorted({b.kind for b in chosen if b.kind not in accepted})
        if wrong:
            raise ConfigError(
                f"method {label!r} ({kind}) cannot take {', '.join(wrong)} budgets; it takes "
                f"{', '.join(accepted)}"
            )
    else:
        chosen = [b for b in budgets or [] if b.kind in accepted]
        if not chosen:
            declared = sorted({b.kind for b in budgets or []}) or ["none"]
            raise ConfigError(
                f"method {label!r} ({kind}) takes {' or '.join(accepted)} budgets, but the grid "
                f"declares {', '.join(declared)}; add budgets.{accepted[0]} or give the method "
                "its own 'budgets'"
            )
    entry.budgets = chosen
    return entry


def parse_grid(raw: Any, source: str = "grid") -> Grid:
    """Validate ``raw`` (the YAML's mapping) and return the :class:`Grid`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source} must be a YAML mapping; got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, source)
    name = raw.get("name")
    if not isinstance(name, str) or not name or "|" in name:
        raise ConfigError(f"{source}: 'name' is required (a string without '|'); got {name!r}")
    models = [_parse_model(m) for m in _list(raw, "models", source)]
    datasets = [_parse_dataset(d) for d in _list(raw, "datasets", source)]
    budgets = _parse_budgets(raw["budgets"], "budgets") if raw.get("budgets") is not None else None
    methods = [_parse_method(m, budgets) for m in _list(raw, "methods", source)]
    for what, entries in (("model", models), ("dataset", datasets), ("method", methods)):
        names = [e.name for e in entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"{source}: {what} name(s) {', '.join(twice)} appear twice")
    seeds = raw.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise ConfigError(f"{source}: seeds = {seeds!r} is invalid; must be a list of integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: seeds {seeds!r} repeat a value")
    threads = raw.get("threads")
    if threads is not None and not (_is_int(threads) and threads >= 1):
        raise ConfigError(f"{source}: threads = {threads!r} is invalid; must be >= 1 or null")
    return Grid(
        name=name,
        models=models,
        datasets=datasets,
        methods=methods,
        seeds=list(seeds),
        train=_section(TrainSpec, raw.get("train"), "train"),
        finetune=_section(FinetuneSpec, raw.get("finetune"), "finetune"),
        evaluate=_section(EvaluateSpec, raw.get("evaluate"), "evaluate"),
        threads=threads,
    )


def load_grid(path: str | Path) -> Grid:
    """Read and validate the grid YAML at ``path``."""
    raw, source = read_yaml(path, "grid")
    return parse_grid(raw, source=source)
