"""Sparse storage formats: exact round trips, Deep Compression's filler zeros, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import secateurs as sc
from secateurs.compress import to_block_csr, to_packed_nm, to_relative_csr
from secateurs.errors import ConfigError, ModelError


@st.composite
def sparse_tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))
    density = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    values = torch.randn(shape, generator=g)
    return values * (torch.rand(shape, generator=g) < density)


@settings(max_examples=60, deadline=None)
@given(t=sparse_tensors(), bits=st.integers(1, 16))
def test_relative_csr_round_trip_and_gap_width(t: torch.Tensor, bits: int) -> None:
    c = to_relative_csr(t, bits=bits)
    assert torch.equal(c.to_dense(), t)
    if c.gaps.numel():
        assert int(c.gaps.min()) >= 0 and int(c.gaps.max()) <= (1 << bits) - 1
    assert c.values.numel() == int((t != 0).sum()) + c.fillers


def test_filler_zeros_bridge_long_gaps_as_in_deep_compression() -> None:
    # the paper's example: 3-bit gaps, a nonzero 16 positions after the previous one
    row = torch.zeros(1, 20)
    row[0, 1], row[0, 17] = 1.0, 2.0
    c = to_relative_csr(row, bits=3)
    # zeros skipped: 1 before the first value, then 15 -> one filler (skip 7), then skip 7
    assert c.gaps.tolist() == [1, 7, 7]
    assert c.values.tolist() == [1.0, 0.0, 2.0]
    assert c.fillers == 1
    assert torch.equal(c.to_dense(), row)


def test_relative_csr_bytes_shrink_with_sparsity() -> None:
    torch.manual_seed(0)
    dense = torch.randn(300, 784)
    sparse = dense * (torch.rand_like(dense) < 0.08)
    c = to_relative_csr(sparse, bits=5)
    assert c.nbytes() == c.values.numel() * 4 + math.ceil(c.values.numel() * 5 / 8) + 301 * 4
    assert c.nbytes() < dense.numel() * 4 / 8


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 6),
    blocks=st.integers(1, 4),
    kernel=st.sampled_from([(), (1,), (3, 3)]),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8)]),
    seed=st.integers(0, 1000),
)
def test_packed_nm_round_trip_on_pruned_weights(
    out: int, blocks: int, kernel: tuple[int, ...], nm: tuple[int, int], seed: int
) -> None:
    n, m = nm
    torch.manual_seed(seed)
    w = torch.randn(out, blocks * m, *kernel)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(w)
    sc.prune_(layer, params=["weight"], structure=sc.NM(n, m))
    pruned = layer.weight.detach()
    packed = to_packed_nm(pruned, n, m)
    assert torch.equal(packed.to_dense(), pruned)
    assert packed.values.shape[-1] == n and int(packed.positions.max()) < m


def test_packed_nm_bad_input() -> None:
    with pytest.raises(ModelError, match="at most 2"):
        to_packed_nm(torch.ones(2, 8), 2, 4)
    with pytest.raises(ModelError, match="not divisible"):
        to_packed_nm(torch.zeros(2, 6), 2, 4)
    with pytest.raises(ConfigError, match="0 < n < m"):
        to_packed_nm(torch.zeros(2, 8), 4, 4)


@settings(max_examples=40, deadline=None)
@given(t=sparse_tensors(), b0=st.integers(1, 5), b1=st.integers(1, 5))
def test_block_csr_round_trip(t: torch.Tensor, b0: int, b1: int) -> None:
    b = to_block_csr(t, (b0, b1))
    assert torch.equal(b.to_dense(), t)
    assert bool(b.values.flatten(1).ne(0).any(1).all()) if b.values.numel() else True


@pytest.mark.parametrize("bits", [0, 17, 2.5, True])
def test_bits_outside_1_to_16_are_rejected(bits: object) -> None:
    with pytest.raises(ConfigError, match=r"1\.\.16"):
        to_relative_csr(torch.zeros(2, 2), bits=bits)  # type: ignore[arg-type]
