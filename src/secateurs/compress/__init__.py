"""Realization: how a pruned model is stored. Sparse formats for now."""

from secateurs.compress.formats import (
    BlockCSR,
    PackedNM,
    RelativeCSR,
    to_block_csr,
    to_packed_nm,
    to_relative_csr,
)

__all__ = ["BlockCSR", "PackedNM", "RelativeCSR", "to_block_csr", "to_packed_nm", "to_relative_csr"]
