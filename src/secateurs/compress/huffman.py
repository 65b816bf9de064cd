"""Canonical Huffman coding of non-negative integer symbols (quantized weights, index gaps).

Deep Compression codes both the weight-sharing indices and the sparse-index gaps this way: their
distributions are far from uniform, so variable-length codes save 20-30% over fixed-width ones.
Codes are canonical, so a decoder needs only each symbol's code length.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from secateurs.errors import ConfigError, DataError

MAX_CODE_LENGTH = 32


@dataclass
class HuffmanCode:
    """Code lengths by symbol, and the canonical codes they imply."""

    lengths: dict[int, int]

    def codes(self) -> dict[int, tuple[int, int]]:
        """``symbol -> (code, length)``, canonical order: by length, then symbol."""
        out: dict[int, tuple[int, int]] = {}
        code, previous = 0, 0
        for symbol, length in sorted(self.lengths.items(), key=lambda kv: (kv[1], kv[0])):
            code <<= length - previous
            out[symbol] = (code, length)
            code += 1
            previous = length
        return out


def build_code(symbols: Tensor) -> HuffmanCode:
    """Huffman code lengths from the symbol frequencies in ``symbols`` (ints >= 0)."""
    flat = symbols.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.min()) < 0:
        raise ConfigError("Huffman coding takes non-negative integer symbols")
    return code_from_counts(np.bincount(flat.numpy()))


def code_from_counts(counts: np.ndarray) -> HuffmanCode:
    """Huffman code lengths from ``counts[symbol]`` (symbols with count 0 get no code)."""
    present = np.flatnonzero(counts)
    if present.size == 1:
        return HuffmanCode({int(present[0]): 1})
    # each heap item: (weight, tie-breaker, id of its subtree); lengths come from parent links
    heap: list[tuple[int, int]] = [(int(counts[s]), i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    parent: list[int] = [-1] * present.size
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        node = len(parent)
        parent.append(-1)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node))
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):  # parents are created after their children
        depth[node] = depth[parent[node]] + 1
    lengths = {int(s): depth[i] for i, s in enumerate(present)}
    if max(lengths.values(), default=0) > MAX_CODE_LENGTH:
        raise ConfigError(
            f"a Huffman code would exceed {MAX_CODE_LENGTH} bits; too many rare symbols"
        )
    return HuffmanCode(lengths)


def code_table(code: HuffmanCode) -> tuple[np.ndarray, np.ndarray]:
    """Dense look-up arrays indexed by symbol: (code value, code length); length 0 = no code."""
    table = code.codes()
    size = max(table, default=-1) + 1
    values = np.zeros(size, dtype=np.uint64)
    lengths = np.zeros(size, dtype=np.int64)
    for symbol, (value, length) in table.items():
        values[symbol], lengths[symbol] = value, length
    return values, lengths


def encode(symbols: Tensor, code: HuffmanCode) -> tuple[bytes, int]:
    """Bit-pack ``symbols`` with ``code``; returns (bytes, number of bits used).

    Vectorised: one pass per bit position of the longest code, not a loop over symbols.
    """
    values, lengths = code_table(code)
    flat = symbols.reshape(-1).to(torch.int64).numpy()
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= lengths.size):
        raise ConfigError(f"symbol {int(flat.max())} has no Huffman code")
    sym_len = lengths[flat]
    if flat.size and int(sym_len.min()) == 0:
        missing = int(flat[sym_len == 0][0])
        raise ConfigError(f"symbol {missing} has no Huffman code")
    sym_val = values[flat]
    total = int(sym_len.sum())
    bits = np.zeros(total, dtype=np.uint8)
    start = np.cumsum(sym_len) - sym_len
    for b in range(int(sym_len.max()) if flat.size else 0):
        has = sym_len > b
        shift = (sym_len[has] - 1 - b).astype(np.uint64)
        bits[start[has] + b] = ((sym_val[has] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits).tobytes(), total


def decode(data: bytes, n_bits: int, count: int, code: HuffmanCode) -> Tensor:
    """Decode ``count`` symbols from ``data`` (the inverse of :func:`encode`).

    Canonical codes, left-aligned to the longest length ``L``, increase with their length, so the
    length of the code starting at any bit is found for every bit at once by a sorted search of
    its ``L``-bit window. Only the hop from one code to the next stays sequential.
    """
    if n_bits > len(data) * 8:
        raise DataError(f"Huffman stream holds {len(data) * 8} bits, header says {n_bits}")
    if count == 0:
        if n_bits:
            raise DataError(f"Huffman stream is corrupt: {n_bits} bits hold no symbols")
        return torch.zeros(0, dtype=torch.int64)
    table = code.codes()
    by_rank = sorted(table.items(), key=lambda kv: (kv[1][1], kv[0]))
    longest = by_rank[-1][1][1]
    symbols_in_order = np.array([s for s, _ in by_rank], dtype=np.int64)
    # limits[i]: first left-aligned window value past the codes of length <= lengths_[i]
    lengths_ = sorted({length for _, (_, length) in by_rank})
    limits, first_code, first_rank = [], [], []
    rank = 0
    for length in lengths_:
        members = [(s, c) for s, (c, n) in by_rank if n == length]
        first_code.append(members[0][1])
        first_rank.append(rank)
        rank += len(members)
        limits.append((members[-1][1] + 1) << (longest - length))
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:n_bits].astype(np.uint64)
    padded = np.concatenate([bits, np.zeros(longest, dtype=np.uint64)])
    window = np.zeros(n_bits, dtype=np.uint64)
    for j in range(longest):
        window = (window << np.uint64(1)) | padded[j : j + n_bits]
    which = np.searchsorted(np.array(limits, dtype=np.uint64), window, side="right")
    valid = which < len(lengths_)
    which = np.minimum(which, len(lengths_) - 1)
    length_at = np.array(lengths_, dtype=np.int64)[which]
    shift = (longest - length_at).astype(np.uint64)
    index = (window >> shift).astype(np.int64) - np.array(first_code, dtype=np.int64)[which]
    index += np.array(first_rank, dtype=np.int64)[which]
    hops = np.where(valid, length_at, 0).tolist()
    starts: list[int] = []
    pos = 0
    while pos < n_bits and len(starts) < count:
        hop = hops[pos]
        if hop == 0:
            raise DataError("Huffman stream is corrupt: no code matches")
        starts.append(pos)
        pos += hop
    if pos != n_bits or len(starts) != count:
        raise DataError(
            f"Huffman stream is corrupt: decoded {len(starts)} symbols in {pos} bits, "
            f"expected {count} in {n_bits}"
        )
    at = np.array(starts, dtype=np.int64)
    return torch.from_numpy(symbols_in_order[index[at]].copy())
