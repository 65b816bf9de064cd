"""Layer-wise one-shot pruning from calibration activations: the numerical core.

A linear layer ``y = x W^T`` pruned to ``W'`` loses ``||X W^T - X W'^T||^2`` on calibration
inputs ``X`` (rows ``x_i``). Row by row of ``W`` this is the quadratic form ``d H d^T`` with
``d = w - w'`` and the layer Hessian ``H = 2/n X^T X`` (Hassibi & Stork's Optimal Brain
Surgeon; LeCun's OBD is its diagonal). Everything here is a pure tensor function of ``W`` and
statistics of ``X``:

* :class:`HessianAccumulator` folds calibration batches into ``H`` and the per-input-column
  sums of squares (what Wanda needs).
* :func:`wanda_scores`: ``|W_ij| * ||X_j||_2`` (Sun et al. 2023), no weight update.
* :func:`sparsegpt_`: SparseGPT (Frantar & Alistarh 2023), one Cholesky factor shared by all
  rows, columns swept left to right, each pruned weight's error spread over the columns to its
  right. ``O(in^3 + out * in^2)``; the method for large layers.
* :func:`obs_`: exact greedy OBS per row (OBC, Frantar et al. 2022), every row with its own
  inverse Hessian, ``O(in^3 + out * k^2 * in)`` for ``k`` removals per row; for small layers.
* :func:`reconstruction_error`: the relative output error, computed through ``H``.
* :func:`unfold_conv_inputs`: im2col, so a ``Conv2d`` weight viewed as ``[out, in*kh*kw]``
  works with the same functions.

Solvers work in float32 (float64 when the weight or the Hessian is float64) whatever the
weight's dtype, on a copy: ``weight`` is written back, in its own dtype, only on success.
Masks are ``bool`` with ``True`` = kept, as everywhere in secateurs. Inputs that were always
zero in the calibration data (``H_jj == 0``) lose their weights whatever the mask says: they
cannot affect the error, and SparseGPT's reference implementation does the same.

Neither solver is guaranteed to beat magnitude or Wanda beyond one removal per row (where OBS
is optimal): SparseGPT in particular can, on a rare badly conditioned layer, end worse than
magnitude pruning (tests/test_hessian_solvers.py pins a 14x case). A caller that cares can
compare candidates cheaply with :func:`reconstruction_error`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateurs.checks import check_nonnegative
from secateurs.distributed import all_reduce_sum_, is_distributed
from secateurs.errors import ConfigError, ModelError

__all__ = [
    "OBS_CHUNK_BYTES_CPU",
    "OBS_CHUNK_BYTES_GPU",
    "OBS_MAX_IN_FEATURES",
    "HessianAccumulator",
    "obs_",
    "reconstruction_error",
    "sparsegpt_",
    "unfold_conv_inputs",
    "wanda_scores",
]

#: Widest layer :func:`obs_` accepts: its cost grows as ``out * in^3 * sparsity^2``.
OBS_MAX_IN_FEATURES = 4096
#: Working set :func:`obs_` gives a chunk of rows when ``row_chunk`` is None, on CPU (small
#: enough to stay in cache, which is what its memory-bound inner loop needs) and on GPU.
OBS_CHUNK_BYTES_CPU = 8 * 2**20
OBS_CHUNK_BYTES_GPU = 2**30


# -- calibration statistics ----------------------------------------------------------------


class HessianAccumulator:
    """Running ``H = 2/n * sum_i x_i x_i^T`` and ``sum_i x_ij^2`` over calibration inputs.

    ``H`` is kept as a running mean, as SparseGPT does, so its scale (and the meaning of a
    relative dampening) does not depend on how much calibration data was seen. The column sums
    of squares are plain sums so that :meth:`column_norms` is Wanda's ``||X_j||_2``.

    ``dtype`` is float32 or float64 (float64 for very long calibration runs or tests).
    ``track_hessian=False`` keeps only the column sums (``O(in)`` instead of ``O(in^2)``
    memory and time), enough for :func:`wanda_scores`.
    """

    def __init__(
        self,
        in_features: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        track_hessian: bool = True,
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ConfigError(f"in_features must be a positive int; got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"HessianAccumulator dtype must be float32 or float64; got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self._h: Tensor | None = (
            torch.zeros(in_features, in_features, dtype=dtype, device=device)
            if track_hessian
            else None
        )
        self._sq = torch.zeros(in_features, dtype=dtype, device=device)
        self._n = 0

    @property
    def samples(self) -> int:
        """How many input rows have been added."""
        return self._n

    @property
    def tracks_hessian(self) -> bool:
        """Whether :meth:`hessian` is available (``track_hessian=True`` at construction)."""
        return self._h is not None

    @property
    def device(self) -> torch.device:
        return self._sq.device

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Fold in inputs ``x`` of shape ``[..., in_features]`` (leading dims are rows)."""
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ConfigError(
                f"inputs must have shape [..., {self.in_features}] (the layer's in_features); "
                f"got {tuple(x.shape)}"
            )
        rows = x.detach().reshape(-1, self.in_features).to(device=self.device, dtype=self.dtype)
        b = rows.shape[0]
        if b == 0:
            return
        total = self._n + b
        if self._h is not None:
            self._h.mul_(self._n / total)
            self._h.addmm_(rows.T, rows, alpha=2.0 / total)
        self._sq.add_(rows.square().sum(0))
        self._n = total

    @torch.no_grad()
    def all_reduce_(self) -> None:
        """Combine with the same accumulator on every other rank, in place (a no-op in one
        process): afterwards every rank holds the statistics of all the ranks' inputs.

        ``H`` is a running mean, so it is weighted back into a sum (``H * n``) before the
        ranks' sums are added, then divided by the total number of rows; the column sums of
        squares and the row counts simply add. A rank that saw no row contributes nothing.
        """
        if not is_distributed():
            return
        count = torch.tensor([float(self._n)], dtype=torch.float64, device=self.device)
        if self._h is not None:
            self._h.mul_(self._n)
        all_reduce_sum_([t for t in (self._h, self._sq, count) if t is not None])
        self._n = round(float(count))
        if self._h is not None and self._n:
            self._h.div_(self._n)

    def hessian(self) -> Tensor:
        """``2/n X^T X``, ``[in, in]`` (a copy)."""
        if self._h is None:
            raise ConfigError(
                "this HessianAccumulator was built with track_hessian=False; build it with "
                "track_hessian=True to use SparseGPT or OBS"
            )
        self._need_samples()
        return self._h.clone()

    def column_norms(self) -> Tensor:
        """``||X_j||_2`` per input column, ``[in]``."""
        self._need_samples()
        return self._sq.sqrt()

    def _need_samples(self) -> None:
        if self._n == 0:
            raise ConfigError(
                "no calibration inputs were added; call add() with at least one batch first"
            )


# -- scores --------------------------------------------------------------------------------


def wanda_scores(weight: Tensor, column_norms: Tensor) -> Tensor:
    """Wanda's importance ``|W_ij| * ||X_j||_2``, float32 ``[out, in]``.

    Wanda compares scores within each output row (see Sun et al. 2023); the caller chooses.
    """
    if weight.ndim != 2:
        raise ConfigError(f"weight must be 2-D [out, in]; got shape {tuple(weight.shape)}")
    if column_norms.shape != (weight.shape[1],):
        raise ConfigError(
            f"column_norms must have shape [{weight.shape[1]}] (weight's in_features); "
            f"got {tuple(column_norms.shape)}"
        )
    return weight.detach().abs().float() * column_norms.detach().float().to(weight.device)


# -- shared validation and linear algebra --------------------------------------------------


def _check_layer(weight: Tensor, hessian: Tensor) -> tuple[int, int]:
    if weight.ndim != 2 or weight.numel() == 0:
        raise ConfigError(
            f"weight must be a non-empty 2-D tensor [out, in] (view a conv weight as "
            f"[out, in*kh*kw]); got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise ConfigError(f"weight must be floating point; got {weight.dtype}")
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ConfigError(
            f"hessian must have shape [{in_f}, {in_f}] (weight's in_features squared); "
            f"got {tuple(hessian.shape)}"
        )
    if not hessian.is_floating_point():
        raise ConfigError(f"hessian must be floating point; got {hessian.dtype}")
    if hessian.device != weight.device:
        raise ConfigError(
            f"weight and hessian must be on the same device; got {weight.device} and "
            f"{hessian.device}"
        )
    return out_f, in_f


def _check_pattern(sparsity: float | None, n: int, m: int, in_f: int) -> bool:
    """Validate the target; True for N:M, False for unstructured."""
    nm_given = n != 0 or m != 0
    if (sparsity is None) == (not nm_given):
        raise ConfigError(
            "give exactly one of sparsity (unstructured, a fraction in [0, 1)) or n and m "
            f"(keep n of every m consecutive inputs); got sparsity={sparsity!r}, n={n!r}, m={m!r}"
        )
    if sparsity is not None:
        if (
            isinstance(sparsity, bool)
            or not isinstance(sparsity, int | float)
            or not 0.0 <= sparsity < 1.0
        ):
            raise ConfigError(f"sparsity must be a number in [0, 1); got {sparsity!r}")
        return False
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (n, m)) or not 0 < n < m:
        raise ConfigError(f"N:M needs integers 0 < n < m (e.g. n=2, m=4); got n={n!r}, m={m!r}")
    if in_f % m:
        raise ConfigError(
            f"N:M with m={m} needs in_features divisible by m; this layer has {in_f} inputs"
        )
    return True


def _check_dampening(dampening: float) -> None:
    check_nonnegative(dampening, "dampening", " (a fraction of mean(diag H), e.g. 0.01)")


def _work_dtype(weight: Tensor, hessian: Tensor) -> torch.dtype:
    if torch.float64 in (weight.dtype, hessian.dtype):
        return torch.float64
    return torch.float32


def _cholesky_failure(what: str, dampening: float) -> ModelError:
    return ModelError(
        f"the layer Hessian is not positive definite ({what} failed even with dampening="
        f"{dampening}); raise dampening (e.g. 0.1) or calibrate on more data (at least as many "
        f"input rows as the layer has inputs)"
    )


def _prepare(w: Tensor, h: Tensor, dampening: float) -> Tensor:
    """Zero the weights of dead inputs in ``w``, in place, and return the dampened ``H^-1``.

    A dead input (``H_jj == 0``: always zero in the calibration data) cannot be seen in the
    error, so its weights go and its diagonal entry becomes 1 to keep ``H`` invertible.
    """
    if not bool(torch.isfinite(h).all()):
        raise ModelError(
            "the layer Hessian contains NaN or inf (non-finite calibration activations); "
            "check the calibration data and the model's outputs on it"
        )
    if not bool(torch.isfinite(w).all()):
        raise ModelError("the weight contains NaN or inf; nothing can be pruned from it reliably")
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    w[:, dead] = 0.0
    diag.add_(dampening * float(diag.mean()))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise _cholesky_failure("Cholesky factorisation of H", dampening)
    # L^-1 by triangular solve, then L^-T L^-1: same as cholesky_inverse, which is pathologically
    # slow on some CPU LAPACK builds (seconds for in=784)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    linv = torch.linalg.solve_triangular(chol, eye, upper=False)
    hinv = linv.mT @ linv
    if not bool(torch.isfinite(hinv).all()):
        raise _cholesky_failure("inverting H", dampening)
    return hinv


def _write_back(weight: Tensor, w: Tensor) -> None:
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))


# -- SparseGPT -----------------------------------------------------------------------------


@torch.no_grad()
def sparsegpt_(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float | None = None,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> Tensor:
    """Prune ``weight`` ``[out, in]`` in place with SparseGPT; return the keep-mask.

    ``hessian`` is ``[in, in]`` (:meth:`HessianAccumulator.hessian`). ``dampening *
    mean(diag H)`` is added to the diagonal; ``U`` is the upper Cholesky factor of
    ``(H + damp)^-1``. Columns are processed in blocks of ``blocksize`` with lazy batch
    updates; within a block, column ``i``'s pruning error is spread over the columns to its
    right along row ``i`` of ``U`` (the OBS update on the remaining columns), and the error of
    the whole block is applied to the columns after it at the end of the block.

    The mask is chosen within each block, on the weights as updated by the earlier blocks, by
    ``w^2 / U_ii^2``:

    * unstructured (``sparsity``): block ``[i1, i2)`` prunes exactly
      ``round(sparsity * out * i2) - round(sparsity * out * i1)`` weights (its share, up to
      one weight), so the layer loses exactly ``round(sparsity * out * in)``; rows may differ.
    * N:M (``n``, ``m``): each row keeps the ``n`` largest of every ``m`` consecutive inputs,
      the group being scored when the sweep reaches it. ``blocksize`` is rounded down to a
      multiple of ``m`` (at least ``m``) so that groups never straddle blocks.

    Computes in float32 (float64 if ``weight`` or ``hessian`` is float64); ``weight`` is
    written back in its own dtype only on success. Memory: a few ``[in, in]`` and ``[out, in]``
    work tensors.

    Raises :class:`~secateurs.errors.ConfigError` for bad arguments and
    :class:`~secateurs.errors.ModelError` when ``H`` is not positive definite even after
    dampening; ``weight`` is then untouched.
    """
    out_f, in_f = _check_layer(weight, hessian)
    structured = _check_pattern(sparsity, n, m, in_f)
    _check_dampening(dampening)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ConfigError(f"blocksize must be a positive int (e.g. 128); got {blocksize!r}")
    dtype = _work_dtype(weight, hessian)
    w = weight.detach().to(dtype=dtype, copy=True)
    h = hessian.detach().to(dtype=dtype, copy=True)
    hinv = _prepare(w, h, dampening)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(u).all()):
        raise _cholesky_failure("Cholesky factorisation of H^-1", dampening)

    pruned = torch.zeros(out_f, in_f, dtype=torch.bool, device=w.device)
    step = max(m, blocksize // m * m) if structured else blocksize
    for i1 in range(0, in_f, step):
        i2 = min(i1 + step, in_f)
        w1 = w[:, i1:i2]
        u1 = u[i1:i2, i1:i2]
        d2 = u1.diagonal().square()
        p1 = torch.zeros_like(w1, dtype=torch.bool)
        err = torch.zeros_like(w1)
        if not structured:
            assert sparsity is not None
            k = round(sparsity * out_f * i2) - round(sparsity * out_f * i1)
            if k > 0:
                order = torch.argsort((w1.square() / d2).flatten(), stable=True)
                p1.view(-1)[order[:k]] = True
        for i in range(i2 - i1):
            if structured and i % m == 0:
                score = w1[:, i : i + m].square() / d2[i : i + m]
                drop = torch.argsort(score, dim=1, stable=True)[:, : m - n]
                p1[:, i : i + m].scatter_(1, drop, True)
            e = torch.where(p1[:, i], w1[:, i], 0.0) / u1[i, i]
            w1[:, i:].sub_(e[:, None] * u1[i, i:][None, :])
            err[:, i] = e
        w1.masked_fill_(p1, 0.0)
        pruned[:, i1:i2] = p1
        if i2 < in_f:
            w[:, i2:].sub_(err @ u[i1:i2, i2:])

    if not bool(torch.isfinite(w).all()):
        raise _cholesky_failure("the SparseGPT update (non-finite result)", dampening)
    _write_back(weight, w)
    return ~pruned


# -- exact OBS (OBC) -----------------------------------------------------------------------


@torch.no_grad()
def obs_(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float | None = None,
    n: int = 0,
    m: int = 0,
    dampening: float = 0.01,
    row_chunk: int | None = None,
) -> Tensor:
    """Prune ``weight`` ``[out, in]`` in place by exact greedy OBS per row; return the keep-mask.

    Every row has its own inverse Hessian, starting from the dampened ``H^-1``. Repeatedly,
    among the row's live weights, the one with the smallest saliency ``w_q^2 / [H^-1]_qq``
    goes, the row gets the OBS update ``w -= w_q / [H^-1]_qq * H^-1[:, q]``, and ``q`` is
    eliminated from its ``H^-1`` (``H^-1 -= H^-1[:, q] H^-1[q, :] / [H^-1]_qq``, the inverse of
    ``H`` without row and column ``q``). This is OBC (Frantar et al. 2022): optimal for one
    removal, greedy after; unlike :func:`sparsegpt_` every update reaches all live columns.

    * unstructured: every row loses exactly ``round(sparsity * in)`` weights.
    * N:M: only weights whose group of ``m`` still has more than ``n`` live are candidates,
      so every row ends with exactly ``n`` of every ``m``.

    A row's inverse is kept implicitly as ``H^-1`` minus the ``t`` rank-one eliminations so far
    (a pivoted Cholesky factorisation of ``H^-1``): with ``k`` removals per row, time is
    ``O(in^3 + out * k^2 * in)`` and memory ``row_chunk * k * in`` numbers (4 bytes each, 8 in
    float64) besides ``H^-1``. ``row_chunk=None`` picks as many rows as fit in
    :data:`OBS_CHUNK_BYTES_CPU` (cache-sized: the loop is memory-bound) or
    :data:`OBS_CHUNK_BYTES_GPU`. Layers wider than :data:`OBS_MAX_IN_FEATURES` inputs are
    refused: use :func:`sparsegpt_`. Precision, write-back and errors as :func:`sparsegpt_`.
    """
    out_f, in_f = _check_layer(weight, hessian)
    structured = _check_pattern(sparsity, n, m, in_f)
    _check_dampening(dampening)
    if row_chunk is not None and (
        isinstance(row_chunk, bool) or not isinstance(row_chunk, int) or row_chunk < 1
    ):
        raise ConfigError(
            f"row_chunk must be a positive int or None (automatic); got {row_chunk!r}"
        )
    if in_f > OBS_MAX_IN_FEATURES:
        raise ModelError(
            f"exact OBS is limited to layers with at most {OBS_MAX_IN_FEATURES} inputs (its cost "
            f"grows as out * in^3); this one has {in_f}: use sparsegpt_ instead"
        )
    dtype = _work_dtype(weight, hessian)
    w = weight.detach().to(dtype=dtype, copy=True)
    h = hessian.detach().to(dtype=dtype, copy=True)
    hinv = _prepare(w, h, dampening)

    if structured:
        k = in_f // m * (m - n)
    else:
        assert sparsity is not None
        k = round(sparsity * in_f)
    if row_chunk is None:
        budget = OBS_CHUNK_BYTES_CPU if w.device.type == "cpu" else OBS_CHUNK_BYTES_GPU
        row_chunk = max(1, budget // (max(k, 1) * in_f * hinv.element_size()))
    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=w.device)
    inf = torch.tensor(math.inf, dtype=dtype, device=w.device)
    for r0 in range(0, out_f, row_chunk):
        r1 = min(r0 + row_chunk, out_f)
        _obs_rows(w[r0:r1], keep[r0:r1], hinv, k, n if structured else 0, m, inf, dampening)

    _write_back(weight, w)
    return keep


def _obs_rows(
    w: Tensor, alive: Tensor, hinv: Tensor, k: int, n: int, m: int, inf: Tensor, dampening: float
) -> None:
    """Greedy OBS on the rows of ``w`` (in place), clearing ``alive`` where weights go.

    Row ``r``'s current inverse Hessian is ``hinv - C_r^T C_r`` with ``C_r`` the ``t`` rows
    removed so far, each ``c / sqrt(c_q)`` for the column ``c`` of the then-current inverse
    at the removed ``q``: eliminating ``q`` is one step of a pivoted Cholesky factorisation of
    ``hinv``. A step then costs ``O(t * in)`` per row instead of the ``O(in^2)`` of updating a
    full ``[in, in]`` matrix, and a row holds ``k * in`` numbers instead of ``in^2``.
    """
    rows_n, in_f = w.shape
    rows = torch.arange(rows_n, device=w.device)
    factors = torch.zeros(rows_n, max(k, 1), in_f, dtype=w.dtype, device=w.device)
    diag = hinv.diagonal().expand(rows_n, in_f).clone()
    live_in_group = torch.full((rows_n, in_f // m), m, device=w.device) if n else None
    broken = torch.zeros((), dtype=torch.bool, device=w.device)
    for t in range(k):
        score = torch.where(alive, w.square() / diag, inf)
        if live_in_group is not None:
            full = (live_in_group <= n).repeat_interleave(m, dim=1)
            score = torch.where(full, inf, score)
        q = score.argmin(1)
        col = hinv[q]  # symmetric: column q of the initial inverse, one per row
        if t:
            done = factors[:, :t]
            col = col - torch.bmm(done[rows, :, q].unsqueeze(1), done).squeeze(1)
        pivot = col[rows, q]
        broken |= (pivot <= 0).any()
        w.sub_((w[rows, q] / pivot)[:, None] * col)
        w[rows, q] = 0.0
        factors[:, t] = col / pivot.sqrt()[:, None]
        diag.sub_(col.square() / pivot[:, None])
        alive[rows, q] = False
        if live_in_group is not None:
            live_in_group[rows, q // m] -= 1
    w.masked_fill_(~alive, 0.0)
    if bool(broken) or not bool(torch.isfinite(w).all()):
        raise _cholesky_failure("the OBS eliminations (lost positive definiteness)", dampening)


# -- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_error(original: Tensor, pruned: Tensor, hessian: Tensor) -> float:
    """``||X W^T - X W'^T||^2 / ||X W^T||^2``, computed through ``H`` in float64.

    Equals ``tr(D H D^T) / tr(W H W^T)`` with ``D = W - W'``; pass the undampened ``H`` to
    measure the error on the calibration data itself. 0 when both are 0; inf when only the
    denominator is.
    """
    _check_layer(original, hessian)
    if pruned.shape != original.shape:
        raise ConfigError(
            f"pruned must have the original's shape {tuple(original.shape)}; "
            f"got {tuple(pruned.shape)}"
        )
    w = original.detach().double()
    d = w - pruned.detach().double().to(w.device)
    h = hessian.detach().double()
    num = float(((d @ h) * d).sum())
    den = float(((w @ h) * w).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


# -- convolutions --------------------------------------------------------------------------


def unfold_conv_inputs(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The rows ``[N * L, in * kh * kw]`` that ``module``'s weight, viewed as ``[out, -1]``,
    multiplies: ``module(x)`` at every output position is ``rows @ W.view(out, -1).T + b``.

    Honours the module's stride, padding (numbers, ``"same"``, ``"valid"``), padding mode
    and dilation. ``x`` is ``[N, C, H, W]`` or ``[C, H, W]``. Grouped convolutions are refused
    (each group would need its own Hessian).
    """
    if not isinstance(module, nn.Conv2d):
        raise ModelError(f"unfold_conv_inputs handles nn.Conv2d; got {type(module).__name__}")
    if module.groups != 1:
        raise ModelError(
            f"unfold_conv_inputs handles groups=1 only; this Conv2d has groups={module.groups} "
            f"(each group would need its own Hessian)"
        )
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != module.in_channels:
        raise ConfigError(
            f"inputs must be [N, {module.in_channels}, H, W] or [{module.in_channels}, H, W]; "
            f"got {tuple(x.shape)}"
        )
    kernel = tuple(module.kernel_size)
    dilation = tuple(module.dilation)
    pads: list[int] = []  # F.pad order: last dim first, (left, right) each
    for dim in (1, 0):
        if module.padding == "valid":
            lo = hi = 0
        elif module.padding == "same":
            total = dilation[dim] * (kernel[dim] - 1)
            lo, hi = total // 2, total - total // 2
        else:
            lo = hi = int(module.padding[dim])
        pads += [lo, hi]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    cols = F.unfold(x.detach(), kernel, dilation=dilation, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])
