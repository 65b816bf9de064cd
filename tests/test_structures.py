"""The sparsity asked is the sparsity obtained, counted from the weights; N:M patterns hold."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import secateurs as sc
from helpers import assert_untouched
from secateurs.targets import Target, find_targets


class Ragged(nn.Module):
    """Layers whose shapes do not divide typical block sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 7)
        self.conv = nn.Conv2d(5, 6, 3)
        self.up = nn.ConvTranspose2d(3, 5, 2)
        self.seq = nn.Conv1d(7, 3, 3)


class Divisible(nn.Module):
    """Every input dimension divisible by 8 (ConvTranspose: dim 0 is the input)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 6)
        self.conv = nn.Conv2d(8, 4, 3)
        self.seq = nn.Conv1d(16, 3, 2)
        self.up = nn.ConvTranspose2d(8, 5, 2)
        self.grouped = nn.Conv2d(16, 4, 1, groups=2)


def ragged() -> Ragged:
    torch.manual_seed(0)
    return Ragged()


def divisible() -> Divisible:
    torch.manual_seed(0)
    return Divisible()


def zeros(t: Target) -> int:
    return int((t.weight == 0).sum())


def canonical(t: Target, value: Tensor) -> Tensor:
    """``value`` as [out, in, *kernel]."""
    if value.dim() == 1:
        return value.unsqueeze(1)
    return value.transpose(0, 1) if t.transposed else value


def nm_nonzeros_per_block(t: Target, m: int) -> Tensor:
    """Nonzeros of every block of ``m`` consecutive inputs, one kernel position at a time."""
    c = canonical(t, t.weight.detach()).movedim(1, -1)  # [out, *kernel, in]
    blocks = c.reshape(*c.shape[:-1], c.shape[-1] // m, m)
    return (blocks != 0).sum(-1)


def group_size(t: Target, b0: int, b1: int) -> int:
    shape = canonical(t, torch.empty(t.shape)).shape
    return min(b0, shape[0]) * min(b1, shape[1]) * math.prod(shape[2:])


def assert_tiles_constant(t: Target, b0: int, b1: int) -> None:
    mask = t.mask
    assert mask is not None
    c = canonical(t, mask)
    c = c.reshape(c.shape[0], c.shape[1], -1)
    for i in range(0, c.shape[0], b0):
        for j in range(0, c.shape[1], b1):
            tile = c[i : i + b0, j : j + b1]
            assert bool(tile.all()) or not bool(tile.any()), f"{t.name}: block ({i}, {j}) split"


SPARSITIES = [0.0, 0.1, 0.37, 0.5, 0.8, 0.95]


@pytest.mark.parametrize("s", SPARSITIES)
def test_elements_global_is_exact(s: float) -> None:
    model = ragged()
    sc.prune_(model, s)
    targets = find_targets(model)
    total = sum(t.numel for t in targets)
    assert sum(zeros(t) for t in targets) == round(s * total)


@pytest.mark.parametrize("s", SPARSITIES)
def test_elements_uniform_is_exact_per_layer(s: float) -> None:
    model = ragged()
    sc.prune_(model, s, allocation=sc.Uniform())
    for t in find_targets(model):
        assert zeros(t) == round(s * t.numel), t.name


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("shape", [(1, 4), (2, 3), (4, 4), (1, 1)])
@pytest.mark.parametrize("s", [0.2, 0.5, 0.9])
def test_blocks_sparsity_within_one_block(
    shape: tuple[int, int], allocation: str, s: float
) -> None:
    model = ragged()
    sc.prune_(model, s, structure=sc.Blocks(shape), allocation=allocation)
    targets = find_targets(model)
    for t in targets:
        assert_tiles_constant(t, *shape)
    pools = [targets] if allocation == "global" else [[t] for t in targets]
    for pool in pools:
        total = sum(t.numel for t in pool)
        biggest = max(group_size(t, *shape) for t in pool)
        got = sum(zeros(t) for t in pool)
        assert abs(got - s * total) <= biggest / 2 + 0.5, [t.name for t in pool]


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("s", [0.25, 0.5, 0.8])
def test_channels_prune_whole_channels_within_one_channel(
    dim: int, allocation: str, s: float
) -> None:
    model = ragged()
    sc.prune_(model, s, structure=sc.Channels(dim=dim), allocation=allocation)
    targets = find_targets(model)
    for t in targets:
        c = canonical(t, t.weight.detach()).movedim(dim, 0)
        alive = (c != 0).reshape(c.shape[0], -1)
        assert bool((alive.all(1) | ~alive.any(1)).all()), f"{t.name}: a channel is split"
    pools = [targets] if allocation == "global" else [[t] for t in targets]
    for pool in pools:
        total = sum(t.numel for t in pool)
        biggest = max(t.numel // canonical(t, torch.empty(t.shape)).shape[dim] for t in pool)
        got = sum(zeros(t) for t in pool)
        assert abs(got - s * total) <= biggest / 2 + 0.5, [t.name for t in pool]


def test_channels_on_conv_transpose_prune_its_output_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(6, 4, 2))  # weight [in=6, out=4, 2, 2]
    sc.prune_(model, 0.5, structure=sc.Channels(dim=0))
    w = model[0].weight.detach()
    dead_outputs = (w == 0).all(dim=0).all(-1).all(-1)  # per output channel (dim 1)
    assert int(dead_outputs.sum()) == 2


NM_CASES = [(2, 4), (1, 4), (1, 2), (3, 8), (2, 8)]


@pytest.mark.parametrize(("n", "m"), NM_CASES)
def test_nm_default_sparsity_is_the_pattern(n: int, m: int) -> None:
    model = divisible()
    sc.prune_(model, structure=sc.NM(n, m))
    for t in find_targets(model):
        per_block = nm_nonzeros_per_block(t, m)
        assert bool((per_block == n).all()), t.name
        assert zeros(t) == t.numel * (m - n) // m


@pytest.mark.parametrize("allocation", ["global", "uniform", "lamp"])
@pytest.mark.parametrize(("n", "m"), NM_CASES)
@pytest.mark.parametrize("extra", [0.0, 0.05, 0.3])
def test_nm_above_the_pattern_keeps_the_pattern_and_hits_sparsity(
    n: int, m: int, extra: float, allocation: str
) -> None:
    s = 1 - n / m + extra * n / m
    model = divisible()
    sc.prune_(model, s, structure=sc.NM(n, m), allocation=allocation)
    targets = find_targets(model)
    for t in targets:
        assert bool((nm_nonzeros_per_block(t, m) <= n).all()), t.name
    if allocation == "uniform":
        for t in targets:
            assert zeros(t) == round(s * t.numel), t.name
    else:
        total = sum(t.numel for t in targets)
        assert sum(zeros(t) for t in targets) == round(s * total)


def test_nm_on_conv_transpose_runs_along_dim_zero() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 3, 2))  # [in=8, out=3, 2, 2]
    sc.prune_(model, structure=sc.NM(2, 4))
    w = model[0].weight.detach()
    blocks = w.movedim(0, -1).reshape(3, 2, 2, 2, 4)  # [out, kh, kw, in/4, 4]
    assert bool(((blocks != 0).sum(-1) == 2).all())


@pytest.mark.parametrize(("n", "m", "s"), [(2, 4, 0.4), (1, 4, 0.7), (3, 8, 0.6)])
def test_nm_below_the_pattern_is_a_config_error(n: int, m: int, s: float) -> None:
    model = divisible()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sc.ConfigError, match=f"{1 - n / m:.4g}"):
        sc.prune_(model, s, structure=sc.NM(n, m))
    assert_untouched(model, state)


def test_nm_layer_sparsity_below_the_pattern_is_a_config_error_and_untouched() -> None:
    model = divisible()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sc.ConfigError, match=r"0\.3"):
        sc.prune_(
            model, 0.6, structure=sc.NM(2, 4), allocation=sc.LayerMap({"up": 0.3}, default=0.6)
        )
    assert_untouched(model, state)


def test_nm_shape_that_does_not_divide_names_the_layer_and_the_way_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 6), nn.Linear(6, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sc.ModelError) as info:
        sc.prune_(model, structure=sc.NM(2, 4))
    message = str(info.value)
    assert "3.weight" in message and "6" in message
    assert "exclude" in message.lower() and "'3'" in message
    assert_untouched(model, state)
    sc.prune_(model, structure=sc.NM(2, 4), exclude=["3"])
    assert model[3].weight.ne(0).all()
    assert int((model[0].weight == 0).sum()) == 16


def test_nm_on_a_one_dimensional_parameter_is_a_model_error() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(sc.ModelError, match="1-D"):
        sc.prune_(model, structure=sc.NM(2, 4), params=["0.bias"])
    assert not parametrize.is_parametrized(model[0])


def test_elements_on_a_one_dimensional_parameter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    sc.prune_(model, 0.5, params=["0.bias"], allocation="uniform")
    assert int((model[0].bias == 0).sum()) == 2
    assert int((model[0].weight == 0).sum()) == 16


@pytest.mark.parametrize(
    "make",
    [
        lambda: sc.NM(4, 4),
        lambda: sc.NM(5, 4),
        lambda: sc.NM(0, 4),
        lambda: sc.NM(2.0, 4),
        lambda: sc.NM(True, 4),
        lambda: sc.Blocks((0, 4)),
        lambda: sc.Blocks((1, 2, 3)),
        lambda: sc.Blocks((1.5, 2)),
        lambda: sc.Channels(dim=2),
    ],
    ids=[
        "nm4:4",
        "nm5:4",
        "nm0:4",
        "nm_float",
        "nm_bool",
        "blocks0",
        "blocks3d",
        "blocks_float",
        "ch2",
    ],
)
def test_bad_structure_options_are_config_errors(make: object) -> None:
    with pytest.raises(sc.ConfigError):
        make()  # type: ignore[operator]


def test_nm_n_not_below_m_message_names_the_values() -> None:
    model = divisible()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sc.ConfigError, match=r"n=4, m=4"):
        sc.prune_(model, structure={"name": "nm", "n": 4, "m": 4})
    assert_untouched(model, state)
