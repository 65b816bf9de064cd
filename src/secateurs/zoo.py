"""Reference models for demos, tests and benchmarks, and torchvision's zoo by name.

The zoo's own networks take 28x28 single-channel inputs (MNIST-style) by default; each records
the input it expects in ``input_shape`` (one example, no batch dimension). Names of the form
``torchvision:<name>`` build torchvision classification models with random weights (nothing is
downloaded).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.errors import ConfigError, ModelError
from secateurs.registry import Registry

MODELS: Registry[Any] = Registry("model")
TORCHVISION_PREFIX = "torchvision:"


@MODELS.register("lenet-300-100")
class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100 (LeCun et al. 1998): 784-300-100-classes, ReLU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


@MODELS.register("lenet-5")
class LeNet5(nn.Module):
    """Classic LeNet-5 for 28x28 inputs: conv 6@5x5 (pad 2), pool, conv 16@5x5, pool, 120-84-classes.

    61.7k weights, ReLU activations and max-pooling (the modern reading of LeCun et al. 1998).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.input_shape = (in_channels, 28, 28)
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
        self.input_shape = (in_channels, 28, 28)
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


#: VGG-BN's convolution widths, first to last.
VGG_CHANNELS = (32, 32, 64, 64, 128)


@MODELS.register("vgg-bn")
class VGGBN(nn.Module):
    """A small VGG: convs 32-32-64-64-128 (3x3, BatchNorm, ReLU), two max-pools, GAP, Linear.

    ``width`` scales every conv's channel count (at least 1 channel each), for quick variants
    and for structured-pruning baselines of a given size; ``channels`` sets the five counts
    outright (the shapes a channel cut can reach, for timing them). Any input size >= 4x4 works.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: float = 1.0,
        channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ConfigError(f"vgg-bn: width = {width!r} is invalid; must be a number > 0")
        if channels is not None and (
            len(channels) != len(VGG_CHANNELS)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in channels)
        ):
            raise ConfigError(
                f"vgg-bn: channels = {channels!r} is invalid; must be {len(VGG_CHANNELS)} "
                "integers >= 1, one per convolution"
            )
        self.input_shape = (in_channels, 28, 28)
        c = list(channels or (max(1, round(w * width)) for w in VGG_CHANNELS))
        self.features = nn.Sequential(
            _conv_bn(in_channels, c[0]), _conv_bn(c[0], c[1]), nn.MaxPool2d(2),
            _conv_bn(c[1], c[2]), _conv_bn(c[2], c[3]), nn.MaxPool2d(2),
            _conv_bn(c[3], c[4]), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.classifier = nn.Linear(c[4], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 convolution + BN shortcut (option B) when the shape changes."""

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
    """ResNet-20 (He et al. 2016, CIFAR variant): 3 stages of 3 basic blocks, 16/32/64 channels.

    Downsampling blocks use 1x1 conv + BN shortcuts (option B), which gives channel pruning
    coupled residual groups to handle. 28x28 inputs end as 7x7 maps before global pooling.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.input_shape = (in_channels, 28, 28)
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


def _adapt_stem(model: nn.Module, in_channels: int, name: str) -> None:
    """Replace the first 3-channel ``Conv2d`` with an ``in_channels`` one (fresh weights).

    Lets a torchvision architecture train on grey images (Fashion-MNIST) without changing the
    data; the rest of the network is untouched.
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
                stem = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,  # type: ignore[arg-type]
                    child.stride,  # type: ignore[arg-type]
                    child.padding,  # type: ignore[arg-type]
                    child.dilation,  # type: ignore[arg-type]
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, child_name, stem)
                return
    raise ModelError(
        f"{name} has no 3-channel Conv2d stem to adapt to in_channels={in_channels}; "
        "build it with in_channels=3 and feed it 3-channel inputs"
    )


def _build_torchvision(
    name: str, num_classes: int, in_channels: int | None, options: dict[str, Any]
) -> nn.Module:
    import torchvision  # lazy: torchvision is only needed for these names

    tv_name = name[len(TORCHVISION_PREFIX) :]
    if tv_name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"torchvision has no classification model {tv_name!r}; see the names with "
            "`python -c 'import torchvision; print(torchvision.models.list_models("
            "module=torchvision.models))'`"
        )
    try:
        model = torchvision.models.get_model(
            tv_name, weights=None, num_classes=num_classes, **options
        )
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"torchvision.models.get_model({tv_name!r}) did not return a Module")
    if in_channels is not None and in_channels != 3:
        _adapt_stem(model, in_channels, name)
    return model


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int | None = None,
    seed: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build a zoo model by name, or ``torchvision:<name>`` with random weights.

    ``in_channels`` defaults to the architecture's own (1 for the zoo, 3 for torchvision); a
    torchvision model asked for another count gets its first convolution replaced to match.
    ``options`` are the architecture's extra arguments (``width=`` or ``channels=`` for
    ``vgg-bn``). If ``seed`` is given, ``torch.manual_seed(seed)`` runs first, so the same seed
    gives the same weights.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes = {num_classes!r} is invalid; must be an integer >= 1")
    if in_channels is not None and (
        isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1
    ):
        raise ConfigError(f"in_channels = {in_channels!r} is invalid; must be an integer >= 1")
    if seed is not None:
        torch.manual_seed(seed)
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name, num_classes, in_channels, options)
    cls = MODELS.get(name)
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("self",)]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        extra = [p for p in allowed if p not in ("num_classes", "in_channels")]
        raise ConfigError(
            f"model {name!r}: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(extra) or '(none)'}"
        )
    channels = 1 if in_channels is None else in_channels
    model = cls(num_classes=num_classes, in_channels=channels, **options)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r} is registered to {cls!r}, which is not an nn.Module")
    return model


def _input_shape_of(model: nn.Module) -> tuple[int, ...]:
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return shape
    size = 299 if type(model).__name__ == "Inception3" else 224
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (module.in_channels, size, size)
        if isinstance(module, nn.Linear):
            return (module.in_features,)
    raise ModelError(
        f"cannot infer an input shape for {type(model).__name__} (no input_shape attribute, "
        "no Conv2d or Linear layer); build the example input yourself"
    )


def example_input(
    name_or_model: str | nn.Module,
    batch: int = 1,
    in_channels: int | None = None,
    seed: int = 0,
) -> Tensor:
    """A dummy input batch of the right shape for a model name or a model.

    1x28x28 for the zoo's own (``in_channels`` overrides the channels), 3x224x224 for torchvision
    (3x299x299 for inception_v3). For a model object, its ``input_shape`` attribute if it has
    one, else the shape implied by its first Conv2d/Linear. Values are standard normal from a
    private generator seeded with ``seed`` (deterministic, global RNG untouched).
    """
    if isinstance(name_or_model, nn.Module):
        shape = _input_shape_of(name_or_model)
    elif name_or_model.startswith(TORCHVISION_PREFIX):
        size = 299 if "inception" in name_or_model else 224
        shape = (3 if in_channels is None else in_channels, size, size)
    else:
        MODELS.get(name_or_model)  # unknown name -> ConfigError listing the allowed
        shape = (1 if in_channels is None else in_channels, 28, 28)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g)
