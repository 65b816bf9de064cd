"""Metrics (counts, MACs, bytes, latency, accuracy) and the run report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import secateurs as sc
from secateurs.metrics import (
    csr_bytes,
    evaluate,
    measure_latency,
    named_effective_parameters,
    profile,
    summary,
)
from secateurs.report import RunReport, write_report
from secateurs.zoo import build_model


def _macs(module: nn.Module, x: torch.Tensor) -> int:
    stats = profile(nn.Sequential(module), x)
    return int(stats.totals["macs"])


@pytest.mark.parametrize(
    ("module", "shape", "expected"),
    [
        (nn.Linear(10, 4), (2, 10), 2 * 4 * 10),
        (nn.Conv2d(3, 8, 3), (1, 3, 10, 10), 8 * 8 * 8 * 3 * 9),
        (nn.Conv2d(8, 8, 3, groups=8), (1, 8, 10, 10), 8 * 8 * 8 * 1 * 9),
        (nn.Conv2d(8, 16, 1, groups=4), (1, 8, 5, 5), 16 * 25 * 2),
        (nn.ConvTranspose2d(4, 6, 2, stride=2), (1, 4, 5, 5), 4 * 25 * 6 * 4),
        (nn.Conv1d(2, 3, 3), (1, 2, 10), 3 * 8 * 2 * 3),
    ],
)
def test_macs_against_hand_counts(module: nn.Module, shape: tuple[int, ...], expected: int) -> None:
    assert _macs(module, torch.zeros(shape)) == expected


def test_counts_read_masked_weights_under_natural_names() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sc.prune_(model, sparsity=0.5, allocation="uniform")
    names = [name for name, *_ in named_effective_parameters(model)]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    stats = profile(model, torch.zeros(1, 8))
    first = stats.layers[0]
    assert first.kind == "Linear" and first.params == 72 and first.nonzeros == 32 + 8
    assert first.macs == 64 and first.macs_nonzero == 32
    assert stats.totals["params"] == 72 + 18


def test_csr_bytes_formula() -> None:
    t = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    assert csr_bytes(t) == 3 * (4 + 4) + (2 + 1) * 4


def test_summary_table_has_layers_and_totals() -> None:
    model = build_model("lenet-5", seed=0)
    sc.prune_(model, sparsity=0.9)
    text = str(summary(model, torch.zeros(1, 1, 28, 28)))
    for word in ("conv1", "fc3", "total", "Conv2d", "density"):
        assert word in text
    assert summary(model).to_dict()["totals"]["macs"] is None


def test_latency_is_positive_and_restores_threads() -> None:
    threads = torch.get_num_threads()
    result = measure_latency(nn.Linear(16, 16), torch.zeros(4, 16), warmup=1, repeats=5, threads=1)
    assert result.median_ms > 0 and result.repeats == 5 and result.batch_size == 4
    assert result.p10_ms <= result.median_ms <= result.p90_ms
    assert torch.get_num_threads() == threads


class _Fixed(nn.Module):
    def __init__(self, predictions: torch.Tensor) -> None:
        super().__init__()
        self.predictions = predictions

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(self.predictions[idx], 3).float()


def test_evaluate_accuracy_and_per_class() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 2])
    loader = DataLoader(TensorDataset(torch.arange(6), labels), batch_size=4)
    model = _Fixed(preds).train()
    result = evaluate(model, loader)
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.per_class_accuracy == [0.5, 1.0, 0.5] and result.per_class_count == [2, 2, 2]
    assert result.n == 6 and model.training


def _report(**overrides: object) -> RunReport:
    base = RunReport(
        title="t",
        model="lenet-5",
        dataset="synthetic",
        dense={
            "accuracy": 0.9,
            "per_class_accuracy": [0.9, 0.8],
            "nonzeros": 1000,
            "bytes_dense": 4000,
            "latency_ms": 1.0,
        },
        pruned={
            "accuracy": 0.85,
            "per_class_accuracy": [0.95, 0.7],
            "nonzeros": 100,
            "bytes_csr": 800,
            "latency_ms": 0.5,
        },
        layers=[
            {
                "name": "fc",
                "kind": "Linear",
                "shape": [10, 10],
                "params": 100,
                "nonzeros": 10,
                "density": 0.1,
                "macs": 100,
                "macs_nonzero": 10,
            }
        ],
        trajectory=[
            {"epoch": 0, "step": 0, "sparsity": 0.0, "accuracy": 0.9},
            {"epoch": 1, "step": 5, "sparsity": 0.9, "accuracy": 0.85},
        ],
        class_names=["a", "b"],
    )
    for key, value in overrides.items():
        setattr(base, key, value)
    return base


def test_report_files_and_round_trip(tmp_path: Path) -> None:
    paths = write_report(_report(), tmp_path)
    for key in ("json", "markdown", "accuracy_vs_sparsity", "layer_density", "per_class_change"):
        assert paths[key].is_file()
    for png in ("accuracy_vs_sparsity", "layer_density", "per_class_change"):
        raw = paths[png].read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 5000
    again = RunReport.from_dict(json.loads(paths["json"].read_text()))
    assert again == _report()
    md = paths["markdown"].read_text()
    assert (
        "90.00%" in md
        and "85.00%" in md
        and "-5.00 pt" in md
        and "10.00x" in md
        and "-10.00 pt" in md
    )


def test_report_without_trajectory_or_latency(tmp_path: Path) -> None:
    report = _report(trajectory=[], dense={"accuracy": 0.9}, pruned={"accuracy": 0.8})
    paths = write_report(report, tmp_path)
    assert "accuracy_vs_sparsity" not in paths and "per_class_change" not in paths
    md = paths["markdown"].read_text()
    assert "No trajectory" in md and "Not measured" in md
