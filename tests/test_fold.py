"""BatchNorm folding: the folded model computes what the model computed, with fewer modules."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from conftest import make_cnn


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters away from their fresh values, so a fold that
    ignored any of them would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _folded(model: nn.Module, x: torch.Tensor, seed: int = 0, tol: float = 1e-4) -> nn.Module:
    """``model`` with randomised norms, in eval mode, folded; its outputs on ``x`` checked
    against the model's."""
    _randomise_norms(model, seed)
    model.eval()
    folded = sc.fold_batchnorm(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=tol, atol=tol)
    return folded


def test_resnet18_folds_every_norm_and_computes_the_same() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    folded = _folded(model, torch.randn(2, 3, 64, 64))
    assert _norms(model) == 20 and _norms(folded) == 0  # every BN follows its own conv
    assert not folded.training


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    kernel=st.sampled_from([1, 3]),
    bias=st.booleans(),
    grouped=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_folded_conv_stacks_match(
    widths: list[int], kernel: int, bias: bool, grouped: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    previous = 4
    for w in widths:
        groups = 2 if grouped and previous % 2 == 0 and w % 2 == 0 else 1
        conv = nn.Conv2d(previous, w, kernel, padding=kernel // 2, groups=groups, bias=bias)
        layers += [conv, nn.BatchNorm2d(w), nn.ReLU()]
        previous = w
    layers += [nn.Flatten(), nn.LazyLinear(3)]
    model = nn.Sequential(*layers)
    model(torch.randn(1, 4, 5, 5))  # materialise the lazy layer
    assert _norms(_folded(model, torch.randn(3, 4, 5, 5), seed)) == 0


def test_linear_norms_fold_and_zeros_stay_zero() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    sc.prune_(model, sparsity=0.75)
    sc.make_permanent_(model)
    zeros = int((model[0].weight == 0).sum())
    folded = _folded(model, torch.randn(5, 8), tol=1e-5)
    assert _norms(folded) == 0
    assert int((folded.get_submodule("0").weight == 0).sum()) == zeros  # sparsity kept


class _SharedOutput(nn.Module):
    """The convolution's output is read by the norm and by the residual add: no fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Conv2d(3, 3, 1)
        self.head_bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head_bn(self.head(self.bn(y) + y))


def test_a_norm_whose_input_has_other_readers_stays() -> None:
    torch.manual_seed(0)
    folded = _folded(_SharedOutput(), torch.randn(2, 3, 6, 6), tol=1e-5)
    assert _norms(folded) == 1  # bn stays, head_bn is folded into head
    assert isinstance(folded.get_submodule("bn"), nn.BatchNorm2d)


def test_the_model_is_left_alone_and_bad_input_is_named() -> None:
    model = make_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    sc.fold_batchnorm(model)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    masked = make_cnn()
    sc.prune_(masked, sparsity=0.5)
    with pytest.raises(sc.ConfigError, match="make_permanent_"):
        sc.fold_batchnorm(masked)

    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x  # data-dependent control flow: fx cannot trace it

    with pytest.raises(sc.ModelError, match=r"torch\.fx"):
        sc.fold_batchnorm(Branchy())
