"""Run a benchmark grid point by point, appending one record per run to a JSON Lines file.

For each (model, dataset, seed) the dense model is trained once and cached as safetensors
(loaded back with safetensors, never unpickled), so every method starts from the same weights
and a rerun skips training. Each point copies the dense model, prunes it with its method,
fine-tunes it with the same loop, data order and learning rate as every other method, and is
measured the same way. Everything is seeded (model init, data order, masks, corruptions), so
rerunning a point on the same machine reproduces its accuracy to the last digit.

A point that raises is recorded as ``failed`` with its traceback and the grid goes on. The
results file is append-only: rerunning the grid skips every key already recorded (finished or
failed), so an interrupted grid resumes where it stopped.

Where the points run is a :class:`~secateurs.backends.Backend`: by default one after another
in this process; on ``ray`` every point is a Ray task, and the dense model of each (model,
dataset, seed) is a task of its own that its points wait for. The data set is shared once with
every worker. Whatever the backend, this process writes each record as its point finishes (a
worker that dies loses no finished record; Ray reruns the task it was running), and the
records are the same, timings aside.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import secateurs
from secateurs.backends import Backend, Failure, LocalBackend, backend_of
from secateurs.bench.corruptions import corrupt
from secateurs.bench.grid import DatasetEntry, Grid, ModelEntry, Point
from secateurs.bench.methods import PruneContext, Pruned
from secateurs.bench.records import (
    DENSE,
    append_record,
    check_version,
    drop_partial_tail,
    new_record,
    read_records,
)
from secateurs.compress import save_compressed
from secateurs.data import DataBundle, load_dataset
from secateurs.errors import DataError, ModelError
from secateurs.metrics import evaluate, measure_latency, named_effective_parameters, profile
from secateurs.runs import versions as base_versions
from secateurs.targets import DEFAULT_TARGETS
from secateurs.train import finetune_config, make_optimizer, train
from secateurs.zoo import build_model

Batches = list[tuple[Tensor, Tensor]]


@dataclass
class GridResult:
    """What one call of :func:`run_grid` did."""

    written: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.written if r["status"] == "failed"]


def versions() -> dict[str, str]:
    """Versions of everything that can change a number, and the machine it ran on."""
    out = dict(base_versions())
    for module in ("torchvision", "numpy", "safetensors", "torch_pruning"):
        try:
            out[module] = str(__import__(module).__version__)
        except (ImportError, AttributeError):
            continue
    out["platform"] = platform.platform()
    out["machine"] = platform.machine()
    out["processor"] = platform.processor() or platform.machine()
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_bundle(entry: DatasetEntry) -> DataBundle:
    """The data set of a grid entry, cut to its train/test limits."""
    bundle = load_dataset(entry.name, **entry.options)
    if entry.train_limit or entry.test_limit:
        bundle = bundle.subset(
            entry.train_limit or len(bundle.train), entry.test_limit or len(bundle.test)
        )
    return bundle


def _batches(x: Tensor, y: Tensor, size: int = 1000) -> Batches:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@dataclass
class _Data:
    """A data set prepared once per grid: the bundle, its test batches, corrupted copies."""

    bundle: DataBundle
    test: Batches
    corrupted: dict[tuple[str, int], Batches]


def _prepare_data(entry: DatasetEntry, grid: Grid, compact: bool = False) -> _Data:
    """The data set of ``entry``, its test batches and corrupted copies. ``compact``: every
    tensor owns its storage (the bundle may be a view of a cached, larger set, and the
    batches views of the test set), for a backend that pickles it."""
    bundle = load_bundle(entry)
    if compact:
        bundle = dataclasses.replace(
            bundle,
            train=TensorDataset(*(t.clone() for t in bundle.train.tensors)),
            test=TensorDataset(*(t.clone() for t in bundle.test.tensors)),
        )
    x, y = bundle.test.tensors
    rob = grid.evaluate.robustness
    xs, ys = x[: rob.limit], y[: rob.limit]
    corrupted = {
        (name, sev): _batches(corrupt(xs, name, sev, seed=rob.seed), ys)
        for name in rob.corruptions
        for sev in rob.severities
        if x.dim() == 4
    }
    data = _Data(bundle, _batches(x, y), corrupted)
    if compact:
        data.test = [(a.clone(), b.clone()) for a, b in data.test]
        data.corrupted = {
            k: [(a.clone(), b.clone()) for a, b in v] for k, v in data.corrupted.items()
        }
    return data


def _model(entry: ModelEntry, bundle: DataBundle, seed: int) -> nn.Module:
    return build_model(
        entry.name,
        num_classes=bundle.num_classes,
        in_channels=bundle.input_shape[0],
        seed=seed,
        **entry.options,
    )


def dense_cache_path(
    cache_dir: Path, grid: Grid, model: ModelEntry, data: DatasetEntry, seed: int
) -> Path:
    """Where the dense model of (model, dataset, seed) is cached: the name carries a digest of
    everything that decides its weights, so a changed training config never loads stale ones."""
    identity = {
        "model": dataclasses.asdict(model),
        "dataset": {"name": data.name, "options": data.options, "train_limit": data.train_limit},
        "train": dataclasses.asdict(grid.train),
        "seed": seed,
        "threads": torch.get_num_threads(),
        "secateurs": secateurs.__version__,
        "torch": torch.__version__,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    safe = f"{model.name}-{data.name}".replace("/", "_").replace(":", "_")
    return cache_dir / f"{safe}-seed{seed}-{digest[:12]}.safetensors"


def dense_model(
    grid: Grid,
    model: ModelEntry,
    data: DatasetEntry,
    bundle: DataBundle,
    seed: int,
    cache_dir: Path,
) -> tuple[nn.Module, bool]:
    """The trained dense model of one (model, dataset, seed) and whether it came from cache."""
    from safetensors.torch import load_file, save_file

    path = dense_cache_path(cache_dir, grid, model, data, seed)
    net = _model(model, bundle, seed)
    if path.is_file():
        try:
            net.load_state_dict(load_file(str(path)), strict=True)
        except Exception as exc:  # safetensors and load_state_dict raise their own types
            raise ModelError(
                f"cached dense model {str(path)!r} cannot be loaded ({exc}); delete it to retrain"
            ) from None
        return net, True
    loader, _ = bundle.loaders(grid.train.batch_size, seed=seed)
    train(net, loader, grid.train.config(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return net, False


def _layer_params(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(params, nonzeros) of the prunable weights of each Linear/Conv layer, by name."""
    out: dict[str, tuple[int, int]] = {}
    for name, module, attr, tensor in named_effective_parameters(model):
        if isinstance(module, tuple(DEFAULT_TARGETS)) and attr == "weight":
            layer = name.rsplit(".", 1)[0] if "." in name else name
            out[layer] = (tensor.numel(), int(torch.count_nonzero(tensor)))
    return out


def measure(
    model: nn.Module,
    data: _Data,
    grid: Grid,
    dense_params: int,
    dense_layers: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    """Every measured field of a record for ``model`` (a plain module, masks baked in)."""

    bundle = data.bundle
    ev = evaluate(model, data.test, num_classes=bundle.num_classes)
    x = bundle.test.tensors[0]
    totals = profile(model, x[:1]).totals
    layers = _layer_params(model)
    density = {
        name: (layers[name][1] / params if name in layers else 0.0)
        for name, (params, _) in dense_layers.items()
    }
    out: dict[str, Any] = {
        "accuracy": ev.accuracy,
        "loss": ev.loss,
        "per_class_accuracy": list(ev.per_class_accuracy),
        "class_names": list(bundle.class_names) or [str(i) for i in range(bundle.num_classes)],
        "params": int(totals["params"]),
        "nonzeros": int(totals["nonzeros"]),
        "compression": dense_params / max(int(totals["nonzeros"]), 1),
        "macs_dense": totals["macs"],
        "macs_effective": totals["macs_nonzero"],
        "layer_density": density,
        "robustness": {},
    }
    spec = grid.evaluate
    if spec.export:
        with tempfile.TemporaryDirectory() as tmp:
            info = save_compressed(model, Path(tmp) / "model.sct", {"quantization": "none"})
            out["file_bytes"] = int(info.file_bytes)
    if spec.latency:
        lat = measure_latency(
            model,
            x[: spec.latency_batch],
            repeats=spec.latency_repeats,
            threads=spec.latency_threads,
        )
        out["latency_ms"] = lat.median_ms
        out["latency_batch"] = lat.batch_size
    robustness: dict[str, dict[str, float]] = {}
    for (name, sev), batches in data.corrupted.items():
        acc = evaluate(model, batches, num_classes=bundle.num_classes).accuracy
        robustness.setdefault(name, {})[str(sev)] = acc
    out["robustness"] = robustness
    return out


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def run_point(
    point: Point,
    grid: Grid,
    data: _Data,
    dense: nn.Module,
    dense_params: int,
    dense_layers: dict[str, tuple[int, int]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prune, fine-tune and measure one (method, budget) point; returns (fields, extra config)."""
    assert point.method is not None and point.budget is not None
    method = point.method.build()
    bundle = data.bundle
    ft = finetune_config(
        grid.train.config(point.seed), grid.finetune.epochs, grid.finetune.lr_factor
    )
    batch = grid.train.batch_size
    calib_loader, _ = bundle.loaders(batch, seed=point.seed)
    ft_loader, _ = bundle.loaders(batch, seed=point.seed)
    ctx = PruneContext(
        example=bundle.test.tensors[0][:1],
        train_loader=calib_loader,
        steps_per_epoch=len(ft_loader),
        finetune_epochs=ft.epochs,
        seed=point.seed,
        loss_fn=_loss,
        make_optimizer=lambda m: make_optimizer(m, ft),
    )
    model = copy.deepcopy(dense)
    torch.manual_seed(point.seed)
    t0 = time.perf_counter()
    pruned: Pruned = method.prune(model, point.budget, ctx)
    prune_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    if ft.epochs:
        train(pruned.model, ft_loader, ft, on_step=pruned.on_step, optimizer=ctx.optimizer_)
    final = pruned.finish(pruned.model)
    finetune_seconds = time.perf_counter() - t1
    fields = measure(final, data, grid, dense_params, dense_layers)
    fields.update(prune_seconds=prune_seconds, finetune_seconds=finetune_seconds)
    extra = {"finetune": dataclasses.asdict(ft), "method_info": pruned.info}
    return fields, extra


def _config(point: Point, grid: Grid, cache: Path | None, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "point": {
            "model": dataclasses.asdict(point.model),
            "dataset": dataclasses.asdict(point.dataset),
            "method": point.method.to_dict() if point.method else None,
            "budget": point.budget.to_dict() if point.budget else None,
            "seed": point.seed,
        },
        "train": {**dataclasses.asdict(grid.train), "seed": point.seed},
        "finetune": dataclasses.asdict(grid.finetune),
        "evaluate": dataclasses.asdict(grid.evaluate),
        "threads": torch.get_num_threads(),
        "dense_cache": cache.name if cache else None,
        **extra,
    }


def _base(point: Point, grid: Grid) -> dict[str, Any]:
    return {
        "secateurs_version": secateurs.__version__,
        "grid": grid.name,
        "key": point.key,
        "model": point.model.name,
        "dataset": point.dataset.name,
        "method": point.method.name if point.method else DENSE,
        "budget": point.budget.to_dict() if point.budget else None,
        "budget_label": point.budget.label if point.budget else DENSE,
        "seed": point.seed,
    }


def check_results_file(out: Path, grid: Grid) -> set[str]:
    """Keys already recorded in ``out`` (empty if it does not exist).

    Raises :class:`DataError` before anything runs if the file is not a results file of this
    schema, was written by another secateurs version, or holds another grid.
    """
    if not out.exists():
        return set()
    if not out.is_file():
        raise DataError(f"results path {str(out)!r} exists and is not a file")
    records = read_records(out, allow_partial_tail=True)
    check_version(records, secateurs.__version__, f"results file {str(out)!r}")
    grids = sorted({r["grid"] for r in records} - {grid.name})
    if grids:
        raise DataError(
            f"results file {str(out)!r} holds grid(s) {', '.join(grids)}, not {grid.name!r}; "
            "write each grid to its own file (--out)"
        )
    return {r["key"] for r in records}


def run_grid(
    grid: Grid,
    out: str | Path,
    *,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    backend: str | Mapping[str, Any] | Backend | None = None,
    on_start: Callable[[int], object] | None = None,
    on_record: Callable[[dict[str, Any]], object] | None = None,
    on_message: Callable[[str], object] | None = None,
) -> GridResult:
    """Run every point of ``grid`` not yet in ``out``; append one record per run.

    ``cache_dir`` holds the dense models (default: ``<out's folder>/cache/bench``).
    ``threads`` sets ``torch.set_num_threads`` for the whole grid, in every worker (default:
    the grid's ``threads``, else unchanged); it is part of the dense cache's key, since thread
    count can change float sums. ``backend``: where the points run (see
    :func:`~secateurs.backends.backend_of`; default ``local``, one after another in this
    process; a backend given by name or mapping runs each point with those threads); it
    starts before anything is written, so one that cannot start leaves ``out`` as it was.
    ``on_start`` gets the number of runs to do, ``on_record`` every record written (in the
    order the runs finish), ``on_message`` progress lines.
    """
    out = Path(out)
    n_threads = threads if threads is not None else grid.threads
    backend_ = LocalBackend() if backend is None else backend_of(backend, threads=n_threads)
    done = check_results_file(out, grid)
    cache = Path(cache_dir) if cache_dir is not None else out.parent / "cache" / "bench"
    say = on_message or (lambda _text: None)
    result = GridResult()

    def write(record: dict[str, Any]) -> None:
        written = append_record(out, record)
        result.written.append(written)
        if on_record is not None:
            on_record(written)

    with _threads(n_threads), backend_.session():
        if out.exists():
            drop_partial_tail(out)
        pending = [p for p in grid.all_points() if p.key not in done]
        result.skipped = [p.key for p in grid.all_points() if p.key in done]
        if on_start is not None:
            on_start(len(pending))
        for data_entry in grid.datasets:
            groups = [
                ((model_entry, seed), points)
                for model_entry in grid.models
                for seed in grid.seeds
                if (
                    points := [
                        p for p in grid.points(model_entry, data_entry, seed) if p.key not in done
                    ]
                )
            ]
            if not groups:
                continue
            data = _prepare_data(data_entry, grid, compact=backend_.pickles_shared)
            shared = _Shared(grid, data_entry, data, cache, torch.get_num_threads())
            flat = [(g, point) for g, (_, points) in enumerate(groups) for point in points]
            started: set[int] = set()  # groups with a record already
            outcomes = backend_.map_after(_train_dense, _run_cell, groups, shared)
            with closing(outcomes):
                for index, outcome in outcomes:
                    group, point = flat[index]
                    if group not in started:
                        started.add(group)
                        say(f"{point.model.name} on {data_entry.name}, seed {point.seed}")
                    record = (
                        _lost_record(point, grid, cache, outcome)
                        if isinstance(outcome, Failure)
                        else outcome
                    )
                    write(record)
                    status = "failed" if record["error"] else f"accuracy {record['accuracy']:.4f}"
                    say(f"  {point.key}: {status}")
    return result


@dataclass
class _Shared:
    """What every run of one data set needs, shared once with the workers: the grid, the
    data set and its prepared data, the dense cache and the torch threads each run uses."""

    grid: Grid
    data_entry: DatasetEntry
    data: _Data
    cache_dir: Path
    threads: int


@dataclass
class _Dense:
    """The dense model of one (model, dataset, seed), or the traceback of its training."""

    model: nn.Module | None
    cached: bool
    seconds: float
    error: str | None


def _train_dense(shared: _Shared, key: tuple[ModelEntry, int]) -> _Dense:
    """The setup of a (model, seed) group: train the dense model, or load it from the cache."""
    model_entry, seed = key
    with _threads(shared.threads):
        t0 = time.perf_counter()
        try:
            dense, cached = dense_model(
                shared.grid,
                model_entry,
                shared.data_entry,
                shared.data.bundle,
                seed,
                shared.cache_dir,
            )
            return _Dense(dense, cached, time.perf_counter() - t0, None)
        except Exception:
            return _Dense(None, False, time.perf_counter() - t0, traceback.format_exc())


def _run_cell(shared: _Shared, dense: _Dense | Failure, point: Point) -> dict[str, Any]:
    """One point of the grid, given its group's dense model: its record (``failed``, with
    the traceback, when it raised or when the dense model could not be trained)."""
    grid = shared.grid
    if isinstance(dense, Failure):  # the setup task itself was lost
        dense = _Dense(None, False, 0.0, dense.traceback)
    with _threads(shared.threads):
        extra: dict[str, Any] = {}
        fields: dict[str, Any] = {}
        error = None
        if dense.model is None:
            error = (
                dense.error
                if point.method is None
                else f"the dense model could not be trained:\n{dense.error}"
            )
        else:
            try:
                dense_layers = _layer_params(dense.model)
                dense_params = sum(p.numel() for p in dense.model.parameters())
                if point.method is None:
                    fields = measure(dense.model, shared.data, grid, dense_params, dense_layers)
                    fields.update(prune_seconds=0.0, finetune_seconds=0.0)
                    extra = {"dense_train_seconds": None if dense.cached else dense.seconds}
                else:
                    fields, extra = run_point(
                        point, grid, shared.data, dense.model, dense_params, dense_layers
                    )
            except Exception:
                error = traceback.format_exc()
        return new_record(
            **_base(point, grid),
            **(fields if error is None else {}),
            status="ok" if error is None else "failed",
            error=error,
            config=_config(point, grid, _cache_of(shared, point), extra),
            versions=versions(),
            timestamp=_now(),
        )


def _cache_of(shared: _Shared, point: Point) -> Path:
    return dense_cache_path(shared.cache_dir, shared.grid, point.model, point.dataset, point.seed)


def _lost_record(point: Point, grid: Grid, cache_dir: Path, failure: Failure) -> dict[str, Any]:
    """The ``failed`` record of a point whose task never came back (its worker was lost more
    often than the backend retries), so that the grid still completes."""
    cache = dense_cache_path(cache_dir, grid, point.model, point.dataset, point.seed)
    return new_record(
        **_base(point, grid),
        status="failed",
        error=f"the run was lost ({failure.kind}):\n{failure.traceback}",
        config=_config(point, grid, cache, {}),
        versions=versions(),
        timestamp=_now(),
    )
