"""IDX reading, Fashion-MNIST loading, synthetic data, bundles and loaders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from secateurs import data
from secateurs.errors import ConfigError, DataError


def _write_idx_dir(root: Path, n_train: int = 20, n_test: int = 10, classes: int = 3) -> None:
    """A tiny MNIST-format directory: gzip images, raw labels (both forms must be found)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        data.write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
            compress=True,
        )
        data.write_idx(
            root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % classes).astype(np.uint8)
        )


# --- IDX files ------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, compress: bool, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) % 7 - 3 * (dtype != np.uint8)).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / "x.idx"
    data.write_idx(path, array, compress=compress)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if compress else b"\x00\x00")
    back = data.read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert np.array_equal(back, array)


def test_idx_header_written_by_hand_is_read(tmp_path: Path) -> None:
    """The format as specified (not just our writer): magic 0x00000801, big-endian dims."""
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes([9, 0, 1, 2, 3]))
    assert data.read_idx(path).tolist() == [9, 0, 1, 2, 3]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not an IDX file"),
        (b"PK\x03\x04 not idx", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03\x00", "truncated inside its header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "trailing bytes"),
        (b"\x00\x00\x0c\x01\x00\x00\x00\x02" + b"\x00" * 7, "truncated"),
    ],
)
def test_malformed_idx_is_a_data_error(tmp_path: Path, content: bytes, match: str) -> None:
    for compress in (False, True):
        path = tmp_path / ("x.gz" if compress else "x")
        path.write_bytes(gzip.compress(content) if compress else content)
        with pytest.raises(DataError, match=match) as info:
            data.read_idx(path)
        assert str(path) in str(info.value)


def test_truncated_and_corrupt_gzip_are_data_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    data.write_idx(path, np.arange(1000, dtype=np.int32).reshape(10, 100), compress=True)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="gzip"):
        data.read_idx(path)
    path.write_bytes(whole[:10] + b"\xff" * (len(whole) - 10))
    with pytest.raises(DataError, match="gzip"):
        data.read_idx(path)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read IDX file"):
        data.read_idx(tmp_path / "nope")


def test_write_idx_refuses_unsupported_dtypes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="uint8"):
        data.write_idx(tmp_path / "x", np.zeros(3, np.complex64))


# --- MNIST-format directories ---------------------------------------------------------------


def test_missing_directory_names_the_package_and_the_option(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        data.load_fashion_mnist(root=missing)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(missing) in message and "does not exist" in message
    assert "root=" in message and "data.root" in message and "SECATEURS_DATA_DIR" in message


def test_missing_mnist_says_which_files_to_place(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz") as info:
        data.load_dataset("mnist", root=tmp_path)
    assert str(tmp_path) in str(info.value) and "has no such file" in str(info.value)


def test_env_var_overrides_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path)):
        data.load_fashion_mnist()
    _write_idx_dir(tmp_path, classes=10)
    assert len(data.load_dataset("mnist").train) == 20  # mnist honours the variable too


def test_small_idx_directory_loads(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    bundle = data.load_idx_dataset(tmp_path, "tiny")
    assert bundle.name == "tiny" and bundle.input_shape == (1, 28, 28)
    assert len(bundle.train) == 20 and len(bundle.test) == 10 and bundle.num_classes == 3
    assert bundle.class_names == ["0", "1", "2"]
    x, y = bundle.train.tensors
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # normalised with the training set's statistics
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-3)


def test_idx_directory_is_cached_until_a_file_changes(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    first = data.load_idx_dataset(tmp_path)
    again = data.load_idx_dataset(tmp_path)
    assert again.train.tensors[0] is first.train.tensors[0]  # decoded once per process
    _write_idx_dir(tmp_path, n_train=30)
    assert len(data.load_idx_dataset(tmp_path).train) == 30  # a rewrite is not served stale


def test_mismatched_or_foreign_directory_is_a_data_error(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path, classes=12)
    with pytest.raises(DataError, match="label 11 but only 10 classes"):
        data.load_fashion_mnist(root=tmp_path)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="do not match"):
        data.load_idx_dataset(tmp_path)


@pytest.mark.skipif(
    not data.DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECATEURS_DATA_DIR", raising=False)
    bundle = data.load_dataset("fashion-mnist")
    assert bundle.name == "fashion-mnist"
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert bundle.class_names[0] == "T-shirt/top" and len(bundle.class_names) == 10
    x, labels = bundle.train.tensors
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert bundle.test.tensors[0].shape == (10000, 1, 28, 28)
    assert abs(float(x.mean())) < 1e-3 and float(x.std()) == pytest.approx(1.0, abs=1e-3)
    assert labels.dtype == torch.int64 and int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert torch.bincount(bundle.test.tensors[1]).tolist() == [1000] * 10
    assert data.load_fashion_mnist().train.tensors[0] is x  # cached


# --- synthetic, bundles, loaders ------------------------------------------------------------


def test_synthetic_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a, b = data.synthetic(seed=3), data.synthetic(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for split in ("train", "test"):
        for ta, tb in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.train.tensors[0], data.synthetic(seed=4).train.tensors[0])
    small = data.synthetic(n_train=7, n_test=5, num_classes=3, shape=(2, 4, 4))
    assert small.train.tensors[0].shape == (7, 2, 4, 4) and small.input_shape == (2, 4, 4)
    assert len(small.test) == 5 and small.num_classes == 3 and len(small.class_names) == 3
    assert int(small.train.tensors[1].max()) < 3


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"num_classes": 1}, "num_classes"),
        ({"shape": (1, 0, 28)}, "shape"),
        ({"noise": -0.5}, "noise"),
    ],
)
def test_synthetic_validates_its_arguments(options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        data.synthetic(**options)  # type: ignore[arg-type]


def test_loaders_are_seeded_and_batched() -> None:
    a = data.synthetic(n_train=256, n_test=100)
    first = [y for _, y in a.loaders(64, seed=1)[0]]
    again = [y for _, y in a.loaders(64, seed=1)[0]]
    other = [y for _, y in a.loaders(64, seed=2)[0]]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))
    assert torch.equal(torch.cat(first).sort().values, a.train.tensors[1].sort().values)
    train_loader, test_loader = a.loaders(64, eval_batch_size=30)
    x, y = next(iter(train_loader))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)
    assert len(train_loader) == 4 and [len(y) for _, y in test_loader] == [30, 30, 30, 10]
    assert torch.equal(torch.cat([y for _, y in test_loader]), a.test.tensors[1])  # in order
    with pytest.raises(ConfigError, match="batch_size"):
        a.loaders(0)


def test_calibration_split_and_subset() -> None:
    bundle = data.synthetic(n_train=100, n_test=50)
    split = bundle.calibration_split(30, seed=0)
    assert len(split) == 30
    assert torch.equal(split.tensors[0], bundle.calibration_split(30, seed=0).tensors[0])
    assert not torch.equal(split.tensors[0], bundle.calibration_split(30, seed=1).tensors[0])
    # drawn from the training set, without replacement
    rows = {tuple(r.flatten()[:8].tolist()) for r in bundle.train.tensors[0]}
    picked = [tuple(r.flatten()[:8].tolist()) for r in split.tensors[0]]
    assert set(picked) <= rows and len(set(picked)) == 30
    assert len(bundle.calibration_split(1000)) == 100  # capped at the training set
    with pytest.raises(DataError, match="at least 1"):
        bundle.calibration_split(0)

    small = bundle.subset(10, 5)
    assert len(small.train) == 10 and len(small.test) == 5
    assert torch.equal(small.train.tensors[0], bundle.train.tensors[0][:10])
    assert (small.num_classes, small.input_shape, small.name) == (10, (1, 28, 28), "synthetic")
    with pytest.raises(ConfigError, match="n_train"):
        bundle.subset(0, 5)


def test_load_dataset_names_and_options() -> None:
    assert {"fashion-mnist", "mnist", "synthetic"} <= set(data.DATASETS.names())
    bundle = data.load_dataset("synthetic", n_train=16, n_test=8)
    assert isinstance(bundle, data.DataBundle) and len(bundle.train) == 16
    with pytest.raises(ConfigError, match=r"allowed: .*fashion-mnist.*mnist.*synthetic"):
        data.load_dataset("cifar-1000")
    with pytest.raises(ConfigError, match=r"'colour'.*allowed: n_train"):
        data.load_dataset("synthetic", colour=True)
