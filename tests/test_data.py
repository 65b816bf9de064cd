"""IDX reading, Fashion-MNIST loading, synthetic data and loaders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from secateurs import data
from secateurs.errors import ConfigError, DataError


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path: Path, compress: bool, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) % 7).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / "x.idx"
    data.write_idx(path, array, compress=compress)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if compress else b"\x00\x00")
    back = data.read_idx(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, array)


def test_truncated_and_foreign_files_are_data_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.idx"
    data.write_idx(path, np.zeros((4, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(path)
    path.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00"))
    with pytest.raises(DataError, match="header"):
        data.read_idx(path)


def test_missing_directory_names_the_package_and_the_option(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        data.load_fashion_mnist(root=tmp_path)
    message = str(info.value)
    assert "dataset-fashion-mnist" in message and "root" in message and str(tmp_path) in message


def test_env_var_overrides_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path)):
        data.load_fashion_mnist()


def test_small_idx_directory_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        data.write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
            compress=True,
        )
        data.write_idx(
            tmp_path / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 3).astype(np.uint8)
        )
    bundle = data.load_idx_dataset(tmp_path, "tiny")
    assert len(bundle.train) == 20 and len(bundle.test) == 10 and bundle.num_classes == 3
    x, y = bundle.train.tensors
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4  # normalised with the training set's statistics


@pytest.mark.skipif(
    not data.DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist() -> None:
    bundle = data.load_dataset("fashion-mnist")
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert bundle.class_names[0] == "T-shirt/top" and len(bundle.class_names) == 10
    labels = bundle.train.tensors[1]
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels).tolist() == [6000] * 10


def test_synthetic_is_deterministic_and_loaders_are_seeded() -> None:
    a, b = data.synthetic(seed=3), data.synthetic(seed=3)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], data.synthetic(seed=4).train.tensors[0])
    first = [y for _, y in a.loaders(64, seed=1)[0]]
    again = [y for _, y in a.loaders(64, seed=1)[0]]
    other = [y for _, y in a.loaders(64, seed=2)[0]]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))
    x, y = next(iter(a.loaders(64)[0]))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)


def test_calibration_split_and_subset() -> None:
    bundle = data.synthetic(n_train=100, n_test=50)
    split = bundle.calibration_split(30, seed=0)
    assert len(split) == 30
    assert torch.equal(split.tensors[0], bundle.calibration_split(30, seed=0).tensors[0])
    small = bundle.subset(10, 5)
    assert len(small.train) == 10 and len(small.test) == 5
    with pytest.raises(DataError):
        bundle.calibration_split(0)


def test_unknown_dataset_lists_the_allowed() -> None:
    with pytest.raises(ConfigError, match="fashion-mnist"):
        data.load_dataset("cifar-1000")
