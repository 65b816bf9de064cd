"""Surgery: physically remove channels, and the replayable plan that says which.

A :class:`ChannelPlan` lists, for every tensor that shrinks, the positions removed along each
dimension. Applying it slices parameters and buffers (BatchNorm statistics included) and then
updates the owning modules' size attributes (``out_channels``, ``groups``, ``in_features``,
``num_features``, ...) from the new shapes, so the result is a plain module tree of standard
layers. The plan is JSON: rebuilding the original class and replaying the plan gives a model
that loads the pruned ``state_dict`` strictly, without tracing again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.errors import ConfigError, ModelError
from secateurs.graph.groups import ChannelGraph

PLAN_VERSION = 1


@dataclass
class ChannelPlan:
    """Removed positions: ``removed[tensor name][dim] = sorted indices``."""

    removed: dict[str, dict[int, list[int]]] = field(default_factory=dict)

    def to_json(self) -> str:
        body = {n: {str(d): idx for d, idx in dims.items()} for n, dims in self.removed.items()}
        return json.dumps({"version": PLAN_VERSION, "removed": body}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChannelPlan:
        try:
            data = json.loads(text)
            if data.get("version") != PLAN_VERSION:
                raise ConfigError(
                    f"channel plan version {data.get('version')!r} is not supported "
                    f"(this secateurs reads version {PLAN_VERSION})"
                )
            removed = {
                str(n): {int(d): [int(i) for i in idx] for d, idx in dims.items()}
                for n, dims in data["removed"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"not a secateurs channel plan: {exc}") from exc
        return cls(removed)

    @property
    def num_removed(self) -> int:
        return sum(len(idx) for dims in self.removed.values() for idx in dims.values())

    def merged(self, later: ChannelPlan, shapes: dict[str, tuple[int, ...]]) -> ChannelPlan:
        """This plan followed by ``later`` (whose indices refer to the already-pruned tensors),
        as one plan on the original tensors (``shapes``: original shapes by tensor name)."""
        out = {n: {d: list(i) for d, i in dims.items()} for n, dims in self.removed.items()}
        for name, dims in later.removed.items():
            for d, idx in dims.items():
                before = out.setdefault(name, {}).setdefault(d, [])
                kept = [i for i in range(shapes[name][d]) if i not in set(before)]
                before.extend(kept[i] for i in idx)
                before.sort()
        return ChannelPlan(out)


def plan_from_removed(graph: ChannelGraph, removed: dict[int, Tensor]) -> ChannelPlan:
    """The plan that removes, for each group index, the channels marked True."""
    for g in graph.groups:
        mask = removed.get(g.index)
        if mask is None:
            continue
        if mask.shape != (g.size,):
            raise ConfigError(
                f"group {g.index} has {g.size} channels; got a mask of {tuple(mask.shape)}"
            )
        if bool((mask & ~g.prunable).any()):
            raise ConfigError(
                f"group {g.index} ({g.name}): cannot remove pinned channels ({'; '.join(g.pinned_because)})"
            )
        if bool(mask.all()):
            raise ConfigError(f"group {g.index} ({g.name}): at least one channel must stay")
    plan = ChannelPlan()
    for (ref, dim), pos in graph.removed_positions(removed).items():
        plan.removed.setdefault(ref.qualname, {})[dim] = pos.tolist()
    return plan


# --------------------------------------------------------------------------- module attributes


def _conv(m: nn.Module, old: dict[str, Any]) -> None:
    assert isinstance(m, nn.modules.conv._ConvNd)
    w = m.weight
    per_group = old["out_channels"] // old["groups"]
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:
        m.out_channels = w.shape[0]
        if old["groups"] > 1:
            m.groups = m.out_channels // per_group
        m.in_channels = w.shape[1] * m.groups


def _linear(m: nn.Module, old: dict[str, Any]) -> None:
    assert isinstance(m, nn.Linear)
    m.out_features, m.in_features = m.weight.shape


def _norm(m: nn.Module, old: dict[str, Any]) -> None:
    stat = m.weight if getattr(m, "weight", None) is not None else m.running_mean
    assert isinstance(stat, Tensor)
    m.num_features = stat.shape[0]  # type: ignore[assignment]


def _group_norm(m: nn.Module, old: dict[str, Any]) -> None:
    assert isinstance(m, nn.GroupNorm)
    per_group = old["num_channels"] // old["num_groups"]
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // per_group


def _layer_norm(m: nn.Module, old: dict[str, Any]) -> None:
    assert isinstance(m, nn.LayerNorm)
    m.normalized_shape = tuple(m.weight.shape)


def _embedding(m: nn.Module, old: dict[str, Any]) -> None:
    assert isinstance(m, nn.Embedding)
    m.embedding_dim = m.weight.shape[1]


def _prelu(m: nn.Module, old: dict[str, Any]) -> None:
    assert isinstance(m, nn.PReLU)
    m.num_parameters = m.weight.numel()


def _hf_conv1d(m: nn.Module, old: dict[str, Any]) -> None:
    w = m.weight
    assert isinstance(w, Tensor)
    m.nf = w.shape[1]  # type: ignore[assignment]


#: module class -> updates its size attributes from its (already sliced) tensors
SIZE_UPDATES: list[tuple[type | str, Callable[[nn.Module, dict[str, Any]], None]]] = [
    (nn.modules.conv._ConvNd, _conv),
    (nn.Linear, _linear),
    (nn.modules.batchnorm._NormBase, _norm),
    (nn.GroupNorm, _group_norm),
    (nn.LayerNorm, _layer_norm),
    (nn.Embedding, _embedding),
    (nn.PReLU, _prelu),
    ("Conv1D", _hf_conv1d),  # Hugging Face GPT-2's transposed linear layer
]


def _updater(m: nn.Module) -> Callable[[nn.Module, dict[str, Any]], None] | None:
    for cls, fn in SIZE_UPDATES:
        if (isinstance(cls, str) and type(m).__name__ == cls) or (
            isinstance(cls, type) and isinstance(m, cls)
        ):
            return fn
    return None


# --------------------------------------------------------------------------- applying


def _owners(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Tensor name (first, as in ``state_dict``) -> every (module, attribute, is_param) holding it."""
    first: dict[int, str] = {}
    out: dict[str, list[tuple[nn.Module, str, bool]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        entries = [(n, t, True) for n, t in module.named_parameters(recurse=False)]
        entries += [(n, t, False) for n, t in module.named_buffers(recurse=False) if t is not None]
        for name, t, is_param in entries:
            key = first.setdefault(id(t), f"{mod_name}.{name}" if mod_name else name)
            out.setdefault(key, []).append((module, name, is_param))
    return out


def _keep(size: int, removed: list[int], name: str, dim: int) -> Tensor:
    idx = torch.tensor(removed, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise ConfigError(f"plan removes index out of range from {name} dim {dim} (size {size})")
    keep = torch.ones(size, dtype=torch.bool)
    keep[idx] = False
    if not bool(keep.any()):
        raise ConfigError(f"plan removes every position of {name} dim {dim}")
    return keep.nonzero().flatten()


def apply_plan_(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """Remove the plan's positions from ``model`` in place and fix module size attributes.

    Everything is checked before anything changes, so a plan that does not fit leaves the
    model untouched.
    """
    owners = _owners(model)
    sliced: dict[str, Tensor] = {}
    kept: dict[tuple[Any, ...], Tensor] = {}  # a group's tensors share positions
    for name, dims in plan.removed.items():
        if name not in owners:
            raise ConfigError(
                f"plan names {name!r}, which is not a parameter or buffer of {type(model).__name__}"
            )
        module, attr, _ = owners[name][0]
        t = getattr(module, attr)
        new = t.detach()
        for dim, idx in sorted(dims.items()):
            if not 0 <= dim < t.dim():
                raise ConfigError(
                    f"plan removes along dim {dim} of {name}, which has {t.dim()} dims"
                )
            key = (t.device, t.shape[dim], tuple(idx))
            if key not in kept:
                kept[key] = _keep(t.shape[dim], idx, name, dim).to(t.device)
            new = new.index_select(dim, kept[key])
        sliced[name] = new.contiguous()
    touched: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
    for name, new in sliced.items():
        for module, attr, is_param in owners[name]:
            old = getattr(module, attr)
            if id(module) not in touched:
                touched[id(module)] = (module, dict(vars(module)))
            if is_param:
                setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module._buffers[attr] = new
    # tied parameters must stay one object
    for name in sliced:
        holders = owners[name]
        first = getattr(holders[0][0], holders[0][1])
        for module, attr, is_param in holders[1:]:
            if is_param:
                setattr(module, attr, first)
    for module, old in touched.values():
        fn = _updater(module)
        if fn is not None:
            fn(module, old)
    return model


def mask_plan_(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """Zero the plan's positions in every parameter (buffers untouched): the masked model that
    a physically pruned one must match."""
    owners = _owners(model)
    with torch.no_grad():
        for name, dims in plan.removed.items():
            module, attr, is_param = owners[name][0]
            if not is_param:
                continue
            t = getattr(module, attr)
            for dim, idx in dims.items():
                t.index_fill_(dim, torch.tensor(idx, dtype=torch.long, device=t.device), 0.0)
    return model


def check_forward(model: nn.Module, run: Callable[[], Any], what: str) -> Any:
    """Run the pruned model; a failure names the model and the surgery that broke it."""
    try:
        return run()
    except Exception as exc:
        raise ModelError(
            f"{type(model).__name__} no longer runs after removing channels ({what}): {exc}. "
            "Some code in its forward uses a size that surgery cannot see; list the module "
            "in ignored_layers= to keep its channels."
        ) from exc
