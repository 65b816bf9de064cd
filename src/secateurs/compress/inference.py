"""Sparse inference: layers that compute with their nonzeros only, used only where that is faster.

A pruned layer stored densely still reads and multiplies every zero. The modules here keep the
weight as a torch sparse tensor and multiply with it directly:

* :class:`SparseLinear` / :class:`BlockSparseLinear`: ``x @ W.T + b`` with ``W`` in CSR
  (compressed sparse rows) or BSR (square blocks, for block-pruned weights);
* :class:`SparseConv2d`: a 1x1 convolution as one matmul, any other kernel through im2col
  (``F.unfold``) and a matmul, stride / padding / dilation / padding mode preserved;
* :class:`SemiStructuredLinear`: 2:4 sparsity on CUDA GPUs of compute capability 8.0 and up,
  through :func:`torch.sparse.to_sparse_semi_structured` (sparse tensor cores).

Whether a sparse kernel beats the dense one depends on the machine, the density, the layer's
shape and the batch: at 95% sparsity a 4096x4096 layer at batch 1 reads ~9.5x fewer bytes and
runs many times faster, while at 50% sparsity and batch 256 the dense GEMM wins by far.
:func:`sparsify_` therefore *measures* every candidate against the dense layer on this machine,
at the example's shapes, and swaps a layer only where the sparse one is faster by a margin;
:func:`densify_` turns every sparse module back into a plain ``nn.Linear`` / ``nn.Conv2d``.

Formulation, measured on a 2-core AVX2 CPU with torch 2.14 (MKL sparse BLAS): the weight is
multiplied from the left, ``addmm(b, W, x.T).T`` (``addmv`` for one row, 2-3x faster than a
one-column ``addmm``); 32-bit indices (MKL's native index type: 64-bit indices are converted
on every call, 1.5-2x slower); the result copied to the row-major layout ``nn.Linear`` returns.
``x @ W_csr.T`` (dense @ sparse), CSC weights and a column-major output were 2x to several
hundred times slower. BSR runs through MKL too (square blocks only); its matrix-vector product
is slow, so BSR always uses the matrix product.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.errors import ConfigError, ModelError, SecateursError
from secateurs.provenance import forget, record
from secateurs.running import EvalMode, Inputs, run_example

#: Sparse formats :func:`sparsify_` can choose: CSR, BSR (CPU and CUDA) and 2:4 (CUDA, sm80+).
FORMATS: tuple[str, ...] = ("csr", "bsr", "2:4")

#: Square block sizes tried for BSR, largest first (MKL supports square blocks only).
BLOCK_SIZES: tuple[int, ...] = (32, 16, 8, 4)

#: A larger BSR block is preferred while it stores at most this many times the values of the
#: block size that stores the fewest (bigger blocks run faster per stored value).
_BLOCK_FILL_SLACK = 1.5

_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- helpers


def _effective(module: nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` as the model computes with it (a mask applied), detached."""
    t = getattr(module, name, None)
    return t.detach() if isinstance(t, Tensor) else None


def _kind(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


def _quiet_sparse(fn: Callable[[], Tensor]) -> Tensor:
    """Run ``fn`` with torch's one-time "sparse support is in beta" warnings silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return fn()


def choose_block(matrix: Tensor, sizes: Sequence[int] = BLOCK_SIZES) -> int | None:
    """The BSR block size for ``matrix``: the largest size dividing both dimensions whose
    stored values are within 1.5x of the fewest any allowed size stores; ``None`` if none
    divides both dimensions (MKL needs square blocks that tile the matrix exactly)."""
    rows, cols = matrix.shape
    nonzero = matrix.detach() != 0
    stored: dict[int, int] = {}
    for b in sizes:
        if b < 1 or rows % b or cols % b:
            continue
        blocks = nonzero.reshape(rows // b, b, cols // b, b).any(dim=(1, 3))
        stored[b] = int(blocks.sum()) * b * b
    if not stored:
        return None
    fewest = min(stored.values())
    return max(b for b, n in stored.items() if n <= _BLOCK_FILL_SLACK * max(fewest, 1))


def _check_format(format: str, block: int | None) -> None:
    if format not in ("csr", "bsr"):
        raise ConfigError(f"format must be 'csr' or 'bsr'; got {format!r}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ConfigError(f"block must be a positive integer (a square block side); got {block!r}")


# --------------------------------------------------------------------------- CSR / BSR core


def _dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` ([out, in]) and ``bias``."""
    out_features, in_features = weight.shape
    out = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None and out.bias is not None:
            out.bias.copy_(bias)
    return out


class _SparseMatmul(nn.Module):
    """A ``[rows, cols]`` weight matrix in CSR or BSR, and an optional bias of ``rows``.

    The components are stored as plain tensors (``crow_indices``, ``col_indices`` buffers and a
    ``values`` parameter) and the sparse tensor is assembled on each call (~3 us): a torch
    sparse tensor cannot be deep-copied or saved with safetensors, plain tensors can, and
    ``.to(device / dtype)`` moves them like any module's state. ``values`` and ``bias`` are
    parameters that need no gradient, so ``model.parameters()`` still finds the model's device
    and counts what is stored.
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, matrix: Tensor, bias: Tensor | None, format: str, block: int | None) -> None:
        super().__init__()
        _check_format(format, block)
        matrix = matrix.detach()
        rows, cols = matrix.shape
        if format == "bsr":
            if block is None:
                block = choose_block(matrix)
                if block is None:
                    raise ModelError(
                        f"no square block size in {BLOCK_SIZES} divides the weight matrix "
                        f"{rows}x{cols}; pass block= a common divisor of both, or use format='csr'"
                    )
            elif rows % block or cols % block:
                raise ModelError(
                    f"block {block} does not divide the weight matrix {rows}x{cols}; BSR needs "
                    "square blocks that tile it exactly (pick a common divisor, or use 'csr')"
                )
            bsize = block
            sparse = _quiet_sparse(lambda: matrix.to_sparse_bsr((bsize, bsize)))
        else:
            block = None
            sparse = _quiet_sparse(matrix.to_sparse_csr)
        crow, col = sparse.crow_indices(), sparse.col_indices()
        # 32-bit indices are MKL's (and cuSPARSE's) native type: 64-bit ones are converted on
        # every call (measured 1.5-2x slower on CPU)
        if max(col.numel(), rows, cols) <= _INT32_MAX:
            crow, col = crow.to(torch.int32), col.to(torch.int32)
        self.format = format
        self._csr = format == "csr"
        self.block = block
        self.matrix_shape = (rows, cols)
        self.register_buffer("crow_indices", crow.contiguous())
        self.register_buffer("col_indices", col.contiguous())
        self.values = nn.Parameter(sparse.values().contiguous(), requires_grad=False)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def nnz(self) -> int:
        """Stored values (for BSR: whole blocks, zeros inside them included)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """Fraction of the matrix's entries that are stored."""
        return self.nnz / max(math.prod(self.matrix_shape), 1)

    def sparse_weight(self) -> Tensor:
        """The weight matrix as a torch sparse CSR / BSR tensor (a view of the stored parts)."""
        # read through the module's dicts: nn.Module.__getattr__ costs ~1 us per name, and this
        # runs on every call of layers whose whole forward takes ~10 us
        build = torch.sparse_csr_tensor if self._csr else torch.sparse_bsr_tensor
        return build(
            cast(Tensor, self._buffers["crow_indices"]),
            cast(Tensor, self._buffers["col_indices"]),
            cast(Tensor, self._parameters["values"]),
            self.matrix_shape,
            check_invariants=False,
        )

    def dense_matrix(self) -> Tensor:
        """The weight matrix as a dense ``[rows, cols]`` tensor."""
        return _quiet_sparse(lambda: self.sparse_weight().to_dense())

    def _project(self, x_t: Tensor) -> Tensor:
        """``W @ x_t + bias[:, None]`` for a dense ``[cols, m]`` ``x_t``; ``[rows, m]``."""
        w = self.sparse_weight()
        bias = self._parameters["bias"]
        if bias is None:
            return torch.mm(w, x_t)
        return torch.addmm(bias.unsqueeze(1), w, x_t)

    def _rows(self, x2: Tensor) -> Tensor:
        """``x2 @ W.T + bias`` for a dense ``[n, cols]`` ``x2``; row-major ``[n, rows]``."""
        if x2.shape[0] == 1 and self._csr:  # MKL's mv is 2-3x faster than a 1-column mm
            w = self.sparse_weight()
            bias = self._parameters["bias"]
            x1 = x2.reshape(-1)
            y = torch.mv(w, x1) if bias is None else torch.addmv(bias, w, x1)
            return y.view(1, -1)
        return self._project(x2.T).T.contiguous()

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # the number of stored values differs between weights: take the incoming sizes
        for name in ("col_indices", "values", "crow_indices"):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, Tensor) and incoming.shape != current.shape:
                fresh = torch.empty(incoming.shape, dtype=incoming.dtype, device=current.device)
                if name == "values":
                    self.values = nn.Parameter(fresh.to(current.dtype), requires_grad=False)
                else:
                    setattr(self, name, fresh)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _extra(self) -> str:
        rows, cols = self.matrix_shape
        block = f", block={self.block}" if self.block else ""
        return (
            f"format={self.format!r}{block}, matrix={rows}x{cols}, "
            f"stored={self.nnz} ({self.density:.2%}), bias={self.bias is not None}"
        )


class SparseLinear(_SparseMatmul):
    """``nn.Linear`` computing with a CSR (or BSR) weight: ``y = x @ W.T + b``.

    Built from a Linear (a masked one is read through its mask); any leading batch dimensions
    are accepted, and outputs equal the dense layer's to float rounding. CPU sparse BLAS (MKL)
    supports float32 and float64. An inference module: its tensors need no gradient (inputs
    still get gradients). ``to_dense_module()`` gives the plain ``nn.Linear`` back.
    """

    def __init__(self, linear: nn.Linear, *, format: str = "csr", block: int | None = None) -> None:
        if not isinstance(linear, nn.Linear):
            raise ModelError(f"SparseLinear is built from an nn.Linear; got {_kind(linear)}")
        weight = _effective(linear, "weight")
        assert weight is not None
        super().__init__(weight, _effective(linear, "bias"), format, block)
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return self._rows(x)
        lead = x.shape[:-1]
        return self._rows(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def to_dense_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's weight (zeros stored) and bias."""
        return _dense_linear(self.dense_matrix(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._extra()}"


class BlockSparseLinear(SparseLinear):
    """:class:`SparseLinear` with the weight in BSR: square ``block x block`` tiles.

    Pays off for block-pruned weights (whole tiles zero), where it stores few explicit zeros
    and runs dense micro-kernels per tile; on element-wise sparse weights it stores many zeros
    and CSR is faster. ``block=None`` picks the size with :func:`choose_block`.
    """

    def __init__(self, linear: nn.Linear, *, block: int | None = None) -> None:
        super().__init__(linear, format="bsr", block=block)


class SparseConv2d(_SparseMatmul):
    """``nn.Conv2d`` computing with a CSR / BSR weight matrix ``[out, in * kh * kw]``.

    A 1x1 kernel without padding is one matmul over the pixels; any other kernel unfolds the
    input into columns (im2col, ``F.unfold``) first. Stride, padding (numbers, ``'same'``,
    ``'valid'``), dilation and padding mode are preserved; grouped convolutions are not
    supported (their weight is not one matrix). Accepts batched ``[n, c, h, w]`` and unbatched
    ``[c, h, w]`` inputs.
    """

    def __init__(self, conv: nn.Conv2d, *, format: str = "csr", block: int | None = None) -> None:
        if not isinstance(conv, nn.Conv2d):
            raise ModelError(f"SparseConv2d is built from an nn.Conv2d; got {_kind(conv)}")
        if conv.groups != 1:
            raise ModelError(
                f"a grouped convolution (groups={conv.groups}) has no single weight matrix; "
                "only groups=1 convolutions can be made sparse"
            )
        weight = _effective(conv, "weight")
        assert weight is not None
        super().__init__(
            weight.reshape(weight.shape[0], -1), _effective(conv, "bias"), format, block
        )
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = (int(conv.kernel_size[0]), int(conv.kernel_size[1]))
        self.stride = (int(conv.stride[0]), int(conv.stride[1]))
        self.dilation = (int(conv.dilation[0]), int(conv.dilation[1]))
        self.padding: str | tuple[int, int] = (
            conv.padding
            if isinstance(conv.padding, str)
            else (int(conv.padding[0]), int(conv.padding[1]))
        )
        self.padding_mode = conv.padding_mode
        left, right, top, bottom = (int(p) for p in conv._reversed_padding_repeated_twice)
        self._symmetric = conv.padding_mode == "zeros" and left == right and top == bottom
        self._pad = (left, right, top, bottom)

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self._symmetric:
            pad_hw = (self._pad[2], self._pad[0])
        else:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
            pad_hw = (0, 0)
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        out_h = (h + 2 * pad_hw[0] - dh * (kh - 1) - 1) // sh + 1
        out_w = (w + 2 * pad_hw[1] - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw) == (1, 1) and pad_hw == (0, 0):
            cols = x[:, :, ::sh, ::sw]  # [n, c, out_h, out_w]
            pixels = cols.reshape(n, c, out_h * out_w)
        else:
            pixels = F.unfold(x, (kh, kw), self.dilation, pad_hw, self.stride)  # [n, c*k, L]
        if n == 1:
            y = self._project(pixels[0]).reshape(1, self.out_channels, out_h, out_w)
        else:
            x_t = pixels.transpose(0, 1).reshape(pixels.shape[1], n * out_h * out_w)
            y = self._project(x_t).reshape(self.out_channels, n, out_h, out_w)
            y = y.transpose(0, 1).contiguous()
        return y[0] if unbatched else y

    def to_dense_module(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with this layer's configuration, weight (zeros stored) and bias."""
        w = self.dense_matrix()
        out = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(w.reshape(out.weight.shape))
            if self.bias is not None and out.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"padding_mode={self.padding_mode!r}, {self._extra()}"
        )


# --------------------------------------------------------------------------- 2:4 on GPU

#: Documented minimum sparse-matrix tile per dtype: rows and columns must be multiples of these
#: (torch.sparse.semi_structured, cuSPARSELt / CUTLASS back ends), used if torch's own table
#: cannot be read.
_SEMI_STRUCTURED_TILE: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
}


def _semi_structured_backend() -> str:
    cusparselt = getattr(torch.backends, "cusparselt", None)
    available = cusparselt is not None and bool(cusparselt.is_available())
    forced = bool(getattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False))
    return "cusparselt" if available and not forced else "cutlass"


def _semi_structured_tile(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    cls = (
        torch.sparse.SparseSemiStructuredTensorCUSPARSELT
        if backend == "cusparselt"
        else torch.sparse.SparseSemiStructuredTensorCUTLASS
    )
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {})
    if dtype in table:
        config = table[dtype]
        return int(config.sparse_min_rows), int(config.sparse_min_cols)
    return _SEMI_STRUCTURED_TILE[backend][dtype]


def semi_structured_unsupported(device: torch.device | str | None = None) -> str | None:
    """Why 2:4 sparse tensor cores cannot be used on ``device`` (default: the current CUDA
    device), or ``None`` when they can: a CUDA GPU of compute capability 8.0 or higher."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        return f"the layer is on {dev}, not on a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) < (8, 0):
        return f"the GPU has compute capability {major}.{minor}; 2:4 sparsity needs 8.0 or higher"
    return None


def check_semi_structured(weight: Tensor) -> None:
    """Raise :class:`ModelError` unless ``weight`` can become a 2:4 semi-structured tensor.

    Requirements (torch.sparse.to_sparse_semi_structured): a 2-D float16 / bfloat16 weight whose
    every group of 4 consecutive inputs holds at most 2 nonzeros, with rows and columns
    multiples of the back end's tile (16x16 for cuSPARSELt, 32x64 for CUTLASS), on a CUDA GPU
    of compute capability 8.0 or higher.
    """
    if weight.dim() != 2:
        raise ModelError(f"2:4 sparsity needs a 2-D weight; got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ModelError(
            f"2:4 sparse tensor cores run float16 or bfloat16; the weight is {weight.dtype}. "
            "Convert the layer first (layer.half() or layer.to(torch.bfloat16))"
        )
    if cols % 4:
        raise ModelError(f"2:4 sparsity needs in_features divisible by 4; got {cols}")
    worst = int(weight.reshape(rows, cols // 4, 4).ne(0).sum(-1).max()) if weight.numel() else 0
    if worst > 2:
        raise ModelError(
            f"the weight is not 2:4 sparse: a group of 4 consecutive inputs holds {worst} "
            "nonzeros (at most 2 allowed). Prune it with structure=NM(2, 4) first"
        )
    backend = _semi_structured_backend()
    tile_rows, tile_cols = _semi_structured_tile(backend, weight.dtype)
    if rows < tile_rows or rows % tile_rows or cols < tile_cols or cols % tile_cols:
        raise ModelError(
            f"weight {rows}x{cols} is not supported by the {backend} 2:4 kernels for "
            f"{weight.dtype}: out_features must be a multiple of {tile_rows} and in_features "
            f"a multiple of {tile_cols}"
        )
    reason = semi_structured_unsupported(weight.device)
    if reason is not None:
        raise ModelError(
            f"2:4 sparse tensor cores are unavailable: {reason}. Keep the layer dense, or move "
            "the model to a CUDA GPU of compute capability 8.0+ (A100, H100, RTX 30xx and later)"
        )


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` whose 2:4 sparse weight runs on sparse tensor cores (CUDA, sm80+).

    The weight is compressed with :func:`torch.sparse.to_sparse_semi_structured` (cuSPARSELt
    when torch has it, else CUTLASS): half the values plus 2-bit positions, multiplied at up to
    twice the dense rate. Needs a float16 / bfloat16 weight that is 2:4 sparse along the input
    dimension (as ``structure=NM(2, 4)`` prunes it) with shapes the kernels accept; see
    :func:`check_semi_structured`. Inputs must have the weight's dtype.
    """

    bias: nn.Parameter | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ModelError(
                f"SemiStructuredLinear is built from an nn.Linear; got {_kind(linear)}"
            )
        weight = _effective(linear, "weight")
        assert weight is not None
        check_semi_structured(weight)
        dense = weight.contiguous()
        if _semi_structured_backend() == "cusparselt":
            packed = torch.sparse.to_sparse_semi_structured(dense)
        else:  # torch only falls back to CUTLASS through a global flag: ask for it directly
            packed = torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense(dense)
        self.weight = nn.Parameter(packed, requires_grad=False)
        bias = _effective(linear, "bias")
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*lead, self.out_features)

    def to_dense_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's weight (zeros stored) and bias."""
        return _dense_linear(self.weight.to_dense(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format='2:4', bias={self.bias is not None}"
        )


#: Every module :func:`densify_` turns back into a dense layer.
SPARSE_MODULES: tuple[type[nn.Module], ...] = (SparseLinear, SparseConv2d, SemiStructuredLinear)


def to_sparse_module(module: nn.Module, format: str = "csr", block: int | None = None) -> nn.Module:
    """The sparse version of a Linear / Conv2d in ``format`` (``'csr'``, ``'bsr'``, ``'2:4'``)."""
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {list(FORMATS)}; got {format!r}")
    if format == "2:4":
        if not isinstance(module, nn.Linear):
            raise ModelError(f"2:4 sparse tensor cores are used for nn.Linear; got {_kind(module)}")
        return SemiStructuredLinear(module)
    if isinstance(module, nn.Linear):
        return SparseLinear(module, format=format, block=block)
    if isinstance(module, nn.Conv2d):
        return SparseConv2d(module, format=format, block=block)
    raise ModelError(f"only nn.Linear and nn.Conv2d have sparse versions; got {_kind(module)}")


def _dense_copy(module: nn.Module) -> nn.Module:
    """``module`` without masks (a copy with the effective weights baked in): what ships."""
    if not parametrize.is_parametrized(module):
        return module
    plain = copy.deepcopy(module)
    container = plain.parametrizations
    assert isinstance(container, nn.ModuleDict)
    for tensor_name in list(container.keys()):
        parametrize.remove_parametrizations(plain, tensor_name, leave_parametrized=True)
    return plain


# --------------------------------------------------------------------------- sparsify_


@dataclass
class LayerChoice:
    """What :func:`sparsify_` measured and decided for one Linear / Conv2d.

    ``chosen`` is the format the layer now runs in (``'dense'`` when left as it was).
    ``dense_ms`` / ``sparse_ms`` are median times of one call at ``input_shape`` (``sparse_ms``
    is the fastest sparse candidate's, named by ``sparse_format``), ``*_p75_ms`` the upper
    quartiles (the slower runs a loaded machine produces); ``candidates`` holds every
    measured format's median (``None``: not measured, see ``reason``). ``None`` times: the
    layer was not measured (no zeros, never called, not convertible).
    """

    name: str
    kind: str
    shape: list[int]
    density: float
    chosen: str
    reason: str
    input_shape: list[int] | None = None
    dense_ms: float | None = None
    sparse_ms: float | None = None
    dense_p75_ms: float | None = None
    sparse_p75_ms: float | None = None
    sparse_format: str | None = None
    block: int | None = None
    candidates: dict[str, float | None] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        """Dense time over the best sparse time (above 1: sparse is faster)."""
        if self.dense_ms is None or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class SparsifyReport:
    """Per-layer decisions of :func:`sparsify_`, with the timings they rest on."""

    layers: list[LayerChoice]
    formats: list[str]
    min_speedup: float
    repeats: int
    threads: int
    device: str

    @property
    def replaced(self) -> list[str]:
        """Names of the layers now running sparse."""
        return [layer.name for layer in self.layers if layer.chosen != "dense"]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form (each layer with its ``speedup``)."""
        layers = [{**asdict(layer), "speedup": layer.speedup} for layer in self.layers]
        return {
            "layers": layers,
            "formats": list(self.formats),
            "min_speedup": self.min_speedup,
            "repeats": self.repeats,
            "threads": self.threads,
            "device": self.device,
            "replaced": self.replaced,
        }

    def __str__(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        head = ("layer", "kind", "density", "chosen", "dense ms", "sparse ms", "speedup")
        rows = [
            (
                layer.name,
                layer.kind,
                f"{layer.density:.2%}",
                layer.chosen,
                ms(layer.dense_ms),
                ms(layer.sparse_ms),
                "-" if layer.speedup is None else f"{layer.speedup:.2f}x",
            )
            for layer in self.layers
        ]
        table = [head, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"{len(self.replaced)} of {len(self.layers)} layers sparse "
            f"(min speedup {self.min_speedup:g}x, {self.threads} threads, {self.device})"
        )
        return "\n".join(lines)


@dataclass
class _Recorded:
    """The first call's inputs of one layer, and how many times it was called."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    calls: int = 1


def _clone(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _record_inputs(
    model: nn.Module, example_inputs: Inputs, layers: dict[str, nn.Module]
) -> dict[str, _Recorded]:
    """Each layer's inputs during one forward pass (eval mode, no_grad), by layer name."""
    recorded: dict[str, _Recorded] = {}
    name_of = {id(m): n for n, m in layers.items()}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = name_of[id(module)]
        if name in recorded:
            recorded[name].calls += 1
        else:
            recorded[name] = _Recorded(_clone(args), _clone(kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers.values()]
    try:
        run_example(model, example_inputs, "at the batch size you will deploy with")
    finally:
        for h in handles:
            h.remove()
    return recorded


def _tolerance(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) ** 0.5 if dtype.is_floating_point else 0.0


def _same_output(sparse: Tensor, dense: Tensor) -> bool:
    if sparse.shape != dense.shape or sparse.dtype != dense.dtype:
        return False
    tol = _tolerance(dense.dtype)
    scale = float(dense.abs().max()) if dense.numel() else 1.0
    return bool(torch.allclose(sparse, dense, rtol=tol, atol=tol * max(scale, 1.0)))


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def time_ms(fn: Callable[[], Any]) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1000.0

    return time_ms


def _interleaved(
    calls: dict[str, Callable[[], Any]],
    rounds: int,
    time_ms: Callable[[Callable[[], Any]], float],
    samples: dict[str, list[float]],
) -> None:
    """Time each call once per round, alternating the order so drifts hit all alike."""
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(time_ms(calls[name]))


def _p75(times: list[float]) -> float:
    """Upper quartile: moved only when over a quarter of the runs are slow, so one stray
    hiccup of a shared machine does not decide, while a kernel that often stalls does."""
    return statistics.quantiles(times, n=4)[-1] if len(times) > 1 else times[0]


def _verdict(dense: list[float], sparse: list[float], min_speedup: float) -> str | None:
    """Why the sparse timings do not beat the dense ones, or ``None`` when they do: the median
    must be ``min_speedup`` times faster and the slower runs (upper quartile) no slower."""
    speedup = statistics.median(dense) / statistics.median(sparse)
    if speedup < min_speedup:
        return f"{speedup:.2f}x dense at the median, below min_speedup {min_speedup:g}"
    if _p75(sparse) > _p75(dense):
        return (
            f"{speedup:.2f}x faster at the median but its slower runs are slower than dense's "
            f"(upper quartile {_p75(sparse):.3f} ms vs {_p75(dense):.3f} ms)"
        )
    return None


@dataclass
class _Plan:
    name: str
    module: nn.Module
    choice: LayerChoice
    replacement: nn.Module | None = None


def _candidates(
    module: nn.Module, formats: Sequence[str], notes: list[str]
) -> dict[str, nn.Module]:
    """The sparse modules to race against ``module``; why others were left out goes to notes."""
    out: dict[str, nn.Module] = {}
    for fmt in formats:
        try:
            out[fmt] = _quiet_build(module, fmt)
        except SecateursError as exc:
            notes.append(f"{fmt}: {exc}")
    return out


def _quiet_build(module: nn.Module, fmt: str) -> nn.Module:
    if fmt == "2:4" and isinstance(module, nn.Linear):
        weight = _effective(module, "weight")
        assert weight is not None
        check_semi_structured(weight)
    return to_sparse_module(module, fmt)


def _decide(
    name: str,
    module: nn.Module,
    recorded: _Recorded | None,
    formats: Sequence[str],
    min_speedup: float,
    repeats: int,
    warmup: int,
) -> _Plan:
    weight = _effective(module, "weight")
    assert weight is not None
    density = int(torch.count_nonzero(weight)) / max(weight.numel(), 1)
    choice = LayerChoice(name, _kind(module), list(weight.shape), density, "dense", "")
    plan = _Plan(name, module, choice)
    if recorded is None:
        choice.reason = "not called by the example inputs; left dense"
        return plan
    first = next((a for a in recorded.args if isinstance(a, Tensor)), None)
    choice.input_shape = list(first.shape) if first is not None else None
    if density == 1.0:
        choice.reason = "no zero weights; dense is fastest"
        return plan
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        choice.reason = f"grouped convolution (groups={module.groups}) has no sparse version"
        return plan

    notes: list[str] = []
    candidates = _candidates(module, formats, notes)
    dense = _dense_copy(module)
    args, kwargs = recorded.args, recorded.kwargs
    calls: dict[str, Callable[[], Any]] = {}

    def bound(m: nn.Module) -> Callable[[], Any]:
        return lambda: m(*args, **kwargs)

    with torch.inference_mode():
        reference = dense(*args, **kwargs)
        for fmt, sparse in candidates.items():
            try:
                out = sparse(*args, **kwargs)
            except Exception as exc:  # e.g. a dtype the sparse kernels lack
                notes.append(f"{fmt}: failed on the layer's input ({type(exc).__name__}: {exc})")
                continue
            if not isinstance(out, Tensor) or not _same_output(out, reference):
                notes.append(f"{fmt}: output differs from the dense layer; not used")
                continue
            calls[fmt] = bound(sparse)
        choice.candidates = {fmt: None for fmt in formats}
        if not calls:
            choice.reason = "; ".join(notes) or "no sparse candidate"
            return plan

        time_ms = _timer(reference.device)
        all_calls: dict[str, Callable[[], Any]] = {"dense": bound(dense), **calls}
        samples: dict[str, list[float]] = {k: [] for k in all_calls}
        _interleaved(all_calls, warmup, time_ms, {k: [] for k in all_calls})
        early = min(3, repeats)
        _interleaved(all_calls, early, time_ms, samples)
        if repeats > early:
            # stop timing candidates already far slower than dense: they cannot win
            dense_ms = statistics.median(samples["dense"])
            for fmt in list(calls):
                if statistics.median(samples[fmt]) > 2.0 * dense_ms:
                    notes.append(f"{fmt}: over 2x slower than dense after {early} rounds")
                    del all_calls[fmt]
            _interleaved(all_calls, repeats - early, time_ms, samples)
        medians = {k: statistics.median(v) for k, v in samples.items()}
        best = min((k for k in medians if k != "dense"), key=lambda k: medians[k])
        first_verdict = _verdict(samples["dense"], samples[best], min_speedup)
        confirmed = False
        if first_verdict is None:
            # a shared machine produces streaks of slow runs: confirm with a second race
            again: dict[str, list[float]] = {"dense": [], best: []}
            pair = {"dense": all_calls["dense"], best: all_calls[best]}
            _interleaved(pair, repeats, time_ms, again)
            confirmed = _verdict(again["dense"], again[best], min_speedup) is None
            for k in again:
                samples[k].extend(again[k])
            medians.update({k: statistics.median(samples[k]) for k in again})

    choice.dense_ms = medians["dense"]
    choice.sparse_ms = medians[best]
    choice.dense_p75_ms = _p75(samples["dense"])
    choice.sparse_p75_ms = _p75(samples[best])
    choice.sparse_format = best
    choice.candidates.update({k: v for k, v in medians.items() if k != "dense"})
    winner = candidates[best]
    if isinstance(winner, _SparseMatmul):
        choice.block = winner.block
    speedup = medians["dense"] / medians[best]
    overall = _verdict(samples["dense"], samples[best], min_speedup)
    if confirmed and overall is None:
        choice.chosen = best
        plan.replacement = winner
        notes.insert(0, f"{best} is {speedup:.2f}x faster than dense")
    elif first_verdict is None:
        notes.insert(0, f"{best} won the first race but not the confirmation; kept dense")
    else:
        notes.insert(0, f"{best}: {first_verdict}; kept dense")
    if recorded.calls > 1:
        notes.append(f"called {recorded.calls} times; timed at its first call's input")
    choice.reason = "; ".join(notes)
    return plan


def _validate(
    formats: str | Sequence[str], min_speedup: float, repeats: int, warmup: int
) -> tuple[str, ...]:
    chosen = (formats,) if isinstance(formats, str) else tuple(formats)
    if not chosen:
        raise ConfigError(f"formats must name at least one of {list(FORMATS)}; got none")
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown sparse format(s) {unknown}; allowed: {list(FORMATS)}")
    if (
        isinstance(min_speedup, bool)
        or not isinstance(min_speedup, (int, float))
        or not math.isfinite(min_speedup)
        or min_speedup < 1.0
    ):
        raise ConfigError(
            f"min_speedup must be a finite number >= 1.0 (a sparse layer must be at least as "
            f"fast as the dense one); got {min_speedup!r}"
        )
    for label, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{label} must be an integer >= {low}; got {value!r}")
    return tuple(dict.fromkeys(chosen))


def _check_inputs(example_inputs: object) -> None:
    if not isinstance(example_inputs, (Tensor, tuple, list, Mapping)):
        raise ConfigError(
            "example_inputs must be a Tensor, a tuple of positional inputs or a mapping of "
            f"keyword inputs; got {type(example_inputs).__name__}"
        )


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` everywhere ``old`` is registered in ``model`` (shared modules included)."""
    for parent in list(model.modules()):
        # not named_children(): it lists a module registered twice in one parent only once
        for attr, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, attr, new)


def sparsify_(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    formats: str | Sequence[str] = ("csr", "bsr"),
    min_speedup: float = 1.1,
    repeats: int = 11,
    warmup: int = 2,
) -> nn.Module:
    """Swap each Linear / Conv2d holding zeros for a sparse module where that is measurably
    faster, in place; returns ``model``.

    One forward pass on ``example_inputs`` records every layer's input (so use the batch shape
    you will deploy with). Then, layer by layer, the dense layer and a sparse module per format
    in ``formats`` (``'csr'``, ``'bsr'``, ``'2:4'``) are timed on that input on this machine
    (interleaved rounds, medians of ``repeats``); a candidate whose output differs from the
    dense layer's is discarded. A layer is replaced only when its fastest sparse candidate is
    at least ``min_speedup`` times faster at the median with its slower runs (upper quartile)
    no slower than dense's, confirmed by a second, independent race: no layer is made slower.
    (Multi-threaded sparse kernels stall more than dense ones when other processes hold a
    core; the tail check keeps such layers dense.) Layers never called by the forward pass (e.g. a projection that
    ``nn.MultiheadAttention`` applies functionally), grouped convolutions and layers without
    zeros stay dense, with the reason in the report.

    Masked (parametrized) layers are read through their masks and timed against their plain
    dense version; a replaced layer loses its mask (sparse modules are for inference).
    Everything is checked and measured before the model is touched, in eval mode under
    ``torch.inference_mode``; each module's train/eval mode is restored. :func:`densify_`
    undoes the swap. The decisions and the timings they rest on are recorded on the model:
    ``sc.report_of(model, sc.SparsifyReport)``.
    """
    fmts = _validate(formats, min_speedup, repeats, warmup)
    _check_inputs(example_inputs)
    layers: dict[str, nn.Module] = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name
    }
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        raise ModelError(
            "sparsify_ replaces layers inside a model; wrap a single layer in nn.Sequential"
        )
    if not layers:
        raise ModelError(
            f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer to make sparse "
            "(sparsify_ converts only these; already-sparse modules are left as they are)"
        )
    recorded = _record_inputs(model, example_inputs, layers)
    plans: list[_Plan] = []
    with EvalMode(model):
        for name, module in layers.items():
            plans.append(
                _decide(name, module, recorded.get(name), fmts, float(min_speedup), repeats, warmup)
            )
    for plan in plans:
        if plan.replacement is not None:
            plan.replacement.train(plan.module.training)
            _replace(model, plan.module, plan.replacement)
    device = next((str(t.device) for t in (*model.parameters(), *model.buffers())), "cpu")
    record(
        model,
        SparsifyReport(
            [p.choice for p in plans],
            list(fmts),
            float(min_speedup),
            repeats,
            torch.get_num_threads(),
            device,
        ),
    )
    return model


def densify_(model: nn.Module) -> nn.Module:
    """Replace every sparse module in ``model`` by its plain ``nn.Linear`` / ``nn.Conv2d``.

    The dense layers hold the same values (zeros stored), so outputs are unchanged. Returns
    ``model``; a model without sparse modules is returned as it is.
    """
    if isinstance(model, SPARSE_MODULES):
        raise ModelError(
            "densify_ replaces modules inside a model; call .to_dense_module() on a single layer"
        )
    found = [
        m
        for m in model.modules()
        if isinstance(m, (SparseLinear, SparseConv2d, SemiStructuredLinear))
    ]
    for module in found:
        dense = module.to_dense_module()
        dense.train(module.training)
        _replace(model, module, dense)
    forget(model, SparsifyReport)
    return model
