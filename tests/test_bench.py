"""The benchmark harness: grids, records, reproducibility, resume, failures and the CLI."""

from __future__ import annotations

import copy
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from torch import nn

import secateurs
from conftest import tiny_grid
from secateurs.bench import (
    METHODS,
    RECORD_KEYS,
    SCHEMA,
    BenchMethod,
    BudgetPoint,
    PruneContext,
    Pruned,
    aggregate,
    append_record,
    parse_grid,
    read_records,
    run_grid,
    validate_record,
)
from secateurs.bench import methods as bench_methods
from secateurs.bench.records import new_record
from secateurs.cli import main
from secateurs.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")


@METHODS.register("crash_for_tests")
@dataclass
class CrashForTests(BenchMethod):
    """A method that always raises, to test that a failure is recorded and the grid goes on."""

    budget_kinds: ClassVar[tuple[str, ...]] = ("sparsity",)

    def prune(self, model: nn.Module, budget: BudgetPoint, ctx: PruneContext) -> Pruned:
        raise RuntimeError("boom from crash_for_tests")


def by_key(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in records}


# --------------------------------------------------------------------------- reproducibility


def test_rerun_reproduces_every_accuracy_exactly(tmp_path: Path) -> None:
    grid = parse_grid(
        tiny_grid(
            methods=[
                "random",
                "global_magnitude",
                "layer_magnitude",
                "torch_prune",
                "shrink",
                "torch_pruning",
                {
                    "name": "lamp-gradual",
                    "method": "secateurs",
                    "allocation": "lamp",
                    "schedule": {"name": "gradual", "start": 0, "end": 1, "every": 0.5},
                },
            ],
            budgets={"sparsity": [0.9], "macs": [0.5]},
            evaluate={
                "latency": True,
                "latency_repeats": 2,
                "export": True,
                "robustness": {"corruptions": ["blur"], "severities": [3], "limit": 32},
            },
        )
    )
    first = run_grid(grid, tmp_path / "a.jsonl", cache_dir=tmp_path / "cache_a")
    run_grid(grid, tmp_path / "b.jsonl", cache_dir=tmp_path / "cache_b")
    run_grid(grid, tmp_path / "c.jsonl", cache_dir=tmp_path / "cache_a")
    assert not first.failed, first.failed[0]["error"]
    a, b, c = (by_key(read_records(tmp_path / f"{n}.jsonl")) for n in "abc")
    assert set(a) == set(b) == set(c) and len(a) == 8
    for key in a:
        for field in ("accuracy", "loss", "per_class_accuracy", "robustness", "nonzeros"):
            assert a[key][field] == b[key][field] == c[key][field], (key, field)
    dense = a["lenet-300-100|synthetic|dense|dense|0"]
    assert dense["accuracy"] > 0.5  # it learned: the comparison is not between chance levels
    assert dense["compression"] == 1.0 and dense["file_bytes"] > 0
    assert dense["latency_ms"] > 0 and dense["latency_batch"] == 1
    # element methods mask weights; channel methods remove them
    gm = a["lenet-300-100|synthetic|global_magnitude|sparsity=0.9|0"]
    assert gm["params"] == dense["params"] and gm["compression"] > 8
    assert gm["file_bytes"] < dense["file_bytes"]
    for method in ("shrink", "torch_pruning"):
        small = a[f"lenet-300-100|synthetic|{method}|macs=0.5|0"]
        assert small["params"] < dense["params"]
        assert small["macs_dense"] <= 0.5 * dense["macs_dense"] * 1.05
        assert all(0 < d < 1 for k, d in small["layer_density"].items() if k != "fc3")
    assert a["lenet-300-100|synthetic|torch_pruning|macs=0.5|0"]["config"]["method_info"]


# --------------------------------------------------------------------------- resume, failures


def test_crashing_method_is_recorded_and_the_grid_goes_on(tmp_path: Path) -> None:
    grid = parse_grid(tiny_grid(methods=["crash_for_tests", "global_magnitude"]))
    result = run_grid(grid, tmp_path / "r.jsonl")
    records = by_key(read_records(tmp_path / "r.jsonl"))
    crashed = records["lenet-300-100|synthetic|crash_for_tests|sparsity=0.8|0"]
    assert crashed["status"] == "failed" and crashed["accuracy"] is None
    assert "Traceback" in crashed["error"] and "boom from crash_for_tests" in crashed["error"]
    assert len(result.failed) == 2
    later = records["lenet-300-100|synthetic|global_magnitude|sparsity=0.95|0"]
    assert later["status"] == "ok" and later["accuracy"] is not None


def test_interrupted_grid_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = parse_grid(tiny_grid(seeds=[0, 1]))
    out = tmp_path / "r.jsonl"
    original = bench_methods._OneShot.prune

    def interrupting(self: Any, model: nn.Module, budget: BudgetPoint, ctx: Any) -> Pruned:
        if type(self).__name__ == "RandomPruning" and ctx.seed == 1:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a run
        return original(self, model, budget, ctx)

    monkeypatch.setattr(bench_methods._OneShot, "prune", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, out)
    before = read_records(out)
    # seed 0 (5 runs) and seed 1's dense + global magnitude (3 runs) finished
    assert len(before) == 8 and all(r["status"] == "ok" for r in before)
    with out.open("a") as f:
        f.write('{"schema": "secateurs.bench/1", "key": "cut off mid-wri')  # a torn last line
    monkeypatch.setattr(bench_methods._OneShot, "prune", original)
    written: list[str] = []
    result = run_grid(grid, out, on_record=lambda r: written.append(r["key"]))
    assert sorted(result.skipped) == sorted(r["key"] for r in before)
    assert written == [
        "lenet-300-100|synthetic|random|sparsity=0.8|1",
        "lenet-300-100|synthetic|random|sparsity=0.95|1",
    ]
    after = read_records(out)  # the torn line is gone, the file is valid
    assert len(after) == 10 and len({r["key"] for r in after}) == 10
    assert run_grid(grid, out).written == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"models": ["lenet-9000"]}, ["unknown model 'lenet-9000'", "lenet-5"]),
        ({"datasets": ["imagenet-42"]}, ["unknown dataset 'imagenet-42'", "fashion-mnist"]),
        ({"methods": ["magic"]}, ["unknown bench method 'magic'", "global_magnitude"]),
        ({"budgets": {"flops": [0.5]}}, ["unknown budget kind 'flops'", "sparsity"]),
        ({"budgets": {"sparsity": [1.5]}}, ["sparsity = 1.5", "[0, 1)"]),
        ({"methods": ["shrink"]}, ["'shrink'", "takes macs or params budgets", "sparsity"]),
        (
            {"methods": [{"name": "torch_prune", "budgets": {"macs": [0.5]}}]},
            ["cannot take macs budgets", "it takes sparsity"],
        ),
        ({"methods": [{"name": "shrink", "colour": "red"}]}, ["unknown option(s) 'colour'"]),
        ({"methods": [{"name": "x", "method": "secateurs", "criterion": "nope"}]}, ["nope"]),
        (
            {
                "methods": [
                    {"name": "x", "method": "secateurs", "schedule": {"name": "gradual", "x": 1}}
                ]
            },
            ["unknown option(s) 'x'"],
        ),
        ({"epochs": 3}, ["unknown key(s) 'epochs'", "finetune"]),
        ({"train": {"epochz": 3}}, ["train: unknown key(s) 'epochz'", "epochs"]),
        ({"evaluate": {"robustness": {"corruptions": ["fog"]}}}, ["unknown corruption 'fog'"]),
        ({"methods": ["random", "random"]}, ["method name(s) random appear twice"]),
    ],
)
def test_bad_grid_is_a_clear_error(change: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_grid(tiny_grid(**change))
    for word in words:
        assert word in str(info.value)


def _record(**values: Any) -> dict[str, Any]:
    """A valid dense record of the tiny grid, with ``values`` replacing its fields."""
    fields: dict[str, Any] = {
        "secateurs_version": secateurs.__version__,
        "grid": "tiny",
        "key": "lenet-300-100|synthetic|dense|dense|0",
        "model": "lenet-300-100",
        "dataset": "synthetic",
        "method": "dense",
        "budget_label": "dense",
        "seed": 0,
        "status": "ok",
        "accuracy": 0.5,
        "config": {},
        "versions": {},
        "timestamp": "2024-01-01T00:00:00+00:00",
    }
    return new_record(**{**fields, **values})


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"secateurs_version": "0.0.1"}, ["secateurs 0.0.1", "not of this version"]),
        ({"schema": "secateurs.bench/0"}, ["schema 'secateurs.bench/0'", SCHEMA]),
        ({"grid": "other"}, ["holds grid(s) other", "'tiny'"]),
    ],
)
def test_results_file_of_another_version_fails_before_anything_runs(
    tmp_path: Path, record: dict[str, Any], words: list[str]
) -> None:
    out = tmp_path / "r.jsonl"
    line = {**_record(), **record}
    out.write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError) as info:
        run_grid(parse_grid(tiny_grid()), out, cache_dir=tmp_path / "cache")
    for word in words:
        assert word in str(info.value)
    assert out.read_text().count("\n") == 1 and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- records


def test_record_contract(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    written = append_record(out, _record(loss=float("nan"), per_class_accuracy=[1.0, float("nan")]))
    assert list(written) == list(RECORD_KEYS)
    assert written["loss"] is None and written["per_class_accuracy"] == [1.0, None]
    assert "NaN" not in out.read_text()
    assert read_records(out) == [written]
    with pytest.raises(DataError, match="missing key"):
        validate_record({k: v for k, v in written.items() if k != "loss"})
    with pytest.raises(DataError, match="outside"):
        validate_record({**written, "accuracy": 1.5})
    with pytest.raises(DataError, match="needs its traceback"):
        validate_record({**written, "status": "failed"})
    with pytest.raises(DataError, match="must be int"):
        validate_record({**written, "seed": "0"})
    out.write_text(out.read_text() + "not json\n")
    with pytest.raises(DataError, match="line 2"):
        read_records(out)


def test_aggregate_mean_sd_and_paired_drop() -> None:
    records = []
    for seed, (dense, pruned) in enumerate([(0.9, 0.8), (0.8, 0.8), (0.7, 0.5)]):
        records.append(_record(seed=seed, accuracy=dense, key=f"d{seed}"))
        records.append(
            _record(
                seed=seed,
                accuracy=pruned,
                key=f"p{seed}",
                method="m",
                budget_label="sparsity=0.9",
                budget={"kind": "sparsity", "value": 0.9},
            )
        )
    records.append({**copy.deepcopy(records[-1]), "status": "failed", "accuracy": None})
    rows = {r["method"]: r for r in aggregate(records)}
    m = rows["m"]
    assert m["n"] == 3 and m["failed"] == 1
    assert m["accuracy"] == pytest.approx(0.7) and m["accuracy_sd"] == pytest.approx(0.17320508)
    assert m["accuracy_drop"] == pytest.approx(0.1) and m["accuracy_drop_sd"] == pytest.approx(0.1)


# --------------------------------------------------------------------------- CLI


def test_cli_bench_runs_a_grid_and_writes_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(tiny_grid(budgets={"sparsity": [0.9]})))
    seen: dict[str, Any] = {}

    def write_bench_report(records: list[dict[str, Any]], out_dir: Path) -> Path:
        seen["n"], seen["dir"] = len(records), out_dir
        return out_dir / "index.html"

    fake = types.ModuleType("secateurs.report.bench_html")
    fake.write_bench_report = write_bench_report  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "secateurs.report.bench_html", fake)
    out = tmp_path / "r.jsonl"
    args = ["bench", str(path), "--out", str(out), "--report", str(tmp_path / "html")]
    assert main([*args, "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "mean ± sd" in text and "global_magnitude" in text
    assert seen == {"n": 3, "dir": tmp_path / "html"}
    assert len(read_records(out)) == 3


def test_cli_bench_bad_grid_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(tiny_grid(methods=["nonesuch"])))
    assert main(["bench", str(path), "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "unknown bench method 'nonesuch'" in err and "global_magnitude" in err
    assert not (tmp_path / "r.jsonl").exists()
    assert main(["bench", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
