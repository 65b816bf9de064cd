"""Data sets for demos, tests and benchmarks: MNIST-format IDX files and synthetic data.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package, which installs the IDX files
in ``/usr/share/datasets/fashion-mnist``; ``root=`` (or ``data.root`` in a recipe, or the
``SECATEURS_DATA_DIR`` environment variable) points elsewhere. Nothing is downloaded.

Every loader returns a :class:`DataBundle`: in-memory train/test tensors plus what a model and
a report need to know about them (number of classes, input shape, class names).
"""

from __future__ import annotations

import functools
import gzip
import inspect
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from secateurs.errors import ConfigError, DataError
from secateurs.registry import Registry

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_MNIST_DIR = Path("/usr/share/datasets/mnist")
#: Environment variable that replaces the default directory of ``fashion-mnist`` / ``mnist``.
DATA_DIR_ENV = "SECATEURS_DATA_DIR"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_HINT = "Install it with 'apt-get install dataset-fashion-mnist'"
MNIST_HINT = (
    "Download the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into it"
)

# IDX type codes (third magic byte) -> element dtype; multi-byte types are big-endian.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}  # fmt: skip
_GZIP_MAGIC = b"\x1f\x8b"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------------------------
# IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed, told apart by the first two bytes).

    The header is checked before the data is trusted: magic number, element type code, number
    of dimensions and the exact byte count the dimensions imply. Anything wrong raises
    :class:`DataError` naming the file and the problem, so a truncated download is reported as
    such instead of surfacing later as a reshape error. Returns a native-byte-order array.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {str(p)!r}: {exc.strerror or exc}") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"IDX file {str(p)!r} is a corrupt or truncated gzip file ({exc}); "
                "reinstall or re-download it"
            ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{str(p)!r} is not an IDX file (bad magic number {raw[:4].hex() or '(empty)'}; "
            "expected 0x0000 followed by a type code and the number of dimensions)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        allowed = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise DataError(
            f"{str(p)!r} is not an IDX file (unknown type code 0x{code:02x}; allowed: {allowed})"
        )
    if ndim == 0:
        raise DataError(f"IDX file {str(p)!r} declares 0 dimensions; it is corrupt")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"IDX file {str(p)!r} is truncated inside its header ({len(raw)} bytes, the header "
            f"of a {ndim}-dimensional array needs {header})"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = _IDX_DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "corrupt (trailing bytes)"
        raise DataError(
            f"IDX file {str(p)!r} is {problem}: it holds {len(raw)} bytes but its header "
            f"(shape {dims}, {dtype.name}) needs {expected}; reinstall or re-download it"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if ``compress``).

    The inverse of :func:`read_idx`; used by tests and to export subsets in the format every
    MNIST tool reads.
    """
    codes = {dt.newbyteorder(">").str: c for c, dt in _IDX_DTYPES.items()}
    big = array.astype(np.dtype(array.dtype).newbyteorder(">"))
    code = 0x08 if array.dtype == np.uint8 else codes.get(big.dtype.str)
    if code is None:
        allowed = "uint8, int8, int16, int32, float32, float64"
        raise DataError(f"IDX cannot store dtype {array.dtype}; allowed: {allowed}")
    if not 1 <= array.ndim <= 255:
        raise DataError(f"IDX stores 1 to 255 dimensions; the array has {array.ndim}")
    data = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data += big.tobytes()
    Path(path).write_bytes(gzip.compress(data) if compress else data)


# --------------------------------------------------------------------------------------------
# Bundles


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} = {value!r} is invalid; must be an integer >= {minimum}")
    return value


@dataclass
class DataBundle:
    """A classification data set split into train and test, as in-memory tensors.

    ``train`` and ``test`` hold ``(inputs, labels)`` with float32 inputs of shape
    ``(N, *input_shape)`` and int64 labels in ``[0, num_classes)``. Bundles loaded from disk
    share their tensors with an in-process cache: treat them as read-only.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str] = field(default_factory=list)

    def loaders(
        self, batch_size: int, seed: int = 0, eval_batch_size: int = 1000
    ) -> tuple[DataLoader[Any], DataLoader[Any]]:
        """Shuffled train and ordered test loaders; the same seed gives the same batches.

        The shuffle uses its own ``torch.Generator``, so it neither reads nor changes the global
        RNG. Batches are sliced from the tensors in one indexing operation each (no per-example
        collation), which makes small models train several times faster.
        """
        _check_count("batch_size", batch_size, 1)
        _check_count("eval_batch_size", eval_batch_size, 1)
        g = torch.Generator().manual_seed(seed)
        train_sampler = BatchSampler(RandomSampler(self.train, generator=g), batch_size, False)
        test_sampler = BatchSampler(SequentialSampler(self.test), eval_batch_size, False)
        return (
            DataLoader(self.train, sampler=train_sampler, batch_size=None),
            DataLoader(self.test, sampler=test_sampler, batch_size=None),
        )

    def calibration_split(self, n: int, seed: int = 0) -> TensorDataset:
        """``n`` training examples drawn without replacement, for data-driven criteria.

        Deterministic for a seed and independent of the loaders' shuffle. If ``n`` exceeds the
        training set, the whole (permuted) training set is returned.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"a calibration split needs at least 1 example; asked {n!r}")
        g = torch.Generator().manual_seed(seed + 7919)  # offset: not the loaders' permutation
        idx = torch.randperm(len(self.train), generator=g)[: min(n, len(self.train))]
        return TensorDataset(*(t[idx] for t in self.train.tensors))

    def subset(self, n_train: int, n_test: int) -> DataBundle:
        """The first ``n_train`` / ``n_test`` examples (or all, if fewer), for quick runs."""
        _check_count("n_train", n_train, 1)
        _check_count("n_test", n_test, 1)
        return DataBundle(
            self.name,
            TensorDataset(*(t[:n_train] for t in self.train.tensors)),
            TensorDataset(*(t[:n_test] for t in self.test.tensors)),
            self.num_classes,
            self.input_shape,
            list(self.class_names),
        )


# --------------------------------------------------------------------------------------------
# MNIST-format directories

DATASETS: Registry[Any] = Registry("dataset")


def _resolve(root: str | Path | None, default: Path) -> Path:
    """``root`` if given, else ``$SECATEURS_DATA_DIR``, else the default directory."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else default


def _find(root: Path, stem: str, hint: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    where = "does not exist" if not root.is_dir() else "has no such file"
    raise DataError(
        f"{stem}(.gz) not found: directory {str(root)!r} {where}. {hint}, or point elsewhere "
        f"with root=... (data.root in a recipe) or the {DATA_DIR_ENV} environment variable."
    )


def _stamp(path: Path) -> tuple[str, int, int]:
    """Cache key of one file: resolved path, size and modification time (a rewrite misses)."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _decode(
    files: tuple[tuple[str, int, int], ...],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decode train/test images and labels once per process; normalise with train statistics."""
    x_train, y_train, x_test, y_test = (read_idx(f[0]) for f in files)
    for split, x, y, fx, fy in (
        ("train", x_train, y_train, files[0][0], files[1][0]),
        ("test", x_test, y_test, files[2][0], files[3][0]),
    ):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{split} images {x.shape} ({fx!r}) and labels {y.shape} ({fy!r}) do not match: "
                "expected images (N, H, W) and labels (N,)"
            )
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{split} labels in {fy!r} contain negative values")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"train images are {x_train.shape[1:]} but test images are {x_test.shape[1:]}"
        )
    scale = 255.0 if x_train.dtype == np.uint8 else 1.0
    train_images = torch.from_numpy(x_train.astype(np.float32) / scale)
    mean, std = float(train_images.mean()), float(train_images.std())
    std = std if std > 0 else 1.0

    def prep(images: Tensor) -> Tensor:
        return ((images - mean) / std).unsqueeze(1)

    return (
        prep(train_images),
        torch.from_numpy(y_train.astype(np.int64)),
        prep(torch.from_numpy(x_test.astype(np.float32) / scale)),
        torch.from_numpy(y_test.astype(np.int64)),
    )


def load_idx_dataset(
    root: str | Path,
    name: str = "idx",
    class_names: list[str] | None = None,
    hint: str = MNIST_HINT,
) -> DataBundle:
    """Any MNIST-format directory: ``train``/``t10k`` images and labels, plain or ``.gz``.

    Images become float32 ``(N, 1, H, W)`` tensors normalised with the training set's mean and
    standard deviation; labels become int64. ``class_names`` fixes the number of classes (and
    labels are checked against it); otherwise it is the largest label + 1. ``hint`` is what a
    missing-file error tells the user to do. Decoded tensors are cached in-process, keyed on
    the files' paths, sizes and modification times.
    """
    path = Path(root)
    found = [_find(path, stem, hint) for split in ("train", "test") for stem in _FILES[split]]
    x_train, y_train, x_test, y_test = _decode(tuple(_stamp(f) for f in found))
    largest = int(max(y_train.max(), y_test.max())) if len(y_train) and len(y_test) else -1
    if class_names is not None:
        num_classes = len(class_names)
        if largest >= num_classes:
            raise DataError(
                f"{name} in {str(path)!r} has label {largest} but only {num_classes} classes "
                f"({', '.join(class_names)}); the directory holds a different data set"
            )
    else:
        num_classes = largest + 1
    return DataBundle(
        name,
        TensorDataset(x_train, y_train),
        TensorDataset(x_test, y_test),
        num_classes,
        tuple(x_train.shape[1:]),
        list(class_names) if class_names is not None else [str(i) for i in range(num_classes)],
    )


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: str | Path | None = None) -> DataBundle:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28x28 grey images, 10 classes.

    Reads ``root``, else ``$SECATEURS_DATA_DIR``, else ``/usr/share/datasets/fashion-mnist``.
    """
    return load_idx_dataset(
        _resolve(root, DEFAULT_FASHION_MNIST_DIR),
        "fashion-mnist",
        FASHION_MNIST_CLASSES,
        hint=FASHION_MNIST_HINT,
    )


@DATASETS.register("mnist")
def load_mnist(root: str | Path | None = None) -> DataBundle:
    """MNIST digits from IDX files in ``root``, else ``$SECATEURS_DATA_DIR``, else
    ``/usr/share/datasets/mnist`` (no Debian package ships MNIST: place the files there)."""
    return load_idx_dataset(
        _resolve(root, DEFAULT_MNIST_DIR), "mnist", [str(i) for i in range(10)], hint=MNIST_HINT
    )


# --------------------------------------------------------------------------------------------
# Synthetic


@DATASETS.register("synthetic")
def synthetic(
    n_train: int = 2048,
    n_test: int = 512,
    num_classes: int = 10,
    shape: tuple[int, ...] = (1, 28, 28),
    seed: int = 0,
    noise: float = 1.0,
) -> DataBundle:
    """A small learnable data set for fast tests: one fixed random template per class + noise.

    Each example is its class's standard-normal template plus ``noise`` times standard-normal
    noise, so any model that can fit a linear classifier learns it within an epoch or two. The
    same arguments give the same tensors; the global RNG is not touched.
    """
    _check_count("n_train", n_train, 1)
    _check_count("n_test", n_test, 1)
    _check_count("num_classes", num_classes, 2)
    shape = tuple(shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ConfigError(
            f"shape = {shape!r} is invalid; must be positive integers, e.g. (1, 28, 28)"
        )
    if not noise >= 0:
        raise ConfigError(f"noise = {noise!r} is invalid; must be a number >= 0")
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, *shape, generator=g)

    def make(n: int) -> TensorDataset:
        y = torch.randint(num_classes, (n,), generator=g)
        x = templates[y] + noise * torch.randn(n, *shape, generator=g)
        return TensorDataset(x, y)

    return DataBundle(
        "synthetic",
        make(n_train),
        make(n_test),
        num_classes,
        shape,
        [f"class {i}" for i in range(num_classes)],
    )


def load_dataset(name: str, **options: Any) -> DataBundle:
    """Load a registered data set by name (``fashion-mnist``, ``mnist``, ``synthetic``).

    ``options`` are the loader's keyword arguments (``root=`` for the IDX sets, ``n_train=``...
    for ``synthetic``); an unknown name or option is a :class:`ConfigError` listing the allowed.
    """
    loader: Callable[..., Any] = DATASETS.get(name)
    allowed = list(inspect.signature(loader).parameters)
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ConfigError(
            f"data set {name!r}: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )
    bundle = loader(**options)
    if not isinstance(bundle, DataBundle):
        raise ConfigError(
            f"data set {name!r} is registered to {loader!r}, which returned "
            f"{type(bundle).__name__}; a registered loader must return a DataBundle"
        )
    return bundle
