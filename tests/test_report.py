"""The run report: files written, JSON round trip, Markdown numbers, missing data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from secateurs.errors import ConfigError
from secateurs.metrics import profile
from secateurs.report import RunReport, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy_vs_sparsity", "layer_density", "per_class_change")


def _metrics(**values: Any) -> dict[str, Any]:
    return dict(values)


def _report(**overrides: Any) -> RunReport:
    report = RunReport(
        title="LeNet-5 at 90%",
        model="lenet-5",
        dataset="fashion-mnist",
        config={"sparsity": 0.9, "schedule": {"name": "gradual", "every": 0.25}},
        versions={"secateurs": "0.1.0", "torch": "2.x", "python": "3.11"},
        dense=_metrics(
            accuracy=0.9,
            per_class_accuracy=[0.9, 0.8, 1.0],
            params=1000,
            nonzeros=1000,
            macs=50_000,
            macs_nonzero=50_000,
            bytes_dense=4000,
            bytes_csr=8012,
            latency_ms=1.0,
            file_bytes=4500,
        ),
        pruned=_metrics(
            accuracy=0.85,
            per_class_accuracy=[0.95, 0.7, 0.9],
            params=1000,
            nonzeros=100,
            macs=50_000,
            macs_nonzero=12_500,
            bytes_dense=4000,
            bytes_csr=800,
            latency_ms=0.5,
            file_bytes=4500,
        ),
        layers=[
            {
                "name": "conv1",
                "kind": "Conv2d",
                "shape": [6, 1, 5, 5],
                "params": 156,
                "nonzeros": 40,
                "density": 40 / 156,
                "macs": 30_000,
                "macs_nonzero": 7_500,
                "bytes_dense": 624,
                "bytes_csr": 348,
            },
            {
                "name": "fc",
                "kind": "Linear",
                "shape": [10, 84],
                "params": 850,
                "nonzeros": 60,
                "density": 60 / 850,
                "macs": 20_000,
                "macs_nonzero": 5_000,
                "bytes_dense": 3400,
                "bytes_csr": 452,
            },
        ],
        trajectory=[
            {"epoch": 0, "step": 0, "sparsity": 0.0, "accuracy": 0.9},
            {"epoch": 1, "step": 50, "sparsity": 0.6, "accuracy": 0.87},
            {"epoch": 2, "step": 100, "sparsity": 0.9, "accuracy": 0.85},
        ],
        class_names=["T-shirt/top", "Trouser", "Pullover"],
        extra={"seconds": {"total": 12.5}},
    )
    for key, value in overrides.items():
        setattr(report, key, value)
    return report


def test_report_writes_every_file(tmp_path: Path) -> None:
    paths = write_report(_report(), tmp_path / "out")
    assert set(paths) == {"json", "markdown", "html", *PLOTS}
    assert paths["json"] == tmp_path / "out" / "report.json"
    assert paths["markdown"] == tmp_path / "out" / "report.md"
    for name in PLOTS:
        raw = paths[name].read_bytes()
        assert paths[name].name == f"{name}.png"
        assert raw[:8] == PNG_MAGIC and len(raw) > 5000, name


def test_json_round_trip(tmp_path: Path) -> None:
    original = _report()
    paths = write_report(original, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["model"] == "lenet-5" and data["pruned"]["nonzeros"] == 100
    assert RunReport.from_dict(data) == original
    assert RunReport.from_dict(original.to_dict()) == original


def test_markdown_states_the_key_numbers(tmp_path: Path) -> None:
    md = write_report(_report(), tmp_path)["markdown"].read_text()
    assert md.startswith("# LeNet-5 at 90%")
    assert "90.00%" in md and "85.00%" in md and "-5.00 pt" in md  # accuracy and its change
    assert "10.00x fewer" in md  # nonzero parameters 1000 -> 100
    assert "4.00x fewer" in md  # MACs 50,000 -> 12,500
    assert "5.00x smaller" in md  # 4,000 dense bytes -> 800 CSR bytes
    assert "2.00x faster" in md  # latency 1.0 -> 0.5 ms
    assert "12,500" in md and "1.000" in md and "0.500" in md
    assert "| conv1 | Conv2d | 6x1x5x5 |" in md and "25.64%" in md  # layer table
    assert "T-shirt/top" in md and "-10.00 pt" in md and "+5.00 pt" in md  # per-class table
    for name in PLOTS:
        assert f"({name}.png)" in md
    assert "gradual" in md and "torch 2.x" in md  # configuration and versions
    assert "| file bytes (as saved) | 4,500 | 4,500 | same |" in md
    assert "Not measured" not in md

    slower = _report()
    slower.pruned["latency_ms"] = 1.25
    md = write_report(slower, tmp_path / "slower")["markdown"].read_text()
    assert "1.25x slower" in md


def test_missing_data_is_skipped_and_said(tmp_path: Path) -> None:
    report = _report(
        trajectory=[],
        dense={"accuracy": 0.9, "nonzeros": 1000, "latency_ms": None},
        pruned={"accuracy": 0.8, "nonzeros": 100},
    )
    paths = write_report(report, tmp_path)
    assert set(paths) == {"json", "markdown", "html", "layer_density"}
    md = paths["markdown"].read_text()
    assert "No trajectory" in md
    assert "Not measured" in md and "latency" in md.split("Not measured")[1]
    assert "faster" not in md and "-10.00 pt" in md


def test_bare_report_and_nan_values(tmp_path: Path) -> None:
    bare = RunReport(title="t", model="m", dataset="d")
    paths = write_report(bare, tmp_path / "bare")
    assert set(paths) == {"json", "markdown", "html"}
    assert RunReport.from_dict(json.loads(paths["json"].read_text())) == bare

    # a class with no test examples has NaN accuracy: written as null, valid strict JSON
    report = _report()
    report.dense["per_class_accuracy"] = [0.9, float("nan"), 1.0]
    report.pruned["top5"], report.dense["top5"] = torch.tensor(0.99), 1.0  # tensors are fine
    paths = write_report(report, tmp_path / "nan")
    data = json.loads(paths["json"].read_text())
    assert data["dense"]["per_class_accuracy"] == [0.9, None, 1.0]
    assert data["pruned"]["top5"] == pytest.approx(0.99)
    md = paths["markdown"].read_text()
    assert "| Trouser | - | 70.00% | - |" in md and "top-5" in md


def test_from_dict_names_what_is_wrong() -> None:
    good = _report().to_dict()
    with pytest.raises(ConfigError, match="unknown run report keys"):
        RunReport.from_dict({**good, "colour": "red"})
    with pytest.raises(ConfigError, match="missing required keys"):
        RunReport.from_dict({k: v for k, v in good.items() if k != "title"})
    with pytest.raises(ConfigError, match="'layers' must be a list"):
        RunReport.from_dict({**good, "layers": {}})


def test_layers_from_a_profiled_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
    layers = profile(model, torch.zeros(1, 1, 8, 8)).to_dict()["layers"]
    paths = write_report(_report(layers=layers), tmp_path)
    assert paths["layer_density"].read_bytes()[:8] == PNG_MAGIC
    md = paths["markdown"].read_text()
    assert "| 1 | BatchNorm2d | 4 |" in md and "| 3 | Linear | 3x144 |" in md
