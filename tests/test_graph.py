"""The channel graph on small hand-made modules: one test per coupling rule.

Each test builds the graph, checks the groups the rule should produce (which tensors lose
which positions together, what is pinned and why), removes channels, and checks that the
physically pruned model gives exactly the masked model's output (the same positions zeroed)
and has consistent module attributes. A property test does the same over random small
architectures with residual adds, concatenations and grouped convolutions.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.errors import ConfigError, ModelError
from secateurs.graph import (
    ChannelGraph,
    ChannelGroup,
    ChannelPlan,
    apply_plan_,
    build_graph,
    mask_plan_,
    plan_from_removed,
)

# --------------------------------------------------------------------------- helpers


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, so that every channel changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / max(p[0].numel(), 1) ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                assert m.running_var is not None
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def some_removed(graph: ChannelGraph, seed: int = 0, fraction: float = 0.4) -> dict[int, Tensor]:
    """A random ``fraction`` (at least one) of each prunable group's prunable channels."""
    gen = torch.Generator().manual_seed(seed)
    removed = {}
    for g in graph.prunable_groups:
        candidates = g.prunable.nonzero().flatten()
        k = min(max(1, round(fraction * len(candidates))), len(candidates), g.size - 1)
        mask = torch.zeros(g.size, dtype=torch.bool)
        mask[candidates[torch.randperm(len(candidates), generator=gen)[:k]]] = True
        removed[g.index] = mask
    return removed


def outputs(model: nn.Module, x: Any) -> Tensor:
    with torch.no_grad():
        y = model(x)
    if isinstance(y, dict):
        y = torch.cat([v.flatten() for v in y.values()])
    elif isinstance(y, (tuple, list)):
        y = torch.cat([v.flatten() for v in y])
    assert isinstance(y, Tensor)
    return y


def prune_exactly(
    model: nn.Module, x: Any, removed: dict[int, Tensor] | None = None, seed: int = 0
) -> tuple[ChannelGraph, ChannelPlan, nn.Module]:
    """Build the graph, remove ``removed`` (default: some of every prunable group), and
    assert the pruned copy equals the masked copy; returns (graph, plan, pruned copy)."""
    model.eval()
    graph = build_graph(model, x)
    removed = some_removed(graph, seed) if removed is None else removed
    plan = plan_from_removed(graph, removed)
    assert plan.num_removed > 0
    masked = mask_plan_(copy.deepcopy(model), plan)
    pruned = apply_plan_(copy.deepcopy(model), plan)
    want, got = outputs(masked, x), outputs(pruned, x)
    assert got.shape == want.shape
    scale = max(want.abs().max().item(), 1e-6)
    assert (got - want).abs().max().item() <= 1e-5 * scale
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    return graph, plan, pruned


def groups_with(graph: ChannelGraph, qualname: str, dim: int) -> list[ChannelGroup]:
    """The groups that own positions of dimension ``dim`` of tensor ``qualname``."""
    return [
        g
        for g in graph.groups
        if any(m.ref.qualname == qualname and m.dim == dim for m in g.members)
    ]


def group_with(graph: ChannelGraph, qualname: str, dim: int) -> ChannelGroup:
    found = groups_with(graph, qualname, dim)
    assert len(found) == 1, f"{qualname} dim {dim} is in {len(found)} groups"
    return found[0]


def members(group: ChannelGroup) -> set[tuple[str, int]]:
    return {(m.ref.qualname, m.dim) for m in group.members}


def channel_of(group: ChannelGroup, qualname: str, dim: int) -> list[int]:
    for m in group.members:
        if m.ref.qualname == qualname and m.dim == dim:
            return m.channel.tolist()
    raise AssertionError(f"{qualname} dim {dim} is not in {group}")


def only(group: ChannelGroup, *channels: int) -> dict[int, Tensor]:
    mask = torch.zeros(group.size, dtype=torch.bool)
    mask[list(channels)] = True
    return {group.index: mask}


IMG = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- layers


class ConvBNReLUConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.bn(self.conv1(x))))


def test_conv_bn_relu_conv_couples_filters_statistics_and_next_input() -> None:
    model = randomize_(ConvBNReLUConv())
    graph = build_graph(model, IMG)
    assert len(graph.prunable_groups) == 1
    group = graph.prunable_groups[0]
    assert group.size == 8 and group.num_prunable == 8 and group.name == "conv1"
    assert members(group) == {
        ("conv1.weight", 0),
        ("conv1.bias", 0),
        ("bn.weight", 0),
        ("bn.bias", 0),
        ("bn.running_mean", 0),
        ("bn.running_var", 0),
        ("conv2.weight", 1),
    }
    _, plan, pruned = prune_exactly(model, IMG, only(group, 1, 5, 6))
    assert plan.removed["conv1.weight"] == {0: [1, 5, 6]}
    assert plan.removed["bn.running_var"] == {0: [1, 5, 6]}
    assert plan.removed["conv2.weight"] == {1: [1, 5, 6]}
    assert pruned.conv1.out_channels == pruned.bn.num_features == pruned.conv2.in_channels == 5
    assert pruned.bn.running_mean.shape == (5,)


def test_model_outputs_are_pinned_with_the_reason() -> None:
    model = randomize_(ConvBNReLUConv())
    out = group_with(build_graph(model, IMG), "conv2.weight", 0)
    assert out.num_prunable == 0
    assert any("a model output" in why for why in out.pinned_because)

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 6, 1)
            self.a = nn.Conv2d(6, 2, 1)
            self.b = nn.Conv2d(6, 3, 1)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            h = F.relu(self.body(x))
            return {"a": self.a(h), "b": self.b(h)}

    heads = randomize_(TwoHeads())
    graph, _, _ = prune_exactly(heads, IMG)
    assert group_with(graph, "a.weight", 0).num_prunable == 0
    assert group_with(graph, "b.weight", 0).num_prunable == 0
    assert group_with(graph, "body.weight", 0).num_prunable == 6


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.stem(x))
        return self.head(F.relu(y + self.bn(self.body(y))))


def test_residual_add_makes_both_branches_share_channels() -> None:
    model = randomize_(Residual())
    graph = build_graph(model, IMG)
    group = group_with(graph, "stem.weight", 0)
    assert group.size == 8 and group.num_prunable == 8
    assert {
        ("stem.weight", 0),
        ("body.weight", 0),
        ("body.weight", 1),
        ("bn.weight", 0),
    } <= members(group)
    assert ("head.weight", 1) in members(group)
    assert len(graph.prunable_groups) == 1
    _, plan, pruned = prune_exactly(model, IMG, only(group, 0, 3))
    assert plan.removed["stem.weight"][0] == plan.removed["body.weight"][0] == [0, 3]
    assert pruned.body.weight.shape == (6, 6, 3, 3)


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(F.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_cat_offsets_each_part_into_the_consumer() -> None:
    model = randomize_(CatNet())
    graph = build_graph(model, IMG)
    ga, gb = group_with(graph, "a.weight", 0), group_with(graph, "b.weight", 0)
    assert channel_of(ga, "c.weight", 1) == [0, 1, 2, 3] + [-1] * 6
    assert channel_of(gb, "c.weight", 1) == [-1] * 4 + [0, 1, 2, 3, 4, 5]
    removed = {**only(ga, 1), **only(gb, 0, 5)}
    _, plan, pruned = prune_exactly(model, IMG, removed)
    assert plan.removed["c.weight"] == {1: [1, 4, 9]}
    assert pruned.c.in_channels == 7


class ChunkNet(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 1)
        self.p = nn.Conv2d(4, 3, 1)
        self.q = nn.Conv2d(4, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        if self.how == "chunk":
            a, b = h.chunk(2, dim=1)
        elif self.how == "split-sizes":
            a, b = h.split([4, 4], dim=1)
        else:  # slices
            a, b = h[:, :4], h[:, 4:]
        return self.p(a) + self.q(b)


def test_chunk_into_equal_pieces_ties_the_same_position_of_every_piece() -> None:
    model = randomize_(ChunkNet("chunk"))
    graph = build_graph(model, IMG)
    group = group_with(graph, "conv.weight", 0)
    assert group.size == 4 and group.num_prunable == 4
    assert channel_of(group, "conv.weight", 0) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert channel_of(group, "p.weight", 1) == channel_of(group, "q.weight", 1) == [0, 1, 2, 3]
    _, plan, pruned = prune_exactly(model, IMG, only(group, 2))
    assert plan.removed["conv.weight"] == {0: [2, 6]}
    assert pruned.conv.out_channels == 6


@pytest.mark.parametrize("how", ["split-sizes", "slices"])
def test_split_by_numbers_along_channels_is_pinned(how: str) -> None:
    model = randomize_(ChunkNet(how))
    graph = build_graph(model, IMG)
    for group in groups_with(graph, "conv.weight", 0):  # the two halves feed different convs
        assert group.num_prunable == 0
        assert any("picks channels by position" in why for why in group.pinned_because)
    assert not graph.unhandled
    assert graph.prunable_groups == []


def test_split_and_slices_along_another_dimension_keep_channels() -> None:
    class SpatialSplit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.conv(x))
            top, bottom = h.split(3, dim=2)
            return self.head(top * bottom + h[..., 1:4, :] + h[:, :, ::2])

    model = randomize_(SpatialSplit())
    graph, _, _ = prune_exactly(model, IMG)
    assert group_with(graph, "conv.weight", 0).num_prunable == 8


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.grouped = nn.Conv2d(6, 12, 3, padding=1, groups=3)  # 2 in, 4 out per group
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.dw(F.relu(self.expand(x)))))
        return self.head(F.relu(self.grouped(F.relu(self.pw(h)))))


def test_depthwise_and_grouped_convolutions_lose_whole_groups() -> None:
    model = randomize_(GroupedNet())
    graph = build_graph(model, IMG)
    depthwise = group_with(graph, "dw.weight", 0)
    assert {("expand.weight", 0), ("dw.weight", 0), ("bn.weight", 0), ("pw.weight", 1)} <= members(
        depthwise
    )
    assert depthwise.size == 8
    grouped = group_with(graph, "grouped.weight", 0)
    assert grouped.size == 3  # one channel per convolution group
    assert channel_of(grouped, "grouped.weight", 0) == [0] * 4 + [1] * 4 + [2] * 4
    assert channel_of(grouped, "pw.weight", 0) == [0, 0, 1, 1, 2, 2]
    removed = {**only(depthwise, 0, 7), **only(grouped, 1)}
    _, _, pruned = prune_exactly(model, IMG, removed)
    assert pruned.dw.in_channels == pruned.dw.out_channels == pruned.dw.groups == 6
    assert pruned.pw.out_channels == 4
    assert (pruned.grouped.in_channels, pruned.grouped.out_channels, pruned.grouped.groups) == (
        4,
        8,
        2,
    )
    assert pruned.head.in_channels == 8
    prune_exactly(model, IMG, seed=3)


def test_flatten_into_linear_makes_one_channel_h_times_w_features() -> None:
    model = randomize_(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    )
    graph = build_graph(model, IMG)
    group = group_with(graph, "0.weight", 0)
    assert channel_of(group, "3.weight", 1) == torch.arange(4).repeat_interleave(36).tolist()
    _, plan, pruned = prune_exactly(model, IMG, only(group, 2))
    assert plan.removed["3.weight"] == {1: list(range(72, 108))}
    assert pruned[3].in_features == 3 * 36


def test_group_norm_removes_whole_groups_and_updates_num_groups() -> None:
    model = randomize_(
        nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 3, 1))
    )
    graph = build_graph(model, IMG)
    group = group_with(graph, "1.weight", 0)
    assert group.size == 4
    assert channel_of(group, "0.weight", 0) == [0, 0, 1, 1, 2, 2, 3, 3]
    _, _, pruned = prune_exactly(model, IMG, only(group, 1, 2))
    assert (pruned[1].num_groups, pruned[1].num_channels) == (2, 4)


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h)


def test_layer_norm_over_channels_is_pinned_but_the_hidden_dim_is_prunable() -> None:
    model = randomize_(TokenMLP())
    x = torch.randn(2, 5, 8)
    graph, _, pruned = prune_exactly(model, x)
    width = group_with(graph, "embed.weight", 0)
    assert width.num_prunable == 0
    assert any("layer_norm normalises over these channels" in why for why in width.pinned_because)
    hidden = group_with(graph, "fc1.weight", 0)
    assert hidden.num_prunable == 32 and ("fc2.weight", 1) in members(hidden)
    assert pruned.fc1.out_features == pruned.fc2.in_features < 32
    assert pruned.norm.normalized_shape == (16,)


def test_channel_shuffle_ties_the_same_position_of_every_group() -> None:
    model = randomize_(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ChannelShuffle(2), nn.Conv2d(8, 3, 1)))
    graph = build_graph(model, IMG)
    group = group_with(graph, "0.weight", 0)
    assert group.size == 4
    assert channel_of(group, "0.weight", 0) == [0, 1, 2, 3, 0, 1, 2, 3]
    # after the shuffle, position 2*i + g holds channel i of group g
    assert channel_of(group, "2.weight", 1) == [0, 0, 1, 1, 2, 2, 3, 3]
    _, _, pruned = prune_exactly(model, IMG, only(group, 1))
    assert pruned[0].out_channels == pruned[2].in_channels == 6


def test_pixel_shuffle_and_unshuffle_move_whole_blocks() -> None:
    up = randomize_(nn.Sequential(nn.Conv2d(3, 8, 1), nn.PixelShuffle(2), nn.Conv2d(2, 3, 1)))
    graph = build_graph(up, IMG)
    group = group_with(graph, "0.weight", 0)
    assert group.size == 2 and channel_of(group, "0.weight", 0) == [0] * 4 + [1] * 4
    _, _, pruned = prune_exactly(up, IMG, only(group, 0))
    assert (pruned[0].out_channels, pruned[2].in_channels) == (4, 1)

    down = randomize_(nn.Sequential(nn.Conv2d(3, 2, 1), nn.PixelUnshuffle(2), nn.Conv2d(8, 3, 1)))
    graph = build_graph(down, IMG)
    group = group_with(graph, "0.weight", 0)
    assert channel_of(group, "2.weight", 1) == [0] * 4 + [1] * 4
    _, _, pruned = prune_exactly(down, IMG, only(group, 1))
    assert pruned[2].in_channels == 4


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 2, 1)
        self.expand = nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(h, 1)))))
        return self.head(h * gate)


def test_squeeze_and_excitation_couples_the_gate_with_the_features() -> None:
    model = randomize_(SqueezeExcite())
    graph = build_graph(model, IMG)
    features = group_with(graph, "conv.weight", 0)
    assert {
        ("reduce.weight", 1),
        ("expand.weight", 0),
        ("expand.bias", 0),
        ("head.weight", 1),
    } <= members(features)
    squeeze = group_with(graph, "reduce.weight", 0)
    assert squeeze.size == 2 and ("expand.weight", 1) in members(squeeze)
    _, _, pruned = prune_exactly(model, IMG)
    assert pruned.expand.out_channels == pruned.conv.out_channels < 8


def test_embedding_dim_is_prunable() -> None:
    model = randomize_(nn.Sequential(nn.Embedding(20, 16), nn.ReLU(), nn.Linear(16, 4)))
    tokens = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    graph = build_graph(model, tokens)
    group = group_with(graph, "0.weight", 1)
    assert group.size == 16 and ("2.weight", 1) in members(group)
    _, _, pruned = prune_exactly(model, tokens)
    assert pruned[0].embedding_dim == pruned[2].in_features < 16


class Tokens(nn.Module):
    """Patch embedding, class token, positional embedding and a layer scale: bare parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(3, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 16))
        self.pos = nn.Parameter(torch.zeros(1, 12, 16))  # longer than needed: sliced
        self.scale = nn.Parameter(torch.ones(16))
        self.alpha = nn.Parameter(torch.ones(1))
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x.flatten(2).transpose(1, 2)[:, :9])
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1)
        h = h + self.pos[:, : h.shape[1]]
        h = F.relu(h * self.scale) * self.alpha
        return self.fc(h)[:, 0]


def test_bare_parameters_follow_the_channels_they_are_used_with() -> None:
    model = randomize_(Tokens())
    graph = build_graph(model, IMG)
    group = group_with(graph, "patch.weight", 0)
    assert group.size == 16 and group.num_prunable == 16  # the scalar alpha merges nothing
    assert {("cls_token", 2), ("pos", 2), ("scale", 0), ("fc.weight", 1)} <= members(group)
    _, _, pruned = prune_exactly(model, IMG)
    k = pruned.patch.out_features
    assert k < 16
    assert pruned.cls_token.shape == (1, 1, k) and pruned.pos.shape == (1, 12, k)
    assert pruned.scale.shape == (k,) and pruned.alpha.shape == (1,)


class Attention(nn.Module):
    """Single-head attention written three ways: queries and keys are mixed, values are not."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.q = nn.Linear(6, 8)
        self.k = nn.Linear(6, 8)
        self.v = nn.Linear(6, 8)
        self.out = nn.Linear(8, 6)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.how == "matmul":
            y = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        elif self.how == "einsum":
            attn = torch.einsum("bid,bjd->bij", q, k).softmax(-1)
            y = torch.einsum("bij,bjd->bid", attn, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y)


@pytest.mark.parametrize("how", ["matmul", "einsum", "sdpa"])
def test_attention_pins_queries_and_keys_and_keeps_value_channels(how: str) -> None:
    model = randomize_(Attention(how))
    x = torch.randn(2, 5, 6)
    graph, _, pruned = prune_exactly(model, x)
    assert not graph.unhandled
    assert group_with(graph, "q.weight", 0).num_prunable == 0
    assert group_with(graph, "k.weight", 0).num_prunable == 0
    values = group_with(graph, "v.weight", 0)
    assert values.num_prunable == 8 and ("out.weight", 1) in members(values)
    assert pruned.v.out_features == pruned.out.in_features < 8


class Heads(nn.Module):
    """Values split into heads of a fixed size, as in Hugging Face attention code."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.v = nn.Linear(6, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        heads = self.v(x).view(b, t, -1, 4).transpose(1, 2)  # [b, heads, t, 4]
        return self.out(heads.transpose(1, 2).reshape(b, t, -1))


def test_one_fixed_size_head_is_pinned_and_several_become_one_channel_each() -> None:
    graph = build_graph(randomize_(Heads(4)), torch.randn(2, 5, 6))
    group = group_with(graph, "v.weight", 0)
    assert group.num_prunable == 0  # one head of 4: removing it would leave nothing
    graph, _, pruned = prune_exactly(randomize_(Heads(12)), torch.randn(2, 5, 6))
    group = group_with(graph, "v.weight", 0)
    assert group.size == 3 and channel_of(group, "v.weight", 0) == [0] * 4 + [1] * 4 + [2] * 4
    assert pruned.v.out_features % 4 == 0 and pruned.v.out_features < 12


class MultiHead(nn.Module):
    """Multi-head attention as Hugging Face writes it: heads of a fixed size with ``-1`` for
    their count, grouped key/value heads repeated for the queries, scores by matmul or sdpa,
    a rotary-style elementwise product with an unlabelled table."""

    def __init__(self, how: str, heads: int = 4, kv_heads: int = 2, dim: int = 4) -> None:
        super().__init__()
        self.how, self.dim, self.rep = how, dim, heads // kv_heads
        self.q = nn.Linear(8, heads * dim)
        self.k = nn.Linear(8, kv_heads * dim)
        self.v = nn.Linear(8, kv_heads * dim)
        self.o = nn.Linear(heads * dim, 8)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        split = (b, t, -1, self.dim)
        q = self.q(x).view(split).transpose(1, 2)
        k = self.k(x).view(split).transpose(1, 2)
        v = self.v(x).view(split).transpose(1, 2)
        angle = torch.arange(t * self.dim, dtype=x.dtype).reshape(t, self.dim)
        q, k = q * angle.cos() + q.flip(-1) * angle.sin(), k * angle.cos()
        if self.how == "sdpa-gqa":
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            k = (
                k[:, :, None]
                .expand(b, k.shape[1], self.rep, t, self.dim)
                .reshape(b, -1, t, self.dim)
            )
            v = (
                v[:, :, None]
                .expand(b, v.shape[1], self.rep, t, self.dim)
                .reshape(b, -1, t, self.dim)
            )
            if self.how == "matmul":
                y = torch.softmax(q @ k.transpose(2, 3) / 2, dim=-1) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("how", ["matmul", "sdpa", "sdpa-gqa"])
def test_whole_heads_go_with_their_key_value_head_and_the_output_columns(how: str) -> None:
    model = randomize_(MultiHead(how))
    graph, _, pruned = prune_exactly(model, torch.randn(2, 5, 8))
    group = group_with(graph, "k.weight", 0)
    assert group.size == 2 and group.num_prunable == 2  # two key/value heads
    assert {("q.weight", 0), ("v.weight", 0), ("o.weight", 1)} <= members(group)
    # key/value head j carries query heads 2j and 2j + 1
    assert channel_of(group, "q.weight", 0) == [0] * 8 + [1] * 8
    assert pruned.q.out_features == 2 * pruned.k.out_features == pruned.o.in_features
    assert pruned.k.out_features == 4  # one of the two key/value heads went


def test_flattening_positions_into_tokens_keeps_channels() -> None:
    class ToTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.conv(x)).permute(0, 2, 3, 1)
            return self.fc(h.reshape(h.shape[0], -1, h.shape[-1]))

    graph, _, pruned = prune_exactly(randomize_(ToTokens()), IMG)
    assert group_with(graph, "conv.weight", 0).num_prunable == 8
    assert pruned.fc.in_features < 8


# --------------------------------------------------------------------------- computed tensors


class ComputedBias(nn.Module):
    """Swin v2's attention: the bias handed to ``F.linear`` is computed from the parameter."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc1 = nn.Linear(6, 9)
        self.fc2 = nn.Linear(9, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.how == "clone":
            bias = self.fc1.bias.clone()
            bias.mul_(0.5)
        elif self.how == "sliced":  # zeroes positions 3..5, whichever channels those are
            bias = self.fc1.bias.clone()
            bias[3:6].zero_()
        else:
            bias = torch.zeros(9)
        return self.fc2(F.relu(F.linear(x, self.fc1.weight, bias)))


def test_a_computed_bias_follows_its_parameter_and_a_constant_one_pins() -> None:
    x = torch.randn(4, 6)
    graph, plan, _ = prune_exactly(randomize_(ComputedBias("clone")), x)
    group = group_with(graph, "fc1.weight", 0)
    assert group.num_prunable == 9 and ("fc1.bias", 0) in members(group)
    assert plan.removed["fc1.bias"][0] == plan.removed["fc1.weight"][0]

    for how, why in [("sliced", "picks channels by position"), ("constant", "linear bias")]:
        graph = build_graph(randomize_(ComputedBias(how)), x)
        group = group_with(graph, "fc1.weight", 0)
        assert group.num_prunable == 0, how
        assert any(why in reason for reason in group.pinned_because), group.pinned_because


def test_a_weight_computed_in_forward_pins_what_it_reads() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 1)
            self.conv2 = nn.Conv2d(8, 4, 1)
            self.gain = nn.Parameter(torch.ones(4, 1, 1, 1))

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.conv1(x))
            return F.conv2d(h, self.conv2.weight * self.gain, self.conv2.bias)

    graph = build_graph(randomize_(Scaled()), IMG)
    assert graph.prunable_groups == []
    assert group_with(graph, "conv1.weight", 0).num_prunable == 0


# --------------------------------------------------------------------------- tracing


class Odd(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.logcumsumexp(x, dim=2)


class WithOdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.odd = Odd()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(F.relu(self.conv2(self.odd(self.conv1(x)))))


def test_an_op_without_a_rule_is_reported_and_its_channels_pinned() -> None:
    model = randomize_(WithOdd())
    graph, _, pruned = prune_exactly(model, IMG)
    assert [(u.op, u.module) for u in graph.unhandled] == [("logcumsumexp", "odd")]
    before = group_with(graph, "conv1.weight", 0)
    assert before.num_prunable == 0
    assert any("logcumsumexp has no channel rule (in odd)" in why for why in before.pinned_because)
    assert group_with(graph, "conv2.weight", 0).num_prunable == 8
    assert pruned.conv1.out_channels == 8 and pruned.conv2.out_channels < 8
    with pytest.raises(ModelError, match="logcumsumexp in odd"):
        build_graph(model, IMG, strict=True)


def test_tracing_works_under_no_grad_and_in_eval_mode_and_keeps_training_flags() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.ReLU(), nn.Conv2d(8, 2, 1)
    )
    model.train()
    model[2].eval()
    flags = [m.training for m in model.modules()]
    running = model[1].running_mean.clone()
    with torch.no_grad():
        graph_no_grad = build_graph(model, IMG)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[1].running_mean, running)  # traced in eval mode: no stat update
    model.eval()
    graph_eval = build_graph(model, IMG)
    assert not any(m.training for m in model.modules())
    assert (
        [g.size for g in graph_no_grad.prunable_groups]
        == [g.size for g in graph_eval.prunable_groups]
        == [8]
    )


def test_parametrized_weights_are_refused() -> None:
    class Double(nn.Module):
        def forward(self, w: Tensor) -> Tensor:
            return 2 * w

    model = ConvBNReLUConv()
    parametrize.register_parametrization(model.conv1, "weight", Double())
    with pytest.raises(ModelError, match="parametrizations"):
        build_graph(model, IMG)


# --------------------------------------------------------------------------- plans


def test_plan_json_round_trip_and_replay_on_a_fresh_model() -> None:
    torch.manual_seed(0)
    model = randomize_(GroupedNet(), seed=1)
    graph = build_graph(model, IMG)
    plan = plan_from_removed(graph, some_removed(graph, seed=2))
    text = plan.to_json()
    again = ChannelPlan.from_json(text)
    assert again == plan and again.to_json() == text
    with pytest.raises(ConfigError):
        ChannelPlan.from_json('{"version": 99, "removed": {}}')
    with pytest.raises(ConfigError):
        ChannelPlan.from_json("not json")

    pruned = apply_plan_(model, plan)
    fresh = apply_plan_(GroupedNet(), again)  # a new model of the same class, other weights
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    fresh.eval()
    assert torch.equal(outputs(fresh, IMG), outputs(pruned, IMG))
    assert fresh.grouped.groups == pruned.grouped.groups


def test_plans_refuse_pinned_channels_and_emptying_a_group() -> None:
    model = randomize_(ConvBNReLUConv())
    graph = build_graph(model, IMG)
    out = group_with(graph, "conv2.weight", 0)
    with pytest.raises(ConfigError, match="pinned"):
        plan_from_removed(graph, only(out, 0))
    group = graph.prunable_groups[0]
    with pytest.raises(ConfigError, match="at least one channel"):
        plan_from_removed(graph, {group.index: torch.ones(group.size, dtype=torch.bool)})


# --------------------------------------------------------------------------- property


class RandomNet(nn.Module):
    """A stem, then blocks of four kinds, then pooling and a classifier."""

    def __init__(self, kinds: list[str], widths: list[int]) -> None:
        super().__init__()
        self.kinds = kinds
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        c = widths[0]
        for kind, w in zip(kinds, widths[1:], strict=True):
            if kind == "plain":
                block: nn.Module = nn.Sequential(
                    nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()
                )
                c = w
            elif kind == "residual":
                block = nn.Sequential(
                    nn.Conv2d(c, w, 1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, c, 3, padding=1)
                )
            elif kind == "cat":
                block = nn.ModuleList([nn.Conv2d(c, w, 1), nn.Conv2d(c, c, 3, padding=1, groups=c)])
                c = c + w
            else:  # grouped: two groups, even widths
                block = nn.Sequential(
                    nn.Conv2d(c, 2 * w, 1),
                    nn.ReLU(),
                    nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2),
                )
                c = 2 * w
            self.blocks.append(block)
        self.fc = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        for kind, block in zip(self.kinds, self.blocks, strict=True):
            if kind == "residual":
                h = h + block(h)
            elif kind == "cat":
                assert isinstance(block, nn.ModuleList)
                h = torch.cat([F.relu(block[0](h)), block[1](h)], dim=1)
            else:
                h = block(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@settings(max_examples=20, deadline=None)
@given(
    kinds=st.lists(
        st.sampled_from(["plain", "residual", "cat", "grouped"]), min_size=1, max_size=4
    ),
    widths=st.lists(st.integers(2, 6), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
    fraction=st.sampled_from([0.2, 0.5, 0.9]),
)
def test_random_architectures_prune_exactly(
    kinds: list[str], widths: list[int], seed: int, fraction: float
) -> None:
    model = randomize_(RandomNet(kinds, widths[: len(kinds) + 1]), seed=seed)
    x = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    graph = build_graph(model, x)
    assert not graph.unhandled
    removed = some_removed(graph, seed, fraction)
    prune_exactly(model, x, removed)
    # every group whose channels all feed only convolutions and the classifier is prunable
    assert graph.prunable_groups


def test_budget_arithmetic_counts_members_whose_channels_cover_unequal_positions() -> None:
    """A member whose channels own different numbers of positions (channel 0 two positions,
    channel 2 three, one position in no channel) takes the uneven path of the MACs count."""
    from secateurs.graph.groups import Member
    from secateurs.graph.state import TensorRef, WeightUse

    a, b = TensorRef("a", "weight"), TensorRef("b", "weight")
    wide = ChannelGroup(
        0,
        [Member(a, 0, torch.tensor([0, 1, 2])), Member(b, 1, torch.tensor([0, 0, 1, -1, 2, 2, 2]))],
        3,
        torch.ones(3, dtype=torch.bool),
    )
    rows = ChannelGroup(1, [Member(b, 0, torch.tensor([0, 1]))], 2, torch.ones(2, dtype=torch.bool))
    graph = ChannelGraph(
        [wide, rows], [WeightUse(a, 5), WeightUse(b, 7)], {a: (3, 4), b: (2, 7)}, []
    )
    assert graph.macs() == 3 * 4 * 5 + 2 * 7 * 7
    cut = {0: torch.tensor([True, False, True]), 1: torch.tensor([False, True])}
    # channels 0 and 2 take 2 + 3 of b's 7 input positions; the -1 position stays
    assert graph.shapes_after(cut) == {a: (1, 4), b: (1, 2)}
    assert graph.macs(cut) == 1 * 4 * 5 + 1 * 2 * 7
    assert graph.macs({0: torch.tensor([True, False, False])}) == 2 * 4 * 5 + 2 * 5 * 7
