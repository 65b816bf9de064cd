"""Export to ONNX and safetensors: the file computes what PyTorch computes and keeps the zeros.

Every ONNX file is run with onnxruntime here, independently of the exporter's own check, and
its zeros are counted from the file; the caller's masked model must come out untouched.
"""

from __future__ import annotations

import copy
import functools
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import Tensor, nn
from torch.nn.utils import parametrize

import secateurs as sc
from secateurs.errors import ConfigError, ModelError, SecateursError
from secateurs.export import (
    ExportReport,
    export_onnx,
    export_safetensors,
    load_safetensors,
    onnxruntime_module,
    read_safetensors_metadata,
)
from secateurs.zoo import build_model

ZOO = ["lenet-300-100", "lenet-5", "resnet-20", "vgg-bn"]


@functools.cache
def _pruned(name: str) -> nn.Module:
    model = build_model(name, seed=0)
    sc.prune_(model, sparsity=0.9)
    return model


def pruned(name: str) -> nn.Module:
    """A fresh copy of ``name`` pruned to 90% (global magnitude), still masked."""
    return copy.deepcopy(_pruned(name))


def is_masked(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(nonzero, total) over the effective floating weights of rank >= 2, counted in PyTorch."""
    baked = sc.make_permanent_(copy.deepcopy(model))
    weights = [p for p in baked.parameters() if p.dim() >= 2 and p.is_floating_point()]
    return sum(int(torch.count_nonzero(p)) for p in weights), sum(p.numel() for p in weights)


def onnx_weight_counts(path: Path) -> tuple[int, int]:
    """(nonzero, total) over the rank >= 2 float initializers, read straight from the file."""
    graph = onnx.load(str(path)).graph
    arrays = [numpy_helper.to_array(t) for t in graph.initializer]
    weights = [a for a in arrays if a.ndim >= 2 and a.dtype == np.float32]
    return sum(int(np.count_nonzero(a)) for a in weights), sum(a.size for a in weights)


def run_onnx(path: Path, x: Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@dataclass
class Exported:
    name: str
    state: str
    model: nn.Module
    before: dict[str, Tensor]
    report: ExportReport


# every zoo model masked, and one made permanent (each export costs seconds on 2 cores)
CASES = [(n, "masked") for n in ZOO] + [("lenet-5", "permanent")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{s}" for n, s in CASES])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Each zoo model pruned to 90%, masked or made permanent, exported once per module."""
    name, state = request.param
    model = pruned(name)
    if state == "permanent":
        sc.make_permanent_(model)
    model.train()  # the export must not leave the caller's model in eval mode
    before = snapshot(model)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("onnx") / f"{name}-{state}.onnx"
    return Exported(name, state, model, before, export_onnx(model, x, path))


def test_onnx_matches_pytorch_on_a_new_batch_size(exported: Exported) -> None:
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    model = copy.deepcopy(exported.model).eval()
    with torch.no_grad():
        expected = model(x).numpy()
    got = run_onnx(exported.report.path, x)
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert exported.report.checked_batch_sizes == (2, 3)
    assert exported.report.max_abs_diff is not None and exported.report.max_abs_diff < 1e-4


def test_onnx_file_keeps_the_zeros(exported: Exported) -> None:
    nonzero, total = weight_counts(exported.model)
    assert nonzero < 0.11 * total  # the model really is 90% sparse
    assert onnx_weight_counts(exported.report.path) == (nonzero, total)
    report = exported.report
    assert (report.nonzero_weights, report.total_weights) == (nonzero, total)
    assert report.sparsity == pytest.approx(0.9, abs=0.01)


def test_onnx_export_leaves_the_callers_model_alone(exported: Exported) -> None:
    model = exported.model
    assert is_masked(model) == (exported.state == "masked")
    assert all(m.training for m in model.modules())
    now = model.state_dict()
    assert now.keys() == exported.before.keys()
    for key, value in exported.before.items():
        assert torch.equal(now[key], value), key


def test_onnx_report_describes_the_file(exported: Exported) -> None:
    report = exported.report
    assert report.bytes == report.path.stat().st_size > 0
    assert report.exporter == "dynamo"
    assert report.opset >= 17
    assert onnx.load(str(report.path)).opset_import[0].version == report.opset
    data = json.loads(json.dumps(report.to_dict()))
    assert data["path"] == str(report.path)
    assert data["nonzero_weights"] == report.nonzero_weights


def test_onnxruntime_module_runs_the_exported_file_like_the_model() -> None:
    """A shrunk model run by onnxruntime behind a module's call, as the benchmarks and the run
    report time it: the same outputs as PyTorch at any batch size, the tensors in and out."""
    torch.manual_seed(0)
    model = build_model("vgg-bn").eval()
    small = sc.shrink(model, torch.zeros(1, 1, 28, 28), budget=sc.MACs(0.5))
    run = onnxruntime_module(small, torch.zeros(1, 1, 28, 28), threads=1)
    assert run.session.get_session_options().intra_op_num_threads == 1
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = small(x)
        got = run(x)
        assert isinstance(got, Tensor) and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert sc.measure_latency(run, torch.zeros(1, 1, 28, 28), repeats=3).median_ms > 0


def test_torchvision_resnet18_exports(tmp_path: Path) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=10)
    sc.prune_(model, sparsity=0.9)
    x = torch.randn(1, 3, 32, 32)
    report = export_onnx(model, x, tmp_path / "resnet18.onnx")
    assert is_masked(model)
    assert (report.nonzero_weights, report.total_weights) == weight_counts(model)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x).numpy()
    np.testing.assert_allclose(run_onnx(report.path, x), expected, rtol=1e-3, atol=1e-5)


def test_fixed_batch_export_rejects_another_batch_size(tmp_path: Path) -> None:
    model = pruned("lenet-300-100")
    report = export_onnx(model, torch.randn(2, 1, 28, 28), tmp_path / "m.onnx", dynamic_batch=False)
    assert report.checked_batch_sizes == (2,)
    assert run_onnx(report.path, torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        run_onnx(report.path, torch.randn(3, 1, 28, 28))


def test_torchscript_exporter_also_works(tmp_path: Path) -> None:
    model = pruned("lenet-5")
    x = torch.randn(2, 1, 28, 28)
    report = export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript", opset=17)
    assert report.exporter == "torchscript"
    assert report.opset == 17
    assert (report.nonzero_weights, report.total_weights) == weight_counts(model)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x).numpy()
    np.testing.assert_allclose(run_onnx(report.path, x), expected, rtol=1e-4, atol=1e-5)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.a(x) + self.b(y), self.b(y)


def test_several_inputs_and_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoInputs()
    sc.prune_(model, sparsity=0.5)
    x, y = torch.randn(2, 6), torch.randn(2, 3)
    report = export_onnx(model, (x, y), tmp_path / "m.onnx", output_names=["sum", "b"])
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_0", "input_1"]
    assert [o.name for o in session.get_outputs()] == ["sum", "b"]
    x3, y3 = torch.randn(3, 6), torch.randn(3, 3)
    got = session.run(None, {"input_0": x3.numpy(), "input_1": y3.numpy()})
    with torch.no_grad():
        expected = model(x3, y3)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-5, atol=1e-6)


class Drifting(nn.Module):
    """Adds how many times it has been called: the traced constant cannot match a later call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.fc(x) + float(self.calls)


def test_a_mismatch_raises_and_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    with pytest.raises(ModelError, match=r"differs by up to \d") as info:
        export_onnx(Drifting(), torch.randn(2, 4), path)
    assert "max abs" in str(info.value)
    assert not path.exists()


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    model = pruned("lenet-300-100")
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(ConfigError, match="exporter"):
        export_onnx(model, x, tmp_path / "m.onnx", exporter="tflite")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(model, x, tmp_path / "m.onnx", opset=0)
    with pytest.raises(ConfigError, match="example_inputs"):
        export_onnx(model, 3, tmp_path / "m.onnx")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="does not run"):
        export_onnx(model, torch.randn(1, 5), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_onnx_package_says_what_to_install(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` fail
    with pytest.raises(ConfigError, match=f"pip install {missing}"):
        export_onnx(pruned("lenet-300-100"), torch.randn(1, 1, 28, 28), tmp_path / "m.onnx")


# --------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("state", ["masked", "permanent"])
def test_safetensors_round_trip_is_exact(name: str, state: str, tmp_path: Path) -> None:
    model = pruned(name)
    if state == "permanent":
        sc.make_permanent_(model)
    before = snapshot(model)
    path = export_safetensors(model, tmp_path / "m.safetensors", metadata={"run": "a", "step": 3})

    assert is_masked(model) == (state == "masked")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    fresh = load_safetensors(path, build_model(name, seed=123))
    assert not is_masked(fresh)
    expected = sc.make_permanent_(copy.deepcopy(model)).state_dict()
    loaded = fresh.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), copy.deepcopy(model).eval()(x))

    meta = read_safetensors_metadata(path)
    nonzero, total = weight_counts(model)
    assert meta["nonzero_weights"] == str(nonzero)
    assert meta["total_weights"] == str(total)
    assert meta["secateurs_version"] == sc.__version__
    assert meta["model_class"].endswith(type(fresh).__qualname__)
    assert (meta["run"], json.loads(meta["step"])) == ("a", 3)


def test_safetensors_loads_strictly(tmp_path: Path) -> None:
    path = export_safetensors(pruned("lenet-5"), tmp_path / "m.safetensors")
    with pytest.raises(ModelError, match=r"missing|unexpected"):
        load_safetensors(path, build_model("lenet-300-100"))
    with pytest.raises(ModelError, match="shape"):
        load_safetensors(path, build_model("lenet-5", num_classes=7))
    with pytest.raises(ModelError, match="make_permanent_"):
        load_safetensors(path, pruned("lenet-5"))
    target = build_model("lenet-5", seed=5)
    before = snapshot(target)
    with pytest.raises(ModelError):
        load_safetensors(path, build_model("lenet-5", num_classes=7))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_safetensors_keeps_tied_weights(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.embed(x))

    torch.manual_seed(0)
    model = Tied()
    path = export_safetensors(model, tmp_path / "m.safetensors")
    fresh = load_safetensors(path, Tied())
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight


class Payload:
    """Unpickling this would create ``marker``: proves a loader never unpickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle", "empty"])
def test_corrupt_safetensors_is_a_secateurs_error(damage: str, tmp_path: Path) -> None:
    path = export_safetensors(pruned("lenet-300-100"), tmp_path / "m.safetensors")
    marker = tmp_path / "unpickled"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "pickle":
        path.write_bytes(pickle.dumps({"fc1.weight": Payload(marker)}))
    else:
        path.write_bytes(b"")
    model = build_model("lenet-300-100", seed=1)
    before = snapshot(model)
    with pytest.raises(SecateursError, match="safetensors"):
        load_safetensors(path, model)
    assert not marker.exists()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_safetensors_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_safetensors(tmp_path / "nope.safetensors", build_model("lenet-5"))
    with pytest.raises(ConfigError, match="reserved"):
        export_safetensors(build_model("lenet-5"), tmp_path / "m.st", metadata={"format": "x"})
    with pytest.raises(ConfigError, match="JSON"):
        export_safetensors(build_model("lenet-5"), tmp_path / "m.st", metadata={"x": object()})
    assert not (tmp_path / "m.st").exists()


def test_pipeline_checkpoints_of_tied_weights_save_and_load(tmp_path: Path) -> None:
    from secateurs.pipeline import load_checkpoint, save_checkpoint

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(x))

    torch.manual_seed(0)
    model = Tied()
    path = tmp_path / "tied.safetensors"
    save_checkpoint(model, path, {"model": "tied"})
    fresh = Tied()
    load_checkpoint(path, fresh)
    x = torch.arange(10)
    assert torch.equal(fresh(x), model(x))
    assert fresh.head.weight is fresh.emb.weight
