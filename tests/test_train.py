"""The training / fine-tuning loop and its config."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook

from secateurs import data, zoo
from secateurs.errors import ConfigError, DataError, ModelError
from secateurs.train import TrainConfig, TrainHistory, finetune_config, make_optimizer, train


@pytest.fixture(scope="module")
def bundle() -> data.DataBundle:
    return data.synthetic(n_train=256, n_test=256, seed=0)


def _accuracy(model: nn.Module, ds: torch.utils.data.TensorDataset) -> float:
    x, y = ds.tensors
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def test_training_learns_the_synthetic_set(bundle: data.DataBundle) -> None:
    model = zoo.build_model("lenet-300-100", seed=0)
    history = train(model, bundle.loaders(32, seed=0)[0], TrainConfig(epochs=2, lr=0.05))
    assert isinstance(history, TrainHistory)
    assert len(history.losses) == 2 and history.losses[-1] < 0.5 * history.losses[0]
    assert history.steps == 16 and history.seconds > 0
    assert _accuracy(model, bundle.test) > 0.9


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_same_seed_same_weights(optimizer: str) -> None:
    small = data.synthetic(n_train=64, n_test=8, shape=(1, 12, 12), seed=0)
    lr = 0.05 if optimizer == "sgd" else 1e-3
    cfg = TrainConfig(epochs=2, lr=lr, optimizer=optimizer, seed=0, label_smoothing=0.1)
    runs = []
    for _ in range(2):
        model = zoo.build_model("vgg-bn", width=0.25, seed=0)  # BatchNorm buffers too
        history = train(model, small.loaders(16, seed=0)[0], cfg)
        runs.append((model, history))
    (m1, h1), (m2, h2) = runs
    assert h1.losses == h2.losses
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_callbacks_are_called_in_order(bundle: data.DataBundle) -> None:
    steps: list[int] = []
    epochs: list[tuple[int, float]] = []
    progress: list[tuple[int, int]] = []
    history = train(
        zoo.build_model("lenet-300-100", seed=0),
        bundle.subset(128, 8).loaders(64)[0],
        TrainConfig(epochs=2, optimizer="adamw", lr=1e-3),
        on_step=steps.append,
        on_epoch_end=lambda e, loss: epochs.append((e, loss)),
        progress=lambda done, total: progress.append((done, total)),
    )
    assert steps == [1, 2, 3, 4]
    assert [e for e, _ in epochs] == [0, 1] and [v for _, v in epochs] == history.losses
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_on_step_runs_after_the_optimizer_step(bundle: data.DataBundle) -> None:
    """A pruner's step sees the updated weights: zeroing them in on_step sticks for the check."""
    model = zoo.build_model("lenet-300-100", seed=0)
    seen: list[bool] = []

    def on_step(step: int) -> None:
        with torch.no_grad():
            model.fc1.weight[:, :10] = 0
        seen.append(True)

    train(model, bundle.subset(64, 8).loaders(32)[0], TrainConfig(epochs=1), on_step=on_step)
    assert seen == [True, True] and bool((model.fc1.weight[:, :10] == 0).all())


def test_cosine_schedule_decays_to_zero(bundle: data.DataBundle) -> None:
    lrs: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"])
    )
    loader = bundle.subset(128, 8).loaders(32)[0]
    try:
        train(zoo.build_model("lenet-300-100"), loader, TrainConfig(epochs=2, lr=0.1))
        cosine = list(lrs)
        lrs.clear()
        train(zoo.build_model("lenet-300-100"), loader, TrainConfig(epochs=2, cosine=False))
    finally:
        handle.remove()
    total = 8
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    assert cosine == pytest.approx(expected) and cosine[0] == pytest.approx(0.1)
    assert lrs == [0.05] * total


def test_trains_parametrized_weights(bundle: data.DataBundle) -> None:
    """Masked weights (torch.nn.utils.parametrize) train through ``original``; zeros stay."""

    class Mask(nn.Module):
        def __init__(self, mask: Tensor) -> None:
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w: Tensor) -> Tensor:
            return w * self.mask

    model = zoo.build_model("lenet-300-100", seed=0)
    mask = (torch.rand_like(model.fc1.weight) > 0.8).float()
    parametrize.register_parametrization(model.fc1, "weight", Mask(mask))
    before = model.fc1.parametrizations.weight.original.detach().clone()
    history = train(model, bundle.loaders(64)[0], TrainConfig(epochs=1, weight_decay=0.0))
    assert history.losses[0] < 2.3
    assert not torch.equal(model.fc1.parametrizations.weight.original, before)
    assert bool((model.fc1.weight[mask == 0] == 0).all())


def test_model_mode_is_restored_and_zero_epochs_do_nothing(bundle: data.DataBundle) -> None:
    model = zoo.build_model("lenet-5", seed=0).eval()
    before = [p.detach().clone() for p in model.parameters()]
    history = train(model, bundle.loaders(64)[0], TrainConfig(epochs=0))
    assert history.steps == 0 and history.losses == [] and not model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    train(model, bundle.subset(32, 8).loaders(32)[0], TrainConfig(epochs=1))
    assert not model.training


def test_unsized_loaders_and_custom_loss(bundle: data.DataBundle) -> None:
    loader = bundle.subset(64, 8).loaders(32)[0]

    def batches() -> Iterator[Any]:
        yield from loader

    class Once:
        def __iter__(self) -> Iterator[Any]:
            return batches()

    model = zoo.build_model("lenet-300-100", seed=0)
    with pytest.raises(ConfigError, match="cosine"):
        train(model, Once(), TrainConfig(epochs=1))
    progress: list[tuple[int, int]] = []
    calls: list[int] = []

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        calls.append(len(y))
        return nn.functional.cross_entropy(out, y)

    history = train(
        model,
        Once(),
        TrainConfig(epochs=2, cosine=False),
        progress=lambda d, t: progress.append((d, t)),
        loss_fn=loss_fn,
    )
    assert history.steps == 4 and progress[-1] == (4, 0) and calls == [32, 32, 32, 32]


def test_bad_batches_divergence_and_frozen_models(bundle: data.DataBundle) -> None:
    model = zoo.build_model("lenet-300-100", seed=0)
    with pytest.raises(DataError, match=r"\(inputs, labels\)"):
        train(model, [bundle.train.tensors[0][:4]], TrainConfig(epochs=1, cosine=False))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=r"diverged.*lower the learning rate"):
        train(
            model,
            bundle.loaders(64)[0],
            TrainConfig(epochs=1),
            loss_fn=lambda out, y: out.sum() * float("nan"),
        )
    # the step with a non-finite loss is not taken
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters"):
        train(model, bundle.loaders(64)[0], TrainConfig(epochs=1))
    with pytest.raises(ConfigError, match="TrainConfig"):
        train(model, bundle.loaders(64)[0], {"epochs": 1})  # type: ignore[arg-type]


def test_make_optimizer() -> None:
    model = zoo.build_model("lenet-5")
    sgd = make_optimizer(model, TrainConfig(lr=0.1, momentum=0.8, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.1, 0.8, True, 1e-4,
    )  # fmt: skip
    assert not make_optimizer(model, TrainConfig(momentum=0.0)).param_groups[0]["nesterov"]
    adamw = make_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3))
    assert isinstance(adamw, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", -1),
        ("epochs", 1.5),
        ("lr", 0),
        ("lr", float("nan")),
        ("optimizer", "lbfgs"),
        ("momentum", 1.0),
        ("momentum", "high"),
        ("weight_decay", -1e-4),
        ("nesterov", "yes"),
        ("cosine", 1),
        ("seed", 0.5),
        ("label_smoothing", 1.0),
        ("clip_grad", 0),
        ("clip_grad", float("inf")),
        ("clip_grad", "big"),
    ],
)
def test_train_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{field} = {value!r} is invalid; must be") as info:
        TrainConfig(**{field: value})  # type: ignore[arg-type]
    if field == "optimizer":
        assert "sgd, adamw" in str(info.value)


def test_clip_grad_bounds_each_step(bundle: data.DataBundle) -> None:
    # plain SGD at lr 1: a step moves the parameters by exactly the (clipped) gradient, so
    # with clip_grad the whole step's norm is at most the clip; without it, far more here
    loader = bundle.loaders(32, seed=0)[0]
    moved = {}
    for clip in (None, 1e-3):
        model = zoo.build_model("lenet-300-100", seed=0)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        cfg = TrainConfig(
            epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0, nesterov=False, cosine=False,
            clip_grad=clip,
        )  # fmt: skip
        train(model, itertools.islice(loader, 1), cfg)  # type: ignore[arg-type]
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        moved[clip] = float((after - before).norm())
    assert moved[1e-3] <= 1e-3 * (1 + 1e-4)
    assert moved[None] > 10 * moved[1e-3]


def test_finetune_config() -> None:
    base = TrainConfig(lr=0.05, epochs=30, optimizer="adamw", seed=3)
    ft = finetune_config(base, epochs=3)
    assert ft.epochs == 3 and ft.lr == pytest.approx(0.005)
    assert (ft.optimizer, ft.seed, ft.cosine) == ("adamw", 3, True) and base.lr == 0.05
    assert finetune_config(base, 2, lr_factor=0.01).lr == pytest.approx(0.0005)
    with pytest.raises(ConfigError, match="lr_factor"):
        finetune_config(base, 3, lr_factor=0)
    with pytest.raises(ConfigError, match="epochs"):
        finetune_config(base, -1)
