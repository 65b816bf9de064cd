"""The compressed model file: exact round trips, sizes, centroid fine-tuning, bad files."""

from __future__ import annotations

import copy
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from helpers import assert_untouched, snapshot
from secateurs.compress import (
    CompressConfig,
    inspect_compressed,
    load_compressed,
    quantize_linear,
    share_weights_,
)
from secateurs.compress.codec import MAGIC, _plain_state
from secateurs.compress.sharing import get_shared
from secateurs.errors import ConfigError, DataError, ModelError
from secateurs.zoo import build_model


def _pruned(name: str = "lenet-5", sparsity: float = 0.9, seed: int = 0) -> nn.Module:
    model = build_model(name, seed=seed)
    sc.prune_(model, sparsity=sparsity, allocation="lamp")
    return model


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _plain_state(model).items()}


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"quantization": "linear", "bits": {"conv": 8, "fc": 4}},
        {"quantization": "none"},
        {"huffman": False},
        {"index_bits": 3},
        {"bits": {"conv": 3, "fc": 2}, "layer_bits": {"fc3": 6}},
    ],
)
def test_loaded_weights_are_exactly_the_dequantized_ones(
    tmp_path: Path, config: dict[str, object]
) -> None:
    model = _pruned()
    before = _weights(model)
    info = sc.save_compressed(model, tmp_path / "m.sct", config)
    assert _weights(model).keys() == before.keys()  # the model itself is not changed
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    fresh = build_model("lenet-5", seed=1)
    sc.load_compressed(tmp_path / "m.sct", fresh)
    loaded = fresh.state_dict()
    for key, value in before.items():
        if key.endswith("weight") and loaded[key].dim() > 1:
            # zeros stay zeros; kept weights within the quantization error the save reported
            assert torch.equal(loaded[key] == 0, value == 0) or bool(
                ((loaded[key] != 0) <= (value != 0)).all()
            ), key
            assert float((loaded[key] - value).abs().max()) <= info.max_abs_error + 1e-7
        else:
            assert torch.equal(loaded[key], value), key
    if config.get("quantization") == "none":
        assert info.max_abs_error == 0.0
    # saving the loaded model again gives the same file content (quantization is idempotent)
    info2 = sc.save_compressed(fresh, tmp_path / "again.sct", {**config, "quantization": "none"})
    fresh2 = build_model("lenet-5", seed=2)
    sc.load_compressed(tmp_path / "again.sct", fresh2)
    assert all(torch.equal(fresh2.state_dict()[k], v) for k, v in loaded.items())
    assert info2.max_abs_error == 0.0


def test_shared_model_round_trips_bit_exact_and_keeps_its_codebooks(tmp_path: Path) -> None:
    model = _pruned("lenet-300-100", 0.9)
    assert share_weights_(model, bits={"fc": 4}) is model
    shared = [get_shared(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    assert shared and {s.bits for s in shared if s is not None} == {4}
    x = torch.randn(5, 1, 28, 28)
    expected = model(x)
    info = sc.save_compressed(model, tmp_path / "m.sct")
    assert info.max_abs_error == 0.0
    fresh = build_model("lenet-300-100", seed=3)
    sc.load_compressed(tmp_path / "m.sct", fresh)
    assert torch.equal(fresh(x), expected)
    for t in info.tensors:
        if t.encoding == "kmeans":
            assert t.bits == 4
            assert torch.unique(fresh.state_dict()[t.name]).numel() <= 2**4 + 1


def test_centroid_finetuning_trains_codebooks_only_and_keeps_zeros_and_sharing() -> None:
    torch.manual_seed(0)
    model = _pruned("lenet-300-100", 0.9)
    zeros_before = {k: v == 0 for k, v in _weights(model).items() if k.endswith("weight")}
    share_weights_(model, bits={"fc": 3})
    assignments = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".0.index")}
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    codebook = model.fc1.parametrizations.weight.original.detach().clone()
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(model.fc1.parametrizations.weight.original, codebook)
    for k, v in model.state_dict().items():
        if k.endswith(".0.index"):
            assert torch.equal(v, assignments[k])  # assignments fixed, only centroids move
    weights = _weights(model)
    for k, zeros in zeros_before.items():
        assert bool((weights[k][zeros] == 0).all()), k
        assert torch.unique(weights[k][~zeros]).numel() <= 8
    sc.make_permanent_(model)
    assert not any(".parametrizations." in k for k in model.state_dict())
    build_model("lenet-300-100").load_state_dict(model.state_dict(), strict=True)


def test_centroid_gradient_is_the_sum_of_its_weights_gradients() -> None:
    layer = nn.Linear(6, 4, bias=False)
    share_weights_(layer, bits={"fc": 2})
    index = layer.parametrizations.weight[0].index
    x = torch.randn(3, 6)
    (layer(x) ** 2).sum().backward()
    weight = layer.weight.detach().requires_grad_()
    (nn.functional.linear(x, weight) ** 2).sum().backward()
    assert weight.grad is not None
    expected = torch.zeros(4).index_add_(0, index.reshape(-1).long(), weight.grad.reshape(-1))
    assert torch.allclose(layer.parametrizations.weight.original.grad, expected)


def test_share_weights_bad_input_leaves_model_untouched() -> None:
    model = build_model("lenet-5")
    state = snapshot(model)
    for kwargs in (
        {"bits": {"conv": 0}},
        {"bits": {"attention": 4}},
        {"layer_bits": {"nope.*": 4}},
        {"exclude": ["missing"]},
        {"layer_bits": {"fc1": 17}},
    ):
        with pytest.raises(ConfigError):
            share_weights_(model, **kwargs)  # type: ignore[arg-type]
        assert_untouched(model, state)
    with pytest.raises(ModelError, match="no Linear"):
        share_weights_(nn.Sequential(nn.ReLU()))


def test_sparser_and_fewer_bits_make_smaller_files(tmp_path: Path) -> None:
    sizes = {}
    for sparsity in (0.5, 0.9, 0.98):
        model = build_model("lenet-300-100")
        sc.prune_(model, sparsity=sparsity)
        for bits in (8, 4):
            info = sc.save_compressed(model, tmp_path / "m.sct", {"bits": {"fc": bits}})
            sizes[(sparsity, bits)] = info.file_bytes
            assert info.file_bytes == (tmp_path / "m.sct").stat().st_size
    assert sizes[(0.5, 8)] > sizes[(0.9, 8)] > sizes[(0.98, 8)]
    assert all(sizes[(s, 8)] > sizes[(s, 4)] for s in (0.5, 0.9, 0.98))
    dense = sum(v.numel() * 4 for v in build_model("lenet-300-100").state_dict().values())
    assert dense / sizes[(0.98, 4)] > 60


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 90),
    density=st.floats(0.0, 1.0),
    quantization=st.sampled_from(["kmeans", "linear", "none"]),
    huffman=st.booleans(),
    index_bits=st.sampled_from([None, 1, 2, 4, 16]),
    seed=st.integers(0, 10_000),
)
def test_any_sparse_linear_round_trips(
    tmp_path_factory: pytest.TempPathFactory,
    rows: int,
    cols: int,
    density: float,
    quantization: str,
    huffman: bool,
    index_bits: int | None,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(rows, cols) < density)
    path = tmp_path_factory.mktemp("rt") / "l.sct"
    bits = 2 if quantization == "linear" else 1
    info = sc.save_compressed(
        layer,
        path,
        {
            "quantization": quantization,
            "huffman": huffman,
            "index_bits": index_bits,
            "bits": {"fc": bits + 2},
        },
    )
    fresh = nn.Linear(cols, rows)
    sc.load_compressed(path, fresh)
    assert torch.equal(fresh.bias, layer.bias)
    assert bool(((fresh.weight != 0) <= (layer.weight != 0)).all())
    assert float((fresh.weight - layer.weight).detach().abs().max()) <= info.max_abs_error + 1e-7
    assert inspect_compressed(path).to_dict()["params"] == rows * cols + rows


def test_inspect_reports_per_tensor_bytes_that_add_up(tmp_path: Path) -> None:
    model = _pruned("lenet-5", 0.95)
    info = sc.save_compressed(model, tmp_path / "m.sct", metadata={"model": "lenet-5"})
    seen = inspect_compressed(tmp_path / "m.sct")
    d = seen.to_dict()
    assert d["metadata"] == {"model": "lenet-5"}
    payload = sum(t["bytes"] for t in d["tensors"])
    assert d["file_bytes"] == 16 + d["header_bytes"] + payload + 32
    assert d["ratio"] == pytest.approx(d["dense_bytes"] / d["file_bytes"])
    assert [t.name for t in seen.tensors] == [t.name for t in info.tensors]
    assert d["nonzeros"] == sum(int((v != 0).sum()) for v in _plain_state(model).values())
    json.dumps(d)  # machine-readable as it is


def test_linear_quantization_levels_and_zero() -> None:
    t = torch.tensor([[1.0, -0.5, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0]])
    q = quantize_linear(t, bits=3)
    assert q.max_level == 3
    assert q.levels[0].tolist() == [3, -2, 0, 1]
    assert q.levels[1].tolist() == [0, 0, 0, 0]
    assert torch.equal(q.to_dense()[1], torch.zeros(4))
    with pytest.raises(ConfigError, match="at least 2"):
        quantize_linear(t, bits=1)


# --------------------------------------------------------------------------- bad files


def _saved(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "m.sct"
    sc.save_compressed(_pruned("lenet-300-100", 0.95), path)
    return path, path.read_bytes()


def _rejects(path: Path, match: str) -> None:
    fresh = build_model("lenet-300-100", seed=5)
    state = snapshot(fresh)
    with pytest.raises(DataError, match=match):
        load_compressed(path, fresh)
    assert_untouched(fresh, state)
    with pytest.raises(DataError, match=match):
        inspect_compressed(path)


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    path, data = _saved(tmp_path)
    for cut in (5, 20, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        _rejects(path, "truncated|not a secateurs|corrupt")


def test_altered_byte_is_rejected_and_located(tmp_path: Path) -> None:
    path, data = _saved(tmp_path)
    altered = bytearray(data)
    altered[len(data) - 100] ^= 0x10  # inside the payload, near its end
    path.write_bytes(bytes(altered))
    _rejects(path, "checksum mismatch in tensor")


def test_future_version_and_foreign_files_are_rejected(tmp_path: Path) -> None:
    path, data = _saved(tmp_path)
    path.write_bytes(data[:8] + struct.pack("<H", 99) + data[10:])
    _rejects(path, "version 99")
    path.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    _rejects(path, "not a secateurs")
    torch.save({"w": torch.ones(3)}, path)
    _rejects(path, "not a secateurs")
    _rejects(tmp_path / "missing.sct", "does not exist")


def test_a_consistent_forgery_with_bad_positions_is_rejected(tmp_path: Path) -> None:
    """A file with a valid checksum but a tensor claiming a smaller shape than its positions."""
    import hashlib

    path, data = _saved(tmp_path)
    (head_len,) = struct.unpack_from("<I", data, 12)
    header = json.loads(zlib.decompress(data[16 : 16 + head_len]))
    sparse = next(t for t in header["tensors"] if t["layout"] == "sparse")
    sparse["shape"] = [1, 3]
    head = zlib.compress(json.dumps(header).encode())
    body = data[:12] + struct.pack("<I", len(head)) + head + data[16 + head_len : -32]
    path.write_bytes(body + hashlib.sha256(body).digest())
    _rejects(path, "cannot be decoded|past the end|codes for|positions")


def test_load_into_the_wrong_architecture_or_a_masked_model_is_refused(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    other = build_model("lenet-5")
    state = snapshot(other)
    with pytest.raises(ModelError, match="does not fit"):
        load_compressed(path, other)
    assert_untouched(other, state)
    masked = _pruned("lenet-300-100", 0.5)
    before = copy.deepcopy(masked.state_dict())
    with pytest.raises(ModelError, match="make_permanent_"):
        load_compressed(path, masked)
    assert all(torch.equal(v, masked.state_dict()[k]) for k, v in before.items())


def test_compress_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="quantization"):
        CompressConfig(quantization="huffman-only")
    with pytest.raises(ConfigError, match=r"1\.\.16"):
        CompressConfig(bits={"fc": 17})
    with pytest.raises(ConfigError, match="needs >= 2"):
        CompressConfig(quantization="linear", bits={"fc": 1})
    with pytest.raises(ConfigError, match="index_bits"):
        CompressConfig(index_bits=0)
    with pytest.raises(ConfigError, match="unknown option"):
        sc.save_compressed(nn.Linear(2, 2), "/nonexistent/x.sct", {"bitz": 3})
    with pytest.raises(ConfigError, match="matches no"):
        sc.save_compressed(nn.Linear(2, 2), "/tmp/x.sct", {"layer_bits": {"conv9": 3}})


def test_magic_is_at_the_start(tmp_path: Path) -> None:
    _, data = _saved(tmp_path)
    assert data.startswith(MAGIC)
