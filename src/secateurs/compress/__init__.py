"""Realization: how a pruned model is stored: sparse formats, weight sharing, Huffman coding."""

from secateurs.compress.formats import (
    BlockCSR,
    PackedNM,
    RelativeCSR,
    to_block_csr,
    to_packed_nm,
    to_relative_csr,
)
from secateurs.compress.huffman import HuffmanCode, build_code, decode, encode
from secateurs.compress.sharing import SharedWeights, share_weights

__all__ = [
    "BlockCSR",
    "HuffmanCode",
    "PackedNM",
    "RelativeCSR",
    "SharedWeights",
    "build_code",
    "decode",
    "encode",
    "share_weights",
    "to_block_csr",
    "to_packed_nm",
    "to_relative_csr",
]
