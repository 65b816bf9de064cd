"""What a model costs and how well it does: parameters, nonzeros, MACs, bytes, latency, accuracy.

Everything is counted from the *effective* tensors: a masked weight is read through its mask,
under its natural name (``conv1.weight``, never ``conv1.parametrizations.weight.original``),
exactly once even when it is tied to another module. So the numbers here are what the model
computes with, not what the plan asked for.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.errors import ConfigError, DataError, ModelError
from secateurs.running import (
    EvalMode,
    Inputs,
    call,
    device_of,
    first_tensor,
    run_example,
    to_device,
)
from secateurs.targets import DEFAULT_TARGETS, default_attrs

#: Modules that own parameters but perform no weight multiply-accumulates (lookups and
#: normalisations); profiled, they count 0 MACs rather than "unknown".
_MAC_FREE: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.PReLU,
)


# --------------------------------------------------------------------------- parameters


def _parametrization_modules(module: nn.Module) -> set[int]:
    """Ids of the modules inside ``module.parametrizations`` (masks, originals' containers)."""
    if not parametrize.is_parametrized(module):
        return set()
    container = module.parametrizations
    assert isinstance(container, nn.Module)
    return {id(m) for m in container.modules()}


def _effective_parameters(
    model: nn.Module,
) -> Iterator[tuple[str, str, nn.Module, str, Tensor]]:
    """``(module name, qualified name, module, attribute, effective tensor)``, each once.

    Parameters living inside a parametrization (its ``original`` and any parameters of the
    parametrization itself) are represented by the effective tensor they produce and are not
    listed separately: the effective tensor is what the model computes with.
    """
    seen: set[int] = set()
    skip: set[int] = set()
    for module_name, module in model.named_modules():
        if id(module) in skip:
            continue
        skip |= _parametrization_modules(module)
        if parametrize.is_parametrized(module):
            container = module.parametrizations
            assert isinstance(container, nn.ModuleDict)
            for attr, plist in container.items():
                originals = [p for n, p in plist.named_parameters(recurse=False)]
                if not originals or any(id(p) in seen for p in originals):
                    continue  # a parametrized buffer, or tied to a tensor already counted
                seen.update(id(p) for p in plist.parameters())
                yield module_name, _qualify(module_name, attr), module, attr, getattr(module, attr)
        for attr, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield module_name, _qualify(module_name, attr), module, attr, param


def named_effective_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """``(qualified name, module, attribute, effective tensor)`` for every parameter, once.

    A masked ``features.0.weight`` is yielded under that name with the mask applied; tied
    parameters are yielded once, under the first module that owns them.
    """
    for _, qualified, module, attr, tensor in _effective_parameters(model):
        yield qualified, module, attr, tensor


def _kind(module: nn.Module) -> str:
    """The module's class name, seen through parametrization's injected subclass."""
    return parametrize.type_before_parametrizations(module).__name__


def _qualify(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _nonzeros(t: Tensor) -> int:
    return int(torch.count_nonzero(t.detach()))


def csr_bytes(t: Tensor, index_bytes: int = 4) -> int:
    """Bytes to store the nonzeros of ``t`` in CSR over ``t`` viewed as ``[shape[0], -1]``.

    Values at the tensor's element size, one ``index_bytes`` column index per nonzero and
    ``rows + 1`` row pointers of ``index_bytes`` each.
    """
    rows = t.shape[0] if t.dim() else 1
    return csr_size(_nonzeros(t), rows, t.element_size(), index_bytes)


def csr_size(nonzeros: int, rows: int, itemsize: int, index_bytes: int = 4) -> int:
    """Bytes of CSR storage for ``nonzeros`` values over ``rows`` rows (see :func:`csr_bytes`),
    for counting a layout without building it."""
    return nonzeros * (itemsize + index_bytes) + (rows + 1) * index_bytes


# --------------------------------------------------------------------------- results


@dataclass
class LayerStats:
    """One module's parameters and cost.

    ``shape`` is the shape of the tensor that sets the layer's cost (``weight`` when the
    module has one, else its largest tensor). ``bytes_csr`` stores matrices and higher
    (weights) in CSR and vectors (biases, norm scales) dense, the cheaper choice for them.
    ``macs`` is ``None`` when no example input was profiled, or when secateurs has no MAC rule
    for the module's kind. A module that reuses a weight owned by another layer (weight tying)
    has a row with ``params == 0`` so its MACs are still shown; its ``density`` is that of
    the weight it reads.
    """

    name: str
    kind: str
    shape: list[int]
    params: int
    nonzeros: int
    density: float
    macs: int | None = None
    macs_nonzero: int | None = None
    bytes_dense: int = 0
    bytes_csr: int = 0


class Totals(TypedDict):
    """Model-wide totals of :class:`ModelStats`.

    ``prunable_*`` count only the weight tensors of the layers secateurs prunes by default
    (Linear, Conv, ConvTranspose, Embedding, attention projections): the sparsity a user asked
    for is measured there, while ``density``/``sparsity`` cover every parameter, biases and
    norms included. ``macs``/``macs_nonzero`` are ``None`` without example inputs;
    ``macs_unknown`` names the parameter-owning layers whose MACs secateurs cannot count.
    """

    params: int
    nonzeros: int
    density: float
    sparsity: float
    prunable_params: int
    prunable_nonzeros: int
    prunable_density: float
    prunable_sparsity: float
    macs: int | None
    macs_nonzero: int | None
    macs_unknown: list[str]
    bytes_dense: int
    bytes_csr: int


@dataclass
class ModelStats:
    """Per-layer statistics and model totals, as returned by :func:`profile`."""

    layers: list[LayerStats] = field(default_factory=list)
    totals: Totals = field(default_factory=lambda: _totals([], {}, (0, 0), False))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form: ``{"layers": [...], "totals": {...}}``."""
        return {"layers": [asdict(layer) for layer in self.layers], "totals": dict(self.totals)}


# --------------------------------------------------------------------------- MACs


@dataclass
class _Macs:
    """MACs one module spent in the profiled forward pass: all, and on nonzero weights."""

    dense: int = 0
    nonzero: int = 0

    def add(self, dense: int, nonzero: int) -> None:
        self.dense += dense
        self.nonzero += nonzero


def _weighted(macs: int, weight: Tensor) -> tuple[int, int]:
    """``(macs, macs on nonzero weights)`` for an op that uses every weight ``macs/numel`` times."""
    uses = macs // max(weight.numel(), 1)
    return macs, uses * _nonzeros(weight)


def _conv_macs(module: nn.modules.conv._ConvNd, inp: Tensor, out: Tensor) -> tuple[int, int]:
    k = math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # every input element meets (out_channels / groups) * k weights
        macs = inp.numel() * (module.out_channels // module.groups) * k
    else:
        macs = out.numel() * (module.in_channels // module.groups) * k
    return _weighted(macs, module.weight)


def _seq_len(t: Tensor, batch_first: bool) -> int:
    return t.shape[1] if batch_first and t.dim() == 3 else t.shape[0]


def _attention_macs(
    module: nn.MultiheadAttention, query: Tensor, key: Tensor
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((dense, nonzero) of input projections + attention, (dense, nonzero) of out_proj)``.

    The input projections are weighted by the density of their own rows (q, k, v may be
    pruned differently); the two attention matmuls (scores and weighted sum) use no weights,
    so they count in full in both numbers.
    """
    e = module.embed_dim
    lq, lk = _seq_len(query, module.batch_first), _seq_len(key, module.batch_first)
    b = query.numel() // max(lq * e, 1)
    if module.in_proj_weight is not None:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    dense = nonzero = 0
    for w, length in ((w_q, lq), (w_k, lk), (w_v, lk)):
        dense += b * length * w.numel()
        nonzero += b * length * _nonzeros(w)
    attention = 2 * b * lq * lk * e
    out_w = module.out_proj.weight
    out = (b * lq * out_w.numel(), b * lq * _nonzeros(out_w))
    return (dense + attention, nonzero + attention), out


def _measure_macs(model: nn.Module, example_inputs: Inputs) -> dict[str, _Macs]:
    """MACs per module name from one forward pass with hooks on the layers that do them."""
    macs: dict[str, _Macs] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        name = names[id(module)]
        out = output[0] if isinstance(output, tuple) else output
        inp = args[0] if args else kwargs.get("input", kwargs.get("query"))
        if not isinstance(inp, Tensor) or not isinstance(out, Tensor):
            return
        if isinstance(module, nn.modules.conv._ConvNd):
            macs.setdefault(name, _Macs()).add(*_conv_macs(module, inp, out))
        elif isinstance(module, nn.Linear):
            macs.setdefault(name, _Macs()).add(
                *_weighted(out.numel() * module.in_features, module.weight)
            )
        elif isinstance(module, nn.MultiheadAttention):
            key = args[1] if len(args) > 1 else kwargs.get("key", inp)
            inner, projection = _attention_macs(module, inp, key)
            macs.setdefault(name, _Macs()).add(*inner)
            # out_proj's weight is applied functionally, so its own hook never fires
            macs.setdefault(_qualify(name, "out_proj"), _Macs()).add(*projection)

    hooked = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)
    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, hooked)
    ]
    try:
        run_example(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return macs


# --------------------------------------------------------------------------- profile


def _prunable_weights(module: nn.Module) -> tuple[str, ...]:
    return default_attrs(module)


def _totals(
    layers: list[LayerStats],
    macs: dict[str, _Macs],
    prunable: tuple[int, int],
    profiled: bool,
) -> Totals:
    params = sum(layer.params for layer in layers)
    nonzeros = sum(layer.nonzeros for layer in layers)
    p_params, p_nonzeros = prunable
    density = nonzeros / params if params else 1.0
    p_density = p_nonzeros / p_params if p_params else 1.0
    return Totals(
        params=params,
        nonzeros=nonzeros,
        density=density,
        sparsity=1.0 - density,
        prunable_params=p_params,
        prunable_nonzeros=p_nonzeros,
        prunable_density=p_density,
        prunable_sparsity=1.0 - p_density,
        macs=sum(m.dense for m in macs.values()) if profiled else None,
        macs_nonzero=sum(m.nonzero for m in macs.values()) if profiled else None,
        macs_unknown=[layer.name for layer in layers if profiled and layer.macs is None],
        bytes_dense=sum(layer.bytes_dense for layer in layers),
        bytes_csr=sum(layer.bytes_csr for layer in layers),
    )


def profile(model: nn.Module, example_inputs: Inputs | None = None) -> ModelStats:
    """Per-layer parameters, nonzeros, density and bytes; MACs too when inputs are given.

    A layer is every module that owns parameters (leftover parameters of a custom module are
    attributed to it; the root module's row is named ``(model)``). MACs come from one forward
    pass on ``example_inputs`` with hooks on Conv/ConvTranspose/Linear/MultiheadAttention, run
    under ``torch.no_grad`` in eval mode (each module's own mode is restored afterwards), so
    they are the MACs of *that* input: pass one example for per-example MACs. Embeddings and
    normalisations count 0 MACs; modules that call a layer's weight functionally (bypassing
    its ``forward``) cannot be seen by hooks and are listed in ``totals["macs_unknown"]``
    when they own parameters.
    """
    profiled = example_inputs is not None
    macs = _measure_macs(model, example_inputs) if example_inputs is not None else {}
    tensors: dict[str, dict[str, Tensor]] = {}
    p_params = p_nonzeros = 0
    for module_name, _, module, attr, tensor in _effective_parameters(model):
        t = tensor.detach()
        tensors.setdefault(module_name, {})[attr] = t
        if attr in _prunable_weights(module):
            p_params += t.numel()
            p_nonzeros += _nonzeros(t)

    layers: list[LayerStats] = []
    for name, module in model.named_modules():
        own = tensors.get(name)
        m = macs.get(name)
        if own is None and m is None:
            continue
        own = own or {}
        weight = own.get("weight")
        if weight is None and own:
            weight = max(own.values(), key=lambda t: t.numel())
        if weight is None:  # uses a weight owned elsewhere (tied)
            shared = getattr(module, "weight", None)
            weight = shared.detach() if isinstance(shared, Tensor) else torch.empty(0)
        params = sum(t.numel() for t in own.values())
        nonzeros = sum(_nonzeros(t) for t in own.values())
        if params:
            density = nonzeros / params
        else:
            density = _nonzeros(weight) / weight.numel() if weight.numel() else 1.0
        layer_macs: int | None = None
        layer_macs_nonzero: int | None = None
        if m is not None:
            layer_macs, layer_macs_nonzero = m.dense, m.nonzero
        elif profiled and isinstance(module, (*_MAC_FREE, *(DEFAULT_TARGETS))):
            layer_macs = layer_macs_nonzero = 0  # MAC-free, or a known layer never called
        layers.append(
            LayerStats(
                name=name or "(model)",
                kind=_kind(module),
                shape=list(weight.shape),
                params=params,
                nonzeros=nonzeros,
                density=density,
                macs=layer_macs,
                macs_nonzero=layer_macs_nonzero,
                bytes_dense=sum(t.numel() * t.element_size() for t in own.values()),
                bytes_csr=sum(
                    csr_bytes(t) if t.dim() > 1 else t.numel() * t.element_size()
                    for t in own.values()
                ),
            )
        )
    return ModelStats(layers, _totals(layers, macs, (p_params, p_nonzeros), profiled))


# --------------------------------------------------------------------------- summary


def _fmt(n: int | None) -> str:
    """Compact count: ``1234567 -> 1.23M``; ``None`` (not measured) -> ``-``."""
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@dataclass
class Summary:
    """The per-layer table ``print(sc.summary(model))`` shows, with the stats behind it."""

    stats: ModelStats

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form (same as :meth:`ModelStats.to_dict`)."""
        return self.stats.to_dict()

    def __str__(self) -> str:
        head = ("layer", "kind", "shape", "params", "nonzeros", "density", "MACs", "nz MACs")
        rows = [
            (
                layer.name,
                layer.kind,
                "x".join(map(str, layer.shape)),
                _fmt(layer.params),
                _fmt(layer.nonzeros),
                f"{layer.density:.2%}",
                _fmt(layer.macs),
                _fmt(layer.macs_nonzero),
            )
            for layer in self.stats.layers
        ]
        t = self.stats.totals
        total = (
            "total",
            "",
            "",
            _fmt(t["params"]),
            _fmt(t["nonzeros"]),
            f"{t['density']:.2%}",
            _fmt(t["macs"]),
            _fmt(t["macs_nonzero"]),
        )
        table = [head, *rows, total]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]

        def line(r: tuple[str, ...]) -> str:
            cells = (
                c.rjust(w) if i > 2 else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            return "  ".join(cells).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        lines = [line(head), rule, *(line(r) for r in rows), rule, line(total)]
        lines.append(
            f"prunable weights: {t['prunable_nonzeros']:,} of {t['prunable_params']:,} nonzero "
            f"({t['prunable_sparsity']:.2%} sparse); "
            f"size {t['bytes_dense']:,} B dense, {t['bytes_csr']:,} B as CSR"
        )
        if t["macs_unknown"]:
            lines.append(f"MACs not counted for: {', '.join(t['macs_unknown'])}")
        return "\n".join(lines)


def summary(model: nn.Module, example_inputs: Inputs | None = None) -> Summary:
    """Per-layer params, nonzeros, density and (with example inputs) MACs, as a printable table."""
    return Summary(profile(model, example_inputs))


# --------------------------------------------------------------------------- latency


@dataclass
class LatencyResult:
    """Wall-clock time of one forward pass, over ``repeats`` timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    batch_size: int
    threads: int


def measure_latency(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
) -> LatencyResult:
    """Median forward time over ``repeats`` runs after ``warmup`` untimed runs.

    Runs under ``torch.inference_mode`` in eval mode (each module's mode is restored after),
    timed with ``time.perf_counter``; CUDA work is synchronised before each clock read so the
    time is the kernel time, not the launch time. ``threads`` sets ``torch.set_num_threads``
    for the measurement only. The median and the 10th/90th percentiles are robust to the odd
    slow run a shared machine produces.
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1; got {repeats}")
    if warmup < 0:
        raise ConfigError(f"warmup must be 0 or more; got {warmup}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be a positive number of CPU threads; got {threads}")
    first = first_tensor(example_inputs)
    sync: Callable[[], None] = (
        torch.cuda.synchronize if first is not None and first.is_cuda else (lambda: None)
    )
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    times: list[float] = []
    try:
        with EvalMode(model), torch.inference_mode():
            for i in range(warmup + repeats):
                sync()
                start = time.perf_counter()
                call(model, example_inputs)
                sync()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    cuts = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return LatencyResult(
        median_ms=statistics.median(times),
        p10_ms=cuts[0],
        p90_ms=cuts[-1],
        repeats=repeats,
        batch_size=int(first.shape[0]) if first is not None and first.dim() else 1,
        threads=used_threads,
    )


def compare_latency(
    models: Mapping[str, nn.Module],
    example_inputs: Inputs,
    *,
    rounds: int = 7,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> dict[str, LatencyResult]:
    """The latency of several models measured in interleaved rounds, so that a slow moment of
    a shared machine falls on all of them alike.

    Each round times every model (median of ``repeats`` runs after ``warmup``); the result per
    model has the median over rounds and, as ``p10_ms`` / ``p90_ms``, the spread across rounds.
    """
    if rounds < 1:
        raise ConfigError(f"rounds must be at least 1; got {rounds}")
    medians: dict[str, list[float]] = {name: [] for name in models}
    last: dict[str, LatencyResult] = {}
    for _ in range(rounds):
        for name, model in models.items():
            last[name] = measure_latency(
                model, example_inputs, warmup=warmup, repeats=repeats, threads=threads
            )
            medians[name].append(last[name].median_ms)
    out = {}
    for name, values in medians.items():
        cuts = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
        out[name] = LatencyResult(
            median_ms=statistics.median(values),
            p10_ms=cuts[0],
            p90_ms=cuts[-1],
            repeats=rounds * repeats,
            batch_size=last[name].batch_size,
            threads=last[name].threads,
        )
    return out


# --------------------------------------------------------------------------- accuracy


@dataclass
class EvalResult:
    """Accuracy, mean loss and per-class accuracy on a data set.

    ``per_class_accuracy[c]`` is NaN for a class with no examples (``per_class_count[c] == 0``).
    ``top5`` is ``None`` when the model has fewer than 5 classes.
    """

    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    per_class_count: list[int]
    n: int
    top5: float | None = None

    @property
    def top1(self) -> float:
        """Top-1 accuracy (the same as :attr:`accuracy`)."""
        return self.accuracy


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    num_classes: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> EvalResult:
    """Top-1 (and top-5) accuracy, mean loss and per-class accuracy over ``(inputs, labels)``.

    ``inputs`` may be a tensor, a tuple (positional) or a mapping (keyword arguments); labels
    are class indices, or one-hot / probability rows (their argmax is the class). Batches are
    moved to the model's device. ``loss_fn(logits, labels)`` must return the batch mean (as
    ``nn.CrossEntropyLoss()`` does); it defaults to cross-entropy. ``num_classes`` fixes the
    length of the per-class lists (default: the model's output width). Runs under
    ``torch.no_grad`` in eval mode and restores each module's mode.
    """
    device = device_of(model)
    correct = torch.zeros(num_classes or 0, dtype=torch.long)
    count = torch.zeros(num_classes or 0, dtype=torch.long)
    total_loss, top5_hits, n, width = 0.0, 0, 0, 0
    with EvalMode(model), torch.no_grad():
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise DataError(
                    "evaluate expects a loader of (inputs, labels) pairs; got a batch of type "
                    f"{type(batch).__name__}"
                )
            inputs, labels = to_device(batch[0], device), to_device(batch[1], device)
            out = call(model, inputs)
            if not isinstance(out, Tensor) or out.dim() != 2:
                raise ModelError(
                    "evaluate needs the model to return logits of shape [batch, classes]; got "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
                )
            targets = labels.argmax(1) if labels.dim() == 2 else labels
            classes = max(num_classes or 0, out.shape[1])
            if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
                raise DataError(
                    f"labels must be class indices in [0, {classes}); got values from "
                    f"{int(targets.min())} to {int(targets.max())}. Check the loader's labels "
                    "or pass num_classes."
                )
            if loss_fn is None:
                total_loss += float(nn.functional.cross_entropy(out, labels, reduction="sum"))
            else:
                total_loss += float(loss_fn(out, labels)) * out.shape[0]
            if correct.numel() < classes:
                pad = torch.zeros(classes - correct.numel(), dtype=torch.long)
                correct, count = torch.cat([correct, pad]), torch.cat([count, pad])
            targets = targets.cpu()
            hit = out.argmax(1).cpu() == targets
            count += torch.bincount(targets, minlength=classes)
            correct += torch.bincount(targets[hit], minlength=classes)
            width = out.shape[1]
            if width >= 5:
                top = out.topk(5, dim=1).indices.cpu()
                top5_hits += int((top == targets[:, None]).any(1).sum())
            n += targets.numel()
    if n == 0:
        raise DataError("the loader yielded no examples; evaluate needs at least one batch")
    per_class = [
        c / k if k else float("nan") for c, k in zip(correct.tolist(), count.tolist(), strict=True)
    ]
    return EvalResult(
        accuracy=int(correct.sum()) / n,
        loss=total_loss / n,
        per_class_accuracy=per_class,
        per_class_count=count.tolist(),
        n=n,
        top5=top5_hits / n if width >= 5 else None,
    )


# --------------------------------------------------------------------------- files


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Size of the file at ``path`` in bytes (what a saved model costs on disk)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"cannot measure {str(p)!r}: no such file. Save the model there first.")
    return p.stat().st_size
