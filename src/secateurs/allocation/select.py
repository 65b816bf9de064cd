"""Exact selection of the lowest-scoring groups across many tensors, with little memory.

Given per-layer group scores (computed on demand, one layer at a time) and a number ``k`` of
elements to prune, find the groups to prune. The result equals a stable sort of all scores,
layer after layer, cut where the pruned element count is closest to ``k``, but it never holds
all scores at once: scores are mapped to order-preserving int32 keys, a first pass histograms
their high 16 bits to find the bucket where the cut falls, and a second pass builds the masks,
pruning everything below that bucket and collecting the (few) groups inside it, which are then
sorted exactly. Scores are recomputed per pass instead of being stored, which keeps global
pruning of a 100M-parameter model within a fraction of the weights' own memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from secateurs.errors import ModelError
from secateurs.structures import GroupScores

CHUNK = 1 << 20
_BINS = 1 << 16
#: Pools with at most this many groups are cut with one stable sort (same result, less work).
SORT_LIMIT = 1 << 20

ScoreFn = Callable[[], GroupScores]


def ordered_keys(scores: Tensor) -> Tensor:
    """int32 keys whose signed order equals the float32 order of ``scores`` (no NaN)."""
    return _Workspace(scores.numel()).keys(scores.reshape(-1))


class _Workspace:
    """Reused int32/bool buffers for one chunk, so the passes allocate (almost) nothing.

    Many short-lived chunk-sized temporaries fragment the C heap and inflate the process's
    resident memory well beyond what is live; writing into fixed buffers avoids that.
    """

    def __init__(self, size: int) -> None:
        self._plus_zero = torch.empty(size, dtype=torch.float32)
        self._keys = torch.empty(size, dtype=torch.int32)
        self._tmp = torch.empty(size, dtype=torch.int32)
        self._flag = torch.empty(size, dtype=torch.bool)

    def keys(self, scores: Tensor) -> Tensor:
        n = scores.numel()
        # adding +0.0 turns -0.0 into +0.0, which must tie with it (its bits differ)
        plus_zero = torch.add(scores, 0.0, out=self._plus_zero[:n])
        bits, keys, tmp = plus_zero.view(torch.int32), self._keys[:n], self._tmp[:n]
        # negative floats: flip the 31 magnitude bits so that a larger magnitude sorts lower
        torch.bitwise_right_shift(bits, 31, out=tmp)
        tmp.bitwise_and_(0x7FFFFFFF)
        return torch.bitwise_xor(bits, tmp, out=keys)

    def high(self, keys: Tensor) -> Tensor:
        """Bucket index in [0, 65536): the key's high 16 bits, offset to be non-negative."""
        high = self._tmp[: keys.numel()]
        torch.bitwise_right_shift(keys, 16, out=high)
        return high.add_(32768)

    def equal(self, x: Tensor, value: int) -> Tensor:
        return torch.eq(x, value, out=self._flag[: x.numel()])


def _sizes(g: GroupScores, index: Tensor) -> Tensor:
    """Sizes (float64) of the groups at ``index``."""
    if isinstance(g.sizes, int):
        return torch.full((index.numel(),), g.sizes, dtype=torch.float64)
    return g.sizes[index].to(torch.float64)


def _check_scores(scores: Tensor) -> None:
    if scores.numel() and not bool(scores.max() < float("inf")):
        raise ModelError("a criterion produced NaN or +inf scores; check the model's weights")


def _histogram(fns: Sequence[ScoreFn]) -> Tensor:
    """Element-weighted histogram of the high 16 key bits over every layer's groups."""
    hist = torch.zeros(_BINS, dtype=torch.float64)
    work = _Workspace(CHUNK)
    for fn in fns:
        g = fn()
        _check_scores(g.scores)
        for start in range(0, g.scores.numel(), CHUNK):
            high = work.high(work.keys(g.scores[start : start + CHUNK]))
            if isinstance(g.sizes, int):
                hist += torch.bincount(high, minlength=_BINS).to(torch.float64) * g.sizes
            else:
                weights = g.sizes[start : start + CHUNK].to(torch.float64)
                hist += torch.bincount(high, weights=weights, minlength=_BINS)
        del g  # free this layer's scores before the next layer's are computed
    return hist


def _select_by_sort(fns: Sequence[ScoreFn], counts: list[int], k: int) -> list[Tensor]:
    """The same cut as the radix path, by one stable sort of every score (small pools)."""
    groups = [fn() for fn in fns]
    for g in groups:
        _check_scores(g.scores)
    scores = torch.cat([g.scores.reshape(-1) + 0.0 for g in groups])
    sizes = torch.cat([_sizes(g, torch.arange(g.scores.numel())) for g in groups])
    order = torch.argsort(scores, stable=True)
    cuts = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sizes[order], 0)])
    take = int(torch.argmin((cuts - k).abs()))
    prune = torch.zeros(scores.numel(), dtype=torch.bool)
    prune[order[:take]] = True
    return list(prune.split(counts))


def select_lowest(fns: Sequence[ScoreFn], k: int) -> list[Tensor]:
    """Bool "prune" vectors over each layer's groups, pruning the ``k`` lowest-scoring elements.

    Ties are broken by position (layer order, then index), and the cut is the one whose element
    count is closest to ``k`` (the smaller on a draw). ``fns[i]()`` must return the same
    :class:`GroupScores` each time it is called.
    """
    if k <= 0:
        return [torch.zeros(fn().scores.numel(), dtype=torch.bool) for fn in fns]
    counts = [fn().scores.numel() for fn in fns]
    if sum(counts) <= SORT_LIMIT:
        return _select_by_sort(fns, counts, k)
    cum = torch.cumsum(_histogram(fns), 0)
    bucket = min(
        int(torch.searchsorted(cum, torch.tensor([float(k)], dtype=torch.float64))), _BINS - 1
    )
    below = float(cum[bucket - 1]) if bucket else 0.0
    bound = (bucket - 32768) << 16  # smallest key inside the bucket
    out: list[Tensor] = []
    cand_layer: list[Tensor] = []
    cand_index: list[Tensor] = []
    cand_low: list[Tensor] = []
    cand_size: list[Tensor] = []
    work = _Workspace(CHUNK)
    for layer, fn in enumerate(fns):
        g = fn()
        prune = torch.empty(g.scores.numel(), dtype=torch.bool)
        for start in range(0, g.scores.numel(), CHUNK):
            keys = work.keys(g.scores[start : start + CHUNK])
            torch.lt(keys, bound, out=prune[start : start + CHUNK])
            inside = work.equal(work.high(keys), bucket).nonzero().flatten()
            if inside.numel():
                cand_index.append(inside + start)
                cand_low.append(keys[inside] & 0xFFFF)
                cand_size.append(_sizes(g, inside + start))
                cand_layer.append(torch.full_like(inside, layer))
        out.append(prune)
        del g  # free this layer's scores before the next layer's are computed
    if cand_index:
        low = torch.cat(cand_low)
        order = torch.argsort(low, stable=True)  # candidates were gathered in position order
        cum_sizes = torch.cumsum(torch.cat(cand_size)[order], 0)
        cuts = below + torch.cat([torch.zeros(1, dtype=torch.float64), cum_sizes])
        take = int(torch.argmin((cuts - k).abs()))
        chosen = order[:take]
        layers, indices = torch.cat(cand_layer)[chosen], torch.cat(cand_index)[chosen]
        for layer in layers.unique().tolist():
            out[layer][indices[layers == layer]] = True
    return out
