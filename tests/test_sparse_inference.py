"""Sparse inference modules: equal to dense, chosen only where faster, reversible, clear errors."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs.compress.inference as inference
from secateurs.compress.inference import (
    BlockSparseLinear,
    SemiStructuredLinear,
    SparseConv2d,
    SparseLinear,
    SparsifyReport,
    check_semi_structured,
    choose_block,
    densify_,
    semi_structured_unsupported,
    sparsify_,
)
from secateurs.errors import ConfigError, ModelError
from secateurs.masks import raw_parameter, set_mask
from secateurs.provenance import report_of


def _zero_out(weight: Any, density: float, g: torch.Generator) -> None:
    assert isinstance(weight, torch.Tensor)
    with torch.no_grad():
        weight.mul_(torch.rand(weight.shape, generator=g, device=g.device) < density)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@st.composite
def linear_cases(draw: st.DrawFn, multiple: int = 1) -> tuple[nn.Linear, torch.Tensor]:
    """A Linear with random density, some all-zero rows, and an input with random lead dims."""
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    fan_in = multiple * draw(st.integers(1, 24 // multiple + 1))
    fan_out = multiple * draw(st.integers(1, 24 // multiple + 1))
    torch.manual_seed(seed)
    layer = nn.Linear(fan_in, fan_out, bias=draw(st.booleans()))
    _zero_out(layer.weight, draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0])), g)
    zero_rows = draw(st.lists(st.integers(0, fan_out - 1), max_size=fan_out))
    with torch.no_grad():
        layer.weight[zero_rows] = 0
    lead = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
    return layer, torch.randn((*lead, fan_in), generator=g)


# --------------------------------------------------------------------------- equivalence


@settings(max_examples=25, deadline=None)
@given(case=linear_cases())
def test_csr_linear_equals_dense(case: tuple[nn.Linear, torch.Tensor]) -> None:
    layer, x = case
    sparse = SparseLinear(layer)
    y = sparse(x)
    assert _close(y, layer(x))
    assert y.is_contiguous()
    assert sparse.nnz == int(torch.count_nonzero(layer.weight))


@settings(max_examples=25, deadline=None)
@given(case=linear_cases(multiple=4), block=st.sampled_from([1, 2, 4, None]))
def test_bsr_linear_equals_dense(case: tuple[nn.Linear, torch.Tensor], block: int | None) -> None:
    layer, x = case
    sparse = BlockSparseLinear(layer, block=block)
    assert sparse.block is not None and layer.weight.shape[0] % sparse.block == 0
    assert _close(sparse(x), layer(x))


def test_all_zero_weight_gives_the_bias() -> None:
    layer = nn.Linear(8, 5)
    with torch.no_grad():
        layer.weight.zero_()
    x = torch.randn(3, 8)
    for sparse in (SparseLinear(layer), BlockSparseLinear(layer, block=1)):
        assert sparse.nnz == 0 or sparse.values.abs().sum() == 0
        assert torch.allclose(sparse(x), layer.bias.expand(3, 5))
        assert torch.allclose(sparse(x[0]), layer.bias)


def test_reads_the_masked_weight_not_the_raw_one() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    mask = torch.rand(6, 12) < 0.3
    set_mask(layer, "weight", mask)
    with torch.no_grad():  # stale raw values behind the mask must not leak into the sparse layer
        raw_parameter(layer, "weight").add_(1.0)
    x = torch.randn(4, 12)
    sparse = SparseLinear(layer)
    assert sparse.nnz == int(mask.sum())
    assert _close(sparse(x), layer(x))


CONV_CASES: list[dict[str, Any]] = [
    {"kernel_size": 1},
    {"kernel_size": 1, "stride": 2},
    {"kernel_size": 1, "padding": 1},
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2},
    {"kernel_size": (2, 3), "padding": "same"},
    {"kernel_size": 3, "padding": "valid", "bias": False},
    {"kernel_size": (3, 5), "padding": (1, 2), "stride": (2, 1)},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 4, "padding": (1, 2), "stride": (1, 2), "padding_mode": "circular"},
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "kwargs", CONV_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
)
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_conv_equals_dense(kwargs: dict[str, Any], fmt: str) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, **kwargs)
    _zero_out(conv.weight, 0.3, torch.Generator().manual_seed(1))
    sparse = SparseConv2d(conv, format=fmt, block=4 if fmt == "bsr" else None)
    for shape in [(1, 4, 7, 9), (3, 4, 7, 9), (4, 7, 9)]:
        x = torch.randn(shape)
        assert _close(sparse(x), conv(x)), shape
    back = sparse.to_dense_module()
    x = torch.randn(2, 4, 7, 9)
    assert torch.equal(back.weight, conv.weight) and _close(back(x), conv(x))


def test_grouped_and_wrong_layers_are_refused() -> None:
    with pytest.raises(ModelError, match="groups=2"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ModelError, match=r"nn\.Linear"):
        SparseLinear(nn.Conv2d(4, 4, 3))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="format"):
        SparseLinear(nn.Linear(4, 4), format="coo")
    with pytest.raises(ConfigError, match="block"):
        BlockSparseLinear(nn.Linear(4, 4), block=0)
    with pytest.raises(ModelError, match="does not divide"):
        BlockSparseLinear(nn.Linear(8, 8), block=3)
    with pytest.raises(ModelError, match="no square block size"):
        BlockSparseLinear(nn.Linear(6, 10))


def test_choose_block_prefers_the_largest_tight_block() -> None:
    w = torch.zeros(32, 32)
    w[8:16, 8:16] = 1.0  # one 8x8 tile: blocks of 8 and 4 store 64 values, 16 stores 256
    assert choose_block(w) == 8
    assert choose_block(torch.ones(10, 6)) is None


def test_state_dict_deepcopy_and_loading_a_different_sparsity() -> None:
    torch.manual_seed(2)
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    _zero_out(a.weight, 0.2, torch.Generator().manual_seed(0))
    _zero_out(b.weight, 0.6, torch.Generator().manual_seed(1))
    sa, sb = SparseLinear(a), SparseLinear(b)
    assert sa.nnz != sb.nnz
    buffer = io.BytesIO()
    torch.save(sa.state_dict(), buffer)
    buffer.seek(0)
    sb.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(5, 16)
    assert _close(sb(x), a(x))
    assert _close(copy.deepcopy(sa)(x), a(x))
    assert _close(sa.double()(x.double()), a.double()(x.double()))


# --------------------------------------------------------------------------- sparsify_


class Net(nn.Module):
    """Conv -> grouped conv -> 1x1 conv -> Linear -> shared Linear twice; one Linear unused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.point = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 32)
        self.shared = nn.Linear(32, 32)
        self.unused = nn.Linear(32, 32)
        self.dense = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.point(torch.relu(self.grouped(torch.relu(self.conv(x))))))
        x = torch.relu(self.fc(x.flatten(1)))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        return self.dense(x)


def make_net(density: float = 0.1) -> Net:
    torch.manual_seed(3)
    net = Net()
    g = torch.Generator().manual_seed(3)
    for name in ("conv", "grouped", "point", "fc", "shared", "unused"):
        _zero_out(getattr(net, name).weight, density, g)
    return net


Script = dict[str, float | list[float]] | Callable[[str, int], float]


def fake_race(times: Script) -> Callable[..., None]:
    """Stand-in for the timing loop: runs each call, records scripted times per candidate
    (a constant, a list cycled over the rounds, or a function of the name and race number)."""
    races = {"n": 0}

    def race(
        calls: dict[str, Callable[[], Any]],
        rounds: int,
        time_ms: Callable[[Callable[[], Any]], float],
        samples: dict[str, list[float]],
    ) -> None:
        races["n"] += 1
        for name, fn in calls.items():
            fn()
            if callable(times):
                samples[name].extend([times(name, races["n"])] * rounds)
                continue
            script = times[name]
            cycle = script if isinstance(script, list) else [script]
            samples[name].extend(cycle[r % len(cycle)] for r in range(rounds))

    return race


def assert_consistent(report: inference.SparsifyReport, model: nn.Module) -> None:
    """Every decision agrees with the report's own timings and with the model."""
    modules = dict(model.named_modules())
    for layer in report.layers:
        if layer.chosen == "dense":
            assert not isinstance(modules[layer.name], inference.SPARSE_MODULES)
            continue
        assert layer.dense_ms is not None and layer.sparse_ms is not None
        assert layer.dense_ms / layer.sparse_ms >= report.min_speedup
        assert layer.sparse_p75_ms is not None and layer.dense_p75_ms is not None
        assert layer.sparse_p75_ms <= layer.dense_p75_ms
        assert layer.sparse_format == layer.chosen
        measured = {k: v for k, v in layer.candidates.items() if v is not None}
        assert layer.sparse_ms == min(measured.values()) == measured[layer.chosen]
        module = modules[layer.name]
        assert isinstance(module, inference.SPARSE_MODULES)
        assert getattr(module, "format", "2:4") == layer.chosen


def test_sparsify_replaces_where_faster_and_keeps_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        inference, "_interleaved", fake_race({"dense": 10.0, "csr": 2.0, "bsr": 4.0})
    )
    net = make_net()
    x = torch.randn(2, 3, 4, 4)
    expected = net(x)
    report = report_of(sparsify_(net, x, repeats=3), SparsifyReport)
    by_name = {layer.name: layer for layer in report.layers}
    assert set(report.replaced) == {"conv", "point", "fc", "shared"}
    assert isinstance(net.conv, SparseConv2d) and isinstance(net.fc, SparseLinear)
    assert net.fc.format == "csr" and by_name["fc"].sparse_ms == 2.0
    assert by_name["grouped"].chosen == "dense" and "grouped" in by_name["grouped"].reason
    assert by_name["unused"].chosen == "dense" and "not called" in by_name["unused"].reason
    assert by_name["dense"].chosen == "dense" and "no zero" in by_name["dense"].reason
    assert "called 2 times" in by_name["shared"].reason
    assert by_name["fc"].input_shape == [2, 128]
    assert_consistent(report, net)
    assert _close(net(x), expected)
    assert report.to_dict()["layers"][0]["speedup"] == pytest.approx(5.0)
    assert "sparse" in str(report)


def test_sparsify_never_picks_a_slower_or_unconfirmed_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = make_net()
    x = torch.randn(1, 3, 4, 4)
    state = copy.deepcopy(net.state_dict())
    monkeypatch.setattr(
        inference, "_interleaved", fake_race({"dense": 10.0, "csr": 9.5, "bsr": 9.8})
    )
    report = report_of(sparsify_(net, x, repeats=3), SparsifyReport)  # 1.05x < min_speedup 1.1
    assert report.replaced == []
    # fast in the first race, slow in the confirmation: a fluke, kept dense. With one format
    # and repeats=3 each layer runs three races: warm-up, the race, the confirmation.
    flaky = fake_race(
        lambda name, race: 10.0 if name == "dense" else (9.5 if race % 3 == 0 else 1.0)
    )
    monkeypatch.setattr(inference, "_interleaved", flaky)
    report = report_of(sparsify_(net, x, repeats=3, formats="csr"), SparsifyReport)
    assert report.replaced == []
    assert any("confirmation" in layer.reason for layer in report.layers)
    # faster at the median, but stalls now and then (a kernel fighting for a busy core)
    stalls = fake_race({"dense": 10.0, "csr": [1.0, 40.0, 1.0]})
    monkeypatch.setattr(inference, "_interleaved", stalls)
    report = report_of(sparsify_(net, x, repeats=9, formats="csr"), SparsifyReport)
    assert report.replaced == []
    assert all(
        "slower runs are slower" in layer.reason for layer in report.layers if layer.dense_ms
    )
    assert_consistent(report, net)
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_sparsify_with_real_timings_is_consistent_and_never_slower() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
    _zero_out(model[0].weight, 0.02, torch.Generator().manual_seed(0))  # very sparse
    x = torch.randn(1, 256)
    expected = model(x)
    report = report_of(sparsify_(model, x, repeats=5), SparsifyReport)
    assert report.layers[1].chosen == "dense"  # no zeros at all: never measured, never replaced
    assert report.layers[1].dense_ms is None
    assert_consistent(report, model)
    assert _close(model(x), expected)
    # an unreachable margin keeps every layer dense, whatever the timings
    torch.manual_seed(4)
    again = nn.Sequential(nn.Linear(256, 256))
    _zero_out(again[0].weight, 0.02, torch.Generator().manual_seed(0))
    report = report_of(sparsify_(again, x, repeats=3, min_speedup=1e9), SparsifyReport)
    assert report.replaced == [] and isinstance(again[0], nn.Linear)
    assert report.layers[0].dense_ms is not None and report.layers[0].sparse_ms is not None


def test_sparsify_restores_modes_and_masked_layers_become_plain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inference, "_interleaved", fake_race({"dense": 10.0, "csr": 1.0}))
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    set_mask(model[0], "weight", torch.rand(16, 16) < 0.2)
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    model[0].eval()
    report = report_of(sparsify_(model, x, formats=["csr"], repeats=2), SparsifyReport)
    assert report.replaced == ["0"]
    assert model.training and model[1].training and model[2].training
    assert not model[0].training  # the new module takes the replaced one's mode
    model.eval()
    assert _close(model(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"formats": ("csr", "coo")}, ConfigError, "coo"),
        ({"formats": ()}, ConfigError, "at least one"),
        ({"min_speedup": 0.9}, ConfigError, "min_speedup"),
        ({"min_speedup": math.nan}, ConfigError, "min_speedup"),
        ({"min_speedup": "fast"}, ConfigError, "min_speedup"),
        ({"repeats": 0}, ConfigError, "repeats"),
        ({"warmup": -1}, ConfigError, "warmup"),
    ],
)
def test_bad_arguments_raise_and_touch_nothing(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    net = make_net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(error, match=match):
        sparsify_(net, torch.randn(1, 3, 4, 4), **kwargs)
    assert all(type(m) in (Net, nn.Conv2d, nn.Linear) for m in net.modules())
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_bad_models_and_inputs_raise() -> None:
    with pytest.raises(ModelError, match=r"no nn\.Linear or nn\.Conv2d"):
        sparsify_(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(ModelError, match=r"nn\.Sequential"):
        sparsify_(nn.Linear(3, 3), torch.randn(2, 3))
    with pytest.raises(ConfigError, match="example_inputs"):
        sparsify_(make_net(), 3)  # type: ignore[arg-type]
    net = make_net()
    net.train()
    with pytest.raises(ModelError, match="failed on the example inputs"):
        sparsify_(net, torch.randn(1, 5, 4, 4))
    assert net.training and all(isinstance(m, (Net, nn.Conv2d, nn.Linear)) for m in net.modules())


def test_densify_round_trip_restores_plain_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        inference, "_interleaved", fake_race({"dense": 10.0, "csr": 5.0, "bsr": 1.0})
    )
    net = make_net()
    x = torch.randn(2, 3, 4, 4)
    expected = net(x)
    keys = set(net.state_dict())
    report = report_of(sparsify_(net, x, repeats=2), SparsifyReport)
    chosen = {layer.name: layer for layer in report.layers if layer.name in report.replaced}
    assert {chosen[n].chosen for n in ("point", "fc", "shared")} == {"bsr"}  # the fastest wins
    # conv's 8x27 matrix has no square block: CSR, with the reason BSR was not raced
    assert chosen["conv"].chosen == "csr" and "bsr: no square block size" in chosen["conv"].reason
    assert isinstance(net.shared, SparseLinear)
    assert densify_(net) is net
    assert not any(isinstance(m, inference.SPARSE_MODULES) for m in net.modules())
    assert type(net.fc) is nn.Linear and type(net.conv) is nn.Conv2d
    assert set(net.state_dict()) == keys
    fresh = Net()
    fresh.load_state_dict(net.state_dict(), strict=True)
    assert _close(fresh(x), expected)


# --------------------------------------------------------------------------- 2:4


def _two_four(rows: int, cols: int, dtype: torch.dtype, device: str = "cpu") -> nn.Linear:
    torch.manual_seed(6)
    layer = nn.Linear(cols, rows, dtype=dtype, device=device)
    keep = torch.tensor([1.0, 1.0, 0.0, 0.0], device=device).repeat(rows, cols // 4)
    with torch.no_grad():
        layer.weight.mul_(keep.to(dtype))
    return layer


def test_semi_structured_errors_are_clear_without_a_gpu() -> None:
    with pytest.raises(ModelError, match="float16 or bfloat16"):
        check_semi_structured(torch.zeros(64, 64))
    dense = torch.ones(64, 64, dtype=torch.float16)
    with pytest.raises(ModelError, match="not 2:4 sparse"):
        check_semi_structured(dense)
    with pytest.raises(ModelError, match="multiple of"):
        check_semi_structured(_two_four(24, 64, torch.float16).weight)
    if semi_structured_unsupported() is not None:
        with pytest.raises(ModelError, match="unavailable"):
            SemiStructuredLinear(_two_four(64, 64, torch.float16))


def test_sparsify_reports_why_2_4_was_not_used() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    _zero_out(model[0].weight, 0.5, torch.Generator().manual_seed(0))
    report = report_of(
        sparsify_(model, torch.randn(1, 8), formats=("2:4",), repeats=1), SparsifyReport
    )
    assert report.replaced == []
    assert "2:4" in report.layers[0].reason


needs_sm80 = pytest.mark.skipif(
    semi_structured_unsupported() is not None,
    reason=f"2:4 sparse tensor cores: {semi_structured_unsupported()}",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_sm80
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_linear_on_gpu(dtype: torch.dtype) -> None:
    layer = _two_four(128, 256, dtype, "cuda")
    sparse = SemiStructuredLinear(layer)
    x = torch.randn(3, 5, 256, dtype=dtype, device="cuda")
    expected = layer(x)
    y = sparse(x)
    assert y.shape == expected.shape and y.dtype == dtype
    scale = float(expected.abs().max())
    assert torch.allclose(y.float(), expected.float(), rtol=2e-2, atol=2e-2 * scale)
    back = sparse.to_dense_module()
    assert torch.equal(back.weight, layer.weight)
    model = nn.Sequential(_two_four(128, 256, dtype, "cuda"))
    report = report_of(
        sparsify_(model, x, formats=("2:4", "csr"), repeats=3, min_speedup=1.0), SparsifyReport
    )
    assert_consistent(report, model)
    assert densify_(model).get_submodule("0").weight.shape == (128, 256)


@pytest.mark.gpu
@needs_cuda
def test_csr_linear_on_gpu() -> None:
    torch.manual_seed(7)
    layer = nn.Linear(64, 32, device="cuda")
    _zero_out(layer.weight, 0.1, torch.Generator(device="cuda").manual_seed(0))
    x = torch.randn(4, 64, device="cuda")
    assert _close(SparseLinear(layer)(x), layer(x))


def test_shared_modules_are_swapped_everywhere_and_hopeless_candidates_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        inference, "_interleaved", fake_race({"dense": 10.0, "csr": 1.0, "bsr": 25.0})
    )
    torch.manual_seed(8)
    shared = nn.Linear(16, 16)
    _zero_out(shared.weight, 0.1, torch.Generator().manual_seed(0))
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(2, 16)
    expected = model(x)
    report = report_of(sparsify_(model, x, repeats=5), SparsifyReport)
    assert report.replaced == ["0"]
    assert "bsr: over 2x slower than dense" in report.layers[0].reason
    assert report.layers[0].candidates["bsr"] == 25.0
    assert isinstance(model[0], SparseLinear) and model[2] is model[0]
    assert _close(model(x), expected)
    densify_(model)
    assert type(model[0]) is nn.Linear and model[2] is model[0]
    assert _close(model(x), expected)


def test_candidates_that_are_wrong_or_fail_are_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        inference, "_interleaved", fake_race({"dense": 10.0, "csr": 1.0, "bsr": 1.0})
    )

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no kernel for this dtype")

    def build(module: nn.Module, fmt: str) -> nn.Module:
        if fmt == "bsr":
            return Broken()
        wrong = copy.deepcopy(module)
        with torch.no_grad():
            wrong.weight.add_(1.0)  # type: ignore[operator]
        return wrong

    monkeypatch.setattr(inference, "_quiet_build", build)
    model = nn.Sequential(nn.Linear(8, 8))
    _zero_out(model[0].weight, 0.3, torch.Generator().manual_seed(0))
    report = report_of(sparsify_(model, torch.randn(2, 8), repeats=2), SparsifyReport)
    assert report.replaced == [] and type(model[0]) is nn.Linear
    reason = report.layers[0].reason
    assert "csr: output differs" in reason and "bsr: failed on the layer's input" in reason
