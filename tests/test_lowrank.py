"""Low-rank factorisation: exact at full rank, Eckart–Young error, rank rules, budgets, bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import secateurs as sc
from secateurs.compress.lowrank import (
    LowRankReport,
    factorize_,
    factorize_conv,
    factorize_linear,
    rank_for_energy,
)
from secateurs.errors import BudgetError, ConfigError, ModelError
from secateurs.masks import get_mask
from secateurs.provenance import report_of
from secateurs.zoo import build_model, example_input

# ------------------------------------------------------------------------------------------
# helpers (independent of the implementation: they recompose weights from the factors)


def linear_product(seq: nn.Sequential) -> Tensor:
    """The dense weight of a factorised Linear: second @ first."""
    return (seq[1].weight @ seq[0].weight).detach()


def channel_product(seq: nn.Sequential) -> Tensor:
    """The dense kernel of a channel-mode factorised conv."""
    first, second = seq[0].weight.detach(), seq[1].weight.detach()
    rank, out = first.shape[0], second.shape[0]
    return (second.reshape(out, rank) @ first.reshape(rank, -1)).reshape(out, *first.shape[1:])


def spatial_product(seq: nn.Sequential) -> Tensor:
    """W[o, c, i, j] = sum_r H[o, r, 0, j] * V[r, c, i, 0] for a spatial-mode pair."""
    v, h = seq[0].weight.detach(), seq[1].weight.detach()
    return torch.einsum("rci,orj->ocij", v[..., 0], h[:, :, 0, :])


def spatial_matrix(w: Tensor) -> Tensor:
    out_c, in_c, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(in_c * kh, out_c * kw)


def svdvals64(m: Tensor) -> Tensor:
    return torch.linalg.svdvals(m.detach().double())


def structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model: nn.Module, types: list[tuple[str, str]], sd: dict[str, Tensor]) -> None:
    assert structure(model) == types
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(now[k], v), k


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def with_spectrum(rows: int, cols: int, s: list[float], seed: int = 0) -> Tensor:
    """A [rows, cols] matrix with exactly the singular values ``s`` (rest zero)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


# ------------------------------------------------------------------------------------------
# one layer: exact at full rank


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_linear_full_rank_is_exact(shape: tuple[int, int], bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(*shape, bias=bias)
    seq = factorize_linear(layer, min(shape))
    assert [type(m) for m in seq] == [nn.Linear, nn.Linear]
    assert seq[0].bias is None and (seq[1].bias is not None) == bias
    x = torch.randn(4, shape[0])
    torch.testing.assert_close(seq(x), layer(x), rtol=1e-5, atol=1e-5)


def test_dtype_device_and_mode_are_preserved() -> None:
    layer = nn.Linear(9, 4, dtype=torch.float64).eval()
    seq = factorize_linear(layer, 4)
    assert all(p.dtype == torch.float64 for p in seq.parameters())
    assert not seq.training
    x = torch.randn(3, 9, dtype=torch.float64)
    torch.testing.assert_close(seq(x), layer(x), rtol=1e-12, atol=1e-12)
    conv = nn.Conv2d(3, 4, 3, dtype=torch.float64)
    assert factorize_conv(conv, 2, "spatial")[1].weight.dtype == torch.float64


CONV_CASES: list[dict[str, Any]] = [
    {},
    {"stride": 2},
    {"stride": (2, 1), "padding": (1, 2)},
    {"padding": 1, "dilation": 2, "bias": False},
    {"stride": (1, 3), "padding": (2, 0), "dilation": (2, 1)},
    {"padding": "same", "dilation": (1, 2)},
    {"padding": (1, 2), "padding_mode": "circular"},
    {"padding": 1, "padding_mode": "reflect", "stride": 2},
]


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("kernel", [3, (3, 5), (1, 2)])
@pytest.mark.parametrize("options", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv2d_full_rank_is_exact(mode: str, kernel: Any, options: dict[str, Any]) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, kernel, **options)
    kh, kw = conv.kernel_size
    full = min(6, 4 * kh * kw) if mode == "channel" else min(4 * kh, 6 * kw)
    seq = factorize_conv(conv, full, mode)  # type: ignore[arg-type]
    if mode == "spatial":
        assert seq[0].kernel_size == (kh, 1) and seq[1].kernel_size == (1, kw)
    else:
        assert seq[0].kernel_size == (kh, kw) and seq[1].kernel_size == (1, 1)
    x = torch.randn(2, 4, 9, 11)
    torch.testing.assert_close(seq(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv1d(3, 5, 3, stride=2, padding=1), nn.Conv3d(2, 4, 2)])
def test_conv1d_and_conv3d_channel_mode_are_exact(conv: nn.Module) -> None:
    torch.manual_seed(2)
    w = conv.weight
    seq = factorize_conv(conv, min(w.shape[0], w[0].numel()), "channel")
    x = torch.randn(2, w.shape[1], *([6] * (w.dim() - 2)))
    torch.testing.assert_close(seq(x), conv(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# truncation: the error is exactly the discarded spectrum (Eckart–Young)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 12),
    inp=st.integers(1, 12),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_linear_truncation_error_is_the_discarded_energy(
    out: int, inp: int, frac: float, seed: int
) -> None:
    torch.manual_seed(seed)
    layer = nn.Linear(inp, out, dtype=torch.float64)
    full = min(out, inp)
    r = max(1, round(frac * full))
    seq = factorize_linear(layer, r)
    assert seq[0].out_features == r
    s = svdvals64(layer.weight)
    err = (layer.weight.detach() - linear_product(seq)).square().sum()
    torch.testing.assert_close(err, s[r:].square().sum(), rtol=1e-8, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 7),
    inp=st.integers(1, 5),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_conv_truncation_error_is_the_discarded_energy(
    out: int, inp: int, kh: int, kw: int, frac: float, seed: int
) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(inp, out, (kh, kw), dtype=torch.float64)
    w = conv.weight.detach()
    for mode, matrix, product in (
        ("channel", w.reshape(out, -1), channel_product),
        ("spatial", spatial_matrix(w), spatial_product),
    ):
        s = svdvals64(matrix)
        r = max(1, round(frac * s.numel()))
        seq = factorize_conv(conv, r, mode)  # type: ignore[arg-type]
        err = (w - product(seq)).square().sum()
        torch.testing.assert_close(err, s[r:].square().sum(), rtol=1e-8, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 6),
    inp=st.integers(1, 4),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_spatial_and_channel_full_rank_match_random_convs(
    out: int,
    inp: int,
    kh: int,
    kw: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    bias: bool,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(inp, out, (kh, kw), stride, padding, dilation, bias=bias)
    x = torch.randn(1, inp, 10, 9)
    expected = conv(x)
    spatial = factorize_conv(conv, min(inp * kh, out * kw), "spatial")
    channel = factorize_conv(conv, min(out, inp * kh * kw), "channel")
    torch.testing.assert_close(spatial(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(channel(x), expected, rtol=1e-4, atol=1e-5)


def test_masked_layer_is_factorised_from_its_effective_weight() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 10))
    sc.prune_(model, sparsity=0.6)
    with torch.no_grad():  # as an optimizer step would: raw values move, the mask holds
        model[0].parametrizations.weight.original.add_(1.0)
    masked = model[0].weight.detach().clone()
    assert get_mask(model[0], "weight") is not None
    assert int((masked == 0).sum()) == 72
    seq = factorize_linear(model[0], 10)
    torch.testing.assert_close(linear_product(seq), masked, rtol=1e-5, atol=1e-5)
    seq3 = factorize_linear(model[0], 3)
    s = svdvals64(masked)
    err = (masked.double() - linear_product(seq3).double()).square().sum()
    torch.testing.assert_close(err, s[3:].square().sum(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# rank rules


def test_energy_picks_the_smallest_rank_meeting_it() -> None:
    # squared spectrum 16, 9, 4, 1 (total 30): cumulative energy 0.533, 0.833, 0.967, 1
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    expected = {0.5: 1, 0.54: 2, 0.8: 2, 0.84: 3, 0.96: 3, 0.97: 4, 1.0: 4}
    for energy, rank in expected.items():
        assert rank_for_energy(s, energy) == rank, energy
    assert rank_for_energy(torch.zeros(3), 0.9) == 1


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=20),
    energy=st.floats(0.01, 1.0),
)
def test_energy_rank_is_minimal(values: list[float], energy: float) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    r = rank_for_energy(s, energy)
    sq = s.square()
    total = float(sq.sum())
    assert 1 <= r <= s.numel()
    if total > 0:
        assert float(sq[:r].sum()) >= energy * total * (1 - 1e-12)
        if r > 1:
            assert float(sq[: r - 1].sum()) < energy * total


def test_energy_rule_on_a_model_reports_kept_energy() -> None:
    spectrum = [2.0**-i for i in range(32)]
    model = nn.Sequential(nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 32))
    with torch.no_grad():
        model[0].weight.copy_(with_spectrum(40, 48, spectrum))
        model[2].weight.copy_(with_spectrum(32, 40, spectrum, seed=1))
    originals = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    report = report_of(factorize_(model, energy=0.999), LowRankReport)
    sq = torch.tensor(spectrum, dtype=torch.float64).square()
    cum = (sq.cumsum(0) / sq.sum()).tolist()
    expected_rank = next(i + 1 for i, c in enumerate(cum) if c >= 0.999)
    assert [layer.rank for layer in report.layers] == [expected_rank, expected_rank]
    for layer, w in zip(report.layers, originals, strict=True):
        assert layer.energy >= 0.999
        assert layer.full_rank == min(w.shape)
        seq = model.get_submodule(layer.name)
        assert isinstance(seq, nn.Sequential)
        rel = (w - linear_product(seq)).square().sum() / w.square().sum()
        assert float(rel) == pytest.approx(1 - layer.energy, abs=1e-6)
    assert count(model) < 48 * 40 + 40 + 40 * 32 + 32


def test_fixed_and_fractional_ranks() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 40))
    report = report_of(factorize_(model, rank=5), LowRankReport)
    assert [(m.rank, m.full_rank) for m in report.layers] == [(5, 48), (5, 40)]
    assert model[0][0].out_features == 5 and model[1][1].in_features == 5
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 40))
    report = report_of(factorize_(model, rank=0.3), LowRankReport)  # 0.3 of 48 is 14.4, rounded up
    assert [m.rank for m in report.layers] == [15, 12]


def test_a_layer_that_would_not_shrink_is_skipped() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 1))
    report = report_of(factorize_(model, rank=10), LowRankReport)
    # rank 10 of Linear(20, 20) costs 400 = the dense weight; Linear(20, 1) never shrinks
    assert report.layers == []
    assert {s.name for s in report.skipped} == {"0", "1"}
    assert all(type(m) is nn.Linear for m in model)
    report = report_of(factorize_(model, rank=9), LowRankReport)
    assert [m.name for m in report.layers] == ["0"]
    assert report.layers[0].params_after == 9 * 40 + 20
    assert count(model[0]) == 9 * 40 + 20


def budget_model() -> nn.Sequential:
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_params_budget_is_met(mode: str, fraction: float) -> None:
    model = budget_model()
    before = count(model)
    x = torch.randn(2, 8, 4, 4)
    report = report_of(factorize_(model, budget=sc.Params(fraction), mode=mode), LowRankReport)  # type: ignore[arg-type]
    after = count(model)
    budget = fraction * before
    assert after <= budget
    # greedy fills the budget up to less than one more rank of the costliest layer
    costliest = max(8 * 9 + 32, 32 * 9 + 32, 512 + 64, 64 + 10)
    assert budget - after < costliest
    replaced = {layer.name for layer in report.layers}
    assert report.params_before - report.params_after == before - after
    assert all(isinstance(model.get_submodule(n), nn.Sequential) for n in replaced)
    assert model(x).shape == (2, 10)


def test_params_budget_too_small_is_a_budget_error() -> None:
    model = budget_model()
    types, sd = structure(model), state(model)
    with pytest.raises(BudgetError, match="rank 1 everywhere"):
        factorize_(model, budget=sc.Params(0.01))
    assert_same(model, types, sd)


# ------------------------------------------------------------------------------------------
# models


def decay_spectra_(model: nn.Module, mode: str) -> None:
    """Give every factorisable weight a geometric spectrum, as trained networks have."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                matrix = m.weight
            elif isinstance(m, nn.Conv2d) and m.groups == 1:
                w = m.weight
                matrix = w.reshape(w.shape[0], -1) if mode == "channel" else spatial_matrix(w)
            else:
                continue
            u, s, vh = torch.linalg.svd(matrix.detach(), full_matrices=False)
            s = s[0] * 0.5 ** torch.arange(s.numel(), dtype=s.dtype)
            new = u @ torch.diag(s) @ vh
            if isinstance(m, nn.Conv2d) and mode == "spatial":
                out_c, in_c, kh, kw = m.weight.shape
                new = new.reshape(in_c, kh, out_c, kw).permute(2, 0, 1, 3)
            m.weight.copy_(new.reshape(m.weight.shape))


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("name", ["lenet-5", "resnet-20"])
def test_zoo_model_end_to_end(name: str, mode: str) -> None:
    model = build_model(name, seed=0)
    decay_spectra_(model, mode)
    model.eval()
    x = example_input(name, batch=2)
    expected = model(x).detach()
    before = count(model)
    report = report_of(factorize_(model, energy=0.9999, mode=mode), LowRankReport)  # type: ignore[arg-type]
    assert len(report.layers) >= 3
    assert all(layer.energy >= 0.9999 for layer in report.layers)
    assert count(model) == before - report.params_before + report.params_after < before
    out = model(x)
    rel = (out - expected).norm() / expected.norm()
    assert float(rel.detach()) < 0.005
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    json.dumps(report.to_dict())


def test_resnet_budget_and_random_weights_forward() -> None:
    model = build_model("resnet-20", seed=0)
    report = report_of(
        factorize_(model, budget=sc.Params(0.4), mode="spatial", exclude=[r"layers\.0\..*"]),
        LowRankReport,
    )
    assert report.layers and all(not layer.name.startswith("layers.0.") for layer in report.layers)
    assert all(layer.kind in ("conv-spatial", "linear") for layer in report.layers)
    assert model(example_input("resnet-20", batch=2)).shape == (2, 10)


def test_prune_then_factorize_then_prune_again(mlp: nn.Sequential) -> None:
    sc.prune_(mlp, sparsity=0.5)
    masked = [mlp[0].weight.detach().clone(), mlp[2].weight.detach().clone()]
    report = report_of(factorize_(mlp, rank=0.5), LowRankReport)
    assert [layer.rank for layer in report.layers] == [8, 4]
    for i, (index, w) in enumerate(zip((0, 2), masked, strict=True)):
        s = svdvals64(w)
        err = (w.double() - linear_product(mlp[index]).double()).square().sum()
        torch.testing.assert_close(
            err, s[report.layers[i].rank :].square().sum(), rtol=1e-4, atol=1e-6
        )
    assert all(type(m) is nn.Linear for m in (*mlp[0], *mlp[2]))
    sc.prune_(mlp, sparsity=0.5)
    factors = [mlp[0][0], mlp[0][1], mlp[2][0], mlp[2][1]]
    assert all(get_mask(m, "weight") is not None for m in factors)
    zeros = sum(int((m.weight == 0).sum()) for m in factors)
    assert zeros == pytest.approx(0.5 * sum(m.weight.numel() for m in factors), abs=2)
    x = torch.randn(4, 16)
    mlp(x).square().sum().backward()
    assert all(m.parametrizations.weight.original.grad is not None for m in factors)


def test_grouped_conv_is_skipped_by_default_and_refused_by_name(cnn: nn.Module) -> None:
    report = report_of(factorize_(cnn, rank=2), LowRankReport)
    skipped = {s.name: s.reason for s in report.skipped}
    assert "groups=2" in skipped["conv2"]
    assert {layer.name for layer in report.layers} == {"conv1", "fc"}
    assert type(cnn.conv2) is nn.Conv2d
    assert cnn(torch.randn(2, 3, 4, 4)).shape == (2, 10)


def test_a_type_selector_skips_unsupported_layers(cnn: nn.Module) -> None:
    report = report_of(factorize_(cnn, rank=2, include=[nn.Conv2d]), LowRankReport)
    assert [layer.name for layer in report.layers] == ["conv1"]
    assert [s.name for s in report.skipped] == ["conv2"]


def test_shared_module_is_replaced_everywhere_and_tied_weights_are_skipped() -> None:
    torch.manual_seed(7)
    shared = nn.Linear(30, 30)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(2, 30)
    report = report_of(factorize_(model, rank=3), LowRankReport)
    assert len(report.layers) == 1 and model[0] is model[2]
    assert isinstance(model[0], nn.Sequential)
    assert model(x).shape == (2, 30)
    tied = nn.Sequential(nn.Linear(30, 30), nn.Linear(30, 30), nn.Linear(30, 30))
    tied[1].weight = tied[0].weight
    report = report_of(factorize_(tied, rank=3), LowRankReport)
    assert [layer.name for layer in report.layers] == ["2"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons.keys() == {"0", "1"} and all("shared" in r for r in reasons.values())


def test_attention_out_proj_is_skipped() -> None:
    model = nn.Sequential(nn.MultiheadAttention(32, 2, batch_first=True))
    with pytest.raises(ModelError, match="MultiheadAttention"):
        factorize_(model, rank=2)


# ------------------------------------------------------------------------------------------
# bad input leaves the model untouched


BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"energy": 0.0}, ConfigError, r"energy must be a number in \(0, 1\]"),
    ({"energy": 1.5}, ConfigError, "energy"),
    ({"energy": True}, ConfigError, "energy"),
    ({"rank": 0}, ConfigError, "rank as an integer must be >= 1"),
    ({"rank": -3}, ConfigError, "rank"),
    ({"rank": 1.5}, ConfigError, "rank as a float"),
    ({"rank": "4"}, ConfigError, "rank must be an int"),
    ({"budget": sc.Sparsity(0.5)}, ConfigError, r"sc\.Params"),
    ({"energy": 0.9, "rank": 2}, ConfigError, "exactly one of"),
    ({}, ConfigError, "exactly one of"),
    ({"rank": 2, "mode": "depthwise"}, ConfigError, "mode must be one of 'channel', 'spatial'"),
    ({"rank": 2, "include": ["nope"]}, ConfigError, "include pattern 'nope' matches no"),
    ({"rank": 2, "exclude": ["fc", "nope"]}, ConfigError, "exclude pattern 'nope'"),
    ({"rank": 2, "include": ["[bad"]}, ConfigError, "not a valid regular expression"),
    ({"rank": 2, "include": [42]}, ConfigError, "regex strings, nn.Module subclasses"),
    ({"rank": 2, "include": ["conv2"]}, ModelError, r"conv2 cannot be factorised.*groups=2"),
    ({"rank": 2, "include": ["conv.*"]}, ModelError, "groups"),
    ({"budget": sc.Params(0.001)}, BudgetError, "raise the budget"),
    ({"budget": 0.5}, ConfigError, r"sc\.Params"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_raises_and_leaves_the_model_untouched(
    cnn: nn.Module, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    types, sd = structure(cnn), state(cnn)
    with pytest.raises(error, match=match):
        factorize_(cnn, **kwargs)
    assert_same(cnn, types, sd)


def test_spatial_mode_refuses_conv1d_by_name_and_skips_it_by_default() -> None:
    model = nn.Sequential(nn.Conv1d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4, 16))
    types, sd = structure(model), state(model)
    with pytest.raises(ModelError, match="spatial"):
        factorize_(model, rank=2, mode="spatial", include=["0"])
    assert_same(model, types, sd)
    report = report_of(factorize_(model, rank=2, mode="spatial"), LowRankReport)
    assert [s.name for s in report.skipped] == ["0"]
    assert [layer.name for layer in report.layers] == ["2"]


def test_nothing_to_factorise_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="no layer to factorise"):
        factorize_(nn.Sequential(nn.ReLU()), rank=2)


def test_single_layer_argument_checks() -> None:
    layer = nn.Linear(4, 6)
    before = layer.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"rank must be an integer in 1\.\.4"):
        factorize_linear(layer, 5)
    with pytest.raises(ConfigError, match="rank"):
        factorize_linear(layer, 0)
    with pytest.raises(ModelError, match="groups"):
        factorize_conv(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(ModelError, match="transposed"):
        factorize_conv(nn.ConvTranspose2d(4, 4, 3), 2)
    with pytest.raises(ConfigError, match="mode"):
        factorize_conv(nn.Conv2d(4, 4, 3), 2, "diagonal")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"nn\.Linear"):
        factorize_linear(nn.Conv2d(4, 4, 3), 2)  # type: ignore[arg-type]
    assert torch.equal(layer.weight, before)
