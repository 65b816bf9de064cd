"""Layer-wise solvers from calibration activations: accumulator, Wanda, SparseGPT, exact OBS.

Closed forms are checked in float64 with tight tolerances; the comparisons between methods are
split into what is a theorem (one removal per row, where OBS is optimal) and what is only a
robust fact, in a regime stated in the test (see ``test_solvers_beat_baselines_on_factor_inputs``
and the counterexample pinned after it).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from secateurs.criteria import hessian as hm
from secateurs.criteria.hessian import (
    HessianAccumulator,
    obs_,
    reconstruction_error,
    sparsegpt_,
    unfold_conv_inputs,
    wanda_scores,
)
from secateurs.errors import ConfigError, ModelError

F64 = torch.float64

# small tensors, many tiny ops: one intra-op thread is faster than two (and than fighting over
# two shared cores)
pytestmark = pytest.mark.usefixtures("one_thread")

# -- helpers -----------------------------------------------------------------------------


def draw_inputs(kind: str, seed: int, in_f: int, samples: int) -> Tensor:
    """Calibration inputs ``[samples, in_f]`` (float64) of one of four kinds.

    ``iid``: independent standard normal features (H close to a multiple of I).
    ``mixed``: ``Z A`` with a Gaussian ``A``, badly conditioned (cond(H) up to ~1e6).
    ``factor``: ``in/8`` shared factors plus 0.3 noise, the low-rank-plus-noise structure of real
    activations. ``outlier``: ``factor`` with ``in/16`` columns ten times larger (LLM-like).
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, in_f, generator=g, dtype=F64)
    if kind == "iid":
        return z
    if kind == "mixed":
        return z @ torch.randn(in_f, in_f, generator=g, dtype=F64)
    r = max(1, in_f // 8)
    x = torch.randn(samples, r, generator=g, dtype=F64) @ torch.randn(
        r, in_f, generator=g, dtype=F64
    )
    x += 0.3 * z
    if kind == "outlier":
        x[:, torch.randperm(in_f, generator=g)[: max(1, in_f // 16)]] *= 10.0
    return x


def draw_weight(seed: int, out_f: int, in_f: int) -> Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)


def hessian_of(x: Tensor) -> Tensor:
    return 2.0 / x.shape[0] * x.T @ x


def damped(h: Tensor, dampening: float) -> Tensor:
    """``H + dampening * mean(diag H) * I``: the matrix the solvers actually work with."""
    return h + dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


def inv_chol_upper(hd: Tensor) -> Tensor:
    """``U`` upper triangular with ``U^T U = hd^-1`` (SparseGPT's factor), by hand."""
    return torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)


def magnitude_prune(w: Tensor, sparsity: float) -> Tensor:
    """Layer-wise magnitude pruning of exactly ``round(sparsity * numel)`` weights."""
    out = w.clone()
    out.view(-1)[w.abs().flatten().argsort(stable=True)[: round(sparsity * w.numel())]] = 0.0
    return out


def rowwise_prune(w: Tensor, scores: Tensor, k: int) -> Tensor:
    """Zero the ``k`` lowest-scored weights of every row."""
    return w.clone().scatter_(1, scores.argsort(dim=1, stable=True)[:, :k], 0.0)


def nm_prune(w: Tensor, scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest-scored of every ``m`` consecutive weights of each row."""
    out_f, in_f = w.shape
    drop = scores.reshape(out_f, in_f // m, m).argsort(dim=2, stable=True)[:, :, : m - n]
    return w.clone().reshape(out_f, in_f // m, m).scatter_(2, drop, 0.0).reshape(out_f, in_f)


def naive_obs(w: Tensor, hd: Tensor, k: int, n: int = 0, m: int = 0) -> tuple[Tensor, Tensor]:
    """Greedy OBS that re-inverts ``hd`` restricted to the live weights at every step."""
    w = w.clone()
    keep = torch.ones_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for _ in range(k):
            live = keep[r].nonzero().flatten()
            hinv = torch.linalg.inv(hd[live][:, live])
            score = w[r, live] ** 2 / hinv.diagonal()
            if n:
                groups = keep[r].reshape(-1, m).sum(1)
                score[groups[live // m] <= n] = math.inf
            j = int(score.argmin())
            w[r, live] -= w[r, live[j]] / hinv[j, j] * hinv[:, j]
            w[r, live[j]] = 0.0
            keep[r, live[j]] = False
    return w, keep


def sequential_obs_for_mask(w: Tensor, hd: Tensor, keep: Tensor) -> Tensor:
    """What SparseGPT computes for a given mask, without Cholesky or lazy batching: sweep the
    columns left to right and remove each pruned weight with the OBS update restricted to the
    columns from it rightwards (the inverse of that trailing block of ``hd``)."""
    w = w.clone()
    in_f = w.shape[1]
    for i in range(in_f):
        sub = torch.linalg.inv(hd[i:, i:])
        gone = ~keep[:, i]
        w[gone, i:] -= (w[gone, i] / sub[0, 0])[:, None] * sub[:, 0][None, :]
        w[gone, i] = 0.0
    return w


# -- the accumulator ---------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    in_f=st.integers(1, 12),
    batches=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    lead=st.sampled_from([(), (2,), (2, 3)]),
    seed=st.integers(0, 2**31),
)
def test_accumulator_equals_hand_computation(
    in_f: int, batches: list[int], lead: tuple[int, ...], seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    acc = HessianAccumulator(in_f, dtype=F64)
    seen = []
    for b in batches:
        x = torch.randn(*lead, b, in_f, generator=g, dtype=F64)
        acc.add(x)
        seen.append(x.reshape(-1, in_f))
    x = torch.cat(seen)
    if x.shape[0] == 0:
        assert acc.samples == 0
        with pytest.raises(ConfigError, match="no calibration inputs"):
            acc.hessian()
        return
    assert acc.samples == x.shape[0]
    torch.testing.assert_close(acc.hessian(), 2.0 / x.shape[0] * x.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.column_norms(), x.square().sum(0).sqrt(), rtol=1e-12, atol=0)


def test_accumulator_float32_default_tracks_float64_and_hessian_can_be_skipped() -> None:
    x = torch.randn(3, 50, 6, generator=torch.Generator().manual_seed(0))
    a32, a64 = HessianAccumulator(6), HessianAccumulator(6, dtype=F64)
    light = HessianAccumulator(6, track_hessian=False)
    for a in (a32, a64, light):
        for chunk in x:
            a.add(chunk)
    assert a32.hessian().dtype == torch.float32
    torch.testing.assert_close(a32.hessian().double(), a64.hessian(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(light.column_norms(), a32.column_norms())
    assert a32.tracks_hessian and not light.tracks_hessian
    with pytest.raises(ConfigError, match="track_hessian=True"):
        light.hessian()


def test_accumulator_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="float32 or float64"):
        HessianAccumulator(4, dtype=torch.float16)
    with pytest.raises(ConfigError, match="positive int"):
        HessianAccumulator(0)
    acc = HessianAccumulator(4)
    with pytest.raises(ConfigError, match=r"\[\.\.\., 4\]"):
        acc.add(torch.zeros(2, 5))
    with pytest.raises(ConfigError, match="no calibration inputs"):
        acc.column_norms()


def test_wanda_scores_equal_hand_computation() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 4.0]])
    norms = torch.tensor([2.0, 0.5, 10.0])
    expected = torch.tensor([[2.0, 1.0, 5.0], [6.0, 0.0, 40.0]])
    torch.testing.assert_close(wanda_scores(w, norms), expected)
    x = torch.randn(40, 3, dtype=F64)
    acc = HessianAccumulator(3, dtype=F64)
    acc.add(x)
    torch.testing.assert_close(
        wanda_scores(w, acc.column_norms()), (w.abs() * x.norm(dim=0)).float()
    )
    with pytest.raises(ConfigError, match=r"shape \[3\]"):
        wanda_scores(w, norms[:2])


def test_reconstruction_error_is_the_relative_output_error() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 10, generator=g, dtype=F64)
    w = torch.randn(4, 10, generator=g, dtype=F64)
    pruned = magnitude_prune(w, 0.5)
    direct = (x @ w.T - x @ pruned.T).square().sum() / (x @ w.T).square().sum()
    assert reconstruction_error(w, pruned, hessian_of(x)) == pytest.approx(float(direct), rel=1e-12)
    assert reconstruction_error(w, w, hessian_of(x)) == 0.0
    zero = torch.zeros_like(w)
    assert reconstruction_error(zero, zero, hessian_of(x)) == 0.0
    assert reconstruction_error(zero, w, hessian_of(x)) == math.inf


# -- closed-form OBS ---------------------------------------------------------------------


@pytest.mark.parametrize("dampening", [0.0, 0.01])
@pytest.mark.parametrize("seed", range(4))
def test_obs_single_removal_is_the_closed_form(seed: int, dampening: float) -> None:
    """With one removal per row, ``obs_`` is the OBS closed form: ``q = argmin w_q^2 /
    [H^-1]_qq`` and ``dw = -w_q / [H^-1]_qq * H^-1[:, q]``, each row on its own."""
    h = hessian_of(draw_inputs("mixed", seed, 8, 40))
    w = draw_weight(seed, 3, 8)
    hinv = torch.linalg.inv(damped(h, dampening))
    expected = w.clone()
    for r in range(3):
        q = int((w[r] ** 2 / hinv.diagonal()).argmin())
        expected[r] -= w[r, q] / hinv[q, q] * hinv[:, q]
        expected[r, q] = 0.0
    got = w.clone()
    keep = obs_(got, h, sparsity=1 / 8, dampening=dampening)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert ((got == 0) == ~keep).all()


@pytest.mark.parametrize(("k", "n", "m"), [(5, 0, 0), (7, 0, 0), (4, 2, 4), (6, 1, 4)])
def test_obs_many_removals_match_reinverting_the_hessian(k: int, n: int, m: int) -> None:
    """The rank-one eliminations equal inverting ``H`` restricted to the live weights anew at
    every step, for unstructured and N:M budgets (so the candidates rule is right too)."""
    h = hessian_of(draw_inputs("factor", 5, 8, 30))
    w = draw_weight(5, 4, 8)
    expected, expected_keep = naive_obs(w, damped(h, 0.01), k, n, m)
    got = w.clone()
    keep = obs_(got, h, sparsity=k / 8, row_chunk=3) if not n else obs_(got, h, n=n, m=m)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_sparsegpt_single_removal_is_obs_on_the_columns_to_its_right(seed: int) -> None:
    """SparseGPT sweeps columns left to right and only updates columns to the right of a pruned
    one. With one weight to prune it removes ``q = argmin w_q^2 / U_qq^2`` (``U^T U = H^-1``),
    and ``U_qq^2`` is ``[(H[q:, q:])^-1]_00``: the closed-form OBS of the trailing block
    ``H[q:, q:]``; its update is that block's OBS update, and columns left of ``q`` stay."""
    h = hessian_of(draw_inputs("mixed", seed, 8, 24))
    w = draw_weight(seed, 1, 8)
    hd = damped(h, 0.01)
    u = inv_chol_upper(hd)
    q = int((w[0] ** 2 / u.diagonal() ** 2).argmin())
    sub = torch.linalg.inv(hd[q:, q:])
    assert float(u[q, q] ** 2) == pytest.approx(float(sub[0, 0]), rel=1e-9)
    expected = w.clone()
    expected[0, q:] -= w[0, q] / sub[0, 0] * sub[:, 0]
    expected[0, q] = 0.0
    got = w.clone()
    keep = sparsegpt_(got, h, sparsity=1 / 8)
    assert (~keep).nonzero().tolist() == [[0, q]]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(got[0, :q], w[0, :q])


def test_sparsegpt_removing_the_first_column_is_full_obs() -> None:
    h = hessian_of(draw_inputs("mixed", 11, 8, 24))
    w = draw_weight(11, 1, 8)
    w[0, 0] = 1e-3
    hinv = torch.linalg.inv(damped(h, 0.01))
    expected = w - w[0, 0] / hinv[0, 0] * hinv[:, 0][None, :]
    expected[0, 0] = 0.0
    got = w.clone()
    keep = sparsegpt_(got, h, sparsity=1 / 8)
    assert not keep[0, 0] and keep[0, 1:].all()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(
    out_f=st.integers(1, 6),
    groups=st.integers(2, 6),
    blocksize=st.sampled_from([1, 4, 8, 12, 128]),
    pattern=st.sampled_from([0.3, 0.5, 0.8, (1, 4), (2, 4), (3, 4)]),
    seed=st.integers(0, 2**31),
)
def test_sparsegpt_lazy_batches_equal_the_sequential_sweep(
    out_f: int, groups: int, blocksize: int, pattern: float | tuple[int, int], seed: int
) -> None:
    """Whatever the block size, the weights are those of the plain left-to-right sweep of OBS
    updates (:func:`sequential_obs_for_mask`) for the mask it chose. N:M masks are scored when
    the sweep reaches each group, after every earlier update, so they do not depend on the
    block size at all; with one block, an unstructured mask is the ``k`` smallest
    ``w^2 / U_ii^2`` of the original weights."""
    in_f = 4 * groups
    h = hessian_of(draw_inputs("factor", seed, in_f, 3 * in_f))
    w = draw_weight(seed, out_f, in_f)
    hd = damped(h, 0.01)
    kw: dict[str, float | int] = (
        {"n": pattern[0], "m": pattern[1]} if isinstance(pattern, tuple) else {"sparsity": pattern}
    )
    got = w.clone()
    keep = sparsegpt_(got, h, blocksize=blocksize, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(got, sequential_obs_for_mask(w, hd, keep), rtol=1e-8, atol=1e-8)
    whole = w.clone()
    keep_whole = sparsegpt_(whole, h, blocksize=in_f, **kw)  # type: ignore[arg-type]
    if isinstance(pattern, tuple):
        assert torch.equal(keep, keep_whole)
        torch.testing.assert_close(got, whole, rtol=1e-9, atol=1e-9)
    else:
        score = (w**2 / inv_chol_upper(hd).diagonal() ** 2).flatten()
        k = round(pattern * out_f * in_f)
        assert set((~keep_whole).flatten().nonzero().flatten().tolist()) == set(
            score.argsort(stable=True)[:k].tolist()
        )


# -- comparisons between methods -----------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    out_f=st.integers(1, 6),
    in_f=st.integers(2, 24),
    kind=st.sampled_from(["iid", "mixed", "factor", "outlier"]),
    sample_factor=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    dampening=st.sampled_from([1e-6, 0.01, 0.5]),
    seed=st.integers(0, 2**31),
)
def test_one_removal_per_row_obs_is_optimal_and_sparsegpt_beats_masking(
    out_f: int, in_f: int, kind: str, sample_factor: float, dampening: float, seed: int
) -> None:
    """A theorem, so it holds for every draw (ill-conditioned or rank-deficient ``X`` included).

    Measured with the dampened ``H_d`` the solvers optimise, each row losing exactly one weight
    (N:M with ``m = in``, ``n = in - 1``), and ``U^T U = H_d^-1``:

    * ``obs_``'s row error is ``min_q w_q^2 / [H_d^-1]_qq``, the least error of any removal of
      one weight with any compensation (OBS);
    * ``sparsegpt_``'s is ``min_q w_q^2 / U_qq^2`` (its first pruned column, nothing before it
      changed), which is at least the former since ``U_qq^2 = [(H_d[q:, q:])^-1]_00 <=
      [H_d^-1]_qq``, and at most ``w_q^2 [H_d]_qq`` (``U_qq^2 >= 1 / [H_d]_qq``), the error of
      zeroing any ``w_q`` without compensation: magnitude's and Wanda's choices included.
    """
    samples = max(1, round(sample_factor * in_f))
    if samples < in_f and dampening < 0.01:
        dampening = 0.01  # a singular H needs real dampening for a meaningful comparison
    x = draw_inputs(kind, seed, in_f, samples)
    h, w = hessian_of(x), draw_weight(seed, out_f, in_f)
    hd = damped(h, dampening)
    u2 = inv_chol_upper(hd).diagonal() ** 2
    hinv_diag = torch.linalg.inv(hd).diagonal()
    den = float(((w @ hd) * w).sum())

    w_obs, w_sg = w.clone(), w.clone()
    obs_(w_obs, h, n=in_f - 1, m=in_f, dampening=dampening)
    sparsegpt_(w_sg, h, n=in_f - 1, m=in_f, dampening=dampening)
    e_obs = reconstruction_error(w, w_obs, hd)
    e_sg = reconstruction_error(w, w_sg, hd)
    assert e_obs == pytest.approx(float((w**2 / hinv_diag).min(1).values.sum()) / den, rel=1e-7)
    assert e_sg == pytest.approx(float((w**2 / u2).min(1).values.sum()) / den, rel=1e-7)

    e_mag = reconstruction_error(w, rowwise_prune(w, w.abs(), 1), hd)
    norms = x.norm(dim=0)
    e_wanda = reconstruction_error(w, rowwise_prune(w, wanda_scores(w, norms).double(), 1), hd)
    slack = 1 + 1e-7
    assert e_obs <= e_sg * slack
    assert e_sg <= e_mag * slack
    assert e_sg <= e_wanda * slack


@settings(max_examples=60, deadline=None)
@given(
    out_f=st.integers(8, 16),
    in_f=st.integers(8, 16).map(lambda g: 4 * g),
    sample_factor=st.integers(2, 8),
    kind=st.sampled_from(["factor", "outlier"]),
    sparsity=st.sampled_from([0.25, 0.5, 0.75]),
    nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]),
    blocksize=st.sampled_from([16, 128]),
    seed=st.integers(0, 2**31),
)
def test_solvers_beat_baselines_on_factor_inputs(
    out_f: int,
    in_f: int,
    sample_factor: int,
    kind: str,
    sparsity: float,
    nm: tuple[int, int],
    blocksize: int,
    seed: int,
) -> None:
    """A robust fact, not a theorem. At equal budgets, on the true (undampened) error:

    * exact OBS <= Wanda and <= magnitude (unstructured and N:M) and <= SparseGPT run row by
      row (the same per-row budget), at the default dampening;
    * SparseGPT <= layer-wise magnitude (unstructured and N:M) at dampening 0.1.

    Beyond one removal per row none of this is a theorem: SparseGPT fixes a block's mask from
    the weights before the block's updates and pushes each pruned weight's error onto columns
    to its right, some of which it prunes afterwards; greedy OBS cannot undo a choice. Sweeping
    out 1..16, in 4..64, samples 2..8 x in, four input kinds and sparsities 0.25..0.75,
    there are counterexamples to every comparison between these methods, from three sources:

    * i.i.d. features: ``H`` is nearly a multiple of ``I``, compensation gains almost nothing,
      and which method wins is noise (SparseGPT up to 1.1x magnitude);
    * badly conditioned ``H`` (``X = Z A``, cond ~1e3..1e6): SparseGPT's compensations are
      large and partly undone when the columns they went to are pruned, up to 6x magnitude at
      dampening 0.01 and 300x at 1e-8;
    * small layers (out < 8 or in < 32): few weights, no averaging; see the pinned
      ``test_sparsegpt_can_lose_to_magnitude`` (in = 4, 14x).

    The regime asserted here is correlated low-rank-plus-noise inputs (optionally with outlier
    columns), out >= 8, in >= 32: exactly this test's strategy. Sweeps of it (on a 16-core
    machine, the helpers of this file) found:

    * OBS/Wanda at most 0.10, OBS/magnitude 0.075, OBS N:M/Wanda N:M 0.16, OBS/row-wise
      SparseGPT 0.81 in 71,581 draws, OBS N:M/magnitude N:M 0.07 in 8,797: wide margins;
    * SparseGPT/magnitude above 1 in 26 of 218,554 draws at the default dampening 0.01 (up to
      1.95x; N:M: 4 draws, up to 1.79x): rare blow-ups where one row's compensation runs away
      (87% of the layer's error in one row, and gone at another block size). At dampening 0.1:
      none in the same 218,554 draws (worst 0.99 unstructured, 0.92 N:M); so dampening 0.1 it is.

    Not asserted, with counterexamples in this very regime: SparseGPT <= Wanda (up to 5.2x),
    SparseGPT N:M <= Wanda N:M (2.3x), OBS N:M <= SparseGPT N:M (1.26x). It still catches bugs:
    flipping the sign of either solver's update, or dropping its compensation, fails it.
    """
    n, m = nm
    if in_f % m:
        m, n = 4, n // 2 or 1
    x = draw_inputs(kind, seed, in_f, sample_factor * in_f)
    h, w = hessian_of(x), draw_weight(seed, out_f, in_f)
    wanda = wanda_scores(w, x.norm(dim=0)).double()
    k = round(sparsity * in_f)

    def err(pruned: Tensor) -> float:
        return reconstruction_error(w, pruned, h)

    w_obs, w_rows = w.clone(), w.clone()
    obs_(w_obs, h, sparsity=sparsity)
    for r in range(out_f):
        sparsegpt_(w_rows[r : r + 1], h, sparsity=sparsity, blocksize=blocksize)
    assert err(w_obs) <= err(rowwise_prune(w, wanda, k))
    assert err(w_obs) <= err(magnitude_prune(w, sparsity))
    assert err(w_obs) <= err(w_rows)
    w_obs = w.clone()
    obs_(w_obs, h, n=n, m=m)
    assert err(w_obs) <= err(nm_prune(w, wanda, n, m))
    assert err(w_obs) <= err(nm_prune(w, w.abs(), n, m))

    w_sg, w_nm = w.clone(), w.clone()
    sparsegpt_(w_sg, h, sparsity=sparsity, blocksize=blocksize, dampening=0.1)
    sparsegpt_(w_nm, h, n=n, m=m, blocksize=blocksize, dampening=0.1)
    assert err(w_sg) <= err(magnitude_prune(w, sparsity))
    assert err(w_nm) <= err(nm_prune(w, w.abs(), n, m))


def test_sparsegpt_can_lose_to_magnitude() -> None:
    """Pinned counterexample (why the comparison above is scoped): four inputs, one output,
    50% sparsity, default dampening. SparseGPT's saliencies ``w^2 / U_ii^2`` for columns 1 and 2
    are nearly tied (16.89 vs 16.96); it prunes {1, 3}, and its compensation for column 1
    lands on column 3, which it prunes next: its error (0.40) is worse than zeroing its own mask
    (0.28) and 14x magnitude's (0.028, mask {2, 3}). Exact OBS, which re-scores after every
    removal, prunes {2, 3} and compensates, reaching 0.020."""
    x = torch.tensor(
        [
            [-3.0, 3.0, 0.0, -3.0],
            [-3.0, 2.0, -2.0, -2.0],
            [0.0, 3.0, 0.0, -2.0],
            [2.0, -1.0, -3.0, -2.0],
        ],
        dtype=F64,
    )
    w = torch.tensor([[-4.0, 3.0, 2.0, -1.0]], dtype=F64)
    h = hessian_of(x)
    w_sg, w_obs = w.clone(), w.clone()
    keep = sparsegpt_(w_sg, h, sparsity=0.5)
    assert keep.tolist() == [[True, False, True, False]]
    e_mag = reconstruction_error(w, magnitude_prune(w, 0.5), h)
    e_sg = reconstruction_error(w, w_sg, h)
    assert e_mag == pytest.approx(0.02801, abs=1e-5)
    assert e_sg == pytest.approx(0.40301, abs=1e-5)
    assert e_sg > reconstruction_error(w, w * keep, h)
    assert obs_(w_obs, h, sparsity=0.5).tolist() == [[True, True, False, False]]
    assert reconstruction_error(w, w_obs, h) == pytest.approx(0.01971, abs=1e-5)


# -- budgets and patterns ----------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 12),
    groups=st.integers(1, 10),
    nm=st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (5, 8), (1, 3)]),
    blocksize=st.sampled_from([1, 3, 8, 128]),
    seed=st.integers(0, 2**31),
)
def test_n_m_results_keep_exactly_n_of_every_m(
    out_f: int, groups: int, nm: tuple[int, int], blocksize: int, seed: int
) -> None:
    n, m = nm
    in_f = groups * m
    h = hessian_of(draw_inputs("factor", seed, in_f, 2 * in_f).float())
    w = draw_weight(seed, out_f, in_f).float()
    for solver in ("sparsegpt", "obs"):
        got = w.clone()
        if solver == "sparsegpt":
            keep = sparsegpt_(got, h, n=n, m=m, blocksize=blocksize)
        else:
            keep = obs_(got, h, n=n, m=m)
        assert (keep.reshape(out_f, groups, m).sum(2) == n).all(), solver
        assert (got[~keep] == 0).all(), solver
        assert ((got != 0).reshape(out_f, groups, m).sum(2) <= n).all(), solver


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 12),
    in_f=st.integers(1, 40),
    sparsity=st.floats(0.0, 0.99),
    blocksize=st.integers(1, 48),
    seed=st.integers(0, 2**31),
)
def test_unstructured_budgets_are_exact(
    out_f: int, in_f: int, sparsity: float, blocksize: int, seed: int
) -> None:
    """SparseGPT: block ``[i1, i2)`` prunes ``round(s*out*i2) - round(s*out*i1)``, so the layer
    loses exactly ``round(s*out*in)``. OBS: every row loses exactly ``round(s*in)``."""
    h = hessian_of(draw_inputs("factor", seed, in_f, 2 * in_f + 1).float())
    w = draw_weight(seed, out_f, in_f).float()
    got = w.clone()
    keep = sparsegpt_(got, h, sparsity=sparsity, blocksize=blocksize)
    assert int((~keep).sum()) == round(sparsity * out_f * in_f)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        expected = round(sparsity * out_f * i2) - round(sparsity * out_f * i1)
        assert int((~keep[:, i1:i2]).sum()) == expected
    assert (got[~keep] == 0).all()
    got = w.clone()
    keep = obs_(got, h, sparsity=sparsity, row_chunk=5)
    assert ((~keep).sum(1) == round(sparsity * in_f)).all()
    assert (got[~keep] == 0).all()


# -- dtypes, dead inputs, errors ---------------------------------------------------------


def test_low_precision_weights_are_solved_in_float32_and_written_back() -> None:
    x = draw_inputs("factor", 2, 32, 96).float()
    h = hessian_of(x)
    w = draw_weight(2, 6, 32).to(torch.bfloat16)
    for solver in (sparsegpt_, obs_):
        ref = w.float()
        ref_keep = solver(ref, h, sparsity=0.5)
        half = w.clone()
        keep = solver(half, h, sparsity=0.5)
        assert half.dtype == torch.bfloat16
        assert torch.equal(keep, ref_keep)
        assert torch.equal(half, ref.to(torch.bfloat16))


def test_dead_inputs_lose_their_weights() -> None:
    x = draw_inputs("factor", 4, 16, 64)
    x[:, [3, 9]] = 0.0
    h = hessian_of(x)
    w = draw_weight(4, 5, 16)
    for solver in (sparsegpt_, obs_):
        got = w.clone()
        solver(got, h, sparsity=0.25)
        assert (got[:, [3, 9]] == 0).all()
        assert torch.isfinite(got).all()


BAD_CONFIGS: list[tuple[dict[str, object], str]] = [
    ({}, "exactly one of sparsity"),
    ({"sparsity": 0.5, "n": 2, "m": 4}, "exactly one of sparsity"),
    ({"sparsity": 1.0}, r"in \[0, 1\)"),
    ({"sparsity": -0.1}, r"in \[0, 1\)"),
    ({"sparsity": True}, r"in \[0, 1\)"),
    ({"n": 4, "m": 4}, "0 < n < m"),
    ({"n": 0, "m": 4}, "0 < n < m"),
    ({"n": 2, "m": 3}, "divisible by m"),
    ({"sparsity": 0.5, "dampening": -1.0}, "dampening must be"),
    ({"sparsity": 0.5, "dampening": math.nan}, "dampening must be"),
]


@pytest.mark.parametrize("solver", ["sparsegpt", "obs"])
@pytest.mark.parametrize(("kwargs", "message"), BAD_CONFIGS)
def test_bad_arguments_raise_config_error_and_leave_weight(
    solver: str, kwargs: dict[str, object], message: str
) -> None:
    h = hessian_of(draw_inputs("iid", 0, 8, 32)).float()
    w = draw_weight(0, 3, 8).float()
    before = w.clone()
    fn = sparsegpt_ if solver == "sparsegpt" else obs_
    with pytest.raises(ConfigError, match=message):
        fn(w, h, **kwargs)  # type: ignore[arg-type]
    assert torch.equal(w, before)


def test_bad_shapes_and_solver_options_raise_config_error() -> None:
    h = torch.eye(8)
    w = torch.ones(3, 8)
    before = w.clone()
    with pytest.raises(ConfigError, match=r"shape \[8, 8\]"):
        sparsegpt_(w, torch.eye(7), sparsity=0.5)
    with pytest.raises(ConfigError, match="2-D"):
        obs_(torch.ones(8), h, sparsity=0.5)
    with pytest.raises(ConfigError, match="blocksize"):
        sparsegpt_(w, h, sparsity=0.5, blocksize=0)
    with pytest.raises(ConfigError, match="row_chunk"):
        obs_(w, h, sparsity=0.5, row_chunk=0)
    with pytest.raises(ConfigError, match="floating point"):
        sparsegpt_(w.long(), h, sparsity=0.5)
    assert torch.equal(w, before)


@pytest.mark.parametrize("solver", ["sparsegpt", "obs"])
def test_indefinite_or_non_finite_hessian_raises_model_error_and_leaves_weight(
    solver: str,
) -> None:
    fn = sparsegpt_ if solver == "sparsegpt" else obs_
    w = draw_weight(1, 4, 6)
    before = w.clone()
    indefinite = torch.diag(torch.tensor([1.0, 1.0, -3.0, 1.0, 1.0, 1.0], dtype=F64))
    with pytest.raises(ModelError, match=r"raise dampening .* more data"):
        fn(w, indefinite, sparsity=0.5)
    with pytest.raises(ModelError, match="NaN or inf"):
        fn(w, torch.full((6, 6), math.nan, dtype=F64), sparsity=0.5)
    assert torch.equal(w, before)
    # the same matrix passes once dampening dominates its negative eigenvalue
    fn(w, indefinite, sparsity=0.5, dampening=20.0)


def test_obs_refuses_wide_layers_and_points_to_sparsegpt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hm, "OBS_MAX_IN_FEATURES", 8)
    w = torch.ones(2, 12)
    with pytest.raises(ModelError, match=r"at most 8 inputs.*sparsegpt_"):
        obs_(w, torch.eye(12), sparsity=0.5)
    assert (w == 1).all()


def test_solvers_prune_a_linear_layer_in_place() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    acc = HessianAccumulator(16)
    acc.add(torch.randn(5, 10, 16))
    keep = sparsegpt_(layer.weight, acc.hessian(), n=2, m=4)
    assert layer.weight.requires_grad
    assert (layer.weight.detach()[~keep] == 0).all()


# -- convolutions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3),
        nn.Conv2d(3, 5, 3, stride=2, padding=1),
        nn.Conv2d(3, 5, (3, 2), padding=(2, 1), dilation=(1, 2)),
        nn.Conv2d(3, 5, 4, padding="same", dilation=2),
        nn.Conv2d(3, 5, 3, padding="valid", bias=False),
        nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 5, 3, padding=2, padding_mode="circular", stride=(1, 2)),
    ],
)
def test_unfolded_rows_reproduce_the_convolution(conv: nn.Conv2d) -> None:
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(0))
    rows = unfold_conv_inputs(conv, x)
    y = conv(x).detach()
    flat = rows @ conv.weight.detach().reshape(conv.out_channels, -1).T
    if conv.bias is not None:
        flat = flat + conv.bias.detach()
    expected = y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfold_conv_inputs(conv, x[0]), rows[: rows.shape[0] // 2])


def test_conv_weight_pruned_through_unfolded_hessian() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    acc = HessianAccumulator(4 * 9)
    x = torch.randn(8, 4, 6, 6)
    acc.add(unfold_conv_inputs(conv, x))
    weight = conv.weight.detach().clone()
    flat = weight.reshape(6, -1)
    keep = sparsegpt_(flat, acc.hessian(), sparsity=0.5)
    assert int((~keep).sum()) == round(0.5 * flat.numel())
    assert (weight.reshape(6, -1)[~keep] == 0).all()  # a view: written through


def test_unfold_refuses_grouped_convolutions_and_bad_inputs() -> None:
    with pytest.raises(ModelError, match="groups=1 only"):
        unfold_conv_inputs(nn.Conv2d(4, 4, 3, groups=2), torch.zeros(1, 4, 5, 5))
    with pytest.raises(ConfigError, match=r"\[N, 4, H, W\]"):
        unfold_conv_inputs(nn.Conv2d(4, 4, 3), torch.zeros(1, 3, 5, 5))
