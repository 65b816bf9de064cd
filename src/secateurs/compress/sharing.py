"""Weight sharing (Deep Compression, Han et al. 2016): the kept weights of a tensor are replaced
by ``2**bits`` shared values found by 1-D k-means, so each weight is stored as a ``bits``-bit
index into a small codebook. Zeros (pruned weights) stay exactly zero and take no code.

Centroids start evenly spaced between the smallest and largest kept weight (the paper's linear
initialisation, which keeps the rare large weights represented). During centroid fine-tuning the
gradient of each shared value is the sum of the gradients of the weights that use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from secateurs.compress.formats import check_bits
from secateurs.errors import ConfigError


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
        # an empty cluster keeps its centroid (it may win values later)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        updated, _ = torch.sort(updated)
        new_codes = _assign(values, updated)
        converged = torch.equal(new_codes, codes) and torch.equal(updated, centroids)
        centroids, codes = updated, new_codes
        if converged:
            break
    return SharedWeights(tuple(t.shape), centroids, codes, positions, bits)
