"""Sparse storage formats for pruned tensors, each with an exact round trip to the dense tensor.

* :class:`RelativeCSR`: compressed sparse rows whose column indices are stored as *gaps* (zeros
  skipped since the previous stored entry) in a fixed number of bits, as in Deep Compression
  (Han et al. 2016: 8 bits for convolutions, 5 for fully connected layers). A run of zeros longer
  than the largest gap is bridged with *filler* entries: a stored zero at the largest gap.
* :class:`PackedNM`: N:M sparsity as the kept values (``n`` per block of ``m``) plus each value's
  position inside its block, the layout sparse tensor cores consume.
* :class:`BlockCSR`: block-sparse rows (BSR) keeping only blocks with a nonzero.

Tensors of any rank are stored as the matrix ``[shape[0], prod(shape[1:])]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from secateurs.errors import ConfigError, ModelError

INDEX_BYTES = 4  #: bytes of one row pointer or block column index


def _as_matrix(t: Tensor) -> Tensor:
    if t.dim() == 0:
        raise ModelError("a 0-d tensor has no sparse layout; store it as it is")
    return t.detach().reshape(t.shape[0], -1)


def check_bits(bits: int, what: str = "index bits") -> int:
    """Validate a bit width in 1..16 (index gaps, weight-sharing codes)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"{what} must be an integer in 1..16; got {bits!r}")
    return bits


@dataclass
class RelativeCSR:
    """CSR with relative column indices of ``bits`` bits, filler zeros bridging long gaps."""

    shape: tuple[int, ...]
    values: Tensor  #: stored values (real nonzeros and filler zeros), original dtype
    gaps: Tensor  #: int32, zeros skipped before each stored value, each in [0, 2**bits - 1]
    row_ptr: Tensor  #: int64 [rows + 1], offsets of each row's entries
    bits: int

    @property
    def fillers(self) -> int:
        """Number of filler zeros stored to bridge gaps longer than ``2**bits - 1``."""
        return int((self.values == 0).sum())

    def nbytes(self) -> int:
        """Bytes with gaps bit-packed: values + ceil(entries * bits / 8) + row pointers."""
        n = self.values.numel()
        return (
            n * self.values.element_size()
            + math.ceil(n * self.bits / 8)
            + self.row_ptr.numel() * INDEX_BYTES
        )

    def to_dense(self) -> Tensor:
        rows = self.shape[0]
        cols = math.prod(self.shape[1:])
        out = torch.zeros(rows, cols, dtype=self.values.dtype)
        if self.values.numel():
            counts = self.row_ptr.diff()
            row_of = torch.repeat_interleave(torch.arange(rows), counts)
            advance = (self.gaps.to(torch.int64) + 1).cumsum(0)
            row_start = torch.cat([torch.zeros(1, dtype=torch.int64), advance])[self.row_ptr[:-1]]
            col = advance - row_start[row_of] - 1
            out[row_of, col] = self.values
        return out.reshape(self.shape)


def gaps_with_fillers(zeros_before: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Relative indices of ``bits`` bits for entries preceded by ``zeros_before`` zeros each.

    A run longer than the largest gap ``2**bits - 1`` is bridged by filler entries, each a gap of
    that largest value (advancing ``2**bits`` positions) holding a zero. Returns ``(gaps, owner,
    is_filler)`` over all stored entries: ``owner`` is the index of the real entry each stored
    entry belongs to (itself, or the entry its fillers lead to).
    """
    largest = (1 << bits) - 1
    fillers = zeros_before // (largest + 1)
    per_value = fillers + 1
    owner = torch.repeat_interleave(torch.arange(zeros_before.numel()), per_value)
    start = torch.cumsum(per_value, 0) - per_value
    k = torch.arange(owner.numel()) - start[owner]
    is_filler = k < fillers[owner]
    gaps = torch.where(
        is_filler, torch.full_like(k, largest), zeros_before[owner] - fillers[owner] * (largest + 1)
    )
    return gaps, owner, is_filler


def to_relative_csr(t: Tensor, bits: int = 5) -> RelativeCSR:
    """Encode ``t`` (any rank >= 1) as :class:`RelativeCSR` with ``bits``-bit gaps."""
    bits = check_bits(bits)
    m = _as_matrix(t)
    rows = m.shape[0]
    r, c = m.nonzero(as_tuple=True)
    first = torch.ones_like(r, dtype=torch.bool)
    first[1:] = r[1:] != r[:-1]
    prev = torch.where(first, torch.full_like(c, -1), torch.roll(c, 1))
    gaps, owner, is_filler = gaps_with_fillers(c - prev - 1, bits)
    values = torch.where(is_filler, torch.zeros((), dtype=m.dtype), m[r, c][owner])
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(r[owner], minlength=rows).cumsum(0)
    return RelativeCSR(tuple(t.shape), values, gaps.to(torch.int32), row_ptr, bits)


@dataclass
class PackedNM:
    """N:M sparse tensor: ``n`` values per block of ``m`` along dim 1, and their positions."""

    shape: tuple[int, ...]
    values: Tensor  #: [rows, blocks, n], original dtype
    positions: Tensor  #: uint8 [rows, blocks, n], index inside the block (0..m-1)
    n: int
    m: int

    def nbytes(self) -> int:
        """Values plus ``ceil(log2(m))`` bits of metadata per value (2 bits for 2:4)."""
        meta_bits = max(1, math.ceil(math.log2(self.m)))
        return self.values.numel() * self.values.element_size() + math.ceil(
            self.positions.numel() * meta_bits / 8
        )

    def to_dense(self) -> Tensor:
        rows, blocks, _ = self.values.shape
        out = torch.zeros(rows, blocks, self.m, dtype=self.values.dtype)
        out.scatter_(2, self.positions.to(torch.int64), self.values)
        return _from_nm_layout(out.reshape(rows, -1), self.shape)


def _nm_layout(t: Tensor) -> Tensor:
    """``[out, in, *k]`` -> ``[out * prod(k), in]``: blocks run along the input dim per kernel position."""
    if t.dim() < 2:
        raise ModelError(f"N:M packing needs at least 2 dimensions; got shape {tuple(t.shape)}")
    return t.detach().movedim(1, -1).reshape(-1, t.shape[1])


def _from_nm_layout(m: Tensor, shape: tuple[int, ...]) -> Tensor:
    moved = (shape[0], *shape[2:], shape[1])
    return m.reshape(moved).movedim(-1, 1).contiguous()


def to_packed_nm(t: Tensor, n: int = 2, m: int = 4) -> PackedNM:
    """Pack ``t`` whose every block of ``m`` inputs holds at most ``n`` nonzeros."""
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise ConfigError(f"N:M packing needs integers 0 < n < m; got n={n!r}, m={m!r}")
    mat = _nm_layout(t)
    if mat.shape[1] % m:
        raise ModelError(
            f"input dimension {mat.shape[1]} of shape {tuple(t.shape)} is not divisible by m={m}"
        )
    blocks = mat.reshape(mat.shape[0], -1, m)
    nonzero = blocks != 0
    worst = int(nonzero.sum(-1).max()) if blocks.numel() else 0
    if worst > n:
        raise ModelError(f"a block holds {worst} nonzeros; {n}:{m} packing allows at most {n}")
    # nonzeros first (stable, so in position order), then the first unused positions
    order = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :n]
    positions, _ = order.sort(dim=-1)
    return PackedNM(tuple(t.shape), blocks.gather(2, positions), positions.to(torch.uint8), n, m)


@dataclass
class BlockCSR:
    """Block-sparse rows: only blocks holding a nonzero are stored, with CSR block indices."""

    shape: tuple[int, ...]
    block: tuple[int, int]
    values: Tensor  #: [stored blocks, b0, b1]
    col_index: Tensor  #: int64 [stored blocks], block column of each stored block
    row_ptr: Tensor  #: int64 [block rows + 1]

    def nbytes(self) -> int:
        return (
            self.values.numel() * self.values.element_size()
            + (self.col_index.numel() + self.row_ptr.numel()) * INDEX_BYTES
        )

    def to_dense(self) -> Tensor:
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        b0, b1 = self.block
        g0, g1 = -(-rows // b0), -(-cols // b1)
        grid = torch.zeros(g0, g1, b0, b1, dtype=self.values.dtype)
        block_row = torch.repeat_interleave(torch.arange(g0), self.row_ptr.diff())
        grid[block_row, self.col_index] = self.values
        return grid.transpose(1, 2).reshape(g0 * b0, g1 * b1)[:rows, :cols].reshape(self.shape)


def to_block_csr(t: Tensor, block: tuple[int, int] = (4, 4)) -> BlockCSR:
    """Encode ``t`` as :class:`BlockCSR`; edges that do not divide are zero-padded blocks."""
    if len(block) != 2 or not all(isinstance(b, int) and b >= 1 for b in block):
        raise ConfigError(f"block must be two positive integers; got {block!r}")
    mat = _as_matrix(t)
    b0, b1 = block
    g0, g1 = -(-mat.shape[0] // b0), -(-mat.shape[1] // b1)
    padded = torch.zeros(g0 * b0, g1 * b1, dtype=mat.dtype)
    padded[: mat.shape[0], : mat.shape[1]] = mat
    grid = padded.reshape(g0, b0, g1, b1).transpose(1, 2)  # [g0, g1, b0, b1]
    keep = grid.ne(0).flatten(2).any(-1)
    block_row, block_col = keep.nonzero(as_tuple=True)
    row_ptr = torch.zeros(g0 + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(block_row, minlength=g0).cumsum(0)
    return BlockCSR(
        tuple(t.shape), (b0, b1), grid[block_row, block_col].clone(), block_col, row_ptr
    )
