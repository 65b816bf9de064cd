"""The public surface: one shape for every call, bad input refused with the model untouched."""

from __future__ import annotations

import itertools
import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from helpers import assert_untouched, snapshot
from secateurs.graph import build_graph
from secateurs.graph.latency import _halved

README = Path(__file__).resolve().parents[1] / "README.md"


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


# --------------------------------------------------------------------------- the namespace


def test_dir_shows_the_public_surface_and_no_submodule() -> None:
    shown = dir(sc)
    assert sorted(shown) == sorted(sc.__all__)
    assert not [n for n in shown if isinstance(getattr(sc, n), types.ModuleType)]
    for internal in ("compute_masks", "find_targets", "build_graph", "Target", "ChannelGraph"):
        assert internal not in sc.__all__


def test_every_name_the_readme_calls_is_exported() -> None:
    used = set(re.findall(r"\bsc\.([A-Za-z_]\w*)", README.read_text()))
    assert used, "the README shows no sc.* call"
    missing = sorted(n for n in used if n not in sc.__all__)
    assert not missing, f"README uses sc.{missing} that the package does not export"
    for name in ("sparsify_", "densify_", "factorize_", "profile", "evaluate", "measure_latency"):
        assert name in sc.__all__ and callable(getattr(sc, name))
    for name in ("Sensitivity", "AMC", "NetAdapt", "SearchResult", "ShrinkReport"):
        assert isinstance(getattr(sc, name), type)


# --------------------------------------------------------------------------- return types


def test_in_place_functions_return_the_model_they_changed() -> None:
    model = mlp()
    assert sc.prune_(model, sparsity=0.5) is model
    assert sc.share_weights_(model, bits={"fc": 4}) is model
    assert sc.make_permanent_(model) is model
    x = torch.randn(64, 8)
    assert sc.sparsify_(model, x, repeats=1, warmup=0) is model
    assert sc.densify_(model) is model
    with pytest.raises(sc.ConfigError, match=r"sc\.sparsify_"):
        sc.report_of(model, sc.SparsifyReport)  # densify_ undid it, and says so
    assert sc.factorize_(model, rank=2) is model
    report = sc.report_of(model, sc.LowRankReport)
    assert report.layers and all(layer.rank == 2 for layer in report.layers)


def test_shrink_returns_a_module_whatever_its_options_and_records_its_report() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten())
    x = torch.randn(1, 3, 8, 8)
    for options in ({}, {"steps": 2}, {"allocation": "global", "round_to": 2}):
        small = sc.shrink(model, x, sc.Sparsity(0.5), **options)
        assert isinstance(small, nn.Module) and small is not model
        report = sc.report_of(small, sc.ShrinkReport)
        assert report.channels_removed > 0 and report.params_after < report.params_before
    with pytest.raises(sc.ConfigError, match="carries no ShrinkReport"):
        sc.report_of(model, sc.ShrinkReport)
    with pytest.raises(sc.ConfigError, match=r"unknown option.*'report'"):
        sc.shrink(model, x, sc.Sparsity(0.5), report=True)


def test_a_search_result_prunes_by_mask_and_by_channel_with_the_same_map() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten())
    x = torch.randn(1, 3, 8, 8)
    found = sc.SearchResult("hand", {"0": 0.5}, 0.0, 0.0, "")
    assert isinstance(found.ratios, sc.LayerMap) and found.ratios == {"0": 0.5}
    small = sc.shrink(model, x, sc.MACs(1.0), allocation=found.ratios)
    assert small[0].out_channels == 4 and small[2].out_channels == 8
    masked = sc.prune_(mlp(), allocation=sc.LayerMap({"0": 0.5}, default=0.0))
    assert masked[0].weight.count_nonzero() == 64 and masked[2].weight.count_nonzero() == 64


# --------------------------------------------------------------------------- naming


def test_every_layer_selection_takes_include_and_exclude() -> None:
    for call in (
        lambda m, **kw: sc.prune_(m, sparsity=0.5, **kw),
        lambda m, **kw: sc.share_weights_(m, bits={"fc": 2}, **kw),
        lambda m, **kw: sc.factorize_(m, rank=2, **kw),
        lambda m, **kw: sc.shrink(m, torch.randn(1, 8), sc.Sparsity(0.5), **kw),
    ):
        model = mlp()
        before = snapshot(model)
        with pytest.raises(sc.ConfigError, match="include pattern 'nope' matches no"):
            call(model, include=["nope"])
        with pytest.raises(sc.ConfigError, match="exclude pattern 'nope' matches no"):
            call(model, exclude=["nope"])
        assert_untouched(model, before)
        call(model, include=["0"])  # the same selector works for every one of them


def test_the_calibration_batch_count_has_one_name_and_one_default() -> None:
    assert sc.PruneConfig().calibration_batches == sc.ShrinkConfig().calibration_batches
    assert sc.PruneConfig(calibration_batches=3).calibration_batches == 3
    assert sc.ShrinkConfig(calibration_batches=3).calibration_batches == 3


# --------------------------------------------------------------------------- bad input


BAD_PLANS: list[dict[str, Any]] = [
    {"criterion": 42},
    {"criterion": ""},
    {"allocation": {}},
    {"structure": ""},
    {"schedule": {}},
    {"calibration_batches": 2.5},
    {"calibration_batches": True},
    {"calibration_batches": 0},
    {"seed": -1},
    {"include": [3]},
]


@pytest.mark.parametrize("options", BAD_PLANS, ids=str)
def test_bad_plans_are_secateurs_errors_and_leave_the_model_untouched(
    options: dict[str, Any],
) -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(sc.ConfigError):
        sc.Pruner(model, sparsity=0.5, **options)
    with pytest.raises(sc.ConfigError):
        sc.prune_(model, sparsity=0.5, **options)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "options",
    [{"criterion": 42}, {"criterion": ""}, {"allocation": "lamp"}, {"calibration_batches": 1.5}],
    ids=str,
)
def test_bad_shrink_options_are_secateurs_errors(options: dict[str, Any]) -> None:
    model = mlp()
    before = snapshot(model)
    with pytest.raises(sc.ConfigError):
        sc.shrink(model, torch.randn(1, 8), sc.Sparsity(0.5), **options)
    assert_untouched(model, before)


def test_asking_for_less_than_the_pruned_fraction_is_an_error_not_a_silent_stay() -> None:
    model = mlp()
    sc.prune_(model, sparsity=0.5)
    masks = sc.collect_masks(model)
    with pytest.raises(sc.ConfigError, match="never regrows"):
        sc.prune_(model, sparsity=0.3)
    pruner = sc.Pruner(model, sparsity=0.8, schedule=sc.Gradual(start=0, end=4, every=1))
    with pytest.raises(sc.ConfigError, match="never regrows"):
        pruner.prune_to(0.2)
    with pytest.raises(sc.ConfigError, match="never regrows"):
        pruner.step()  # the schedule starts at 0 on a model already half pruned
    assert not pruner.history
    assert all(torch.equal(m, masks[k]) for k, m in sc.collect_masks(model).items())
    resumed = sc.Pruner(model, sparsity=0.8, schedule=sc.Gradual(end=4, every=1, initial=0.5))
    while not resumed.done:
        resumed.step()
    assert resumed.history[0].target == pytest.approx(0.5)
    assert resumed.measured_sparsity() == pytest.approx(0.8, abs=0.02)


def test_gradual_initial_above_the_target_is_refused() -> None:
    with pytest.raises(sc.ConfigError, match=r"initial sparsity 0\.5 is above the final 0\.3"):
        sc.Pruner(mlp(), sparsity=0.3, schedule=sc.Gradual(initial=0.5))


def test_static_takes_only_its_own_options() -> None:
    assert {"every", "end", "fraction"}.isdisjoint(sc.Static.__dataclass_fields__)
    for key in ("every", "end", "fraction"):
        with pytest.raises(sc.ConfigError, match=f"unknown option.*'{key}'"):
            sc.SCHEDULES.build({"name": "static", key: 1})
    assert {"every", "end", "fraction"} <= set(sc.SET.__dataclass_fields__)


class NoNorm(nn.Module):
    """Two convolutions, no normalisation: bn_scale can measure neither group."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.b = nn.Conv2d(6, 6, 3)
        self.norm = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.norm(self.b(torch.relu(self.a(x)))))


def test_channel_criteria_report_the_groups_they_score_by_l2_or_refuse_when_strict() -> None:
    model = NoNorm()
    x = torch.randn(1, 3, 8, 8)
    small = sc.shrink(model, x, sc.Sparsity(0.3), criterion="bn_scale")
    fallbacks = sc.report_of(small, sc.ShrinkReport).fallbacks
    assert len(fallbacks) == 1 and fallbacks[0].startswith("a: bn_scale found no normalisation")
    with pytest.raises(sc.ConfigError, match=r"bn_scale.*'a'.*strict=True"):
        sc.shrink(model, x, sc.Sparsity(0.3), criterion="bn_scale", strict=True)


def test_latency_halving_lets_only_secateurs_errors_through_as_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    graph = build_graph(model, torch.randn(1, 3, 8, 8))
    import secateurs.graph.latency as latency

    def refuse(*_: Any) -> Any:
        raise sc.ModelError("surgery refuses")

    monkeypatch.setattr(latency, "apply_plan_", refuse)
    assert _halved(model, graph) is None

    def crash(*_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(latency, "apply_plan_", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        _halved(model, graph)


# --------------------------------------------------------------------------- parameter order


@st.composite
def networks(draw: st.DrawFn) -> nn.Module:
    widths = draw(st.lists(st.integers(2, 6), min_size=2, max_size=4))
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.LayerNorm(b))
        if i == 0 and draw(st.booleans()):
            layers.append(nn.BatchNorm1d(b))
    return nn.Sequential(*layers)


@settings(max_examples=40, deadline=None)
@given(networks(), st.floats(0.1, 0.9), st.booleans())
def test_make_permanent_keeps_the_unpruned_state_dict_order(
    model: nn.Module, sparsity: float, share: bool
) -> None:
    keys = list(model.state_dict())
    params = [n for n, _ in model.named_parameters()]
    sc.prune_(model, sparsity=sparsity)
    if share:
        sc.share_weights_(model, bits={"fc": 2})
    sc.make_permanent_(model)
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == params
