"""What a pruned model's savings are, for real: a file on disk, loaded back, and the latency
of the kernels that are faster on this machine.

Counting nonzeros says what pruning could buy; a user holds only what is realised. After a run,
:func:`realise` writes the pruned model as a ``.sct`` file (sparse positions, Huffman-coded;
lossless unless the recipe asked for weight sharing), loads it into a fresh model and measures
its accuracy *from the file*, and times the dense model against the pruned one in interleaved
rounds: with its channels removed when the run shrank it, else with sparse kernels swapped in
wherever :func:`~secateurs.compress.sparsify_` measured them faster here; and, when the run
exports ONNX, both models again as ONNX files in onnxruntime, where most CPU deployments run
them. A saving that does not materialise is said in one line, with the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from secateurs.compress import (
    CompressConfig,
    SparsifyReport,
    load_compressed,
    save_compressed,
    sparsify_,
)
from secateurs.export import OnnxRuntimeModule, onnxruntime_module
from secateurs.metrics import LatencyResult, compare_latency, evaluate
from secateurs.provenance import report_of

FILE = "model.sct"


def realise(
    model: nn.Module,
    dense: nn.Module,
    example: Tensor,
    test_data: Iterable[Any],
    fresh: Callable[[], nn.Module],
    out_dir: Path,
    *,
    dense_file_bytes: int,
    dense_accuracy: float,
    written: Mapping[str, Any] | None = None,
    shrunk: bool = False,
    latency: bool = True,
    onnx: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The savings ``model`` (pruned, masks baked in) realises against ``dense``.

    ``fresh()`` builds an empty model of the pruned architecture (the file is loaded into
    it); ``written`` is the ``.sct`` file the recipe's export already wrote (its accuracy
    measured from the file), else one is written losslessly. ``onnx`` is the ONNX file the recipe's
    export wrote (its ``path``): it is timed in onnxruntime against the dense model exported
    here (``"latency_onnxruntime"``; masked zeros run as dense weights there). Returns ``{"file": ..., "latency": ..., "why_not": [...]}`` for the report.
    """
    why_not: list[str] = []
    if written is not None:
        file = {
            "name": Path(written["path"]).name,
            "path": written["path"],
            "file_bytes": written["file_bytes"],
            "accuracy": written.get("accuracy"),
        }
    else:
        path = out_dir / FILE
        info = save_compressed(model, path, CompressConfig(quantization="none"))
        loaded = load_compressed(path, fresh())
        file = {
            "name": FILE,
            "path": str(path),
            "file_bytes": info.file_bytes,
            "accuracy": evaluate(loaded, test_data).accuracy,
        }
    file |= {"dense_file_bytes": dense_file_bytes, "dense_accuracy": dense_accuracy}
    if file["file_bytes"] >= 0.95 * dense_file_bytes:
        why_not.append(
            f"file: {FILE} is not smaller than the dense file: too few weights are zero for "
            "sparse storage to pay for its positions"
        )
    out: dict[str, Any] = {"file": file, "why_not": why_not}
    if not latency:
        return out
    x = example[:1]
    candidates: dict[str, nn.Module] = {"dense": dense, "pruned": model}
    how = "channels removed" if shrunk else "dense kernels"
    replaced: list[str] = []
    if not shrunk:
        fast = sparsify_(copy.deepcopy(model).eval(), x)
        replaced = report_of(fast, SparsifyReport).replaced
        if replaced:
            candidates["pruned"] = fast
            how = f"sparse kernels in {len(replaced)} layer(s)"
    times = compare_latency(candidates, x)
    d, p = times["dense"], times["pruned"]
    out["latency"] = _latency_entry(x, how, d, p) | {"replaced": replaced}
    if onnx is not None:
        exported = {
            "dense": onnxruntime_module(dense, x),
            "pruned": OnnxRuntimeModule(onnx["path"]),
        }
        t = compare_latency(exported, x)
        out["latency_onnxruntime"] = _latency_entry(x, "onnxruntime", t["dense"], t["pruned"])
        if t["pruned"].median_ms > 0.95 * t["dense"].median_ms:
            why_not.append(
                f"latency in onnxruntime: the pruned model did not run measurably faster "
                f"(median {t['pruned'].median_ms:.3f} ms against {t['dense'].median_ms:.3f} ms)"
                + ("" if shrunk else "; masked zeros run as dense weights there")
            )
    if not shrunk and not replaced:
        why_not.append(
            "latency: no layer ran faster with sparse kernels (CSR, block-sparse) than dense on "
            "this machine at batch 1, so masked zeros cost what they did; remove channels "
            "(a shrink section) or prune further for a speedup"
        )
    elif p.median_ms > 0.95 * d.median_ms:
        why_not.append(
            f"latency: {how} did not run measurably faster here (median {p.median_ms:.3f} ms "
            f"against {d.median_ms:.3f} ms)"
        )
    return out


def _latency_entry(x: Tensor, how: str, d: LatencyResult, p: LatencyResult) -> dict[str, Any]:
    """The report's latency entry: medians over interleaved rounds and their spread."""
    return {
        "batch": int(x.shape[0]),
        "how": how,
        "dense_ms": d.median_ms,
        "dense_p10_ms": d.p10_ms,
        "dense_p90_ms": d.p90_ms,
        "pruned_ms": p.median_ms,
        "pruned_p10_ms": p.p10_ms,
        "pruned_p90_ms": p.p90_ms,
        "threads": p.threads,
    }
