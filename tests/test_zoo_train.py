"""Reference models and the training loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import data, zoo
from secateurs.errors import ConfigError
from secateurs.train import TrainConfig, finetune_config, train


@pytest.mark.parametrize(
    "name", ["lenet-300-100", "lenet-5", "lenet-5-caffe", "vgg-bn", "resnet-20"]
)
def test_zoo_models_run_forward_and_backward(name: str) -> None:
    model = zoo.build_model(name, seed=0)
    x = zoo.example_input(name, batch=3)
    out = model(x)
    assert out.shape == (3, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lenet5_variants_have_the_published_sizes() -> None:
    def weights(name: str) -> int:
        model = zoo.build_model(name)
        return sum(
            m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
        )

    assert weights("lenet-5") == 150 + 2400 + 48000 + 10080 + 840
    assert weights("lenet-5-caffe") == 500 + 25000 + 400000 + 5000  # 431k, as in Han et al.
    assert weights("lenet-300-100") == 784 * 300 + 300 * 100 + 100 * 10


def test_build_model_is_seeded() -> None:
    a, b = zoo.build_model("lenet-5", seed=1), zoo.build_model("lenet-5", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_torchvision_by_name() -> None:
    model = zoo.build_model("torchvision:resnet18", num_classes=7)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ConfigError, match="list_models"):
        zoo.build_model("torchvision:resnet19")


def test_unknown_model_and_bad_option() -> None:
    with pytest.raises(ConfigError, match="lenet-5"):
        zoo.build_model("lenet-6")
    with pytest.raises(ConfigError, match="model 'vgg-bn'"):
        zoo.build_model("vgg-bn", depth=3)


def test_training_reduces_loss_deterministically() -> None:
    bundle = data.synthetic(n_train=512, n_test=64)
    cfg = TrainConfig(epochs=2, lr=0.05, seed=0)
    runs = []
    for _ in range(2):
        model = zoo.build_model("lenet-300-100", seed=0)
        history = train(model, bundle.loaders(64, seed=0)[0], cfg)
        runs.append((model, history))
    (m1, h1), (m2, h2) = runs
    assert h1.losses[-1] < h1.losses[0]
    assert h1.losses == h2.losses and h1.steps == 16
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters(), strict=True))


def test_callbacks_are_called() -> None:
    bundle = data.synthetic(n_train=128, n_test=32)
    steps: list[int] = []
    epochs: list[int] = []
    progress: list[tuple[int, int]] = []
    train(
        zoo.build_model("lenet-300-100", seed=0),
        bundle.loaders(64)[0],
        TrainConfig(epochs=2, optimizer="adamw", lr=1e-3),
        on_step=steps.append,
        on_epoch_end=lambda e, loss: epochs.append(e),
        progress=lambda done, total: progress.append((done, total)),
    )
    assert steps == [1, 2, 3, 4] and epochs == [0, 1] and progress[-1] == (4, 4)


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", -1), ("lr", 0), ("optimizer", "lbfgs"), ("momentum", 1.0)],
)
def test_train_config_validation(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_finetune_default_is_a_tenth_of_training_lr() -> None:
    ft = finetune_config(TrainConfig(lr=0.05), epochs=3)
    assert ft.epochs == 3 and ft.lr == pytest.approx(0.005)
