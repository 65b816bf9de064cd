"""The per-layer latency look-up table NetAdapt uses (Yang et al. 2018): predictions, the cache.

Timing on a shared 2-core machine is noisy: tolerances are generous, no absolute time is
asserted, and everything is timed with one thread.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import ConfigError
from secateurs.graph import ChannelGraph, build_graph
from secateurs.graph import latency as lt
from secateurs.graph.latency import LatencyTable, default_cache_dir
from secateurs.metrics import measure_latency, profile
from secateurs.search.space import ChannelSpace
from secateurs.zoo import build_model

X_VGG = torch.randn(1, 1, 28, 28)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_convnet(width: int = 16, groups: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=groups),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 5),
    )


@pytest.fixture(scope="module")
def vgg(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, ChannelGraph, Path]:
    torch.set_num_threads(1)
    model = build_model("vgg-bn")
    model.eval()
    return model, build_graph(model, X_VGG), tmp_path_factory.mktemp("latency")


@pytest.fixture(scope="module")
def vgg_table(vgg: tuple[nn.Module, ChannelGraph, Path]) -> LatencyTable:
    model, graph, cache = vgg
    previous = torch.get_num_threads()
    start = time.perf_counter()
    table = LatencyTable.build(model, X_VGG, graph, cache_dir=cache)
    print(f"VGG-BN latency table built in {time.perf_counter() - start:.2f} s")
    assert torch.get_num_threads() == previous  # the thread count is put back
    return table


def _no_timing(*_: object, **__: object) -> float:
    raise AssertionError("a cached table was timed again")


def _relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def _measured(models: list[nn.Module], x: torch.Tensor, rounds: int = 3) -> list[float]:
    """Each model's latency: the lowest median of ``rounds`` interleaved measurements (other
    work on a shared machine only ever adds time, and interleaving exposes every model to the
    same load)."""
    best = [float("inf")] * len(models)
    for _ in range(rounds):
        for i, m in enumerate(models):
            best[i] = min(best[i], measure_latency(m, x, warmup=3, repeats=15, threads=1).median_ms)
    return best


def _check_predictions(
    table: LatencyTable, model: nn.Module, x: torch.Tensor, removals: tuple[float, ...], tol: float
) -> list[str]:
    """What is off, for shrunk copies of ``model``: the predicted latency relative to the dense
    prediction against the measured one relative to the measured dense model (relative, so a
    machine that got uniformly busier since the table was built does not count), and the
    absolute prediction against the measurement with twice the tolerance."""
    smalls = [sc.shrink(model, x, sc.Sparsity(r)) for r in removals]
    dense, *measured = _measured([model, *smalls], x)
    problems = []
    for r, small, m in zip(removals, smalls, measured, strict=True):
        predicted = table.estimate(build_graph(small, x).shapes)
        ratio_error = _relative_error(predicted / table.dense_estimate(), m / dense)
        if ratio_error > tol or _relative_error(predicted, m) > 2 * tol:
            problems.append(f"removed {r}: predicted {predicted:.3f} ms, measured {m:.3f} ms")
    return problems


class _Clock:
    """A deterministic machine for the table's logic: a module costs 1 ms per million MACs
    plus 0.001 ms, a whole model 1 ms per million MACs plus 0.05 ms for everything else.
    (How well the table predicts this machine's real timings is measured in
    ``benchmarks/bench_allocation.py --part latency``: wall-clock checks do not belong in
    tests on a shared machine.)"""

    @staticmethod
    def macs(module: nn.Module, x: torch.Tensor) -> float:
        return float(profile(module, x).totals["macs"] or 0) / 1e6

    def time_module(self, module: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
        return self.macs(module, x) + 0.001

    def measure_latency(self, model: nn.Module, x: torch.Tensor, **_: object) -> Any:
        return SimpleNamespace(median_ms=self.macs(model, x) + 0.05)


def test_vgg_table_predicts_pruned_models(
    vgg: tuple[nn.Module, ChannelGraph, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a machine whose times are a known function of the layers, shrunk VGG-BNs are
    predicted from their weight shapes alone (no run) within 5%."""
    model, graph, _ = vgg
    clock = _Clock()
    monkeypatch.setattr(lt, "time_module", clock.time_module)
    monkeypatch.setattr(lt, "measure_latency", clock.measure_latency)
    table = LatencyTable.build(model, X_VGG, graph, cache_dir=tmp_path)
    assert table.dense_estimate() == pytest.approx(table.dense_ms, rel=1e-6)
    assert table.rest_ms >= 0 and table.scaled_ms >= 0
    assert {e.module for e in table.entries} == {
        "features.0.0",
        "features.1.0",
        "features.3.0",
        "features.4.0",
        "features.6.0",
        "classifier",
    }
    for removal in (0.3, 0.6):
        small = sc.shrink(model, X_VGG, sc.Sparsity(removal))
        predicted = table.estimate(build_graph(small, X_VGG).shapes)
        measured = clock.measure_latency(small, X_VGG).median_ms
        assert predicted == pytest.approx(measured, rel=0.05), removal


def test_vgg_table_is_built_from_real_timings(
    vgg: tuple[nn.Module, ChannelGraph, Path], vgg_table: LatencyTable
) -> None:
    """The real table: every layer timed, the dense prediction is the measured dense model,
    and a model with channels removed is predicted faster (no tolerance on real times)."""
    model, _, _ = vgg
    assert not vgg_table.from_cache
    assert vgg_table.dense_estimate() == pytest.approx(vgg_table.dense_ms, rel=1e-6)
    assert all(ms > 0 for e in vgg_table.entries for row in e.ms for ms in row)
    small = sc.shrink(model, X_VGG, sc.Sparsity(0.6))
    assert vgg_table.estimate(build_graph(small, X_VGG).shapes) < vgg_table.dense_estimate()


def test_prediction_is_monotone_in_width(
    vgg: tuple[nn.Module, ChannelGraph, Path], vgg_table: LatencyTable
) -> None:
    """A narrower layer (or network) is never predicted slower: the grids are made monotone."""
    _, graph, _ = vgg
    for entry in vgg_table.entries:
        for row in entry.ms:
            assert all(a <= b + 1e-12 for a, b in itertools.pairwise(row))
        for col in zip(*entry.ms, strict=True):
            assert all(a <= b + 1e-12 for a, b in itertools.pairwise(col))
    groups = graph.prunable_groups
    previous = float("inf")
    for fraction in (0.0, 0.25, 0.5, 0.75, 0.9):
        removed = {}
        for g in groups:
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[: min(int(fraction * g.size), g.size - 1)] = True
            removed[g.index] = mask
        value = vgg_table.estimate(graph.shapes_after(removed))
        assert value <= previous + 1e-9
        previous = value
    assert previous < vgg_table.dense_ms


def test_second_build_loads_the_cache_and_times_nothing(
    vgg: tuple[nn.Module, ChannelGraph, Path],
    vgg_table: LatencyTable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, graph, cache = vgg

    monkeypatch.setattr(lt, "time_module", _no_timing)
    monkeypatch.setattr(lt, "measure_latency", _no_timing)
    again = LatencyTable.build(model, X_VGG, graph, cache_dir=cache)
    assert again.from_cache
    assert again.key == vgg_table.key and again.path == vgg_table.path
    assert again.path is not None and again.path.parent == cache
    shapes = graph.shapes_after({g.index: g.prunable.clone() for g in graph.prunable_groups[:2]})
    assert again.estimate(shapes) == pytest.approx(vgg_table.estimate(shapes))
    assert again.estimate({}) == pytest.approx(vgg_table.estimate({}))


def test_cache_key_changes_with_geometry_input_and_threads(
    vgg: tuple[nn.Module, ChannelGraph, Path], vgg_table: LatencyTable
) -> None:
    model, graph, _ = vgg
    key, _, meta = LatencyTable.describe(model, X_VGG, graph)
    assert key == vgg_table.key  # describing does not depend on timing
    assert meta["threads"] == 1 and meta["torch"] == torch.__version__ and meta["cpu"]
    narrow = build_model("vgg-bn", width=0.5)
    assert LatencyTable.describe(narrow, X_VGG, build_graph(narrow, X_VGG))[0] != key
    bigger = torch.randn(2, 1, 28, 28)
    assert LatencyTable.describe(model, bigger, build_graph(model, bigger))[0] != key
    assert LatencyTable.describe(model, X_VGG, graph, threads=2)[0] != key
    assert LatencyTable.describe(model, X_VGG, graph, points=4)[0] != key


def test_small_convnet_grouped_and_cache_dir_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Depthwise convolutions lose whole groups (one axis); the cache goes where
    ``$SECATEURS_CACHE`` says when no directory is given; channel_measure uses the table."""
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "latency"
    model = small_convnet(width=16, groups=16)
    x = torch.randn(1, 3, 16, 16)
    graph = build_graph(model, x)
    table = LatencyTable.build(model, x, graph)
    assert table.path is not None and table.path.parent == tmp_path / "latency"
    assert table.path.exists()
    depthwise = next(e for e in table.entries if e.module == "3")
    assert (
        depthwise.grouped
        and depthwise.outs == [0]
        and depthwise.ins == [2, 4, 6, 8, 10, 12, 14, 16]
    )
    # the space's Latency measure loads the same table (same options, same key)
    monkeypatch.setattr(lt, "time_module", _no_timing)
    space = ChannelSpace(model, x)
    budget = sc.Latency(0.9)
    assert space.unit(budget) == "ms (predicted)"
    assert space.measure(budget, {}) == pytest.approx(table.dense_estimate())
    assert space.limit(budget) == pytest.approx(0.9 * table.dense_estimate())
    assert space.measure(budget, space.max_ratios()) < space.measure(budget, {})
    problems = _check_predictions(table, model, x, (0.5,), tol=0.5)
    if problems:  # noise: once more with a fresh table
        fresh = LatencyTable.build(model, x, graph, cache_dir=tmp_path / "again")
        problems = _check_predictions(fresh, model, x, (0.5,), tol=0.5)
    assert not problems, problems


def test_corrupt_cache_is_measured_again(tmp_path: Path) -> None:
    model = small_convnet(width=8)
    x = torch.randn(1, 3, 8, 8)
    graph = build_graph(model, x)
    first = LatencyTable.build(model, x, graph, cache_dir=tmp_path, points=2, repeats=1)
    assert first.path is not None
    first.path.write_text("{not json")
    again = LatencyTable.build(model, x, graph, cache_dir=tmp_path, points=2, repeats=1)
    assert not again.from_cache
    assert json.loads(first.path.read_text())["key"] == first.key  # rewritten
    assert LatencyTable.build(model, x, graph, cache_dir=tmp_path, points=2, repeats=1).from_cache


@pytest.mark.parametrize(
    "options",
    [{"threads": 0}, {"points": 1}, {"repeats": 0}, {"warmup": -1}, {"points": 2.5}],
)
def test_bad_options(options: dict[str, object], tmp_path: Path) -> None:
    model = small_convnet(width=4)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ConfigError, match=next(iter(options))):
        LatencyTable.build(model, x, build_graph(model, x), cache_dir=tmp_path, **options)  # type: ignore[arg-type]
