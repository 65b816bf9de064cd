"""A run's report as one self-contained page (``report.html``), beside ``report.json``.

Built from the same pieces as the benchmark page (:mod:`secateurs.report.html`) and from the
same rows as ``report.md`` (:func:`~secateurs.report.writer.headline_rows`), so the three never
disagree: the dense-vs-pruned table, the savings the run realised (a file on disk, measured
latency) and why a saving did not materialise, accuracy along the schedule, per-layer density,
per-class change, the recipe and the versions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secateurs.errors import ConfigError
from secateurs.report.html import escape, figure, page, table
from secateurs.report.writer import (
    RunReport,
    _class_names,
    _jsonable,
    _num,
    _pct,
    headline_rows,
    realised_rows,
    write_markdown,
)

#: The plots of a run, as written by :func:`write_markdown`, with their captions.
PLOTS = (
    ("accuracy_vs_sparsity", "Accuracy along the pruning schedule (test set)"),
    ("layer_density", "Density of each layer of the pruned model"),
    ("per_class_change", "Change of each class's accuracy against the dense model"),
)


def run_page(report: RunReport, plots: Mapping[str, Path]) -> str:
    """The HTML of ``report`` (``plots``: the PNG files by name)."""
    d, p = report.dense, report.pruned
    rows, skipped = headline_rows(d, p)
    body = [
        f"<p><b>{escape(report.model)}</b> on <b>{escape(report.dataset)}</b>. Ratios are dense /"
        " pruned: above 1 is smaller or faster.</p>",
        "<h2>Dense vs pruned</h2>",
        table(["", "dense", "pruned", "change"], rows, css="big", table_id="headline"),
    ]
    if skipped:
        body.append(f'<p class="nm">Not measured: {escape(", ".join(skipped))}.</p>')
    saved, why_not = realised_rows(report.extra)
    body.append("<h2>Savings realised</h2>")
    if saved:
        body.append(table(["", "dense", "pruned", "change"], saved, css="big", table_id="realised"))
    body += [f'<p class="why">{escape(w)}</p>' for w in why_not]
    if not saved and not why_not:
        body.append('<p class="nm">This run measured no file or latency.</p>')
    for key, caption in PLOTS:
        png = plots[key].read_bytes() if key in plots and plots[key].is_file() else None
        body.append(figure(key.replace("_", "-"), caption, png, "not measured in this run"))
        if key == "accuracy_vs_sparsity" and report.trajectory:
            body.append(_trajectory(report.trajectory))
        if key == "per_class_change":
            body.append(_classes(report))
    if report.layers:
        body += [
            "<details><summary>Layers of the pruned model</summary>",
            _layers(report),
            "</details>",
        ]
    files = report.extra.get("files") or {}
    if files:
        body += ["<h2>Files written</h2>", table(["what", "path"], sorted(files.items()), left=2)]
    if report.config:
        text = json.dumps(_jsonable(report.config), indent=2)
        body += ["<h2>The recipe that produced it</h2>", f"<pre>{escape(text)}</pre>"]
    if report.versions:
        versions = ", ".join(f"{k} {v}" for k, v in report.versions.items())
        body.append(f"<footer><p>Versions: {escape(versions)}.</p></footer>")
    return page(report.title, body)


def _trajectory(points: list[dict[str, Any]]) -> str:
    rows = [
        [
            str(t.get("epoch", "-")),
            str(t.get("step", "-")),
            _pct(t.get("sparsity")),
            _pct(t.get("accuracy")),
        ]
        for t in points
    ]
    return table(["epoch", "step", "sparsity", "accuracy"], rows, left=0, table_id="trajectory")


def _classes(report: RunReport) -> str:
    dc, pc = report.dense.get("per_class_accuracy"), report.pruned.get("per_class_accuracy")
    if not (isinstance(dc, list) and isinstance(pc, list) and dc and pc):
        return ""
    rows = []
    for name, a, b in zip(_class_names(report, len(dc)), dc, pc, strict=False):
        change = (
            f"{(b - a) * 100:+.2f} pt" if isinstance(a, float) and isinstance(b, float) else "-"
        )
        rows.append([name, _pct(a), _pct(b), change])
    return table(["class", "dense", "pruned", "change"], rows, table_id="per-class")


def _layers(report: RunReport) -> str:
    rows = [
        [str(layer.get("name", "?")), str(layer.get("kind", "")), _num(layer.get("params")),
         _num(layer.get("nonzeros")), _pct(layer.get("density"))]
        for layer in report.layers
    ]  # fmt: skip
    return table(
        ["layer", "kind", "params", "nonzeros", "density"], rows, left=2, table_id="layers"
    )


def write_sensitivity_page(result: Mapping[str, Any], plot: Path, out_dir: str | Path) -> Path:
    """``report.html`` of a sensitivity scan (``secateurs sensitivity``): the curves, the
    threshold it found and the ratio map, from ``sensitivity.json``'s ``result``."""
    png = plot.read_bytes() if plot.is_file() else None
    ratios = sorted(dict(result.get("ratios", {})).items())
    body = [
        f"<p>Budget <b>{escape(result.get('budget', '?'))}</b> over "
        f"{escape(result.get('space', '?'))}: {_num(result.get('value'), ',.4g')} "
        f"{escape(result.get('unit', ''))} (allowed {_num(result.get('limit'), ',.4g')}), "
        f"{result.get('evaluations', 0)} evaluations in {_num(result.get('seconds'), '.1f')} s.</p>",
        figure("sensitivity", "Score of each layer pruned alone, against its ratio", png),
        "<h2>The ratio map for the budget</h2>",
        table(
            ["layer", "fraction removed"], [[k, f"{v:.3f}"] for k, v in ratios], table_id="ratios"
        ),
    ]
    path = Path(out_dir) / "report.html"
    path.write_text(page("sensitivity scan", body), encoding="utf-8")
    return path


def write_report(report: RunReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, ``report.html`` and the PNG plots into ``out_dir``.

    Returns the written paths by name: ``json``, ``markdown``, ``html`` and, when there is data
    for them, ``accuracy_vs_sparsity``, ``layer_density`` and ``per_class_change``.
    """
    paths = write_markdown(report, out_dir)
    clean = RunReport.from_dict(json.loads(paths["json"].read_text()))
    paths["html"] = Path(out_dir) / "report.html"
    paths["html"].write_text(run_page(clean, paths), encoding="utf-8")
    return paths


def rebuild_report(run_dir: str | Path) -> dict[str, Path]:
    """Write a run's ``report.md``, ``report.html`` and plots again from its ``report.json``
    (``secateurs report``). A directory without one, or a report of a newer format, is a
    :class:`~secateurs.ConfigError`."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} has no report.json: give the directory of a run")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {exc}") from None
    return write_report(RunReport.from_dict(data), run_dir)
