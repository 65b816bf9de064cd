"""Coupled channel groups: the units structural pruning scores and removes.

After tracing, the connected components of the recorded edges are the *channels* of the model
that can be removed one at a time: a channel of a residual stage spans the producing
convolutions' filters, their biases and BatchNorm entries, the consuming convolutions' input
slices and the classifier's flattened input features. Channels that appear in exactly the same
tensors form one :class:`ChannelGroup` (a stage's width, a block's inner width): they compete
with each other for the budget and every member tensor loses the same positions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from secateurs.errors import ModelError
from secateurs.graph.labels import components, compress
from secateurs.graph.trace import TensorRef, TraceState, Unhandled, WeightUse, trace
from secateurs.metrics import Inputs


@dataclass
class Member:
    """One dimension of one tensor in a group: which position belongs to which channel."""

    ref: TensorRef
    dim: int
    #: int64 [size of ``dim``]: the group's channel index of each position, -1 if not in the group
    channel: Tensor

    def positions(self, channels: Tensor) -> Tensor:
        """Positions along :attr:`dim` that belong to any of ``channels`` (a bool mask [G])."""
        inside = self.channel >= 0
        hit = torch.zeros_like(inside)
        hit[inside] = channels[self.channel[inside]]
        return hit.nonzero().flatten()


@dataclass
class ChannelGroup:
    """Channels removed together across every tensor they appear in."""

    index: int
    members: list[Member]
    size: int  #: number of channels
    prunable: Tensor  #: bool [size]: False for channels that must stay (outputs, reductions)
    pinned_because: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The tensor that produces the channels: the first weight whose rows they are."""
        for m in self.members:
            if m.dim == 0 and m.ref.name == "weight":
                return m.ref.module
        return self.members[0].ref.qualname

    @property
    def modules(self) -> list[str]:
        return sorted({m.ref.module for m in self.members})

    @property
    def num_prunable(self) -> int:
        return int(self.prunable.sum())

    def __repr__(self) -> str:
        return (
            f"ChannelGroup({self.index}: {self.name}, {self.size} channels, "
            f"{self.num_prunable} prunable, {len(self.members)} tensor dims)"
        )


@dataclass
class ChannelGraph:
    """All channel groups of a model, with what is needed to count MACs and explain pins."""

    groups: list[ChannelGroup]
    weight_uses: list[WeightUse]
    shapes: dict[TensorRef, tuple[int, ...]]
    unhandled: list[Unhandled]

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        """Groups with at least two channels of which one may go (one always stays)."""
        return [g for g in self.groups if g.num_prunable >= 1 and g.size >= 2]

    def removed_positions(self, removed: dict[int, Tensor]) -> dict[tuple[TensorRef, int], Tensor]:
        """Positions to delete, per tensor dimension, for ``removed[group] = bool mask``."""
        out: dict[tuple[TensorRef, int], list[Tensor]] = defaultdict(list)
        for g in self.groups:
            mask = removed.get(g.index)
            if mask is None or not bool(mask.any()):
                continue
            for m in g.members:
                out[(m.ref, m.dim)].append(m.positions(mask))
        return {k: torch.unique(torch.cat(v)) for k, v in out.items()}

    def macs(self, removed: dict[int, Tensor] | None = None) -> int:
        """MACs of the convolutions and linear layers after removing ``removed``."""
        gone = self.removed_positions(removed or {})
        total = 0
        for use in self.weight_uses:
            shape = list(self.shapes[use.ref])
            for d in range(len(shape)):
                if (use.ref, d) in gone:
                    shape[d] -= gone[(use.ref, d)].numel()
            n = 1
            for s in shape:
                n *= s
            total += use.uses * n
        return total

    def params(self, removed: dict[int, Tensor] | None = None) -> int:
        """Elements of every traced parameter after removing ``removed``."""
        gone = self.removed_positions(removed or {})
        total = 0
        for ref, shape in self.shapes.items():
            if not ref.is_parameter:
                continue
            dims = list(shape)
            for d in range(len(dims)):
                if (ref, d) in gone:
                    dims[d] -= gone[(ref, d)].numel()
            n = 1
            for s in dims:
                n *= s
            total += n
        return total


def _element_members(
    state: TraceState, rep: Tensor, pinned: Tensor
) -> list[tuple[TensorRef, int, Tensor]]:
    """Bare parameters used elementwise become members along the one dim their channels vary."""
    found = []
    for ref, ids in state.element_ids.items():
        cls = compress(rep[ids])
        varying = [d for d in range(cls.dim()) if cls.shape[d] > 1]
        if len(varying) == 1:
            found.append((ref, varying[0], cls.reshape(-1)))
        elif varying:
            pinned[cls.reshape(-1)] = True
    return found


def build_groups(state: TraceState, shapes: dict[TensorRef, tuple[int, ...]]) -> ChannelGraph:
    """Turn a trace into channel groups."""
    n = state.ids.next_id
    rep = components(n, state.ids.edges)
    pinned = torch.zeros(n, dtype=torch.bool)
    reasons: dict[int, str] = {}
    for ids, why in state.ids.pins:
        reps = torch.unique(rep[ids])
        pinned[reps] = True
        for r in reps.tolist():
            reasons.setdefault(r, why)

    raw = [
        (ref, dim, rep[ids]) for (ref, dim), ids in state.dim_ids.items() if bool((ids >= 0).all())
    ]
    raw += _element_members(state, rep, pinned)

    signature: dict[int, list[int]] = defaultdict(list)
    for j, (_, _, cls) in enumerate(raw):
        for c in torch.unique(cls).tolist():
            signature[c].append(j)
    by_sig: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for c, sig in signature.items():
        by_sig[tuple(sig)].append(c)

    group_of = torch.full((n,), -1, dtype=torch.long)
    index_of = torch.full((n,), -1, dtype=torch.long)
    groups: list[ChannelGroup] = []
    for key, classes in by_sig.items():
        first = raw[key[0]][2]
        order = {c: i for i, c in enumerate(dict.fromkeys(first.tolist()))}
        classes.sort(key=lambda c: order.get(c, len(order)))
        cls_t = torch.tensor(classes, dtype=torch.long)
        g = len(groups)
        group_of[cls_t] = g
        index_of[cls_t] = torch.arange(len(classes))
        because = sorted({reasons[c] for c in classes if c in reasons})
        groups.append(ChannelGroup(g, [], len(classes), ~pinned[cls_t], because))
    for ref, dim, cls in raw:
        for g in torch.unique(group_of[cls]).tolist():
            channel = torch.where(group_of[cls] == g, index_of[cls], -1)
            groups[g].members.append(Member(ref, dim, channel))
    return ChannelGraph(groups, state.weight_uses, shapes, state.unhandled)


def build_graph(model: nn.Module, example_inputs: Inputs, strict: bool = False) -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` and return its coupled channel groups.

    Works in eval mode and under ``torch.no_grad()``; the model is not changed. An operation
    without a channel rule pins the channels that reach it (they are never removed) and is
    listed in :attr:`ChannelGraph.unhandled`; with ``strict=True`` it is an error instead.
    """
    state = trace(model, example_inputs)
    if strict and state.unhandled:
        ops = "; ".join(sorted({f"{u.op} in {u.module}" for u in state.unhandled}))
        raise ModelError(
            f"{type(model).__name__} uses operations whose channel semantics secateurs does not "
            f"know: {ops}. Their channels would be kept; pass strict=False to prune the rest"
        )
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    shapes = {
        ref: tuple(tensors[ref.qualname].shape)
        for ref in state.refs.values()
        if ref.qualname in tensors
    }
    return build_groups(state, shapes)
