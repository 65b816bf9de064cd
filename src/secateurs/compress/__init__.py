"""Realization: how a pruned model is stored and run: sparse formats and kernels, weight
sharing, linear quantization, Huffman coding, the compressed model file, BatchNorm folding."""

from secateurs.compress.codec import (
    CompressConfig,
    CompressedInfo,
    inspect_compressed,
    load_compressed,
    save_compressed,
)
from secateurs.compress.fold import fold_batchnorm
from secateurs.compress.formats import (
    BlockCSR,
    PackedNM,
    RelativeCSR,
    to_block_csr,
    to_packed_nm,
    to_relative_csr,
)
from secateurs.compress.huffman import HuffmanCode, build_code, decode, encode
from secateurs.compress.inference import (
    BlockSparseLinear,
    LayerChoice,
    SemiStructuredLinear,
    SparseConv2d,
    SparseLinear,
    SparsifyReport,
    densify_,
    sparsify_,
    to_sparse_module,
)
from secateurs.compress.lowrank import (
    FactorizedLayer,
    LowRankReport,
    SkippedLayer,
    factorize_,
    factorize_conv,
    factorize_linear,
    rank_for_energy,
)
from secateurs.compress.quantize import LinearQuantized, quantize_linear
from secateurs.compress.sharing import Shared, SharedWeights, share_weights, share_weights_

__all__ = [
    "BlockCSR",
    "BlockSparseLinear",
    "CompressConfig",
    "CompressedInfo",
    "FactorizedLayer",
    "HuffmanCode",
    "LayerChoice",
    "LinearQuantized",
    "LowRankReport",
    "PackedNM",
    "RelativeCSR",
    "SemiStructuredLinear",
    "Shared",
    "SharedWeights",
    "SkippedLayer",
    "SparseConv2d",
    "SparseLinear",
    "SparsifyReport",
    "build_code",
    "decode",
    "densify_",
    "encode",
    "factorize_",
    "factorize_conv",
    "factorize_linear",
    "fold_batchnorm",
    "inspect_compressed",
    "load_compressed",
    "quantize_linear",
    "rank_for_energy",
    "save_compressed",
    "share_weights",
    "share_weights_",
    "sparsify_",
    "to_block_csr",
    "to_packed_nm",
    "to_relative_csr",
    "to_sparse_module",
]
