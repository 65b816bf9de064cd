"""How a mask lives on a module: it survives training, serialisation, copies and casts."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import secateurs as sc
from secateurs.masks import get_mask, raw_parameter, set_mask


class BareParameter(nn.Module):
    """A model whose only weight is a bare ``nn.Parameter`` (selected with ``params=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(6, 5))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.scale.t()


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], Tensor]
    targets: set[str]
    options: dict[str, Any] = field(default_factory=dict)
    float_inputs: bool = True


CASES: dict[str, Case] = {
    "linear": Case(lambda: nn.Linear(6, 5), lambda: torch.randn(3, 6), {"weight"}),
    "conv1d": Case(
        lambda: nn.Sequential(nn.Conv1d(3, 4, 3)), lambda: torch.randn(2, 3, 7), {"0.weight"}
    ),
    "conv2d": Case(
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3)), lambda: torch.randn(2, 3, 5, 5), {"0.weight"}
    ),
    "conv3d": Case(
        lambda: nn.Sequential(nn.Conv3d(2, 3, 2)), lambda: torch.randn(1, 2, 3, 3, 3), {"0.weight"}
    ),
    "grouped_conv2d": Case(
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)),
        lambda: torch.randn(2, 4, 5, 5),
        {"0.weight"},
    ),
    "depthwise_conv2d": Case(
        lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)),
        lambda: torch.randn(2, 4, 5, 5),
        {"0.weight"},
    ),
    "conv_transpose2d": Case(
        lambda: nn.Sequential(nn.ConvTranspose2d(4, 3, 3)),
        lambda: torch.randn(2, 4, 3, 3),
        {"0.weight"},
    ),
    "embedding": Case(
        lambda: nn.Sequential(nn.Embedding(10, 4)),
        lambda: torch.tensor([[1, 2, 3], [4, 5, 9]]),
        {"0.weight"},
        float_inputs=False,
    ),
    "multihead_attention": Case(
        Attention,
        lambda: torch.randn(2, 3, 8),
        {"attn.in_proj_weight", "attn.out_proj.weight"},
    ),
    "bare_parameter": Case(
        BareParameter, lambda: torch.randn(3, 5), {"scale"}, options={"params": ["scale"]}
    ),
}

ids = list(CASES)


def build(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.build()


def inputs(case: Case) -> Tensor:
    torch.manual_seed(1234)
    return case.inputs()


def effective(model: nn.Module, name: str) -> Tensor:
    module_name, _, attr = name.rpartition(".")
    value = getattr(model.get_submodule(module_name), attr)
    assert isinstance(value, Tensor)
    return value


def raw(model: nn.Module, name: str) -> nn.Parameter:
    module_name, _, attr = name.rpartition(".")
    return raw_parameter(model.get_submodule(module_name), attr)


def pruned(case: Case, init: int = 0, sparsity: float = 0.5, **extra: Any) -> nn.Module:
    model = build(case, init)
    sc.prune_(model, sparsity, **case.options, **extra)
    return model


def assert_pruned_zero(model: nn.Module, masks: dict[str, Tensor]) -> None:
    for name, mask in masks.items():
        w = effective(model, name)
        assert not mask.all(), f"{name}: nothing was pruned"
        assert bool((w[~mask] == 0).all()), f"{name}: a pruned weight is nonzero"


def loss_of(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).float().square().mean()


@pytest.mark.parametrize("name", ids)
def test_pruned_model_runs_forward_and_backward(name: str) -> None:
    case = CASES[name]
    model = build(case)
    x = inputs(case)
    dense_shape = model(x).shape
    sc.prune_(model, 0.5, **case.options)
    masks = sc.collect_masks(model)
    assert set(masks) == case.targets
    assert isinstance(model, nn.Module)
    out = model(x)
    assert out.shape == dense_shape
    out.square().mean().backward()
    for target, mask in masks.items():
        grad = raw(model, target).grad
        assert grad is not None and bool(torch.isfinite(grad).all())
        # d(raw * mask)/d raw is the mask: pruned positions get no gradient at all
        assert bool((grad[~mask] == 0).all())
        assert bool((grad[mask] != 0).any())


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


@pytest.mark.parametrize("make_opt", [_sgd, _adamw], ids=["sgd_momentum_wd", "adamw"])
@pytest.mark.parametrize("name", ids)
def test_pruned_weights_stay_zero_through_optimizer_built_before_pruning(
    name: str, make_opt: Callable[[Any], torch.optim.Optimizer]
) -> None:
    case = CASES[name]
    model = build(case)
    x = inputs(case)
    opt = make_opt(model.parameters())
    for _ in range(3):  # optimizer state (momentum, Adam moments) exists before pruning
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()
    sc.prune_(model, 0.5, **case.options)
    masks = sc.collect_masks(model)
    held = [p for group in opt.param_groups for p in group["params"]]
    before = {}
    for target in masks:
        param = raw(model, target)
        assert any(param is p for p in held), f"{target}: optimizer lost the raw parameter"
        before[target] = param.detach().clone()
    for _ in range(15):
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()
    assert_pruned_zero(model, masks)
    for target, mask in masks.items():
        # the optimizer really updates the raw tensor behind the mask
        assert not torch.equal(raw(model, target).detach()[mask], before[target][mask])
    sc.make_permanent_(model)
    assert_pruned_zero(model, masks)


@pytest.mark.parametrize("name", ids)
def test_state_dict_loads_into_another_masked_copy(name: str) -> None:
    case = CASES[name]
    source = pruned(case, init=0)
    other = pruned(case, init=1, sparsity=0.3, criterion=sc.Random(), seed=7)
    masks = sc.collect_masks(source)
    assert any(not torch.equal(masks[k], m) for k, m in sc.collect_masks(other).items())
    other.load_state_dict(source.state_dict(), strict=True)
    loaded = sc.collect_masks(other)
    assert loaded.keys() == masks.keys()
    for target, mask in masks.items():
        assert torch.equal(loaded[target], mask)
        assert torch.equal(effective(other, target), effective(source, target))
    assert_pruned_zero(other, masks)
    x = inputs(case)
    torch.testing.assert_close(other(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ids)
def test_load_masked_state_dict_into_fresh_unmasked_model(name: str) -> None:
    case = CASES[name]
    source = pruned(case, init=0)
    fresh = build(case, seed=3)
    assert not sc.collect_masks(fresh)
    sc.load_masked_state_dict_(fresh, source.state_dict())
    masks = sc.collect_masks(source)
    loaded = sc.collect_masks(fresh)
    assert loaded.keys() == masks.keys()
    for target, mask in masks.items():
        assert torch.equal(loaded[target], mask)
    assert_pruned_zero(fresh, masks)
    x = inputs(case)
    torch.testing.assert_close(fresh(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ids)
def test_torch_save_and_weights_only_load(name: str) -> None:
    case = CASES[name]
    source = pruned(case)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = build(case, seed=5)
    sc.load_masked_state_dict_(fresh, state)
    masks = sc.collect_masks(source)
    assert_pruned_zero(fresh, masks)
    for target, mask in masks.items():
        assert torch.equal(sc.collect_masks(fresh)[target], mask)
        assert torch.equal(effective(fresh, target), effective(source, target))


@pytest.mark.parametrize("name", ids)
def test_deepcopy_keeps_masks_and_is_independent(name: str) -> None:
    case = CASES[name]
    source = pruned(case)
    masks = sc.collect_masks(source)
    clone = copy.deepcopy(source)
    x = inputs(case)
    torch.testing.assert_close(clone(x), source(x), rtol=0, atol=0)
    for target, mask in masks.items():
        assert torch.equal(sc.collect_masks(clone)[target], mask)
        assert raw(clone, target) is not raw(source, target)
    assert_pruned_zero(clone, masks)
    # training the copy keeps its zeros and does not touch the original
    opt = _sgd(clone.parameters())
    for _ in range(5):
        opt.zero_grad()
        loss_of(clone, x).backward()
        opt.step()
    assert_pruned_zero(clone, masks)
    assert_pruned_zero(source, masks)
    for target in masks:
        module_name, _, attr = target.rpartition(".")
        mask = get_mask(clone.get_submodule(module_name), attr)
        assert mask is not None
        mask.fill_(True)
    assert_pruned_zero(source, masks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("name", ids)
def test_dtype_conversion_keeps_bool_masks_and_zeros(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    model = pruned(case)
    masks = sc.collect_masks(model)
    if dtype == torch.float16:
        model.half()
    else:
        model.to(dtype)
    for target, mask in sc.collect_masks(model).items():
        assert mask.dtype == torch.bool
        assert torch.equal(mask, masks[target])
        assert effective(model, target).dtype == dtype
        assert raw(model, target).dtype == dtype
    assert_pruned_zero(model, masks)
    if dtype == torch.float64:
        x = inputs(case)
        out = model(x.to(dtype) if case.float_inputs else x)
        assert out.dtype == dtype
        out.square().mean().backward()


@pytest.mark.parametrize("name", ids)
def test_mask_costs_one_byte_per_weight(name: str) -> None:
    case = CASES[name]
    model = pruned(case)
    masks = sc.collect_masks(model)
    total = 0
    for target in masks:
        module_name, _, attr = target.rpartition(".")
        mask = get_mask(model.get_submodule(module_name), attr)
        assert mask is not None
        assert mask.dtype == torch.bool
        assert mask.element_size() == 1
        assert mask.shape == raw(model, target).shape
        total += mask.numel()
    # nothing else per weight is stored: the only buffers are the masks themselves
    assert sum(b.numel() * b.element_size() for b in model.buffers()) == total


@pytest.mark.parametrize("name", ids)
def test_make_permanent_gives_plain_module_of_original_class(name: str) -> None:
    case = CASES[name]
    model = pruned(case)
    masks = sc.collect_masks(model)
    weights = {t: effective(model, t).detach().clone() for t in masks}
    params_before = {t: raw(model, t) for t in masks}
    x = inputs(case)
    expected = model(x).detach()
    assert sc.make_permanent_(model) is model
    fresh = build(case, seed=9)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]
    assert sc.collect_masks(model) == {}
    state = model.state_dict()
    assert set(state) == set(fresh.state_dict())
    assert not any("parametrizations" in k or k.endswith("_orig") or "mask" in k for k in state)
    fresh.load_state_dict(state, strict=True)
    for target, w in weights.items():
        module_name, _, attr = target.rpartition(".")
        param = getattr(model.get_submodule(module_name), attr)
        assert isinstance(param, nn.Parameter)
        assert param is params_before[target]  # an optimizer built earlier still holds it
        assert torch.equal(param.detach(), w)
        assert torch.equal(effective(fresh, target), w)
    assert_pruned_zero(fresh, masks)
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_set_mask_replaces_mask_in_place_and_keeps_parameter() -> None:
    layer = nn.Linear(4, 3)
    param = layer.weight
    first = torch.rand(3, 4) > 0.5
    set_mask(layer, "weight", first)
    assert raw_parameter(layer, "weight") is param
    buffer = get_mask(layer, "weight")
    second = torch.zeros(3, 4, dtype=torch.bool)
    second[0] = True
    set_mask(layer, "weight", second)
    assert get_mask(layer, "weight") is buffer
    assert torch.equal(buffer, second)
    assert bool((layer.weight[1:] == 0).all())
    assert raw_parameter(layer, "weight") is param
    # the raw values at pruned positions are zeroed too
    assert bool((param.detach()[~second] == 0).all())


def test_set_mask_of_wrong_shape_raises_model_error() -> None:
    layer = nn.Linear(4, 3)
    with pytest.raises(sc.ModelError, match=r"\(4, 3\).*\(3, 4\)"):
        set_mask(layer, "weight", torch.ones(4, 3, dtype=torch.bool))
    assert not parametrize.is_parametrized(layer)


def test_apply_masks_with_a_bad_entry_attaches_nothing() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    state = copy.deepcopy(model.state_dict())
    good = torch.zeros(3, 4, dtype=torch.bool)
    with pytest.raises(sc.ModelError, match="nope"):
        sc.apply_masks_(model, {"0.weight": good, "nope.weight": torch.ones(2, 3)})
    with pytest.raises(sc.ModelError, match=r"1\.weight"):
        sc.apply_masks_(model, {"0.weight": good, "1.weight": torch.ones(3, 2, dtype=torch.bool)})
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_collect_masks_returns_copies() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    sc.prune_(model, 0.5)
    copies = sc.collect_masks(model)
    copies["0.weight"].fill_(True)
    assert not sc.collect_masks(model)["0.weight"].all()


@pytest.mark.parametrize("name", ids)
def test_make_permanent_on_a_copy_leaves_the_other_working(name: str) -> None:
    """torch removes a parametrization by deleting it from the class deepcopy shares."""
    case = CASES[name]
    source = pruned(case)
    x = inputs(case)
    expected = source(x)
    clone = copy.deepcopy(source)
    sc.make_permanent_(clone)
    torch.testing.assert_close(source(x), expected, rtol=0, atol=0)
    assert sc.collect_masks(source)  # still masked
    sc.make_permanent_(source)
    torch.testing.assert_close(clone(x), source(x), rtol=0, atol=0)
    assert type(clone) is type(source) is type(case.build())
