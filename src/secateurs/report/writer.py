"""The run report: JSON for machines, Markdown with PNG plots for people.

Plots: accuracy against sparsity along the pruning trajectory, per-layer density, and the
per-class accuracy change against the dense model (pruning hurts some classes more than the
average suggests, so the report shows which).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class RunReport:
    """Everything measured in one run, dense next to pruned."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunReport:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _ratio(a: Any, b: Any) -> str:
    return (
        f"{a / b:.2f}x"
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
        else "-"
    )


def _num(v: Any, fmt: str = ",") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def _markdown(r: RunReport, plots: dict[str, Path]) -> str:
    d, p = r.dense, r.pruned
    lines = [
        f"# {r.title}: {r.model} on {r.dataset}",
        "",
        "| | dense | pruned | change |",
        "|---|---:|---:|---:|",
    ]
    if "accuracy" in d and "accuracy" in p:
        lines.append(
            f"| top-1 accuracy | {d['accuracy']:.2%} | {p['accuracy']:.2%} | "
            f"{(p['accuracy'] - d['accuracy']) * 100:+.2f} pt |"
        )
    for key, label in (
        ("nonzeros", "nonzero parameters"),
        ("macs_nonzero", "MACs (nonzero weights)"),
        ("bytes_csr", "bytes as CSR"),
        ("file_bytes", "file bytes (dense format)"),
        ("latency_ms", "latency, batch 1 (ms)"),
        ("latency_batch64_ms", "latency, batch 64 (ms)"),
    ):
        dv = d.get("bytes_dense") if key == "bytes_csr" else d.get(key)
        pv = p.get(key)
        fmt = ".3f" if "latency" in key else ","
        lines.append(f"| {label} | {_num(dv, fmt)} | {_num(pv, fmt)} | {_ratio(dv, pv)} smaller |")
    lines += [
        "",
        "Ratios are dense / pruned. 'bytes as CSR' compares the dense float tensors with the",
        "nonzeros stored in CSR (values + 4-byte indices). A masked model saved in a dense",
        "format keeps its file size and its latency until channels are removed or sparse kernels run.",
        "",
    ]
    if "accuracy_vs_sparsity" in plots:
        lines += ["## Accuracy along the pruning schedule", "", "![](accuracy_vs_sparsity.png)", ""]
    else:
        lines += ["## Accuracy along the pruning schedule", "", "_No trajectory was recorded._", ""]
    if r.trajectory:
        lines += ["| epoch | step | sparsity | accuracy |", "|---:|---:|---:|---:|"]
        for t in r.trajectory:
            acc = f"{t['accuracy']:.2%}" if t.get("accuracy") is not None else "-"
            lines.append(
                f"| {t.get('epoch', '-')} | {t.get('step', '-')} | {t['sparsity']:.2%} | {acc} |"
            )
        lines.append("")
    if r.layers:
        lines += ["## Layers", "", "![](layer_density.png)", ""]
        lines += ["| layer | kind | shape | params | nonzeros | density | MACs | nonzero MACs |"]
        lines += ["|---|---|---|---:|---:|---:|---:|---:|"]
        for layer in r.layers:
            lines.append(
                f"| {layer['name']} | {layer['kind']} | {'x'.join(map(str, layer['shape']))} | "
                f"{layer['params']:,} | {layer['nonzeros']:,} | {layer['density']:.2%} | "
                f"{_num(layer.get('macs'))} | {_num(layer.get('macs_nonzero'))} |"
            )
        lines.append("")
    dc, pc = d.get("per_class_accuracy"), p.get("per_class_accuracy")
    if dc and pc:
        lines += ["## Per-class accuracy", ""]
        if "per_class_change" in plots:
            lines += ["![](per_class_change.png)", ""]
        lines += ["| class | dense | pruned | change |", "|---|---:|---:|---:|"]
        names = r.class_names or [str(i) for i in range(len(dc))]
        for name, a, b in zip(names, dc, pc, strict=False):
            lines.append(f"| {name} | {a:.2%} | {b:.2%} | {(b - a) * 100:+.2f} pt |")
        lines.append("")
    else:
        lines += ["## Per-class accuracy", "", "_Not measured._", ""]
    if r.versions:
        lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in r.versions.items()), ""]
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plots(r: RunReport, out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    points = [t for t in r.trajectory if t.get("accuracy") is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([t["sparsity"] * 100 for t in points], [t["accuracy"] * 100 for t in points], "o-")
        if r.dense.get("accuracy") is not None:
            ax.axhline(r.dense["accuracy"] * 100, color="grey", ls="--", label="dense")
            ax.legend()
        ax.set_xlabel("sparsity of pruned tensors (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{r.model}: accuracy along the schedule")
        ax.grid(alpha=0.3)
        paths["accuracy_vs_sparsity"] = _save(fig, out_dir / "accuracy_vs_sparsity.png")
    if r.layers:
        fig, ax = plt.subplots(figsize=(max(6, len(r.layers) * 0.5), 4))
        ax.bar(range(len(r.layers)), [layer["density"] * 100 for layer in r.layers])
        ax.set_xticks(
            range(len(r.layers)), [layer["name"] for layer in r.layers], rotation=60, ha="right"
        )
        ax.set_ylabel("density (% nonzero)")
        ax.set_title("per-layer density after pruning")
        paths["layer_density"] = _save(fig, out_dir / "layer_density.png")
    dc, pc = r.dense.get("per_class_accuracy"), r.pruned.get("per_class_accuracy")
    if dc and pc:
        names = r.class_names or [str(i) for i in range(len(dc))]
        change = [(b - a) * 100 for a, b in zip(dc, pc, strict=False)]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(
            range(len(change)), change, color=["tab:red" if c < 0 else "tab:green" for c in change]
        )
        ax.set_xticks(range(len(change)), names[: len(change)], rotation=45, ha="right")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("accuracy change vs dense (points)")
        ax.set_title("which classes pay for the pruning")
        paths["per_class_change"] = _save(fig, out_dir / "per_class_change.png")
    return paths


def write_report(report: RunReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots; return their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = _plots(report, out)
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, default=str))
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(_markdown(report, paths))
    return paths
