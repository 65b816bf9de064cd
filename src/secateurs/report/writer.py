"""The run report: JSON for machines, Markdown with PNG plots for people.

The Markdown puts the dense and the pruned model side by side (accuracy, nonzero parameters,
MACs, bytes, file size, latency) with the ratios a reader wants: compression, MACs reduction,
speedup and accuracy change. Plots show accuracy against sparsity along the pruning schedule,
per-layer density, and the per-class accuracy change against the dense model (pruning hurts
some classes more than the average suggests, so the report shows which). Anything not
measured is left out and the report says so; nothing missing makes it fail.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from secateurs.errors import ConfigError
from secateurs.report.plots import accuracy_vs_sparsity, layer_density, per_class_change


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: NaN/inf become ``None``, tuples lists, paths strings."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return _jsonable(item())
    tolist = getattr(value, "tolist", None)  # numpy arrays, tensors
    if callable(tolist):
        return _jsonable(tolist())
    return str(value)


#: The format of ``report.json``; a newer one is refused by an older secateurs.
FORMAT = "secateurs.run-report"
FORMAT_VERSION = 1


@dataclass
class RunReport:
    """Everything measured in one run, dense next to pruned.

    ``dense`` and ``pruned`` hold the same metric keys (any may be missing or ``None``):
    ``accuracy``, ``per_class_accuracy``, ``params``, ``nonzeros``, ``macs``, ``macs_nonzero``,
    ``bytes_dense``, ``bytes_csr``, ``latency_ms``, ``file_bytes``. ``layers`` are the
    :class:`~secateurs.metrics.LayerStats` dicts of the pruned model; ``trajectory`` points
    carry at least ``sparsity`` and ``accuracy`` (fractions), usually ``epoch`` and ``step``.
    """

    title: str
    model: str
    dataset: str
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    dense: dict[str, Any] = field(default_factory=dict)
    pruned: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = f"{FORMAT}/{FORMAT_VERSION}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (NaN and infinities become ``null``)."""
        data = _jsonable({f.name: getattr(self, f.name) for f in fields(self)})
        assert isinstance(data, dict)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        """Rebuild a report from :meth:`to_dict` output (for example a loaded ``report.json``)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a run report must be a mapping; got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run report keys {unknown}; allowed: {sorted(known)}. Is this a "
                "report.json written by secateurs?"
            )
        fmt = str(data.get("format", f"{FORMAT}/1"))
        name, _, version = fmt.partition("/")
        if name != FORMAT or not version.isdigit():
            raise ConfigError(f"report.json has format {fmt!r}, not a {FORMAT} of secateurs")
        if int(version) > FORMAT_VERSION:
            raise ConfigError(
                f"report.json is {fmt}, newer than this secateurs reads ({FORMAT}/"
                f"{FORMAT_VERSION}); upgrade secateurs to read it"
            )
        missing = [k for k in ("title", "model", "dataset") if k not in data]
        if missing:
            raise ConfigError(f"run report is missing required keys {missing}")
        mappings = ("config", "versions", "dense", "pruned", "extra")
        lists = ("layers", "trajectory", "class_names")
        for key in (*mappings, *lists):
            kind: type = Mapping if key in mappings else list
            if key in data and not isinstance(data[key], kind):
                raise ConfigError(
                    f"run report key {key!r} must be a {'mapping' if key in mappings else 'list'}; "
                    f"got {type(data[key]).__name__}"
                )
        values: dict[str, Any] = {
            k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()
        }
        return cls(**values)


# --------------------------------------------------------------------------- formatting


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any, fmt: str = ",") -> str:
    return format(v, fmt) if _is_num(v) else "-"


def _pct(v: Any) -> str:
    return f"{v:.2%}" if _is_num(v) else "-"


#: The word for a dense/pruned ratio above 1, and for its inverse when the pruned side is bigger.
_OPPOSITE = {"fewer": "more", "smaller": "larger", "faster": "slower"}


def _ratio(a: Any, b: Any, word: str) -> str:
    """``a / b`` as ``"4.00x fewer"``; the other way round (``"1.20x slower"``) when below 1."""
    if not (_is_num(a) and _is_num(b)) or a <= 0 or b <= 0:
        return "-"
    if math.isclose(a, b, rel_tol=5e-3):
        return "same"
    return f"{a / b:.2f}x {word}" if a > b else f"{b / a:.2f}x {_OPPOSITE[word]}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


#: Headline rows: (label, dense key, pruned key, number format, what a ratio > 1 means).
_HEADLINE: tuple[tuple[str, str, str, str, str], ...] = (
    ("parameters", "params", "params", ",", "fewer"),
    ("nonzero parameters", "nonzeros", "nonzeros", ",", "fewer"),
    ("MACs per example (dense vs nonzero weights)", "macs", "macs_nonzero", ",", "fewer"),
    ("bytes in memory (dense vs CSR of the nonzeros)", "bytes_dense", "bytes_csr", ",", "smaller"),
    ("file bytes (as saved)", "file_bytes", "file_bytes", ",", "smaller"),
    ("latency, batch 1 (ms)", "latency_ms", "latency_ms", ".3f", "faster"),
    ("latency, batch 64 (ms)", "latency_batch64_ms", "latency_batch64_ms", ".3f", "faster"),
)


def headline_rows(d: Mapping[str, Any], p: Mapping[str, Any]) -> tuple[list[list[str]], list[str]]:
    """The dense-vs-pruned rows ``[label, dense, pruned, change]`` both report pages show, and
    the measurements that are missing."""
    rows: list[list[str]] = []
    skipped: list[str] = []
    if _is_num(d.get("perplexity")) or _is_num(p.get("perplexity")):
        dp: Any = d.get("perplexity")
        pp: Any = p.get("perplexity")
        change = f"{(pp / dp - 1) * 100:+.1f}%" if _is_num(dp) and _is_num(pp) else "-"
        rows.append(["perplexity (held-out text)", _num(dp, ".2f"), _num(pp, ".2f"), change])
    elif _is_num(d.get("accuracy")) or _is_num(p.get("accuracy")):
        da: Any = d.get("accuracy")
        pa: Any = p.get("accuracy")
        delta = f"{(pa - da) * 100:+.2f} pt" if _is_num(da) and _is_num(pa) else "-"
        rows.append(["top-1 accuracy", _pct(da), _pct(pa), delta])
    else:
        skipped.append("accuracy")
    if _is_num(d.get("top5")) and _is_num(p.get("top5")):
        delta = f"{(p['top5'] - d['top5']) * 100:+.2f} pt"
        rows.append(["top-5 accuracy", _pct(d["top5"]), _pct(p["top5"]), delta])
    for label, dk, pk, fmt, word in _HEADLINE:
        dv = d.get(dk, d.get(pk)) if dk == "macs" else d.get(dk)
        pv = p.get(pk)
        if not (_is_num(dv) or _is_num(pv)):
            if dk != "latency_batch64_ms":  # an optional extra measurement, not worth a note
                skipped.append(label.split(" (")[0].split(",")[0])
            continue
        rows.append([label, _num(dv, fmt), _num(pv, fmt), _ratio(dv, pv, word)])
    return rows, skipped


def realised_rows(extra: Mapping[str, Any]) -> tuple[list[list[str]], list[str]]:
    """What the run realised (``extra["realised"]``): rows ``[what, dense, pruned, change]``
    and one line for each saving that did not materialise, saying why."""
    realised = extra.get("realised") or {}
    rows: list[list[str]] = []
    file = realised.get("file") or {}
    if _is_num(file.get("file_bytes")):
        rows.append([
            f"file bytes ({file.get('name', '.sct')})",
            _num(file.get("dense_file_bytes")),
            _num(file.get("file_bytes")),
            _ratio(file.get("dense_file_bytes"), file.get("file_bytes"), "smaller"),
        ])  # fmt: skip
        if _is_num(file.get("accuracy")) and _is_num(file.get("dense_accuracy")):
            delta = (file["accuracy"] - file["dense_accuracy"]) * 100
            rows.append(["top-1 accuracy, loaded from the file", _pct(file["dense_accuracy"]),
                         _pct(file["accuracy"]), f"{delta:+.2f} pt"])  # fmt: skip
    for key in ("latency", "latency_onnxruntime"):  # PyTorch, then the exported file
        speed = realised.get(key) or {}
        if _is_num(speed.get("dense_ms")) and _is_num(speed.get("pruned_ms")):
            spread = f" ({_num(speed.get('dense_p10_ms'), '.3f')}-{_num(speed.get('dense_p90_ms'), '.3f')})"
            spread_p = f" ({_num(speed.get('pruned_p10_ms'), '.3f')}-{_num(speed.get('pruned_p90_ms'), '.3f')})"
            rows.append([
                f"latency, batch {speed.get('batch', 1)}, {speed.get('how', '')} (ms, median (p10-p90))",
                _num(speed["dense_ms"], ".3f") + spread,
                _num(speed["pruned_ms"], ".3f") + spread_p,
                _ratio(speed["dense_ms"], speed["pruned_ms"], "faster"),
            ])  # fmt: skip
    return rows, [str(w) for w in realised.get("why_not", [])]


def _headline(d: Mapping[str, Any], p: Mapping[str, Any]) -> list[str]:
    rows, skipped = headline_rows(d, p)
    lines = ["| | dense | pruned | change |", "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    lines += [
        "",
        "Ratios are dense / pruned. Bytes in memory compare the dense tensors with the nonzeros",
        "stored as CSR (values plus 4-byte column indices and row pointers). A masked model saved",
        "in a dense format keeps its file size and its latency until channels are removed or",
        "sparse kernels run.",
    ]
    if skipped:
        lines += ["", f"_Not measured: {', '.join(skipped)}._"]
    return lines


def _trajectory_table(trajectory: list[dict[str, Any]]) -> list[str]:
    lines = ["| epoch | step | sparsity | accuracy |", "|---:|---:|---:|---:|"]
    for t in trajectory:
        lines.append(
            f"| {t.get('epoch', '-')} | {t.get('step', '-')} | {_pct(t.get('sparsity'))} | "
            f"{_pct(t.get('accuracy'))} |"
        )
    return lines


def _layer_table(layers: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| layer | kind | shape | params | nonzeros | density | MACs | nonzero MACs "
        "| bytes dense | bytes CSR |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in layers:
        shape = "x".join(map(str, layer.get("shape") or [])) or "-"
        lines.append(
            f"| {_cell(layer.get('name', '?'))} | {_cell(layer.get('kind', '?'))} | {shape} | "
            f"{_num(layer.get('params'))} | {_num(layer.get('nonzeros'))} | "
            f"{_pct(layer.get('density'))} | {_num(layer.get('macs'))} | "
            f"{_num(layer.get('macs_nonzero'))} | {_num(layer.get('bytes_dense'))} | "
            f"{_num(layer.get('bytes_csr'))} |"
        )
    return lines


def _class_table(names: list[str], dense: list[Any], pruned: list[Any]) -> list[str]:
    lines = ["| class | dense | pruned | change |", "|---|---:|---:|---:|"]
    for name, a, b in zip(names, dense, pruned, strict=False):
        change = f"{(b - a) * 100:+.2f} pt" if _is_num(a) and _is_num(b) else "-"
        lines.append(f"| {_cell(name)} | {_pct(a)} | {_pct(b)} | {change} |")
    return lines


def _class_names(r: RunReport, n: int) -> list[str]:
    names = [str(c) for c in r.class_names[:n]]
    return names + [str(i) for i in range(len(names), n)]


def _markdown(r: RunReport, plots: Mapping[str, Path]) -> str:
    d, p = r.dense, r.pruned
    lines = [f"# {r.title}", "", f"**{r.model}** on **{r.dataset}**", "", "## Dense vs pruned", ""]
    lines += _headline(d, p)
    saved, why_not = realised_rows(r.extra)
    if saved or why_not:
        lines += [
            "",
            "## Savings realised",
            "",
            "| | dense | pruned | change |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {' | '.join(row)} |" for row in saved]
        lines += [""] + [f"- {w}" for w in why_not]

    lines += ["", "## Accuracy along the pruning schedule", ""]
    if "accuracy_vs_sparsity" in plots:
        lines += ["![accuracy against sparsity](accuracy_vs_sparsity.png)", ""]
    if r.trajectory:
        if "accuracy_vs_sparsity" not in plots:
            lines += ["_No point of the trajectory has both sparsity and accuracy to plot._", ""]
        lines += _trajectory_table(r.trajectory)
    else:
        lines.append("_No trajectory was recorded._")

    lines += ["", "## Layers of the pruned model", ""]
    if r.layers:
        if "layer_density" in plots:
            lines += ["![per-layer density](layer_density.png)", ""]
        lines += _layer_table(r.layers)
    else:
        lines.append("_No per-layer statistics were recorded._")

    lines += ["", "## Per-class accuracy", ""]
    dc, pc = d.get("per_class_accuracy"), p.get("per_class_accuracy")
    if isinstance(dc, list) and isinstance(pc, list) and dc and pc:
        if "per_class_change" in plots:
            lines += ["![per-class accuracy change](per_class_change.png)", ""]
        lines += _class_table(_class_names(r, len(dc)), dc, pc)
    else:
        lines.append("_Not measured: per-class accuracy needs both the dense and pruned model._")

    if r.config:
        lines += ["", "## Configuration", "", "```json", json.dumps(_jsonable(r.config), indent=2)]
        lines.append("```")
    if r.extra:
        text = json.dumps(_jsonable(r.extra), indent=2)
        lines += ["", "## Other measurements", ""]
        if len(text) <= 4000:
            lines += ["```json", text, "```"]
        else:
            lines.append(f"_{', '.join(map(str, r.extra))}: see `report.json`._")
    if r.versions:
        lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in r.versions.items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writing


def _plots(r: RunReport, out: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    points = [
        (float(t["sparsity"]), float(t["accuracy"]))
        for t in r.trajectory
        if _is_num(t.get("sparsity")) and _is_num(t.get("accuracy"))
    ]
    if points:
        dense = r.dense.get("accuracy")
        path = out / "accuracy_vs_sparsity.png"
        accuracy_vs_sparsity(points, dense if _is_num(dense) else None, r.model, path)
        paths["accuracy_vs_sparsity"] = path
    densities = [
        (str(layer.get("name", "?")), float(layer["density"]), len(layer.get("shape") or []) > 1)
        for layer in r.layers
        if _is_num(layer.get("density"))
    ]
    if densities:
        weights = [(n, v) for n, v, is_weight in densities if is_weight]
        path = out / "layer_density.png"
        layer_density(weights or [(n, v) for n, v, _ in densities], path)
        paths["layer_density"] = path
    dc, pc = r.dense.get("per_class_accuracy"), r.pruned.get("per_class_accuracy")
    if isinstance(dc, list) and isinstance(pc, list) and dc and pc:
        names = _class_names(r, len(dc))
        changes = [
            (name, (b - a) * 100)
            for name, a, b in zip(names, dc, pc, strict=False)
            if _is_num(a) and _is_num(b)
        ]
        if changes:
            path = out / "per_class_change.png"
            per_class_change(changes, path)
            paths["per_class_change"] = path
    return paths


def write_markdown(report: RunReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out_dir``; returns the
    paths by name (``json``, ``markdown`` and the plots that had data) and the report as its
    JSON reads back (plain numbers only)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_dict()
    clean = RunReport.from_dict(data)  # plain numbers only: tensors, NaN and tuples resolved
    paths = _plots(clean, out)
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(_markdown(clean, paths))
    return paths
