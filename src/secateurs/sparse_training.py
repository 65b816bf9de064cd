"""The mechanics of training sparse: moving connections, rewinding weights, resetting state.

Schedules say *when* (:mod:`secateurs.schedules`); this module says *how*, for the events that
do more than prune further:

* :func:`drop_and_grow`: in one tensor, drop the live weights of smallest magnitude and grow as
  many dead ones, at random (SET), at random among the live connections (those a gradient can
  reach), or where the dense gradient is largest (RigL). The number of live weights is
  unchanged, so the sparsity stays the one asked, layer by layer.
* :func:`redistribute`: how many weights each layer grows when the dropped ones are shared
  between layers instead (sparse momentum, Dettmers & Zettlemoyer 2019): the layers whose
  weights are still moving get more, so the per-layer densities are learnt during training.
* :class:`WeightSnapshot`: the lottery ticket's rewind point (every parameter and buffer except
  the masks), restored with the current masks applied.
* :func:`reset_optimizer_state`: a grown or rewound weight must not inherit momentum or Adam
  moments from its previous life.
* :func:`rescale_for_kept_fan_in_`: a sparse initialisation scaled for the inputs each unit
  actually keeps, so the signal does not vanish at high sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from secateurs.errors import ConfigError
from secateurs.masks import iter_masks, raw_parameter

#: Where a drop-and-grow update grows: ``random`` (anywhere dead, SET as published), ``live``
#: (at random among the dead positions whose dense gradient is nonzero, then anywhere) or
#: ``gradient`` (largest dense-gradient magnitude, RigL).
GROW_RULES = ("random", "live", "gradient")
#: The grow rules that read the dense gradient (the pruner computes it on its ``data``).
GRADIENT_RULES = ("live", "gradient")


def drop_and_grow(
    weight: Tensor,
    mask: Tensor,
    fraction: float,
    grow: str,
    *,
    gradient: Tensor | None = None,
    generator: torch.Generator | None = None,
    grow_count: int | None = None,
) -> tuple[Tensor, Tensor]:
    """New keep-mask of ``weight`` after one update, and the positions grown.

    ``k = floor(fraction * live)`` live weights with the smallest ``|weight|`` are dropped (ties
    by position), then ``k`` positions among the dead ones (just-dropped included, as in RigL)
    are grown: uniformly at random (``random``), by largest ``|gradient|`` (``gradient``), or
    (``live``) uniformly at random among the positions whose gradient is nonzero, and only when
    those run out among the rest. A zero gradient there means the weight's input is always zero
    or its output unit never gets an error signal (a dead unit, common at 99% sparsity, where
    most units of a wide layer keep no weights): a weight grown there stays at zero until the
    next update drops it again, a wasted share of the budget. ``grow_count`` grows that many
    instead of ``k`` (at most the dead positions), when layers share their drops.
    """
    if grow not in GROW_RULES:
        raise ConfigError(f"grow rule {grow!r} is unknown; allowed: {', '.join(GROW_RULES)}")
    flat_mask = mask.reshape(-1).to(torch.bool)
    live = int(flat_mask.sum())
    k = drop_count(live, fraction)
    n_grow = k if grow_count is None else grow_count
    grown = torch.zeros_like(flat_mask)
    if k == 0 and n_grow == 0:
        return flat_mask.clone().reshape(mask.shape), grown.reshape(mask.shape)
    kept = flat_mask.clone()
    if k:  # rank the live weights only, a NaN one (a diverged step) first to go
        live_at = flat_mask.nonzero().squeeze(1)
        magnitude = weight.detach().reshape(-1)[live_at.to(weight.device)].abs().float().cpu()
        kept[live_at[torch.argsort(magnitude.nan_to_num(nan=0.0), stable=True)[:k]]] = False
    if grow == "random":
        score = torch.rand(kept.shape, generator=generator)
    else:
        if gradient is None:
            raise ConfigError(f"grow rule {grow!r} needs the dense gradient of the tensor")
        dense = gradient.detach().reshape(-1).cpu()
        if grow == "gradient":
            score = dense.abs().to(torch.float32)
        else:  # live: the positions a gradient reaches score in [0, 1), the others in [-1, 0)
            score = torch.rand(kept.shape, generator=generator) - (dense == 0).to(torch.float32)
    score = torch.where(kept, torch.full_like(score, -float("inf")), score)
    n_grow = min(n_grow, int((~kept).sum()))
    chosen = torch.argsort(score, descending=True, stable=True)[:n_grow]
    grown[chosen] = True
    return (kept | grown).reshape(mask.shape), grown.reshape(mask.shape)


def random_start(
    weight: Tensor,
    survivors: Tensor,
    count: int,
    scale: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``count`` random starting values for weights grown in ``weight``: normal draws (on the
    CPU, in ``weight``'s dtype) with a standard deviation of ``scale`` times that of the
    ``survivors`` (the live weights the update kept), so a grown weight starts on the layer's
    own scale whatever its width or how far training has moved it; zeros where fewer than two
    survive. Only the grown weights are drawn, not the whole layer (at 99% sparsity an update
    moving 30% of a 4096 x 11008 projection's live weights grows about 135,000 of its 45 million
    positions)."""
    kept = weight.detach()[survivors.to(device=weight.device, dtype=torch.bool)]
    std = float(kept.float().std()) if kept.numel() > 1 else 0.0
    draws = torch.randn(count, generator=generator)
    return (draws * (scale * std)).to(weight.dtype)


def drop_count(live: int, fraction: float) -> int:
    """The number of a layer's ``live`` weights one update drops: ``floor(fraction * live)``."""
    return int(fraction * live)


def redistribute(drops: Sequence[int], scores: Sequence[float], room: Sequence[int]) -> list[int]:
    """Grow counts per layer that share ``sum(drops)`` in proportion to ``scores``.

    A layer grows at most ``room`` weights (its dead positions after the drop); what a full
    layer cannot take is shared again among the others, in the same proportions. Counts are
    whole: the largest remainders get the leftover units. Layers whose scores are all zero (or
    not finite) grow what they dropped. When every scored layer is full, the rest goes back to
    the unscored layers, each first up to what it dropped, then into any room left, so no
    dropped weight is lost while some layer has room for it.
    """
    total = sum(drops)
    weights = [s if math.isfinite(s) and s > 0 else 0.0 for s in scores]
    if sum(weights) <= 0:
        return [min(d, r) for d, r in zip(drops, room, strict=True)]
    grow = [0] * len(drops)
    open_ = [i for i, w in enumerate(weights) if w > 0 and room[i] > 0]
    left = total
    while left > 0 and open_:
        weight_sum = sum(weights[i] for i in open_)
        share = {i: left * weights[i] / weight_sum for i in open_}
        full = [i for i in open_ if share[i] >= room[i] - grow[i]]
        if full:  # cap the layers that overflow, then share the rest again
            for i in full:
                left -= room[i] - grow[i]
                grow[i] = room[i]
            open_ = [i for i in open_ if i not in full]
            continue
        whole = {i: math.floor(share[i]) for i in open_}
        for i in open_:
            grow[i] += whole[i]
        left -= sum(whole.values())
        by_remainder = sorted(open_, key=lambda i: (whole[i] - share[i], i))
        for i in by_remainder[:left]:
            grow[i] += 1
        left = 0
    for cap in (drops, room):  # leftovers of full scored layers: unscored layers, in order
        for i in range(len(grow)):
            if left <= 0:
                break
            take = min(left, max(0, min(cap[i], room[i]) - grow[i]))
            grow[i] += take
            left -= take
    return grow


def rescale_for_kept_fan_in_(weight: Tensor, mask: Tensor, transposed: bool = False) -> Tensor:
    """Multiply each output unit's kept weights by ``sqrt(fan_in / kept)`` in place.

    A dense initialisation draws weights with a variance of ``c / fan_in`` so that a unit's
    pre-activation has variance ``c`` whatever its width; masked to ``kept`` of its
    ``fan_in`` inputs, the variance falls to ``c * kept / fan_in`` and, multiplied over the
    layers, the forward signal and the backward gradient vanish. Rescaling per unit by its own
    kept fan-in restores the dense initialisation's variance (Evci et al. 2022). A unit with no
    kept input is left as it is. ``transposed``: dim 1 of ``weight`` is the output dim
    (ConvTranspose, GPT-2's ``Conv1D``). Returns ``weight``.
    """
    if weight.dim() < 2:
        return weight
    keep = mask.to(device=weight.device, dtype=torch.bool)
    w = weight.detach()
    if transposed:
        w, keep = w.transpose(0, 1), keep.transpose(0, 1)
    rows = keep.reshape(keep.shape[0], -1)
    fan_in = rows.shape[1]
    kept = rows.sum(dim=1).to(weight.dtype)
    scale = torch.where(kept > 0, (fan_in / kept.clamp(min=1)).sqrt(), torch.ones_like(kept))
    scale = scale.reshape(-1, *([1] * (w.dim() - 1)))
    with torch.no_grad():
        w.mul_(scale)
    return weight


class WeightSnapshot:
    """A copy of every parameter and buffer of a model except its masks, to rewind to.

    Tensors are remembered by identity, which survives masking (the raw parameter object is
    kept by the mask parametrization), so a rewind after pruning restores the same tensors.
    """

    def __init__(self, model: nn.Module) -> None:
        mask_ids = {id(mask) for _, _, _, mask in iter_masks(model)}
        tensors = [*model.parameters(), *(b for b in model.buffers() if id(b) not in mask_ids)]
        self.saved = [(t, t.detach().clone()) for t in tensors]

    def restore(self, model: nn.Module) -> None:
        """Copy the remembered values back, then zero what the current masks prune."""
        with torch.no_grad():
            for tensor, value in self.saved:
                tensor.copy_(value)
            for _, module, name, mask in iter_masks(model):
                raw_parameter(module, name).masked_fill_(~mask, 0)


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer | None,
    positions: Mapping[int, Tensor] | Iterable[nn.Parameter],
) -> None:
    """Zero the per-weight optimizer state (momentum, Adam moments) of some weights.

    ``positions`` maps ``id(parameter)`` to a bool tensor of the entries to reset, or is an
    iterable of parameters whose whole state is reset. Scalars (Adam's step count) are kept.
    """
    if optimizer is None:
        return
    if not isinstance(positions, Mapping):
        positions = {id(p): torch.ones_like(p, dtype=torch.bool) for p in positions}
    for group in optimizer.param_groups:
        for param in group["params"]:
            where = positions.get(id(param))
            state = optimizer.state.get(param)
            if where is None or not state:
                continue
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.masked_fill_(where.to(value.device), 0)
