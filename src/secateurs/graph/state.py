"""What a trace records: the model's tensors, their channel labels, and the ops it saw.

:class:`TraceState` is written by the rules of :mod:`secateurs.graph.rules` while
:func:`secateurs.graph.trace.trace` runs the model, and read by :mod:`secateurs.graph.groups`
to build the channel groups. It lives apart from both so that the rules and the tracer each
import it, and not each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from secateurs.graph.labels import NO_ID, IdSpace, compress


@dataclass(frozen=True)
class TensorRef:
    """A parameter or buffer of the model: the module that owns it and the attribute name."""

    module: str
    name: str
    is_parameter: bool = field(default=True, compare=False)

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name


@dataclass
class WeightUse:
    """A convolution or linear call: how many MACs each weight element costs per forward."""

    ref: TensorRef
    uses: int


@dataclass
class Unhandled:
    """An operation the tracer had no rule for; its channels were pinned."""

    op: str
    module: str


@dataclass
class TraceState:
    """Everything the rules write while the model runs."""

    ids: IdSpace = field(default_factory=IdSpace)
    labels: dict[int, Tensor] = field(default_factory=dict)
    alive: list[Tensor] = field(default_factory=list)
    refs: dict[int, TensorRef] = field(default_factory=dict)
    dim_ids: dict[tuple[TensorRef, int], Tensor] = field(default_factory=dict)
    element_ids: dict[TensorRef, Tensor] = field(default_factory=dict)
    weight_uses: list[WeightUse] = field(default_factory=list)
    unhandled: list[Unhandled] = field(default_factory=list)
    module_stack: list[str] = field(default_factory=lambda: [""])
    #: shapes of the tensors the model returned, in order
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: extra per-module facts surgery needs (e.g. GroupNorm group sizes), by module name
    module_facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: every label stored so far, by id (held, so an id is never reused): one passed on
    #: unchanged (a ReLU's, a norm's output) is stored again without being re-checked
    _stored: dict[int, Tensor] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ labels
    @property
    def where(self) -> str:
        return self.module_stack[-1] or "<model>"

    def label(self, t: Tensor) -> Tensor:
        """The label of ``t``: its recorded one, element ids for a bare parameter, else none."""
        found = self.labels.get(id(t))
        if found is not None:
            return found
        ref = self.refs.get(id(t))
        if ref is not None and t.is_floating_point():
            ids = self.element_ids.get(ref)
            if ids is None:
                ids = self.ids.new(*t.shape)
                self.element_ids[ref] = ids
            return ids
        return torch.full((1,) * t.dim(), NO_ID, dtype=torch.long)

    def has_label(self, t: Any) -> bool:
        return isinstance(t, Tensor) and (id(t) in self.labels or id(t) in self.refs)

    def set_label(self, t: Any, label: Tensor | None) -> None:
        if not isinstance(t, Tensor):
            return
        if label is not None and self._stored.get(id(label)) is label and t.dim() == label.dim():
            self.labels[id(t)] = label  # a label already stored: compressed, with ids
            self.alive.append(t)
            return
        if label is None or t.dim() != label.dim():
            label = torch.full((1,) * t.dim(), NO_ID, dtype=torch.long)
        label = compress(label)
        if bool((label < 0).all()):
            self.labels.pop(id(t), None)
            return
        self.labels[id(t)] = label
        self._stored[id(label)] = label
        self.alive.append(t)

    def dim_ids_of(self, t: Tensor, dim: int) -> Tensor:
        """The ids of dimension ``dim`` of parameter ``t`` (made on first use, then reused)."""
        ref = self.refs.get(id(t))
        if ref is None:  # a computed weight: its positions are not removable
            return torch.full((t.shape[dim],), NO_ID, dtype=torch.long)
        key = (ref, dim % t.dim())
        ids = self.dim_ids.get(key)
        if ids is None:
            ids = self.ids.new(t.shape[dim])
            self.dim_ids[key] = ids
        return ids

    def share_dim_ids(self, t: Tensor | None, dim: int, ids: Tensor) -> None:
        """Make dimension ``dim`` of ``t`` (a bias, a norm's statistics) use ``ids`` as well."""
        if t is None:
            return
        ref = self.refs.get(id(t))
        if ref is None:
            return
        key = (ref, dim % t.dim())
        existing = self.dim_ids.get(key)
        if existing is None:
            self.dim_ids[key] = ids
        else:
            self.ids.join(existing, ids)

    def pin(self, ids: Tensor, why: str) -> None:
        self.ids.pin(ids, f"{why} (in {self.where})")

    def unknown(self, op: str, tensors: list[Tensor]) -> None:
        """Pin every channel reaching an op without a rule, and report the op."""
        labelled = [self.labels[id(t)] for t in tensors if id(t) in self.labels]
        for t in tensors:  # parameters: only the ids they already have (never make new ones)
            ref = self.refs.get(id(t))
            if ref is not None and id(t) not in self.labels:
                labelled += [ids for (r, _), ids in self.dim_ids.items() if r == ref]
                if ref in self.element_ids:
                    labelled.append(self.element_ids[ref])
        if not labelled:
            return
        self.unhandled.append(Unhandled(op, self.where))
        for lab in labelled:
            self.pin(lab, f"{op} has no channel rule")


def tensors_in(obj: Any) -> list[Tensor]:
    """Every tensor in ``obj`` (nested tuples, lists and mappings), in order."""
    found: list[Tensor] = []
    _collect(obj, found)
    return found


#: what an op's arguments mostly hold besides tensors: nothing to look into
_PLAIN = (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)


def _collect(obj: Any, found: list[Tensor]) -> None:
    # a loop, not a recursive generator: the tracer calls this twice per traced op
    if isinstance(obj, Tensor):
        found.append(obj)
        return
    if isinstance(obj, (tuple, list)):
        values: Any = obj
    elif isinstance(obj, Mapping):
        values = obj.values()
    else:
        return
    for v in values:
        if isinstance(v, Tensor):
            found.append(v)
        elif not isinstance(v, _PLAIN):
            _collect(v, found)
