"""Deep Compression's pipeline on Fashion-MNIST: prune -> share weights -> Huffman, on the real file.

For each model: train the dense model (cached, the same weights as bench_finegrained.py), prune
gradually (Zhu & Gupta, LAMP) while fine-tuning, share the kept weights by k-means (Deep
Compression's 8 bits for convolutions, 5 for fully connected layers unless told otherwise),
fine-tune the centroids, and write the compressed ``.sct`` file. Accuracy is measured on the model
*loaded back from that file*; the ratio is the dense float32 ``state_dict`` as a safetensors file
against the ``.sct`` file on disk. A per-layer table follows the paper's (Han et al. 2016, Table 2-3).

    python benchmarks/bench_deep_compression.py --models lenet-300-100 lenet-5 lenet-5-caffe
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import secateurs as sc
from bench_finegrained import TRAIN_LR, dense_model, run_secateurs_gradual, write_results
from secateurs.data import load_fashion_mnist
from secateurs.metrics import evaluate
from secateurs.train import TrainConfig, train
from secateurs.zoo import build_model

RESULTS = Path(__file__).parent / "results"


def file_size_of_dense(model: torch.nn.Module) -> int:
    """Bytes of the dense float32 state dict as a safetensors file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dense.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path.stat().st_size


def run(name: str, args: argparse.Namespace, bundle: Any, seed: int) -> dict[str, Any]:
    dense = dense_model(name, seed, args.dense_epochs, bundle.loaders(128, seed=seed))
    # fresh loaders: the shuffling must not depend on whether the dense model came from cache
    loaders = bundle.loaders(128, seed=seed)
    dense_acc = evaluate(dense, loaders[1]).accuracy
    dense_file = file_size_of_dense(dense)
    sparsity = args.sparsity.get(name, 0.95)
    t0 = time.perf_counter()
    model = run_secateurs_gradual(copy.deepcopy(dense), sparsity, args.epochs, loaders, seed)
    prune_seconds = time.perf_counter() - t0
    pruned_acc = evaluate(model, loaders[1]).accuracy
    bits = {"conv": args.conv_bits, "fc": args.fc_bits}

    t0 = time.perf_counter()
    sc.share_weights_(model, bits=bits)
    shared_acc = evaluate(model, loaders[1]).accuracy
    if args.centroid_epochs:
        # no weight decay: it would pull each shared value toward zero, not a weight
        config = TrainConfig(
            epochs=args.centroid_epochs,
            lr=TRAIN_LR * args.centroid_lr_factor,
            weight_decay=0.0,
            seed=seed,
        )
        train(model, loaders[0], config)
    share_seconds = time.perf_counter() - t0

    out_dir = RESULTS / "cache"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-seed{seed}.sct"
    t0 = time.perf_counter()
    info = sc.save_compressed(model, path, {"bits": bits}, metadata={"model": name})
    save_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = sc.load_compressed(path, build_model(name, seed=seed + 1))
    load_seconds = time.perf_counter() - t0
    final_acc = evaluate(loaded, loaders[1]).accuracy
    d = info.to_dict()
    return {
        "model": name,
        "seed": seed,
        "sparsity": sparsity,
        "bits": bits,
        "dense_accuracy": dense_acc,
        "pruned_accuracy": pruned_acc,
        "shared_accuracy_before_centroid_tuning": shared_acc,
        "accuracy_from_file": final_acc,
        "accuracy_change_pt": (final_acc - dense_acc) * 100,
        "dense_file_bytes": dense_file,
        "file_bytes": info.file_bytes,
        "header_bytes": info.header_bytes,
        "ratio": dense_file / info.file_bytes,
        "params": d["params"],
        "nonzeros": d["nonzeros"],
        "seconds": {
            "prune_and_finetune": prune_seconds,
            "share_and_centroid_tuning": share_seconds,
            "save": save_seconds,
            "load": load_seconds,
        },
        "tensors": d["tensors"],
    }


def per_layer_table(row: dict[str, Any]) -> list[str]:
    """The paper's per-layer view: weights kept, bits per kept weight, index bits, ratio."""
    lines = [
        f"{'layer':<14}{'#weights':>10}{'weights%':>10}{'code bits':>11}{'index bits':>12}{'ratio':>9}",
    ]
    for t in row["tensors"]:
        if t["encoding"] == "raw":
            continue
        nnz = max(t["nonzeros"], 1)
        code_bits = 8 * t["sections"].get("codes", 0) / nnz
        index_bits = 8 * t["sections"].get("gaps", 0) / nnz
        numel = 1
        for s in t["shape"]:
            numel *= s
        lines.append(
            f"{t['name']:<14}{numel:>10,}{t['nonzeros'] / numel:>10.1%}{code_bits:>11.2f}"
            f"{index_bits:>12.2f}{t['ratio']:>8.1f}x"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["lenet-300-100", "lenet-5", "lenet-5-caffe"]
    )
    parser.add_argument(
        "--sparsity",
        nargs="+",
        default=["lenet-300-100=0.95", "lenet-5=0.92", "lenet-5-caffe=0.95"],
        help="MODEL=SPARSITY pairs (default 0.95)",
    )
    parser.add_argument("--epochs", type=int, default=15, help="pruning + fine-tuning epochs")
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--centroid-epochs", type=int, default=2)
    # a centroid's gradient is the sum over the thousands of weights sharing it, so its step is
    # that many times a weight's: a hundredth of the training rate (a tenth degraded accuracy)
    parser.add_argument("--centroid-lr-factor", type=float, default=0.01)
    parser.add_argument("--conv-bits", type=int, default=8)
    parser.add_argument("--fc-bits", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.sparsity = {k: float(v) for k, v in (item.split("=") for item in args.sparsity)}
    torch.set_num_threads(args.threads)
    bundle = load_fashion_mnist()
    rows = []
    for seed in args.seeds:
        for name in args.models:
            row = run(name, args, bundle, seed)
            rows.append(row)
            print(
                f"{name} seed {seed}: dense {row['dense_accuracy']:.2%} -> pruned "
                f"{row['pruned_accuracy']:.2%} -> shared {row['shared_accuracy_before_centroid_tuning']:.2%}"
                f" -> from file {row['accuracy_from_file']:.2%}; {row['dense_file_bytes']:,} B -> "
                f"{row['file_bytes']:,} B ({row['ratio']:.1f}x)",
                flush=True,
            )
            print("\n".join("  " + line for line in per_layer_table(row)), flush=True)
    print()
    print(
        f"{'model':<15}{'sparsity':>9}{'dense':>9}{'from file':>11}{'change':>9}"
        f"{'dense B':>11}{'file B':>9}{'ratio':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:<15}{r['sparsity']:>9.2f}{r['dense_accuracy']:>9.2%}"
            f"{r['accuracy_from_file']:>11.2%}{r['accuracy_change_pt']:>+8.2f}p"
            f"{r['dense_file_bytes']:>11,}{r['file_bytes']:>9,}{r['ratio']:>7.1f}x"
        )
    out = Path(args.out) if args.out else RESULTS / "deep_compression.json"
    write_results(out, args, rows)


if __name__ == "__main__":
    main()
