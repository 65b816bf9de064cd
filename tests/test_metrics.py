"""Metrics: parameter counts on effective tensors, MACs against hand counts, bytes, latency,
accuracy, the summary table and file sizes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.errors import ConfigError, DataError, ModelError
from secateurs.metrics import (
    EvalResult,
    LatencyResult,
    csr_bytes,
    evaluate,
    file_bytes,
    measure_latency,
    named_effective_parameters,
    profile,
    summary,
)


class _Mask(nn.Module):
    """The smallest mask parametrization: ``original * mask``."""

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


def _mask_(module: nn.Module, name: str, mask: Tensor) -> None:
    parametrize.register_parametrization(module, name, _Mask(mask), unsafe=True)


def _half_mask(shape: torch.Size) -> Tensor:
    """Every other element kept, by flat index: exactly half of an even-sized tensor."""
    return (torch.arange(math.prod(shape)) % 2 == 0).reshape(shape)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


# --------------------------------------------------------------------------- counting


def test_counts_on_a_plain_sequential() -> None:
    model = _mlp()
    names = [name for name, *_ in named_effective_parameters(model)]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    stats = profile(model)
    assert [layer.name for layer in stats.layers] == ["0", "2"]
    assert [layer.params for layer in stats.layers] == [15, 8]
    assert stats.layers[0].shape == [3, 4] and stats.layers[0].kind == "Linear"
    assert stats.totals["params"] == stats.totals["nonzeros"] == 23
    assert stats.totals["density"] == 1.0 and stats.totals["sparsity"] == 0.0
    assert stats.totals["prunable_params"] == 12 + 6
    assert stats.totals["bytes_dense"] == 23 * 4
    assert stats.totals["macs"] is None and stats.layers[0].macs is None


def test_masked_weights_count_effective_values_under_natural_names() -> None:
    model = _mlp()
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    _mask_(model[0], "weight", mask)
    raw = model[0].parametrizations.weight.original
    assert int(torch.count_nonzero(raw)) == 12  # the raw values are untouched...

    found = {name: t for name, _, _, t in named_effective_parameters(model)}
    assert list(found) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not any("parametrizations" in name or "original" in name for name in found)
    assert int(torch.count_nonzero(found["0.weight"])) == 4  # ...the counts read the mask

    stats = profile(model)
    first = stats.layers[0]
    assert first.name == "0" and first.kind == "Linear" and first.shape == [3, 4]
    assert first.params == 15 and first.nonzeros == 4 + 3
    assert first.density == pytest.approx(7 / 15)
    assert stats.totals["params"] == 23 and stats.totals["nonzeros"] == 7 + 8
    assert stats.totals["prunable_nonzeros"] == 4 + 6
    assert stats.totals["prunable_sparsity"] == pytest.approx(1 - 10 / 18)


def test_tied_parameters_are_counted_once() -> None:
    first, second = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second)
    assert [name for name, *_ in named_effective_parameters(model)] == ["0.weight"]
    stats = profile(model, torch.zeros(1, 6))
    assert stats.totals["params"] == 36
    # both layers did their MACs; the second owns no parameters but still has a row
    by_name = {layer.name: layer for layer in stats.layers}
    assert by_name["0"].params == 36 and by_name["2"].params == 0
    assert by_name["0"].macs == by_name["2"].macs == 36
    assert stats.totals["macs"] == 72

    _mask_(first, "weight", _half_mask(first.weight.shape))
    assert [name for name, *_ in named_effective_parameters(model)] == ["0.weight"]
    assert profile(model).totals["nonzeros"] == 18


def test_leftover_parameters_belong_to_their_module() -> None:
    class WithToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.ones(1, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x + self.token)

    stats = profile(WithToken(), torch.zeros(3, 4))
    root = stats.layers[0]
    assert root.name == "(model)" and root.kind == "WithToken" and root.params == 4
    assert root.macs is None and stats.totals["macs_unknown"] == ["(model)"]
    assert stats.layers[1].macs == 3 * 2 * 4


# --------------------------------------------------------------------------- MACs


def _macs(module: nn.Module, shape: tuple[int, ...]) -> int | None:
    return profile(nn.Sequential(module), torch.zeros(shape)).totals["macs"]


@pytest.mark.parametrize(
    ("module", "shape", "expected"),
    [
        # output elements x in_features
        (nn.Linear(10, 4), (2, 10), 2 * 4 * 10),
        (nn.Linear(10, 4), (2, 7, 10), 2 * 7 * 4 * 10),
        # output elements x (in_channels / groups) x kernel
        (nn.Conv1d(2, 3, 3), (1, 2, 10), 3 * 8 * 2 * 3),
        (nn.Conv2d(3, 8, 3), (1, 3, 10, 10), (8 * 8 * 8) * 3 * 9),
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 10, 10), (2 * 8 * 5 * 5) * 3 * 9),
        (nn.Conv2d(8, 8, 3, groups=8), (1, 8, 10, 10), (8 * 8 * 8) * 1 * 9),  # depthwise
        (nn.Conv2d(8, 16, 1, groups=4), (1, 8, 5, 5), (16 * 5 * 5) * 2 * 1),  # grouped
        (nn.Conv3d(2, 4, 2), (1, 2, 3, 3, 3), (4 * 2 * 2 * 2) * 2 * 8),
        # input elements x (out_channels / groups) x kernel
        (nn.ConvTranspose2d(4, 6, 2, stride=2), (1, 4, 5, 5), (4 * 5 * 5) * 6 * 4),
        (nn.ConvTranspose2d(4, 6, 3, groups=2), (1, 4, 5, 5), (4 * 5 * 5) * 3 * 9),
        (nn.ConvTranspose1d(3, 2, 4), (2, 3, 6), (2 * 3 * 6) * 2 * 4),
        # lookups and normalisations multiply no weights
        (nn.Embedding(10, 4), (3, 5), 0),
        (nn.BatchNorm2d(3), (2, 3, 4, 4), 0),
        (nn.LayerNorm(4), (2, 4), 0),
    ],
)
def test_macs_against_hand_counts(module: nn.Module, shape: tuple[int, ...], expected: int) -> None:
    if isinstance(module, nn.Embedding):
        stats = profile(nn.Sequential(module), torch.zeros(shape, dtype=torch.long))
        assert stats.totals["macs"] == 0 and stats.layers[0].macs == 0
        return
    assert _macs(module, shape) == expected


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_macs(batch_first: bool) -> None:
    b, length, e = 2, 5, 8
    attn = nn.MultiheadAttention(e, 2, batch_first=batch_first)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    x = torch.zeros((b, length, e) if batch_first else (length, b, e))
    stats = profile(Block(), x)
    by_name = {layer.name: layer for layer in stats.layers}
    projections = 3 * b * length * e * e
    attention = 2 * b * length * length * e  # scores and weighted sum
    assert by_name["attn"].macs == projections + attention
    assert by_name["attn.out_proj"].macs == b * length * e * e
    assert stats.totals["macs"] == projections + attention + b * length * e * e

    # pruning half the packed in-projection halves its MACs, not the attention matmuls
    _mask_(attn, "in_proj_weight", _half_mask(attn.in_proj_weight.shape))
    pruned = {layer.name: layer for layer in profile(Block(), x).layers}
    assert pruned["attn"].macs_nonzero == projections // 2 + attention


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (nn.Linear(8, 6), (3, 8)),
        (nn.Conv2d(4, 6, 3), (2, 4, 6, 6)),
        (nn.Conv2d(4, 4, 3, groups=4), (1, 4, 6, 6)),
        (nn.ConvTranspose2d(4, 6, 2, stride=2), (1, 4, 3, 3)),
    ],
)
def test_macs_nonzero_halves_with_half_the_weights(
    module: nn.Module, shape: tuple[int, ...]
) -> None:
    model = nn.Sequential(module)
    dense = profile(model, torch.zeros(shape)).layers[0]
    assert dense.macs_nonzero == dense.macs and dense.macs
    _mask_(module, "weight", _half_mask(module.weight.shape))
    pruned = profile(model, torch.zeros(shape))
    layer = pruned.layers[0]
    assert layer.macs == dense.macs and layer.macs_nonzero == dense.macs // 2
    assert pruned.totals["macs_nonzero"] == dense.macs // 2


def test_profile_takes_tuples_and_restores_each_module_mode() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return self.bn(self.a(x) + self.b(y))

    model = Two().train()
    model.bn.eval()
    running = model.bn.running_mean.clone()
    stats = profile(model, (torch.randn(4, 3), torch.randn(4, 5)))
    assert stats.totals["macs"] == 4 * 2 * 3 + 4 * 2 * 5
    assert model.training and model.a.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, running)  # ran in eval mode, no stats update


def test_profile_reports_inputs_the_model_cannot_take() -> None:
    with pytest.raises(ModelError, match="example inputs"):
        profile(nn.Linear(4, 2), torch.zeros(1, 5))
    with pytest.raises(ConfigError, match="example_inputs"):
        profile(nn.Linear(4, 2), 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bytes


def test_csr_bytes_formula() -> None:
    t = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    # 3 values x (4 value + 4 index bytes) + (2 rows + 1) x 4 pointer bytes
    assert csr_bytes(t) == 3 * 8 + 3 * 4
    assert csr_bytes(t.half()) == 3 * (2 + 4) + 3 * 4
    conv = torch.zeros(4, 2, 3, 3)  # viewed as [4, 18]
    conv[0, 0, 0, 0] = conv[3, 1, 2, 2] = 1.0
    assert csr_bytes(conv) == 2 * 8 + 5 * 4


def test_layer_bytes() -> None:
    fc = nn.Linear(4, 2)
    _mask_(fc, "weight", torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool))
    layer = profile(nn.Sequential(fc)).layers[0]
    assert layer.bytes_dense == 10 * 4
    # weight in CSR (3 nonzeros, 2 rows), bias dense
    assert layer.bytes_csr == (3 * 8 + 3 * 4) + 2 * 4


# --------------------------------------------------------------------------- summary


def test_summary_names_layers_and_totals() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    _mask_(model[3], "weight", _half_mask(model[3].weight.shape))
    result = summary(model, torch.zeros(1, 1, 8, 8))
    text = str(result)
    for word in ("layer", "Conv2d", "Linear", "total", "density", "nz MACs", "4x1x3x3", "3x144"):
        assert word in text
    lines = text.splitlines()
    total = next(line for line in lines if line.startswith("total"))
    assert "475" in total  # 40 + 435 params
    assert "prunable weights" in text and "CSR" in text
    data = result.to_dict()
    json.dumps(data)  # JSON-serialisable
    assert data["totals"]["params"] == 40 + 435
    assert data["totals"]["macs"] == 4 * 6 * 6 * 9 + 3 * 144
    assert summary(model).to_dict()["totals"]["macs"] is None
    assert "-" in str(summary(model))


# --------------------------------------------------------------------------- latency


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.fc(x)


def test_latency_is_positive_and_respects_repeats_and_threads() -> None:
    threads = torch.get_num_threads()
    model = _Counting().train()
    result = measure_latency(model, torch.zeros(4, 16), warmup=2, repeats=7, threads=1)
    assert isinstance(result, LatencyResult)
    assert model.calls == 2 + 7 and model.training
    assert result.repeats == 7 and result.batch_size == 4 and result.threads == 1
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    assert torch.get_num_threads() == threads
    single = measure_latency(model, (torch.zeros(2, 16),), warmup=0, repeats=1)
    assert single.median_ms == single.p10_ms == single.p90_ms > 0
    assert single.threads == threads


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"threads": 0}])
def test_latency_rejects_bad_settings(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), **kwargs)


# --------------------------------------------------------------------------- accuracy


class _Fixed(nn.Module):
    """Predicts ``predictions[i]`` for example index ``i`` with logit margin 1."""

    def __init__(self, predictions: Tensor, classes: int) -> None:
        super().__init__()
        self.predictions = predictions
        self.classes = classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, idx: Tensor) -> Tensor:
        return nn.functional.one_hot(self.predictions[idx], self.classes).float() * self.scale


def _loader(labels: Tensor, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    idx = torch.arange(len(labels))
    return iter([(idx[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch)])


def test_evaluate_accuracy_loss_and_per_class() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 2])
    model = _Fixed(preds, 3).train()
    result = evaluate(model, list(_loader(labels, 4)))
    assert isinstance(result, EvalResult)
    assert result.accuracy == result.top1 == pytest.approx(4 / 6)
    assert result.per_class_accuracy == [0.5, 1.0, 0.5] and result.per_class_count == [2, 2, 2]
    assert result.n == 6 and result.top5 is None
    assert model.training  # mode restored
    e = math.e
    right, wrong = -math.log(e / (e + 2)), -math.log(1 / (e + 2))
    assert result.loss == pytest.approx((4 * right + 2 * wrong) / 6)


class _Logits(nn.Module):
    """Returns fixed logit rows, indexed by example."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, idx: Tensor) -> Tensor:
        return self.logits[idx]


def test_evaluate_num_classes_custom_loss_and_top5() -> None:
    labels = torch.tensor([0, 1, 1, 5])
    # ranks: example 2 puts its label (1) second, example 3 puts its label (5) sixth
    logits = torch.tensor(
        [
            [6.0, 5, 4, 3, 2, 1],
            [5.0, 6, 4, 3, 2, 1],
            [6.0, 5, 4, 3, 2, 1],
            [1.0, 2, 3, 4, 5, 0],
        ]
    )
    model = _Logits(logits)
    result = evaluate(model, _loader(labels, 3), num_classes=7, loss_fn=nn.CrossEntropyLoss())
    assert result.per_class_count == [1, 2, 0, 0, 0, 1, 0]
    assert result.per_class_accuracy[:2] == [1.0, 0.5] and result.per_class_accuracy[5] == 0.0
    assert math.isnan(result.per_class_accuracy[2])  # no examples of class 2
    assert result.accuracy == 0.5 and result.top5 == 0.75
    reference = evaluate(model, _loader(labels, 3))
    assert result.loss == pytest.approx(reference.loss)


def test_evaluate_rejects_bad_data() -> None:
    model = _Fixed(torch.tensor([0, 1]), 2)
    with pytest.raises(DataError, match="class indices"):
        evaluate(model, _loader(torch.tensor([0, 5]), 2))
    with pytest.raises(DataError, match="no examples"):
        evaluate(model, [])
    with pytest.raises(DataError, match=r"\(inputs, labels\)"):
        evaluate(model, [torch.zeros(2)])


# --------------------------------------------------------------------------- files


def test_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(b"x" * 123)
    assert file_bytes(path) == 123 and file_bytes(str(path)) == 123
    with pytest.raises(DataError, match="no such file"):
        file_bytes(tmp_path / "missing.bin")
