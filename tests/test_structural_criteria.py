"""Channel criteria (``bn_scale``, ``apoz``, ``mean_activation``, ``fpgm``, ``regression``,
``channel_obs``):
each ranks lowest the channel it should, the regression refit reconstructs the consumer's
output, element criteria score channels too, and bad input is refused by name."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import secateurs as sc
from helpers import shrunk
from secateurs.criteria import (
    CRITERIA,
    FPGM,
    APoZ,
    BNScale,
    ChannelContext,
    ChannelOBS,
    MeanActivation,
    Regression,
    channel_scores,
)
from secateurs.criteria.structural import im2col, im2col_count, im2col_rows
from secateurs.graph import apply_plan_, build_graph, plan_from_removed
from secateurs.graph.groups import ChannelGraph
from secateurs.train.regularizers import BNL1

NEW = ["bn_scale", "apoz", "mean_activation", "fpgm", "regression", "channel_obs"]


class Net(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> pool -> flatten -> linear, on 3x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 2 * 2, 4)

    def hidden(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv1(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv2(self.hidden(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net().eval()
    with torch.no_grad():  # distinct BN statistics
        model.bn.running_mean.normal_(0, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()


X = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))
XM = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
YM = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(4))


def loader(x: Tensor, y: Tensor, batch: int = 8) -> DataLoader[Any]:
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def context(model: nn.Module, x: Tensor, y: Tensor | None = None, **kw: Any) -> ChannelContext:
    data = None if y is None else loader(x, y)
    return ChannelContext(model, build_graph(model, x[:1]), x[:1], data, F.cross_entropy, **kw)


def by_name(ctx: ChannelContext, criterion: Any) -> dict[str, Tensor]:
    """Scores (validated by ``channel_scores``) keyed by each group's producing layer."""
    scores = channel_scores(CRITERIA.build(criterion), ctx)
    return {g.name: scores[g.index] for g in ctx.graph.prunable_groups}


def group(graph: ChannelGraph, name: str) -> int:
    return next(g.index for g in graph.prunable_groups if g.name == name)


def lowest(scores: Tensor, k: int = 1) -> set[int]:
    return set(torch.argsort(scores, stable=True)[:k].tolist())


# -- bn_scale ----------------------------------------------------------------------------


def test_bn_scale_ranks_small_gammas_lowest_and_falls_back_to_group_l2() -> None:
    model = net()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.0, 0.1, -0.8, 0.05, 1.2, -0.9]))
    scores = by_name(context(model, X), "bn_scale")
    assert torch.equal(scores["conv1"], model.bn.weight.detach().abs())
    assert lowest(scores["conv1"], 2) == {1, 3}
    # conv2 has no norm: the L2 norm of each channel over conv2 rows, bias and fc columns
    fc_cols = model.fc.weight.detach().reshape(4, 5, 4).transpose(0, 1).reshape(5, -1)
    expected = (
        model.conv2.weight.detach().reshape(5, -1).square().sum(1)
        + model.conv2.bias.detach().square()
        + fc_cols.square().sum(1)
    ).sqrt()
    torch.testing.assert_close(scores["conv2"], expected)


def test_bn_l1_training_shrinks_the_unused_channels_that_bn_scale_then_ranks_lowest() -> None:
    """Fine-tune the BN scales to keep the output while bn_l1 pulls them to zero: the task
    holds the channels conv2 reads, the two it ignores only feel the penalty."""
    model = net()
    unused = [1, 4]
    with torch.no_grad():
        model.conv2.weight[:, unused] = 0.0
        target = model(X)
    assert torch.equal(model.bn.weight.detach(), torch.ones(6))  # no ranking before
    reg = BNL1(coefficient=0.2).bind(model)
    opt = torch.optim.SGD([model.bn.weight], lr=0.05)
    for step in range(40):
        loss = 300 * F.mse_loss(model(X), target) + reg(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gamma = model.bn.weight.detach()
    torch.testing.assert_close(gamma[unused], torch.full((2,), 1.0 - 40 * 0.05 * 0.2))
    scores = by_name(context(model, X), "bn_scale")["conv1"]
    assert lowest(scores, 2) == set(unused)
    assert float(scores[[0, 2, 3, 5]].min()) > float(scores[unused].max()) + 0.02


# -- apoz / mean_activation ------------------------------------------------------------------


def test_apoz_and_mean_activation_are_measured_at_the_consumers_inputs() -> None:
    model = net()
    with torch.no_grad():
        model.bn.bias[3] = -100.0  # channel 3 is dead after the ReLU
        model.bn.weight[4] = 0.01  # channel 4 is weak
        model.conv2.bias[1] = -100.0  # conv2's channel 1 is dead before flatten -> fc
    ctx = context(model, X, Y)
    apoz, mean = by_name(ctx, "apoz"), by_name(ctx, "mean_activation")
    with torch.no_grad():
        act = model.hidden(X)
    expected_apoz = 1.0 - (act == 0).float().mean(dim=(0, 2, 3))
    torch.testing.assert_close(apoz["conv1"], expected_apoz)
    torch.testing.assert_close(mean["conv1"], act.abs().mean(dim=(0, 2, 3)))
    assert lowest(apoz["conv1"]) == {3} and float(apoz["conv1"][3]) == 0.0
    assert lowest(mean["conv1"], 2) == {3, 4} and lowest(mean["conv1"]) == {3}
    # conv2's channels reach fc flattened: each channel's 2x2 positions are pooled
    assert lowest(apoz["conv2"]) == {1} and float(apoz["conv2"][1]) == 0.0
    assert lowest(mean["conv2"]) == {1}
    # the model is as before: eval mode kept, no hook left behind
    assert not model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


class Decoder(nn.Module):
    """A conv whose channels only a transposed conv reads (not a consumer: fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.conv(x))


def test_activation_criteria_fall_back_to_the_producers_output() -> None:
    torch.manual_seed(0)
    model = Decoder().eval()
    with torch.no_grad():
        model.conv.weight[2] = 0.0
        model.conv.bias[2] = 0.0
    ctx = context(model, X, Y)
    assert [g.name for g in ctx.graph.prunable_groups] == ["conv"]
    assert lowest(by_name(ctx, "apoz")["conv"]) == {2}
    assert lowest(by_name(ctx, "mean_activation")["conv"]) == {2}


def test_activation_hooks_are_removed_and_modes_restored_when_the_model_fails() -> None:
    model = net().train()
    bad = DataLoader(TensorDataset(torch.randn(4, 5, 8, 8), torch.zeros(4)), batch_size=2)
    ctx = ChannelContext(model, build_graph(model, X[:1]), X[:1], bad)
    with pytest.raises(RuntimeError):
        channel_scores(APoZ(), ctx)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_at_most_calibration_batches_are_read_once_and_reused() -> None:
    pulled: list[int] = []

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(4):
            pulled.append(i)
            yield X[8 * i : 8 * i + 8], Y[8 * i : 8 * i + 8]

    model = net()
    ctx = ChannelContext(model, build_graph(model, X[:1]), X[:1], batches(), calibration_batches=2)
    first = channel_scores(MeanActivation(), ctx)
    again = channel_scores(MeanActivation(), ctx)  # the generator is spent: the cache serves
    assert pulled == [0, 1]
    assert all(torch.equal(first[k], again[k]) for k in first)
    with torch.no_grad():
        act = model.hidden(X[:16])
    torch.testing.assert_close(first[0], act.abs().mean(dim=(0, 2, 3)))


# -- fpgm ------------------------------------------------------------------------------------


def test_fpgm_ranks_the_filter_near_the_median_lowest_and_the_outlier_highest() -> None:
    model = net()
    with torch.no_grad():
        w = model.conv1.weight
        others = [0, 1, 3, 4]
        w[2] = w[others].mean(0)  # the centre of the others: replaceable
        w[5] = 5.0 * w[5]  # far from everyone: irreplaceable
    scores = by_name(context(model, X), "fpgm")["conv1"]
    assert lowest(scores) == {2}
    assert int(scores.argmax()) == 5
    flat = w.detach().reshape(6, -1).double()
    torch.testing.assert_close(scores, torch.cdist(flat, flat).sum(1).float())


def test_fpgm_ranks_a_duplicated_filter_lowest() -> None:
    model = mlp()
    with torch.no_grad():
        model[0].weight[4] = model[0].weight[1]
    scores = by_name(context(model, XM), "fpgm")["0"]
    assert lowest(scores, 2) == {1, 4}


# -- regression ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, (3, 2), stride=2, dilation=(1, 2), padding="valid"),
        nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect", dilation=2),
        nn.Conv1d(3, 4, 3, padding=2, stride=2, padding_mode="circular"),
        nn.Linear(3, 4),
    ],
    ids=["conv", "strided", "same-reflect", "conv1d", "linear"],
)
def test_im2col_rows_times_the_weight_give_the_layer_output(layer: nn.Module) -> None:
    torch.manual_seed(0)
    shape = {nn.Conv2d: (2, 3, 7, 6), nn.Conv1d: (2, 3, 9), nn.Linear: (2, 5, 3)}[type(layer)]
    x = torch.randn(shape)
    with torch.no_grad():
        out = layer(x) - (layer.bias if isinstance(layer, nn.Linear) else 0)
        if not isinstance(layer, nn.Linear):
            out = (out - layer.bias.reshape(1, -1, *[1] * (out.dim() - 2))).movedim(1, -1)
        rows = im2col(layer, x) @ layer.weight.reshape(4, -1).T
    torch.testing.assert_close(rows, out.reshape(-1, 4))
    # drawn rows gathered directly are those rows of the whole unfolding, in order
    total = im2col_count(layer, x)
    assert total == rows.shape[0]
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(1))[:7].sort().values
    assert torch.equal(im2col_rows(layer, x, pick), im2col(layer, x)[pick])
    assert torch.equal(im2col_rows(layer, x, None), im2col(layer, x))


def redundant_mlp() -> nn.Sequential:
    """Hidden unit 5 duplicates unit 0 and the next layer reads it at half weight: its
    contribution to the output is half of unit 0's."""
    model = mlp()
    with torch.no_grad():
        model[0].weight[5] = model[0].weight[0]
        model[0].bias[5] = model[0].bias[0]
        model[2].weight[:, 5] = 0.5 * model[2].weight[:, 0]
    return model


def redundant_net() -> Net:
    """conv1's channel 5 duplicates channel 0 (filter and BN); conv2 reads it at 0.3x."""
    model = net()
    with torch.no_grad():
        model.conv1.weight[5] = model.conv1.weight[0]
        model.conv1.bias[5] = model.conv1.bias[0]
        for t in (model.bn.weight, model.bn.bias, model.bn.running_mean, model.bn.running_var):
            t[5] = t[0]
        model.conv2.weight[:, 5] = 0.3 * model.conv2.weight[:, 0]
    return model


@pytest.mark.parametrize("method", ["greedy", "lasso"])
@pytest.mark.parametrize(
    ("make", "x", "y", "layer", "consumer"),
    [(redundant_mlp, XM, YM, "0", "2"), (redundant_net, X, Y, "conv1", "conv2")],
    ids=["mlp", "cnn"],
)
def test_regression_ranks_a_linear_combination_lowest_and_refit_reconstructs_exactly(
    method: str, make: Any, x: Tensor, y: Tensor, layer: str, consumer: str
) -> None:
    model = make()
    dense = copy.deepcopy(model)
    ctx = context(model, x, y)
    crit = Regression(method=method)
    scores = channel_scores(crit, ctx)
    g = group(ctx.graph, layer)
    assert lowest(scores[g]) == {5}
    removed = {g: torch.arange(6) == 5}
    crit.refit(ctx, removed)
    apply_plan_(model, plan_from_removed(ctx.graph, removed))
    assert model.get_submodule(consumer).weight.shape[1] == 5

    def consumer_output(m: nn.Module) -> Tensor:
        seen: list[Tensor] = []
        handle = m.get_submodule(consumer).register_forward_hook(lambda *a: seen.append(a[2]))
        with torch.no_grad():
            m(x)
        handle.remove()
        return seen[0]

    torch.testing.assert_close(consumer_output(model), consumer_output(dense), atol=1e-4, rtol=1e-4)


def test_regression_refit_reduces_the_reconstruction_error_of_a_real_cut() -> None:
    model = mlp()
    removed = {0: torch.tensor([True, False, True, False, False, False])}
    errors = []
    for refit in (False, True):
        pruned = copy.deepcopy(model)
        ctx = context(pruned, XM, YM)
        assert ctx.graph.prunable_groups[0].name == "0"
        if refit:
            Regression().refit(ctx, removed)
        apply_plan_(pruned, plan_from_removed(ctx.graph, removed))
        with torch.no_grad():
            errors.append(float((pruned(XM) - model(XM)).square().mean()))
    assert errors[1] < 0.5 * errors[0]


def test_regression_ranks_a_channel_with_a_negligible_contribution_lowest() -> None:
    for method in ("greedy", "lasso"):
        model = mlp()
        with torch.no_grad():
            model[2].weight[:, 3] *= 0.01
        scores = by_name(context(model, XM, YM), {"name": "regression", "method": method})
        assert lowest(scores["0"]) == {3}, method
        assert scores["0"].unique().numel() == 6, method  # a strict order


@pytest.mark.parametrize("name", ["regression", "channel_obs"])
def test_sampling_criteria_are_reproducible_for_a_seed(name: str) -> None:
    def run(seed: int) -> dict[str, Tensor]:
        return by_name(context(net(), X, Y, seed=seed), {"name": name, "samples": 16})

    a, b = run(0), run(0)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _refit_error(x: Tensor, y: Tensor, keep: list[int]) -> float:
    """Least-squares residual of ``y`` from the ``keep`` columns of ``x``."""
    if not keep:
        return float(y.square().sum())
    sol = torch.linalg.lstsq(x[:, keep], y).solution
    return float((y - x[:, keep] @ sol).square().sum())


def test_channel_obs_is_exact_greedy_least_squares_removal_on_a_linear_reader() -> None:
    """Without dampening and with more samples than inputs, each step removes the hidden
    unit whose removal leaves the smallest least-squares refit error of the reader's output,
    and the score is that error over the output energy, accumulated."""
    model = mlp(3)
    scores = by_name(context(model, XM, YM), {"name": "channel_obs", "dampening": 0.0})["0"]
    with torch.no_grad():
        x = torch.relu(model[0](XM)).to(torch.float64)
        w = model[2].weight.to(torch.float64)
    y = x @ w.T
    energy = float(y.square().sum())
    order = torch.argsort(scores).tolist()
    gone: list[int] = []
    for c in order[:-1]:
        keep = [i for i in range(6) if i not in gone]
        errors = {d: _refit_error(x, y, [i for i in keep if i != d]) for d in keep}
        assert errors[c] == pytest.approx(min(errors.values()), rel=1e-6, abs=1e-9)
        gone.append(c)
        assert float(scores[c]) == pytest.approx(errors[c] / energy, rel=1e-4, abs=1e-6)


def test_channel_obs_removes_a_duplicated_unit_first_where_magnitude_keeps_it() -> None:
    """Hidden unit 5 is a copy of unit 0, and the reader's weights on it are large: the
    reader can take over either copy's contribution through the other, so one of them goes
    first nearly free (only the dampening charges it), though magnitude ranks unit 5 the most important."""
    model = mlp()
    with torch.no_grad():
        model[0].weight[5] = model[0].weight[0]
        model[0].bias[5] = model[0].bias[0]
        model[2].weight[:, 5] *= 10.0
    scores = by_name(context(model, XM, YM), "channel_obs")["0"]
    assert lowest(scores) <= {0, 5}
    assert float(scores.min()) < 0.1 * float(scores.sort().values[1])  # nearly free
    assert int(by_name(context(model, XM, YM), "magnitude")["0"].argmax()) == 5


# -- element criteria, data, options ---------------------------------------------------------


@pytest.mark.parametrize("name", ["magnitude", "random", "taylor", "obd"])
def test_element_criteria_give_one_finite_score_per_channel(name: str) -> None:
    ctx = context(net(), X, Y)
    scores = channel_scores(CRITERIA.build(name), ctx)
    assert sorted(scores) == sorted(g.index for g in ctx.graph.prunable_groups)
    for g in ctx.graph.prunable_groups:
        assert scores[g.index].shape == (g.size,)
        assert bool(torch.isfinite(scores[g.index]).all())


@pytest.mark.parametrize("criterion", [APoZ(), MeanActivation(), Regression(), ChannelOBS()])
def test_data_driven_criteria_without_data_are_a_config_error(criterion: Any) -> None:
    ctx = context(net(), X)
    with pytest.raises(sc.ConfigError, match="data"):
        channel_scores(criterion, ctx)
    if isinstance(criterion, Regression):
        with pytest.raises(sc.ConfigError, match="data"):
            criterion.refit(ctx, {0: torch.arange(6) == 1})


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"name": "regression", "method": "ols"}, "'ols'"),
        ({"name": "regression", "method": "ols"}, "greedy, lasso"),
        ({"name": "regression", "samples": 0}, "samples"),
        ({"name": "regression", "samples": True}, "samples"),
        ({"name": "regression", "samples": 2.5}, "2.5"),
        ({"name": "channel_obs", "samples": 0}, "samples"),
        ({"name": "channel_obs", "dampening": 1.5}, "dampening"),
        ({"name": "channel_obs", "dampening": True}, "dampening"),
        ({"name": "fpgm", "p": 1}, "'p'"),
        ({"name": "bn_scale", "norm": "bn"}, "'norm'"),
    ],
)
def test_bad_options_are_a_config_error_naming_the_value(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(sc.ConfigError, match=needle):
        CRITERIA.build(spec)


def test_channel_criteria_refuse_element_pruning() -> None:
    with pytest.raises(sc.ConfigError, match="whole channels"):
        sc.prune_(mlp(), 0.5, criterion=FPGM())
    assert BNScale().needs_data is False and Regression().needs_data is True


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "criterion", [*NEW, {"name": "regression", "method": "lasso", "samples": 64}], ids=str
)
def test_shrink_end_to_end(criterion: Any) -> None:
    model = net()
    small, report = shrunk(
        model, X[:1], budget=sc.MACs(0.5), criterion=criterion, data=loader(X, Y),
        loss_fn=F.cross_entropy,
    )  # fmt: skip
    assert report.macs_after <= 0.5 * report.macs_before
    assert report.channels_removed > 0
    with torch.no_grad():
        assert small(X).shape == model(X).shape
