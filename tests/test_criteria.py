"""Criteria: magnitude, random, first-order Taylor and OBD against hand computation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import secateurs as sc
from helpers import assert_untouched, snapshot
from secateurs.calibration import calibrate
from secateurs.targets import find_targets

# -- magnitude --------------------------------------------------------------------------


def linear_with(weight: list[list[float]]) -> nn.Sequential:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
    return nn.Sequential(layer)


def test_magnitude_prunes_smallest_absolute_values() -> None:
    model = linear_with([[-5.0, 0.1, 3.0, -0.2], [0.05, -4.0, 0.3, 2.0]])
    sc.prune_(model, 0.5)
    assert (model[0].weight != 0).tolist() == [
        [True, False, True, False],
        [False, True, False, True],
    ]


@pytest.mark.parametrize(("p", "pruned_row"), [(1, 1), (2, 0)])
def test_magnitude_l1_and_l2_rank_groups_differently(p: int, pruned_row: int) -> None:
    # row 0: L1 mean 1, L2 mean 1; row 1: L1 mean 0.625, L2 mean 1.2175
    model = linear_with([[1.0, 1.0, -1.0, 1.0], [2.2, 0.1, -0.1, 0.1]])
    sc.prune_(model, 0.5, criterion=sc.Magnitude(p=p), structure=sc.Blocks((1, 4)))
    dead = (model[0].weight == 0).all(1).tolist()
    assert dead == [pruned_row == 0, pruned_row == 1]


def test_magnitude_scores_are_abs_and_square() -> None:
    model = linear_with([[-2.0, 0.5], [3.0, -0.0]])
    (target,) = find_targets(model)
    w = model[0].weight.detach()
    torch.testing.assert_close(sc.Magnitude(p=1).scores(target, None, 0), w.abs())
    torch.testing.assert_close(sc.Magnitude(p=2).scores(target, None, 0), w.square())


@pytest.mark.parametrize("p", [0, 3, "1", 1.5])
def test_magnitude_bad_p_is_a_config_error(p: Any) -> None:
    with pytest.raises(sc.ConfigError, match=repr(p)):
        sc.Magnitude(p=p)


# -- random -----------------------------------------------------------------------------


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 6))


def random_masks(seed: int, model_seed: int = 0, **options: Any) -> dict[str, Tensor]:
    model = mlp(model_seed)
    sc.prune_(model, 0.5, criterion=sc.Random(), seed=seed, **options)
    return sc.collect_masks(model)


def test_random_is_reproducible_with_the_same_seed_and_differs_with_another() -> None:
    a, b, c = random_masks(0), random_masks(0), random_masks(1)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_random_ignores_the_weights_and_other_layers() -> None:
    a = random_masks(4, allocation="uniform")
    b = random_masks(4, model_seed=1, allocation="uniform")
    only_first = random_masks(4, allocation="uniform", include=["0"])
    for name in a:
        assert torch.equal(a[name], b[name])
    assert torch.equal(a["0.weight"], only_first["0.weight"])


def test_random_scores_shape_and_range() -> None:
    (target, _) = find_targets(mlp())
    s = sc.Random().scores(target, None, 3)
    assert s.shape == target.shape and s.dtype == torch.float32
    assert bool((s >= 0).all() and (s < 1).all())
    assert torch.equal(s, sc.Random().scores(target, None, 3))
    assert not torch.equal(s, sc.Random().scores(target, None, 4))


# -- Taylor and OBD ---------------------------------------------------------------------


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2))


def batches(n: int = 3) -> list[tuple[Tensor, Tensor]]:
    torch.manual_seed(1)
    return [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(n)]


def hand_grads(model: nn.Sequential, data: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """dL/dW of mean squared error for y = x W^T + b: 2/(B*out) (y_hat - y)^T x."""
    w, b = model[0].weight.detach(), model[0].bias.detach()
    grads = []
    for x, y in data:
        out = x @ w.T + b
        grads.append(2.0 / out.numel() * (out - y).T @ x)
    return grads


def hand_scores(name: str, model: nn.Sequential, data: list[tuple[Tensor, Tensor]]) -> Tensor:
    w = model[0].weight.detach()
    grads = hand_grads(model, data)
    if name == "taylor":
        return sum((w * g).abs() for g in grads)  # type: ignore[return-value]
    fisher = torch.stack([g.square() for g in grads]).mean(0)
    return 0.5 * fisher * w.square()


CRITERIA = {"taylor": sc.Taylor, "obd": sc.OBD}


@pytest.mark.parametrize("name", list(CRITERIA))
def test_gradient_criteria_match_hand_computation(name: str) -> None:
    model = tiny()
    data = batches()
    criterion = CRITERIA[name]()
    targets = find_targets(model)
    stats = calibrate(model, targets, criterion, data, nn.functional.mse_loss)
    scores = criterion.scores(targets[0], stats[targets[0].name], 0)
    torch.testing.assert_close(scores, hand_scores(name, model, data), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(CRITERIA))
def test_gradient_criteria_prune_the_lowest_hand_scores(name: str) -> None:
    model = tiny()
    data = batches(5)
    want = hand_scores(name, model, data[:2])  # only calibration_batches batches count
    sc.prune_(
        model,
        0.5,
        criterion=name,
        data=data,
        loss_fn=nn.functional.mse_loss,
        calibration_batches=2,
    )
    expected = torch.zeros(6, dtype=torch.bool)
    expected[want.reshape(-1).argsort()[:3]] = True
    assert torch.equal((model[0].weight == 0).reshape(-1), expected)


def test_taylor_on_a_masked_model_uses_the_effective_weights() -> None:
    model = tiny()
    sc.prune_(model, 0.5)
    mask = sc.collect_masks(model)["0.weight"]
    data = batches()
    targets = find_targets(model)
    stats = calibrate(model, targets, sc.Taylor(), data, nn.functional.mse_loss)
    scores = sc.Taylor().scores(targets[0], stats["0.weight"], 0)
    torch.testing.assert_close(scores, hand_scores("taylor", model, data), rtol=1e-5, atol=1e-7)
    assert bool((scores[~mask] == 0).all())


def cnn_batches() -> list[tuple[Tensor, Tensor]]:
    torch.manual_seed(2)
    return [(torch.randn(4, 3, 4, 4), torch.randint(0, 10, (4,))) for _ in range(3)]


@pytest.mark.parametrize("name", list(CRITERIA))
def test_calibration_leaves_grads_untouched(name: str, cnn: nn.Module) -> None:
    params = dict(cnn.named_parameters())
    for pname, p in params.items():
        if pname != "fc.bias":
            p.grad = torch.randn_like(p)
    before = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
    sc.prune_(cnn, 0.5, criterion=name, data=cnn_batches(), loss_fn=nn.functional.cross_entropy)
    for pname, p in params.items():
        old = before[pname]
        if old is None:
            assert p.grad is None, pname
        else:
            assert p.grad is not None and torch.equal(p.grad, old), pname


@pytest.mark.parametrize("name", list(CRITERIA))
def test_calibration_leaves_batchnorm_statistics_untouched(name: str, cnn: Any) -> None:
    cnn.train()
    before = {k: v.clone() for k, v in cnn.bn.state_dict().items()}
    sc.prune_(cnn, 0.5, criterion=name, data=cnn_batches(), loss_fn=nn.functional.cross_entropy)
    for k, v in cnn.bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("training", [True, False])
def test_calibration_restores_train_or_eval_mode(training: bool, cnn: nn.Module) -> None:
    cnn.train(training)
    names = [name for name, _ in cnn.named_modules()]
    sc.prune_(cnn, 0.5, criterion="taylor", data=cnn_batches(), loss_fn=nn.functional.cross_entropy)
    assert all(cnn.get_submodule(name).training == training for name in names)


def test_calibration_restores_mixed_modes(cnn: Any) -> None:
    # fine-tuning with frozen BatchNorm: model in train mode, its BN in eval mode
    cnn.train()
    cnn.bn.eval()
    modes = {name: m.training for name, m in cnn.named_modules()}
    sc.prune_(cnn, 0.5, criterion="taylor", data=cnn_batches(), loss_fn=nn.functional.cross_entropy)
    assert {name: cnn.get_submodule(name).training for name in modes} == modes


def empty_loader() -> DataLoader[Any]:
    return DataLoader(TensorDataset(torch.empty(0, 3), torch.empty(0, 2)), batch_size=4)


@pytest.mark.parametrize("name", list(CRITERIA))
@pytest.mark.parametrize(
    ("options", "error", "needle"),
    [
        ({}, sc.ConfigError, "data="),
        ({"data": batches()}, sc.ConfigError, "loss_fn"),
        ({"data": [], "loss_fn": nn.functional.mse_loss}, sc.DataError, "empty"),
        ({"data": empty_loader(), "loss_fn": nn.functional.mse_loss}, sc.DataError, "empty"),
        ({"data": [torch.randn(4, 3)], "loss_fn": nn.functional.mse_loss}, sc.DataError, "Tensor"),
        (
            {
                "data": [(torch.full((4, 3), float("nan")), torch.randn(4, 2))],
                "loss_fn": nn.functional.mse_loss,
            },
            sc.DataError,
            "nan",
        ),
        (
            {"data": batches(), "loss_fn": nn.functional.mse_loss, "calibration_batches": 0},
            sc.ConfigError,
            "0",
        ),
    ],
    ids=[
        "no_data",
        "no_loss_fn",
        "empty_list",
        "empty_loader",
        "not_pairs",
        "nan_loss",
        "zero_batches",
    ],
)
def test_data_criterion_errors_leave_the_model_untouched(
    name: str, options: dict[str, Any], error: type[Exception], needle: str
) -> None:
    model = tiny()
    state = snapshot(model)
    with pytest.raises(error) as info:
        sc.prune_(model, 0.5, criterion=name, **options)
    assert isinstance(info.value, sc.SecateursError)
    assert needle in str(info.value)
    assert_untouched(model, state)


def test_gradient_criterion_scores_without_stats_are_a_config_error() -> None:
    (target,) = find_targets(tiny())
    for criterion in (sc.Taylor(), sc.OBD()):
        with pytest.raises(sc.ConfigError, match="data="):
            criterion.scores(target, None, 0)


def test_data_free_criteria_reject_accumulate() -> None:
    (target,) = find_targets(tiny())
    with pytest.raises(NotImplementedError):
        sc.Magnitude().accumulate({}, target, torch.zeros(2, 3))


def test_same_seed_same_data_same_gradient_masks() -> None:
    a, b = tiny(), copy.deepcopy(tiny())
    for model in (a, b):
        sc.prune_(model, 0.5, criterion="obd", data=batches(), loss_fn=nn.functional.mse_loss)
    assert torch.equal(sc.collect_masks(a)["0.weight"], sc.collect_masks(b)["0.weight"])
