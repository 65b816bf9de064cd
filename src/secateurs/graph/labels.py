"""Channel labels: the bookkeeping that finds which channels must be removed together.

Every prunable position (a row of a weight, an element of a bias, a channel of an activation)
gets an integer *id*. Tracing a forward pass propagates, next to every activation, a *label*
tensor holding the id of the channel each element belongs to (``-1``: no prunable channel).
A label has the activation's number of dimensions but keeps size 1 along every dimension it
does not vary over, so a ``[1, C, 1, 1]`` label describes a ``[N, C, H, W]`` activation.

Operations that tie positions together (a residual add, a convolution reading its input
channels) record *edges* between ids; ids that may not be removed (a model output, a channel
mixed by a reduction) are *pinned* with the reason. Connected components of the edges are the
channels of the final model; :func:`components` computes them without Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

NO_ID = -1


def compress(label: Tensor) -> Tensor:
    """Shrink ``label`` to size 1 along every dimension it is constant over."""
    for d in range(label.dim()):
        if label.shape[d] > 1 and bool((label == label.narrow(d, 0, 1)).all()):
            label = label.narrow(d, 0, 1)
    return label


def expand_to(label: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """``label`` broadcast to ``shape`` (left-padded with dimensions of size 1)."""
    while label.dim() < len(shape):
        label = label.unsqueeze(0)
    return label.expand(*shape)


@dataclass
class IdSpace:
    """Allocates ids and collects the edges between them and the pinned ids."""

    next_id: int = 0
    edges: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    pins: list[tuple[Tensor, str]] = field(default_factory=list)
    #: the tensors :meth:`new` made, by id (held, so an id is never reused): all valid ids
    _fresh: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def new(self, *shape: int) -> Tensor:
        n = 1
        for s in shape:
            n *= s
        ids = torch.arange(self.next_id, self.next_id + n, dtype=torch.long)
        if len(shape) != 1:
            ids = ids.reshape(shape)
        self.next_id += n
        self._fresh[id(ids)] = ids
        return ids

    def complete(self, ids: Tensor) -> bool:
        """Whether every entry of ``ids`` is an id (none is ``-1``)."""
        return self._fresh.get(id(ids)) is ids or bool((ids >= 0).all())

    def join(self, a: Tensor, b: Tensor) -> None:
        """Tie ids ``a`` and ``b`` elementwise (same shape); pairs with a ``-1`` pin the other."""
        a, b = a.reshape(-1), b.reshape(-1)
        both = (a >= 0) & (b >= 0)
        if bool(both.all()):  # the usual case: no copies (labels are never written in place)
            if a.numel():
                self.edges.append((a, b))
        elif bool(both.any()):
            self.edges.append((a[both], b[both]))

    def join_mixed(self, a: Tensor, b: Tensor, reason: str) -> None:
        """Like :meth:`join`, but an id paired with ``-1`` cannot be removed: it is pinned."""
        self.join(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        lonely = torch.cat([a[(a >= 0) & (b < 0)], b[(b >= 0) & (a < 0)]])
        if lonely.numel():
            self.pin(lonely, reason)

    def join_rows(self, ids: Tensor, rows: Tensor, reason: str) -> None:
        """Tie ``ids[i]`` to every id in ``rows[i]`` (2-D).

        A row mixing ids and ``-1`` pins them, and so does a row whose ``ids[i]`` is ``-1``:
        a position that is not a channel (a computed weight, a constant) keeps its size, so
        whatever it is paired with must keep its size too.
        """
        if not rows.numel():
            return
        if self.complete(ids) and int(rows.min()) >= 0:  # the usual case: nothing pinned
            ids = ids.reshape(-1)
            if rows.shape[1] > 1:
                ids = ids.reshape(-1, 1).expand_as(rows).reshape(-1)
            self.edges.append((ids, rows.reshape(-1)))
            return
        ids = ids.reshape(-1)
        gap = (rows < 0).any(dim=1) | (ids < 0)
        self.join(ids.reshape(-1, 1).expand_as(rows), rows)
        stuck = torch.cat([ids[gap], rows[gap][rows[gap] >= 0]])
        if stuck.numel():  # a position fed by something that is not a channel stays
            self.pin(stuck, reason)

    def pin(self, ids: Tensor, reason: str) -> None:
        ids = ids.reshape(-1)
        ids = ids[ids >= 0]
        if ids.numel():
            self.pins.append((torch.unique(ids), reason))


def segments(lengths: list[int]) -> tuple[Tensor, Tensor]:
    """For segments of ``lengths`` laid end to end: each element's segment, and its position
    within it (how the vectorised bookkeeping flattens many tensors into one)."""
    sizes = torch.tensor(lengths, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
    return owner, torch.arange(len(owner)) - (torch.cumsum(sizes, 0) - sizes)[owner]


def components(n: int, edges: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Connected-component representative (the smallest id) of each of ``n`` ids."""
    rep = torch.arange(n, dtype=torch.long)
    if not edges or n == 0:
        return rep
    a = torch.cat([e[0] for e in edges])
    b = torch.cat([e[1] for e in edges])
    while True:
        ra, rb = rep[a], rep[b]
        low = torch.minimum(ra, rb)
        new = rep.clone()
        new.scatter_reduce_(0, ra, low, reduce="amin")
        new.scatter_reduce_(0, rb, low, reduce="amin")
        new = new[new]  # pointer jumping
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, rep):
            return rep
        rep = new
