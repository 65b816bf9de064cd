"""A per-layer latency look-up table: predicted latency of a channel-pruned model, no surgery.

NetAdapt (Yang et al. 2018, "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
Applications", Sec. 3.3) meets a latency budget without running every candidate: the latency
of each layer is measured once, on the target machine, at a grid of input and output widths,
and a candidate's latency is the sum of its layers' entries. Here:

* the *layers* are the convolutions and linear layers whose weights the channel graph sees
  (:attr:`~secateurs.graph.ChannelGraph.weight_uses`); each call's input shape is captured
  with forward hooks on the example inputs;
* each layer is timed as a fresh standalone module of the same kind, kernel, stride, padding,
  dilation and groups at ``points`` x ``points`` (input width, output width) pairs, fractions
  ``1/points ... 1`` of its dense widths (grouped and depthwise convolutions lose whole
  groups, so their input and output scale together: a 1-D grid). A point is the median of
  ``repeats`` runs after ``warmup`` (``time.perf_counter``, eval mode, inference mode), the
  lowest of :data:`ROUNDS` such medians taken in separate passes over the grid;
  widths between points are interpolated bilinearly, widths below the grid take its edge;
* everything else (normalisations, activations, pooling, Python overhead) is the rest: the
  measured dense whole-model latency minus the sum of the layers' dense entries, floored at 0.
  It is not all constant: the elementwise work after each layer shrinks with the layer's
  output width (on VGG-BN at batch 1 it is about 40% of the model's time, and a constant
  rest over-predicts a half-width model by some 40%). So the model is also timed once with
  every removable group halved (on a copy), and the rest is split into a fixed part and a
  part proportional to the layers' output volume (the fraction of the dense output elements
  the table's layers produce), fitted through the two measurements; both parts are >= 0,
  and a model that cannot be halved keeps the whole rest fixed;
* the table is made monotone in both widths (the mean of the running maximum from below and
  the running minimum from above), so noise on a shared machine cannot make a narrower layer
  look slower: a search would otherwise chase spurious dips.

Measuring takes seconds, so the table is cached as JSON in ``cache_dir`` (default
``$SECATEURS_CACHE/latency``, else ``~/.cache/secateurs/latency``) under a key hashing the
layer geometries and input shapes, the model's traced tensor shapes, the grid, the torch
version, the thread count, the CPU model and the device: a second build of the same model on
the same machine loads it and times nothing.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.errors import ConfigError, SecateursError
from secateurs.graph.groups import ChannelGraph
from secateurs.graph.state import TensorRef
from secateurs.graph.surgery import apply_plan_, plan_from_removed
from secateurs.metrics import measure_latency
from secateurs.running import Inputs, run_example

#: Environment variable naming the root of secateurs' caches (the table goes in ``latency/``).
CACHE_ENV = "SECATEURS_CACHE"
#: Passes over the grid (and the whole models, one more): each number is the lowest median of
#: its passes, since interference from other work on the machine only ever adds time.
ROUNDS = 2
#: Bump when the JSON layout or the way points are measured changes.
FORMAT_VERSION = 1

_CONVS: dict[str, type[nn.Module]] = {
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "ConvTranspose1d": nn.ConvTranspose1d,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "ConvTranspose3d": nn.ConvTranspose3d,
}


def default_cache_dir() -> Path:
    """``$SECATEURS_CACHE/latency`` if the variable is set, else ``~/.cache/secateurs/latency``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "secateurs"
    return base / "latency"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``, else the arch."""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


# --------------------------------------------------------------------------- one layer


@dataclass
class LayerEntry:
    """The timed grid of one call of one layer.

    ``ins``/``outs``: the widths timed (for a grouped convolution, ``ins`` holds group counts
    and ``outs`` is ``[0]``: one axis). ``ms[i][j]``: milliseconds at ``ins[i]``, ``outs[j]``.
    """

    module: str
    kind: str
    geometry: dict[str, Any]  #: what the standalone module is built from
    input_shape: list[int]  #: the dense call's input shape (batch included)
    ins: list[int]
    outs: list[int]
    ms: list[list[float]] = field(default_factory=list)
    output_numel: int = 0  #: elements of the dense call's output (weights the rest's scaling)

    @property
    def grouped(self) -> bool:
        return int(self.geometry.get("groups", 1)) > 1

    @property
    def dense(self) -> tuple[int, int]:
        """Dense (in, out) widths, or (groups, 0) for a grouped convolution."""
        g = self.geometry
        if self.grouped:
            return int(g["groups"]), 0
        return int(g["in"]), int(g["out"])

    def widths(self, shape: tuple[int, ...] | None) -> tuple[float, float]:
        """Grid coordinates of this layer for its weight's pruned ``shape`` (None: dense)."""
        if shape is None:
            return float(self.dense[0]), float(self.dense[1])
        g = self.geometry
        if self.kind == "Linear":  # weight [out, in]
            return float(shape[1]), float(shape[0])
        if self.kind.startswith("ConvTranspose"):  # weight [in, out / groups, ...], groups 1
            return float(shape[0]), float(shape[1])
        if self.grouped:  # weight [out, in / groups, ...]: whole groups leave
            return shape[0] / (int(g["out"]) // int(g["groups"])), 0.0
        return float(shape[1]), float(shape[0])

    def out_fraction(self, shape: tuple[int, ...] | None) -> float:
        """The fraction of its dense output channels this layer keeps at weight ``shape``."""
        if shape is None:
            return 1.0
        g = self.geometry
        if self.kind.startswith("ConvTranspose"):
            return shape[1] / int(g["out"])
        return shape[0] / int(g["out"])

    def lookup(self, a: float, b: float) -> float:
        """Bilinear interpolation of the grid at (``a``, ``b``), clamped to its edges."""
        i0, i1, ti = _bracket(self.ins, a)
        j0, j1, tj = _bracket(self.outs, b)
        m = self.ms
        top = m[i0][j0] * (1 - tj) + m[i0][j1] * tj
        bottom = m[i1][j0] * (1 - tj) + m[i1][j1] * tj
        return top * (1 - ti) + bottom * ti

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "geometry": self.geometry,
            "input_shape": self.input_shape,
            "ins": self.ins,
            "outs": self.outs,
            "ms": self.ms,
            "output_numel": self.output_numel,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerEntry:
        return cls(
            str(d["module"]),
            str(d["kind"]),
            dict(d["geometry"]),
            [int(v) for v in d["input_shape"]],
            [int(v) for v in d["ins"]],
            [int(v) for v in d["outs"]],
            [[float(v) for v in row] for row in d["ms"]],
            int(d.get("output_numel", 0)),
        )


def _bracket(grid: Sequence[int], x: float) -> tuple[int, int, float]:
    """Indices around ``x`` in the sorted ``grid`` and the weight of the upper one."""
    if x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        n = len(grid) - 1
        return n, n, 0.0
    hi = bisect.bisect_left(grid, x)
    lo = hi - 1
    return lo, hi, (x - grid[lo]) / (grid[hi] - grid[lo])


def _grid(dense: int, points: int) -> list[int]:
    """Widths at fractions ``1/points .. 1`` of ``dense`` (distinct, at least 1)."""
    return sorted({max(1, round(dense * k / points)) for k in range(1, points + 1)})


def _geometry(module: nn.Module) -> dict[str, Any] | None:
    """What rebuilds ``module`` standalone at other widths; None for kinds not in the table."""
    if type(module) is nn.Linear:
        return {
            "in": module.in_features,
            "out": module.out_features,
            "bias": module.bias is not None,
        }
    kind = type(module).__name__
    if kind not in _CONVS or type(module) is not _CONVS[kind]:
        return None
    assert isinstance(module, nn.modules.conv._ConvNd)
    if module.transposed and module.groups != 1:
        return None  # the graph pins grouped transposed convolutions: they never change
    geometry: dict[str, Any] = {
        "in": module.in_channels,
        "out": module.out_channels,
        "kernel_size": list(module.kernel_size),
        "stride": list(module.stride),
        "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
        "dilation": list(module.dilation),
        "groups": module.groups,
        "bias": module.bias is not None,
        "padding_mode": module.padding_mode,
    }
    if module.transposed:
        geometry["output_padding"] = list(module.output_padding)
    return geometry


def _standalone(entry: LayerEntry, a: int, b: int, like: Tensor) -> tuple[nn.Module, Tensor]:
    """A fresh module of ``entry``'s kind at grid point (``a``, ``b``) and an input for it."""
    g = entry.geometry
    shape = list(entry.input_shape)
    if entry.kind == "Linear":
        module: nn.Module = nn.Linear(a, b, bias=bool(g["bias"]))
        shape[-1] = a
    else:
        if entry.grouped:
            per_in, per_out = int(g["in"]) // int(g["groups"]), int(g["out"]) // int(g["groups"])
            cin, cout, groups = per_in * a, per_out * a, a
        else:
            cin, cout, groups = a, b, 1
        options = {
            k: (tuple(v) if isinstance(v, list) else v)
            for k, v in g.items()
            if k not in ("in", "out", "groups", "bias")
        }
        module = _CONVS[entry.kind](cin, cout, groups=groups, bias=bool(g["bias"]), **options)
        weight_dims = len(g["kernel_size"]) + 2
        shape[1 if len(shape) == weight_dims else 0] = cin
    module = module.to(device=like.device, dtype=like.dtype).eval()
    return module, torch.randn(shape, device=like.device, dtype=like.dtype)


def time_module(module: nn.Module, x: Tensor, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``module(x)`` over ``repeats`` runs after ``warmup`` runs."""
    sync: Callable[[], None] = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            module(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _monotone(ms: list[list[float]]) -> list[list[float]]:
    """Make a grid non-decreasing along both axes: per axis, the mean of the running maximum
    from the small end and the running minimum from the large end (a cheap isotonic fit that
    does not let one noisy point lift or sink a whole row)."""

    def along_rows(m: list[list[float]]) -> list[list[float]]:
        out = []
        for row in m:
            up, acc = [], -float("inf")
            for v in row:
                acc = max(acc, v)
                up.append(acc)
            down, acc = [0.0] * len(row), float("inf")
            for k in range(len(row) - 1, -1, -1):
                acc = min(acc, row[k])
                down[k] = acc
            out.append([(u + d) / 2 for u, d in zip(up, down, strict=True)])
        return out

    rows = along_rows(ms)
    cols = along_rows([list(c) for c in zip(*rows, strict=True)])
    return [list(r) for r in zip(*cols, strict=True)]


# --------------------------------------------------------------------------- the table


@dataclass
class LatencyTable:
    """Per-layer latency grids plus the rest of the network (milliseconds).

    :meth:`estimate` predicts the whole model's latency from the weight shapes of a channel
    removal (:meth:`~secateurs.graph.ChannelGraph.shapes_after`): ``rest_ms + scaled_ms *
    volume + sum of the layers' entries``, where ``volume`` is the fraction of the dense output
    elements the table's layers still produce. ``from_cache``: whether :meth:`build` loaded it
    instead of timing; ``path``: its cache file.
    """

    key: str
    entries: list[LayerEntry]
    rest_ms: float  #: the fixed part of everything not in the table
    dense_ms: float  #: the measured dense whole-model latency
    scaled_ms: float = 0.0  #: the part of the rest that scales with the output volume
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    from_cache: bool = False
    seconds: float = 0.0  #: time :meth:`build` took (timing or loading)

    # -- prediction ---------------------------------------------------------------------
    def estimate(self, shapes: Mapping[TensorRef, tuple[int, ...]]) -> float:
        """Predicted whole-model latency in ms for the weight ``shapes`` of a pruned model (a
        layer missing from ``shapes`` counts at its dense widths)."""
        total = self.rest_ms + self.scaled_ms * self.volume(shapes)
        for e in self.entries:
            total += e.lookup(*e.widths(shapes.get(TensorRef(e.module, "weight"))))
        return total

    def dense_estimate(self) -> float:
        """The prediction at dense widths (the measured dense latency, up to rounding)."""
        return self.estimate({})

    def volume(self, shapes: Mapping[TensorRef, tuple[int, ...]]) -> float:
        """The fraction of the dense output elements of the table's layers kept at ``shapes``
        (1 when dense): what the elementwise work between the layers scales with."""
        dense = sum(e.output_numel for e in self.entries)
        if dense <= 0:
            return 1.0
        kept = sum(
            e.output_numel * e.out_fraction(shapes.get(TensorRef(e.module, "weight")))
            for e in self.entries
        )
        return kept / dense

    # -- building -----------------------------------------------------------------------
    @classmethod
    def describe(
        cls,
        model: nn.Module,
        example_inputs: Inputs,
        graph: ChannelGraph,
        threads: int | None = 1,
        points: int = 8,
        warmup: int = 2,
        repeats: int = 7,
    ) -> tuple[str, list[LayerEntry], dict[str, Any]]:
        """The cache key, the (untimed) entries and what the key was made of, without timing
        anything: one forward pass on ``example_inputs`` captures the layers' input shapes."""
        _check_options(threads, points, warmup, repeats)
        modules = dict(model.named_modules())
        names: list[str] = []
        for use in graph.weight_uses:
            name = use.ref.module
            if use.ref.name == "weight" and name in modules and name not in names:
                names.append(name)
        geometries = {n: g for n in names if (g := _geometry(modules[n])) is not None}
        calls: dict[str, list[tuple[list[int], int]]] = {n: [] for n in geometries}
        handles = []
        for name in geometries:

            def hook(_: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
                if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                    calls[name].append((list(args[0].shape), out.numel()))

            handles.append(modules[name].register_forward_hook(hook))
        try:
            run_example(model, example_inputs)
        finally:
            for h in handles:
                h.remove()
        entries: list[LayerEntry] = []
        for name, geometry in geometries.items():
            for shape, numel in calls[name]:
                kind = type(modules[name]).__name__
                entry = LayerEntry(name, kind, geometry, shape, [], [0], [], numel)
                a, b = entry.dense
                entry.ins = _grid(a, points)
                if not entry.grouped:
                    entry.outs = _grid(b, points)
                entries.append(entry)
        used = torch.get_num_threads() if threads is None else threads
        device = _device(model, example_inputs)
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "model": type(model).__qualname__,
            "layers": [[e.module, e.kind, e.geometry, e.input_shape] for e in entries],
            "tensors": sorted([r.qualname, list(s)] for r, s in graph.shapes.items()),
            "outputs": [list(s) for s in graph.output_shapes],
            "grid": [points, warmup, repeats, ROUNDS],
            "torch": torch.__version__,
            "threads": used,
            "cpu": cpu_model(),
            "device": device,
        }
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        return digest, entries, meta

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_inputs: Inputs,
        graph: ChannelGraph,
        cache_dir: str | Path | None = None,
        threads: int | None = 1,
        points: int = 8,
        warmup: int = 2,
        repeats: int = 7,
    ) -> LatencyTable:
        """The table of ``model`` on ``example_inputs``: loaded from the cache, else timed here.

        ``threads``: ``torch.set_num_threads`` while timing (None: as it is), restored after; it
        is part of the key, since latency depends on it. ``points``: grid points per width axis.
        ``warmup``/``repeats``: untimed and timed runs per point (the lowest median of
        :data:`ROUNDS` passes is kept); the dense and the halved whole model are timed with
        three times as many, interleaved, in one pass more. The model is not changed.
        """
        start = time.perf_counter()
        key, entries, meta = cls.describe(
            model, example_inputs, graph, threads, points, warmup, repeats
        )
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = directory / f"{key}.json"
        cached = _load(path, key)
        if cached is not None:
            cached.path = path
            cached.from_cache = True
            cached.seconds = time.perf_counter() - start
            return cached
        like = _like(model, example_inputs)
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for e in entries:
                e.ms = [[math.inf] * len(e.outs) for _ in e.ins]
            for _ in range(ROUNDS):
                for e in entries:
                    for i, a in enumerate(e.ins):
                        for j, b in enumerate(e.outs):
                            ms = time_module(*_standalone(e, a, b, like), warmup, repeats)
                            e.ms[i][j] = min(e.ms[i][j], ms)
            for e in entries:
                e.ms = _monotone(e.ms)
            table = cls(key, entries, 0.0, 0.0, 0.0, meta, path)
            narrow = _halved(model, graph)
            volume = 1.0 if narrow is None else table.volume(narrow[1])
            dense = small_ms = math.inf
            for _ in range(ROUNDS + 1):  # interleaved, so both see the same machine
                dense = min(dense, _whole(model, example_inputs, warmup, repeats, threads))
                if narrow is not None and volume < 0.95:
                    small_ms = min(
                        small_ms, _whole(narrow[0], example_inputs, warmup, repeats, threads)
                    )
            rest = max(0.0, dense - table.estimate({}))
            scaled = 0.0
            if narrow is not None and math.isfinite(small_ms):
                small_rest = small_ms - table.estimate(narrow[1])
                scaled = min(max((rest - small_rest) / (1.0 - volume), 0.0), rest)
        finally:
            torch.set_num_threads(previous)
        table.rest_ms, table.scaled_ms, table.dense_ms = rest - scaled, scaled, dense
        _save(table, path)
        table.seconds = time.perf_counter() - start
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "rest_ms": self.rest_ms,
            "scaled_ms": self.scaled_ms,
            "dense_ms": self.dense_ms,
            "meta": self.meta,
            "entries": [e.to_dict() for e in self.entries],
        }


def _whole(
    model: nn.Module, example_inputs: Inputs, warmup: int, repeats: int, threads: int | None
) -> float:
    """Median ms of the whole model over three times the runs of a grid point."""
    return measure_latency(
        model, example_inputs, warmup=3 * warmup, repeats=3 * repeats, threads=threads
    ).median_ms


def _halved(
    model: nn.Module, graph: ChannelGraph
) -> tuple[nn.Module, dict[TensorRef, tuple[int, ...]]] | None:
    """A copy of ``model`` with about half the removable channels of every group removed, and
    its tensor shapes; None when nothing can be removed or the surgery does not apply."""
    removed: dict[int, Tensor] = {}
    for g in graph.prunable_groups:
        idx = g.prunable.nonzero().flatten()[: min(g.num_prunable, g.size // 2)]
        if len(idx):
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[idx] = True
            removed[g.index] = mask
    if not removed:
        return None
    try:
        small = apply_plan_(copy.deepcopy(model), plan_from_removed(graph, removed))
    except SecateursError:  # surgery refuses this cut (a pinned size): keep the rest fixed
        return None
    return small, graph.shapes_after(removed)


def _check_options(threads: int | None, points: int, warmup: int, repeats: int) -> None:
    def bad(v: object, least: int) -> bool:
        return isinstance(v, bool) or not isinstance(v, int) or v < least

    if threads is not None and bad(threads, 1):
        raise ConfigError(f"threads must be a positive int or None (as set); got {threads!r}")
    if bad(points, 2):
        raise ConfigError(f"points (grid points per width) must be an int >= 2; got {points!r}")
    if bad(warmup, 0):
        raise ConfigError(f"warmup must be an int >= 0; got {warmup!r}")
    if bad(repeats, 1):
        raise ConfigError(f"repeats must be an int >= 1; got {repeats!r}")


def _first_tensor(example_inputs: Inputs) -> Tensor | None:
    if isinstance(example_inputs, Tensor):
        return example_inputs
    values = example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs
    return next((v for v in values if isinstance(v, Tensor)), None)


def _like(model: nn.Module, example_inputs: Inputs) -> Tensor:
    """A tensor with the device and floating dtype the layers run in."""
    p = next(iter(model.parameters()), None)
    if p is not None:
        return p.detach()
    x = _first_tensor(example_inputs)
    return x if x is not None and x.is_floating_point() else torch.zeros(())


def _device(model: nn.Module, example_inputs: Inputs) -> str:
    t = _like(model, example_inputs)
    if t.is_cuda:
        return f"cuda:{torch.cuda.get_device_name(t.device)}:{t.dtype}"
    return f"{t.device.type}:{t.dtype}"


def _load(path: Path, key: str) -> LatencyTable | None:
    """The cached table at ``path``, or None if missing, unreadable or for another key."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key or data.get("meta", {}).get("format") != FORMAT_VERSION:
            return None
        return LatencyTable(
            key,
            [LayerEntry.from_dict(e) for e in data["entries"]],
            float(data["rest_ms"]),
            float(data["dense_ms"]),
            float(data["scaled_ms"]),
            dict(data["meta"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _save(table: LatencyTable, path: Path) -> None:
    """Write atomically (a temporary file renamed), so a concurrent reader never sees half a
    table; a cache that cannot be written is not an error (the table is still returned)."""
    with suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table.to_dict()))
        os.replace(tmp, path)
