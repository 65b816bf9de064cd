"""Channel rules: what each torch operation does to channel labels.

A rule receives the call (name, arguments, result) and the trace state. It sets the labels of
the result and records which ids are tied (positions that must be removed together) and which
are pinned (positions that may not be removed). Rules are found by the function's name, so
``torch.add``, ``Tensor.add`` and ``Tensor.__add__`` share one rule. Adding support for an op
is one entry in :data:`RULES`.

The families:

* layers with weights (convolution, linear, ``addmm`` with a weight, embedding, batch/
  instance/group/layer norm, PReLU): their weight dimensions get ids and are tied to the
  labels of the input channels they read. A bias or scale computed in ``forward`` is tied
  through its own label; a weight computed in ``forward`` cannot shrink, so what it reads and
  writes is pinned;
* elementwise ops: all tensor operands are aligned by broadcasting and tied position by
  position (a residual add couples its branches, a squeeze-and-excitation product couples the
  gate with the features); an operand broadcast across channels (a scalar gain) is not;
* ops that only move elements (permute, expand, cat, pixel/channel shuffle, view, ...): the
  same op is applied to the label tensor, so index bookkeeping is never re-derived by hand;
  what the layout needs (whole pixel-shuffle blocks, equal chunks, equal shuffle groups) is
  tied;
* ops that pick positions by number (slices, ``split`` sizes, ``narrow``, index tensors): exact
  only where they keep a channel dimension whole and in order; otherwise the numbers would
  pick other channels after pruning, so that dimension keeps its size;
* products of two activations (``matmul``, ``einsum``, attention): channels summed over are
  pinned, the others pass to the output;
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
from secateurs.graph.state import TraceState, WeightUse, tensors_in

Rule = Callable[[TraceState, Any, str, tuple[Any, ...], dict[str, Any], Any], None]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    def add(fn: Rule) -> Rule:
        for n in names:
            RULES[n] = fn
        return fn

    return add


def _words(text: str) -> list[str]:
    """Op names written as one space-separated string (easier to read and extend)."""
    return text.split()


def _arg(
    args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = None
) -> Any:
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


def apply_rule(
    state: TraceState, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """Dispatch one traced call to its rule; a rule that fails degrades to pinning."""
    name = getattr(func, "__name__", repr(func))
    inputs = tensors_in((args, kwargs))
    if not any(state.has_label(t) for t in inputs):
        return
    if name != "__setitem__" and not tensors_in(out):
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


def _weight_dim(state: TraceState, w: Tensor, dim: int, name: str) -> Tensor:
    """Ids of dimension ``dim`` of the weight ``w`` of a convolution, linear or lookup.

    A parameter has ids of its own. A weight computed in ``forward`` (scaled, standardised,
    sliced) has none: its shape is fixed by code we cannot see, so every position is ``-1``
    (which pins whatever reads or fills it) and the channels it was computed from are pinned.
    """
    if id(w) in state.refs:
        return state.dim_ids_of(w, dim)
    if id(w) in state.labels:
        state.pin(state.labels[id(w)], f"{name} with a weight computed in forward")
    return torch.full((w.shape[dim],), NO_ID, dtype=torch.long)


def _tie_along(state: TraceState, t: Any, dim: int, ids: Tensor, reason: str) -> None:
    """Dimension ``dim`` of ``t`` (a bias, a norm's scale or statistics) lines up with ``ids``:
    its positions must be removed exactly when those channels are.

    A parameter shares the ids. A tensor computed in ``forward`` is tied through its label
    (a ``qkv_bias.clone()`` follows the parameter it was cloned from); where it has no
    channel (a constant built in ``forward``), its size is fixed and the channels are pinned.
    A tensor broadcast along ``dim`` (size 1) does not shrink; its own channels are pinned.
    """
    if not isinstance(t, Tensor):
        return
    if t.dim() == 0 or t.shape[dim] != ids.numel():
        if state.has_label(t):
            state.pin(state.label(t), f"{reason}: broadcast, cannot shrink")
        return
    if (
        id(t) in state.refs
        and id(t) not in state.labels
        and t.dim() == 1
        and state.ids.complete(ids)
    ):
        state.share_dim_ids(t, 0, ids)
        return
    state.ids.join_rows(ids, _rows(state.label(t), dim, ids.numel()), reason)


@rule("conv1d", "conv2d", "conv3d")
def _conv(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    groups = int(_arg(args, kwargs, 6, "groups", 1))
    ch = 1 if x.dim() == w.dim() else 0
    out_ids = _weight_dim(state, w, 0, name)
    _tie_along(state, bias, 0, out_ids, f"{name} bias")
    rows = _rows(state.label(x), ch, x.shape[ch])
    if groups == 1:
        state.ids.join_rows(_weight_dim(state, w, 1, name), rows, f"{name} input channels")
    else:
        # a channel can only leave with its whole convolution group (keeps `groups` valid)
        per_group = out_ids.reshape(groups, -1)
        state.ids.join_rows(per_group[:, 0], per_group, f"{name} groups")
        state.ids.join_rows(per_group[:, 0], rows.reshape(groups, -1), f"{name} groups")
        state.module_facts.setdefault(state.where, {})["out_per_group"] = w.shape[0] // groups
    state.set_label(out, _shaped(out_ids, out.dim(), ch))
    _record_uses(state, w, out, w.shape[0])


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    groups = int(_arg(args, kwargs, 6, "groups", 1))
    ch = 1 if x.dim() == w.dim() else 0
    if groups != 1:
        state.unknown(f"{name} with groups={groups}", [x, w])
        return
    out_ids = _weight_dim(state, w, 1, name)
    _tie_along(state, bias, 0, out_ids, f"{name} bias")
    state.ids.join_rows(
        _weight_dim(state, w, 0, name), _rows(state.label(x), ch, x.shape[ch]), name
    )
    state.set_label(out, _shaped(out_ids, out.dim(), ch))
    _record_uses(state, w, out, w.shape[1])


def _dense(
    state: TraceState, name: str, x: Tensor, w: Tensor, bias: Any, out: Tensor, in_dim: int
) -> None:
    """``out = x @ w (+ bias)`` with ``w``'s input features along ``in_dim`` (0 or 1); a bias
    may be a vector or (``addmm``) a full matrix whose last dimension follows the outputs."""
    out_ids = _weight_dim(state, w, 1 - in_dim, name)
    _tie_along(state, bias, -1, out_ids, f"{name} bias")
    rows = _rows(state.label(x), -1, x.shape[-1])
    state.ids.join_rows(_weight_dim(state, w, in_dim, name), rows, f"{name} input features")
    state.set_label(out, _shaped(out_ids, out.dim(), -1))
    _record_uses(state, w, out, w.shape[1 - in_dim])


@rule("linear")
def _linear(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    w = _arg(args, kwargs, 1, "weight")
    _dense(state, name, args[0], w, _arg(args, kwargs, 2, "bias"), out, in_dim=1)


@rule("addmm")
def _addmm(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    bias, x, w = args[0], args[1], args[2]
    if id(w) not in state.refs or w.dim() != 2:
        state.unknown(f"{name} of two activations", [bias, x, w])
        return
    _dense(state, name, x, w, bias, out, 0)


@rule("matmul", "mm", "bmm", "__matmul__", "__rmatmul__")
def _matmul(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """``x @ W`` with a weight parameter is a linear layer; a product of two activations
    (attention scores, ``attn @ v``) is a contraction (see :func:`_contract`)."""
    x, w = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
    if id(w) in state.refs and w.dim() == 2 and id(x) not in state.refs:
        _dense(state, name, x, w, None, out, 0)
        return
    if x.dim() == 0 or w.dim() == 0:
        raise ValueError("matmul of a scalar")
    batch = "".join(_LETTERS[: max(x.dim(), w.dim(), 2) - 2])
    x_letters = "k" if x.dim() == 1 else batch[len(batch) - (x.dim() - 2) :] + "nk"
    w_letters = "k" if w.dim() == 1 else batch[len(batch) - (w.dim() - 2) :] + "km"
    out_letters = batch if (x.dim() > 1 or w.dim() > 1) else ""
    out_letters += ("n" if x.dim() > 1 else "") + ("m" if w.dim() > 1 else "")
    _contract(state, name, [(x, x_letters), (w, w_letters)], out, out_letters)


_LETTERS = "ABCDEFGHIJ"


@rule("einsum")
def _einsum(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    equation = str(args[0]).replace(" ", "")
    operands = (
        list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    )
    if "..." in equation:
        raise ValueError("einsum with an ellipsis")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if not _:
        letters = "".join(terms)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(terms) != len(operands) or any(len(set(t)) != len(t) for t in terms):
        raise ValueError("einsum with repeated indices")
    _contract(state, name, list(zip(operands, terms, strict=True)), out, output)


def _contract(
    state: TraceState, name: str, operands: list[tuple[Any, str]], out: Any, out_letters: str
) -> None:
    """A product that sums over some indices (one letter per dimension, as in einsum).

    An operand with channels along a summed index is pinned: each output mixes them. The
    output keeps the channels of an operand that varies only along kept indices; operands
    varying along exactly the same kept indices are tied (removing a position removes it
    from all of them and from the output). An output position can only belong to one
    channel, so an operand varying along other kept indices than the first one is pinned.
    """
    kept = set(out_letters)
    chosen: tuple[frozenset[str], list[Tensor]] | None = None
    for t, letters in operands:
        if not state.has_label(t):
            continue
        label = state.label(t)
        varying = frozenset(letters[d] for d in range(label.dim()) if label.shape[d] > 1)
        if not varying or varying - kept:
            state.pin(label, f"{name} sums over these channels")
            continue
        # the label along the varying letters only, in output order
        keep = [d for d in range(label.dim()) if letters[d] in varying]
        reduced = label.reshape([label.shape[d] for d in keep])
        order = sorted(range(len(keep)), key=lambda i: out_letters.index(letters[keep[i]]))
        reduced = reduced.permute(order)
        if chosen is None:
            chosen = (varying, [reduced])
        elif chosen[0] == varying and chosen[1][0].shape == reduced.shape:
            state.ids.join_mixed(chosen[1][0], reduced, f"{name} of a channel with a non-channel")
        else:
            state.pin(label, f"{name} combines channels of two operands")
    if chosen is None or not isinstance(out, Tensor):
        return
    varying, (reduced, *_) = chosen
    shape = [out.shape[i] if c in varying else 1 for i, c in enumerate(out_letters)]
    state.set_label(out, reduced.reshape(shape))


@rule("scaled_dot_product_attention")
def _attention(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """``softmax(q k^T) v``: queries, keys and the mask are mixed (pinned); each output
    feature is a weighted sum of the same feature of the values, so it keeps their channels
    when they vary along the last dimension only."""
    q, k, v = (_arg(args, kwargs, i, n) for i, n in ((0, "query"), (1, "key"), (2, "value")))
    mask = _arg(args, kwargs, 3, "attn_mask")
    if _whole_heads(state, name, q, k, v, mask, out):
        return
    for t in (q, k, mask):
        if isinstance(t, Tensor) and state.has_label(t):
            state.pin(state.label(t), f"{name} mixes queries and keys")
    label = state.label(v)
    if any(label.shape[d] > 1 for d in range(label.dim() - 1)):
        state.pin(label, f"{name} mixes values along this dimension")
    elif isinstance(out, Tensor) and out.dim() == label.dim():
        state.set_label(out, label)


def _head_ids(state: TraceState, t: Any) -> Tensor | None:
    """One id per head of a ``[..., heads, tokens, dim]`` tensor whose channels are whole
    heads (its label varies along the head dimension only), else None."""
    if not (isinstance(t, Tensor) and t.dim() >= 3 and state.has_label(t)):
        return None
    label = state.label(t)
    if any(label.shape[d] > 1 for d in range(label.dim()) if d != label.dim() - 3):
        return None
    return label.reshape(-1) if label.shape[-3] == t.shape[-3] else None


def _whole_heads(state: TraceState, name: str, q: Any, k: Any, v: Any, mask: Any, out: Any) -> bool:
    """Attention over whole heads: head ``h`` of the output reads head ``h`` of the queries,
    and the keys and values of its key/value head (``h // (heads / kv_heads)`` with grouped
    queries), so all of them form one channel; the output keeps the queries' heads."""
    heads = [_head_ids(state, t) for t in (q, k, v)]
    if any(h is None for h in heads) or (isinstance(mask, Tensor) and state.has_label(mask)):
        return False
    hq, hk, hv = heads
    assert hq is not None and hk is not None and hv is not None
    if hk.numel() != hv.numel() or hq.numel() % hk.numel():
        return False
    state.ids.join(hk, hv)
    state.ids.join_rows(hk, hq.reshape(hk.numel(), -1), f"{name} heads")
    if isinstance(out, Tensor):
        state.set_label(out, state.label(q))
    return True


@rule("multi_head_attention_forward")
def _multi_head_attention(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """``nn.MultiheadAttention``: its embedding size and head count are plain numbers
    (``embed_dim``, ``num_heads``) that surgery cannot change, so every channel that reaches
    it, and its own projections, stay. The projections' MACs still count: every query token
    meets every input-projection and output-projection weight once (self-attention)."""
    for t in tensors_in((args, kwargs)):
        if id(t) in state.refs and t.dim() >= 1:
            for d in range(t.dim()):
                state.pin(state.dim_ids_of(t, d), f"{name} has a fixed embedding size")
        elif state.has_label(t):
            state.pin(state.label(t), f"{name} has a fixed embedding size")
    query, embed = args[0], int(_arg(args, kwargs, 3, "embed_dim_to_check"))
    tokens = query.numel() // max(embed, 1)
    for i, key in ((5, "in_proj_weight"), (11, "out_proj_weight")):
        w = _arg(args, kwargs, i, key)
        ref = state.refs.get(id(w)) if isinstance(w, Tensor) else None
        if ref is not None:
            state.weight_uses.append(WeightUse(ref, tokens))


@rule("embedding")
def _embedding(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    w = _arg(args, kwargs, 1, "weight")
    state.set_label(out, _shaped(_weight_dim(state, w, 1, name), out.dim(), -1))


def _per_channel(
    state: TraceState, name: str, x: Tensor, tensors: Sequence[Any], out: Any
) -> Tensor:
    """Tie 1-D per-channel tensors (norm weights, statistics) to ``x``'s channel dimension."""
    c = x.shape[1]
    own = [t for t in tensors if isinstance(t, Tensor) and t.dim() == 1 and id(t) in state.refs]
    ids = state.dim_ids_of(own[0], 0) if own else state.ids.new(c)
    for t in tensors:
        if not (own and t is own[0]):
            _tie_along(state, t, 0, ids, f"{name} per-channel tensor")
    state.ids.join_rows(ids, _rows(state.label(x), 1, c), f"{name} channels")
    state.set_label(out, state.label(x))
    return ids


@rule("batch_norm", "instance_norm")
def _batch_norm(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    x = args[0]
    tensors = [
        _arg(args, kwargs, i, n)
        for i, n in ((3, "weight"), (4, "bias"), (1, "running_mean"), (2, "running_var"))
    ]
    _per_channel(state, name, x, tensors, out)


@rule("prelu")
def _prelu(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    if w.numel() == 1:
        state.set_label(out, state.label(x))
    else:
        _per_channel(state, name, x, [w], out)


@rule("group_norm")
def _group_norm(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    x, groups = args[0], int(_arg(args, kwargs, 1, "num_groups"))
    ids = _per_channel(
        state, name, x, [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")], out
    )
    # statistics are per group: a channel can only leave with its whole group
    per_group = ids.reshape(groups, -1)
    state.ids.join_rows(per_group[:, 0], per_group, "group_norm groups")
    state.module_facts.setdefault(state.where, {})["channels_per_group"] = per_group.shape[1]


@rule("layer_norm", "rms_norm")
def _layer_norm(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """Statistics over the last ``k`` dims mix them, so the channels there are pinned; the
    scale and shift follow the last dim, which is then pinned too (either it is those
    channels, or it is no channel and cannot shrink)."""
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    weights = [
        _arg(args, kwargs, 2, "weight"),
        _arg(args, kwargs, 3, "bias") if name == "layer_norm" else None,
    ]
    label = state.label(x)
    last = state.ids.new(x.shape[-1])  # positions of the last dim, for the scale and shift
    if any(label.shape[d] > 1 for d in range(label.dim() - k, label.dim())):
        state.ids.join_rows(last, _rows(label, -1, x.shape[-1]), name)
        state.pin(label, f"{name} normalises over these channels")
    state.pin(last, f"{name} normalises over these channels")
    for t in weights:
        _tie_along(state, t, -1, last, f"{name} scale")
    state.set_label(out, label)


# --------------------------------------------------------------------------- elementwise

UNARY = _words(
    "relu relu_ relu6 gelu silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ "
    "hardsigmoid hardsigmoid_ hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu celu mish "
    "softplus softsign logsigmoid exp log sqrt rsqrt abs neg __neg__ square erf sin cos "
    "reciprocal sign floor ceil round trunc dropout dropout_ dropout1d dropout2d dropout3d "
    "alpha_dropout feature_alpha_dropout clone contiguous to float double half bfloat16 type "
    "type_as detach detach_ requires_grad_ nan_to_num isnan isinf isfinite logical_not "
    "bitwise_not __invert__ zero_ fill_ normal_ uniform_ float_power"
)

MULTI = _words(
    "add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub mul mul_ "
    "__mul__ __rmul__ __imul__ div div_ __truediv__ __rtruediv__ __itruediv__ true_divide "
    "floor_divide __floordiv__ where maximum minimum pow pow_ __pow__ __rpow__ addcmul addcdiv "
    "lerp masked_fill masked_fill_ clamp clamp_ clip clip_ copy_ fmod remainder atan2 hypot "
    "eq ne lt gt le ge __eq__ __ne__ __lt__ __gt__ __le__ __ge__ logical_and logical_or "
    "logical_xor __and__ __or__ __xor__ bitwise_and bitwise_or"
)


@rule(*UNARY)
def _unary(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tensor) or not isinstance(out, Tensor) or out.shape != x.shape:
        raise ValueError("not shape preserving")
    state.set_label(out, state.label(x))


def _padded(shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    return (1,) * (ndim - len(shape)) + tuple(shape)


@rule(*MULTI)
def _elementwise(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """Operands are tied position by position after broadcasting.

    An operand broadcast (size 1) along a dimension where another operand has channels
    (a scalar parameter times a feature map) is not tied to them: it would merge all those
    channels into one. It does not shrink with them either, so its own ids are pinned.
    """
    operands = [t for t in tensors_in((args, kwargs))]
    ndim = max(t.dim() for t in operands)
    full = torch.broadcast_shapes(*(t.shape for t in operands))
    candidates = [(t, state.label(t)) for t in operands if state.has_label(t)]
    varying = [
        {d for d, s in enumerate(_padded(lab.shape, ndim)) if s > 1} for _, lab in candidates
    ]
    labelled = []
    for i, (t, lab) in enumerate(candidates):
        spread = {d for d, s in enumerate(_padded(t.shape, ndim)) if s == 1 and full[d] > 1}
        if any(spread & v for j, v in enumerate(varying) if j != i):
            state.pin(lab, f"{name} broadcasts it over channels")
        else:
            labelled.append(lab)
    if not labelled:
        return
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
        padded = _padded(t.shape, ndim)
        if any(padded[d] > 1 and merged.shape[d] > 1 for d in range(ndim)):
            state.pin(merged, f"{name} with a non-parameter tensor that varies along channels")
    if isinstance(out, Tensor):
        state.set_label(out, merged if out.dim() == ndim else None)


# --------------------------------------------------------------------------- moving elements

#: ops that only rearrange or duplicate whole positions: applied to the labels as they are
MOVING = _words(
    "permute transpose transpose_ t swapaxes swapdims movedim moveaxis squeeze squeeze_ "
    "unsqueeze unsqueeze_ expand repeat tile flip pixel_unshuffle"
)
#: ops that pick positions by number (a slice, an index tensor, split sizes): exact along a
#: dimension with channels only when they keep all of it in order (``x[:, :, 0]``, a split of
#: another dimension); otherwise the numbers would pick other channels once some are gone
INDEXING = _words(
    "__getitem__ narrow select index_select gather take_along_dim roll split "
    "split_with_sizes tensor_split unbind chunk"
)
RESHAPING = _words("view view_as reshape reshape_as flatten unflatten")
JOINING = _words("cat concat concatenate stack hstack vstack")


def _move(
    state: TraceState, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> list[Tensor]:
    """Apply the op itself to the labels of its data operand(s); returns the output labels."""
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
    return [lab for lab in labs if isinstance(lab, Tensor)]


@rule(*MOVING)
def _moving(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    _move(state, func, args, kwargs, out)


def _keeps_all_in_order(piece: Tensor, n: int) -> bool:
    """``piece`` (the op applied to positions ``0..n-1`` laid along one dim) holds every
    position once, in order, along a single dim."""
    small = compress(piece)
    varying = [d for d in range(small.dim()) if small.shape[d] > 1]
    return len(varying) == 1 and torch.equal(small.reshape(-1), torch.arange(n))


@rule(*INDEXING)
def _indexing(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    x = args[0]
    label = state.label(x)
    pieces = _move(state, func, args, kwargs, out)
    for d in range(label.dim()):
        n = label.shape[d]
        if n == 1:
            continue
        probe = _shaped(torch.arange(n), x.dim(), d).expand(x.shape).contiguous()
        picked = func(probe, *args[1:], **kwargs)
        picked = list(picked) if isinstance(picked, (tuple, list)) else [picked]
        if all(_keeps_all_in_order(p, n) for p in picked):
            continue
        if name == "chunk" and len(pieces) > 1 and all(p.shape == pieces[0].shape for p in pieces):
            # n equal pieces stay equal if every piece loses the same positions
            for p in pieces[1:]:
                state.ids.join_mixed(pieces[0], p, f"{name} into equal pieces")
            continue
        # the numbers pick positions along d, so d must keep its size: every id along d (at
        # each position of the other dims) becomes one channel, and plain channels are pinned
        rows = _full(state, x).movedim(d, -1).reshape(-1, n)
        state.ids.join_rows(rows[:, 0], rows, f"{name} picks channels by position")
        if all(label.shape[e] == 1 for e in range(label.dim()) if e != d):
            state.pin(label, f"{name} picks channels by position")


@rule(*JOINING)
def _joining(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """Concatenation follows the channels of each part; the parts must also keep equal sizes
    along every other dimension, so positions there are tied across parts."""
    parts = [t for t in args[0] if isinstance(t, Tensor)]
    _move(state, func, args, kwargs, out)
    if len(parts) < 2:
        return
    ndim = parts[0].dim()
    along: int | None = None  # the dimension the parts are laid along, if an existing one
    if name in ("cat", "concat", "concatenate"):
        along = int(_arg(args, kwargs, 1, "dim", 0)) % ndim
    elif name == "hstack":
        along = 1 if ndim > 1 else 0
    elif name == "vstack" and ndim > 1:
        along = 0
    for d in range(ndim):
        if d == along or not any(state.label(t).shape[d] > 1 for t in parts if t.dim() == ndim):
            continue
        rows = [_rows(_full(state, t), d, t.shape[d]) for t in parts]
        first = rows[0][:, :1]
        for r in rows:
            state.ids.join_rows(first.reshape(-1), r, f"{name} of parts with different channels")
    # Parts with channels only across the joining dimension (a class token and patch tokens,
    # both [.., C]) are now tied position by position, so the first part's label describes
    # the whole output; without this, the output would seem to vary along the token dim too.
    labels = [state.label(t) for t in parts]
    if (
        isinstance(out, Tensor)
        and along is not None
        and any(size > 1 for size in labels[0].shape)
        and all(lab.shape == labels[0].shape for lab in labels)
        and all(
            t.dim() == ndim and lab.shape[along] == 1 and bool((lab >= 0).all())
            for t, lab in zip(parts, labels, strict=True)
        )
    ):
        state.set_label(out, labels[0])


@rule("expand_as")
def _expand_as(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """``x.expand_as(other)`` takes ``other``'s size: positions behave as in ``x + other``."""
    _elementwise(state, func, name, args, kwargs, out)


@rule("pixel_shuffle")
def _pixel_shuffle(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """Each block of ``r*r`` consecutive channels becomes one channel: blocks go whole."""
    x, r = args[0], int(_arg(args, kwargs, 1, "upscale_factor"))
    rows = _rows(state.label(x), -3, x.shape[-3])
    blocks = rows.reshape(x.shape[-3] // (r * r), -1)
    state.ids.join_rows(blocks[:, 0], blocks, f"{name} blocks")
    _move(state, func, args, kwargs, out)


@rule("channel_shuffle", "native_channel_shuffle")
def _channel_shuffle(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """Channels laid out as ``[groups, per_group]`` are transposed: the shuffle of a pruned
    tensor matches only if every group loses the same positions, so those are tied."""
    x, groups = args[0], int(_arg(args, kwargs, 1, "groups"))
    rows = _rows(state.label(x), 1, x.shape[1]).reshape(groups, -1)
    for g in range(1, groups):
        state.ids.join_mixed(rows[0], rows[g], f"{name} groups")
    _move(state, func, args, kwargs, out)


@rule(*RESHAPING)
def _reshaping(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    before = state.label(args[0])
    _move(state, func, args, kwargs, out)
    after = state.labels.get(id(out))
    if after is None:
        return
    dims_in = [s for s in before.shape if s > 1]
    dims_out = [s for s in after.shape if s > 1]
    if isinstance(out, Tensor) and _into_heads(state, name, args, before, after, out):
        return
    intact = dims_in == dims_out and torch.equal(before.reshape(-1), after.reshape(-1))
    flattened = len(dims_in) == 1 and len(dims_out) == 1
    if not (intact or flattened):
        # the code's target shape (e.g. groups in a channel shuffle, heads in attention) is
        # fixed by numbers we cannot see; removing channels would break it
        state.pin(after, f"{name} splits or merges channel dimensions")
    elif isinstance(out, Tensor) and _splits_off_one_head(name, args, out.shape, after):
        state.pin(after, f"{name} splits channels into (-1, size): heads of a fixed size")


def _into_heads(
    state: TraceState,
    name: str,
    args: tuple[Any, ...],
    before: Tensor,
    after: Tensor,
    out: Tensor,
) -> bool:
    """``x.view(b, t, -1, head_dim)``: channels split into heads of a fixed size, with the
    head count left to ``-1``. Whole heads can go (the ``-1`` absorbs it), single channels
    cannot (``head_dim`` is fixed): each head becomes one channel, and the result's label
    varies along the head dimension only, so attention can follow heads."""
    sizes = _requested_shape(name, args)
    varying_in = [d for d in range(before.dim()) if before.shape[d] > 1]
    varying_out = [d for d in range(after.dim()) if after.shape[d] > 1]
    if sizes is None or len(sizes) != out.dim() or len(varying_in) != 1:
        return False
    if len(varying_out) != 2 or varying_out[1] != varying_out[0] + 1:
        return False
    h, d = varying_out
    if sizes[h] != -1 or sizes[d] == -1 or out.shape[h] < 2:
        return False
    per_head = after.movedim(h, 0).movedim(d, 1).reshape(out.shape[h], out.shape[d], -1)
    if bool((per_head < 0).any()) or bool((per_head != per_head[:, :, :1]).any()):
        return False
    units = per_head[:, :, 0]
    state.ids.join_rows(units[:, 0], units, f"{name} into heads of {out.shape[d]}")
    state.set_label(out, after.narrow(d, 0, 1))
    return True


def _requested_shape(name: str, args: tuple[Any, ...]) -> list[int] | None:
    """The sizes a ``view``/``reshape`` call asked for, if given as numbers."""
    if name not in ("view", "reshape") or len(args) < 2:
        return None
    sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    return list(sizes) if all(isinstance(s, int) for s in sizes) else None


def _splits_off_one_head(
    name: str, args: tuple[Any, ...], shape: torch.Size, after: Tensor
) -> bool:
    """``x.view(b, t, -1, head_dim)`` with a single head: the channels seem intact (the head
    dim has size 1), but ``head_dim`` is a fixed number right after a ``-1`` that would absorb
    any change, so the channels cannot shrink. (``view(b, c, -1)`` after pooling is fine: the
    ``-1`` comes after the channels, and ``view(b, -1, c)`` over several tokens is too: its
    ``-1`` is not 1.)"""
    sizes = _requested_shape(name, args)
    if sizes is None or len(sizes) != after.dim():
        return False
    varying = [d for d in range(after.dim()) if after.shape[d] > 1]
    return any(
        d > 0 and sizes[d] != -1 and sizes[d - 1] == -1 and shape[d - 1] == 1 for d in varying
    )


@rule("pad")
def _pad(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
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
def _setitem(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    for t in tensors_in(args):
        if state.has_label(t):
            state.pin(state.label(t), "in-place assignment into a slice")


@rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
def _fresh(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """A new tensor of a size given by numbers: it carries no channels."""


@rule(
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "randint_like"
)
def _like(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    """A new tensor shaped like its input: its positions shrink with the input's channels, so
    it carries the input's labels (``cat([q_bias, zeros_like(v_bias), v_bias])`` stays exact)."""
    x = args[0] if args else kwargs["input"]
    if isinstance(out, Tensor) and out.shape == x.shape:
        state.set_label(out, state.label(x))


@rule("__get__")
def _property(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    x = args[0]
    if not (isinstance(out, Tensor) and out.shape == x.shape):
        raise ValueError("a property that changes the shape")
    state.set_label(out, state.label(x))


# --------------------------------------------------------------------------- per channel / reductions

SPATIAL = _words(
    "avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d max_pool1d_with_indices "
    "max_pool2d_with_indices max_pool3d_with_indices adaptive_avg_pool1d adaptive_avg_pool2d "
    "adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d "
    "adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices lp_pool1d lp_pool2d "
    "interpolate upsample upsample_nearest upsample_bilinear"
)


@rule(*SPATIAL)
def _spatial(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    label = state.label(args[0])
    if any(label.shape[d] > 1 for d in range(2, label.dim())):
        state.pin(label, f"{name} mixes positions that belong to different channels")
        return
    for o in tensors_in(out):
        state.set_label(o, label if o.dim() == label.dim() else None)


REDUCING = _words(
    "mean sum amax amin max min std var logsumexp argmax argmin any all prod nansum nanmean norm"
)
KEEPING = _words("softmax log_softmax _softmax cumsum cumprod normalize")


def _reduced_dims(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> list[int]:
    position = 2 if name == "norm" else 1
    dim = kwargs.get("dim", args[position] if len(args) > position else None)
    if name == "normalize" and dim is None:
        dim = 1
    if isinstance(dim, bool) or (
        name in ("std", "var") and not isinstance(dim, (int, tuple, list))
    ):
        dim = kwargs.get("dim")
    if dim is None:
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(ndim, 1) for d in dims)


@rule(*REDUCING, *KEEPING)
def _reduction(
    state: TraceState, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> None:
    x = args[0]
    tensors = list(tensors_in(args[1:]))
    if name in ("max", "min") and tensors:  # the elementwise form
        _elementwise(state, func, name, args, kwargs, out)
        return
    label = state.label(x)
    dims = _reduced_dims(name, args, kwargs, x.dim())
    mixes = any(label.shape[d] > 1 for d in dims)
    if mixes:
        state.pin(label, f"{name} combines channels")
    outs = list(tensors_in(out))
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
