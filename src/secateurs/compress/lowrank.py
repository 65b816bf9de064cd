"""Low-rank factorisation: replace a layer by two thinner ones from its truncated SVD.

A weight matrix ``W`` (``[out, in]``) of rank ``r`` costs ``r * (in + out)`` parameters as the
product of two factors instead of ``in * out``. The best rank-``r`` approximation in Frobenius
norm is the truncated SVD (Eckart–Young), whose squared error is exactly the sum of the
discarded squared singular values, so the *energy* ``sum(s[:r]**2) / sum(s**2)`` says how much
of a layer a rank keeps. Trained networks have fast-decaying spectra, which is why a much
smaller rank usually keeps almost all of a layer.

How each layer becomes two (``sqrt(S)`` is split between both factors, so they are balanced):

* ``nn.Linear(in, out)`` → ``Linear(in, r, bias=False)`` then ``Linear(r, out)`` (the bias).
* ``nn.Conv{1,2,3}d``, ``mode="channel"``: the SVD of ``W`` as ``[out, in * prod(kernel)]``
  gives a conv with the original kernel, stride, padding and dilation but only ``r`` output
  channels, then a 1x1 conv ``r → out`` carrying the bias.
* ``nn.Conv2d``, ``mode="spatial"`` (Jaderberg et al. 2014, scheme 2): the SVD of ``W``
  rearranged as ``[in * kh, out * kw]`` gives a vertical ``(kh x 1)`` conv ``in → r`` then a
  horizontal ``(1 x kw)`` conv ``r → out`` carrying the bias. The height's stride, padding and
  dilation go to the first conv, the width's to the second; because each conv touches only one
  axis, the composition is exactly the original convolution at full rank.

Only ``groups == 1`` convolutions are factorised. :func:`factorize_` applies this to a model in
place and never replaces a layer whose factorised form would not be smaller. Each layer's rank
comes from one rule:

* ``energy=e``: the smallest rank keeping at least ``e`` of the layer's ``sum(s**2)``;
* ``rank=k``: a fixed rank (``int``) or a fraction of each layer's full rank (``float``);
* ``budget=sc.Params(keep)``: the model keeps at most ``keep`` parameters (a count, or a
  fraction of its parameters; layers left as they are count as kept, as for every ``Params``
  budget). Ranks are chosen greedily by *kept energy per parameter*: every layer starts at rank 1, then the next
  singular value with the largest share of its own layer's energy (``s_i**2 / sum(s**2)``,
  so layers of different scales compare) per parameter it costs is added, for as long as the
  total fits. One step past a layer's largest useful rank turns it back into the dense layer
  (full energy, no more parameters than that step). This maximises, greedily, the sum over
  layers of the fraction of energy each keeps.

It combines with pruning: a masked layer is factorised from its effective (masked) weight, and
the factors are plain ``nn.Linear`` / ``nn.Conv*d`` modules that :func:`secateurs.prune_` can
prune afterwards (the low-rank product of a sparse matrix is dense, so the old mask is dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from secateurs.budgets import Params
from secateurs.errors import BudgetError, ConfigError, ModelError
from secateurs.masks import raw_parameter
from secateurs.provenance import record
from secateurs.selection import Candidate, Selection, Selector, matches

Mode = Literal["channel", "spatial"]

MODES: tuple[str, ...] = ("channel", "spatial")

_CONV_BY_DIM: dict[int, type[_ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# --------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class FactorizedLayer:
    """One layer that :func:`factorize_` replaced by two."""

    name: str  #: qualified module name, e.g. ``"features.0"``
    kind: str  #: ``"linear"``, ``"conv-channel"`` or ``"conv-spatial"``
    shape: tuple[int, ...]  #: the original weight's shape
    rank: int  #: the rank kept
    full_rank: int  #: the rank of the factorised matrix's full SVD, ``min`` of its two sides
    energy: float  #: fraction of the sum of squared singular values kept, in (0, 1]
    params_before: int  #: weight + bias parameters of the original layer
    params_after: int  #: weight + bias parameters of both factors


@dataclass(frozen=True)
class SkippedLayer:
    """A layer that was selected but left as it was, and why."""

    name: str
    reason: str


@dataclass
class LowRankReport:
    """What :func:`factorize_` did: each replaced layer and each skipped one with its reason."""

    mode: str  #: ``"channel"`` or ``"spatial"`` (how convolutions were split)
    rule: dict[str, float | int]  #: the rank rule, e.g. ``{"energy": 0.9}`` or ``{"params": 0.5}``
    layers: list[FactorizedLayer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        """Parameters of the replaced layers before factorisation."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the replaced layers' factors."""
        return sum(layer.params_after for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings) ready for JSON or YAML."""
        return {
            "mode": self.mode,
            "rule": dict(self.rule),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
        }


# --------------------------------------------------------------------------------------------
# one layer


def _check_mode(mode: object) -> Mode:
    if mode == "channel":
        return "channel"
    if mode == "spatial":
        return "spatial"
    raise ConfigError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")


def _effective(module: nn.Module, attr: str) -> Tensor | None:
    """``module.<attr>`` as the forward pass sees it (masked if a mask is attached), detached."""
    value = getattr(module, attr, None)
    return value.detach() if isinstance(value, Tensor) else None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVD runs in at least float32 (half precision SVD is not supported and too inexact)."""
    return torch.promote_types(dtype, torch.float32)


def _kind(module: nn.Module, mode: Mode) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    return f"conv-{mode}"


def _matrix(module: nn.Module, mode: Mode) -> Tensor:
    """The matrix whose truncated SVD gives the two factors (see the module docstring)."""
    weight = _effective(module, "weight")
    assert weight is not None
    w = weight.to(_compute_dtype(weight.dtype))
    if isinstance(module, nn.Linear):
        return w
    if mode == "channel":
        return w.reshape(w.shape[0], -1)
    out_c, in_c, kh, kw = w.shape
    # [out, in, kh, kw] -> [in, kh, out, kw]: rows index the vertical filter, columns the horizontal
    return w.permute(1, 2, 0, 3).reshape(in_c * kh, out_c * kw)


def _cost_per_rank(module: nn.Module, mode: Mode) -> int:
    """Parameters one unit of rank costs (both factors together), bias excluded."""
    weight = raw_parameter(module, "weight")
    if isinstance(module, nn.Linear):
        return module.in_features + module.out_features
    out_c, in_c, *kernel = weight.shape
    if mode == "channel":
        return in_c * math.prod(kernel) + out_c
    kh, kw = kernel
    return in_c * kh + out_c * kw


def _bias_params(module: nn.Module) -> int:
    bias = _effective(module, "bias")
    return 0 if bias is None else bias.numel()


def _weight_params(module: nn.Module) -> int:
    return raw_parameter(module, "weight").numel()


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


def _build(
    module: nn.Module, mode: Mode, svd: tuple[Tensor, Tensor, Tensor], rank: int
) -> nn.Sequential:
    """The two-layer replacement of ``module`` at ``rank`` from the SVD of :func:`_matrix`."""
    u, s, vh = svd
    root = s[:rank].sqrt()
    left = u[:, :rank] * root  # [rows, r]
    right = root[:, None] * vh[:rank]  # [r, cols]
    weight = raw_parameter(module, "weight")
    bias = _effective(module, "bias")
    device, dtype = weight.device, weight.dtype
    factory: dict[str, Any] = {"device": device, "dtype": dtype}
    first: nn.Linear | _ConvNd
    second: nn.Linear | _ConvNd
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, rank, bias=False, **factory)
        second = nn.Linear(rank, module.out_features, bias=bias is not None, **factory)
        first_w, second_w = right, left
    else:
        assert isinstance(module, _ConvNd)
        out_c, in_c, *kernel = weight.shape
        conv: Callable[..., _ConvNd] = _CONV_BY_DIM[len(kernel)]
        if mode == "channel":
            first = conv(
                in_c,
                rank,
                tuple(kernel),
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=False,
                padding_mode=module.padding_mode,
                **factory,
            )
            second = conv(rank, out_c, 1, bias=bias is not None, **factory)
            first_w = right.reshape(rank, in_c, *kernel)
            second_w = left.reshape(out_c, rank, *([1] * len(kernel)))
        else:
            kh, kw = kernel
            pad = module.padding
            pad_h: str | tuple[int, int] = pad if isinstance(pad, str) else (pad[0], 0)
            pad_w: str | tuple[int, int] = pad if isinstance(pad, str) else (0, pad[1])
            first = nn.Conv2d(
                in_c,
                rank,
                (kh, 1),
                stride=(module.stride[0], 1),
                padding=pad_h,
                dilation=(module.dilation[0], 1),
                bias=False,
                padding_mode=module.padding_mode,
                **factory,
            )
            second = nn.Conv2d(
                rank,
                out_c,
                (1, kw),
                stride=(1, module.stride[1]),
                padding=pad_w,
                dilation=(1, module.dilation[1]),
                bias=bias is not None,
                padding_mode=module.padding_mode,
                **factory,
            )
            first_w = left.T.reshape(rank, in_c, kh, 1)
            second_w = right.reshape(rank, out_c, kw).permute(1, 0, 2).reshape(out_c, rank, 1, kw)
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if bias is not None:
            assert second.bias is not None
            second.bias.copy_(bias)
    trainable = weight.requires_grad
    for p in (*first.parameters(), *second.parameters()):
        p.requires_grad_(trainable)
    result = nn.Sequential(first, second)
    result.train(module.training)
    return result


def _unsupported(module: nn.Module, mode: Mode) -> str | None:
    """Why ``module`` (a Linear or a conv) cannot be factorised in ``mode``, or ``None``."""
    if isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward:
            return f"{type(module).__name__} overrides Linear.forward; only plain Linear layers"
        if isinstance(module, nn.modules.lazy.LazyModuleMixin):
            return "uninitialised lazy layer; run one forward pass first"
        return None
    if not isinstance(module, _ConvNd):
        return f"{type(module).__name__} is neither a Linear nor a convolution"
    if module.transposed:
        return f"{type(module).__name__} (a transposed convolution) is not supported"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return "uninitialised lazy layer; run one forward pass first"
    base = _CONV_BY_DIM.get(len(module.kernel_size))
    if base is None or not isinstance(module, base) or type(module).forward is not base.forward:
        return f"{type(module).__name__} is not a plain Conv1d/Conv2d/Conv3d"
    if module.groups != 1:
        return (
            f"grouped convolution (groups={module.groups}) is not supported; "
            "only groups == 1 is factorised"
        )
    if mode == "spatial" and not isinstance(module, nn.Conv2d):
        return (
            f"mode='spatial' splits a 2-D kernel into (kh x 1) and (1 x kw); "
            f"{type(module).__name__} has a {len(module.kernel_size)}-D kernel (use mode='channel')"
        )
    return None


def _check_rank(module: nn.Module, mode: Mode, rank: object) -> tuple[int, Tensor]:
    reason = _unsupported(module, mode)
    if reason is not None:
        raise ModelError(f"cannot factorise {type(module).__name__}: {reason}")
    matrix = _matrix(module, mode)
    full = min(matrix.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise ConfigError(f"rank must be an integer in 1..{full} for this layer; got {rank!r}")
    return rank, matrix


def factorize_linear(linear: nn.Linear, rank: int) -> nn.Sequential:
    """``Linear(in, out)`` as ``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``.

    The factors come from the truncated SVD of the (effective, masked) weight, so their product
    is the best rank-``rank`` approximation of it; at ``rank = min(in, out)`` the result computes
    the same function. ``rank`` must be in ``1..min(in, out)``. Dtype, device and training mode
    are those of ``linear``, which is left unchanged.
    """
    if not isinstance(linear, nn.Linear):
        raise ModelError(f"factorize_linear needs an nn.Linear; got {type(linear).__name__}")
    rank, matrix = _check_rank(linear, "channel", rank)
    with torch.no_grad():
        return _build(linear, "channel", _svd(matrix), rank)


def factorize_conv(conv: nn.Module, rank: int, mode: Mode = "channel") -> nn.Sequential:
    """A ``groups == 1`` convolution as two thinner ones from a truncated SVD.

    ``mode="channel"`` (Conv1d/2d/3d): a conv with the original kernel and ``rank`` outputs,
    then a 1x1 conv ``rank → out``; ``rank`` in ``1..min(out, in * prod(kernel))``.
    ``mode="spatial"`` (Conv2d): a ``(kh x 1)`` conv ``in → rank`` then a ``(1 x kw)`` conv
    ``rank → out``; ``rank`` in ``1..min(in * kh, out * kw)``. At the largest rank the result
    computes the same function as ``conv``, which is left unchanged.
    """
    if not isinstance(conv, _ConvNd):
        raise ModelError(f"factorize_conv needs a convolution; got {type(conv).__name__}")
    mode = _check_mode(mode)
    rank, matrix = _check_rank(conv, mode, rank)
    with torch.no_grad():
        return _build(conv, mode, _svd(matrix), rank)


# --------------------------------------------------------------------------------------------
# rank rules


def _check_fraction(value: object, what: str, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{what} must be a number in (0, 1] ({meaning}); got {value!r}")
    return float(value)


def _check_rule(
    energy: float | None, rank: int | float | None, budget: Params | None
) -> dict[str, float | int]:
    given = {
        k: v for k, v in (("energy", energy), ("rank", rank), ("budget", budget)) if v is not None
    }
    if len(given) != 1:
        named = ", ".join(given) if given else "none"
        raise ConfigError(
            f"give exactly one of energy=, rank=, budget= (got {named}): energy keeps a "
            "fraction of each layer's squared singular values, rank fixes the rank (an int, or "
            "a float fraction of full rank), budget=sc.Params(keep) bounds the model's "
            "parameters"
        )
    ((key, value),) = given.items()
    if key == "energy":
        return {"energy": _check_fraction(value, "energy", "fraction of squared singular values")}
    if key == "budget":
        if not isinstance(value, Params):
            raise ConfigError(
                f"factorize_'s budget must be sc.Params(keep) (a count or a fraction of the "
                f"model's parameters); got {value!r}"
            )
        return {"params": value.keep}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"rank must be an int >= 1 or a float in (0, 1]; got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"rank as an integer must be >= 1; got {value!r}")
        return {"rank": value}
    return {"rank": _check_fraction(value, "rank as a float", "fraction of full rank")}


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """The smallest rank whose leading singular values keep ``energy`` of ``sum(s**2)``.

    ``singular_values`` are in descending order (as ``torch.linalg.svdvals`` returns them).
    An all-zero spectrum needs rank 1.
    """
    energy = _check_fraction(energy, "energy", "fraction of squared singular values")
    cum = singular_values.detach().double().square().cumsum(0)
    total = cum[-1]
    if total <= 0:
        return 1
    index = int(torch.searchsorted(cum, energy * total))
    return min(index + 1, cum.numel())


def _fixed_rank(rank: int | float, full_rank: int) -> int:
    """An ``int`` rank capped at ``full_rank``, or a ``float`` fraction of it rounded up."""
    if isinstance(rank, int):
        return min(rank, full_rank)
    return min(full_rank, max(1, math.ceil(rank * full_rank - 1e-9)))


def _kept_energy(singular_values: Tensor, rank: int) -> float:
    sq = singular_values.double().square()
    total = float(sq.sum())
    return 1.0 if total <= 0 else float(sq[:rank].sum()) / total


@dataclass
class _Layer:
    """A selected, factorisable layer with its SVD, before any rank is chosen."""

    name: str
    paths: list[str]  #: every qualified name the module is reachable by
    module: nn.Module
    svd: tuple[Tensor, Tensor, Tensor]
    weight_params: int
    bias_params: int
    cost: int  #: parameters per unit of rank

    @property
    def full_rank(self) -> int:
        return self.svd[1].numel()

    @property
    def max_useful_rank(self) -> int:
        """The largest rank whose factors have fewer parameters than the dense weight."""
        return (self.weight_params - 1) // self.cost


def _budget_ranks(layers: Sequence[_Layer], budget: float, why: str) -> list[int | None]:
    """Ranks that keep the layers' parameters within ``budget``; ``None`` where a layer is best
    left dense (``why`` says where the budget came from, for the error).

    Greedy by kept energy per parameter: every layer starts at rank 1; then, among all layers,
    the next singular value whose share of its own layer's energy (``s_i**2 / sum(s**2)``,
    normalising each layer so that layers of different scale compare) per parameter it costs is
    largest is added, as long as the total stays within the budget. One step past a layer's
    largest useful rank turns it back into the dense layer (full energy, and no more parameters
    than that step would have cost).
    """
    spent = sum(layer.cost + layer.bias_params for layer in layers)
    if spent > budget:
        raise BudgetError(
            f"{why} leaves {max(budget, 0):,.0f} parameters for the layers to factorise, but "
            f"rank 1 everywhere already needs {spent:,}; raise the budget"
        )
    keys: list[float] = []
    steps: list[tuple[int, int]] = []  # (layer index, rank after the step)
    for li, layer in enumerate(layers):
        sq = layer.svd[1].double().square()
        total = float(sq.sum())
        share = (sq / total if total > 0 else torch.zeros_like(sq)).tolist()
        for new_rank in range(2, min(layer.max_useful_rank + 1, layer.full_rank) + 1):
            keys.append(share[new_rank - 1] / layer.cost)
            steps.append((li, new_rank))
    order = sorted(range(len(steps)), key=lambda i: (-keys[i], steps[i]))
    ranks: list[int | None] = [1] * len(layers)
    for i in order:
        li, new_rank = steps[i]
        layer = layers[li]
        if ranks[li] != new_rank - 1:
            continue
        dense = new_rank > layer.max_useful_rank
        step_cost = layer.weight_params - (new_rank - 1) * layer.cost if dense else layer.cost
        if spent + step_cost <= budget:
            spent += step_cost
            ranks[li] = None if dense else new_rank
    return ranks


# --------------------------------------------------------------------------------------------
# whole model


def _context_reason(
    model: nn.Module, name: str, module: nn.Module, owners: dict[int, int]
) -> str | None:
    """Why a layer cannot be swapped for another module where it sits, or ``None``."""
    if not name:
        return "the model itself cannot be replaced in place; use factorize_linear/factorize_conv"
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "MultiheadAttention reads its out_proj weight directly; it cannot be replaced"
    if owners.get(id(raw_parameter(module, "weight")), 0) > 1:
        return "its weight is shared with another module (tied weights)"
    return None


def factorize_(
    model: nn.Module,
    *,
    energy: float | None = None,
    rank: int | float | None = None,
    budget: Params | None = None,
    mode: Mode = "channel",
    include: Sequence[Selector] | None = None,
    exclude: Sequence[Selector] | None = None,
) -> nn.Module:
    """Replace Linear and Conv layers of ``model`` by low-rank pairs, in place; returns it.

    Give exactly one rank rule:

    * ``energy`` in (0, 1]: each layer keeps the smallest rank whose singular values hold at
      least this fraction of its ``sum(s**2)`` (its squared Frobenius norm).
    * ``rank``: an ``int`` >= 1 is the same rank for every layer (capped at its full rank); a
      ``float`` in (0, 1] is a fraction of each layer's full rank, rounded up.
    * ``budget=sc.Params(keep)``: the whole model keeps at most ``keep`` parameters (an int
      count or a fraction; parameters outside the factorised layers count as kept); ranks are
      chosen greedily by kept energy per parameter, each layer's energy normalised to 1 (see
      the module docstring). A budget below rank 1 everywhere is a
      :class:`~secateurs.errors.BudgetError`.

    ``mode`` says how convolutions are split: ``"channel"`` (kxk conv to ``r`` channels, then
    1x1) or ``"spatial"`` (``kh x 1`` then ``1 x kw``, Conv2d only). Layers are the model's
    ``nn.Linear`` and ``nn.Conv1d/2d/3d``, optionally narrowed by ``include`` / ``exclude``
    (regexes over module names, or module types); every pattern must match a layer.

    A layer is left as it is, with the reason in :attr:`LowRankReport.skipped`, when its
    factorised form would have at least as many parameters as the layer, or when it cannot be
    factorised (grouped or transposed convs, Conv1d/3d in spatial mode, tied weights, a
    MultiheadAttention projection). Such a layer named by an ``include`` regex is an error
    instead. Masked (pruned) layers are factorised from their effective weight. Everything is
    checked and every SVD computed before the model changes, so an error leaves it untouched.
    The ranks, energies and sizes are recorded on the model:
    ``sc.report_of(model, sc.LowRankReport)``.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"factorize_ needs an nn.Module; got {type(model).__name__}")
    rule = _check_rule(energy, rank, budget)
    mode = _check_mode(mode)
    selection = Selection(include, exclude)

    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    report = LowRankReport(mode=mode, rule=rule)
    candidates: list[tuple[str, nn.Module]] = []
    names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, _ConvNd)):
            continue
        names.append(name)
        candidate = Candidate(name, f"{name}.weight", module)
        included = selection.included(candidate)
        if included is False or selection.excluded(candidate):
            continue
        reason = _unsupported(module, mode) or _context_reason(model, name, module, owners)
        if reason is not None:
            # a regex in include names this very layer (a type selects broadly: skip quietly)
            if included and any(
                isinstance(s, str) and matches(s, candidate) for s in selection.include
            ):
                raise ModelError(
                    f"{name or '(the model)'} cannot be factorised: {reason}. "
                    "Leave it out of include= or add it to exclude=."
                )
            report.skipped.append(SkippedLayer(name, reason))
            continue
        candidates.append((name, module))
    selection.check_used("Linear or Conv layer", model, names)

    layers: list[_Layer] = []
    with torch.no_grad():
        for name, module in candidates:
            cost = _cost_per_rank(module, mode)
            weight_params = _weight_params(module)
            if (weight_params - 1) // cost < 1:
                report.skipped.append(
                    SkippedLayer(
                        name,
                        f"no rank saves parameters: rank 1 costs {cost:,} parameters, "
                        f"the dense weight {weight_params:,}",
                    )
                )
                continue
            layer = _Layer(
                name=name,
                paths=paths[id(module)],
                module=module,
                svd=_svd(_matrix(module, mode)),
                weight_params=weight_params,
                bias_params=_bias_params(module),
                cost=cost,
            )
            layers.append(layer)
    if not layers:
        raise ModelError(
            f"{type(model).__name__} has no layer to factorise: "
            + (
                "; ".join(f"{s.name}: {s.reason}" for s in report.skipped)
                or "no Linear or Conv1d/2d/3d layer was selected"
            )
        )

    chosen: list[int | None]
    if budget is not None:
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        selected = sum(layer.weight_params + layer.bias_params for layer in layers)
        limit = budget.limit(total)
        why = f"{budget} keeps {limit:,} of the model's {total:,} parameters and "
        why += f"{total - selected:,} are in layers left as they are, which"
        chosen = _budget_ranks(layers, limit - (total - selected), why)
    elif "energy" in rule:
        chosen = [rank_for_energy(layer.svd[1], float(rule["energy"])) for layer in layers]
    else:
        chosen = [_fixed_rank(rule["rank"], layer.full_rank) for layer in layers]

    replacements: list[tuple[_Layer, nn.Sequential]] = []
    with torch.no_grad():
        for layer, r in zip(layers, chosen, strict=True):
            before = layer.weight_params + layer.bias_params
            if r is None or r > layer.max_useful_rank:
                step = layer.max_useful_rank + 1 if r is None else r
                why = "the params budget keeps it dense: " if r is None else ""
                report.skipped.append(
                    SkippedLayer(
                        layer.name,
                        f"{why}rank {step} of {layer.full_rank} would need "
                        f"{step * layer.cost + layer.bias_params:,} parameters, "
                        f"not fewer than the layer's {before:,}",
                    )
                )
                continue
            new = _build(layer.module, mode, layer.svd, r)
            replacements.append((layer, new))
            report.layers.append(
                FactorizedLayer(
                    name=layer.name,
                    kind=_kind(layer.module, mode),
                    shape=tuple(raw_parameter(layer.module, "weight").shape),
                    rank=r,
                    full_rank=layer.full_rank,
                    energy=_kept_energy(layer.svd[1], r),
                    params_before=before,
                    params_after=r * layer.cost + layer.bias_params,
                )
            )

    for layer, new in replacements:
        for path in layer.paths:
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.skipped.sort(key=lambda s: order.get(s.name, len(order)))
    record(model, report)
    return model


def _preview(model: nn.Module, limit: int = 8) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, _ConvNd))]
    if not names:
        return "(none)"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
