"""Channel criteria: scores that only whole channels have, for structural pruning.

Each criterion here is a :class:`~secateurs.criteria.channel.ChannelCriterion`: it scores the
channels of every prunable group of a traced model (:func:`secateurs.graph.build_graph`)
directly, one float32 per channel, higher = more important, and is used through
:func:`secateurs.shrink`:

* ``bn_scale``: the normalisation layers' scaling factors (Network Slimming);
* ``apoz`` and ``mean_activation``: statistics of the channels' activations on calibration
  data, measured where the channels are consumed;
* ``fpgm``: how replaceable a filter is by the others (distance to the geometric median);
* ``regression``: how well the next layers' outputs can be reconstructed without a channel
  (ThiNet's greedy selection or LASSO), with a least-squares refit of those layers' weights;
* ``channel_obs``: the output error a channel's removal leaves once its readers have
  compensated (Optimal Brain Surgeon over whole channels, greedy).

Activations are measured in eval mode under ``torch.no_grad()`` with hooks that are removed
even on error, so the model's state and modes are as before. The calibration inputs (the
first ``calibration_batches`` batches of ``data``) are read once per context and reused, so scoring
and refitting see the same samples even from a shuffling loader or a one-shot iterator.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from secateurs.criteria.base import CRITERIA
from secateurs.criteria.channel import (
    ChannelContext,
    ChannelCriterion,
    per_channel,
    reduce_to_dim,
)
from secateurs.criteria.hessian import _prepare
from secateurs.criteria.layerwise import check_dampening
from secateurs.errors import ConfigError, DataError
from secateurs.graph.groups import ChannelGroup, Member
from secateurs.graph.state import TensorRef
from secateurs.running import EvalMode, split_batch

#: Modules whose ``weight`` is a per-channel scale (Network Slimming's gamma).
NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm* (affine), SyncBatchNorm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)

#: Why an activation criterion scores a group by L2 magnitude.
_UNMEASURED = "no activation of these channels to measure (no layer reads or produces them)"

#: Key of the cached calibration inputs in :attr:`ChannelContext.cache`.
INPUTS_KEY = "structural.calibration_inputs"
#: Output dimensions of a consumer are sketched down to this many random directions.
SKETCH = 256
#: Ridge that keeps the (often singular) reconstruction problems well posed, relative to the
#: mean diagonal of the Gram matrix.
RIDGE = 1e-6
#: LASSO path: number of lambda values, from lambda_max down to LASSO_RANGE * lambda_max.
LASSO_STEPS = 30
LASSO_RANGE = 1e-4
LASSO_ITERS = 300


# --------------------------------------------------------------------------- shared pieces


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64)


def group_l2(ctx: ChannelContext, group: ChannelGroup) -> Tensor:
    """The L2 norm of each channel over every parameter of the group (the fallback score)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        if m.ref.is_parameter:
            squares = reduce_to_dim(_cpu(ctx.tensor(m.ref)).square(), m.dim)
            total += per_channel(m, squares, group.size).to(torch.float64)
    return total.sqrt().to(torch.float32)


def fallback(ctx: ChannelContext, group: ChannelGroup, who: str, why: str) -> Tensor:
    """Score a group ``who`` cannot measure (``why``) by its L2 magnitude, and record it in
    ``ctx.fallbacks``; with ``ctx.strict`` that is an error instead."""
    if ctx.strict:
        raise ConfigError(
            f"criterion {who!r} cannot score channel group {group.name!r}: {why}. "
            "strict=True refuses the L2-magnitude fallback; exclude the layer or use another "
            "criterion"
        )
    ctx.fallbacks.append(f"{group.name}: {who} found {why}; scored by L2 magnitude")
    return group_l2(ctx, group)


def _conv_reads_input(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1
    )


def is_consumer(module: nn.Module, member: Member, unfoldable: bool = False) -> bool:
    """``member`` is the input dim of a convolution with ``groups == 1`` or a linear layer.

    With ``unfoldable``, only 1-D and 2-D convolutions (those im2col handles) count.
    """
    return reads_input(module, member.ref, member.dim, unfoldable)


def reads_input(module: nn.Module, ref: TensorRef, dim: int, unfoldable: bool = False) -> bool:
    """Dim ``dim`` of ``ref`` is the input dim of ``module``, a conv with ``groups == 1`` or a
    linear layer (with ``unfoldable``, only 1-D and 2-D convolutions, as im2col handles)."""
    if dim != 1 or ref.name != "weight" or not ref.is_parameter:
        return False
    if isinstance(module, nn.Linear):
        return True
    if _conv_reads_input(module):
        assert isinstance(module, nn.modules.conv._ConvNd)
        return not unfoldable or len(module.kernel_size) <= 2
    return False


def is_producer(ctx: ChannelContext, member: Member) -> bool:
    """``member`` indexes the output channels (filters) of a weight with at least two dims."""
    if member.ref.name != "weight" or not member.ref.is_parameter:
        return False
    module = ctx.model.get_submodule(member.ref.module)
    out_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) and module.transposed else 0
    return member.dim == out_dim and ctx.tensor(member.ref).dim() >= 2


def _input_channel_dim(module: nn.Module, x: Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return x.dim() - len(module.kernel_size) - 1
    return x.dim() - 1


def _output_channel_dim(module: nn.Module, y: Tensor) -> int:
    if isinstance(module, (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding)):
        return y.dim() - 1
    if isinstance(module, nn.modules.conv._ConvNd):
        return y.dim() - len(module.kernel_size) - 1
    return 1 if y.dim() >= 2 else 0


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], Tensor):
        return obj[0]
    return None


def positions_by_channel(channel: Tensor, size: int, pad: int) -> Tensor:
    """``[size, k]``: the positions of each channel (``channel[i]`` is position ``i``'s), each
    row padded with ``pad`` to the longest."""
    inside = (channel >= 0).nonzero().flatten()
    ch = channel[inside]
    order = torch.argsort(ch, stable=True)
    ch, inside = ch[order], inside[order]
    counts = torch.bincount(ch, minlength=size)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(ch)) - starts[ch]
    out = torch.full((size, max(int(counts.max()) if len(counts) else 0, 1)), pad)
    out[ch, slot] = inside
    return out


@dataclass
class _Site:
    """A module whose input (or output) is measured, and which group channels it carries."""

    module: nn.Module
    uses: list[tuple[ChannelGroup, Member]] = field(default_factory=list)


def consumer_sites(ctx: ChannelContext, unfoldable: bool = False) -> dict[str, _Site]:
    """Modules that read the channels of prunable groups, by module name (shared modules once)."""
    sites: dict[int, tuple[str, _Site]] = {}
    for g in ctx.graph.prunable_groups:
        for m in g.members:
            module = ctx.model.get_submodule(m.ref.module)
            if is_consumer(module, m, unfoldable):
                sites.setdefault(id(module), (m.ref.module, _Site(module)))[1].uses.append((g, m))
    return dict(sites.values())


def calibration_inputs(ctx: ChannelContext, who: str) -> list[Any]:
    """The inputs of the first ``ctx.calibration_batches`` calibration batches, read once per context."""
    cached = ctx.cache.get(INPUTS_KEY)
    if cached is None:
        if ctx.calibration_batches < 1:
            raise ConfigError(f"calibration batches must be >= 1; got {ctx.calibration_batches}")
        batches = itertools.islice(ctx.batches(who), ctx.calibration_batches)
        cached = [split_batch(batch)[0] for batch in batches]
        if not cached:
            raise DataError("calibration data is empty: the loader yielded no batch")
        ctx.cache[INPUTS_KEY] = cached
    assert isinstance(cached, list)
    return cached


Hook = tuple[nn.Module, str, Callable[..., Any]]


@contextmanager
def hooked(model: nn.Module, hooks: list[Hook]) -> Iterator[None]:
    """Run with ``hooks`` (``(module, "pre" | "post", fn)``) in eval mode under no_grad; the
    hooks are removed and every module's mode restored afterwards, even on error."""
    handles: list[RemovableHandle] = []
    try:
        for module, kind, fn in hooks:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            else:
                handles.append(module.register_forward_hook(fn))
        with EvalMode(model), torch.no_grad():
            yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- activations


@dataclass
class _Moments:
    """Per position of a channel dim: zeros, sum of |x| and how many values were seen."""

    zeros: Tensor | None = None
    abs_sum: Tensor | None = None
    count: int = 0

    def add(self, x: Tensor, dim: int, positions: int) -> None:
        if not -x.dim() <= dim < x.dim() or x.shape[dim] != positions:
            return
        v = x.detach().movedim(dim, 0).reshape(positions, -1)
        zeros = (v == 0).sum(dim=1).to("cpu", torch.float64)
        abs_sum = v.abs().sum(dim=1, dtype=torch.float64).cpu()
        if self.zeros is None or self.abs_sum is None:
            self.zeros, self.abs_sum = zeros, abs_sum
        else:
            self.zeros += zeros
            self.abs_sum += abs_sum
        self.count += v.shape[1]


def _output_member(module: nn.Module, member: Member) -> bool:
    """``member`` indexes the output channels of ``module``'s weight (a filter, a norm scale)."""
    if member.ref.name != "weight" or not member.ref.is_parameter:
        return False
    transposed = isinstance(module, nn.modules.conv._ConvNd) and module.transposed
    return member.dim == (1 if transposed else 0)


def _pool(sites: list[tuple[_Site, _Moments]], g: ChannelGroup) -> tuple[Tensor, Tensor] | None:
    """The group's per-channel (fraction of zeros, mean |x|) over ``sites``; None if unseen."""
    zeros = torch.zeros(g.size, dtype=torch.float64)
    abs_sum = torch.zeros(g.size, dtype=torch.float64)
    count = torch.zeros(g.size, dtype=torch.float64)
    for site, mom in sites:
        if mom.zeros is None or mom.abs_sum is None:
            continue
        for group, m in site.uses:
            if group.index == g.index:
                zeros += per_channel(m, mom.zeros, g.size).to(torch.float64)
                abs_sum += per_channel(m, mom.abs_sum, g.size).to(torch.float64)
                seen = torch.full((len(m.channel),), float(mom.count), dtype=torch.float64)
                count += per_channel(m, seen, g.size).to(torch.float64)
    if not bool((count > 0).any()):
        return None
    count = count.clamp(min=1.0)
    return (zeros / count).to(torch.float32), (abs_sum / count).to(torch.float32)


def activation_stats(ctx: ChannelContext, who: str) -> dict[int, tuple[Tensor, Tensor]]:
    """``{group: (fraction of zeros, mean |activation|)}`` per channel, on calibration data.

    Measured at the inputs of the layers that consume the channels (convolutions with
    ``groups == 1`` and linear layers; a flattened channel's ``h * w`` positions are pooled);
    a group no such layer reads (or whose readers never ran) is measured at the outputs of the
    modules producing it (its filters' and norm scales' owners). Groups measured nowhere are
    absent from the result.
    """
    inputs = calibration_inputs(ctx, who)
    consumers = consumer_sites(ctx)
    producers: dict[int, _Site] = {}
    for g in ctx.graph.prunable_groups:
        for m in g.members:
            module = ctx.model.get_submodule(m.ref.module)
            if _output_member(module, m):
                producers.setdefault(id(module), _Site(module)).uses.append((g, m))
    readers = [(site, _Moments()) for site in consumers.values()]
    makers = [(site, _Moments()) for site in producers.values()]

    def pre(mom: _Moments, positions: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = _first_tensor(args)
            if x is not None:
                mom.add(x, _input_channel_dim(module, x), positions)

        return hook

    def post(mom: _Moments, positions: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            y = _first_tensor(output)
            if y is not None:
                mom.add(y, _output_channel_dim(module, y), positions)

        return hook

    hooks: list[Hook] = [
        (site.module, "pre", pre(mom, len(site.uses[0][1].channel))) for site, mom in readers
    ]
    hooks += [
        (site.module, "post", post(mom, len(site.uses[0][1].channel))) for site, mom in makers
    ]
    with hooked(ctx.model, hooks):
        for x in inputs:
            ctx.model(x)
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for g in ctx.graph.prunable_groups:
        found = _pool(readers, g) or _pool(makers, g)
        if found is not None:
            out[g.index] = found
    return out


@CRITERIA.register("bn_scale")
@dataclass
class BNScale(ChannelCriterion):
    """``|gamma|``: the normalisation scale of each channel (Network Slimming, Liu et al. 2017).

    A channel whose BatchNorm (or GroupNorm, InstanceNorm, LayerNorm, RMSNorm) scaling factor
    is near zero is silenced by it, so it can go; training with the ``bn_l1`` regularizer
    pushes unneeded scales there. When a group's channels pass through several norms (a
    residual stage), their ``|gamma|`` are summed. A group without any norm scale falls back
    to the L2 norm of its channels over all the group's parameters (group magnitude).
    """

    def channel_scores(self, ctx: ChannelContext) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        for g in ctx.graph.prunable_groups:
            total = torch.zeros(g.size, dtype=torch.float64)
            found = False
            for m in g.members:
                if m.ref.name != "weight" or not m.ref.is_parameter:
                    continue
                if not isinstance(ctx.model.get_submodule(m.ref.module), NORMS):
                    continue
                scale = reduce_to_dim(_cpu(ctx.tensor(m.ref)).abs(), m.dim)
                total += per_channel(m, scale, g.size).to(torch.float64)
                found = True
            out[g.index] = (
                total.to(torch.float32)
                if found
                else fallback(ctx, g, "bn_scale", "no normalisation scale")
            )
        return out


@CRITERIA.register("apoz")
@dataclass
class APoZ(ChannelCriterion):
    """``1 - APoZ``: one minus the Average Percentage of Zeros of each channel's activation
    over the calibration batches (Network Trimming, Hu et al. 2016).

    A channel that a ReLU silences on most inputs carries little information. Activations are
    measured where the channels are consumed: at the inputs of the convolutions (``groups ==
    1``) and linear layers that read them, a flattened channel's positions pooled; a group no
    such layer reads is measured at its producing layers' outputs, and a group measured
    nowhere falls back to its L2 magnitude. Needs ``data``.
    """

    needs_data: ClassVar[bool] = True

    def channel_scores(self, ctx: ChannelContext) -> dict[int, Tensor]:
        stats = activation_stats(ctx, "apoz")
        return {
            g.index: (1.0 - stats[g.index][0])
            if g.index in stats
            else fallback(ctx, g, "apoz", _UNMEASURED)
            for g in ctx.graph.prunable_groups
        }


@CRITERIA.register("mean_activation")
@dataclass
class MeanActivation(ChannelCriterion):
    """Mean ``|activation|`` of each channel over the calibration batches: the activation
    baseline of Molchanov et al. 2017 (Pruning Convolutional Neural Networks for Resource
    Efficient Inference).

    Measured at the same place as ``apoz`` (the consuming layers' inputs, else the producing
    layers' outputs, else L2 magnitude). Needs ``data``.
    """

    needs_data: ClassVar[bool] = True

    def channel_scores(self, ctx: ChannelContext) -> dict[int, Tensor]:
        stats = activation_stats(ctx, "mean_activation")
        return {
            g.index: stats[g.index][1]
            if g.index in stats
            else fallback(ctx, g, "mean_activation", _UNMEASURED)
            for g in ctx.graph.prunable_groups
        }


# --------------------------------------------------------------------------- filter geometry


def channel_vectors(member: Member, t: Tensor, size: int) -> Tensor:
    """``[size, D]``: each channel's slices of ``t`` along ``member.dim``, flattened (a channel
    spanning several positions gets them concatenated, zero-padded to the longest)."""
    rows = t.movedim(member.dim, 0).reshape(t.shape[member.dim], -1)
    rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return rows[positions_by_channel(member.channel, size, len(member.channel))].reshape(size, -1)


@CRITERIA.register("fpgm")
@dataclass
class FPGM(ChannelCriterion):
    """Filter Pruning via Geometric Median (He et al. 2019).

    A filter close to the geometric median of its layer's filters can be represented by the
    others, so it is redundant however large its norm. Each channel's score is the sum of
    Euclidean distances from its flattened filter to the other channels' filters, summed over
    the group's producing weights (dim 0 of each weight with >= 2 dims; dim 1 of a transposed
    convolution): low = near the median. A group without such a weight uses all its
    parameters' slices instead. Data-free.
    """

    def channel_scores(self, ctx: ChannelContext) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        for g in ctx.graph.prunable_groups:
            members = [m for m in g.members if is_producer(ctx, m)]
            if not members:
                members = [m for m in g.members if m.ref.is_parameter]
            total = torch.zeros(g.size, dtype=torch.float64)
            for m in members:
                vectors = channel_vectors(m, _cpu(ctx.tensor(m.ref)), g.size)
                total += torch.cdist(vectors, vectors).sum(dim=1)
            out[g.index] = total.to(torch.float32)
        return out


# --------------------------------------------------------------------------- regression


def im2col(module: nn.Module, x: Tensor) -> Tensor:
    """``[rows, P]``: the input positions each output position of ``module`` reads, in the
    order of ``module.weight.reshape(out, -1)`` (a linear layer's rows are its inputs)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    v = _Conv2dView.of(module, x)
    cols = F.unfold(v.x, v.kernel, dilation=v.dilation, stride=v.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class _Conv2dView:
    """A 1-D or 2-D convolution's input, batched and padded as the module pads it, seen as a
    2-D convolution's: the input, and the kernel, dilation and stride as 2-D tuples."""

    x: Tensor
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    stride: tuple[int, int]

    @classmethod
    def of(cls, module: nn.Module, x: Tensor) -> _Conv2dView:
        assert isinstance(module, nn.modules.conv._ConvNd)
        spatial = len(module.kernel_size)
        if x.dim() == spatial + 1:
            x = x.unsqueeze(0)
        pad = list(module._reversed_padding_repeated_twice)
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if spatial == 1:
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, kernel[0]), (1, dilation[0]), (1, stride[0])

        def pair(t: tuple[int, ...]) -> tuple[int, int]:
            return int(t[0]), int(t[1])

        return cls(x, pair(kernel), pair(dilation), pair(stride))

    @property
    def out_size(self) -> tuple[int, int]:
        """Output height and width."""
        h, w = (
            (self.x.shape[2 + i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i]
            + 1
            for i in range(2)
        )
        return h, w


def im2col_count(module: nn.Module, x: Tensor) -> int:
    """How many rows ``im2col(module, x)`` has, without computing them."""
    if isinstance(module, nn.Linear):
        return x.numel() // x.shape[-1]
    v = _Conv2dView.of(module, x)
    height, width = v.out_size
    return v.x.shape[0] * height * width


def im2col_rows(module: nn.Module, x: Tensor, rows: Tensor | None) -> Tensor:
    """Rows ``rows`` (sorted indices; ``None``: all) of ``im2col(module, x)``, gathered
    directly: unfolding a whole batch to keep a few hundred of its rows costs far more."""
    if rows is None:
        return im2col(module, x)
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])[rows.to(x.device)]
    v = _Conv2dView.of(module, x)
    height, width = v.out_size
    r = rows.to(x.device)
    n, pos = r // (height * width), r % (height * width)
    oy, ox = pos // width, pos % width
    ky = torch.arange(v.kernel[0], device=x.device) * v.dilation[0]
    kx = torch.arange(v.kernel[1], device=x.device) * v.dilation[1]
    ys = (oy * v.stride[0])[:, None] + ky[None, :]  # [R, kh]
    xs = (ox * v.stride[1])[:, None] + kx[None, :]  # [R, kw]
    c = torch.arange(v.x.shape[1], device=x.device)
    patches = v.x[n[:, None, None, None], c[None, :, None, None], ys[:, None, :, None],
                  xs[:, None, None, :]]  # fmt: skip
    return patches.reshape(len(r), -1)


def unfolded_channels(module: nn.Module, member: Member) -> Tensor:
    """``member.channel`` repeated for each kernel position of a convolution."""
    w = module.weight
    assert isinstance(w, Tensor)
    per_input = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return member.channel.repeat_interleave(per_input)


def _seed(*parts: int | str) -> int:
    return zlib.crc32(repr(parts).encode())


@dataclass
class _Sampler:
    """Draws the same rows of a module's unfolded input in every pass over the same inputs."""

    name: str
    per_batch: int
    seed: int
    batch: int = 0
    calls: int = 0

    def pick(self, n: int) -> Tensor | None:
        """Sorted indices of the rows to keep out of ``n`` (``None``: all of them)."""
        g = torch.Generator().manual_seed(_seed(self.seed, self.name, self.batch, self.calls))
        self.calls += 1
        if n <= self.per_batch:
            return None
        return torch.randperm(n, generator=g)[: self.per_batch].sort().values

    def take(self, module: nn.Module, x: Tensor) -> Tensor:
        """The drawn rows of ``im2col(module, x)``, gathered without unfolding the rest."""
        return im2col_rows(module, x.detach(), self.pick(im2col_count(module, x)))


def _run(
    ctx: ChannelContext, inputs: list[Any], samplers: list[_Sampler], hooks: list[Hook]
) -> None:
    with hooked(ctx.model, hooks):
        for i, x in enumerate(inputs):
            for s in samplers:
                s.batch, s.calls = i, 0
            with suppress(_Enough):
                ctx.model(x)


class _Enough(Exception):
    """Raised by a hook that has read what it needs: the rest of the forward pass is skipped."""


@dataclass
class _GramUse:
    """One group read by one consumer: accumulates the Gram matrix of channel contributions."""

    group: ChannelGroup
    index: Tensor  #: [size, k] unfolded positions of each channel (P = a zero column)
    gram: Tensor  #: [size, size] float64


def contribution_grams(ctx: ChannelContext, samples: int, who: str) -> dict[int, Tensor]:
    """``{group: G}`` with ``G[c, d] = <Z_c, Z_d>`` summed over the group's consumers, where
    ``Z_c`` is channel ``c``'s contribution to a consumer's output on sampled positions of the
    calibration data (output dims sketched to :data:`SKETCH` random directions when wider).
    Groups no unfoldable consumer reads are absent."""
    inputs = calibration_inputs(ctx, who)
    sites = consumer_sites(ctx, unfoldable=True)
    per_batch = max(1, math.ceil(samples / len(inputs)))
    uses: dict[str, list[_GramUse]] = {}
    projected: dict[str, Tensor] = {}
    samplers: list[_Sampler] = []
    hooks: list[Hook] = []
    for name, site in sites.items():
        wmat = _sketched_weight(ctx, name, site.module)
        p = wmat.shape[1]
        projected[name] = torch.cat([wmat.T, wmat.new_zeros(1, wmat.shape[0])])  # [P + 1, O]
        uses[name] = [
            _GramUse(
                g,
                positions_by_channel(unfolded_channels(site.module, m), g.size, p),
                torch.zeros(g.size, g.size, dtype=torch.float64),
            )
            for g, m in site.uses
        ]
        sampler = _Sampler(name, per_batch, ctx.seed)
        samplers.append(sampler)
        hooks.append((site.module, "pre", _gram_hook(sampler, projected[name], uses[name])))
    _run(ctx, inputs, samplers, hooks)
    out: dict[int, Tensor] = {}
    for name in sites:
        for use in uses[name]:
            if use.group.index in out:
                out[use.group.index] += use.gram
            else:
                out[use.group.index] = use.gram
    return out


def _sketched_weight(ctx: ChannelContext, name: str, module: nn.Module) -> Tensor:
    """``module``'s weight as a float64 ``[out, in * kernel]`` matrix, its output dimensions
    sketched to :data:`SKETCH` random directions when wider (``E[R R'] = I``, so output
    energies are kept in expectation)."""
    w = module.weight
    assert isinstance(w, Tensor)
    wmat = w.detach().reshape(w.shape[0], -1).to(torch.float64)
    if wmat.shape[0] > SKETCH:
        gen = torch.Generator().manual_seed(_seed(ctx.seed, name, "sketch"))
        r = torch.randn(wmat.shape[0], SKETCH, generator=gen, dtype=torch.float64)
        wmat = (r.to(wmat.device).T @ wmat) / math.sqrt(SKETCH)
    return wmat


def _gram_hook(sampler: _Sampler, v: Tensor, uses: list[_GramUse]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = _first_tensor(args)
        if x is None:
            return
        rows = sampler.take(module, x)
        if rows.shape[1] + 1 != v.shape[0]:
            return
        rows = rows.to(v)
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], 1)], dim=1)
        for use in uses:
            idx = use.index.to(rows.device)
            vg = v[idx]  # [C, k, O]
            for start in range(0, rows.shape[0], 32):
                xg = rows[start : start + 32][:, idx]  # [s, C, k]
                z = torch.einsum("sck,cko->cso", xg, vg).reshape(idx.shape[0], -1)
                use.gram += (z @ z.T).cpu()

    return hook


def _strictly_increasing(values: Tensor) -> Tensor:
    """float32 copy of the non-decreasing ``values`` nudged up so that no two are equal."""
    out = values.to(torch.float32).clone()
    for i in range(1, len(out)):
        if out[i] <= out[i - 1]:
            out[i] = torch.nextafter(out[i - 1], torch.tensor(math.inf))
    return out


def _normalised(gram: Tensor) -> tuple[Tensor, Tensor, float] | None:
    """``(G / s + ridge I, G 1 / s, 1' G 1 / s)`` with ``s`` the mean diagonal, or None when
    the group's channels contribute nothing."""
    scale = float(gram.diagonal().mean())
    total = float(gram.sum())
    if not scale > 0 or not total > 0:
        return None
    g = gram / scale
    b = g.sum(dim=1)
    return g + RIDGE * torch.eye(len(g), dtype=g.dtype), b, total / scale


def _scores_from_order(order: list[int], values: Tensor, size: int) -> Tensor:
    """Scores that sort like ``order`` (first = lowest), from its non-decreasing ``values``;
    channels not in the order (pinned) score above all."""
    out = torch.zeros(size, dtype=torch.float32)
    ranked = _strictly_increasing(values.clamp(min=0.0))
    if order:
        out[torch.tensor(order)] = ranked
    rest = torch.ones(size, dtype=torch.bool)
    rest[torch.tensor(order, dtype=torch.long)] = False
    top = float(ranked.max()) if order else 0.0
    out[rest] = top + 1.0
    return out


def greedy_order(gram: Tensor, prunable: Tensor) -> Tensor | None:
    """ThiNet's greedy channel selection on the contributions' Gram matrix.

    Backward elimination: repeatedly remove the prunable channel whose removal least
    increases the reconstruction error of the consumers' outputs ``||Y - sum_kept beta_c
    Z_c||^2``, the kept channels rescaled by least squares (ThiNet's own rescaling step, so
    a channel whose contribution is a linear combination of the others costs nothing). The
    score of a channel is that error (relative to ``||Y||^2``, above the full model's) once it
    and every channel removed before it are gone: the removal order, ascending. None when the
    channels contribute nothing.
    """
    size = gram.shape[0]
    norm = _normalised(gram)
    if norm is None:
        return None
    a, b, total = norm
    h = torch.linalg.inv(a)
    active = torch.ones(size, dtype=torch.bool)
    order: list[int] = []
    values: list[float] = []
    error = 0.0
    for _ in range(int(prunable.sum())):
        beta = h @ b
        d = h.diagonal()
        cost = torch.where(
            active & prunable & (d > 0), beta.square() / d.clamp(min=1e-300), math.inf
        )
        c = int(torch.argmin(cost))
        error += max(float(cost[c]), 0.0)
        order.append(c)
        values.append(error / total)
        col = h[:, c].clone()
        h -= torch.outer(col, col) / col[c]
        h[c, :] = 0.0
        h[:, c] = 0.0
        active[c] = False
    return _scores_from_order(order, torch.tensor(values, dtype=torch.float64), size)


def _soft(x: Tensor, threshold: Tensor) -> Tensor:
    return x.sign() * (x.abs() - threshold).clamp(min=0.0)


def _fista(a: Tensor, b: Tensor, penalty: Tensor, lipschitz: float, start: Tensor) -> Tensor:
    """argmin ``beta' A beta - 2 b' beta + sum penalty_c |beta_c|`` by FISTA from ``start``."""
    x = start.clone()
    y = x.clone()
    t = 1.0
    for _ in range(LASSO_ITERS):
        grad = 2.0 * (a @ y - b)
        nxt = _soft(y - grad / lipschitz, penalty / lipschitz)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = nxt + ((t - 1.0) / t_next) * (nxt - x)
        change = float((nxt - x).abs().max())
        x, t = nxt, t_next
        if change <= 1e-10 * max(1.0, float(x.abs().max())):
            break
    return x


def lasso_order(gram: Tensor, prunable: Tensor) -> Tensor | None:
    """He et al. 2017's LASSO channel selection on the contributions' Gram matrix.

    Solves ``min ||Y - sum_c beta_c Z_c||^2 + lambda ||beta||_1`` (pinned channels are not
    penalised) along a geometric path of :data:`LASSO_STEPS` lambdas from ``lambda_max`` (all
    zero) down to ``LASSO_RANGE * lambda_max``, warm-started FISTA. A channel's score is the
    largest ``lambda / lambda_max`` at which its ``beta_c`` is non-zero: channels the
    reconstruction needs even under a strong sparsity penalty score high, those it can do
    without enter last (or never) and score low. Ties (same path step) are broken by
    ``|beta_c|`` at that step, then at the end of the path, then by ``||Z_c||``. None when
    the channels contribute nothing.
    """
    size = gram.shape[0]
    norm = _normalised(gram)
    if norm is None:
        return None
    a, b, _ = norm
    weights = prunable.to(torch.float64)
    lam_max = 2.0 * float((b.abs() * weights).max())
    if not lam_max > 0:
        lam_max = 1.0
    lipschitz = 2.0 * float(torch.linalg.eigvalsh(a).max())
    beta = torch.zeros(size, dtype=torch.float64)
    entry = torch.zeros(size, dtype=torch.float64)
    at_entry = torch.zeros(size, dtype=torch.float64)
    entered = torch.zeros(size, dtype=torch.bool)
    for k in range(LASSO_STEPS):
        lam = lam_max * LASSO_RANGE ** (k / (LASSO_STEPS - 1))
        beta = _fista(a, b, lam * weights, lipschitz, beta)
        new = (beta.abs() > 1e-12) & ~entered
        entry[new] = lam / lam_max
        at_entry[new] = beta[new].abs()
        entered |= new
    candidates = prunable.nonzero().flatten()
    order = candidates
    for key in (a.diagonal(), beta.abs(), at_entry, entry):  # least significant first
        order = order[torch.argsort(key[order], stable=True)]
    return _scores_from_order(order.tolist(), entry[order], size)


@CRITERIA.register("regression")
@dataclass
class Regression(ChannelCriterion):
    """Channel selection by reconstructing the next layers' outputs, then a least-squares
    refit of those layers' weights.

    For each group, ``Z_c`` is channel ``c``'s contribution to the outputs of the layers that
    read it (convolutions with ``groups == 1``, 1-D or 2-D, via im2col; linear layers) at up
    to ``samples`` randomly drawn positions of the calibration data. ``method="greedy"``:
    ThiNet (Luo et al. 2017), greedy removal of the channel that least increases the
    reconstruction error (see :func:`greedy_order`). ``method="lasso"``: He et al. 2017
    (Channel Pruning for Accelerating Very Deep Neural Networks), the order in which LASSO
    keeps channels along a lambda path (see :func:`lasso_order`). A group no such layer reads
    falls back to its L2 magnitude.

    :meth:`refit` then solves, for every consumer that loses input channels and in forward
    order, the least-squares problem that makes its output on the kept inputs (as the
    already pruned upstream layers produce them) match the original model's output, and
    writes the new weights into the kept positions (``torch.linalg.lstsq``, with a tiny ridge
    anchored at the old weights for when there are fewer samples than inputs). Biases stay.
    Needs ``data``.
    """

    METHODS: ClassVar[tuple[str, ...]] = ("greedy", "lasso")
    needs_data: ClassVar[bool] = True

    method: str = "greedy"
    samples: int = 512

    def __post_init__(self) -> None:
        if self.method not in self.METHODS:
            raise ConfigError(
                f"Regression method must be one of {', '.join(self.METHODS)}; got {self.method!r}"
            )
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(
                f"Regression samples (positions drawn per consumer layer) must be an int >= 1; "
                f"got {self.samples!r}"
            )

    def channel_scores(self, ctx: ChannelContext) -> dict[int, Tensor]:
        grams = contribution_grams(ctx, self.samples, "regression")
        select = greedy_order if self.method == "greedy" else lasso_order
        out: dict[int, Tensor] = {}
        for g in ctx.graph.prunable_groups:
            scores = select(grams[g.index], g.prunable) if g.index in grams else None
            if scores is None:
                why = (
                    "no layer that reads these channels"
                    if g.index not in grams
                    else "channels that contribute nothing to their readers' outputs"
                )
                scores = fallback(ctx, g, "regression", why)
            out[g.index] = scores
        return out

    refits: ClassVar[bool] = True

    def refit(self, ctx: ChannelContext, removed: dict[int, Tensor]) -> set[str]:
        return refit_readers(ctx, removed, self.samples, "regression")


def refit_readers(
    ctx: ChannelContext, removed: dict[int, Tensor], samples: int, who: str = "reconstruct"
) -> set[str]:
    """Least-squares reconstruction after a channel cut, before surgery: for every layer that
    loses input channels (convolutions with ``groups == 1``, 1-D or 2-D, and linear layers),
    in forward order, refit its kept weights so that its output on the kept inputs, as the
    already refitted upstream layers produce them, matches the original model's output on the
    original inputs, at up to ``samples`` positions drawn from the calibration data (ThiNet's
    refit, applied to every reader of a cut group whatever chose the channels). Biases stay.
    Writes into ``ctx.model`` in place; removed inputs are zeroed by hooks while it runs.
    Returns the names of the layers refitted.
    """
    gone = ctx.graph.removed_positions(removed)
    targets: dict[str, tuple[nn.Module, Tensor]] = {}
    for (ref, dim), positions in gone.items():
        module = ctx.model.get_submodule(ref.module)
        if positions.numel() and reads_input(module, ref, dim, unfoldable=True):
            targets.setdefault(ref.module, (module, positions))
    if not targets:
        return set()
    inputs = calibration_inputs(ctx, who)
    per_batch = max(1, math.ceil(samples / len(inputs)))
    samplers = {name: _Sampler(name, per_batch, ctx.seed) for name in targets}

    # the original outputs (without bias) at the sampled positions, and the forward order
    outputs: dict[str, list[Tensor]] = {name: [] for name in targets}
    order: list[str] = []

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = _first_tensor(args)
            if x is None:
                return
            if name not in order:
                order.append(name)
            rows = samplers[name].take(module, x).to(torch.float64)
            w = module.weight
            assert isinstance(w, Tensor)
            outputs[name].append(rows @ w.detach().reshape(w.shape[0], -1).to(rows).T)

        return hook

    _run(
        ctx,
        inputs,
        list(samplers.values()),
        [(module, "pre", record(name)) for name, (module, _) in targets.items()],
    )
    masks = [(module, "pre", _zero_inputs(pos)) for module, pos in targets.values()]
    for name in order:
        module, positions = targets[name]
        kept = _kept_columns(module, positions)
        seen: list[Tensor] = []
        collect = _collector(samplers[name], kept, seen, len(outputs[name]) // len(inputs))
        _run(ctx, inputs, [samplers[name]], [*masks, (module, "pre", collect)])
        if seen and len(seen) == len(outputs[name]):
            _solve_into(module, kept, torch.cat(seen), torch.cat(outputs[name]))
    return set(order)


def _collector(
    sampler: _Sampler, kept: Tensor, seen: list[Tensor], calls: int
) -> Callable[..., None]:
    """A pre-hook appending the sampled rows of the kept input columns to ``seen``; after the
    ``calls`` calls a forward pass makes of the module, it ends the pass."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = _first_tensor(args)
        if x is not None:
            rows = sampler.take(module, x)
            seen.append(rows[:, kept.to(rows.device)].to(torch.float64))
            if sampler.calls >= calls:
                raise _Enough

    return hook


def _zero_inputs(positions: Tensor) -> Callable[..., Any]:
    """A pre-hook zeroing removed input channels: the module then computes what it will
    compute once those channels are cut."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
        x = _first_tensor(args)
        if x is None:
            return None
        x = x.index_fill(_input_channel_dim(module, x), positions.to(x.device), 0.0)
        return (x, *args[1:])

    return hook


def _kept_columns(module: nn.Module, positions: Tensor) -> Tensor:
    w = module.weight
    assert isinstance(w, Tensor)
    per_input = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    keep = torch.ones(w.shape[1], dtype=torch.bool)
    keep[positions] = False
    return keep.repeat_interleave(per_input).nonzero().flatten()


def _solve_into(module: nn.Module, kept: Tensor, x: Tensor, y: Tensor) -> None:
    """Least-squares refit of ``module.weight``'s ``kept`` columns so ``x @ W_kept' ~= y``."""
    w = module.weight
    assert isinstance(w, Tensor)
    wmat = w.detach().reshape(w.shape[0], -1).to(torch.float64)
    k = kept.to(wmat.device)
    old = wmat[:, k]
    residual = y - x @ old.T
    n = len(k)
    mu = RIDGE * float(x.square().sum()) / max(n, 1) + 1e-30
    lhs = torch.cat([x, math.sqrt(mu) * torch.eye(n, dtype=x.dtype, device=x.device)])
    rhs = torch.cat([residual, residual.new_zeros(n, residual.shape[1])])
    delta = torch.linalg.lstsq(lhs, rhs).solution  # [kept, out]
    new = wmat.clone()
    new[:, k] = old + delta.T
    with torch.no_grad():
        w.copy_(new.reshape(w.shape).to(w.dtype))


# --------------------------------------------------------------------------- channel OBS


@dataclass
class _Reader:
    """A layer reading a group's channels, as the greedy channel surgeon sees it: its dampened
    inverse input Hessian and its weight, both padded with one dummy input (index ``P``, an
    identity row and a zero column) so that channels of unequal width stack."""

    hinv: Tensor  #: [P + 1, P + 1] float64
    w: Tensor  #: [out, P + 1] float64
    energy: float  #: tr(W H W'), the layer's output energy on the samples
    index: Tensor | None = None  #: [size, k] each channel's unfolded input positions (P = none)

    def working_copy(self, index: Tensor) -> _Reader:
        """A copy the greedy removal of one group (channels at ``index``) may change."""
        return _Reader(self.hinv.clone(), self.w.clone(), self.energy, index)


def input_hessians(ctx: ChannelContext, samples: int, who: str) -> dict[str, Tensor]:
    """``{reader: H}`` with ``H = X'X`` (float64) of the unfolded inputs ``X`` of every layer
    that reads a prunable group (convolutions with ``groups == 1`` and linear layers), at up
    to ``samples`` positions drawn from the calibration data."""
    inputs = calibration_inputs(ctx, who)
    sites = consumer_sites(ctx, unfoldable=True)
    per_batch = max(1, math.ceil(samples / len(inputs)))
    hessians: dict[str, Tensor] = {}
    samplers: list[_Sampler] = []
    hooks: list[Hook] = []
    for name, site in sites.items():
        w = site.module.weight
        assert isinstance(w, Tensor)
        p = w[0].numel()
        hessians[name] = torch.zeros(p, p, dtype=torch.float64)
        sampler = _Sampler(name, per_batch, ctx.seed)
        samplers.append(sampler)
        hooks.append((site.module, "pre", _hessian_hook(sampler, hessians[name])))
    _run(ctx, inputs, samplers, hooks)
    return hessians


def _hessian_hook(sampler: _Sampler, h: Tensor) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = _first_tensor(args)
        if x is None:
            return
        rows = sampler.take(module, x).to(torch.float64)
        if rows.shape[1] == h.shape[0]:
            h.add_((rows.T @ rows).cpu())

    return hook


def _reader(wmat: Tensor, h: Tensor, dampening: float) -> _Reader | None:
    """The padded state of one reader (its inverse computed once, however many groups it
    reads), or None when its inputs carry nothing."""
    energy = float(torch.einsum("op,pq,oq->", wmat, h, wmat))
    if not energy > 0:
        return None
    w = wmat.clone()
    hinv = _prepare(w, h.clone(), dampening)
    p = hinv.shape[0]
    padded = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    padded[:p, :p] = hinv
    padded[p, p] = 1.0
    return _Reader(padded, torch.cat([w, w.new_zeros(w.shape[0], 1)], dim=1), energy)


def _removal_costs(r: _Reader, active: Tensor) -> Tensor:
    """For every channel, the rise of the reader's output error (over its energy) if that
    channel went and the reader's other inputs compensated optimally:
    ``tr(W_S [H^-1]_SS^-1 W_S') / E``, ``S`` the channel's inputs. Removed channels: 0."""
    idx = r.index
    assert idx is not None
    blocks = r.hinv[idx[:, :, None], idx[:, None, :]]  # [size, k, k]
    eye = torch.eye(idx.shape[1], dtype=torch.float64)
    blocks = torch.where(active[:, None, None], blocks, eye)
    ws = r.w[:, idx].permute(1, 2, 0)  # [size, k, out]
    sol = torch.linalg.solve(blocks, ws)
    return torch.where(active, (ws * sol).sum(dim=(1, 2)) / r.energy, 0.0)


def _remove(r: _Reader, channel: int) -> None:
    """OBS surgery for one channel: its inputs' weights go to zero and the reader's other
    weights take the optimal correction; ``H^-1`` becomes that of the remaining inputs."""
    assert r.index is not None
    s = r.index[channel]
    s = s[s != r.hinv.shape[0] - 1]
    if not len(s):
        return
    binv = torch.linalg.inv(r.hinv[s][:, s])
    rows = r.hinv[s, :]  # [k, P + 1]
    r.w -= (r.w[:, s] @ binv) @ rows
    r.hinv -= rows.T @ binv @ rows
    r.hinv[s, :] = 0.0
    r.hinv[:, s] = 0.0
    r.hinv[s, s] = 1.0  # keeps a removed channel's block invertible (it is never chosen again)
    r.w[:, s] = 0.0


def obs_channel_order(readers: list[_Reader], prunable: Tensor) -> Tensor:
    """Greedy Optimal Brain Surgeon over whole channels: repeatedly remove the prunable
    channel whose removal, with optimal compensation by each reader's remaining inputs,
    least raises the readers' summed relative output error, and apply that compensation. A
    channel's score is the accumulated error once it and every channel removed before it
    are gone: the removal order, ascending."""
    size = prunable.numel()
    active = torch.ones(size, dtype=torch.bool)
    order: list[int] = []
    values: list[float] = []
    error = 0.0
    for _ in range(int(prunable.sum())):
        cost = sum(
            (_removal_costs(r, active) for r in readers), torch.zeros(size, dtype=torch.float64)
        )
        cost = torch.where(active & prunable, cost, math.inf)
        c = int(torch.argmin(cost))
        error += max(float(cost[c]), 0.0)
        order.append(c)
        values.append(error)
        for r in readers:
            _remove(r, c)
        active[c] = False
    return _scores_from_order(order, torch.tensor(values, dtype=torch.float64), size)


@CRITERIA.register("channel_obs")
@dataclass
class ChannelOBS(ChannelCriterion):
    """Channels ranked by the output error their removal causes once the layers that read
    them have compensated: Optimal Brain Surgeon (Hassibi & Stork 1993) over whole channels,
    greedy, as OBC / SparseGPT do for single weights (Frantar et al. 2022).

    Each reader (convolution with ``groups == 1``, 1-D or 2-D, or linear layer) has the
    Hessian ``H = X'X`` of its unfolded inputs on up to ``samples`` calibration positions.
    Removing channel ``c`` (inputs ``S``) with the best correction of the reader's remaining
    weights raises its output error by ``tr(W_S [H^-1]_SS^-1 W_S')``; the criterion removes
    the cheapest channel, applies the correction to its working copy of ``W`` and ``H^-1``,
    and repeats, so later choices see earlier removals. Errors are relative to each reader's
    output energy and summed over the readers of a group. It is the ranking that matches
    ``shrink``'s reconstruction (on by default when data is given), which then performs that
    compensation by least squares. A group no such layer reads falls back to its L2
    magnitude. Needs ``data``; costs one ``P x P`` inverse per reader (``P`` = in channels x
    kernel size) and a rank-``k`` update per removed channel.
    """

    needs_data: ClassVar[bool] = True

    samples: int = 4096
    dampening: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(
                f"channel_obs samples (positions drawn per reader) must be an int >= 1; "
                f"got {self.samples!r}"
            )
        check_dampening(self.dampening, "channel_obs")

    def channel_scores(self, ctx: ChannelContext) -> dict[int, Tensor]:
        hessians = input_hessians(ctx, self.samples, "channel_obs")
        reads: dict[int, list[tuple[_Reader, Tensor]]] = {}  # group: (reader, its positions)
        for name, site in consumer_sites(ctx, unfoldable=True).items():
            wmat = _sketched_weight(ctx, name, site.module)
            r = _reader(wmat, hessians.pop(name), self.dampening)
            if r is None:
                continue
            for g, m in site.uses:
                index = positions_by_channel(
                    unfolded_channels(site.module, m), g.size, wmat.shape[1]
                )
                reads.setdefault(g.index, []).append((r, index))
        out: dict[int, Tensor] = {}
        for g in ctx.graph.prunable_groups:
            if g.index in reads:
                readers = [r.working_copy(index) for r, index in reads.pop(g.index)]
                out[g.index] = obs_channel_order(readers, g.prunable)
            else:
                why = "no layer that reads these channels (or they carry nothing)"
                out[g.index] = fallback(ctx, g, "channel_obs", why)
        return out
