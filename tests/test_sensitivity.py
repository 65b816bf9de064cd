"""Ratio-map spaces, sensitivity analysis and the guards every allocation search shares."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from conftest import make_cnn, make_mlp, self_labelled
from helpers import snapshot
from secateurs.errors import BudgetError, ConfigError, DataError, ModelError
from secateurs.metrics import profile
from secateurs.search.base import SearchContext, accuracy_evaluator
from secateurs.search.sensitivity import (
    ScanTask,
    Sensitivity,
    _envelope,
    _largest_under,
    run_task,
)
from secateurs.search.space import ChannelSpace, ElementSpace

X_CNN = torch.randn(2, 3, 4, 4)
X_MLP = torch.randn(4, 16)


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------- spaces


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0.0, 0.95), min_size=3, max_size=3), st.integers(0, 3))
def test_channel_space_masked_equals_removed(fracs: list[float], seed: int) -> None:
    """Pruning by ``applied`` (zeros) and by ``realize`` (surgery) give the same outputs, and
    the MACs the space counts are the MACs profiled on the smaller model."""
    model = make_cnn(seed).eval()
    space = ChannelSpace(model, X_CNN)
    ratios = {layer.name: f for layer, f in zip(space.layers, fracs, strict=False)}
    small = space.realize(ratios).eval()
    before = snapshot(model)
    with space.applied(ratios) as masked:
        expected = masked(X_CNN)
    assert _same_state(model, before)
    torch.testing.assert_close(small(X_CNN), expected, atol=1e-5, rtol=1e-5)
    assert space.measure(sc.MACs(0.5), ratios) == profile(small, X_CNN).totals["macs"]
    assert space.measure(sc.Params(0.5), ratios) == sum(p.numel() for p in small.parameters())


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0.0, 0.98), min_size=2, max_size=2))
def test_element_space_counts_what_realize_keeps(fracs: list[float]) -> None:
    model = make_mlp()
    space = ElementSpace(model, X_MLP)
    ratios = dict(zip(space.names, fracs, strict=True))
    pruned = space.realize(ratios)
    stats = profile(pruned, X_MLP)
    assert space.measure(sc.Params(0.5), ratios) == stats.totals["nonzeros"]
    kept = space.measure(sc.Sparsity(0.5), ratios)
    assert kept == pytest.approx(stats.totals["prunable_density"], abs=1e-9)
    before = snapshot(model)
    with space.applied(ratios) as masked:
        torch.testing.assert_close(masked(X_MLP), pruned(X_MLP))
    assert _same_state(model, before)


def test_element_bytes_is_the_cheaper_of_dense_and_csr() -> None:
    model = make_mlp()
    space = ElementSpace(model)
    ratios = dict.fromkeys(space.names, 0.9)
    stats = profile(space.realize(ratios))
    # at 90% sparsity CSR is the cheaper storage of both weights; biases stay dense
    assert space.measure(sc.Bytes(0.5), ratios) == stats.totals["bytes_csr"]
    dense = dict.fromkeys(space.names, 0.0)
    assert space.measure(sc.Bytes(0.5), dense) == stats.totals["bytes_dense"]


def test_spaces_refuse_budgets_they_cannot_count() -> None:
    with pytest.raises(ConfigError, match="Latency budget cannot be met by element masks"):
        ElementSpace(make_mlp()).check(sc.Latency(0.5))
    with pytest.raises(ConfigError, match="N:M"):
        ElementSpace(make_mlp(), structure="nm")
    with pytest.raises(ConfigError, match="Latency budget needs channels removed"):
        sc.Pruner(make_mlp(), budget=sc.Latency(0.5))


def test_bytes_budget_for_masks() -> None:
    model = make_mlp()
    sc.prune_(model, budget=sc.Bytes(0.3))
    stats = profile(model)
    assert 0.28 * stats.totals["bytes_dense"] <= stats.totals["bytes_csr"]
    assert stats.totals["bytes_csr"] <= 0.3 * stats.totals["bytes_dense"]


# ------------------------------------------------------------------------------- the threshold


def test_envelope_and_threshold_interpolate() -> None:
    env = _envelope(1.0, [(0.0, 1.0), (0.5, 0.9), (0.7, 0.95), (0.9, 0.5)])
    assert env == [
        (0.0, 0.0),
        (0.5, pytest.approx(0.1)),
        (0.7, pytest.approx(0.1)),
        (0.9, pytest.approx(0.5)),
    ]
    assert _largest_under(env, 0.05) == pytest.approx(0.25)
    assert _largest_under(env, 0.1 + 1e-6) == pytest.approx(0.7)  # the dip stops at 0.7
    assert _largest_under(env, 1.0) == pytest.approx(0.9)


def test_flat_curves_share_the_budget_instead_of_overshooting() -> None:
    """A model no layer of which loses anything (every drop 0) is pruned to the budget, each
    layer alike, not to the grid's top everywhere."""
    model = make_mlp()
    result = sc.search_allocation(
        model, X_MLP, sc.Sparsity(0.5), "sensitivity", space="elements", evaluate=lambda m: 1.0
    )
    assert result.value == pytest.approx(0.5, abs=0.01)
    assert max(result.ratios.values()) - min(result.ratios.values()) < 0.01


@pytest.mark.parametrize(
    ("space_kind", "budget"),
    [
        ("elements", sc.Sparsity(0.7)),
        ("elements", sc.Params(0.5)),
        ("elements", sc.Bytes(0.5)),
        ("channels", sc.MACs(0.5)),
        ("channels", sc.Params(0.6)),
        ("channels", sc.Bytes(0.6)),
    ],
)
def test_sensitivity_meets_the_budget(space_kind: str, budget: sc.Budget) -> None:
    model = make_cnn()
    data = self_labelled(model, X_CNN)
    before = snapshot(model)
    result = sc.search_allocation(model, X_CNN, budget, "sensitivity", space=space_kind, data=data)
    assert _same_state(model, before)
    assert result.value <= result.limit * (1 + 1e-9)
    # the threshold is tight: the budget is close to spent (within one channel of a layer)
    assert result.value >= 0.75 * result.limit
    curves = result.history["curves"]
    assert set(curves) == set(result.ratios)
    assert all(c[0] == [0.0, result.history["baseline"]] for c in curves.values())
    assert result.evaluations == 2 + sum(len(c) - 1 for c in curves.values())


def test_sensitivity_spares_the_sensitive_layer() -> None:
    """A layer whose pruning costs the most keeps the most."""
    model = make_mlp()
    space = ElementSpace(model)
    first = space.targets[0].raw

    def evaluate(m: nn.Module) -> float:
        return -float((first == 0).float().mean())  # only zeros in layer 0 cost anything

    result = sc.search_allocation(
        model, X_MLP, sc.Sparsity(0.5), "sensitivity", space=space, evaluate=evaluate
    )
    # layer 1 (256 weights) goes to the grid's top, 0.9; layer 0 (512) gives only the rest
    assert result.ratios[space.names[1]] == pytest.approx(0.9)
    assert result.ratios[space.names[0]] == pytest.approx((384 - 0.9 * 256) / 512, abs=0.01)


def test_scan_is_made_of_self_contained_tasks_and_workers_agree() -> None:
    model = make_cnn()
    data = self_labelled(model, X_CNN)
    one = sc.search_allocation(
        model, X_CNN, sc.MACs(0.6), {"name": "sensitivity", "workers": 1}, data=data
    )
    two = sc.search_allocation(
        model, X_CNN, sc.MACs(0.6), {"name": "sensitivity", "workers": 2}, data=data
    )
    assert one.ratios == two.ratios
    assert one.history["curves"] == two.history["curves"]
    # one task, on a fresh space built elsewhere, reproduces its point of the curve
    space = ChannelSpace(model, X_CNN)
    name = space.names[0]
    point = next(s for r, s in one.history["curves"][name] if r == pytest.approx(0.5))
    ctx = SearchContext(accuracy_evaluator(data))
    assert run_task(space, ScanTask(name, 0.5), ctx.evaluate) == point


def test_a_larger_budget_never_prunes_a_layer_more() -> None:
    model = make_cnn()
    data = self_labelled(model, X_CNN)
    tight = sc.search_allocation(model, X_CNN, sc.MACs(0.7), data=data)
    loose = sc.search_allocation(model, X_CNN, sc.MACs(0.9), data=data)
    assert all(loose.ratios[n] <= tight.ratios[n] + 1e-12 for n in tight.ratios)


def test_ratio_map_feeds_shrink_and_layer_map() -> None:
    model = make_cnn().eval()
    data = self_labelled(model, X_CNN)
    found = sc.search_allocation(model, X_CNN, sc.MACs(0.5), data=data)
    small = sc.shrink(model, X_CNN, sc.MACs(0.5), allocation=found.ratios)
    assert profile(small, X_CNN).totals["macs"] == found.value
    space = ElementSpace(make_mlp())
    ratios = dict(zip(space.names, [0.25, 0.75], strict=True))
    masked = sc.prune_(make_mlp(), sparsity=0.5, allocation=space.layer_map(ratios))
    assert float((masked[0].weight == 0).float().mean()) == pytest.approx(0.25, abs=0.01)
    assert float((masked[2].weight == 0).float().mean()) == pytest.approx(0.75, abs=0.01)


# ------------------------------------------------------------------------------- bad input


def test_unreachable_budget_names_the_smallest_reachable_value() -> None:
    model = make_cnn()
    with pytest.raises(BudgetError, match="smallest reachable value"):
        sc.search_allocation(model, X_CNN, sc.MACs(100), data=self_labelled(model, X_CNN))
    grid = {"name": "sensitivity", "ratios": [0.1, 0.2]}
    with pytest.raises(BudgetError, match="smallest reachable value on this grid"):
        sc.search_allocation(model, X_CNN, sc.MACs(0.65), grid, data=self_labelled(model, X_CNN))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("bad", ["raise", "nan", "text"])
def test_a_failing_evaluation_is_a_clear_error_and_the_model_is_restored(
    bad: str, workers: int
) -> None:
    model = make_cnn()
    before = snapshot(model)
    calls = []

    def evaluate(m: nn.Module) -> float:
        calls.append(1)
        if len(calls) < 4 and workers == 1:
            return 1.0
        if bad == "raise":
            raise RuntimeError("boom")
        return math.nan if bad == "nan" else "high"  # type: ignore[return-value]

    method = {"name": "sensitivity", "workers": workers}
    with pytest.raises(ModelError, match=r"boom|finite score|must return a number"):
        sc.search_allocation(model, X_CNN, sc.MACs(0.5), method, evaluate=evaluate)
    assert _same_state(model, before)


def test_empty_calibration_split_and_bad_options() -> None:
    model = make_cnn()
    with pytest.raises(DataError, match="calibration split is empty"):
        sc.search_allocation(model, X_CNN, sc.MACs(0.5), data=[])
    with pytest.raises(ConfigError, match="pass data="):
        sc.search_allocation(model, X_CNN, sc.MACs(0.5))
    with pytest.raises(ConfigError, match=r"numbers in \[0, 1\)"):
        Sensitivity(ratios=[0.5, 1.5])
    with pytest.raises(ConfigError, match="workers"):
        Sensitivity(workers=0)
    with pytest.raises(ConfigError, match="space must be one of"):
        sc.search_allocation(model, X_CNN, sc.MACs(0.5), space="blocks", data=[(X_CNN, None)])
    with pytest.raises(ConfigError, match="allocation search"):
        sc.search_allocation(model, X_CNN, sc.MACs(0.5), "annealing", data=[(X_CNN, None)])


def test_shrink_ratio_map_errors() -> None:
    model = make_cnn()
    with pytest.raises(ConfigError, match="matches no removable channel group"):
        sc.shrink(model, X_CNN, sc.MACs(0.9), allocation={"nope": 0.5})
    with pytest.raises(BudgetError, match="ratio map leaves"):
        sc.shrink(model, X_CNN, sc.MACs(0.1), allocation={"conv1": 0.1})
    with pytest.raises(ConfigError, match="one step"):
        sc.shrink(model, X_CNN, sc.MACs(0.9), allocation={"conv1": 0.1}, steps=2)
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        sc.shrink(model, X_CNN, sc.MACs(0.9), allocation={"conv1": 1.5})


# ------------------------------------------------------------------------------- adaptive BatchNorm


def _bn_net(channels: int, seed: int) -> nn.Sequential:
    """conv -> BN -> ReLU -> dropout -> classifier, its BN statistics deliberately wrong."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(channels * 16, 4),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-3, 3)
        net[1].running_var.uniform_(5, 50)
        net[1].num_batches_tracked.fill_(123)
    return net


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.booleans(), st.integers(0, 50))
def test_batchnorm_recalibration_measures_the_model_and_puts_everything_back(
    channels: int, n_batches: int, training: bool, seed: int
) -> None:
    """Inside the block each BN layer holds its input's statistics over the batches (mean of
    the batch means, of the unbiased batch variances), dropout stays off; afterwards the
    buffers, momentum and every module's mode are exactly as before."""
    from secateurs.calibration import batchnorm_recalibrated

    net = _bn_net(channels, seed)
    net.train(training)
    before = snapshot(net)
    modes = [m.training for m in net.modules()]
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, 3, 4, 4, generator=g), torch.zeros(8)) for _ in range(n_batches)]
    with torch.no_grad():
        feats = [net[0](x) for x, _ in data]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in feats]).mean(0)
    with batchnorm_recalibrated(net, data) as inside:
        assert inside is net
        torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(net[1].running_var, var, rtol=1e-4, atol=1e-5)
        assert [m.training for m in net.modules()] == modes
    assert _same_state(net, before)
    assert net[1].momentum == 0.1
    assert [m.training for m in net.modules()] == modes


def test_batchnorm_recalibration_leaves_a_model_without_bn_alone_and_refuses_no_data() -> None:
    from secateurs.calibration import batchnorm_recalibrated

    model = make_mlp()
    before = snapshot(model)
    with batchnorm_recalibrated(model, []) as inside:
        assert inside is model
    assert _same_state(model, before)
    net = _bn_net(3, 0)
    before = snapshot(net)
    with pytest.raises(DataError, match="at least one"), batchnorm_recalibrated(net, []):
        pass
    assert _same_state(net, before) and net[1].momentum == 0.1


def test_the_evaluator_scores_with_recalibrated_statistics_and_restores_them() -> None:
    """Wrong BN statistics ruin the plain score; ``adapt_bn`` scores the model as its data
    sees it (here: labels from the model with correct statistics, so the score is 1)."""

    net = _bn_net(4, 1).eval()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(64, 3, 4, 4, generator=g) for _ in range(2)]
    with torch.no_grad():
        true = copy.deepcopy(net)
        true[1].reset_running_stats()
        true[1].momentum = None
        true.train()
        for x in xs:
            true(x)
        true.eval()
        data = [(x, true(x).argmax(1)) for x in xs]
    before = snapshot(net)
    adapted = accuracy_evaluator(data)(net)
    plain = accuracy_evaluator(data, adapt_bn=False)(net)
    assert adapted == 1.0
    assert plain < 0.9
    assert _same_state(net, before)


# ------------------------------------------------------------------------------- recipes and CLI

QUICK = Path(__file__).resolve().parents[1] / "recipes" / "quick-synthetic.yaml"


def test_cli_sensitivity_writes_curves_and_plot(tmp_path: Path) -> None:
    from secateurs import cli

    args = ["sensitivity", str(QUICK), "--out", str(tmp_path), "--workers", "2"]
    args += ["--set", "prune.structure=elements", "--set", "prune.criterion=magnitude"]
    assert cli.main(args) == 0
    result = json.loads((tmp_path / "sensitivity.json").read_text())
    assert result["value"] <= result["limit"] + 1e-9
    assert set(result["history"]["curves"]) == set(result["ratios"])
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    page = (tmp_path / "report.html").read_text()
    assert "<script" not in page and page.count('src="data:image/png;base64,') == 1
    for layer, ratio in result["ratios"].items():  # the page's ratio map is the JSON's
        assert f"<td class=l>{layer}</td><td>{ratio:.3f}</td>" in page


def test_recipe_allocation_searches_run_in_the_pipeline(tmp_path: Path) -> None:
    from secateurs import pipeline, recipe

    raw = yaml.safe_load(QUICK.read_text())
    raw["output"] = {"dir": str(tmp_path), "latency": False, "report": False}
    raw["prune"] = {"sparsity": 0.7, "allocation": {"name": "sensitivity", "ratios": [0.5, 0.9]}}
    raw["shrink"] = {"budget": {"name": "macs", "keep": 0.6}, "allocation": "sensitivity"}
    result = pipeline.run(recipe.parse(raw))
    searches = result.report.extra["allocation_search"]
    assert searches["shrink"]["value"] <= searches["shrink"]["limit"]
    assert searches["prune"]["method"] == "sensitivity"
    shrunk = result.report.extra["shrink"]
    assert shrunk["macs_after"] == searches["shrink"]["value"]
    assert result.report.trajectory[-1]["sparsity"] == pytest.approx(0.7, abs=0.01)


def test_recipe_refuses_unknown_allocation_naming_the_searches() -> None:
    from secateurs import recipe

    with pytest.raises(ConfigError, match="sensitivity"):
        recipe.parse({"prune": {"sparsity": 0.5, "allocation": "annealing"}})
    with pytest.raises(ConfigError, match=r"shrink\.allocation"):
        recipe.parse({"shrink": {"budget": {"name": "macs", "keep": 0.5}, "allocation": "lamp"}})
    with pytest.raises(ConfigError, match="workers"):
        recipe.parse(
            {"prune": {"sparsity": 0.5, "allocation": {"name": "sensitivity", "workers": 0}}}
        )
