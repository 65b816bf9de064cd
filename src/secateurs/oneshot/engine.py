"""The block-by-block engine: prune a large model layer by layer from calibration inputs.

A layer-wise criterion (Wanda, SparseGPT, OBS) needs, for each layer, statistics of the inputs
that layer sees. Running the whole model once with hooks on every layer gives them for the
*dense* model, but holds every layer's statistics at once, and after the first layers are
pruned the later ones see inputs that no longer exist. The sequential engine does what
SparseGPT and Wanda do on LLMs instead:

1. capture the inputs of the first block (a decoder layer) on the calibration batches;
2. for each block: run it on its inputs with hooks gathering the statistics of every target
   inside it, prune those targets, then run it again on its pruned weights: its outputs are
   the next block's inputs.

Peak memory is the model, one block's statistics and two activation buffers (the block's
inputs and outputs), not the model's activations; :class:`OneShotReport` says how much.

A model without repeated blocks (a LeNet, a ResNet) is pruned in one pass: the whole model is
the only block and the calibration batches are its inputs.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.criteria.hessian import HessianAccumulator, reconstruction_error
from secateurs.criteria.layerwise import (
    COLUMN_NORMS,
    LayerwiseCriterion,
    as_matrix,
    check_layer,
    from_matrix,
    input_rows,
    matrix_columns,
    supports,
)
from secateurs.errors import ConfigError, DataError, ModelError
from secateurs.masks import set_mask
from secateurs.oneshot.blocks import Batch, capture_block_inputs, find_blocks, run_block
from secateurs.running import EvalMode, device_of
from secateurs.targets import Target

#: ``progress(done, total, message)``: called after each block.
Progress = Callable[[int, int, str], None]


@dataclass
class LayerReport:
    """What pruning one layer did: its sparsity, its output error on the calibration inputs
    (``||WX - W'X||^2 / ||WX||^2``) and how long it took."""

    name: str
    block: str
    sparsity: float
    error: float
    seconds: float
    samples: int


@dataclass
class OneShotReport:
    """What :func:`prune_layerwise_` did, layer by layer, and what it cost.

    ``peak_rss_mb``: the process's peak resident memory at the end; ``statistics_mb``: the
    largest one block's input statistics held; ``activations_mb``: the block inputs and
    outputs held at once (both calibration buffers).
    """

    criterion: str
    sequential: bool
    blocks: int
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    statistics_mb: float = 0.0
    activations_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(v) for v in obj)
    return 0


@contextmanager
def _gathering(
    targets: Sequence[Target], hessian: bool, limit: int | None = None
) -> Iterator[dict[str, HessianAccumulator]]:
    """Hooks folding each target module's input rows into an accumulator, removed on exit.

    On a normal exit the accumulators are combined over the ranks under ``torchrun`` (each
    rank ran its own calibration batches), so every rank prunes from the same statistics.
    """
    stats: dict[str, HessianAccumulator] = {}
    handles = []
    for t in targets:
        acc = HessianAccumulator(matrix_columns(t), device=t.raw.device, track_hessian=hessian)
        stats[t.name] = acc

        def hook(module: nn.Module, args: tuple[Any, ...], acc: HessianAccumulator = acc) -> None:
            if args and isinstance(args[0], Tensor):
                acc.add(input_rows(module, args[0].detach()).float())

        handles.append(t.module.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
    for acc in stats.values():
        acc.all_reduce_()


def prune_layerwise_(
    model: nn.Module,
    targets: Sequence[Target],
    criterion: LayerwiseCriterion,
    sparsities: Mapping[str, float],
    data: Iterable[Any],
    *,
    pattern: tuple[int, int] | None = None,
    sequential: bool | None = None,
    calibration_batches: int | None = None,
    progress: Progress | None = None,
) -> OneShotReport:
    """Prune ``targets`` of ``model`` in place, each to its sparsity, with ``criterion``.

    ``sparsities``: target name -> fraction removed (``pattern`` ``(n, m)`` instead prunes N:M).
    ``data``: calibration batches as the model takes them (a tensor of token ids, an
    ``(inputs, labels)`` pair, or a mapping of keyword tensors); the first
    ``calibration_batches`` are used. ``sequential``: ``True`` prunes block by block and needs
    repeated blocks (a transformer's decoder layers), ``False`` gathers every layer's
    statistics from the dense model in one pass, ``None`` is sequential when blocks are found.

    Masks are attached as everywhere in secateurs (the weights of criteria that update them
    are changed too). Everything is checked, and the inputs captured, before any weight
    changes; a failure after that leaves the blocks already pruned pruned and is raised.
    """
    start = time.perf_counter()
    for t in targets:
        check_layer(t)
        if t.mask is not None and not bool(t.mask.all()):
            raise ConfigError(
                f"{t.name} is already pruned; layer-wise criteria prune a dense layer once "
                "(start from the dense model)"
            )
    if pattern is not None:
        n, m = pattern
        for t in targets:
            cols = matrix_columns(t)
            if cols % m:
                raise ModelError(
                    f"{t.name} has {cols} inputs, not divisible by M={m}, so it cannot hold "
                    f"{n}:{m} blocks. Exclude it (exclude=[{t.module_name!r}])."
                )
    missing = [t.name for t in targets if t.name not in sparsities]
    if missing and pattern is None:
        raise ConfigError(f"no sparsity for {missing[:3]}")
    batches = _take(data, calibration_batches)
    found = find_blocks(model, targets)
    if sequential and found is None:
        raise ModelError(
            f"{type(model).__name__} has no repeated blocks (a ModuleList of decoder layers "
            "holding the targets) for the sequential engine; pass sequential=False to gather "
            "every layer's statistics from the dense model in one pass"
        )
    use_blocks = found is not None and sequential is not False
    report = OneShotReport(
        criterion=criterion.registry_name,
        sequential=use_blocks,
        blocks=len(found[1]) if use_blocks and found else 1,
    )
    with EvalMode(model), torch.no_grad():
        if use_blocks:
            assert found is not None
            _sequential(model, found, targets, criterion, sparsities, pattern, batches, report,
                        progress)  # fmt: skip
        else:
            with _gathering(targets, True) as stats:  # H always: the error report reads it
                for batch in batches:
                    _call_batch(model, batch)
            report.statistics_mb = _stats_mb(stats)
            _prune(targets, stats, criterion, sparsities, pattern, "(model)", report)
            if progress is not None:
                progress(1, 1, _summary(report, "(model)"))
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    return report


def _sequential(
    model: nn.Module,
    found: tuple[str, nn.ModuleList],
    targets: Sequence[Target],
    criterion: LayerwiseCriterion,
    sparsities: Mapping[str, float],
    pattern: tuple[int, int] | None,
    batches: list[Any],
    report: OneShotReport,
    progress: Progress | None,
) -> None:
    path, blocks = found
    inputs = capture_block_inputs(model, blocks[0], batches)
    by_block = _targets_by_block(path, blocks, targets)
    for i, block in enumerate(blocks):
        name = f"{path}.{i}"
        inside = by_block[i]
        if inside:
            with _gathering(inside, True) as stats:
                for x in inputs:
                    run_block(block, x)
            report.statistics_mb = max(report.statistics_mb, _stats_mb(stats))
            _prune(inside, stats, criterion, sparsities, pattern, name, report)
            del stats
        outputs = [run_block(block, x) for x in inputs]
        report.activations_mb = max(
            report.activations_mb, (_bytes([x.args for x in inputs]) + _bytes(outputs)) / 2**20
        )
        inputs = [x.with_hidden(out) for x, out in zip(inputs, outputs, strict=True)]
        if progress is not None:
            progress(i + 1, len(blocks), _summary(report, name))


def _prune(
    targets: Sequence[Target],
    stats: Mapping[str, HessianAccumulator],
    criterion: LayerwiseCriterion,
    sparsities: Mapping[str, float],
    pattern: tuple[int, int] | None,
    block: str,
    report: OneShotReport,
) -> None:
    for t in targets:
        t0 = time.perf_counter()
        acc = stats[t.name]
        if acc.samples == 0:
            raise DataError(
                f"{t.name} saw no input on the calibration data (the forward pass never "
                "called it); exclude it or give data that reaches it"
            )
        original = as_matrix(t.raw.detach(), t.transposed).float().contiguous()
        work = original.clone()
        n, m = pattern if pattern is not None else (0, 0)
        sparsity = None if pattern is not None else float(sparsities[t.name])
        mask = criterion.prune_matrix(work, acc, sparsity, n, m)
        pruned = work * mask
        error = reconstruction_error(original, pruned, acc.hessian())
        with torch.no_grad():
            if criterion.updates_weights:
                t.raw.copy_(from_matrix(work, t.shape, t.transposed).to(t.raw.dtype))
            set_mask(t.module, t.attr, from_matrix(mask, t.shape, t.transposed))
        kept = int(mask.sum())
        report.layers.append(
            LayerReport(
                name=t.name,
                block=block,
                sparsity=1.0 - kept / mask.numel(),
                error=error,
                seconds=time.perf_counter() - t0,
                samples=acc.samples,
            )
        )


def column_norms(
    model: nn.Module,
    targets: Sequence[Target],
    data: Iterable[Any],
    calibration_batches: int | None = None,
) -> dict[str, dict[str, Tensor]]:
    """``{target: {"column_norms": ||X_j||}}`` from the dense model, in one pass: what Wanda's
    scores read (and OWL measures outliers with)."""
    for t in targets:
        check_layer(t)
    with EvalMode(model), torch.no_grad(), _gathering(targets, False) as stats:
        for batch in _take(data, calibration_batches):
            _call_batch(model, batch)
    return {k: {COLUMN_NORMS: acc.column_norms()} for k, acc in stats.items()}


def layerwise_targets(model: nn.Module, targets: Sequence[Target]) -> list[Target]:
    """The targets a layer-wise criterion prunes when the user named none: the Linear and
    Conv2d weights among ``targets`` (embeddings and transposed convolutions are left), only
    those inside the repeated blocks when the model has them (an LLM's decoder layers, not its
    embeddings or output head)."""
    kept = [t for t in targets if t.attr == "weight" and supports(t.module)]
    found = find_blocks(model, kept)
    if found is not None:
        inside = {id(m) for m in found[1].modules()}
        kept = [t for t in kept if id(t.module) in inside]
    if not kept:
        raise ModelError(
            f"{type(model).__name__} has no Linear or Conv2d weight for a layer-wise criterion "
            "to prune; name the layers with include="
        )
    return kept


def layer_of(model: nn.Module, targets: Sequence[Target]) -> dict[str, str]:
    """Each target's layer for a per-layer allocation: its block (``model.layers.3``) when the
    model has repeated blocks, else the target itself."""
    found = find_blocks(model, targets)
    if found is None:
        return {t.name: t.name for t in targets}
    prefix = f"{found[0]}." if found[0] else ""
    out = {}
    for t in targets:
        rest = t.module_name[len(prefix) :] if t.module_name.startswith(prefix) else ""
        index = rest.split(".")[0]
        out[t.name] = f"{prefix}{index}" if index.isdigit() else t.name
    return out


def _targets_by_block(
    path: str, blocks: nn.ModuleList, targets: Sequence[Target]
) -> list[list[Target]]:
    prefix = f"{path}." if path else ""
    out: list[list[Target]] = [[] for _ in blocks]
    outside = []
    for t in targets:
        rest = t.module_name[len(prefix) :] if t.module_name.startswith(prefix) else None
        index = rest.split(".")[0] if rest else None
        if index is None or not index.isdigit() or int(index) >= len(blocks):
            outside.append(t.name)
            continue
        out[int(index)].append(t)
    if outside:
        raise ConfigError(
            f"the sequential engine prunes the layers inside {path or 'the blocks'}; "
            f"{outside[:3]} are outside them: exclude them, or pass sequential=False"
        )
    return out


def _take(data: Iterable[Any], limit: int | None) -> list[Any]:
    if data is None:
        raise ConfigError(
            "layer-wise criteria need calibration data: pass data=<batches the model takes>"
        )
    batches: list[Any] = []
    for batch in data:
        if limit is not None and len(batches) >= limit:
            break
        batches.append(batch)
    if not batches:
        raise DataError("the calibration data is empty: give at least one batch")
    return batches


def _call_batch(model: nn.Module, batch: Any) -> Any:
    device = device_of(model)
    b = Batch.of(batch)
    return model(*b.to(device).args, **b.to(device).kwargs)


def _stats_mb(stats: Mapping[str, HessianAccumulator]) -> float:
    total = 0
    for acc in stats.values():
        cells = acc.in_features * (acc.in_features + 1 if acc.tracks_hessian else 1)
        total += cells * torch.finfo(acc.dtype).bits // 8
    return total / 2**20


def _summary(report: OneShotReport, block: str) -> str:
    layers = [layer for layer in report.layers if layer.block == block]
    if not layers:
        return f"{block}: nothing to prune"
    worst = max(layers, key=lambda layer: layer.error)
    return (
        f"{block}: {len(layers)} layers, worst error {worst.error:.4f} ({worst.name}), "
        f"{sum(layer.seconds for layer in layers):.1f} s"
    )
