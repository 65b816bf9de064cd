"""Run a recipe on a pretrained causal language model: one-shot pruning, perplexity, files.

What people prune today is a pretrained transformer, once, with a little calibration text.
A recipe whose ``model.name`` is a registered language model (``smollm2-135m``, or
``tiny-llama`` for dry runs) runs here instead of the image pipeline:

1. load the model and its tokenizer; cut the text data set (``english-text``: Debian's Python
   documentation, calibration and evaluation from disjoint parts) into non-overlapping token
   windows;
2. score the dense model's perplexity on the evaluation windows;
3. prune one-shot with the recipe's ``prune`` section on the calibration windows (the
   layer-wise criteria run block by block; magnitude and the rest run as on any model);
4. score the pruned model's perplexity, write ``hf/`` (a directory ``from_pretrained`` loads
   with no secateurs import, scored again from the files), ``model.sct`` when the export asks
   for it and, for N:M sparsity, ``model.nm.safetensors`` (the packed layout);
5. write the report (perplexities, sizes, each layer's sparsity and reconstruction error).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.compress import save_compressed
from secateurs.errors import ConfigError, ModelError
from secateurs.export import export_huggingface, export_packed_nm
from secateurs.lm import (
    LANGUAGE_MODELS,
    english_text,
    load_language_model,
    max_positions,
    perplexity,
    token_windows,
)
from secateurs.masks import make_permanent_
from secateurs.metrics import file_bytes, profile
from secateurs.oneshot import OneShotReport, peak_rss_mb
from secateurs.provenance import find_report
from secateurs.pruner import Pruner
from secateurs.recipe import Recipe
from secateurs.report import RunReport, write_report
from secateurs.runs import Progress, RunResult, versions
from secateurs.schedules import OneShot
from secateurs.structures import NM

TEXT_DATASETS = ("english-text",)


def is_language_model(recipe: Recipe) -> bool:
    """True when the recipe's model is a registered causal language model."""
    return recipe.model.name in LANGUAGE_MODELS


def _check(recipe: Recipe) -> None:
    if recipe.data.name not in TEXT_DATASETS:
        raise ConfigError(
            f"recipe key 'data.name' has value {recipe.data.name!r}; a language model is "
            f"calibrated and scored on text: use one of {', '.join(TEXT_DATASETS)}"
        )
    if recipe.finetune.epochs:
        raise ConfigError(
            "recipe key 'finetune.epochs' must be 0 for a language model: its run prunes "
            "one-shot from calibration text (no fine-tuning loop for LLMs here)"
        )
    schedule = recipe.prune.schedule
    name = schedule.get("name") if isinstance(schedule, Mapping) else schedule
    if name not in (None, "oneshot") and not isinstance(name, OneShot):
        raise ConfigError(
            f"recipe key 'prune.schedule' has value {schedule!r}; a language model is pruned "
            "one-shot (oneshot)"
        )
    if recipe.shrink.budget is not None:
        raise ConfigError(
            "a shrink section on a language model is not run by recipes yet; call sc.shrink "
            "on the model from Python"
        )


def _windows(recipe: Recipe, tokenizer: Any, model: nn.Module) -> tuple[Tensor, Tensor]:
    d = recipe.data
    limit = max_positions(model)
    if limit is not None and d.window > limit:
        raise ConfigError(
            f"recipe key 'data.window' has value {d.window}; the model has {limit} positions: "
            f"use a window of at most {limit} tokens"
        )
    calib = token_windows(
        tokenizer, english_text("calibration", d.root), d.window, d.calibration_windows
    )
    evals = token_windows(
        tokenizer, english_text("evaluation", d.root), d.window, d.evaluation_windows
    )
    return calib, evals


def _measure(model: nn.Module, windows: Tensor, batch: int, path: Path | None) -> dict[str, Any]:
    ppl = perplexity(model, windows, batch_size=batch)
    totals = profile(model).totals
    return {
        "perplexity": ppl.perplexity,
        "nll": ppl.nll,
        "tokens": ppl.tokens,
        "eval_seconds": ppl.seconds,
        "params": totals["params"],
        "nonzeros": totals["nonzeros"],
        "bytes_dense": totals["bytes_dense"],
        "bytes_csr": totals["bytes_csr"],
        "file_bytes": file_bytes(path) if path is not None else None,
    }


def run_language_model(recipe: Recipe, progress: Progress | None = None) -> RunResult:
    """Execute a language-model recipe (see the module docstring)."""
    progress = progress or Progress()
    _check(recipe)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    progress.message(f"loading {recipe.model.name}")
    model, tokenizer = load_language_model(recipe.model.name)
    calib, evals = _windows(recipe, tokenizer, model)
    batch = recipe.data.batch_size
    config = recipe.prune.config(1, recipe.seed)

    def on_block(done: int, total: int, text: str) -> None:
        progress.advance(done, total)
        progress.message(text)

    pruner = Pruner(model, config=config, data=list(calib.split(batch)), progress=on_block)
    out_dir = recipe.out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    progress.message(f"dense perplexity on {evals.shape[0]} windows of {evals.shape[1]} tokens")
    dense = _measure(model, evals, batch, None)
    progress.message(f"dense perplexity {dense['perplexity']:.2f}")
    progress.phase(f"pruning {len(pruner.targets)} layers block by block", 1)
    t_prune = time.perf_counter()
    pruner.prune_to_final()
    prune_seconds = time.perf_counter() - t_prune
    oneshot = find_report(model, OneShotReport)
    make_permanent_(model)
    files: dict[str, Path] = {}
    hf_dir = export_huggingface(model, out_dir / "hf", tokenizer)
    files["huggingface"] = hf_dir
    weights = next(iter(sorted(hf_dir.glob("*.safetensors"))), None)
    pruned = _measure(model, evals, batch, weights)
    progress.message(f"pruned perplexity {pruned['perplexity']:.2f}")
    exported = _export(recipe, model, out_dir, files)
    reloaded = _reload_perplexity(hf_dir, evals, batch)
    report = RunReport(
        title=recipe.name,
        model=recipe.model.name,
        dataset=recipe.data.name,
        config={"recipe": recipe.to_dict(), "plan": pruner.plan()},
        versions=versions(),
        dense=dense,
        pruned=pruned,
        layers=[
            {
                "name": layer.name,
                "kind": "Linear",
                "density": 1.0 - layer.sparsity,
                "reconstruction_error": layer.error,
                "seconds": layer.seconds,
            }
            for layer in (oneshot.layers if oneshot else [])
        ],
        extra={
            "perplexity_from_hf_directory": reloaded,
            "oneshot": oneshot.to_dict() if oneshot else None,
            "export": exported,
            "calibration": {"windows": int(calib.shape[0]), "window": int(calib.shape[1])},
            "peak_rss_mb": peak_rss_mb(),
            "seconds": {
                "prune": prune_seconds,
                "total": time.perf_counter() - t_start,
            },
            "weights": "SmolLM2's weights were 4-bit (Q4_1) in the GGUF file, dequantized "
            "to float32 before pruning"
            if recipe.model.name == "smollm2-135m"
            else "random initialisation",
        },
    )
    if recipe.output.report:
        files.update(write_report(report, out_dir))
    return RunResult(report=report, model=model, out_dir=out_dir, files=files)


def _export(
    recipe: Recipe, model: nn.Module, out_dir: Path, files: dict[str, Path]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    structure = recipe.prune.config(1, recipe.seed).structure_
    if isinstance(structure, NM):
        path = out_dir / "model.nm.safetensors"
        out["packed_nm"] = {
            "path": str(path),
            "file_bytes": export_packed_nm(model, path, structure.n, structure.m),
        }
        files["packed_nm"] = path
    if recipe.export.compressed:
        path = out_dir / "model.sct"
        info = save_compressed(model, path, recipe.export.compress_config())
        out["compressed"] = {"path": str(path), "file_bytes": info.file_bytes}
        files["compressed"] = path
    if recipe.export.onnx:
        raise ModelError("ONNX export of a language model is not supported by recipes yet")
    return out


def _reload_perplexity(directory: Path, windows: Tensor, batch: int) -> float:
    """The perplexity of the model as ``transformers`` loads it back from ``directory``."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return perplexity(reloaded, windows, batch_size=batch).perplexity
