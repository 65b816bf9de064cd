"""Fine-grained pruning on Fashion-MNIST: secateurs against torch.nn.utils.prune.

For LeNet-300-100 and LeNet-5, train the dense model once per seed (cached), then at each
sparsity run, from the same dense weights and with the same fine-tuning epoch budget:

* ``torch.prune one-shot``: ``torch.nn.utils.prune.global_unstructured`` (L1, global), then
  fine-tuning at a tenth of the training learning rate (the usual recipe);
* ``secateurs one-shot``: the same plan through secateurs (a sanity check: it should match);
* ``secateurs gradual``: Zhu & Gupta's cubic schedule over the first 2/3 of the budget, LAMP
  allocation, at the training learning rate with cosine decay (secateurs' best schedule here);
* ``defaults``: the README's 30-second loop as a user writes it: ``sc.Pruner(model,
  sparsity=s, schedule=sc.Gradual(start=0, end=5000, every=100))`` with every other option
  left to its default, inside a plain SGD loop (momentum 0.9) at the training learning rate;
  ``defaults, lr/10`` is the same loop at a tenth of it (what fine-tuning usually uses), and
  ``defaults + lamp`` the same loop with ``allocation="lamp"``: the evidence for the defaults.

Prints a table and writes JSON. Everything runs on the CPU, one thread per process.

    python benchmarks/bench_finegrained.py --models lenet-300-100 lenet-5 --epochs 15
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.utils.prune as tprune
from safetensors.torch import load_file, save_file
from torch import nn

import secateurs as sc
from secateurs.data import load_fashion_mnist
from secateurs.metrics import evaluate
from secateurs.train import TrainConfig, train
from secateurs.zoo import build_model

RESULTS = Path(__file__).parent / "results"
TRAIN_LR = 0.05


def dense_model(name: str, seed: int, epochs: int, loaders: Any) -> nn.Module:
    """Train (or load the cached) dense model for ``name`` and ``seed``."""
    cache = RESULTS / "cache" / f"{name.replace(':', '-')}-seed{seed}-e{epochs}.safetensors"
    model = build_model(name, seed=seed, in_channels=1)  # Fashion-MNIST's one channel
    if cache.is_file():
        model.load_state_dict(load_file(str(cache)))
        return model
    train(model, loaders[0], TrainConfig(epochs=epochs, lr=TRAIN_LR, seed=seed))
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
    return model


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine a result was measured on: the same command gives other numbers on another
    CPU (trained accuracies move by tenths of a point a seed, timings by more), so results from
    different machines are compared only side by side with a rerun of the baseline."""
    return {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
    }


def write_results(out: Path, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The JSON every benchmark here writes: its arguments, its rows, the versions and the
    machine."""
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": vars(args),
        "rows": rows,
        "versions": {"torch": torch.__version__, "secateurs": sc.__version__},
        "machine": machine(),
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def sparsity_of(model: nn.Module) -> float:
    pairs = prunable(model)
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in pairs)
    return zeros / sum(getattr(m, n).numel() for m, n in pairs)


def run_torch_prune(model: nn.Module, s: float, epochs: int, loaders: Any, seed: int) -> nn.Module:
    tprune.global_unstructured(prunable(model), pruning_method=tprune.L1Unstructured, amount=s)
    train(model, loaders[0], TrainConfig(epochs=epochs, lr=TRAIN_LR / 10, seed=seed))
    for m, n in prunable(model):
        tprune.remove(m, n)
    return model


def run_secateurs_oneshot(
    model: nn.Module, s: float, epochs: int, loaders: Any, seed: int
) -> nn.Module:
    sc.prune_(model, sparsity=s, allocation="global")
    train(model, loaders[0], TrainConfig(epochs=epochs, lr=TRAIN_LR / 10, seed=seed))
    return sc.make_permanent_(model)


def run_secateurs_gradual(
    model: nn.Module, s: float, epochs: int, loaders: Any, seed: int
) -> nn.Module:
    steps = len(loaders[0])
    end = max(1, round(epochs * 2 / 3)) * steps
    schedule = sc.Gradual(start=0, end=end, every=max(1, steps // 4))
    pruner = sc.Pruner(model, sparsity=s, allocation="lamp", schedule=schedule, seed=seed)
    pruner.step()
    train(
        model,
        loaders[0],
        TrainConfig(epochs=epochs, lr=TRAIN_LR, seed=seed),
        on_step=lambda _: pruner.step(),
    )
    return sc.make_permanent_(model)


def readme_loop(
    model: nn.Module, s: float, epochs: int, loaders: Any, seed: int, lr: float, **options: Any
) -> nn.Module:
    """The README's loop: a plain SGD loop with ``pruner.step()`` after each optimizer step."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pruner = sc.Pruner(
        model, sparsity=s, schedule=sc.Gradual(start=0, end=5000, every=100), **options
    )
    for _ in range(epochs):
        for inputs, labels in loaders[0]:
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pruner.step()
    return sc.make_permanent_(model)


METHODS = {
    "torch.prune one-shot": run_torch_prune,
    "secateurs one-shot": run_secateurs_oneshot,
    "secateurs gradual": run_secateurs_gradual,
    "defaults": lambda m, s, e, ld, seed: readme_loop(m, s, e, ld, seed, TRAIN_LR),
    "defaults, lr/10": lambda m, s, e, ld, seed: readme_loop(m, s, e, ld, seed, TRAIN_LR / 10),
    "defaults + lamp": lambda m, s, e, ld, seed: readme_loop(
        m, s, e, ld, seed, TRAIN_LR, allocation="lamp"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet-5"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epoch budget")
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_fashion_mnist()
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        loaders = bundle.loaders(128, seed=seed)
        for name in args.models:
            dense = dense_model(name, seed, args.dense_epochs, loaders)
            dense_acc = evaluate(dense, loaders[1]).accuracy
            print(f"{name} seed {seed}: dense {dense_acc:.2%}", flush=True)
            for s in args.sparsities:
                for method in args.methods:
                    model = copy.deepcopy(dense)
                    t0 = time.perf_counter()
                    model = METHODS[method](model, s, args.epochs, loaders, seed)
                    seconds = time.perf_counter() - t0
                    acc = evaluate(model, loaders[1]).accuracy
                    row = {
                        "model": name,
                        "seed": seed,
                        "sparsity": s,
                        "method": method,
                        "epochs": args.epochs,
                        "accuracy": acc,
                        "dense_accuracy": dense_acc,
                        "measured_sparsity": sparsity_of(model),
                        "seconds": seconds,
                    }
                    rows.append(row)
                    print(
                        f"  {s:.2f} {method:<22} {acc:.2%} (sparsity {row['measured_sparsity']:.4f}, {seconds:.0f} s)",
                        flush=True,
                    )
    print()
    header = f"{'model':<15}{'sparsity':>9}" + "".join(f"{m:>24}" for m in args.methods)
    print(header)
    for name in args.models:
        for s in args.sparsities:
            cells = []
            for m in args.methods:
                accs = [
                    r["accuracy"]
                    for r in rows
                    if r["model"] == name and r["sparsity"] == s and r["method"] == m
                ]
                cells.append(f"{sum(accs) / len(accs):>23.2%} ")
            print(f"{name:<15}{s:>9.2f}" + "".join(cells))
    out = Path(args.out) if args.out else RESULTS / f"finegrained_e{args.epochs}.json"
    write_results(out, args, rows)


if __name__ == "__main__":
    main()
