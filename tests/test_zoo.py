"""Reference models, build_model by name (zoo and torchvision) and example inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs import zoo
from secateurs.errors import ConfigError, ModelError

ZOO = ["lenet-300-100", "lenet-5", "lenet-5-caffe", "vgg-bn", "resnet-20"]


def _weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_registry_holds_the_zoo() -> None:
    assert set(ZOO) <= set(zoo.MODELS.names())


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_run_forward_and_backward(name: str) -> None:
    model = zoo.build_model(name, seed=0)
    x = zoo.example_input(name, batch=3)
    assert x.shape == (3, 1, 28, 28) and model.input_shape == (1, 28, 28)
    out = model(x)
    assert out.shape == (3, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert zoo.example_input(model, batch=2).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("name", ["lenet-5", "vgg-bn", "resnet-20"])
def test_zoo_models_take_other_channel_and_class_counts(name: str) -> None:
    model = zoo.build_model(name, num_classes=4, in_channels=3).eval()
    x = zoo.example_input(name, batch=2, in_channels=3)
    assert model(x).shape == (2, 4) and zoo.example_input(model).shape == (1, 3, 28, 28)


def test_published_sizes() -> None:
    assert _weights(zoo.build_model("lenet-300-100")) == 784 * 300 + 300 * 100 + 100 * 10
    assert _weights(zoo.build_model("lenet-5")) == 150 + 2400 + 48000 + 10080 + 840
    assert _weights(zoo.build_model("lenet-5-caffe")) == 500 + 25000 + 400000 + 5000  # 431k


def test_vgg_bn_layout_and_width() -> None:
    model = zoo.build_model("vgg-bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    half = zoo.build_model("vgg-bn", width=0.5)
    assert [c.out_channels for c in half.modules() if isinstance(c, nn.Conv2d)] == [
        16, 16, 32, 32, 64,
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="width"):
        zoo.build_model("vgg-bn", width=0)
    custom = zoo.build_model("vgg-bn", channels=(16, 24, 48, 32, 96))
    assert [c.out_channels for c in custom.modules() if isinstance(c, nn.Conv2d)] == [
        16, 24, 48, 32, 96,
    ]  # fmt: skip
    assert custom(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    for bad in ((16, 24, 48, 32), (16, 24, 48, 32, 0), (16, 24, 48, 32, 9.5)):
        with pytest.raises(ConfigError, match=r"channels.*5 integers >= 1"):
            zoo.build_model("vgg-bn", channels=bad)


def test_resnet20_layout() -> None:
    model = zoo.build_model("resnet-20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    shortcuts = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(three) + 1 == 20  # 19 convolutions + the classifier: ResNet-20
    assert [(c.in_channels, c.out_channels, c.stride) for c in shortcuts] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]
    assert {c.out_channels for c in three} == {16, 32, 64}
    assert 265_000 < sum(p.numel() for p in model.parameters()) < 275_000


def test_build_model_is_seeded() -> None:
    a, b = zoo.build_model("lenet-5", seed=1), zoo.build_model("lenet-5", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = zoo.build_model("lenet-5", seed=2)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_torchvision_by_name() -> None:
    model = zoo.build_model("torchvision:resnet18", seed=0).eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    assert zoo.example_input(model).shape == (1, 3, 224, 224)
    seven = zoo.build_model("torchvision:resnet18", num_classes=7).eval()
    assert seven(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_torchvision_adapts_its_stem_to_grey_images() -> None:
    model = zoo.build_model("torchvision:resnet18", in_channels=1).eval()
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert zoo.example_input(model).shape == (1, 1, 224, 224)


def test_example_input_shapes_and_determinism() -> None:
    assert zoo.example_input("torchvision:resnet18", batch=2).shape == (2, 3, 224, 224)
    assert zoo.example_input("torchvision:inception_v3").shape == (1, 3, 299, 299)
    assert torch.equal(zoo.example_input("lenet-5"), zoo.example_input("lenet-5"))
    assert zoo.example_input(nn.Linear(5, 2), batch=4).shape == (4, 5)
    with pytest.raises(ModelError, match="input shape"):
        zoo.example_input(nn.ReLU())
    with pytest.raises(ConfigError, match="lenet-5"):
        zoo.example_input("lenet-6")


def test_unknown_names_and_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'lenet-6'; allowed: .*lenet-300-100"):
        zoo.build_model("lenet-6")
    with pytest.raises(ConfigError, match="list_models"):
        zoo.build_model("torchvision:resnet19")
    with pytest.raises(ConfigError, match="list_models"):
        zoo.build_model("torchvision:fcn_resnet50")  # segmentation, not classification
    with pytest.raises(ConfigError, match=r"'depth'.*allowed: width"):
        zoo.build_model("vgg-bn", depth=3)
    with pytest.raises(ConfigError, match="torchvision:resnet18"):
        zoo.build_model("torchvision:resnet18", depth=3)
    with pytest.raises(ConfigError, match="num_classes"):
        zoo.build_model("lenet-5", num_classes=0)
    with pytest.raises(ConfigError, match="in_channels"):
        zoo.build_model("lenet-5", in_channels=0)
