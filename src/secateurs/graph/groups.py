"""Coupled channel groups: the units structural pruning scores and removes.

After tracing, the connected components of the recorded edges are the *channels* of the model
that can be removed one at a time: a channel of a residual stage spans the producing
convolutions' filters, their biases and BatchNorm entries, the consuming convolutions' input
slices and the classifier's flattened input features. Channels that appear in exactly the same
tensors form one :class:`ChannelGroup` (a stage's width, a block's inner width): they compete
with each other for the budget and every member tensor loses the same positions.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from secateurs.errors import ModelError
from secateurs.graph.labels import components, compress, segments
from secateurs.graph.state import TensorRef, TraceState, Unhandled, WeightUse
from secateurs.graph.trace import trace
from secateurs.running import Inputs


@dataclass
class Member:
    """One dimension of one tensor in a group: which position belongs to which channel."""

    ref: TensorRef
    dim: int
    #: int64 [size of ``dim``]: the group's channel index of each position, -1 if not in the group
    channel: Tensor

    @functools.cached_property
    def complete(self) -> bool:
        """Whether every position of :attr:`dim` belongs to a channel of the group."""
        return bool((self.channel >= 0).all())

    def positions(self, channels: Tensor) -> Tensor:
        """Positions along :attr:`dim` that belong to any of ``channels`` (a bool mask [G])."""
        if self.complete:
            return channels[self.channel].nonzero().flatten()
        hit = channels[self.channel.clamp(min=0)] & (self.channel >= 0)
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
    #: shapes of the model's output tensors on the example inputs
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)

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
        # one member's positions are sorted and distinct already (nonzero's order)
        return {k: v[0] if len(v) == 1 else torch.unique(torch.cat(v)) for k, v in out.items()}

    def _build_counts(self) -> None:
        """Index every (tensor, dim) and every channel once, for fast budget arithmetic."""
        keys: dict[tuple[TensorRef, int], int] = {}
        rows, cols, vals = [], [], []
        even: list[tuple[int, int, float]] = []  # (key, group, positions per channel)
        self._offsets: dict[int, int] = {}
        self._uneven_groups: set[int] = set()
        members = [(g, m) for g in self.groups for m in g.members]
        # positions per (member, channel), for every member at once: one bincount over slots
        slots = torch.tensor([g.size for g, _ in members], dtype=torch.long)
        start = torch.cumsum(slots, 0) - slots
        chan = torch.cat([m.channel for _, m in members]) if members else torch.zeros(0).long()
        owner, _ = segments([m.channel.numel() for _, m in members])
        inside = chan >= 0
        counts = torch.bincount((start[owner] + chan)[inside], minlength=int(slots.sum()))
        slot_owner, _ = segments(slots.tolist())
        lo = torch.full((len(members),), -1, dtype=torch.long)
        lo.scatter_reduce_(0, slot_owner, counts, reduce="amin", include_self=False)
        hi = torch.full((len(members),), -1, dtype=torch.long)
        hi.scatter_reduce_(0, slot_owner, counts, reduce="amax", include_self=False)
        is_even = ((lo == hi) & (slots > 0)).tolist()  # one count per channel
        per_channel, starts = lo.tolist(), start.tolist()
        total = 0
        j = 0
        for g in self.groups:
            self._offsets[g.index] = total
            for m in g.members:
                row = keys.setdefault((m.ref, m.dim), len(keys))
                if is_even[j]:
                    even.append((row, g.index, float(per_channel[j])))
                else:
                    self._uneven_groups.add(g.index)
                    mine = counts[starts[j] : starts[j] + g.size]
                    nz = mine.nonzero().flatten()
                    rows.append(torch.full((len(nz),), row))
                    cols.append(nz + total)
                    vals.append(mine[nz].to(torch.float64))
                j += 1
            total += g.size
        self._channels_total = total
        self._count_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        self._count_cols = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
        self._count_vals = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
        self._even_rows = torch.tensor([e[0] for e in even], dtype=torch.long)
        self._even_groups = torch.tensor([e[1] for e in even], dtype=torch.long)
        self._even_vals = torch.tensor([e[2] for e in even], dtype=torch.float64)
        self._group_slots = max((g.index for g in self.groups), default=-1) + 1
        # every tensor as a row of its dims' sizes and (tensor, dim) indices; -1: no index
        self._tensor_rows = {ref: i for i, ref in enumerate(self.shapes)}
        width = max((len(s) for s in self.shapes.values()), default=0)
        pad = [1] * width
        self._dim_sizes = torch.tensor(
            [[*s, *pad[len(s) :]] for s in self.shapes.values()], dtype=torch.float64
        ).reshape(len(self.shapes), width)
        self._dim_keys = torch.tensor(
            [
                [keys.get((ref, d), len(keys)) for d in range(width)]
                for ref in self._tensor_rows  # a padding dim is no (tensor, dim): no key
            ],
            dtype=torch.long,
        ).reshape(len(self.shapes), width)
        self._num_keys = len(keys)
        self._use_rows = torch.tensor(
            [self._tensor_rows[u.ref] for u in self.weight_uses], dtype=torch.long
        )
        self._use_counts = torch.tensor([u.uses for u in self.weight_uses], dtype=torch.float64)
        self._param_rows = torch.tensor(
            [i for ref, i in self._tensor_rows.items() if ref.is_parameter], dtype=torch.long
        )

    def _dims_after(self, removed: dict[int, Tensor] | None) -> Tensor:
        """Every traced tensor's dimension sizes after removing ``removed`` (float64, by row).

        A position belongs to one group only, so the groups' counts add up. A member whose
        every channel covers the same number of positions (all but a flatten's) loses that
        number times the group's removed count; the others take one weighted scatter-add over
        (tensor dimension, channel, positions) entries. No position lists either way: the
        budget searches call this dozens of times.
        """
        if not hasattr(self, "_dim_sizes"):
            self._build_counts()
        lost = torch.zeros(self._num_keys + 1, dtype=torch.float64)
        if removed:
            # removed count per group in a few ops, not one reduction per group
            masks = list(removed.values())
            owner = torch.repeat_interleave(
                torch.tensor(list(removed), dtype=torch.long),
                torch.tensor([m.numel() for m in masks], dtype=torch.long),
            )
            n = torch.zeros(self._group_slots, dtype=torch.float64)
            n.index_add_(0, owner, torch.cat(masks).to(torch.float64))
            lost.index_add_(0, self._even_rows, self._even_vals * n[self._even_groups])
            uneven = [gi for gi in removed if gi in self._uneven_groups]
            if uneven:
                vec = torch.zeros(self._channels_total, dtype=torch.float64)
                for gi in uneven:
                    off = self._offsets[gi]
                    vec[off : off + removed[gi].numel()] = removed[gi].to(torch.float64)
                lost.index_add_(0, self._count_rows, self._count_vals * vec[self._count_cols])
        return self._dim_sizes - lost[self._dim_keys]

    def _elements_after(self, removed: dict[int, Tensor] | None) -> Tensor:
        """Elements of every traced tensor after removing ``removed`` (float64, by row)."""
        return self._dims_after(removed).prod(dim=1)

    def shapes_after(
        self, removed: dict[int, Tensor] | None = None
    ) -> dict[TensorRef, tuple[int, ...]]:
        """The shape of every traced tensor after removing ``removed`` (no surgery needed)."""
        sizes = self._dims_after(removed).round().long()
        return {
            ref: tuple(int(v) for v in sizes[i, : len(self.shapes[ref])])
            for ref, i in self._tensor_rows.items()
        }

    def macs(self, removed: dict[int, Tensor] | None = None) -> int:
        """MACs of the convolutions and linear layers after removing ``removed``."""
        sizes = self._elements_after(removed)
        return round(float((sizes[self._use_rows] * self._use_counts).sum()))

    def params(self, removed: dict[int, Tensor] | None = None) -> int:
        """Elements of every traced parameter after removing ``removed``."""
        return round(float(self._elements_after(removed)[self._param_rows].sum()))


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


def _dim_members(state: TraceState, rep: Tensor) -> list[tuple[TensorRef, int, Tensor]]:
    """Every tensor dim whose positions all have ids, with each position's class (one
    lookup for all of them)."""
    entries = list(state.dim_ids.items())
    if not entries:
        return []
    lengths = [ids.numel() for _, ids in entries]
    ids = torch.cat([i.reshape(-1) for _, i in entries])
    owner, _ = segments(lengths)
    lowest = torch.full((len(entries),), 0, dtype=torch.long)
    lowest.scatter_reduce_(0, owner, ids, reduce="amin", include_self=False)
    classes = rep[ids.clamp(min=0)].split(lengths)
    return [
        (ref, dim, cls)
        for ((ref, dim), _), cls, low in zip(entries, classes, lowest.tolist(), strict=True)
        if low >= 0
    ]


def build_groups(state: TraceState, shapes: dict[TensorRef, tuple[int, ...]]) -> ChannelGraph:
    """Turn a trace into channel groups (vectorised: a ResNet-50 has ~27k channels)."""
    n = state.ids.next_id
    rep = components(n, state.ids.edges)
    pinned = torch.zeros(n, dtype=torch.bool)
    reason_of = torch.full((n,), -1, dtype=torch.long)
    for i in range(len(state.ids.pins) - 1, -1, -1):  # the first reason recorded wins
        reps = rep[state.ids.pins[i][0]]
        pinned[reps] = True
        reason_of[reps] = i

    raw = _dim_members(state, rep) + _element_members(state, rep, pinned)
    if not raw:
        return ChannelGraph([], state.weight_uses, shapes, state.unhandled, state.output_shapes)

    # every (member, class) entry in one flat tensor: member j's classes, in position order
    sizes = [len(cls) for _, _, cls in raw]
    flat = torch.cat([cls for _, _, cls in raw])
    member, within = segments(sizes)
    # a class's signature is the set of tensor dims it appears in: summed random 63-bit keys
    keys = torch.randint(1, 2**62, (len(raw),), generator=torch.Generator().manual_seed(0))
    pairs = torch.unique(member * n + flat)  # each (member, class) once
    signature = torch.zeros(n, dtype=torch.long)
    signature.index_add_(0, pairs % n, keys[pairs // n])
    # position of each class's first appearance, in member order then position order
    first = torch.full((n,), torch.iinfo(torch.long).max, dtype=torch.long)
    first.scatter_reduce_(0, flat, member * (1 << 32) + within, reduce="amin")
    classes = torch.unique(flat)
    _, group_idx = torch.unique(signature[classes], return_inverse=True)
    order = torch.argsort(first[classes])
    classes, group_idx = classes[order], group_idx[order]  # by first appearance
    # number groups by first appearance, keep channels in order of appearance
    first_seen = torch.full((int(group_idx.max()) + 1,), len(classes), dtype=torch.long)
    first_seen.scatter_reduce_(0, group_idx, torch.arange(len(classes)), reduce="amin")
    number = torch.empty_like(first_seen)
    number[torch.argsort(first_seen)] = torch.arange(len(first_seen))
    group_idx = number[group_idx]
    by_group = torch.argsort(group_idx, stable=True)
    classes, group_idx = classes[by_group], group_idx[by_group]
    counts = torch.bincount(group_idx)
    starts = torch.cumsum(counts, 0) - counts

    group_of = torch.full((n,), -1, dtype=torch.long)
    index_of = torch.full((n,), -1, dtype=torch.long)
    group_of[classes] = group_idx
    index_of[classes] = torch.arange(len(classes)) - starts[group_idx]
    # each group's pin reasons: the distinct (group, reason) pairs, in one op
    because: list[set[str]] = [set() for _ in range(len(counts))]
    stride = len(state.ids.pins) + 1
    for pair in torch.unique(group_idx * stride + reason_of[classes] + 1).tolist():
        g, reason = divmod(pair, stride)
        if reason:
            because[g].add(state.ids.pins[reason - 1][1])
    groups: list[ChannelGroup] = []
    for g, cls_t in enumerate(torch.split(classes, counts.tolist())):
        groups.append(ChannelGroup(g, [], len(cls_t), ~pinned[cls_t], sorted(because[g])))
    owner = group_of[flat]
    lowest = torch.full((len(raw),), len(groups), dtype=torch.long)
    lowest.scatter_reduce_(0, member, owner, reduce="amin")
    highest = torch.full((len(raw),), -1, dtype=torch.long)
    highest.scatter_reduce_(0, member, owner, reduce="amax")
    owners = torch.split(owner, sizes)
    index = torch.split(index_of[flat], sizes)
    for j, ((ref, dim, _), lo, hi) in enumerate(
        zip(raw, lowest.tolist(), highest.tolist(), strict=True)
    ):
        if lo == hi:  # the usual case: the whole dim belongs to one group
            groups[lo].members.append(Member(ref, dim, index[j].clone()))
            continue
        for g in torch.unique(owners[j]).tolist():
            groups[g].members.append(Member(ref, dim, torch.where(owners[j] == g, index[j], -1)))
    return ChannelGraph(groups, state.weight_uses, shapes, state.unhandled, state.output_shapes)


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
