"""Data sets for demos, tests and benchmarks: MNIST-format IDX files and synthetic data.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package, which installs the IDX files
in ``/usr/share/datasets/fashion-mnist``; ``root=`` (or ``data.root`` in a recipe, or the
``SECATEURS_DATA_DIR`` environment variable) points elsewhere. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import os
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

from secateurs.errors import DataError
from secateurs.registry import Registry

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_MNIST_DIR = Path("/usr/share/datasets/mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed, detected from its first bytes)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {str(p)!r}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{str(p)!r} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(p)!r} is truncated inside its header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"IDX file {str(p)!r} has {len(raw)} bytes; its header {dims} says {expected}"
            " (truncated or corrupt)"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def write_idx(path: str | Path, array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (used by tests and to export subsets)."""
    codes = {np.dtype(v).newbyteorder(">").str: k for k, v in _IDX_DTYPES.items()}
    big = array.astype(np.dtype(array.dtype).newbyteorder(">"))
    code = 0x08 if array.dtype == np.uint8 else codes[big.dtype.str]
    data = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data += big.tobytes()
    Path(path).write_bytes(gzip.compress(data) if compress else data)


@dataclass
class DataBundle:
    """A classification data set split into train and test, as in-memory tensors."""

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

        Batches are sliced from the tensors in one indexing operation each (no per-example
        collation), which makes small models train several times faster.
        """
        g = torch.Generator().manual_seed(seed)
        train_sampler = BatchSampler(RandomSampler(self.train, generator=g), batch_size, False)
        test_sampler = BatchSampler(SequentialSampler(self.test), eval_batch_size, False)
        return (
            DataLoader(self.train, sampler=train_sampler, batch_size=None),
            DataLoader(self.test, sampler=test_sampler, batch_size=None),
        )

    def calibration_split(self, n: int, seed: int = 0) -> TensorDataset:
        """``n`` training examples drawn without replacement (deterministic for a seed)."""
        if n < 1:
            raise DataError(f"a calibration split needs at least 1 example; asked {n}")
        g = torch.Generator().manual_seed(seed + 7919)
        idx = torch.randperm(len(self.train), generator=g)[: min(n, len(self.train))]
        return TensorDataset(*(t[idx] for t in self.train.tensors))

    def subset(self, n_train: int, n_test: int) -> DataBundle:
        """The first ``n_train`` / ``n_test`` examples, for quick runs."""
        return DataBundle(
            self.name,
            TensorDataset(*(t[:n_train] for t in self.train.tensors)),
            TensorDataset(*(t[:n_test] for t in self.test.tensors)),
            self.num_classes,
            self.input_shape,
            self.class_names,
        )


DATASETS: Registry[Any] = Registry("dataset")


def _resolve(root: str | Path | None, default: Path) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("SECATEURS_DATA_DIR")
    return Path(env) if env else default


def _find(root: Path, stem: str, package: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{stem}(.gz) not found in {str(root)!r}. Install the data with "
        f"'apt-get install {package}', or point elsewhere with root=/data.root in a recipe/"
        "the SECATEURS_DATA_DIR environment variable."
    )


@functools.lru_cache(maxsize=4)
def _load_idx_dir(root: str, package: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    path = Path(root)
    arrays = [
        read_idx(_find(path, stem, package))
        for split in ("train", "test")
        for stem in _FILES[split]
    ]
    x_train, y_train, x_test, y_test = arrays
    images = torch.from_numpy(x_train.astype(np.float32) / 255.0)
    mean, std = float(images.mean()), float(images.std())

    def prep(x: np.ndarray) -> Tensor:
        return ((torch.from_numpy(x.astype(np.float32) / 255.0) - mean) / std).unsqueeze(1)

    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{name} images {x.shape} and labels {y.shape} in {root!r} do not match"
            )
    return (
        prep(x_train),
        torch.from_numpy(y_train.astype(np.int64)),
        prep(x_test),
        torch.from_numpy(y_test.astype(np.int64)),
    )


def load_idx_dataset(
    root: str | Path,
    name: str,
    class_names: list[str] | None = None,
    package: str = "dataset-mnist",
) -> DataBundle:
    """Any MNIST-format directory (train/t10k images and labels, plain or .gz)."""
    x_train, y_train, x_test, y_test = _load_idx_dir(str(Path(root).resolve()), package)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return DataBundle(
        name,
        TensorDataset(x_train, y_train),
        TensorDataset(x_test, y_test),
        num_classes,
        tuple(x_train.shape[1:]),
        class_names or [str(i) for i in range(num_classes)],
    )


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: str | Path | None = None) -> DataBundle:
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 grey images, 10 classes)."""
    return load_idx_dataset(
        _resolve(root, DEFAULT_FASHION_MNIST_DIR), "fashion-mnist", FASHION_MNIST_CLASSES,
        package="dataset-fashion-mnist",
    )  # fmt: skip


@DATASETS.register("mnist")
def load_mnist(root: str | Path | None = None) -> DataBundle:
    """MNIST from IDX files in ``root`` (default ``/usr/share/datasets/mnist``)."""
    return load_idx_dataset(_resolve(root, DEFAULT_MNIST_DIR), "mnist")


@DATASETS.register("synthetic")
def synthetic(
    n_train: int = 2048,
    n_test: int = 512,
    num_classes: int = 10,
    shape: tuple[int, ...] = (1, 28, 28),
    seed: int = 0,
    noise: float = 1.0,
) -> DataBundle:
    """A small learnable data set: one fixed random template per class plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, *shape, generator=g)

    def make(n: int) -> TensorDataset:
        y = torch.randint(num_classes, (n,), generator=g)
        x = templates[y] + noise * torch.randn(n, *shape, generator=g)
        return TensorDataset(x, y)

    return DataBundle(
        "synthetic", make(n_train), make(n_test), num_classes, tuple(shape),
        [f"class {i}" for i in range(num_classes)],
    )  # fmt: skip


def load_dataset(name: str, **options: Any) -> DataBundle:
    """Load a registered data set by name (``fashion-mnist``, ``mnist``, ``synthetic``)."""
    loader = DATASETS.get(name)
    try:
        bundle = loader(**options)
    except TypeError as exc:
        raise DataError(f"data set {name!r}: {exc}") from None
    assert isinstance(bundle, DataBundle)
    return bundle
