"""Export of pruned models to ONNX and safetensors, checked rather than trusted.

A pruned model is only useful once it leaves PyTorch. Both exporters work on a deep copy of the
caller's model with the masks baked in (:func:`~secateurs.masks.make_permanent_`), so the
caller's model keeps its masks, its training mode and its state, and the file holds plain
weights with the pruned ones stored as zeros.

:func:`export_onnx` writes an ONNX graph and, by default, proves it: the file is run with
onnxruntime on the example inputs (and on another batch size when the batch dimension is
dynamic) and compared to PyTorch's outputs, and the zeros are counted in the file's own weight
tensors, so the report shows that the pruning survived the export. :func:`export_safetensors`
writes a plain ``state_dict`` that :func:`load_safetensors` loads strictly into a fresh model of
the same class; nothing is ever unpickled.

``onnx`` and ``onnxruntime`` (plus ``onnxscript`` for PyTorch's ``torch.export``-based exporter)
are imported only when ONNX export is used; a missing one is a :class:`ConfigError` naming the
package to install.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils import _pytree

from secateurs._version import __version__
from secateurs.compress.formats import PackedNM, to_packed_nm
from secateurs.errors import ConfigError, ModelError, SecateursError
from secateurs.graph.surgery import ChannelPlan, apply_plan_
from secateurs.masks import make_permanent_
from secateurs.provenance import find_report
from secateurs.shrink import ShrinkReport

if TYPE_CHECKING:
    import onnx

Exporter = Literal["auto", "dynamo", "torchscript"]
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")

Inputs = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]

_RESERVED_METADATA = (
    "format",
    "secateurs_version",
    "model_class",
    "nonzero_weights",
    "total_weights",
)


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and what it verified.

    ``nonzero_weights`` / ``total_weights`` are counted in the ONNX file itself (its
    floating-point initializers and constants of rank >= 2, i.e. the weight matrices and
    kernels), so they show the pruning survived the export. ``max_abs_diff`` is the largest
    absolute difference between onnxruntime's and PyTorch's outputs over every checked batch
    size, or ``None`` when the export was not checked.
    """

    path: Path
    bytes: int
    opset: int
    exporter: str
    nonzero_weights: int
    total_weights: int
    max_abs_diff: float | None
    checked_batch_sizes: tuple[int, ...]
    dynamic_batch: bool

    @property
    def sparsity(self) -> float:
        """Fraction of the exported weights that are zero."""
        return 1.0 - self.nonzero_weights / self.total_weights if self.total_weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the path as a string)."""
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "opset": self.opset,
            "exporter": self.exporter,
            "nonzero_weights": self.nonzero_weights,
            "total_weights": self.total_weights,
            "sparsity": self.sparsity,
            "max_abs_diff": self.max_abs_diff,
            "checked_batch_sizes": list(self.checked_batch_sizes),
            "dynamic_batch": self.dynamic_batch,
        }


# --------------------------------------------------------------------------- shared


def _baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` on the CPU, masks baked in, in eval mode; ``model`` is untouched."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    baked = make_permanent_(copy.deepcopy(model))
    return baked.cpu().eval()


def _is_weight(shape: Sequence[int], floating: bool) -> bool:
    """The tensors counted as weights: floating point, rank >= 2 (matrices and kernels)."""
    return floating and len(shape) >= 2


def _count_state(state: Mapping[str, Tensor]) -> tuple[int, int]:
    """(nonzero, total) over the weight tensors of a state dict."""
    nonzero = total = 0
    for t in state.values():
        if _is_weight(t.shape, t.is_floating_point()):
            nonzero += int(torch.count_nonzero(t))
            total += t.numel()
    return nonzero, total


# --------------------------------------------------------------------------- ONNX


def _require_onnx(runtime: bool) -> Any:
    """Import ``onnx`` (and ``onnxruntime`` when ``runtime``), or say which package to install.

    Returns the ``onnxruntime`` module, or ``None`` when it was not asked for.
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ConfigError(
            "ONNX export needs the 'onnx' package: pip install onnx onnxruntime"
        ) from None
    if not runtime:
        return None
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "checking an ONNX export needs the 'onnxruntime' package: pip install onnxruntime "
            "(or pass check=False)"
        ) from None
    return onnxruntime


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _split_inputs(example_inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword inputs, as ``torch.onnx.export`` takes them."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise ConfigError(
        "example_inputs must be a Tensor, a tuple of tensors or a mapping of keyword tensors; "
        f"got {type(example_inputs).__name__}"
    )


def _io_names(
    given: Sequence[str] | None,
    count: int,
    kind: str,
    unnamed: int,
    named: list[str],
    why: str,
) -> list[str]:
    """Graph input or output names: ``given`` (checked: ``count`` distinct names), or defaults:
    ``kind`` alone for a single unnamed tensor, ``kind_0 ...`` for several, then ``named``."""
    if given is not None:
        names = list(given)
        if len(names) != count or len(set(names)) != len(names):
            raise ConfigError(
                f"{kind}_names = {names!r} is invalid; need {count} distinct names ({why})"
            )
        return names
    defaults = [kind] if unnamed == 1 else [f"{kind}_{i}" for i in range(unnamed)]
    return defaults + named


def _named_tensor_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], input_names: Sequence[str] | None
) -> dict[str, Tensor]:
    """The tensor inputs of the graph, in order, under the names the ONNX file will use.

    Non-tensor inputs are baked into the graph as constants by the exporter and get no name.
    """
    for value in (*args, *kwargs.values()):
        if not isinstance(value, Tensor) and any(
            isinstance(leaf, Tensor) for leaf in _pytree.tree_leaves(value)
        ):
            raise ConfigError(
                "example_inputs holds a container of tensors; pass each tensor as its own "
                "positional or keyword input"
            )
    positional = [t for t in args if isinstance(t, Tensor)]
    keyword = [(k, v) for k, v in kwargs.items() if isinstance(v, Tensor)]
    if not positional and not keyword:
        raise ConfigError("example_inputs holds no tensor; the exported graph would have no input")
    tensors = positional + [v for _, v in keyword]
    names = _io_names(
        input_names,
        len(tensors),
        "input",
        len(positional),
        [k for k, _ in keyword],
        "one per tensor input",
    )
    return {n: t.detach().cpu() for n, t in zip(names, tensors, strict=True)}


def _output_leaves(output: Any) -> list[Tensor]:
    """The tensors of a model's output, flattened in the order the exporters use."""
    if hasattr(output, "to_tuple"):  # Hugging Face ModelOutput: its set fields, in order
        output = output.to_tuple()
    leaves = [leaf for leaf in _pytree.tree_leaves(output) if isinstance(leaf, Tensor)]
    if not leaves:
        raise ModelError("the model returned no tensor, so there is nothing to export to ONNX")
    return leaves


def _forward(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    with torch.no_grad():
        try:
            output = model(*args, **kwargs)
        except SecateursError:
            raise
        except Exception as exc:
            raise ModelError(
                f"{type(model).__name__} does not run on the example inputs: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return [t.detach().cpu() for t in _output_leaves(output)]


def _grow_batch(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], int]:
    """The same inputs with one more row in the batch dimension (to test a dynamic batch)."""

    def grow(value: Any) -> Any:
        if isinstance(value, Tensor) and value.dim() >= 1:
            return torch.cat([value, value[:1]])
        return value

    new_args = tuple(grow(v) for v in args)
    new_kwargs = {k: grow(v) for k, v in kwargs.items()}
    first = next(t for t in (*new_args, *new_kwargs.values()) if isinstance(t, Tensor))
    return new_args, new_kwargs, int(first.shape[0]) if first.dim() >= 1 else 1


def _batch_spec(value: Any, batch: Any) -> dict[int, Any] | None:
    return {0: batch} if isinstance(value, Tensor) and value.dim() >= 1 else None


def _export_dynamo(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    path: Path,
    opset: int | None,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
) -> None:
    """``torch.export``-based ONNX export (PyTorch's default since 2.9; needs onnxscript)."""
    dynamic_shapes: tuple[Any, ...] | dict[str, Any] | None = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        if kwargs:
            dynamic_shapes = {k: _batch_spec(v, batch) for k, v in kwargs.items()}
        else:
            dynamic_shapes = tuple(_batch_spec(v, batch) for v in args)
    with warnings.catch_warnings():
        # several inputs sharing the one "batch" dimension is intended, not worth a warning
        warnings.filterwarnings("ignore", message=r".*shares the same shape constraints")
        program = torch.onnx.export(
            model,
            args,
            kwargs=kwargs or None,
            dynamo=True,
            verbose=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
        )
    if program is None:  # only the TorchScript path returns None
        raise ModelError("torch.onnx.export returned no program")
    program.save(str(path))  # weights inline, or external data beside it when over 2 GB


def _export_torchscript(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    path: Path,
    opset: int | None,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    outputs: list[Tensor],
    inputs: Mapping[str, Tensor],
) -> None:
    """The legacy TorchScript-tracing exporter: deprecated, but works without onnxscript."""
    dynamic_axes: dict[str, dict[int, str]] | None = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n, t in inputs.items() if t.dim() >= 1}
        dynamic_axes |= {
            n: {0: "batch"} for n, t in zip(output_names, outputs, strict=True) if t.dim() >= 1
        }
    with warnings.catch_warnings():
        # torch warns that this exporter is deprecated; the report records which one ran
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            args,
            str(path),
            kwargs=kwargs or None,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph inside it (If / Loop / Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _stored_tensors(model_proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the file: initializers and ``Constant`` node values."""
    for graph in _graphs(model_proto.graph):
        yield from graph.initializer
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t"):
                        yield attr.t


def _external_files(model_proto: onnx.ModelProto, base: Path) -> set[Path]:
    import onnx

    files: set[Path] = set()
    for tensor in _stored_tensors(model_proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            if "location" in entries:
                files.add(base / entries["location"])
    return files


def _inspect_onnx(path: Path) -> tuple[int, int, int, int]:
    """(bytes on disk incl. external data, ai.onnx opset, nonzero weights, total weights)."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    model_proto = onnx.load(str(path), load_external_data=False)
    external = _external_files(model_proto, path.parent)
    size = path.stat().st_size + sum(f.stat().st_size for f in external if f.is_file())
    if external:
        external_data_helper.load_external_data_for_model(model_proto, str(path.parent))
    opset = next(
        (int(o.version) for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), 0
    )
    floating = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    }
    nonzero = total = 0
    for tensor in _stored_tensors(model_proto):
        if _is_weight(tensor.dims, tensor.data_type in floating):
            array = numpy_helper.to_array(tensor)
            nonzero += int(np.count_nonzero(array))
            total += int(array.size)
    return size, opset, nonzero, total


def _run_onnxruntime(
    ort: Any, path: Path, inputs: Mapping[str, Tensor], what: str
) -> list[np.ndarray]:
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
        return list(session.run(None, feed))
    except KeyError as exc:
        raise ModelError(
            f"the exported graph expects an input named {exc.args[0]!r}, which is not one of "
            f"{list(inputs)}"
        ) from None
    except Exception as exc:
        raise ModelError(
            f"onnxruntime cannot run the exported model {what}: {_first_line(exc)}"
        ) from exc


def _compare(
    expected: list[Tensor], actual: list[np.ndarray], rtol: float, atol: float, what: str
) -> float:
    """Max abs difference; a :class:`ModelError` when any output differs beyond tolerance."""
    if len(expected) != len(actual):
        raise ModelError(
            f"the exported model returns {len(actual)} output(s) {what}, PyTorch returns "
            f"{len(expected)}"
        )
    worst = 0.0
    for i, (ref, got) in enumerate(zip(expected, actual, strict=True)):
        ref_np = ref.float().numpy() if ref.is_floating_point() else ref.numpy()
        got_np = np.asarray(got)
        if ref_np.shape != got_np.shape:
            raise ModelError(
                f"output {i} has shape {got_np.shape} in ONNX and {ref_np.shape} in PyTorch {what}"
            )
        got_np = got_np.astype(ref_np.dtype, copy=False)
        diff = float(np.max(np.abs(got_np.astype(np.float64) - ref_np))) if ref_np.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(got_np, ref_np, rtol=rtol, atol=atol, equal_nan=True):
            raise ModelError(
                f"the exported ONNX model disagrees with PyTorch {what}: output {i} differs by up "
                f"to {diff:.3g} (max abs), beyond rtol={rtol:g}, atol={atol:g}"
            )
    return worst


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | Path,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-5,
    exporter: Exporter = "auto",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> ExportReport:
    """Export a pruned model to an ONNX file at ``path`` and check it with onnxruntime.

    ``model`` may be masked (secateurs' parametrizations) or already permanent; it is not
    modified: a deep copy with the masks baked in is exported in eval mode, on the CPU.
    ``example_inputs`` is a tensor, a tuple of positional inputs or a mapping of keyword
    inputs. With ``dynamic_batch`` the first dimension of every input and output is named
    ``batch`` and may change at run time.

    ``exporter`` picks PyTorch's exporter: ``"dynamo"`` (``torch.export``-based, PyTorch's
    default, needs ``onnxscript``), ``"torchscript"`` (legacy tracing, deprecated by PyTorch) or
    ``"auto"``: dynamo when onnxscript is installed, else, or when dynamo cannot capture the
    model, torchscript. ``opset`` defaults to the exporter's own choice.

    With ``check`` the file is run with onnxruntime (CPU) on the example inputs, and on one
    more row when the batch is dynamic, and compared to PyTorch's outputs; a difference beyond
    ``rtol``/``atol`` raises :class:`ModelError` naming the max abs difference and the file is
    removed. The returned :class:`ExportReport` counts the nonzero weights in the file itself.
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter = {exporter!r} is invalid; allowed: {', '.join(EXPORTERS)}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ConfigError(f"opset = {opset!r} is invalid; must be an integer ONNX opset >= 7")
    if not (rtol >= 0 and atol >= 0):
        raise ConfigError(f"rtol = {rtol!r}, atol = {atol!r} are invalid; both must be >= 0")
    ort = _require_onnx(runtime=check)
    if exporter == "dynamo" and not _has_onnxscript():
        raise ConfigError(
            "exporter='dynamo' needs the 'onnxscript' package: pip install onnxscript "
            "(or use exporter='auto')"
        )

    target = Path(path)
    args, kwargs = _split_inputs(example_inputs)
    args = tuple(a.detach().cpu() if isinstance(a, Tensor) else a for a in args)
    kwargs = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    inputs = _named_tensor_inputs(args, kwargs, input_names)
    baked = _baked_copy(model)
    expected = _forward(baked, args, kwargs)
    out_names = _io_names(
        output_names,
        len(expected),
        "output",
        len(expected),
        [],
        f"the model returns {len(expected)} tensor(s)",
    )
    in_names = list(inputs)

    order: list[str] = []
    if exporter in ("auto", "dynamo") and _has_onnxscript():
        order.append("dynamo")
    if exporter in ("auto", "torchscript"):
        order.append("torchscript")
    target.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    used = ""
    for name in order:
        try:
            if name == "dynamo":
                _export_dynamo(
                    baked, args, kwargs, target, opset, in_names, out_names, dynamic_batch
                )
            else:
                _export_torchscript(
                    baked, args, kwargs, target, opset, in_names, out_names, dynamic_batch,
                    expected, inputs,
                )  # fmt: skip
        except Exception as exc:
            failures.append(f"{name}: {_first_line(exc)}")
            continue
        used = name
        break
    if not used:
        hint = (
            "; try dynamic_batch=False if the model fixes its batch size" if dynamic_batch else ""
        )
        raise ModelError(
            f"cannot export {type(model).__name__} to ONNX ({'; '.join(failures)}){hint}"
        )

    try:
        size, file_opset, nonzero, total = _inspect_onnx(target)
        max_diff: float | None = None
        batches: tuple[int, ...] = ()
        if check:
            first = next(iter(inputs.values()))
            batch = int(first.shape[0]) if first.dim() >= 1 else 1
            actual = _run_onnxruntime(ort, target, inputs, f"on batch size {batch}")
            max_diff = _compare(expected, actual, rtol, atol, f"on batch size {batch}")
            batches = (batch,)
            if dynamic_batch:
                args2, kwargs2, batch2 = _grow_batch(args, kwargs)
                inputs2 = _named_tensor_inputs(args2, kwargs2, in_names)
                expected2 = _forward(baked, args2, kwargs2)
                what = f"on batch size {batch2}"
                actual2 = _run_onnxruntime(ort, target, inputs2, what)
                max_diff = max(max_diff, _compare(expected2, actual2, rtol, atol, what))
                batches += (batch2,)
    except SecateursError as exc:
        _remove_export(target)
        raise ModelError(f"{exc} (the file {str(target)!r} was removed)") from exc
    return ExportReport(
        path=target,
        bytes=size,
        opset=file_opset,
        exporter=used,
        nonzero_weights=nonzero,
        total_weights=total,
        max_abs_diff=max_diff,
        checked_batch_sizes=batches,
        dynamic_batch=dynamic_batch,
    )


class OnnxRuntimeModule(nn.Module):
    """An ONNX file run by onnxruntime's CPU provider behind a module's call, so the latency
    tools time the file as a CPU deployment runs it (graph optimisations on: BatchNorm folded,
    activations fused into convolutions, a blocked channel layout).

    ``threads``: onnxruntime's intra-op threads (default: PyTorch's current count, so both
    runtimes are timed alike). Takes and returns tensors; one tensor input, the first output.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        ort = _require_onnx(runtime=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # the session holds the graph and weights in memory: the file may go afterwards
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(out[0])


def onnxruntime_module(
    model: nn.Module, example: Tensor, threads: int | None = None
) -> OnnxRuntimeModule:
    """``model`` exported to ONNX (:func:`export_onnx`, checked against PyTorch, dynamic batch)
    in a temporary directory and loaded into an :class:`OnnxRuntimeModule`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, example, path)
        return OnnxRuntimeModule(path, threads)


def _remove_export(path: Path) -> None:
    """Delete an ONNX file that failed its check, with any external data file beside it."""
    try:
        import onnx

        external = _external_files(onnx.load(str(path), load_external_data=False), path.parent)
    except Exception:
        external = set()
    for f in (path, *external):
        f.unlink(missing_ok=True)


# --------------------------------------------------------------------------- safetensors


def _metadata_strings(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """The user's metadata as the str -> str map safetensors stores (non-strings as JSON)."""
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"metadata key {key!r} is invalid; keys must be strings")
        if key in _RESERVED_METADATA:
            raise ConfigError(
                f"metadata key {key!r} is reserved by secateurs; reserved: "
                f"{', '.join(_RESERVED_METADATA)}"
            )
        if isinstance(value, str):
            out[key] = value
            continue
        try:
            out[key] = json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"metadata[{key!r}] = {value!r} is invalid; values must be strings or "
                "JSON-serialisable"
            ) from None
    return out


def untied_state(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies safetensors accepts: tensors sharing memory (tied weights) are
    cloned, since safetensors refuses to write two names over one storage."""
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        tensor = value.detach().contiguous().cpu()
        if tensor.untyped_storage().data_ptr() in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor
    return state


CHANNEL_PLAN_KEY = "secateurs_channel_plan"


def export_safetensors(
    model: nn.Module,
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    channel_plan: ChannelPlan | None = None,
) -> Path:
    """Write the model's plain ``state_dict`` (masks baked in) as safetensors; returns the path.

    ``model`` is not modified. The file loads strictly into a fresh model of the same class
    (:func:`load_safetensors`) and never needs unpickling. The header records
    ``secateurs_version``, ``model_class``, ``nonzero_weights`` and ``total_weights`` (over
    floating tensors of rank >= 2) beside ``metadata`` (values that are not strings are stored
    as JSON). Tied tensors are written once per name, as ``state_dict`` lists them.

    The channel plan of a model returned by :func:`secateurs.shrink` (or ``channel_plan``
    given here) is stored in the header, so :func:`load_safetensors` can load the smaller
    model into a fresh instance of the *original* class by replaying the channel removal
    first.
    """
    if channel_plan is None:
        shrunk = find_report(model, ShrinkReport)
        channel_plan = None if shrunk is None else shrunk.plan
    header = _metadata_strings(metadata)
    if channel_plan is not None:
        header[CHANNEL_PLAN_KEY] = channel_plan.to_json()
    baked = _baked_copy(model)
    state = untied_state(baked.state_dict())
    nonzero, total = _count_state(state)
    kind = type(model)
    header |= {
        "format": "pt",
        "secateurs_version": __version__,
        "model_class": f"{kind.__module__}.{kind.__qualname__}",
        "nonzero_weights": str(nonzero),
        "total_weights": str(total),
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata=header)
    return target


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{str(p)!r} does not exist or is not a file; pass a .safetensors file")
    return p


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (no tensor is read)."""
    p = _check_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(
            f"{str(p)!r} is not a readable safetensors file: {_first_line(exc)}"
        ) from None


def load_safetensors(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a file written by :func:`export_safetensors` strictly into ``model``; returns it.

    A file that carries a channel plan loads into a fresh instance of the original (unpruned)
    class: the plan's channels are removed from ``model`` first. Every key must match and every
    shape must fit, else :class:`ModelError` says what does not
    and nothing is loaded. The file is parsed by safetensors, so no code in it is executed.
    """
    p = _check_file(path)
    try:
        state = load_file(str(p))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(
            f"{str(p)!r} is not a readable safetensors file ({_first_line(exc)}); it may be "
            "truncated, corrupt or in another format"
        ) from None
    own = model.state_dict()
    plan_text = read_safetensors_metadata(p).get(CHANNEL_PLAN_KEY)
    if plan_text is not None and any(k in state and own[k].shape != state[k].shape for k in own):
        # a shrunk model: replay the surgery on this fresh instance of the original class
        apply_plan_(model, ChannelPlan.from_json(plan_text))
        own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected {_few(unexpected)}")
        if wrong:
            k = wrong[0]
            problems.append(
                f"{len(wrong)} shape mismatch(es), e.g. {k!r}: file {tuple(state[k].shape)}, "
                f"model {tuple(own[k].shape)}"
            )
        hint = (
            "; the model is masked: call secateurs.make_permanent_(model) first or load into a "
            "fresh model"
            if any(".parametrizations." in k or k.startswith("parametrizations.") for k in own)
            else ""
        )
        raise ModelError(
            f"{str(p)!r} does not fit {type(model).__name__}: {'; '.join(problems)}{hint}"
        )
    model.load_state_dict(state, strict=True)
    return model


def _few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} key(s): {shown}{more}"


# --------------------------------------------------------------------------- Hugging Face


def export_huggingface(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a ``transformers`` model as a directory ``from_pretrained`` loads back with no
    secateurs import: ``config.json`` and safetensors weights, masks baked in (pruned weights
    are zeros), and the tokenizer's files when ``tokenizer`` is given. ``model`` is not
    modified. Returns the directory."""
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise ModelError(
            f"{type(model).__name__} is not a transformers model (no save_pretrained); use "
            "export_safetensors"
        )
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    baked = _baked_copy(model)
    baked.save_pretrained(str(target), safe_serialization=True)  # type: ignore[operator]
    if tokenizer is not None and callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(str(target))
    return target


# --------------------------------------------------------------------------- packed N:M


NM_FORMAT = "secateurs-packed-nm/1"


def export_packed_nm(model: nn.Module, path: str | Path, n: int = 2, m: int = 4) -> int:
    """Write every weight whose blocks of ``m`` inputs hold at most ``n`` nonzeros in the packed
    ``n:m`` layout (the ``n`` values of each block, and their positions in ``ceil(log2 m)``
    bits each, as sparse tensor cores read them); other tensors as they are. Returns the file's
    size in bytes; :func:`load_packed_nm` reads it back."""
    baked = _baked_copy(model)
    tensors: dict[str, Tensor] = {}
    packed: list[str] = []
    bits = max(1, math.ceil(math.log2(m)))
    for name, t in untied_state(baked.state_dict()).items():
        blocks_ok = (
            t.is_floating_point()
            and t.dim() >= 2
            and t.shape[1] % m == 0
            and bool((t.movedim(1, -1).reshape(-1, m) != 0).sum(-1).max() <= n)
        )
        if not blocks_ok:
            tensors[name] = t
            continue
        nm = to_packed_nm(t, n, m)
        tensors[f"{name}.values"] = nm.values.contiguous()
        tensors[f"{name}.positions"] = _pack_bits(nm.positions.reshape(-1), bits)
        tensors[f"{name}.shape"] = torch.tensor(t.shape, dtype=torch.int64)
        packed.append(name)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": NM_FORMAT, "n": str(n), "m": str(m), "packed": json.dumps(packed)}
    save_file(tensors, str(target), metadata=header)
    return target.stat().st_size


def load_packed_nm(path: str | Path) -> dict[str, Tensor]:
    """The dense state dict stored by :func:`export_packed_nm`."""
    p = _check_file(path)
    header = read_safetensors_metadata(p)
    if header.get("format") != NM_FORMAT:
        raise ModelError(f"{str(p)!r} is not a packed N:M file ({NM_FORMAT})")
    n, m = int(header["n"]), int(header["m"])
    bits = max(1, math.ceil(math.log2(m)))
    raw = load_file(str(p))
    out: dict[str, Tensor] = {}
    for name in json.loads(header["packed"]):
        values = raw.pop(f"{name}.values")
        shape = tuple(int(v) for v in raw.pop(f"{name}.shape").tolist())
        positions = _unpack_bits(raw.pop(f"{name}.positions"), bits, values.numel())
        nm = PackedNM(shape, values, positions.reshape(values.shape), n, m)
        out[name] = nm.to_dense()
    out.update(raw)
    return out


def _pack_bits(values: Tensor, bits: int) -> Tensor:
    """Small non-negative integers (< 2**bits) packed ``8 // bits`` to a byte."""
    per = 8 // bits
    pad = (-values.numel()) % per
    v = torch.cat([values.to(torch.int64), values.new_zeros(pad, dtype=torch.int64)])
    v = v.reshape(-1, per) << (torch.arange(per, dtype=torch.int64) * bits)
    return v.sum(1).to(torch.uint8)


def _unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    v = (packed.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(-1)[:count].to(torch.uint8)
