"""Properties over random small architectures, structures, allocations and sparsities."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import secateurs as sc
from secateurs.targets import Target, find_targets

SIDE = 5  # input height and width


@dataclass
class Arch:
    seed: int
    in_ch: int
    convs: list[tuple[int, int, int]]  # (out channels, kernel, groups)
    widths: list[int]

    def build(self) -> nn.Sequential:
        torch.manual_seed(self.seed)
        layers: list[nn.Module] = []
        c = self.in_ch
        for out, k, groups in self.convs:
            layers += [nn.Conv2d(c, out, k, padding=k // 2, groups=groups), nn.ReLU()]
            c = out
        layers.append(nn.Flatten())
        with torch.no_grad():
            flat = nn.Sequential(*layers)(torch.zeros(1, self.in_ch, SIDE, SIDE)).shape[1]
        for i, w in enumerate(self.widths):
            layers.append(nn.Linear(flat, w))
            if i < len(self.widths) - 1:
                layers.append(nn.ReLU())
            flat = w
        return nn.Sequential(*layers)

    def inputs(self) -> Tensor:
        torch.manual_seed(self.seed + 1)
        return torch.randn(2, self.in_ch, SIDE, SIDE)


@st.composite
def archs(draw: st.DrawFn) -> Arch:
    in_ch = draw(st.sampled_from([1, 2, 3, 4]))
    convs = []
    c = in_ch
    for _ in range(draw(st.integers(0, 3))):
        out = draw(st.sampled_from([2, 3, 4, 6, 8]))
        k = draw(st.sampled_from([1, 2, 3]))
        groups = draw(
            st.sampled_from([g for g in range(1, min(c, out) + 1) if c % g == out % g == 0])
        )
        convs.append((out, k, groups))
        c = out
    widths = draw(st.lists(st.sampled_from([2, 3, 4, 5, 8, 12]), min_size=1, max_size=3))
    return Arch(draw(st.integers(0, 2**16)), in_ch, convs, widths)


def input_dim(t: Target) -> int:
    return t.shape[0] if t.transposed else t.shape[1]


def canonical_shape(t: Target) -> tuple[int, ...]:
    s = t.shape
    if len(s) == 1:
        return (s[0], 1)
    return (s[1], s[0], *s[2:]) if t.transposed else s


@st.composite
def structures(draw: st.DrawFn, targets: list[Target]) -> sc.Structure:
    """Elements, Blocks, Channels, or N:M when every input dimension of ``targets`` divides."""
    kind = draw(st.sampled_from(["elements", "blocks", "channels", "nm"]))
    if kind == "nm":
        fitting = [m for m in (2, 4, 8) if all(input_dim(t) % m == 0 for t in targets)]
        if not fitting:
            event("nm did not fit; elements instead")
            kind = "elements"
        else:
            m = draw(st.sampled_from(fitting))
            event("structure nm")
            return sc.NM(draw(st.integers(1, m - 1)), m)
    event(f"structure {kind}")
    if kind == "blocks":
        return sc.Blocks((draw(st.integers(1, 3)), draw(st.integers(1, 3))))
    if kind == "channels":
        return sc.Channels(dim=draw(st.sampled_from([0, 1])))
    return sc.Elements()


def group_size(structure: sc.Structure, t: Target) -> int:
    shape = canonical_shape(t)
    kernel = math.prod(shape[2:])
    if isinstance(structure, sc.Channels):
        return (shape[1] if structure.dim == 0 else shape[0]) * kernel
    if isinstance(structure, sc.Blocks):
        b0, b1 = structure.shape
        return min(b0, shape[0]) * min(b1, shape[1]) * kernel
    return 1


def nm_ok(t: Target, n: int, m: int) -> bool:
    w = t.weight.detach()
    c = (w.transpose(0, 1) if t.transposed else w).movedim(1, -1)
    blocks = c.reshape(*c.shape[:-1], c.shape[-1] // m, m)
    return bool(((blocks != 0).sum(-1) <= n).all())


@settings(max_examples=30, deadline=None)
@given(data=st.data(), arch=archs())
def test_random_architectures_keep_every_invariant(data: st.DataObject, arch: Arch) -> None:
    model = arch.build()
    targets = find_targets(model)
    structure = data.draw(structures(targets))
    allocation = data.draw(st.sampled_from(["global", "uniform", "lamp"]))
    floor = structure.min_sparsity()
    fraction = data.draw(st.one_of(st.just(0.0), st.floats(0, 1)))
    s = floor + fraction * (0.95 - floor)
    event(f"allocation {allocation}")

    sc.prune_(model, s, structure=structure, allocation=allocation)

    masks = sc.collect_masks(model)
    assert set(masks) == {t.name for t in targets}
    for t in targets:
        mask = masks[t.name]
        assert mask.dtype == torch.bool and mask.element_size() == 1
        assert mask.shape == t.shape
        # counted from the weights: exactly the masked positions are zero
        assert int((t.weight == 0).sum()) == int((~mask).sum()), t.name
        if isinstance(structure, sc.NM):
            assert nm_ok(t, structure.n, structure.m), t.name

    pools = [targets] if allocation in ("global", "lamp") else [[t] for t in targets]
    for pool in pools:
        total = sum(t.numel for t in pool)
        got = sum(int((t.weight == 0).sum()) for t in pool)
        biggest = max(group_size(structure, t) for t in pool)
        assert abs(got - s * total) <= biggest / 2 + 0.5, (got, s * total, biggest)

    x = arch.inputs()
    out = model(x)
    assert out.shape == (2, arch.widths[-1])
    assert bool(torch.isfinite(out).all())
    out.square().mean().backward()
    for t in targets:
        assert t.raw.grad is not None and bool((t.raw.grad[~masks[t.name]] == 0).all())


@settings(max_examples=25, deadline=None)
@given(
    arch=archs(),
    first=st.floats(0, 0.9),
    more=st.floats(0, 0.09),
    criterion=st.sampled_from(["magnitude", "random"]),
    allocation=st.sampled_from(["global", "uniform", "lamp"]),
)
def test_random_architectures_are_deterministic_and_monotone(
    arch: Arch, first: float, more: float, criterion: str, allocation: str
) -> None:
    a, b = arch.build(), arch.build()
    for model in (a, b):
        sc.prune_(model, first, criterion=criterion, allocation=allocation, seed=5)
    ma, mb = sc.collect_masks(a), sc.collect_masks(b)
    for name in ma:
        assert torch.equal(ma[name], mb[name])
    # Pruner.prune_to, not prune_: prune_ refuses a sparsity below the measured (rounded) one
    sc.Pruner(a, first + more, criterion=criterion, allocation=allocation, seed=6).prune_to(
        first + more
    )
    assert sum(int((~m).sum()) for m in sc.collect_masks(a).values()) >= sum(
        int((~m).sum()) for m in ma.values()
    )
    for name, mask in sc.collect_masks(a).items():
        assert bool((mask <= ma[name]).all()), f"{name} regrew"
