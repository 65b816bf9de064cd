"""Channel rules: what each torch operation does to channel labels.

A rule receives the call (name, arguments, result) and the trace state. It sets the labels of
the result and records which ids are tied (positions that must be removed together) and which
are pinned (positions that may not be removed). Rules are found by the function's name, so
``torch.add``, ``Tensor.add`` and ``Tensor.__add__`` share one rule. Adding support for an op
is one entry in :data:`RULES`.

The families:

* layers with weights (convolution, linear, ``addmm`` with a weight, embedding, batch/
  instance/group/layer norm, PReLU): their weight dimensions get ids and are tied to the
  labels of the input channels they read;
* elementwise ops: all tensor operands are aligned by broadcasting and tied position by
  position (a residual add couples its branches, a squeeze-and-excitation product couples the
  gate with the features);
* ops that only move elements (view, permute, cat, split, getitem, pixel shuffle, pad, ...):
  the same op is applied to the label tensor, so index bookkeeping is never re-derived by hand;
* per-channel spatial ops (pooling, interpolation) keep the labels;
* reductions and normalisations over channels pin them: removing a channel would change the
  other channels' values, so the pruned model would not match the masked one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from secateurs.graph.labels import NO_ID, compress, expand_to
from secateurs.graph.trace import TraceState, WeightUse, _tensors_in

Rule = Callable[[TraceState, Any, str, tuple[Any, ...], dict[str, Any], Any], None]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def add(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return add


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _rows(label: Tensor, dim: int, size: int) -> Tensor:
    """The label as ``[size, rest]``: row ``i`` holds every id at index ``i`` of ``dim``."""
    dim = dim % label.dim()
    shape = list(label.shape)
    shape[dim] = size
    return label.expand(*shape).movedim(dim, 0).reshape(size, -1)


def _full(state: TraceState, t: Tensor) -> Tensor:
    return expand_to(state.label(t), t.shape).contiguous()


def _shaped(ids: Tensor, ndim: int, dim: int) -> Tensor:
    """1-D ``ids`` as a label of ``ndim`` dimensions varying along ``dim``."""
    shape = [1] * ndim
    shape[dim % ndim] = ids.numel()
    return ids.reshape(shape)


def apply_rule(state: TraceState, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    """Dispatch one traced call to its rule; a rule that fails degrades to pinning."""
    name = getattr(func, "__name__", repr(func))
    inputs = list(_tensors_in((args, kwargs)))
    if not any(state.has_label(t) for t in inputs):
        return
    if name != "__setitem__" and not any(True for _ in _tensors_in(out)):
        return
    fn = RULES.get(name)
    if fn is None:
        state.unknown(name, inputs)
        return
    try:
        fn(state, func, name, args, kwargs, out)
    except Exception as exc:  # a rule that cannot follow this call must not break tracing
        state.unknown(f"{name} ({type(exc).__name__}: {exc})", inputs)


# --------------------------------------------------------------------------- weights


def _record_uses(state: TraceState, weight: Tensor, out: Tensor, per: int) -> None:
    ref = state.refs.get(id(weight))
    if ref is not None:
        state.weight_uses.append(WeightUse(ref, out.numel() // max(per, 1)))


@rule("conv1d", "conv2d", "conv3d")
def _conv(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    groups = int(_arg(args, kwargs, 6, "groups", 1))
    ch = 1 if x.dim() == w.dim() else 0
    out_ids = state.dim_ids_of(w, 0)
    state.share_dim_ids(bias, 0, out_ids)
    rows = _rows(state.label(x), ch, x.shape[ch])
    if groups == 1:
        state.ids.join_rows(state.dim_ids_of(w, 1), rows, f"{name} input channels")
    else:
        # a channel can only leave with its whole convolution group (keeps `groups` valid)
        per_group = out_ids.reshape(groups, -1)
        state.ids.join_rows(per_group[:, 0], per_group, f"{name} groups")
        state.ids.join_rows(per_group[:, 0], rows.reshape(groups, -1), f"{name} groups")
        state.module_facts.setdefault(state.where, {})["out_per_group"] = w.shape[0] // groups
    state.set_label(out, _shaped(out_ids, out.dim(), ch))
    _record_uses(state, w, out, w.shape[0])


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    groups = int(_arg(args, kwargs, 6, "groups", 1))
    ch = 1 if x.dim() == w.dim() else 0
    if groups != 1:
        state.unknown(f"{name} with groups={groups}", [x, w])
        return
    out_ids = state.dim_ids_of(w, 1)
    state.share_dim_ids(bias, 0, out_ids)
    state.ids.join_rows(state.dim_ids_of(w, 0), _rows(state.label(x), ch, x.shape[ch]), name)
    state.set_label(out, _shaped(out_ids, out.dim(), ch))
    _record_uses(state, w, out, w.shape[1])


def _dense(state: TraceState, name: str, x: Tensor, w: Tensor, bias: Any, out: Tensor, in_dim: int) -> None:
    """``out = x @ w (+ bias)`` with ``w``'s input features along ``in_dim`` (0 or 1)."""
    out_ids = state.dim_ids_of(w, 1 - in_dim)
    state.share_dim_ids(bias, 0, out_ids)
    rows = _rows(state.label(x), -1, x.shape[-1])
    state.ids.join_rows(state.dim_ids_of(w, in_dim), rows, f"{name} input features")
    state.set_label(out, _shaped(out_ids, out.dim(), -1))
    _record_uses(state, w, out, w.shape[1 - in_dim])


@rule("linear")
def _linear(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    w = _arg(args, kwargs, 1, "weight")
    _dense(state, name, args[0], w, _arg(args, kwargs, 2, "bias"), out, in_dim=1)


@rule("addmm")
def _addmm(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    bias, x, w = args[0], args[1], args[2]
    if id(w) not in state.refs or w.dim() != 2:
        state.unknown(f"{name} of two activations", [bias, x, w])
        return
    _dense(state, name, x, w, bias if isinstance(bias, Tensor) and bias.dim() == 1 else None, out, 0)


@rule("matmul", "mm")
def _matmul(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x, w = args[0], args[1]
    if id(w) not in state.refs or w.dim() != 2 or id(x) in state.refs:
        state.unknown(f"{name} of two activations", [x, w])
        return
    _dense(state, name, x, w, None, out, 0)


@rule("embedding")
def _embedding(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    w = _arg(args, kwargs, 1, "weight")
    state.set_label(out, _shaped(state.dim_ids_of(w, 1), out.dim(), -1))


def _per_channel(state: TraceState, name: str, x: Tensor, tensors: Sequence[Any], out: Any) -> Tensor:
    """Tie 1-D per-channel tensors (norm weights, statistics) to ``x``'s channel dimension."""
    c = x.shape[1]
    present = [t for t in tensors if isinstance(t, Tensor) and t.dim() == 1 and id(t) in state.refs]
    ids = state.dim_ids_of(present[0], 0) if present else state.ids.new(c)
    for t in present[1:]:
        state.share_dim_ids(t, 0, ids)
    state.ids.join_rows(ids, _rows(state.label(x), 1, c), f"{name} channels")
    state.set_label(out, state.label(x))
    return ids


@rule("batch_norm", "instance_norm")
def _batch_norm(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x = args[0]
    tensors = [_arg(args, kwargs, i, n) for i, n in ((3, "weight"), (4, "bias"), (1, "running_mean"), (2, "running_var"))]
    _per_channel(state, name, x, tensors, out)


@rule("prelu")
def _prelu(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    if w.numel() == 1:
        state.set_label(out, state.label(x))
    else:
        _per_channel(state, name, x, [w], out)


@rule("group_norm")
def _group_norm(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x, groups = args[0], int(_arg(args, kwargs, 1, "num_groups"))
    ids = _per_channel(state, name, x, [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")], out)
    # statistics are per group: a channel can only leave with its whole group
    per_group = ids.reshape(groups, -1)
    state.ids.join_rows(per_group[:, 0], per_group, "group_norm groups")
    state.module_facts.setdefault(state.where, {})["channels_per_group"] = per_group.shape[1]


@rule("layer_norm", "rms_norm")
def _layer_norm(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    weights = [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias") if name == "layer_norm" else None]
    label = state.label(x)
    for t in weights:
        if isinstance(t, Tensor) and id(t) in state.refs and t.dim() == 1:
            state.ids.join_rows(state.dim_ids_of(t, 0), _rows(label, -1, x.shape[-1]), name)
            if any(label.shape[d] > 1 for d in range(label.dim() - k, label.dim())):
                state.pin(state.dim_ids_of(t, 0), f"{name} normalises over these channels")
    if any(label.shape[d] > 1 for d in range(label.dim() - k, label.dim())):
        state.pin(label, f"{name} normalises over these channels")
    state.set_label(out, label)


# --------------------------------------------------------------------------- elementwise

UNARY = (
    "relu relu_ relu6 gelu silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ "
    "hardsigmoid hardsigmoid_ hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu celu mish "
    "softplus softsign logsigmoid exp log sqrt rsqrt abs neg __neg__ square erf sin cos "
    "reciprocal sign floor ceil round trunc dropout dropout_ dropout1d dropout2d dropout3d "
    "alpha_dropout feature_alpha_dropout clone contiguous to float double half bfloat16 type "
    "type_as detach detach_ requires_grad_ nan_to_num isnan isinf isfinite logical_not "
    "bitwise_not __invert__ zero_ fill_ normal_ uniform_ float_power"
).split()

MULTI = (
    "add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub mul mul_ "
    "__mul__ __rmul__ __imul__ div div_ __truediv__ __rtruediv__ __itruediv__ true_divide "
    "floor_divide __floordiv__ where maximum minimum pow pow_ __pow__ __rpow__ addcmul addcdiv "
    "lerp masked_fill masked_fill_ clamp clamp_ clip clip_ copy_ fmod remainder atan2 hypot "
    "eq ne lt gt le ge __eq__ __ne__ __lt__ __gt__ __le__ __ge__ logical_and logical_or "
    "logical_xor __and__ __or__ __xor__ bitwise_and bitwise_or"
).split()


@rule(*UNARY)
def _unary(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tensor) or not isinstance(out, Tensor) or out.shape != x.shape:
        raise ValueError("not shape preserving")
    state.set_label(out, state.label(x))


@rule(*MULTI)
def _elementwise(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    operands = [t for t in _tensors_in((args, kwargs))]
    labelled = [state.label(t) for t in operands if state.has_label(t)]
    ndim = max(t.dim() for t in operands)
    shape = torch.broadcast_shapes(*(lab.shape for lab in labelled))
    merged = expand_to(labelled[0], shape).clone()
    for lab in labelled[1:]:
        other = expand_to(lab, shape)
        state.ids.join_mixed(merged, other, f"{name} of a channel with a non-channel")
        merged = torch.where(merged >= 0, merged, other)
    merged = expand_to(merged, (1,) * (ndim - merged.dim()) + tuple(merged.shape))
    for t in operands:
        if state.has_label(t):
            continue
        padded = (1,) * (ndim - t.dim()) + tuple(t.shape)
        if any(padded[d] > 1 and merged.shape[d] > 1 for d in range(ndim)):
            state.pin(merged, f"{name} with a non-parameter tensor that varies along channels")
    if isinstance(out, Tensor):
        state.set_label(out, merged if out.dim() == ndim else None)


# --------------------------------------------------------------------------- moving elements

MOVING = (
    "permute transpose transpose_ t swapaxes swapdims movedim moveaxis squeeze squeeze_ "
    "unsqueeze unsqueeze_ expand expand_as repeat tile narrow select __getitem__ split "
    "split_with_sizes chunk unbind tensor_split roll flip pixel_shuffle pixel_unshuffle "
    "channel_shuffle native_channel_shuffle index_select gather take_along_dim"
).split()
RESHAPING = "view view_as reshape reshape_as flatten unflatten".split()
JOINING = "cat concat concatenate stack hstack vstack".split()


def _move(state: TraceState, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    """Apply the op itself to the labels of its data operand(s)."""
    if isinstance(args[0], (list, tuple)):
        labels: Any = [_full(state, t) for t in args[0]]
    else:
        labels = _full(state, args[0])
    moved = func(labels, *args[1:], **kwargs)
    outs, labs = (list(out), list(moved)) if isinstance(out, (tuple, list)) else ([out], [moved])
    for o, lab in zip(outs, labs, strict=True):
        if isinstance(o, Tensor):
            if lab.shape != o.shape:
                raise ValueError(f"labels took shape {tuple(lab.shape)}, not {tuple(o.shape)}")
            state.set_label(o, lab)


@rule(*MOVING, *JOINING)
def _moving(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    _move(state, func, args, kwargs, out)


@rule(*RESHAPING)
def _reshaping(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    before = state.label(args[0])
    _move(state, func, args, kwargs, out)
    after = state.labels.get(id(out))
    if after is None:
        return
    dims_in = [s for s in before.shape if s > 1]
    dims_out = [s for s in after.shape if s > 1]
    intact = dims_in == dims_out and torch.equal(before.reshape(-1), after.reshape(-1))
    flattened = len(dims_in) == 1 and len(dims_out) == 1
    if not (intact or flattened):
        # the code's target shape (e.g. groups in a channel shuffle, heads in attention) is
        # fixed by numbers we cannot see; removing channels would break it
        state.pin(after, f"{name} splits or merges channel dimensions")


@rule("pad")
def _pad(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x, pad = args[0], _arg(args, kwargs, 1, "pad")
    label = state.label(x)
    padded_dims = [label.dim() - 1 - i // 2 for i in range(len(pad)) if pad[i] != 0]
    if all(label.shape[d] == 1 for d in padded_dims):
        state.set_label(out, label)
        return
    if _arg(args, kwargs, 2, "mode", "constant") != "constant":
        state.pin(label, f"{name} pads along channels")
        return
    state.set_label(out, F.pad(_full(state, x), list(pad), value=NO_ID))


@rule("__setitem__")
def _setitem(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    for t in _tensors_in(args):
        if state.has_label(t):
            state.pin(state.label(t), "in-place assignment into a slice")


@rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "randint_like")
def _fresh(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    """A new tensor: only its shape comes from the input, it carries no channels."""


@rule("__get__")
def _property(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x = args[0]
    if not (isinstance(out, Tensor) and out.shape == x.shape):
        raise ValueError("a property that changes the shape")
    state.set_label(out, state.label(x))


# --------------------------------------------------------------------------- per channel / reductions

SPATIAL = (
    "avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d max_pool1d_with_indices "
    "max_pool2d_with_indices max_pool3d_with_indices adaptive_avg_pool1d adaptive_avg_pool2d "
    "adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d "
    "adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices lp_pool1d lp_pool2d "
    "interpolate upsample upsample_nearest upsample_bilinear"
).split()


@rule(*SPATIAL)
def _spatial(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    label = state.label(args[0])
    if any(label.shape[d] > 1 for d in range(2, label.dim())):
        state.pin(label, f"{name} mixes positions that belong to different channels")
        return
    for o in _tensors_in(out):
        state.set_label(o, label if o.dim() == label.dim() else None)


REDUCING = "mean sum amax amin max min std var logsumexp argmax argmin any all prod nansum nanmean norm".split()
KEEPING = "softmax log_softmax _softmax cumsum cumprod normalize".split()


def _reduced_dims(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> list[int]:
    position = 2 if name == "norm" else 1
    dim = kwargs.get("dim", args[position] if len(args) > position else None)
    if name == "normalize" and dim is None:
        dim = 1
    if isinstance(dim, bool) or (name in ("std", "var") and not isinstance(dim, (int, tuple, list))):
        dim = kwargs.get("dim")
    if dim is None:
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(ndim, 1) for d in dims)


@rule(*REDUCING, *KEEPING)
def _reduction(state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    x = args[0]
    tensors = list(_tensors_in(args[1:]))
    if name in ("max", "min") and tensors:  # the elementwise form
        _elementwise(state, func, name, args, kwargs, out)
        return
    label = state.label(x)
    dims = _reduced_dims(name, args, kwargs, x.dim())
    mixes = any(label.shape[d] > 1 for d in dims)
    if mixes:
        state.pin(label, f"{name} combines channels")
    outs = list(_tensors_in(out))
    if name in KEEPING:
        state.set_label(outs[0], label)
        return
    if mixes:
        return
    keepdim = bool(kwargs.get("keepdim", False))
    reduced = label
    if not keepdim:
        for d in reversed(dims):
            reduced = reduced.squeeze(d)
    for o in outs:
        state.set_label(o, reduced if o.dim() == reduced.dim() else None)
