"""The benchmark report: one self-contained HTML page and its numbers as JSON.

``secateurs bench`` writes one JSON Lines record per run (the contract is
``secateurs.bench/1``: a dense reference and pruned points for each model, data set and
seed). This module turns those records into what a reader needs to choose a method and a
budget: for every (model, data set, method, budget) the mean and sample standard deviation
over seeds of top-1 accuracy, the accuracy change against the dense model of the same seed,
compression, bytes on disk, effective MACs, measured latency and speedup, and the time spent
pruning and fine-tuning; which classes pay for the pruning; how robust the pruned model
stays under corruptions; and how dense each layer was left.

The page (``report.html``) needs nothing but a browser: inline CSS, the plots as PNGs in
``data:`` URIs, no JavaScript and no URL to fetch, so it can be mailed or archived as one
file. Each plot is an ``<img>`` in a ``<figure>`` with an ``id`` and a ``<figcaption>``; a plot
with no data to draw keeps its figure and says "not measured" instead. ``report.json`` holds
the same aggregated numbers (accuracies and changes as fractions, like the records).

Failed runs are listed with the last line of their traceback and count in no number. A null
field never stops the report: the plot or the table cell says "not measured".
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secateurs.errors import DataError
from secateurs.report.html import escape as _e
from secateurs.report.html import figure, page
from secateurs.report.plots import _figure, png_bytes
from secateurs.report.writer import _jsonable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The record schema this report reads (the same tag as ``secateurs.bench.records.SCHEMA``;
#: repeated here so that the report does not import the harness).
SCHEMA = "secateurs.bench/1"

#: The schema tag of ``report.json``.
REPORT_SCHEMA = "secateurs.bench-report/1"

#: The method name of the dense reference record of each (model, dataset, seed).
DENSE = "dense"

#: What a plot or a table cell says when no record measured its value.
NOT_MEASURED = "not measured"

Stat = dict[str, Any]  # {"mean": float | None, "sd": float | None, "n": int}


# --------------------------------------------------------------------------- numbers


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None for null, NaN, booleans and anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _stat(values: Iterable[Any]) -> Stat:
    """Mean and sample standard deviation of the measured ``values`` (None skipped).

    With one value ``sd`` is None: one seed says nothing about the spread, and the page shows
    ``n=1`` rather than a misleading ``± 0``.
    """
    xs = [x for x in (_num(v) for v in values) if x is not None]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": statistics.fmean(xs),
        "sd": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
    }


def _ratio(numerator: Any, denominator: Any) -> float | None:
    a, b = _num(numerator), _num(denominator)
    return a / b if a is not None and b is not None and a > 0 and b > 0 else None


def _diff(pruned: Any, dense: Any) -> float | None:
    a, b = _num(pruned), _num(dense)
    return a - b if a is not None and b is not None else None


def _severity_order(severity: str) -> tuple[int, float, str]:
    """Severities in numeric order ("2" before "10"), any non-numeric ones after, by name."""
    try:
        value = _num(float(severity))
    except ValueError:
        value = None
    return (0, value, "") if value is not None else (1, 0.0, severity)


def _last_line(text: Any) -> str:
    lines = [line for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no error text)"


# --------------------------------------------------------------------------- input


def check_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records as a list, after checking each is a mapping with schema :data:`SCHEMA`.

    Raises :class:`~secateurs.errors.DataError` naming the first record of another schema:
    numbers written under another contract may mean something else, so they are refused
    rather than guessed at. Other fields are not checked here; missing ones read as null.
    """
    checked: list[Mapping[str, Any]] = []
    for index, record in enumerate(records, start=1):
        if not isinstance(record, Mapping):
            raise DataError(
                f"bench record {index} is a {type(record).__name__}, not a mapping; pass the "
                "records of a results.jsonl file written by `secateurs bench`"
            )
        schema = record.get("schema")
        if schema != SCHEMA:
            raise DataError(
                f"bench record {index} ({record.get('key', 'no key')}) has schema {schema!r}, "
                f"not {SCHEMA!r}; this report reads only {SCHEMA} records. Re-run the grid "
                "with this version of secateurs, or report it with the version that wrote it."
            )
        checked.append(record)
    return checked


def load_bench_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl`` file, each checked by :func:`check_records`.

    A light reader for the report alone (blank lines skipped); the harness has its own
    stricter one. Raises :class:`~secateurs.errors.DataError` naming the file and line of a
    line that is not a JSON object or of a record of another schema.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"results file {str(p)!r} does not exist")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}, line {number}: not a JSON record ({exc.msg})") from None
        if not isinstance(value, dict):
            raise DataError(f"{p}, line {number}: a record must be a JSON object")
        try:
            check_records([value])
        except DataError as exc:
            raise DataError(f"{p}, line {number}: {exc}") from None
        records.append(value)
    return records


def _label(record: Mapping[str, Any]) -> str:
    label = record.get("budget_label")
    if isinstance(label, str) and label:
        return label
    budget = record.get("budget")
    if isinstance(budget, Mapping) and "kind" in budget and _num(budget.get("value")) is not None:
        return f"{budget['kind']}={budget['value']:g}"
    return DENSE if record.get("method") == DENSE else "?"


def _ident(record: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (
        str(record.get("model") or "?"),
        str(record.get("dataset") or "?"),
        str(record.get("method") or "?"),
        _label(record),
    )


# --------------------------------------------------------------------------- aggregation


def _dicts(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _lists(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _per_class(ok: Sequence[Mapping[str, Any]], dense_of: Any) -> list[dict[str, Any]]:
    """Per class: pruned accuracy and its change against the dense model, over seeds."""
    accuracy: dict[int, list[float | None]] = {}
    change: dict[int, list[float | None]] = {}
    names: dict[int, str] = {}
    for r in ok:
        pruned = _lists(r.get("per_class_accuracy"))
        dense_rec = dense_of(r)
        dense = _lists(dense_rec.get("per_class_accuracy")) if dense_rec is not None else []
        for source in (r, dense_rec or {}):
            for i, name in enumerate(_lists(source.get("class_names"))):
                names.setdefault(i, str(name))
        for i, value in enumerate(pruned):
            accuracy.setdefault(i, []).append(_num(value))
            if len(dense) == len(pruned):
                change.setdefault(i, []).append(_diff(value, dense[i]))
    return [
        {
            "class": names.get(i, str(i)),
            "accuracy": _stat(accuracy[i]),
            "change": _stat(change.get(i, [])),
        }
        for i in sorted(accuracy)
    ]


def _robustness(ok: Sequence[Mapping[str, Any]], dense_of: Any) -> dict[str, Any]:
    """Per corruption and severity: accuracy and its change against the dense model."""
    accuracy: dict[str, dict[str, list[float | None]]] = {}
    change: dict[str, dict[str, list[float | None]]] = {}
    for r in ok:
        dense_rec = dense_of(r)
        dense = _dicts(dense_rec.get("robustness")) if dense_rec is not None else {}
        for corruption, severities in _dicts(r.get("robustness")).items():
            for severity, value in _dicts(severities).items():
                c, s = str(corruption), str(severity)
                accuracy.setdefault(c, {}).setdefault(s, []).append(_num(value))
                reference = _dicts(dense.get(corruption)).get(severity)
                change.setdefault(c, {}).setdefault(s, []).append(_diff(value, reference))
    return {
        c: {
            s: {"accuracy": _stat(accuracy[c][s]), "change": _stat(change[c][s])}
            for s in sorted(accuracy[c], key=_severity_order)
        }
        for c in accuracy
    }


def _layer_density(ok: Sequence[Mapping[str, Any]]) -> dict[str, Stat]:
    values: dict[str, list[float | None]] = {}
    for r in ok:
        for layer, density in _dicts(r.get("layer_density")).items():
            values.setdefault(str(layer), []).append(_num(density))
    return {layer: _stat(v) for layer, v in values.items()}


def aggregate_bench(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report's numbers: one row per (model, dataset, method, budget_label), failed runs.

    Each row holds ``n`` (finished seeds), ``seeds``, ``failed`` (failed runs of that point)
    and, as ``{"mean", "sd", "n"}`` over seeds (sample sd; None with fewer than two values):
    ``accuracy``, ``accuracy_change`` (pruned minus dense of the same seed; negative is a
    loss), ``compression``, ``file_bytes``, ``disk_ratio`` (dense file bytes / these),
    ``macs_effective``, ``macs_ratio`` (dense effective MACs / these), ``latency_ms``,
    ``speedup`` (dense latency / this latency, same seed and batch), ``prune_seconds``,
    ``finetune_seconds``; ``per_class`` (accuracy and change per class), ``robustness``
    (accuracy and change per corruption and severity) and ``layer_density`` (per layer).
    Records whose status is not ``"ok"`` count in no number; they are listed under ``failed``
    with the last line of their error. Raises :class:`~secateurs.errors.DataError` for a
    record of another schema.
    """
    checked = check_records(records)
    ok_records = [r for r in checked if r.get("status") == "ok"]
    dense_by_seed: dict[tuple[str, str, Any], Mapping[str, Any]] = {}
    for r in ok_records:
        model, dataset, method, _ = _ident(r)
        if method == DENSE:
            dense_by_seed.setdefault((model, dataset, r.get("seed")), r)

    def dense_of(r: Mapping[str, Any]) -> Mapping[str, Any] | None:
        model, dataset, _, _ = _ident(r)
        return dense_by_seed.get((model, dataset, r.get("seed")))

    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    failed_count: dict[tuple[str, str, str, str], int] = {}
    failed: list[dict[str, Any]] = []
    for r in checked:
        ident = _ident(r)
        groups.setdefault(ident, [])
        if r.get("status") == "ok":
            groups[ident].append(r)
        else:
            failed_count[ident] = failed_count.get(ident, 0) + 1
            failed.append(
                {
                    "key": str(r.get("key") or "|".join(map(str, (*ident, r.get("seed"))))),
                    "model": ident[0],
                    "dataset": ident[1],
                    "method": ident[2],
                    "budget_label": ident[3],
                    "seed": r.get("seed"),
                    "status": str(r.get("status")),
                    "error": _last_line(r.get("error")),
                }
            )

    rows: list[dict[str, Any]] = []
    for (model, dataset, method, label), ok in groups.items():
        budget = next((r.get("budget") for r in ok if isinstance(r.get("budget"), Mapping)), None)
        pairs = [(r, dense_of(r)) for r in ok]

        def paired(
            fn: Any, key: str, pairs: list[tuple[Mapping[str, Any], Any]] = pairs
        ) -> list[float | None]:
            return [fn(r.get(key), d.get(key)) if d is not None else None for r, d in pairs]

        speedups = [
            _ratio(d.get("latency_ms"), r.get("latency_ms"))
            if d is not None and d.get("latency_batch") == r.get("latency_batch")
            else None
            for r, d in pairs
        ]
        batches = sorted({b for r in ok if (b := r.get("latency_batch")) is not None}, key=str)
        row: dict[str, Any] = {
            "model": model,
            "dataset": dataset,
            "method": method,
            "budget_label": label,
            "budget": dict(budget) if isinstance(budget, Mapping) else None,
            "n": len(ok),
            "seeds": sorted((r.get("seed") for r in ok), key=str),
            "failed": failed_count.get((model, dataset, method, label), 0),
            "accuracy": _stat(r.get("accuracy") for r in ok),
            "accuracy_change": _stat(paired(_diff, "accuracy")),
            "compression": _stat(r.get("compression") for r in ok),
            "file_bytes": _stat(r.get("file_bytes") for r in ok),
            "disk_ratio": _stat(paired(lambda p, d: _ratio(d, p), "file_bytes")),
            "macs_effective": _stat(r.get("macs_effective") for r in ok),
            "macs_ratio": _stat(paired(lambda p, d: _ratio(d, p), "macs_effective")),
            "latency_ms": _stat(r.get("latency_ms") for r in ok),
            "latency_batch": batches,
            "speedup": _stat(speedups),
            "prune_seconds": _stat(r.get("prune_seconds") for r in ok),
            "finetune_seconds": _stat(r.get("finetune_seconds") for r in ok),
            "per_class": _per_class(ok, dense_of),
            "robustness": _robustness(ok, dense_of),
            "layer_density": _layer_density(ok),
        }
        rows.append(row)

    versions: dict[str, list[str]] = {}
    for r in checked:
        for name, version in _dicts(r.get("versions")).items():
            seen = versions.setdefault(str(name), [])
            if str(version) not in seen:
                seen.append(str(version))
    return {
        "schema": REPORT_SCHEMA,
        "source_schema": SCHEMA,
        "runs": len(checked),
        "ok": len(ok_records),
        "failed_runs": len(failed),
        "grids": sorted({str(r.get("grid")) for r in checked if r.get("grid")}),
        "groups": rows,
        "failed": failed,
        "versions": versions,
    }


# --------------------------------------------------------------------------- plots


@dataclass
class _Plot:
    """One figure of the page: its id, caption and PNG (None when there is nothing to draw)."""

    id: str
    caption: str
    png: bytes | None
    why: str = NOT_MEASURED


def _row_name(row: Mapping[str, Any]) -> str:
    return f"{row['method']} @ {row['budget_label']} (n={row['n']})"


def _mean(stat: Mapping[str, Any]) -> float | None:
    return _num(stat.get("mean"))


def _sd(stat: Mapping[str, Any]) -> float:
    return _num(stat.get("sd")) or 0.0


def _methods(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["method"] != DENSE and row["n"] > 0:
            by_method.setdefault(row["method"], []).append(row)
    return by_method


def _budget_order(row: Mapping[str, Any]) -> tuple[float, float, str]:
    compression = _mean(row["compression"])
    budget = row.get("budget") or {}
    value = _num(budget.get("value")) if isinstance(budget, Mapping) else None
    return (
        compression if compression is not None else math.inf,
        value if value is not None else math.inf,
        str(row["budget_label"]),
    )


def _colors(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _dense_band(ax: Any, dense: Mapping[str, Any] | None, key: str, scale: float) -> None:
    """The dense model's mean as a dashed line, its ± sd as a shaded band."""
    if dense is None or _mean(dense[key]) is None:
        return
    mean, sd = (_mean(dense[key]) or 0.0) * scale, _sd(dense[key]) * scale
    ax.axhline(mean, color="grey", ls="--", lw=1, label=f"dense (n={dense['n']})")
    if sd > 0:
        ax.axhspan(mean - sd, mean + sd, color="grey", alpha=0.15, lw=0)


def _plot_accuracy_vs(
    rows: Sequence[Mapping[str, Any]],
    dense: Mapping[str, Any] | None,
    x_key: str,
    x_label: str,
    title: str,
) -> bytes | None:
    """Accuracy (%) against ``x_key``, one line per method through its budgets, error bars
    of one sd over seeds on both axes, the dense model as a dashed line (or a star)."""
    by_method = _methods(rows)
    series = {
        method: [r for r in sorted(group, key=_budget_order) if _mean(r[x_key]) is not None]
        for method, group in by_method.items()
    }
    series = {m: [r for r in s if _mean(r["accuracy"]) is not None] for m, s in series.items()}
    series = {m: s for m, s in series.items() if s}
    if not series:
        return None
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    colors = _colors(series)
    xs_all: list[float] = []
    for method, points in series.items():
        xs = [_mean(r[x_key]) or 0.0 for r in points]
        xs_all += xs
        ax.errorbar(
            xs,
            [(_mean(r["accuracy"]) or 0.0) * 100 for r in points],
            yerr=[_sd(r["accuracy"]) * 100 for r in points],
            xerr=[_sd(r[x_key]) for r in points],
            fmt="o-",
            ms=4,
            capsize=3,
            color=colors[method],
            label=method,
        )
    if x_key == "compression":
        _dense_band(ax, dense, "accuracy", 100)
        if max(xs_all) / max(min(xs_all), 1e-12) > 4:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    elif dense is not None:
        dense_x, dense_y = _mean(dense[x_key]), _mean(dense["accuracy"])
        if dense_x is not None and dense_y is not None:
            ax.errorbar(
                [dense_x],
                [dense_y * 100],
                yerr=[_sd(dense["accuracy"]) * 100],
                xerr=[_sd(dense[x_key])],
                fmt="*",
                ms=12,
                capsize=3,
                color="black",
                label=f"dense (n={dense['n']})",
            )
    ax.set_xlabel(x_label)
    ax.set_ylabel("top-1 test accuracy (%), mean ± sd")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _heatmap(
    fig: Figure,
    matrix: list[list[float | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    cmap: str,
    vmin: float,
    vmax: float,
    bar_label: str,
    fmt: str,
) -> None:
    """A labelled heatmap; missing cells grey, values written in when there is room."""
    import numpy as np
    from matplotlib import colormaps

    data = np.ma.masked_invalid(
        np.array([[math.nan if v is None else v for v in row] for row in matrix], dtype=float)
    )
    colormap = colormaps[cmap].with_extremes(bad="lightgrey")
    ax = fig.add_subplot()
    image = ax.imshow(data, cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    small = len(col_labels) <= 40
    ax.set_xticks(
        range(len(col_labels)), col_labels, rotation=60, ha="right", fontsize=8 if small else 5
    )
    if len(row_labels) * len(col_labels) <= 240:
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value is not None:
                    shade = (value - vmin) / (vmax - vmin) if vmax > vmin else 0.5
                    dark = shade < 0.2 or shade > 0.8 if cmap == "RdBu" else shade < 0.45
                    color = "white" if dark else "black"
                    ax.text(
                        j, i, format(value, fmt), ha="center", va="center", fontsize=6, color=color
                    )
    fig.colorbar(image, ax=ax, label=bar_label, shrink=0.9)


def _plot_per_class(rows: Sequence[Mapping[str, Any]], title: str) -> bytes | None:
    """Rows: method @ budget; columns: classes; colour: accuracy change vs dense (points)."""
    pruned = [r for r in rows if r["method"] != DENSE and r["n"] > 0]
    pruned = [r for r in pruned if any(_mean(c["change"]) is not None for c in r["per_class"])]
    if not pruned:
        return None
    n_classes = max(len(r["per_class"]) for r in pruned)
    names = [str(i) for i in range(n_classes)]
    for r in pruned:
        for i, c in enumerate(r["per_class"]):
            names[i] = c["class"]
    matrix: list[list[float | None]] = []
    for r in pruned:
        values: list[float | None] = [None] * n_classes
        for i, c in enumerate(r["per_class"]):
            mean = _mean(c["change"])
            values[i] = None if mean is None else mean * 100
        matrix.append(values)
    extreme = max((abs(v) for row in matrix for v in row if v is not None), default=1.0) or 1.0
    fig = _figure(min(max(6.0, 0.55 * n_classes + 3), 24.0), min(2.0 + 0.35 * len(pruned), 16.0))
    _heatmap(
        fig,
        matrix,
        [_row_name(r) for r in pruned],
        names,
        "RdBu",
        -extreme,
        extreme,
        "accuracy change vs dense (points)",
        ".1f",
    )
    fig.axes[0].set_title(title)
    return png_bytes(fig)


def _plot_robustness(
    rows: Sequence[Mapping[str, Any]], dense: Mapping[str, Any] | None, title: str
) -> bytes | None:
    """One panel per corruption: accuracy change vs dense (points) against severity, one
    curve per method at each budget (colour: method; marker: budget), error bars of one sd."""
    pruned = [r for r in rows if r["method"] != DENSE and r["n"] > 0 and r["robustness"]]
    corruptions: list[str] = []
    for r in pruned:
        corruptions += [c for c in r["robustness"] if c not in corruptions]
    has_change = any(
        _mean(v["change"]) is not None
        for r in pruned
        for sev in r["robustness"].values()
        for v in sev.values()
    )
    if not corruptions or not has_change:
        return None
    cols = min(3, len(corruptions))
    nrows = math.ceil(len(corruptions) / cols)
    fig = _figure(4.2 * cols + 1.5, 3.2 * nrows + 0.6)
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    colors = _colors(_methods(pruned))
    markers = "os^Dvp*hX<>"
    budget_index: dict[str, dict[str, int]] = {}
    for r in sorted(pruned, key=_budget_order):
        labels = budget_index.setdefault(r["method"], {})
        labels.setdefault(r["budget_label"], len(labels))
    for k, corruption in enumerate(corruptions):
        ax = axes[k // cols][k % cols]
        levels = sorted(
            {s for r in pruned for s in r["robustness"].get(corruption, {})}, key=_severity_order
        )
        position = {s: i for i, s in enumerate(levels)}
        for r in pruned:
            severities = r["robustness"].get(corruption, {})
            points = [(s, v) for s, v in severities.items() if _mean(v["change"]) is not None]
            if not points:
                continue
            ax.errorbar(
                [position[s] for s, _ in points],
                [(_mean(v["change"]) or 0.0) * 100 for _, v in points],
                yerr=[_sd(v["change"]) * 100 for _, v in points],
                fmt="-",
                marker=markers[budget_index[r["method"]][r["budget_label"]] % len(markers)],
                ms=4,
                capsize=2,
                color=colors[r["method"]],
                label=f"{r['method']} @ {r['budget_label']}",
            )
        ax.axhline(0, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(levels)), levels)
        ax.set_title(corruption, fontsize=10)
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
        if k % cols == 0:
            ax.set_ylabel("accuracy change vs dense (points)")
    for k in range(len(corruptions), nrows * cols):
        axes[k // cols][k % cols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat[1:]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle(title)
    return png_bytes(fig)


def _plot_layer_density(rows: Sequence[Mapping[str, Any]], title: str) -> bytes | None:
    """Rows: method @ budget; columns: layers; colour: fraction of weights kept (mean)."""
    pruned = [r for r in rows if r["method"] != DENSE and r["n"] > 0 and r["layer_density"]]
    layers: list[str] = []
    for r in pruned:
        layers += [name for name in r["layer_density"] if name not in layers]
    if not layers:
        return None
    matrix: list[list[float | None]] = [
        [_mean(r["layer_density"][name]) if name in r["layer_density"] else None for name in layers]
        for r in pruned
    ]
    if all(v is None for row in matrix for v in row):
        return None
    fig = _figure(min(max(6.0, 0.4 * len(layers) + 3), 24.0), min(2.2 + 0.35 * len(pruned), 16.0))
    _heatmap(
        fig,
        matrix,
        [_row_name(r) for r in pruned],
        layers,
        "viridis",
        0.0,
        1.0,
        "density (fraction of weights kept)",
        ".2f",
    )
    fig.axes[0].set_title(title)
    return png_bytes(fig)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _plots(model: str, dataset: str, rows: Sequence[Mapping[str, Any]], prefix: str) -> list[_Plot]:
    dense = next((r for r in rows if r["method"] == DENSE and r["n"] > 0), None)
    where = f"{model} on {dataset}"
    batches = sorted({str(b) for r in rows for b in r["latency_batch"]})
    batch = f", batch {'/'.join(batches)}" if batches else ""
    return [
        _Plot(
            f"{prefix}-accuracy-vs-compression",
            f"{where}: top-1 accuracy against compression (dense parameters / nonzeros), one "
            "line per method through its budgets; error bars and the grey band are ± one "
            "sample sd over seeds.",
            _plot_accuracy_vs(
                rows, dense, "compression", "compression (x, dense params / nonzeros)", where
            ),
        ),
        _Plot(
            f"{prefix}-accuracy-vs-latency",
            f"{where}: top-1 accuracy against measured median latency{batch}; the star is the "
            "dense model; error bars are ± one sd over seeds.",
            _plot_accuracy_vs(rows, dense, "latency_ms", f"median latency (ms{batch})", where),
        ),
        _Plot(
            f"{prefix}-per-class-change",
            f"{where}: per-class accuracy change against the dense model of the same seed "
            "(points, mean over seeds); red classes pay for the pruning.",
            _plot_per_class(rows, f"{where}: which classes pay"),
        ),
        _Plot(
            f"{prefix}-robustness",
            f"{where}: accuracy change against the dense model under each corruption and "
            "severity (points, same test subset), one curve per method and budget; error bars "
            "± one sd over seeds.",
            _plot_robustness(rows, dense, f"{where}: robustness"),
        ),
        _Plot(
            f"{prefix}-layer-density",
            f"{where}: fraction of weights kept per layer (mean over seeds), one row per method "
            "and budget.",
            _plot_layer_density(rows, f"{where}: per-layer density"),
        ),
    ]


# --------------------------------------------------------------------------- HTML

_NM = f'<span class="nm">{NOT_MEASURED}</span>'


def _stat_cell(stat: Mapping[str, Any], fmt: str, scale: float = 1.0, sign: bool = False) -> str:
    """``mean ± sd`` of a stat, ``mean n=1`` for one seed, "not measured" for none."""
    mean = _mean(stat)
    if mean is None:
        return f"<td>{_NM}</td>"
    spec = ("+" if sign else "") + fmt
    text = format(mean * scale, spec)
    sd = _num(stat.get("sd"))
    if sd is not None:
        text += " ± " + format(sd * scale, fmt)
    else:
        text += f' <span class="n1">n={stat.get("n", 1)}</span>'
    return f"<td>{text}</td>"


def _figure_html(plot: _Plot) -> str:
    why = f"{plot.why}: no record has the numbers for this plot."
    return figure(plot.id, plot.caption, plot.png, why)


#: Summary table columns: (header, row key, format, scale, signed).
_COLUMNS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("top-1 accuracy (%)", "accuracy", ".2f", 100.0, False),
    ("change vs dense (points)", "accuracy_change", ".2f", 100.0, True),
    ("compression (x)", "compression", ".2f", 1.0, False),
    ("file bytes", "file_bytes", ",.0f", 1.0, False),
    ("smaller on disk (x)", "disk_ratio", ".2f", 1.0, False),
    ("effective MACs", "macs_effective", ",.0f", 1.0, False),
    ("fewer MACs (x)", "macs_ratio", ".2f", 1.0, False),
    ("latency (ms)", "latency_ms", ".3f", 1.0, False),
    ("speedup (x)", "speedup", ".2f", 1.0, False),
    ("prune (s)", "prune_seconds", ".1f", 1.0, False),
    ("fine-tune (s)", "finetune_seconds", ".1f", 1.0, False),
)


def _summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h, *_ in _COLUMNS)
    out = [
        '<div class="scroll"><table class="summary">',
        f'<tr><th class="l">method</th><th class="l">budget</th><th>seeds</th><th>failed</th>'
        f"<th>latency batch</th>{head}</tr>",
    ]
    for r in rows:
        cells = "".join(
            _stat_cell(r[key], fmt, scale, sign) for _, key, fmt, scale, sign in _COLUMNS
        )
        batch = "/".join(map(str, r["latency_batch"])) or _NM
        out.append(
            f'<tr><td class="l">{_e(r["method"])}</td><td class="l">{_e(r["budget_label"])}</td>'
            f"<td>{r['n']}</td><td>{r['failed']}</td><td>{batch}</td>{cells}</tr>"
        )
    out.append("</table></div>")
    return "\n".join(out)


def _per_class_table(rows: Sequence[Mapping[str, Any]]) -> str:
    with_classes = [r for r in rows if r["per_class"]]
    if not with_classes:
        return f"<p>{_NM}: no record has per-class accuracy.</p>"
    classes: list[str] = []
    for r in with_classes:
        classes += [c["class"] for c in r["per_class"] if c["class"] not in classes]
    out = [
        '<div class="scroll"><table>',
        '<tr><th class="l">method @ budget</th>'
        + "".join(f"<th>{_e(c)}<br>acc. (%)</th><th>{_e(c)}<br>change (pt)</th>" for c in classes)
        + "</tr>",
    ]
    for r in with_classes:
        by_name = {c["class"]: c for c in r["per_class"]}
        cells = []
        for name in classes:
            c = by_name.get(name)
            if c is None:
                cells.append(f"<td>{_NM}</td><td>{_NM}</td>")
            else:
                cells.append(_stat_cell(c["accuracy"], ".1f", 100.0))
                cells.append(_stat_cell(c["change"], ".1f", 100.0, sign=True))
        out.append(f'<tr><td class="l">{_e(_row_name(r))}</td>{"".join(cells)}</tr>')
    out.append("</table></div>")
    return "\n".join(out)


def _robustness_table(rows: Sequence[Mapping[str, Any]]) -> str:
    with_rob = [r for r in rows if r["robustness"]]
    if not with_rob:
        return f"<p>{_NM}: no record has robustness accuracies.</p>"
    out = [
        '<div class="scroll"><table>',
        '<tr><th class="l">method @ budget</th><th class="l">corruption</th><th>severity</th>'
        "<th>accuracy (%)</th><th>change vs dense (points)</th></tr>",
    ]
    for r in with_rob:
        for corruption, severities in r["robustness"].items():
            for severity, v in severities.items():
                out.append(
                    f'<tr><td class="l">{_e(_row_name(r))}</td><td class="l">{_e(corruption)}</td>'
                    f"<td>{_e(severity)}</td>{_stat_cell(v['accuracy'], '.2f', 100.0)}"
                    f"{_stat_cell(v['change'], '.2f', 100.0, sign=True)}</tr>"
                )
    out.append("</table></div>")
    return "\n".join(out)


def _density_table(rows: Sequence[Mapping[str, Any]]) -> str:
    with_layers = [r for r in rows if r["layer_density"]]
    if not with_layers:
        return f"<p>{_NM}: no record has per-layer density.</p>"
    layers: list[str] = []
    for r in with_layers:
        layers += [name for name in r["layer_density"] if name not in layers]
    out = [
        '<div class="scroll"><table>',
        '<tr><th class="l">layer</th>'
        + "".join(f"<th>{_e(_row_name(r))}</th>" for r in with_layers)
        + "</tr>",
    ]
    for name in layers:
        cells = "".join(
            _stat_cell(r["layer_density"][name], ".3f")
            if name in r["layer_density"]
            else f"<td>{_NM}</td>"
            for r in with_layers
        )
        out.append(f'<tr><td class="l">{_e(name)}</td>{cells}</tr>')
    out.append("</table></div>")
    return "\n".join(out)


#: Per-run table columns: (header, record key, format).
_RUN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("accuracy", "accuracy", ".4f"),
    ("loss", "loss", ".4f"),
    ("compression (x)", "compression", ".2f"),
    ("params", "params", ",d"),
    ("nonzeros", "nonzeros", ",d"),
    ("file bytes", "file_bytes", ",d"),
    ("dense MACs", "macs_dense", ",d"),
    ("effective MACs", "macs_effective", ",d"),
    ("latency (ms)", "latency_ms", ".3f"),
    ("latency batch", "latency_batch", "d"),
    ("prune (s)", "prune_seconds", ".1f"),
    ("fine-tune (s)", "finetune_seconds", ".1f"),
)


def _run_cell(value: Any, fmt: str) -> str:
    number = _num(value)
    if number is None:
        return f"<td>{_NM}</td>"
    if fmt.endswith("d"):
        if not float(number).is_integer():
            return f"<td>{_e(value)}</td>"
        return f"<td>{format(int(number), fmt)}</td>"
    return f"<td>{format(number, fmt)}</td>"


def _runs_table(records: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h, *_ in _RUN_COLUMNS)
    out = [
        '<div class="scroll"><table>',
        f'<tr><th class="l">key</th><th class="l">status</th>{head}<th class="l">time</th></tr>',
    ]
    for r in records:
        cells = "".join(_run_cell(r.get(key), fmt) for _, key, fmt in _RUN_COLUMNS)
        out.append(
            f'<tr><td class="l">{_e(r.get("key") or "|".join(_ident(r)))}</td>'
            f'<td class="l">{_e(r.get("status"))}</td>{cells}'
            f'<td class="l">{_e(r.get("timestamp") or "")}</td></tr>'
        )
    out.append("</table></div>")
    return "\n".join(out)


def _failed_section(failed: Sequence[Mapping[str, Any]]) -> str:
    out = ['<section id="failed-runs"><h2>Failed runs</h2>']
    if not failed:
        out.append("<p>None: every run finished.</p></section>")
        return "\n".join(out)
    out += [
        f"<p>{len(failed)} run(s) failed. They count in no number above; the full tracebacks "
        "are in the results file.</p>",
        '<div class="scroll"><table>',
        '<tr><th class="l">key</th><th class="l">status</th><th class="l">error (last line)</th></tr>',
    ]
    for f in failed:
        out.append(
            f'<tr><td class="l">{_e(f["key"])}</td><td class="l">{_e(f["status"])}</td>'
            f'<td class="l"><code>{_e(f["error"])}</code></td></tr>'
        )
    out.append("</table></div></section>")
    return "\n".join(out)


def _html(
    title: str,
    data: Mapping[str, Any],
    sections: Sequence[tuple[str, str, str, Sequence[Mapping[str, Any]], Sequence[_Plot]]],
    records: Sequence[Mapping[str, Any]],
) -> str:
    seeds = sorted({str(s) for r in data["groups"] for s in r["seeds"]})
    parts = [
        f"<p>{data['runs']} run(s): {data['ok']} finished, {data['failed_runs']} failed; "
        f"seeds {_e(', '.join(seeds) or 'none')}. Every number is the mean ± the sample "
        "standard deviation over seeds (<span class='n1'>n=1</span> where only one seed "
        "finished, so no spread can be given). Changes are pruned minus the dense model of the "
        "same model, data set and seed: negative points are accuracy lost. Ratios are dense / "
        f"pruned, so above 1 is smaller or faster. <span class='nm'>{NOT_MEASURED}</span> "
        "marks a value no record measured.</p>",
    ]
    if sections:
        parts.append("<nav><ul>")
        parts += [
            f'<li><a href="#{_e(sid)}">{_e(m)} on {_e(d)}</a></li>' for sid, m, d, *_ in sections
        ]
        parts.append('<li><a href="#failed-runs">failed runs</a></li>')
        parts.append('<li><a href="#all-runs">every run</a></li></ul></nav>')
    else:
        parts.append("<p>No finished run to report.</p>")
    for sid, model, dataset, rows, plots in sections:
        parts += [
            f'<section id="{_e(sid)}"><h2>{_e(model)} on {_e(dataset)}</h2>',
            *(_figure_html(p) for p in plots),
            "<h3>Every method and budget</h3>",
            _summary_table(rows),
            "<details><summary>Per-class accuracy and change vs dense</summary>",
            _per_class_table(rows),
            "</details>",
            "<details><summary>Robustness: accuracy per corruption and severity</summary>",
            _robustness_table(rows),
            "</details>",
            "<details><summary>Per-layer density</summary>",
            _density_table(rows),
            "</details></section>",
        ]
    parts.append(_failed_section(data["failed"]))
    parts += [
        '<section id="all-runs"><h2>Every run</h2><details><summary>One row per record '
        f"({len(records)})</summary>",
        _runs_table(records),
        "</details></section>",
    ]
    if data["versions"]:
        versions = "; ".join(f"{k} {', '.join(v)}" for k, v in data["versions"].items())
        parts.append(f"<footer><p>Versions: {_e(versions)}.</p></footer>")
    return page(title, parts)


def write_bench_report(
    records: Sequence[Mapping[str, Any]], out_dir: str | Path, title: str | None = None
) -> dict[str, Path]:
    """Write ``report.html`` (self-contained, plots embedded) and ``report.json`` to ``out_dir``.

    ``records`` are the ``secateurs.bench/1`` records of a grid (for example from
    :func:`load_bench_records`). Per model and data set the page has five plots (accuracy
    against compression and against measured latency, per-class change, robustness curves,
    per-layer density), a table with every aggregated number, and lists the failed runs;
    ``report.json`` holds :func:`aggregate_bench` plus the figures' ids and captions. Returns
    ``{"html": path, "json": path}``. Raises :class:`~secateurs.errors.DataError` for a record
    of another schema (before anything is written).
    """
    checked = check_records(records)
    data = aggregate_bench(checked)
    if title is None:
        grids = data["grids"]
        title = f"secateurs bench: {', '.join(grids)}" if grids else "secateurs bench report"

    by_panel: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in data["groups"]:
        by_panel.setdefault((row["model"], row["dataset"]), []).append(row)
    sections: list[tuple[str, str, str, list[dict[str, Any]], list[_Plot]]] = []
    used: set[str] = set()
    figures: list[dict[str, Any]] = []
    for (model, dataset), rows in by_panel.items():
        base = sid = f"{_slug(model)}-{_slug(dataset)}"
        k = 2
        while sid in used:
            sid, k = f"{base}-{k}", k + 1
        used.add(sid)
        plots = _plots(model, dataset, rows, f"fig-{sid}")
        sections.append((sid, model, dataset, rows, plots))
        figures += [
            {
                "id": p.id,
                "model": model,
                "dataset": dataset,
                "caption": p.caption,
                "measured": p.png is not None,
            }
            for p in plots
        ]
    data["title"] = title
    data["figures"] = figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "report.html", "json": out / "report.json"}
    paths["json"].write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")
    paths["html"].write_text(_html(title, data, sections, checked), encoding="utf-8")
    return paths
