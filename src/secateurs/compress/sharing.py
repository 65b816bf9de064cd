"""Weight sharing (Deep Compression, Han et al. 2016): the kept weights of a tensor are replaced
by ``2**bits`` shared values found by 1-D k-means, so each weight is stored as a ``bits``-bit
index into a small codebook. Zeros (pruned weights) stay exactly zero and take no code.

Centroids start evenly spaced between the smallest and largest kept weight (the paper's linear
initialisation, which keeps the rare large weights represented). During centroid fine-tuning the
gradient of each shared value is the sum of the gradients of the weights that use it.

:func:`share_weights_` does this to a whole model in place: each weight becomes a
:class:`Shared` parametrization whose trainable tensor is the codebook, so any training loop
(secateurs' or the user's) fine-tunes the centroids, and autograd computes exactly the paper's
per-centroid gradient sums. :func:`secateurs.make_permanent_` bakes the shared values in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.compress.formats import check_bits
from secateurs.errors import ConfigError, ModelError
from secateurs.masks import Baked, get_mask, register_baked, remove_mask
from secateurs.selection import (
    Candidate,
    Selection,
    Selector,
    check_patterns,
    first_match,
    preview,
)


@dataclass
class SharedWeights:
    """A tensor as a codebook plus one code per kept (nonzero) weight."""

    shape: tuple[int, ...]
    codebook: Tensor  #: float32 [2**bits] shared values (sorted)
    codes: Tensor  #: int64 [nonzeros], index into ``codebook`` of each kept weight
    positions: Tensor  #: bool, shaped like the tensor: where the kept weights are
    bits: int

    def to_dense(self) -> Tensor:
        out = torch.zeros(self.shape, dtype=self.codebook.dtype)
        out[self.positions] = self.codebook[self.codes]
        return out

    def centroid_grad(self, grad: Tensor) -> Tensor:
        """Gradient of each shared value: the sum of the gradients of the weights using it."""
        flat = grad.detach().to(self.codebook.dtype)[self.positions]
        return torch.zeros_like(self.codebook).index_add_(0, self.codes, flat)


def _assign(values: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of each value (centroids sorted): bucketize on the midpoints."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(values, midpoints)


def share_weights(t: Tensor, bits: int = 5, iterations: int = 30) -> SharedWeights:
    """Cluster the nonzero weights of ``t`` into ``2**bits`` shared values by 1-D k-means."""
    bits = check_bits(bits, "weight-sharing bits")
    if iterations < 1:
        raise ConfigError(f"k-means iterations must be >= 1; got {iterations}")
    positions = t.detach() != 0
    values = t.detach()[positions].to(torch.float32)
    k = 1 << bits
    if values.numel() == 0:
        return SharedWeights(
            tuple(t.shape), torch.zeros(k), torch.zeros(0, dtype=torch.int64), positions, bits
        )
    centroids = torch.linspace(float(values.min()), float(values.max()), k)
    codes = _assign(values, centroids)
    for _ in range(iterations):
        sums = torch.zeros(k).index_add_(0, codes, values)
        counts = torch.bincount(codes, minlength=k).to(torch.float32)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            # An empty cluster moves to the worst-represented values: pruning leaves a gap
            # around zero, and centroids spread over it would otherwise stay unused.
            error = (values - centroids[codes]).abs()
            worst = torch.topk(error, min(empty.numel(), values.numel())).indices
            updated[empty[: worst.numel()]] = values[worst]
        updated, _ = torch.sort(updated)
        new_codes = _assign(values, updated)
        converged = torch.equal(new_codes, codes) and torch.equal(updated, centroids)
        centroids, codes = updated, new_codes
        if converged:
            break
    return SharedWeights(tuple(t.shape), centroids, codes, positions, bits)


class Shared(Baked):
    """Parametrization ``weight = table[index]``: a trainable codebook, fixed assignments.

    ``index`` holds, for every weight, its centroid (``0 .. 2**bits - 1``) or ``2**bits`` for a
    pruned weight; the table is the codebook followed by one constant zero, so pruned weights
    stay exactly zero and get no gradient. The registered original is the codebook.
    """

    index: Tensor
    fallback: Tensor

    def __init__(self, shared: SharedWeights) -> None:
        super().__init__()
        k = shared.codebook.numel()
        index = torch.full(shared.shape, k, dtype=torch.int32)
        index[shared.positions] = shared.codes.to(torch.int32)
        self.register_buffer("index", index)
        self.register_buffer("fallback", shared.codebook.clone())
        self.bits = shared.bits

    def forward(self, codebook: Tensor) -> Tensor:
        table = torch.cat([codebook, codebook.new_zeros(1)])
        return table.index_select(0, self.index.reshape(-1)).view(self.index.shape)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """The codebook that best reproduces ``weight``: the mean of the weights of each centroid
        (a centroid nobody uses keeps its value)."""
        k = self.fallback.numel()
        flat = self.index.reshape(-1).to(torch.int64)
        kept = flat < k
        values = weight.detach().reshape(-1)[kept].to(self.fallback.dtype)
        sums = torch.zeros_like(self.fallback).index_add_(0, flat[kept], values)
        counts = torch.bincount(flat[kept], minlength=k).to(self.fallback.dtype)
        codebook = torch.where(counts > 0, sums / counts.clamp_min(1), self.fallback)
        return codebook.to(weight.dtype)

    def shared(self, codebook: Tensor) -> SharedWeights:
        """The :class:`SharedWeights` this parametrization currently represents."""
        k = codebook.numel()
        positions = self.index != k
        codes = self.index[positions].to(torch.int64)
        return SharedWeights(
            tuple(self.index.shape),
            codebook.detach().float().cpu(),
            codes.cpu(),
            positions.cpu(),
            self.bits,
        )


def get_shared(module: nn.Module, name: str) -> SharedWeights | None:
    """The shared representation of ``module.<name>``, or ``None`` when it is not shared."""
    if not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]  # type: ignore[index]
    assert isinstance(plist, nn.ModuleList)
    for p in plist:
        if isinstance(p, Shared):
            original = plist.original
            assert isinstance(original, Tensor)
            return p.shared(original)
    return None


#: Layer kinds and the weight-sharing bits Deep Compression uses for them.
DEFAULT_BITS = {"conv": 8, "fc": 5}


def layer_kind(module: nn.Module) -> str:
    """``"conv"`` for convolutions, ``"fc"`` for everything else (Linear, Embedding, ...)."""
    base = parametrize.type_before_parametrizations(module)
    return "conv" if issubclass(base, nn.modules.conv._ConvNd) else "fc"


def bits_for(
    name: str, module: nn.Module, bits: Mapping[str, int], layer_bits: Mapping[str, int]
) -> int:
    """Bits for tensor ``name``: its ``layer_bits`` entry (exact name, else the first regex
    matching the tensor or its module's name), else by layer kind."""
    found = first_match(layer_bits, name, name.rpartition(".")[0])
    if found is not None:
        return check_bits(found[1], f"weight-sharing bits for {found[0]!r}")
    return check_bits(bits[layer_kind(module)], f"weight-sharing bits for {layer_kind(module)}")


def check_layer_bits(layer_bits: Mapping[str, int], names: Sequence[str]) -> None:
    """Every ``layer_bits`` key is a valid pattern that names one of the weights ``names``."""
    check_patterns(layer_bits, "layer_bits")
    for pattern in layer_bits:
        if not any(first_match({pattern: 0}, n, n.rpartition(".")[0]) for n in names):
            raise ConfigError(
                f"layer_bits pattern {pattern!r} matches no shareable weight; "
                f"weights: {preview(names)}"
            )


def sharable(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, module, attribute)`` of the weights weight sharing applies to: the
    ``weight`` of every Linear, convolution and Embedding."""
    kinds = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
    out = []
    for module_name, module in model.named_modules():
        if issubclass(parametrize.type_before_parametrizations(module), kinds):
            out.append((f"{module_name}.weight" if module_name else "weight", module, "weight"))
    return out


def share_weights_(
    model: nn.Module,
    bits: Mapping[str, int] | None = None,
    layer_bits: Mapping[str, int] | None = None,
    include: Sequence[Selector] | Selector | None = None,
    exclude: Sequence[Selector] | Selector | None = None,
    iterations: int = 30,
) -> nn.Module:
    """Replace each weight of ``model`` by shared values, in place; returns ``model``.

    ``bits`` maps layer kinds (``conv``, ``fc``) to bits and defaults to Deep Compression's
    8 and 5; ``layer_bits`` maps layer names or regexes over tensor or module names to bits and
    wins over the kind; ``include`` / ``exclude`` select the layers as everywhere in secateurs
    (regexes, module types or modules; see :mod:`secateurs.selection`). Each weight's bits are
    on its parametrization afterwards (:func:`get_shared`). A masked weight has its mask
    baked in first (its zeros are kept). Everything is checked and clustered before the model is
    changed. Train the model afterwards to fine-tune the centroids, then
    :func:`secateurs.make_permanent_` (or :func:`secateurs.save_compressed`).
    """
    kind_bits = {**DEFAULT_BITS, **(bits or {})}
    unknown = sorted(set(kind_bits) - set(DEFAULT_BITS))
    if unknown:
        raise ConfigError(f"unknown layer kind(s) {unknown} in bits; allowed: conv, fc")
    layer_bits = dict(layer_bits or {})
    candidates = sharable(model)
    names = [n for n, _, _ in candidates]
    check_layer_bits(layer_bits, names)
    selection = Selection(include, exclude)
    planned: list[tuple[str, nn.Module, str, SharedWeights]] = []
    for name, module, attr in candidates:
        if not selection.picks(Candidate(name.rpartition(".")[0], name, module)):
            continue
        if parametrize.is_parametrized(module, attr) and get_mask(module, attr) is None:
            raise ModelError(
                f"{name} already carries a parametrization that is not a secateurs mask "
                "(weights already shared?); call secateurs.make_permanent_ first"
            )
        n_bits = bits_for(name, module, kind_bits, layer_bits)
        shared = share_weights(getattr(module, attr).detach().float().cpu(), n_bits, iterations)
        planned.append((name, module, attr, shared))
    selection.check_used("shareable weight", model, names)
    if not planned:
        raise ModelError(
            f"{type(model).__name__} has no Linear, convolution or Embedding weight to share"
        )
    for _, module, attr, shared in planned:
        weight = getattr(module, attr)
        remove_mask(module, attr)
        param = Shared(shared).to(weight.device)
        register_baked(module, attr, param)
    return model
