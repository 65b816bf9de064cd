"""Reference models for demos, tests and benchmarks, and torchvision's zoo by name.

The zoo's own networks take 28x28 single-channel inputs (MNIST-style) by default. Names of the
form ``torchvision:<name>`` build torchvision classification models with random weights
(nothing is downloaded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from secateurs.errors import ConfigError
from secateurs.registry import Registry

MODELS: Registry[Any] = Registry("model")


@MODELS.register("lenet-300-100")
class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100 (LeCun et al. 1998): 784-300-100-10, ReLU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


@MODELS.register("lenet-5")
class LeNet5(nn.Module):
    """LeNet-5: two 5x5 convolutions (6, 16 channels) with max-pooling, then 120-84-classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


@MODELS.register("lenet-5-caffe")
class LeNet5Caffe(nn.Module):
    """Caffe's LeNet-5, the one Han et al. (2015, 2016) prune: conv 20 and 50 (5x5), 500, classes.

    431k weights, seven times the classic LeNet-5; as in Caffe, the convolutions have no ReLU.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


@MODELS.register("vgg-bn")
class VGGBN(nn.Module):
    """A small VGG: convs 32-32-64-64-128 (3x3, BatchNorm, ReLU), two max-pools, GAP, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c = [max(1, round(w * width)) for w in (32, 32, 64, 64, 128)]
        self.features = nn.Sequential(
            _conv_bn(in_channels, c[0]), _conv_bn(c[0], c[1]), nn.MaxPool2d(2),
            _conv_bn(c[1], c[2]), _conv_bn(c[2], c[3]), nn.MaxPool2d(2),
            _conv_bn(c[3], c[4]), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.classifier = nn.Linear(c[4], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 convolution + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@MODELS.register("resnet-20")
class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016, CIFAR variant): 3 stages of 3 basic blocks, 16/32/64 channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def build_model(
    name: str, num_classes: int = 10, in_channels: int = 1, seed: int | None = None, **options: Any
) -> nn.Module:
    """Build a zoo model by name, or ``torchvision:<name>`` with random weights."""
    if seed is not None:
        torch.manual_seed(seed)
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.split(":", 1)[1]
        if tv_name not in torchvision.models.list_models():
            raise ConfigError(
                f"torchvision has no model {tv_name!r}; see torchvision.models.list_models()"
            )
        model = torchvision.models.get_model(
            tv_name, weights=None, num_classes=num_classes, **options
        )
        assert isinstance(model, nn.Module)
        return model
    cls = MODELS.get(name)
    try:
        model = cls(num_classes=num_classes, in_channels=in_channels, **options)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: {exc}") from None
    assert isinstance(model, nn.Module)
    return model


def example_input(name: str, batch: int = 1, in_channels: int = 1) -> Tensor:
    """A zero input of the right shape for a model name."""
    if name.startswith("torchvision:"):
        size = 299 if "inception" in name else 224
        return torch.zeros(batch, 3, size, size)
    return torch.zeros(batch, in_channels, 28, 28)
