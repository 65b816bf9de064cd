"""The report's PNG plots.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), not
through ``pyplot``: no display is needed, no global figure registry fills up, and the user's
own matplotlib backend is left exactly as it was. matplotlib is imported inside the functions,
so ``import secateurs`` does not pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def accuracy_vs_sparsity(
    points: Sequence[tuple[float, float]], dense_accuracy: float | None, model: str, path: Path
) -> Path:
    """Accuracy (%) against sparsity (%) along the schedule, dense accuracy as a dashed line."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    ax.plot([s * 100 for s, _ in points], [a * 100 for _, a in points], "o-", label="pruned")
    if dense_accuracy is not None:
        ax.axhline(dense_accuracy * 100, color="grey", ls="--", label="dense")
    ax.legend()
    ax.set_xlabel("sparsity of pruned tensors (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model}: accuracy along the schedule")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def layer_density(layers: Sequence[tuple[str, float]], path: Path) -> Path:
    """One bar per layer: percentage of nonzero parameters after pruning."""
    n = len(layers)
    fig = _figure(min(max(6.0, 0.35 * n), 24.0), 4.5)
    ax = fig.add_subplot()
    ax.bar(range(n), [d * 100 for _, d in layers])
    fontsize = 8 if n <= 40 else 5
    ax.set_xticks(
        range(n), [name for name, _ in layers], rotation=60, ha="right", fontsize=fontsize
    )
    ax.set_ylim(0, 100)
    ax.set_ylabel("density (% nonzero)")
    ax.set_title("per-layer density after pruning")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def per_class_change(changes: Sequence[tuple[str, float]], path: Path) -> Path:
    """One bar per class: pruned minus dense accuracy, in percentage points."""
    n = len(changes)
    fig = _figure(min(max(6.0, 0.45 * n), 24.0), 4.5)
    ax = fig.add_subplot()
    values = [c for _, c in changes]
    ax.bar(range(n), values, color=["tab:red" if c < 0 else "tab:green" for c in values])
    ax.set_xticks(range(n), [name for name, _ in changes], rotation=45, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("accuracy change vs dense (points)")
    ax.set_title("which classes pay for the pruning")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def sensitivity_curves(history: Mapping[str, Any], ratios: Mapping[str, float], path: Path) -> Path:
    """A sensitivity scan: score against ratio, one line per layer, each layer's chosen ratio
    marked, the unpruned score dashed (``history`` as :class:`~secateurs.SearchResult` holds
    it: ``baseline`` and ``curves`` of ``[ratio, score]`` pairs)."""
    curves: Mapping[str, Sequence[Sequence[float]]] = history.get("curves", {})
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        xs = [r * 100 for r, _ in curve]
        (line,) = ax.plot(xs, [s for _, s in curve], "o-", ms=3, label=name)
        if name in ratios:
            ax.axvline(ratios[name] * 100, color=line.get_color(), ls=":", lw=1)
    if "baseline" in history:
        ax.axhline(history["baseline"], color="grey", ls="--", label="unpruned")
    ax.set_xlabel("ratio removed from this layer alone (%); dotted: chosen ratio")
    ax.set_ylabel("score on the calibration split")
    ax.set_title("sensitivity of each layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1)
    return _save(fig, path)


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes, for embedding in a self-contained page.

    The PNG's ``Software`` text chunk is left out, so the page holds no URL, not even one
    inside an image.
    """
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()
