"""Run a recipe end to end: data, model, dense training (or a checkpoint), pruning during
fine-tuning, measurement of both models, export and report.

The library never prints: progress goes through :class:`Progress` callbacks, which the CLI turns
into progress bars.

Under ``torchrun`` (``secateurs run RECIPE --nproc N``) every rank runs :func:`run`: each trains
on its share of every batch under ``DistributedDataParallel`` and calibrates on its share of the
calibration batches, the pruner sums the statistics over the ranks, and every rank ends with
the same model; rank 0 alone measures, writes the files and the report (the others return
early, with the plan and the prune events in their report). :func:`check_parallel` says what a
recipe needs to run that way.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from secateurs.allocation import Allocation
from secateurs.budgets import BUDGETS, Budget
from secateurs.compress import load_compressed, save_compressed, share_weights_
from secateurs.data import DataBundle, load_dataset
from secateurs.distributed import (
    device,
    is_distributed,
    rank,
    sharded_loader,
    share,
    world_size,
)
from secateurs.errors import ConfigError, ModelError
from secateurs.export import export_onnx, untied_state
from secateurs.graph.surgery import ChannelPlan, apply_plan_
from secateurs.masks import collect_masks, make_permanent_
from secateurs.metrics import evaluate, measure_latency, profile
from secateurs.pipeline_lm import is_language_model, run_language_model
from secateurs.provenance import report_of
from secateurs.pruner import Pruner
from secateurs.realise import realise
from secateurs.recipe import Recipe
from secateurs.registry import build_dataclass
from secateurs.report import RunReport, write_report
from secateurs.report.plots import sensitivity_curves
from secateurs.report.run_html import write_sensitivity_page
from secateurs.report.writer import _jsonable
from secateurs.runs import Progress, RunResult, versions
from secateurs.search.base import SearchResult, search_allocation
from secateurs.search.space import ChannelSpace, ElementSpace, LayerSpace
from secateurs.shrink import ShrinkReport, shrink
from secateurs.train import REGULARIZERS, Distillation, TrainConfig, make_optimizer, train
from secateurs.zoo import build_model

MODEL_FILE = "model.safetensors"
COMPRESSED_FILE = "model.sct"
ONNX_FILE = "model.onnx"
DENSE_FILE = "dense.safetensors"
META_FILE = "model.json"


def save_checkpoint(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Save a plain (mask-free) state dict as safetensors, with metadata beside it."""
    save_file(untied_state(model.state_dict()), str(path))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))


def load_checkpoint(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a safetensors state dict strictly into ``model`` (no code is executed)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"checkpoint {str(p)!r} does not exist")
    try:
        state = load_file(str(p))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(
            f"checkpoint {str(p)!r} is not a readable safetensors file: {exc}"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(
            f"checkpoint {str(p)!r} does not fit {type(model).__name__}: {first}"
        ) from None
    return model


def load_model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by ``<checkpoint>.json`` and load the weights."""
    p = Path(path)
    meta_path = p.with_suffix(".json")
    if not meta_path.is_file():
        raise ConfigError(
            f"{str(meta_path)!r} is missing: secateurs needs the metadata file written beside "
            "the checkpoint to know which architecture to rebuild"
        )
    meta = json.loads(meta_path.read_text())
    return load_checkpoint(p, rebuild_model(meta)), meta


def rebuild_model(meta: dict[str, Any]) -> nn.Module:
    """A fresh model of the architecture ``meta`` describes, with its channels removed when
    the run shrank it (the channel plan is replayed), ready to load the saved weights."""
    model = build_model(
        meta["model"],
        num_classes=meta["num_classes"],
        in_channels=meta["in_channels"],
        **meta.get("model_options", {}),
    )
    if meta.get("channel_plan"):
        apply_plan_(model, ChannelPlan.from_json(meta["channel_plan"]))
    return model


def _measure(
    model: nn.Module,
    test_loader: DataLoader[Any],
    example: Tensor,
    latency: bool,
    file_bytes: int | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy, size, MACs and latency of ``model``; returns (metrics, per-layer stats)."""
    ev = evaluate(model, test_loader)
    stats = profile(model, example[:1]).to_dict()  # MACs per example
    totals = stats["totals"]
    out: dict[str, Any] = {
        "accuracy": ev.accuracy,
        "loss": ev.loss,
        "per_class_accuracy": list(ev.per_class_accuracy),
        "params": totals["params"],
        "nonzeros": totals["nonzeros"],
        "macs": totals["macs"],
        "macs_nonzero": totals["macs_nonzero"],
        "bytes_dense": totals["bytes_dense"],
        "bytes_csr": totals["bytes_csr"],
        "file_bytes": file_bytes,
        "latency_ms": None,
        "latency_batch64_ms": None,
    }
    if latency:
        out["latency_ms"] = measure_latency(model, example[:1]).median_ms
        out["latency_batch64_ms"] = measure_latency(model, example[:64], repeats=10).median_ms
    return out, stats["layers"]


def check_parallel(recipe: Recipe, processes: int, bundle: DataBundle | None = None) -> None:
    """Raise :class:`ConfigError` unless ``recipe`` can run on ``processes`` data-parallel
    processes; nothing is trained or written. ``bundle`` is the recipe's data, loaded when
    not given (the sizes are checked).

    ``data.batch_size`` is the global batch: each rank takes ``batch_size / processes``
    examples of every batch, so the ranks together take the batches one process takes, and the
    recipe means the same on any number of processes. Hence the batch size must be a multiple
    of the processes, every rank needs at least one training example, and a plan that reads
    calibration data (``taylor``, ``obd``, ``rigl``, the layer-wise criteria) needs at least one
    calibration batch per rank at each pruning event. Language-model recipes (one-shot from
    calibration text), allocation searches and latency budgets (timed on each machine, so the
    ranks would disagree) run in one process.
    """
    n = processes
    if is_language_model(recipe):
        raise ConfigError(
            "language-model recipes prune one-shot from calibration text in one process; "
            "run them without --nproc / torchrun"
        )
    if recipe.prune.searching or recipe.shrink.searching:
        raise ConfigError(
            "an allocation search runs in one process: find the ratios with 'secateurs "
            "sensitivity' or a one-process run, then give them as a layer_map"
        )
    if recipe.shrink.budget is not None and BUDGETS.build(recipe.shrink.budget).registry_name == (
        "latency"
    ):
        raise ConfigError(
            "shrink.budget latency is timed on each machine, so the processes would remove "
            "different channels; use macs or params with --nproc / torchrun"
        )
    batch = recipe.data.batch_size
    if batch % n:
        fits = [k for k in (batch - batch % n, batch - batch % n + n) if k > 0]
        raise ConfigError(
            f"data.batch_size = {batch} does not split among {n} processes (each takes "
            f"batch_size / {n} examples of every batch); use a multiple of {n}, e.g. "
            f"{' or '.join(map(str, fits))}, or another number of processes"
        )
    bundle = bundle if bundle is not None else _load_data(recipe)
    n_train = len(bundle.train)
    if n_train < n:
        raise ConfigError(
            f"{n} processes but only {n_train} training examples: each process needs at "
            "least one; use fewer processes"
        )
    plan = recipe.prune.config(-(-n_train // batch), recipe.seed)
    assert plan.schedule_ is not None
    if plan.criterion_.needs_data or plan.schedule_.needs_data:
        examples = min(recipe.data.calibration_examples, n_train)
        per_event = min(plan.calibration_batches, -(-examples // batch))
        if per_event < n:
            raise ConfigError(
                f"{n} processes but the plan reads {per_event} calibration batch(es) per pruning "
                f"event ({examples} examples in batches of {batch}, prune.calibration_batches = "
                f"{plan.calibration_batches}): each process needs at least one; use at most "
                f"{per_event} processes or raise data.calibration_examples"
            )


def run(recipe: Recipe, progress: Progress | None = None) -> RunResult:
    """Execute ``recipe``; returns the report, the pruned model and where files went.

    A recipe whose model is a language model runs :func:`~secateurs.pipeline_lm.
    run_language_model` (one-shot pruning from calibration text, perplexity). Under
    ``torchrun`` every rank calls it (see the module's documentation); the recipe is checked
    by :func:`check_parallel` first."""
    parallel = is_distributed()
    if parallel:
        check_parallel(recipe, world_size())
    if is_language_model(recipe):
        return run_language_model(recipe, progress)
    progress = progress or Progress()
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    out_dir = recipe.out_dir()
    main = rank() == 0

    bundle, model, (train_loader, test_loader), example, calib = _prepare(recipe)
    # the pruner's calibration data: this rank's share of the batches one process would read
    prune_data: Iterable[Any] = calib
    if parallel:
        train_loader = sharded_loader(bundle.train, recipe.data.batch_size, seed=recipe.seed)
        prune_data = share(calib, recipe.prune.calibration_batches)
        model.to(device())
    steps_per_epoch = len(train_loader)

    # Build the pruner first so a bad plan fails before any training.
    p = recipe.prune
    structural = recipe.shrink.budget is not None
    masking = p.sparsity is not None or p.budget is not None or not structural

    searching = masking and p.searching

    def make_pruner(model: nn.Module, allocation: Allocation | None = None) -> Pruner:
        # a search's ratio map replaces the allocation once found; until then the plan is
        # checked with the default
        config = p.config(steps_per_epoch, recipe.seed, allocation)
        if not masking:
            config = dataclasses.replace(config, sparsity=0.0)
        return Pruner(model, config=config, data=prune_data, loss_fn=nn.functional.cross_entropy)

    # with shrinking, the pruner is rebuilt on the smaller model; this one checks the plan
    pruner = make_pruner(copy.deepcopy(model) if structural else model)
    ft_steps = recipe.finetune.epochs * steps_per_epoch
    last = pruner.last_step
    if last > ft_steps:
        raise ConfigError(
            f"the pruning schedule's last event is at step {last} but fine-tuning has only "
            f"{ft_steps} steps ({recipe.finetune.epochs} epochs x {steps_per_epoch}); raise "
            "'finetune.epochs' or end the schedule earlier"
        )

    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    train_cfg = recipe.train
    meta = {
        "model": recipe.model.name,
        "model_options": recipe.model.options,
        "num_classes": bundle.num_classes,
        "in_channels": bundle.input_shape[0],
        "input_shape": list(bundle.input_shape),
        "dataset": bundle.name,
        "recipe": recipe.to_dict(),
        "versions": versions(),
    }
    t_dense = time.perf_counter()
    _dense(recipe, model, train_loader, progress)
    dense_seconds = time.perf_counter() - t_dense
    dense_path = out_dir / DENSE_FILE
    dense: dict[str, Any] = {}
    if main:  # measured on the CPU (a copy, when the model trains on a GPU)
        host = model if device().type == "cpu" else copy.deepcopy(model).cpu()
        save_checkpoint(host, dense_path, {**meta, "pruned": False})
        dense, _ = _measure(
            host, test_loader, example, recipe.output.latency, dense_path.stat().st_size
        )
        progress.message(f"dense accuracy {dense['accuracy']:.2%}")

    trajectory: list[dict[str, Any]] = [
        {
            "epoch": 0,
            "step": 0,
            "sparsity": pruner.measured_sparsity(),
            "accuracy": dense.get("accuracy"),
        }
    ]
    # the dense model teaches the pruned one when the recipe distills
    teacher = copy.deepcopy(model) if recipe.finetune.distill is not None else None
    t_prune = time.perf_counter()
    ft_cfg = recipe.finetune.config(train_cfg)
    shrunk: dict[str, Any] = {}
    searches: dict[str, Any] = {}
    if structural:
        model, shrunk = _shrink(
            recipe, model, example.to(device()), calib, train_loader, ft_cfg, progress
        )
        meta["channel_plan"] = shrunk.pop("plan")
        if "search" in shrunk:
            searches["shrink"] = shrunk.pop("search")
        pruner = make_pruner(model)
    if searching:
        space = _element_space(recipe, model, example, calib)
        found = _search(
            recipe, p.allocation, space, pruner.budget_, calib, train_loader, ft_cfg, progress
        )
        searches["prune"] = found.to_dict()
        pruner = make_pruner(model, space.layer_map(found.ratios))
    pruner.step()  # step 0: one-shot schedules prune before fine-tuning starts

    def on_epoch_end(epoch: int, loss: float) -> None:
        point: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": pruner.steps_done,
            "sparsity": pruner.measured_sparsity(),
            "train_loss": loss,
        }
        if recipe.output.eval_every_epoch and main:
            point["accuracy"] = evaluate(model, test_loader).accuracy
        trajectory.append(point)
        progress.message(
            f"epoch {epoch + 1}: sparsity {point['sparsity']:.2%}"
            + (f", accuracy {point['accuracy']:.2%}" if "accuracy" in point else "")
        )

    tickets: list[str] = []

    def on_step(_: int) -> None:
        if pruner.step() and pruner.history[-1].kind == "rewind" and main:
            # a lottery round ended: keep its ticket (the masks) as a checkpoint
            path = out_dir / f"ticket_round{len(tickets) + 1}.safetensors"
            save_file({k: v.contiguous().cpu() for k, v in collect_masks(model).items()}, str(path))
            tickets.append(str(path))
            progress.message(f"lottery round {len(tickets)}: ticket saved to {path}")

    if ft_cfg.epochs:
        progress.phase("pruning and fine-tuning", ft_steps)
        # the pruner resets the optimizer state of weights it grows, revives or rewinds
        pruner.optimizer = make_optimizer(model, ft_cfg)
        terms: list[Any] = [
            REGULARIZERS.build(spec).bind(model) for spec in recipe.finetune.regularizers
        ]
        with contextlib.ExitStack() as stack:
            if teacher is not None:
                kd = build_dataclass(Distillation, recipe.finetune.distill or {}, "distillation")
                stack.enter_context(kd.bind(teacher, model, example[:2].to(device())))
                terms.append(kd)
            train(
                model,
                train_loader,
                ft_cfg,
                on_step=on_step,
                on_epoch_end=on_epoch_end,
                progress=progress.advance,
                loss_terms=terms,
                optimizer=pruner.optimizer,
            )
    prune_seconds = time.perf_counter() - t_prune
    plan = pruner.plan()
    history = [e.__dict__ for e in pruner.history]
    make_permanent_(model)
    centroids = recipe.export.compressed and recipe.export.centroid_epochs > 0
    if not main:  # every rank shares the training, the centroids' fine-tuning included
        if centroids:
            _tune_centroids(recipe, model, train_loader)
            make_permanent_(model)
        model.cpu()
        return RunResult(
            report=RunReport(
                title=recipe.name,
                model=recipe.model.name,
                dataset=bundle.name,
                config={"recipe": recipe.to_dict(), "plan": plan},
                versions=versions(),
                trajectory=trajectory,
                class_names=list(bundle.class_names),
                extra={"rank": rank(), "prune_events": history},
            ),
            model=model,
            out_dir=out_dir,
        )

    model.cpu()  # measured and written from the CPU
    model_path = out_dir / MODEL_FILE
    save_checkpoint(model, model_path, {**meta, "pruned": True, "plan": plan})
    pruned, layers = _measure(
        model, test_loader, example, recipe.output.latency, model_path.stat().st_size
    )
    exported: dict[str, Any] = {}
    if recipe.export.compressed or recipe.export.onnx:
        if centroids:
            _tune_centroids(recipe, model.to(device()), train_loader)
            model.cpu()
        exported = _export(recipe, model, meta, dense_path, test_loader, example)
        progress.message(", ".join(f"{k}: {v['file_bytes']:,} bytes" for k, v in exported.items()))
    progress.message("realising the savings: the .sct file loaded back, latency measured")
    dense_model = load_checkpoint(
        dense_path, rebuild_model({k: v for k, v in meta.items() if k != "channel_plan"})
    )
    realised = realise(
        model,
        dense_model,
        example,
        test_loader,
        lambda: rebuild_model(meta),
        out_dir,
        dense_file_bytes=dense_path.stat().st_size,
        dense_accuracy=dense["accuracy"],
        written=exported.get("compressed"),
        shrunk=bool(meta.get("channel_plan")),
        latency=recipe.output.latency,
        onnx=exported.get("onnx"),
    )
    for line in realised["why_not"]:
        progress.message(line)
    if len(trajectory) == 1 or "accuracy" not in trajectory[-1]:
        trajectory.append(
            {
                "epoch": ft_cfg.epochs,
                "step": pruner.steps_done,
                "sparsity": pruner.measured_sparsity(),
                "accuracy": pruned["accuracy"],
            }
        )
    report = RunReport(
        title=recipe.name,
        model=recipe.model.name,
        dataset=bundle.name,
        config={"recipe": recipe.to_dict(), "plan": plan},
        versions=versions(),
        dense=dense,
        pruned=pruned,
        layers=layers,
        trajectory=trajectory,
        class_names=list(bundle.class_names),
        extra={
            **({"export": exported} if exported else {}),
            **({"lottery_tickets": tickets} if tickets else {}),
            **({"shrink": shrunk} if shrunk else {}),
            **({"allocation_search": searches} if searches else {}),
            "realised": realised,
            "prune_events": history,
            **({"processes": world_size()} if parallel else {}),
            "seconds": {
                "dense": dense_seconds,
                "prune_and_finetune": prune_seconds,
                "total": time.perf_counter() - t_start,
            },
        },
    )
    files = {"model": model_path, "dense": dense_path, "compressed": Path(realised["file"]["path"])}
    files.update({k: Path(v["path"]) for k, v in exported.items()})
    report.extra["files"] = {k: str(v) for k, v in files.items()}
    if recipe.output.report:
        files.update(write_report(report, out_dir))
    return RunResult(report=report, model=model, out_dir=out_dir, files=files)


Loaders = tuple[DataLoader[Any], DataLoader[Any]]


def _prepare(recipe: Recipe) -> tuple[DataBundle, nn.Module, Loaders, Tensor, DataLoader[Any]]:
    """Data, the untrained model, train/test loaders, example inputs and calibration batches."""
    bundle = _load_data(recipe)
    model = build_model(
        recipe.model.name,
        num_classes=bundle.num_classes,
        in_channels=bundle.input_shape[0],
        seed=recipe.seed,
        **recipe.model.options,
    )
    loaders = bundle.loaders(recipe.data.batch_size, seed=recipe.seed)
    example = next(iter(loaders[1]))[0][:64]
    calib = DataLoader(
        bundle.calibration_split(recipe.data.calibration_examples, seed=recipe.seed),
        batch_size=recipe.data.batch_size,
    )
    return bundle, model, loaders, example, calib


def _dense(
    recipe: Recipe, model: nn.Module, train_loader: DataLoader[Any], progress: Progress
) -> None:
    """Give ``model`` its dense weights: the recipe's checkpoint, or dense training."""
    if recipe.model.checkpoint:
        load_checkpoint(recipe.model.checkpoint, model)
        progress.message(f"loaded dense weights from {recipe.model.checkpoint}")
    elif recipe.train.epochs:
        steps = recipe.train.epochs * len(train_loader)
        progress.phase(f"training dense {recipe.model.name}", steps)
        sparsifying = [REGULARIZERS.build(r).bind(model) for r in recipe.train.regularizers]
        train(model, train_loader, recipe.train, progress=progress.advance, loss_terms=sparsifying)


def _element_space(
    recipe: Recipe, model: nn.Module, example: Tensor, calib: DataLoader[Any]
) -> ElementSpace:
    """The ratio-map space of the recipe's ``prune`` section (masks)."""
    return ElementSpace(
        model,
        example,
        recipe.prune.config(1, recipe.seed),
        data=calib,
        loss_fn=nn.functional.cross_entropy,
    )


def _channel_space(
    recipe: Recipe, model: nn.Module, example: Tensor, calib: DataLoader[Any]
) -> ChannelSpace:
    """The ratio-map space of the recipe's ``shrink`` section (removed channels)."""
    return ChannelSpace(
        model,
        example[:1],
        recipe.shrink.config(recipe.seed),
        data=calib,
        loss_fn=nn.functional.cross_entropy,
    )


def sensitivity(
    recipe: Recipe, progress: Progress | None = None, workers: int | None = None
) -> dict[str, Any]:
    """Scan the recipe's dense model layer by layer (``secateurs sensitivity``).

    The space follows the recipe: channels when its ``shrink`` section has a budget, else the
    ``prune`` section's masks. The budget is that section's; the scan's options are those of
    its allocation when it is ``sensitivity``. Writes ``sensitivity.json`` (curves and the
    ratio map for the budget) and ``sensitivity.png`` (one line per layer) to the output
    directory; returns the JSON.
    """
    progress = progress or Progress()
    _, model, (train_loader, _), example, calib = _prepare(recipe)
    _dense(recipe, model, train_loader, progress)
    s, p = recipe.shrink, recipe.prune
    space: LayerSpace
    if s.budget is not None:
        spec: Any = s.allocation
        budget = BUDGETS.build(s.budget)
        space = _channel_space(recipe, model, example, calib)
    else:
        spec = p.allocation
        budget = BUDGETS.build(p.budget or {"name": "sparsity", "value": p.sparsity or 0.0})
        space = _element_space(recipe, model, example, calib)
    name = spec if isinstance(spec, str) else spec.get("name")
    options = dict(spec) if isinstance(spec, dict) and name == "sensitivity" else {}
    options["name"] = "sensitivity"
    if workers is not None:
        options["workers"] = workers
    found = search_allocation(
        model, None, budget, options, space=space, data=calib, progress=progress.message
    )
    out_dir = recipe.out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"budget": str(budget), "space": space.description, **found.to_dict()}
    (out_dir / "sensitivity.json").write_text(json.dumps(_jsonable(result), indent=2))
    sensitivity_curves(found.history, found.ratios, out_dir / "sensitivity.png")
    write_sensitivity_page(_jsonable(result), out_dir / "sensitivity.png", out_dir)
    return result


def _tune_centroids(recipe: Recipe, model: nn.Module, train_loader: DataLoader[Any]) -> None:
    """Share the kept weights (k-means per layer) and fine-tune the shared values, as the
    recipe's ``export`` section asks (every rank does it under ``torchrun``)."""
    ex = recipe.export
    share_weights_(model, bits=ex.bits, layer_bits=ex.layer_bits)
    ft = recipe.finetune.config(recipe.train)
    lr = ex.centroid_lr if ex.centroid_lr is not None else recipe.train.lr / 100
    # no weight decay: it would pull each shared value toward zero, not a weight
    tune = dataclasses.replace(ft, epochs=ex.centroid_epochs, lr=lr, weight_decay=0.0)
    train(model, train_loader, tune)


def _export(
    recipe: Recipe,
    model: nn.Module,
    meta: dict[str, Any],
    dense_path: Path,
    test_loader: DataLoader[Any],
    example: Tensor,
) -> dict[str, dict[str, Any]]:
    """Write the files the recipe's ``export`` section asks for; returns what each holds.

    The compressed file's accuracy is measured on a fresh model loaded back from it, so the
    number is about what ships. ``model`` itself stays the pruned model (shared weights, if
    centroids were fine-tuned by :func:`_tune_centroids` first, are baked in).
    """
    ex = recipe.export
    out: dict[str, dict[str, Any]] = {}
    out_dir = recipe.out_dir()
    if ex.compressed:
        path = out_dir / COMPRESSED_FILE
        info = save_compressed(
            model, path, ex.compress_config(), metadata={"model": recipe.model.name}
        )
        make_permanent_(model)
        loaded = load_compressed(path, rebuild_model(meta))
        dense_bytes = dense_path.stat().st_size
        out["compressed"] = {
            "path": str(path),
            "file_bytes": info.file_bytes,
            "dense_file_bytes": dense_bytes,
            "ratio": dense_bytes / info.file_bytes,
            "accuracy": evaluate(loaded, test_loader).accuracy,
            "max_abs_error": info.max_abs_error,
            "centroid_epochs": ex.centroid_epochs,
            "tensors": [t.to_dict() for t in info.tensors],
        }
    if ex.onnx:
        report = export_onnx(model, example[:1], out_dir / ONNX_FILE)
        out["onnx"] = {**report.to_dict(), "file_bytes": report.bytes}
    return out


def _shrink(
    recipe: Recipe,
    model: nn.Module,
    example: Tensor,
    calib: DataLoader[Any],
    train_loader: DataLoader[Any],
    ft_cfg: Any,
    progress: Progress,
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove channels as the recipe's ``shrink`` section says; returns the smaller model and
    what was done (with the replayable plan as JSON under ``plan``)."""
    s = recipe.shrink
    between = dataclasses.replace(ft_cfg, epochs=s.epochs_between)

    def finetune(m: nn.Module, step: int) -> None:
        if between.epochs:
            progress.message(f"shrink step {step}: fine-tuning {between.epochs} epoch(s)")
            train(m, train_loader, between)

    found = None
    allocation = None
    if s.searching:
        space = _channel_space(recipe, model, example, calib)
        found = _search(
            recipe,
            s.allocation,
            space,
            BUDGETS.build(s.budget or {}),
            calib,
            train_loader,
            ft_cfg,
            progress,
        )
        allocation = found.ratios
    small = shrink(
        model,
        example[:1],
        s.budget or {},
        s.config(recipe.seed, allocation),
        data=calib,
        loss_fn=nn.functional.cross_entropy,
        steps=s.steps,
        finetune=finetune,
    )
    report = report_of(small, ShrinkReport)
    progress.message(
        f"removed {report.channels_removed} of {report.channels_prunable} channels: "
        f"MACs {report.macs_before:,} -> {report.macs_after:,} ({report.macs_ratio:.1%})"
    )
    extra = {"search": found.to_dict()} if found is not None else {}
    return small, {**report.to_dict(), "plan": report.plan.to_json(), **extra}


def steps_finetuner(
    train_loader: DataLoader[Any], config: TrainConfig
) -> Callable[[nn.Module, int], None]:
    """``finetune(model, steps)``: train in place on the next ``steps`` training batches at
    the fine-tuning settings (what NetAdapt's short- and long-term fine-tuning call)."""
    batches: list[Any] = []

    def finetune(model: nn.Module, steps: int) -> None:
        if steps <= 0:
            return
        while len(batches) < steps:
            batches.extend(train_loader)
        train(model, batches[:steps], dataclasses.replace(config, epochs=1))

    return finetune


def _search(
    recipe: Recipe,
    spec: Any,
    space: LayerSpace,
    budget: Budget,
    calib: DataLoader[Any],
    train_loader: DataLoader[Any],
    ft_cfg: TrainConfig,
    progress: Progress,
) -> SearchResult:
    """Run the allocation search ``spec`` on ``space``; scored on the calibration split."""
    progress.message(
        f"searching per-layer ratios ({spec if isinstance(spec, str) else spec['name']})"
    )
    found = search_allocation(
        space.model,
        None,
        budget,
        spec,
        space=space,
        data=calib,
        finetune=steps_finetuner(train_loader, ft_cfg),
        progress=progress.message,
        seed=recipe.seed,
    )
    progress.message(
        f"{found.method}: {found.value:,.4g} {found.unit} (allowed {found.limit:,.4g}), "
        f"score {found.score if found.score is not None else float('nan'):.4f}, "
        f"{found.evaluations} evaluations in {found.seconds:.1f} s"
    )
    return found


def _load_data(recipe: Recipe) -> DataBundle:
    options: dict[str, Any] = {}
    if recipe.data.root:
        options["root"] = recipe.data.root
    bundle = load_dataset(recipe.data.name, **options)
    if recipe.data.limit_train or recipe.data.limit_test:
        bundle = bundle.subset(
            recipe.data.limit_train or len(bundle.train), recipe.data.limit_test or len(bundle.test)
        )
    return bundle
