"""The compressed model file (``.sct``): a pruned, quantized, Huffman-coded ``state_dict``.

Deep Compression's pipeline ends in a file: pruned weights stored sparsely, each kept weight a
few-bit index into a shared codebook, indices and position gaps Huffman-coded. This module writes
and reads that file. It never unpickles anything: the header is JSON, the payload raw bytes.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic b"SECATEUR"
    8       2     format version (uint16), currently 1
    10      2     flags (uint16), 0
    12      4     header length H (uint32)
    16      H     header: zlib-compressed UTF-8 JSON (see below)
    16+H    P     payload: the sections of every tensor, back to back
    end-32  32    SHA-256 of every byte before it

The header holds ``{"format", "version", "secateurs", "config", "metadata", "payload_bytes",
"tensors": [...]}``. Each tensor entry names the state-dict key, shape, dtype and encoding and
lists its sections as ``[offset into the payload, length, CRC-32]``:

* ``raw``: the tensor's bytes (biases, norms, buffers, anything not quantized).
* ``kmeans``: ``codebook`` (the shared values, the tensor's dtype) and ``codes``.
* ``linear``: ``scales`` (float32, one per row) and ``codes`` (level + max level).
* ``float``: ``values`` (float32 of every stored entry), sparse layout only.

Quantized tensors have a *layout*: ``dense`` stores one code per element (a pruned weight has the
symbol for zero); ``sparse`` stores only kept weights plus a ``gaps`` stream, the zeros skipped
before each entry over the flattened tensor, ``index_bits`` wide, with filler entries (value zero)
bridging longer runs. Symbol streams are Huffman-coded (a code-length byte per symbol, then the
bits) or fixed-width. Each tensor takes whichever layout and index width is smallest.

A file that is truncated, altered (checksum), of a newer version or not ours is rejected with a
:class:`~secateurs.errors.DataError` before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs._version import __version__
from secateurs.compress.formats import check_bits, gaps_with_fillers
from secateurs.compress.huffman import HuffmanCode, build_code, code_from_counts, decode, encode
from secateurs.compress.quantize import LinearQuantized, quantize_linear
from secateurs.compress.sharing import (
    DEFAULT_BITS,
    SharedWeights,
    bits_for,
    check_layer_bits,
    get_shared,
    sharable,
    share_weights,
)
from secateurs.errors import ConfigError, DataError, ModelError
from secateurs.registry import build_dataclass

MAGIC = b"SECATEUR"
VERSION = 1
_PREFIX = struct.Struct("<8sHHI")
CHECKSUM_BYTES = 32
MAX_HEADER_BYTES = 64 << 20
QUANTIZATIONS = ("kmeans", "linear", "none")
#: Index widths tried when ``index_bits`` is left to the codec.
AUTO_INDEX_BITS = tuple(range(2, 13))

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


@dataclass
class CompressConfig:
    """How :func:`save_compressed` encodes the weights it quantizes.

    ``quantization``: ``kmeans`` (weight sharing, Deep Compression), ``linear`` (per-row
    symmetric integer levels) or ``none`` (float32 values, only the positions compressed).
    ``bits``: bits by layer kind (``conv``, ``fc``; Deep Compression's 8 and 5 by default);
    ``layer_bits``: regexes over tensor or module names that override the kind. Weights already
    shared with :func:`~secateurs.compress.share_weights_` keep their codebook and bits.
    ``index_bits``: the width of a position gap (Deep Compression: 8 conv, 5 fc); ``None`` picks,
    per tensor, the width in 2..12 that makes the smallest file. ``huffman``: Huffman-code the
    codes and gaps (otherwise fixed width).
    """

    quantization: str = "kmeans"
    bits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BITS))
    layer_bits: dict[str, int] = field(default_factory=dict)
    index_bits: int | None = None
    huffman: bool = True
    iterations: int = 30

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization {self.quantization!r} is unknown; allowed: {', '.join(QUANTIZATIONS)}"
            )
        unknown = sorted(set(self.bits) - set(DEFAULT_BITS))
        if unknown:
            raise ConfigError(f"unknown layer kind(s) {unknown} in bits; allowed: conv, fc")
        self.bits = {**DEFAULT_BITS, **self.bits}
        low = 2 if self.quantization == "linear" else 1
        for where, value in [*self.bits.items(), *self.layer_bits.items()]:
            check_bits(value, f"bits for {where!r}")
            if value < low:
                raise ConfigError(f"bits for {where!r} is {value}; linear quantization needs >= 2")
        if self.index_bits is not None:
            check_bits(self.index_bits, "index_bits")
        if not isinstance(self.huffman, bool):
            raise ConfigError(f"huffman must be true or false; got {self.huffman!r}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"iterations must be an integer >= 1; got {self.iterations!r}")


@dataclass
class TensorInfo:
    """What one tensor costs in the file."""

    name: str
    shape: list[int]
    dtype: str
    encoding: str
    layout: str
    bits: int | None
    index_bits: int | None
    nonzeros: int
    sections: dict[str, int]  #: payload bytes of each section (codes, gaps, codebook, ...)

    @property
    def bytes(self) -> int:
        """Payload bytes of this tensor."""
        return sum(self.sections.values())

    @property
    def dense_bytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype].itemsize

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes"] = self.bytes
        out["dense_bytes"] = self.dense_bytes
        out["bits_per_weight"] = 8 * self.bytes / max(math.prod(self.shape), 1)
        out["bits_per_nonzero"] = 8 * self.bytes / self.nonzeros if self.nonzeros else None
        out["ratio"] = self.dense_bytes / self.bytes if self.bytes else None
        return out


@dataclass
class CompressedInfo:
    """A compressed file's contents, tensor by tensor, and its totals."""

    path: str
    version: int
    file_bytes: int
    header_bytes: int
    tensors: list[TensorInfo]
    config: dict[str, Any]
    metadata: dict[str, str]
    #: Largest |dequantized - original| over the quantized weights (known when saving).
    max_abs_error: float | None = None

    @property
    def dense_bytes(self) -> int:
        """Bytes of the same tensors stored densely in their dtype (a plain state dict)."""
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.file_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "version": self.version,
            "file_bytes": self.file_bytes,
            "header_bytes": self.header_bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.ratio,
            "nonzeros": sum(t.nonzeros for t in self.tensors),
            "params": sum(math.prod(t.shape) for t in self.tensors),
            "max_abs_error": self.max_abs_error,
            "config": self.config,
            "metadata": self.metadata,
            "tensors": [t.to_dict() for t in self.tensors],
        }


# --------------------------------------------------------------------------- symbol streams


def _pack_fixed(symbols: np.ndarray, width: int) -> bytes:
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = ((symbols[:, None].astype(np.int64) >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_fixed(data: bytes, width: int, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if bits.size < width * count:
        raise DataError("a fixed-width stream is shorter than its header says")
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    return bits[: width * count].reshape(count, width).astype(np.int64) @ weights


def _width(alphabet: int) -> int:
    return max(1, math.ceil(math.log2(alphabet))) if alphabet > 1 else 1


def _stream_bytes(counts: np.ndarray, alphabet: int, huffman: bool) -> int:
    """Bytes :func:`_encode_stream` writes for symbols with histogram ``counts``."""
    n = int(counts.sum())
    fixed = math.ceil(n * _width(alphabet) / 8)
    if n == 0 or not huffman:
        return fixed
    try:
        code = code_from_counts(counts)
    except ConfigError:
        return fixed  # _encode_stream falls back to fixed width too
    bits = sum(int(counts[s]) * length for s, length in code.lengths.items())
    return 2 + max(code.lengths) + 1 + math.ceil(bits / 8)


def _histogram(symbols: Tensor, alphabet: int) -> np.ndarray:
    return np.bincount(symbols.numpy(), minlength=alphabet)


def _encode_stream(symbols: Tensor, alphabet: int, huffman: bool) -> tuple[bytes, dict[str, Any]]:
    """Symbols in ``0 .. alphabet-1`` as bytes; returns (blob, what the header must say)."""
    count = symbols.numel()
    if count == 0:
        return b"", {"count": 0, "coding": "empty"}
    try:
        code = build_code(symbols) if huffman else None
    except ConfigError:
        code = None  # a pathological distribution: fixed width instead
    if code is None:
        width = _width(alphabet)
        return _pack_fixed(symbols.numpy(), width), {
            "count": count,
            "coding": "fixed",
            "width": width,
        }
    table = np.zeros(max(code.lengths) + 1, dtype=np.uint8)
    for symbol, length in code.lengths.items():
        table[symbol] = length
    data, n_bits = encode(symbols, code)
    blob = struct.pack("<H", table.size) + table.tobytes() + data
    return blob, {"count": count, "coding": "huffman", "bits": n_bits}


def _decode_stream(blob: bytes, spec: Mapping[str, Any], alphabet: int, where: str) -> Tensor:
    count = int(spec["count"])
    coding = spec["coding"]
    if coding == "empty":
        out = torch.zeros(0, dtype=torch.int64)
    elif coding == "fixed":
        out = torch.from_numpy(_unpack_fixed(blob, int(spec["width"]), count))
    elif coding == "huffman":
        if len(blob) < 2:
            raise DataError(f"{where}: Huffman stream has no code table")
        (size,) = struct.unpack_from("<H", blob)
        table = blob[2 : 2 + size]
        if len(table) != size:
            raise DataError(f"{where}: Huffman code table is cut short")
        lengths = {s: n for s, n in enumerate(table) if n}
        if not lengths:
            raise DataError(f"{where}: Huffman code table is empty")
        out = decode(blob[2 + size :], int(spec["bits"]), count, HuffmanCode(lengths))
    else:
        raise DataError(f"{where}: unknown stream coding {coding!r}")
    if out.numel() and int(out.max()) >= alphabet:
        raise DataError(f"{where}: symbol {int(out.max())} outside the alphabet of {alphabet}")
    return out


# --------------------------------------------------------------------------- positions


def _zeros_before(positions: Tensor) -> Tensor:
    """Zeros skipped before each of the sorted flat ``positions``."""
    prev = torch.cat([torch.tensor([-1]), positions[:-1]])[: positions.numel()]
    return positions - prev - 1


def _gaps(flat_nonzero: Tensor, index_bits: int) -> tuple[Tensor, Tensor]:
    """Position gaps with fillers: (gap per entry, True where the entry is a real weight)."""
    gaps, _, is_filler = gaps_with_fillers(_zeros_before(flat_nonzero), index_bits)
    return gaps, ~is_filler


def _positions(gaps: Tensor, numel: int, where: str) -> Tensor:
    positions = torch.cumsum(gaps + 1, 0) - 1
    if positions.numel() and int(positions[-1]) >= numel:
        raise DataError(f"{where}: a position gap runs past the end of the tensor")
    return positions


# --------------------------------------------------------------------------- quantized tensors


@dataclass
class _Encoded:
    """A tensor's encoding before it is laid out in the payload."""

    entry: dict[str, Any]
    sections: dict[str, bytes]
    dequantized: Tensor


@dataclass
class _Quantized:
    """A weight as one symbol per element (zeros included) and how symbols map to values."""

    encoding: str  #: kmeans | linear
    symbols: Tensor  #: int64 [numel]
    alphabet: int
    zero: int  #: the symbol whose value is zero (fillers and pruned weights)
    extra: dict[str, Tensor]  #: codebook or scales
    bits: int
    dense: Tensor  #: the dequantized weight, flattened


def _quantize(
    name: str, t: Tensor, config: CompressConfig, module: nn.Module, shared: SharedWeights | None
) -> _Quantized:
    if shared is None and config.quantization == "kmeans":
        bits = bits_for(name, module, config.bits, config.layer_bits)
        shared = share_weights(t.detach().float().cpu(), bits, config.iterations)
    if shared is not None:
        k = shared.codebook.numel()
        symbols = torch.full((t.numel(),), k, dtype=torch.int64)
        symbols[shared.positions.reshape(-1)] = shared.codes
        codebook = shared.codebook.to(t.dtype)
        table = torch.cat([codebook, codebook.new_zeros(1)])
        return _Quantized(
            "kmeans", symbols, k + 1, k, {"codebook": codebook}, shared.bits, table[symbols]
        )
    q = quantize_linear(t, bits_for(name, module, config.bits, config.layer_bits))
    symbols = q.levels.reshape(-1).to(torch.int64) + q.max_level
    dense = q.to_dense().reshape(-1).to(t.dtype)
    return _Quantized(
        "linear", symbols, 2 * q.max_level + 1, q.max_level, {"scales": q.scales}, q.bits, dense
    )


def _sparse_streams(
    kept: Tensor, symbols: Tensor, zero: int, index_bits: int
) -> tuple[Tensor, Tensor]:
    """(gaps, codes) of the sparse layout: fillers carry the zero symbol."""
    gaps, real = _gaps(kept, index_bits)
    codes = torch.full((gaps.numel(),), zero, dtype=torch.int64)
    codes[real] = symbols[kept]
    return gaps, codes


def _best_index_bits(
    kept: Tensor, widths: tuple[int, ...], cost: Callable[[int, np.ndarray, int], int]
) -> tuple[int, int]:
    """The gap width with the smallest ``cost(width, gap histogram, fillers)``; (width, cost).

    Histograms are computed without materialising the fillers: a weight preceded by ``z``
    zeros needs ``z >> b`` fillers (each a gap of ``2**b - 1``) and then a gap of ``z % 2**b``.
    """
    zeros_before = _zeros_before(kept).numpy()
    best: tuple[int, int] | None = None
    for b in widths:
        fillers = int((zeros_before >> b).sum())
        counts = np.bincount(zeros_before & ((1 << b) - 1), minlength=1 << b)
        counts[(1 << b) - 1] += fillers
        size = cost(b, counts, fillers)
        if best is None or size < best[1]:
            best = (b, size)
    assert best is not None
    return best


def _encode_float(
    name: str, t: Tensor, config: CompressConfig, widths: tuple[int, ...]
) -> _Encoded:
    """Unquantized: float32 values of the kept weights plus their position gaps, when smaller."""
    flat = t.detach().reshape(-1).cpu()
    nonzero = flat.nonzero().flatten()

    def cost(b: int, gap_counts: np.ndarray, fillers: int) -> int:
        values = 4 * (nonzero.numel() + fillers)
        return _stream_bytes(gap_counts, 1 << b, config.huffman) + values

    best, size = _best_index_bits(nonzero, widths, cost)
    if size >= flat.numel() * flat.element_size():
        return _encode_raw(name, t)
    gaps, real = _gaps(nonzero, best)
    values = torch.zeros(gaps.numel(), dtype=torch.float32)
    values[real] = flat[nonzero].to(torch.float32)
    blob, spec = _encode_stream(gaps, 1 << best, config.huffman)
    entry = _entry(name, t, "float", "sparse", None, best, int(nonzero.numel()))
    entry["gaps"] = spec
    dense = torch.zeros_like(flat)
    dense[nonzero] = values[real].to(flat.dtype)
    return _Encoded(entry, {"gaps": blob, "values": _to_bytes(values)}, dense.reshape(t.shape))


def _entry(
    name: str,
    t: Tensor,
    encoding: str,
    layout: str,
    bits: int | None,
    index_bits: int | None,
    nonzeros: int,
) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(t.shape),
        "dtype": _dtype_name(t.dtype),
        "encoding": encoding,
        "layout": layout,
        "bits": bits,
        "index_bits": index_bits,
        "nonzeros": nonzeros,
    }


def _encode_quantized(
    name: str, t: Tensor, config: CompressConfig, module: nn.Module, shared: SharedWeights | None
) -> _Encoded:
    widths = AUTO_INDEX_BITS if config.index_bits is None else (config.index_bits,)
    if config.quantization == "none" and shared is None:
        return _encode_float(name, t, config, widths)
    q = _quantize(name, t, config, module, shared)
    kept = (q.dense != 0).nonzero().flatten()
    kept_counts = _histogram(q.symbols[kept], q.alphabet)

    def cost(b: int, gap_counts: np.ndarray, fillers: int) -> int:
        code_counts = kept_counts.copy()
        code_counts[q.zero] += fillers
        return _stream_bytes(gap_counts, 1 << b, config.huffman) + _stream_bytes(
            code_counts, q.alphabet, config.huffman
        )

    dense_size = _stream_bytes(_histogram(q.symbols, q.alphabet), q.alphabet, config.huffman)
    best, sparse_size = _best_index_bits(kept, widths, cost)
    index_bits = best if sparse_size < dense_size else None
    layout = "dense" if index_bits is None else "sparse"
    sections = {k: _to_bytes(v) for k, v in q.extra.items()}
    entry = _entry(name, t, q.encoding, layout, q.bits, index_bits, int(kept.numel()))
    entry["alphabet"] = q.alphabet
    if index_bits is None:
        sections["codes"], entry["codes"] = _encode_stream(q.symbols, q.alphabet, config.huffman)
    else:
        gaps, codes = _sparse_streams(kept, q.symbols, q.zero, index_bits)
        sections["gaps"], entry["gaps"] = _encode_stream(gaps, 1 << index_bits, config.huffman)
        sections["codes"], entry["codes"] = _encode_stream(codes, q.alphabet, config.huffman)
        entry["zero_symbol"] = q.zero
    return _Encoded(entry, sections, q.dense.reshape(t.shape))


def _encode_raw(name: str, t: Tensor) -> _Encoded:
    entry = _entry(name, t, "raw", "dense", None, None, int(torch.count_nonzero(t)))
    return _Encoded(entry, {"data": _to_bytes(t)}, t.detach().cpu().clone())


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ModelError(
            f"tensors of dtype {dtype} cannot be stored; allowed: {', '.join(_DTYPES)}"
        )
    return name


def _to_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _from_bytes(blob: bytes, dtype: torch.dtype, count: int, where: str) -> Tensor:
    if len(blob) != count * dtype.itemsize:
        raise DataError(f"{where}: holds {len(blob)} bytes, expected {count * dtype.itemsize}")
    if count == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype).clone()


# --------------------------------------------------------------------------- model state


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict a plain (unparametrized) copy of ``model`` would have: masks and shared
    codebooks applied, under the original keys, in the original order."""
    effective: dict[str, Tensor] = {}
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            container = module.parametrizations
            assert isinstance(container, nn.ModuleDict)
            for attr in container:
                prefix = f"{module_name}." if module_name else ""
                effective[f"{prefix}parametrizations.{attr}.original"] = getattr(module, attr)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in effective:
            out[key.replace(".original", "").replace("parametrizations.", "")] = effective[key]
        elif ".parametrizations." not in key and not key.startswith("parametrizations."):
            out[key] = value
    return {k: v.detach() for k, v in out.items()}


def save_compressed(
    model: nn.Module,
    path: str | Path,
    config: CompressConfig | Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> CompressedInfo:
    """Write ``model``'s weights as a compressed ``.sct`` file; returns what it holds.

    Masks are applied, so zeros are stored as positions skipped. Weights of Linear, convolution
    and Embedding layers are quantized as ``config`` says (already shared weights keep their
    codebook); every other tensor is stored as it is. The model is not changed.
    :func:`load_compressed` fills a model of the same architecture with the dequantized weights.
    """
    if config is None:
        config = CompressConfig()
    elif isinstance(config, Mapping):
        config = build_dataclass(CompressConfig, config, "compression config")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    state = _plain_state(model)
    quantizable = {name: module for name, module, _ in sharable(model)}
    check_layer_bits(config.layer_bits, list(quantizable))
    encoded: list[_Encoded] = []
    max_error = 0.0
    for name, tensor in state.items():
        module = quantizable.get(name)
        if module is not None and tensor.is_floating_point() and tensor.dim() >= 1:
            shared = get_shared(module, name.rpartition(".")[2])
            enc = _encode_quantized(name, tensor, config, module, shared)
            error = (enc.dequantized.float() - tensor.detach().float().cpu()).abs()
            max_error = max(max_error, float(error.max()) if error.numel() else 0.0)
        else:
            enc = _encode_raw(name, tensor)
        encoded.append(enc)

    payload = bytearray()
    for enc in encoded:
        sections = {}
        for key, blob in enc.sections.items():
            sections[key] = [len(payload), len(blob), zlib.crc32(blob)]
            payload += blob
        enc.entry["sections"] = sections
    header = {
        "format": "secateurs-compressed",
        "version": VERSION,
        "secateurs": __version__,
        "config": asdict(config),
        "metadata": meta,
        "payload_bytes": len(payload),
        "tensors": [enc.entry for enc in encoded],
    }
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = _PREFIX.pack(MAGIC, VERSION, 0, len(head)) + head + bytes(payload)
    blob = body + hashlib.sha256(body).digest()
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(out)
    info = _info(str(out), header, len(blob), len(head))
    info.max_abs_error = max_error
    return info


# --------------------------------------------------------------------------- reading


def _read(path: str | Path) -> tuple[dict[str, Any], memoryview, int, int]:
    """Validate a file's framing and checksum; returns (header, payload, file bytes, header bytes)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"compressed model {str(p)!r} does not exist")
    data = p.read_bytes()
    where = f"{str(p)!r}"
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        raise DataError(f"{where} is not a secateurs compressed model (no SECATEUR magic)")
    _, version, _, head_len = _PREFIX.unpack_from(data)
    if version > VERSION:
        raise DataError(
            f"{where} has format version {version}; this secateurs reads version {VERSION} "
            "and older: upgrade secateurs"
        )
    if version < 1:
        raise DataError(f"{where} has an invalid format version {version}")
    if len(data) < _PREFIX.size + head_len + CHECKSUM_BYTES or head_len > MAX_HEADER_BYTES:
        raise DataError(f"{where} is truncated: {len(data)} bytes cannot hold its header")
    body, digest = data[:-CHECKSUM_BYTES], data[-CHECKSUM_BYTES:]
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(data[_PREFIX.size : _PREFIX.size + head_len], MAX_HEADER_BYTES)
        header = json.loads(text)
    except (zlib.error, ValueError):
        header = None
    payload = memoryview(body)[_PREFIX.size + head_len :]
    if hashlib.sha256(body).digest() != digest:
        raise DataError(f"{where} is corrupt: {_damage(header, payload)}")
    if not isinstance(header, dict) or header.get("format") != "secateurs-compressed":
        raise DataError(f"{where} has an unreadable header")
    if header.get("payload_bytes") != len(payload):
        raise DataError(
            f"{where} is truncated: payload is {len(payload)} bytes, header says "
            f"{header.get('payload_bytes')}"
        )
    return header, payload, len(data), head_len


def _damage(header: Any, payload: memoryview) -> str:
    """Say where a checksum failure lies: a tensor's section, the header, or the length."""
    if not isinstance(header, dict):
        return "checksum mismatch and the header cannot be read (truncated or altered)"
    if header.get("payload_bytes") != len(payload):
        return (
            f"truncated or extended: payload is {len(payload)} bytes, header says "
            f"{header.get('payload_bytes')}"
        )
    for tensor in header.get("tensors", []):
        for key, (offset, length, crc) in tensor.get("sections", {}).items():
            if zlib.crc32(payload[offset : offset + length]) != crc:
                return f"checksum mismatch in tensor {tensor.get('name')!r}, section {key!r}"
    return "checksum mismatch (the header or the checksum itself was altered)"


def _section(payload: memoryview, entry: Mapping[str, Any], key: str) -> bytes:
    try:
        offset, length, _ = entry["sections"][key]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"tensor {entry.get('name')!r} lacks section {key!r}") from None
    if offset < 0 or offset + length > len(payload):
        raise DataError(f"tensor {entry.get('name')!r}: section {key!r} lies outside the payload")
    return bytes(payload[offset : offset + length])


def _decode_positions(
    payload: memoryview, entry: Mapping[str, Any], numel: int, where: str
) -> Tensor:
    """Flat positions of a sparse layout's entries, from its ``gaps`` stream."""
    alphabet = 1 << int(entry["index_bits"])
    gaps = _decode_stream(_section(payload, entry, "gaps"), entry["gaps"], alphabet, where)
    return _positions(gaps, numel, where)


def _decode_tensor(payload: memoryview, entry: Mapping[str, Any]) -> Tensor:
    name = entry["name"]
    where = f"tensor {name!r}"
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise DataError(f"{where}: unknown dtype {entry['dtype']!r}")
    shape = [int(s) for s in entry["shape"]]
    numel = math.prod(shape)
    encoding = entry["encoding"]
    if encoding == "raw":
        return _from_bytes(_section(payload, entry, "data"), dtype, numel, where).reshape(shape)
    if encoding == "float":
        positions = _decode_positions(payload, entry, numel, where)
        values = _from_bytes(
            _section(payload, entry, "values"), torch.float32, positions.numel(), where
        )
        out = torch.zeros(numel, dtype=dtype)
        out[positions] = values.to(dtype)
        return out.reshape(shape)
    alphabet = int(entry["alphabet"])
    if encoding == "kmeans":
        codebook = _from_bytes(_section(payload, entry, "codebook"), dtype, alphabet - 1, where)
        table = torch.cat([codebook, codebook.new_zeros(1)])
    elif encoding == "linear":
        rows = shape[0]
        scales = _from_bytes(_section(payload, entry, "scales"), torch.float32, rows, where)
    else:
        raise DataError(f"{where}: unknown encoding {encoding!r}")
    codes = _decode_stream(_section(payload, entry, "codes"), entry["codes"], alphabet, where)
    if entry["layout"] == "dense":
        if codes.numel() != numel:
            raise DataError(f"{where}: {codes.numel()} codes for {numel} weights")
        symbols = codes
    elif entry["layout"] == "sparse":
        positions = _decode_positions(payload, entry, numel, where)
        if positions.numel() != codes.numel():
            raise DataError(f"{where}: {positions.numel()} positions for {codes.numel()} codes")
        symbols = torch.full((numel,), int(entry["zero_symbol"]), dtype=torch.int64)
        symbols[positions] = codes
    else:
        raise DataError(f"{where}: unknown layout {entry['layout']!r}")
    if encoding == "kmeans":
        return table[symbols].reshape(shape)
    # the same dequantization as at save time, so loaded weights are bit-exact
    bits = int(entry["bits"])
    levels = (symbols - ((1 << (bits - 1)) - 1)).to(torch.int32).reshape(shape)
    return LinearQuantized(tuple(shape), scales, levels, bits).to_dense().to(dtype)


def _decode_all(header: Mapping[str, Any], payload: memoryview) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for entry in header["tensors"]:
        try:
            out[entry["name"]] = _decode_tensor(payload, entry)
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise DataError(f"tensor {entry.get('name')!r} cannot be decoded: {exc}") from None
    return out


def _info(path: str, header: Mapping[str, Any], file_bytes: int, head_len: int) -> CompressedInfo:
    tensors = [
        TensorInfo(
            name=e["name"],
            shape=list(e["shape"]),
            dtype=e["dtype"],
            encoding=e["encoding"],
            layout=e["layout"],
            bits=e.get("bits"),
            index_bits=e.get("index_bits"),
            nonzeros=int(e["nonzeros"]),
            sections={k: int(length) for k, (_, length, _) in e["sections"].items()},
        )
        for e in header["tensors"]
    ]
    return CompressedInfo(
        path=path,
        version=int(header["version"]),
        file_bytes=file_bytes,
        header_bytes=head_len,
        tensors=tensors,
        config=dict(header.get("config", {})),
        metadata=dict(header.get("metadata", {})),
    )


def load_compressed(path: str | Path, model: nn.Module) -> nn.Module:
    """Fill ``model`` (same architecture, no masks) with the weights stored in ``path``.

    Every tensor is decoded and checked against the model's keys and shapes before anything is
    loaded, so a bad file or a different architecture leaves the model untouched.
    """
    header, payload, _, _ = _read(path)
    state = _decode_all(header, payload)
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ModelError(
            "load_compressed fills a plain model; this one carries masks or shared weights. "
            "Load into a fresh instance, or call secateurs.make_permanent_ first"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"{str(path)!r} does not fit {type(model).__name__}: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise ModelError(
                f"{str(path)!r}: {key} has shape {tuple(value.shape)}, the model's is "
                f"{tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model


def inspect_compressed(path: str | Path) -> CompressedInfo:
    """What a compressed file holds: per tensor bytes, bits per weight, compression ratio.

    The whole file is verified and decoded, so a file that inspects cleanly also loads.
    """
    header, payload, file_bytes, head_len = _read(path)
    _decode_all(header, payload)
    return _info(str(path), header, file_bytes, head_len)
