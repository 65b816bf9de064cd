"""What a model costs and how well it does: parameters, nonzeros, MACs, bytes, latency, accuracy.

Everything is counted from the *effective* tensors: a masked weight is read through its mask,
under its natural name (``conv1.weight``), exactly once even when tied.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

Inputs = Tensor | tuple[Tensor, ...]


def named_effective_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """``(qualified name, module, attribute, effective tensor)`` for every parameter, once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            parametrizations = module.parametrizations
            assert isinstance(parametrizations, nn.ModuleDict)
            for attr in parametrizations:
                original = parametrizations[attr].original
                if id(original) not in seen:
                    seen.add(id(original))
                    yield _qualify(module_name, attr), module, attr, getattr(module, attr)
        for attr in names:
            param = getattr(module, attr)
            if id(param) not in seen:
                seen.add(id(param))
                yield _qualify(module_name, attr), module, attr, param


def _kind(module: nn.Module) -> str:
    """The module's class name, seen through parametrization's injected subclass."""
    cls = type(module)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(module) else cls.__name__


def _qualify(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def csr_bytes(t: Tensor, index_bytes: int = 4) -> int:
    """Bytes to store ``t`` in CSR over ``[shape[0], -1]``: values, column indices, row pointers."""
    rows = t.shape[0] if t.dim() else 1
    nnz = int(torch.count_nonzero(t))
    return nnz * (t.element_size() + index_bytes) + (rows + 1) * index_bytes


@dataclass
class LayerStats:
    """One module's parameters and cost."""

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


@dataclass
class ModelStats:
    """Per-layer statistics and model totals."""

    layers: list[LayerStats] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(layer) for layer in self.layers], "totals": dict(self.totals)}


def _conv_macs(module: nn.modules.conv._ConvNd, out: Tensor, inp: Tensor) -> int:
    k = math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # every input element is multiplied by (out_channels / groups) * k weights
        return inp.numel() * (module.out_channels // module.groups) * k
    return out.numel() * (module.in_channels // module.groups) * k


def _measure_macs(model: nn.Module, example_inputs: Inputs) -> dict[str, int]:
    """MACs per module from one forward pass with hooks (leaf layers and attention)."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name: str) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            inp = args[0] if args else None
            if isinstance(module, nn.modules.conv._ConvNd) and isinstance(inp, Tensor):
                n = _conv_macs(module, out, inp)
            elif isinstance(module, nn.Linear):
                n = out.numel() * module.in_features
            elif isinstance(module, nn.MultiheadAttention) and isinstance(inp, Tensor):
                n = _attention_macs(module, args)
            else:
                return
            macs[name] = macs.get(name, 0) + int(n)

        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)):
            hooks.append(module.register_forward_hook(hook(name)))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_inputs, tuple):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return macs


def _attention_macs(module: nn.MultiheadAttention, args: tuple[Any, ...]) -> int:
    """Input projections and the two attention matmuls (out_proj is hooked as a Linear)."""
    q = args[0]
    k = args[1] if len(args) > 1 else q
    batch_first = module.batch_first
    lq = q.shape[1] if batch_first and q.dim() == 3 else q.shape[0]
    lk = k.shape[1] if batch_first and k.dim() == 3 else k.shape[0]
    b = q.numel() // (lq * module.embed_dim)
    e = module.embed_dim
    projections = b * (lq * e * e + 2 * lk * e * module.kdim)
    return projections + 2 * b * lq * lk * e


def profile(model: nn.Module, example_inputs: Inputs | None = None) -> ModelStats:
    """Per-module parameters, nonzeros, density, bytes, and MACs when inputs are given."""
    macs = _measure_macs(model, example_inputs) if example_inputs is not None else {}
    by_module: dict[str, dict[str, Tensor]] = {}
    kinds: dict[str, str] = {}
    for qualified, module, attr, tensor in named_effective_parameters(model):
        module_name = qualified[: -len(attr) - 1] if qualified != attr else ""
        by_module.setdefault(module_name, {})[attr] = tensor.detach()
        kinds[module_name] = _kind(module)
    stats = ModelStats()
    for name, named in by_module.items():
        tensors = list(named.values())
        # the tensor that sets the layer's MACs: "weight" if present, else the largest
        weight = named.get("weight", max(tensors, key=lambda t: t.numel()))
        params = sum(t.numel() for t in tensors)
        nonzeros = sum(int(torch.count_nonzero(t)) for t in tensors)
        m = macs.get(name)
        w_density = int(torch.count_nonzero(weight)) / max(weight.numel(), 1)
        stats.layers.append(
            LayerStats(
                name=name or "(model)",
                kind=kinds[name],
                shape=list(weight.shape),
                params=params,
                nonzeros=nonzeros,
                density=nonzeros / max(params, 1),
                macs=m,
                macs_nonzero=None if m is None else round(m * w_density),
                bytes_dense=sum(t.numel() * t.element_size() for t in tensors),
                bytes_csr=sum(
                    csr_bytes(t) if t.dim() > 1 else t.numel() * t.element_size() for t in tensors
                ),
            )
        )
    params = sum(layer.params for layer in stats.layers)
    nonzeros = sum(layer.nonzeros for layer in stats.layers)
    has_macs = example_inputs is not None
    stats.totals = {
        "params": params,
        "nonzeros": nonzeros,
        "density": nonzeros / max(params, 1),
        "sparsity": 1 - nonzeros / max(params, 1),
        "macs": sum(layer.macs or 0 for layer in stats.layers) if has_macs else None,
        "macs_nonzero": sum(layer.macs_nonzero or 0 for layer in stats.layers)
        if has_macs
        else None,
        "bytes_dense": sum(layer.bytes_dense for layer in stats.layers),
        "bytes_csr": sum(layer.bytes_csr for layer in stats.layers),
    }
    return stats


def _fmt(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@dataclass
class Summary:
    """The per-layer table ``print(sc.summary(model))`` shows."""

    stats: ModelStats

    def to_dict(self) -> dict[str, Any]:
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
        rows.append(
            (
                "total",
                "",
                "",
                _fmt(t["params"]),
                _fmt(t["nonzeros"]),
                f"{t['density']:.2%}",
                _fmt(t["macs"]),
                _fmt(t["macs_nonzero"]),
            )
        )
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(
                str(c).rjust(w) if i > 2 else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in [head, *rows]
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(lines)


def summary(model: nn.Module, example_inputs: Inputs | None = None) -> Summary:
    """Per-layer params, nonzeros, density and (with example inputs) MACs, as a printable table."""
    return Summary(profile(model, example_inputs))


@dataclass
class LatencyResult:
    """Wall-clock time of one forward pass."""

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
    """Median forward time over ``repeats`` runs after ``warmup`` runs, in inference mode."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(*inputs)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
    finally:
        model.train(was_training)
        torch.set_num_threads(previous)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return LatencyResult(
        median_ms=statistics.median(times),
        p10_ms=q[0],
        p90_ms=q[-1],
        repeats=repeats,
        batch_size=int(inputs[0].shape[0]) if inputs[0].dim() else 1,
        threads=torch.get_num_threads() if threads is None else threads,
    )


@dataclass
class EvalResult:
    """Top-1 accuracy, mean loss and per-class accuracy on a data set."""

    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    per_class_count: list[int]
    n: int


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    num_classes: int | None = None,
    loss_fn: Any = None,
) -> EvalResult:
    """Accuracy, loss and per-class accuracy over ``(inputs, labels)`` batches."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    was_training = model.training
    model.eval()
    correct = torch.zeros(0, dtype=torch.long)
    count = torch.zeros(0, dtype=torch.long)
    total_loss, n = 0.0, 0
    try:
        with torch.no_grad():
            for inputs, labels in loader:
                out = model(inputs)
                total_loss += float(loss_fn(out, labels, reduction="sum"))
                pred = out.argmax(1)
                classes = max(num_classes or 0, out.shape[1])
                if correct.numel() < classes:
                    correct = torch.cat(
                        [correct, torch.zeros(classes - correct.numel(), dtype=torch.long)]
                    )
                    count = torch.cat(
                        [count, torch.zeros(classes - count.numel(), dtype=torch.long)]
                    )
                count += torch.bincount(labels, minlength=classes)[:classes]
                correct += torch.bincount(labels[pred == labels], minlength=classes)[:classes]
                n += labels.numel()
    finally:
        model.train(was_training)
    per_class = [
        (c / k) if k else float("nan")
        for c, k in zip(correct.tolist(), count.tolist(), strict=True)
    ]
    return EvalResult(
        accuracy=float(correct.sum()) / max(n, 1),
        loss=total_loss / max(n, 1),
        per_class_accuracy=per_class,
        per_class_count=count.tolist(),
        n=n,
    )
