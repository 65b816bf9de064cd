"""The benchmark HTML report: aggregation over seeds, tolerance of missing data, and the page
itself, loaded in a real headless Chromium (no console error, every plot present)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from secateurs.bench import records
from secateurs.errors import DataError
from secateurs.report import write_bench_report
from secateurs.report.bench_html import SCHEMA, aggregate_bench, load_bench_records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["shirt", "shoe", "bag"]
LAYERS = ["conv1.weight", "conv2.weight", "fc.weight"]
KINDS = (
    "accuracy-vs-compression",
    "accuracy-vs-latency",
    "per-class-change",
    "robustness",
    "layer-density",
)

#: Dense and pruned top-1 accuracy per seed, chosen so mean and sd are easy to check.
DENSE_ACC = {0: 0.90, 1: 0.92, 2: 0.94}
PRUNED_ACC = {0: 0.85, 1: 0.88, 2: 0.90}


def _record(
    method: str = "dense",
    budget: float | None = None,
    seed: int = 0,
    model: str = "lenet-5",
    dataset: str = "fashion-mnist",
    **values: Any,
) -> dict[str, Any]:
    """One ``secateurs.bench/1`` record with every key of the contract, plausible numbers."""
    label = "dense" if budget is None else f"sparsity={budget:g}"
    dense = budget is None
    kept = 1.0 if dense else 1.0 - budget
    accuracy = DENSE_ACC.get(seed, 0.9) if dense else PRUNED_ACC.get(seed, 0.85) - budget / 10
    accuracy -= 0.03 if method == "random" else 0.0
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "secateurs_version": "0.1.0",
        "grid": "tiny",
        "key": f"{model}|{dataset}|{method}|{label}|{seed}",
        "model": model,
        "dataset": dataset,
        "method": method,
        "budget": None if dense else {"kind": "sparsity", "value": budget},
        "budget_label": label,
        "seed": seed,
        "status": "ok",
        "error": None,
        "accuracy": accuracy,
        "loss": 0.3,
        "per_class_accuracy": [accuracy + d for d in (0.05, 0.0, -0.05 * (1 - kept))],
        "class_names": CLASSES,
        "params": 60_000,
        "nonzeros": round(60_000 * kept),
        "compression": 1.0 / kept,
        "file_bytes": round(240_000 * kept) + 1000,
        "macs_dense": 400_000,
        "macs_effective": round(400_000 * kept),
        "latency_ms": 2.0 * (0.5 + kept / 2) + 0.01 * seed,
        "latency_batch": 1,
        "layer_density": {name: kept * (1 + i / 10) / 1.2 for i, name in enumerate(LAYERS)},
        "robustness": {
            c: {str(s): accuracy - s * (0.02 + (1 - kept) * 0.01) for s in (1, 3, 5)}
            for c in ("gaussian_noise", "contrast")
        },
        "prune_seconds": 0.0 if dense else 1.5,
        "finetune_seconds": 0.0 if dense else 10.0,
        "config": {"method": method},
        "versions": {"python": "3.11", "torch": "2.x", "secateurs": "0.1.0"},
        "timestamp": "2025-01-01T00:00:00+00:00",
    }
    record.update(values)
    return record


def _grid(seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict[str, Any]]:
    records = []
    for seed in seeds:
        records.append(_record(seed=seed))
        for method in ("magnitude", "random"):
            for budget in (0.5, 0.9):
                records.append(_record(method, budget, seed))
    return records


def _row(data: dict[str, Any], method: str, label: str) -> dict[str, Any]:
    rows = [r for r in data["groups"] if r["method"] == method and r["budget_label"] == label]
    assert len(rows) == 1, rows
    return rows[0]


# --------------------------------------------------------------------------- aggregation


def test_mean_sd_and_change_against_dense_of_the_same_seed() -> None:
    data = aggregate_bench(_grid())
    row = _row(data, "magnitude", "sparsity=0.9")
    pruned = [PRUNED_ACC[s] - 0.09 for s in (0, 1, 2)]
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2] and row["failed"] == 0
    assert row["accuracy"]["mean"] == pytest.approx(statistics.fmean(pruned))
    assert row["accuracy"]["sd"] == pytest.approx(statistics.stdev(pruned))
    changes = [p - DENSE_ACC[s] for s, p in zip((0, 1, 2), pruned, strict=True)]
    assert row["accuracy_change"]["mean"] == pytest.approx(statistics.fmean(changes))
    assert row["accuracy_change"]["sd"] == pytest.approx(statistics.stdev(changes))
    assert row["compression"]["mean"] == pytest.approx(10.0)
    assert row["compression"]["sd"] == pytest.approx(0.0, abs=1e-9)
    assert row["disk_ratio"]["mean"] == pytest.approx(241_000 / 25_000)
    assert row["macs_ratio"]["mean"] == pytest.approx(10.0)
    speedups = [(2.0 + 0.01 * s) / (2.0 * 0.55 + 0.01 * s) for s in (0, 1, 2)]
    assert row["speedup"]["mean"] == pytest.approx(statistics.fmean(speedups))
    # per class: the last class pays more than the average
    per_class = {c["class"]: c["change"]["mean"] for c in row["per_class"]}
    assert list(per_class) == CLASSES
    assert per_class["bag"] < per_class["shirt"]
    # robustness: change against dense at the same corruption and severity
    robust = row["robustness"]["contrast"]["5"]["change"]["mean"]
    assert robust == pytest.approx(statistics.fmean(changes) - 5 * 0.009)
    assert list(row["robustness"]["contrast"]) == ["1", "3", "5"]
    assert row["layer_density"]["conv1.weight"]["mean"] == pytest.approx(0.1 / 1.2)
    dense = _row(data, "dense", "dense")
    assert dense["accuracy_change"]["mean"] == pytest.approx(0.0)
    assert dense["speedup"]["mean"] == pytest.approx(1.0)


def test_one_seed_has_no_sd_and_the_page_says_n_1(tmp_path: Path) -> None:
    records = _grid(seeds=(0,))
    row = _row(aggregate_bench(records), "random", "sparsity=0.5")
    assert row["n"] == 1 and row["accuracy"]["n"] == 1 and row["accuracy"]["sd"] is None
    page = write_bench_report(records, tmp_path)["html"].read_text()
    assert "n=1" in page


def test_failed_records_are_listed_and_count_in_no_number(tmp_path: Path) -> None:
    records = _grid()
    failed = _record(
        "magnitude",
        0.9,
        3,
        status="failed",
        accuracy=0.01,
        error='Traceback (most recent call last):\n  File "x.py"\nRuntimeError: out of <memory>\n',
    )
    data = aggregate_bench([*records, failed])
    row = _row(data, "magnitude", "sparsity=0.9")
    assert row["n"] == 3 and row["failed"] == 1
    clean = _row(aggregate_bench(records), "magnitude", "sparsity=0.9")
    assert row["accuracy"] == pytest.approx(clean["accuracy"])
    assert data["failed"] == [
        {
            "key": "lenet-5|fashion-mnist|magnitude|sparsity=0.9|3",
            "model": "lenet-5",
            "dataset": "fashion-mnist",
            "method": "magnitude",
            "budget_label": "sparsity=0.9",
            "seed": 3,
            "status": "failed",
            "error": "RuntimeError: out of <memory>",
        }
    ]
    page = write_bench_report([*records, failed], tmp_path)["html"].read_text()
    assert "RuntimeError: out of &lt;memory&gt;" in page  # the last line, escaped
    assert "most recent call last" not in page


def test_missing_fields_say_not_measured(tmp_path: Path) -> None:
    nulls = dict.fromkeys(
        (
            "latency_ms",
            "latency_batch",
            "file_bytes",
            "per_class_accuracy",
            "class_names",
            "robustness",
            "layer_density",
            "loss",
        )
    )
    records = [{**r, **nulls} for r in _grid()]
    records.append(
        _record("odd", 0.5, 0, **nulls, compression=None, accuracy=None, macs_effective=None)
    )
    del records[-1]["prune_seconds"]  # even a missing key must not crash the report
    paths = write_bench_report(records, tmp_path)
    data = json.loads(paths["json"].read_text())
    measured = {f["id"].rsplit("-fashion-mnist-", 1)[1]: f["measured"] for f in data["figures"]}
    assert measured == {
        "accuracy-vs-compression": True,
        "accuracy-vs-latency": False,
        "per-class-change": False,
        "robustness": False,
        "layer-density": False,
    }
    row = _row(data, "magnitude", "sparsity=0.5")
    assert row["latency_ms"] == {"mean": None, "sd": None, "n": 0}
    assert row["speedup"]["mean"] is None and row["per_class"] == [] and row["robustness"] == {}
    assert _row(data, "odd", "sparsity=0.5")["accuracy"]["mean"] is None
    page = paths["html"].read_text()
    assert page.count("not measured") >= 10
    for f in data["figures"]:
        assert f'id="{f["id"]}"' in page


def test_mismatched_and_partial_measurements_are_not_compared() -> None:
    records = _grid()
    dense = next(r for r in records if r["method"] == "dense" and r["seed"] == 0)
    dense["latency_batch"] = 64  # another batch: latencies are not comparable
    dense["per_class_accuracy"] = [0.9]  # another number of classes
    dense["robustness"] = {"contrast": {"1": 0.8}}  # only one corruption and severity
    pruned = next(r for r in records if r["key"].endswith("magnitude|sparsity=0.5|0"))
    pruned["accuracy"] = float("nan")
    data = aggregate_bench(records)
    row = _row(data, "magnitude", "sparsity=0.5")
    assert row["accuracy"]["n"] == 2 and row["accuracy_change"]["n"] == 2
    assert row["speedup"]["n"] == 2 and row["per_class"][0]["change"]["n"] == 2
    assert row["robustness"]["contrast"]["1"]["change"]["n"] == 3
    assert row["robustness"]["contrast"]["3"]["change"]["n"] == 2
    assert row["robustness"]["gaussian_noise"]["5"]["accuracy"]["n"] == 3


def test_no_dense_record_leaves_changes_unmeasured(tmp_path: Path) -> None:
    records = [r for r in _grid() if r["method"] != "dense"]
    data = aggregate_bench(records)
    row = _row(data, "magnitude", "sparsity=0.5")
    assert row["accuracy"]["n"] == 3 and row["accuracy_change"]["mean"] is None
    assert row["speedup"]["mean"] is None
    write_bench_report(records, tmp_path)  # no dense line, still a page


def test_empty_records_still_write_a_page(tmp_path: Path) -> None:
    paths = write_bench_report([], tmp_path)
    assert "No finished run" in paths["html"].read_text()
    assert json.loads(paths["json"].read_text())["groups"] == []


def test_another_schema_is_refused_before_writing(tmp_path: Path) -> None:
    records = [*_grid(seeds=(0,)), _record(schema="secateurs.bench/0")]
    with pytest.raises(DataError, match=r"secateurs\.bench/0.*secateurs\.bench/1"):
        write_bench_report(records, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="schema None"):
        aggregate_bench([{"model": "m"}])
    with pytest.raises(DataError, match="not a mapping"):
        aggregate_bench(["not a record"])  # type: ignore[list-item]


def test_load_bench_records_checks_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    good = _grid(seeds=(0,))
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n\n")
    assert load_bench_records(path) == good
    path.write_text(json.dumps(_record(schema="other/9")) + "\n")
    with pytest.raises(DataError, match=r"line 1: .*'other/9'"):
        load_bench_records(path)
    with pytest.raises(DataError, match="does not exist"):
        load_bench_records(tmp_path / "missing.jsonl")


def test_schema_matches_the_harness() -> None:
    assert records.SCHEMA == SCHEMA
    assert set(_record()) == set(records.RECORD_KEYS)


# --------------------------------------------------------------------------- the page


def _two_models() -> list[dict[str, Any]]:
    other = [
        {**r, "model": "resnet-8", "key": r["key"].replace("lenet-5", "resnet-8")} for r in _grid()
    ]
    return [*_grid(), *other]


@pytest.fixture(scope="module")
def two_model_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The report of two models x two methods x two budgets x three seeds, written once."""
    out = tmp_path_factory.mktemp("bench-report")
    return write_bench_report(_two_models(), out, title="tiny <grid>")


def test_report_json_and_html_are_self_contained(two_model_report: dict[str, Path]) -> None:
    paths = two_model_report
    assert set(paths) == {"html", "json"}
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == "secateurs.bench-report/1" and data["title"] == "tiny <grid>"
    assert len(data["figures"]) == 2 * len(KINDS) and all(f["measured"] for f in data["figures"])
    page = paths["html"].read_text()
    assert "<title>tiny &lt;grid&gt;</title>" in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    for src in re.findall(r'src="([^"]*)"', page):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert page.count("<figure") == page.count("<figcaption>") == 2 * len(KINDS)


# --------------------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "neither `chromium` nor `chromium-browser` is on PATH; install Debian's chromium "
        "package (`make data` does) to run the browser test"
    )


def _load(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM Chromium built from ``page`` and the console messages it logged.

    Chromium logs each console message (``console.*`` and uncaught errors) on stderr as
    ``...:INFO:CONSOLE:<line>] "text", source: <url> (<line>)`` with ``--enable-logging=stderr``.
    """
    result = subprocess.run(
        [
            _chromium(),
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    console = [
        line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line
    ]
    return result.stdout, console


def test_the_console_check_can_fail(tmp_path: Path) -> None:
    """A page with a deliberate console error and an uncaught exception is caught: the
    browser check below is not vacuous."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>bad</title></head><body><p>x</p>"
        '<script>console.error("deliberate-error-7");</script>'
        "<script>notAFunction();</script></body></html>"
    )
    dom, console = _load(page, tmp_path / "profile")
    assert "<p>x</p>" in dom
    assert any("deliberate-error-7" in line for line in console), console
    assert any("Uncaught" in line and "notAFunction" in line for line in console), console


def test_the_page_loads_in_chromium_without_console_errors(
    two_model_report: dict[str, Path], tmp_path: Path
) -> None:
    paths = two_model_report
    figures = json.loads(paths["json"].read_text())["figures"]
    start = time.perf_counter()
    dom, console = _load(paths["html"], tmp_path / "profile")
    seconds = time.perf_counter() - start
    assert console == [], console
    assert seconds < 60
    for f in figures:
        match = re.search(rf'<figure id="{re.escape(f["id"])}">(.*?)</figure>', dom, flags=re.S)
        assert match, f"figure {f['id']} is missing from the page"
        body = match.group(1)
        assert "<figcaption>" in body
        src = re.search(r'<img[^>]* src="data:image/png;base64,([A-Za-z0-9+/=]+)"', body)
        assert src, f"figure {f['id']} has no embedded PNG"
        assert base64.b64decode(src.group(1)).startswith(PNG_MAGIC)
    assert 'id="failed-runs"' in dom and 'id="all-runs"' in dom
