"""Structural pruning: secateurs' ``shrink`` against Torch-Pruning at the same MACs budget.

Two parts, both on this machine's CPU:

* ``accuracy``: the zoo's VGG-BN on Fashion-MNIST, trained dense (cached per seed), then for
  each seed and method: remove channels down to the same MACs budget (50% by default) and
  fine-tune 2 epochs at a tenth of the training rate. Torch-Pruning's ``pruning_ratio`` is
  bisected so its model lands on the same budget. MACs are counted for both results with one
  counter (``secateurs.metrics.profile``).
* ``speed``: torchvision ResNet-18/50, MobileNetV2, ViT-B/16 and the VGG-BN with random
  weights: time to build the graph and to prune, MACs and parameters after, and measured
  latency of the dense and the pruned model at batch 1 and 64 (ViT-B/16: 8), with the ratio
  of measured speedup to MACs reduction (the physical limit is 1.0).

    python benchmarks/bench_shrink.py                  # both parts, 3 seeds
    python benchmarks/bench_shrink.py --part speed --models resnet50
    python benchmarks/bench_shrink.py --quick          # a smoke test of a minute
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
import torchvision
from torch import nn

import secateurs as sc
from bench_finegrained import RESULTS, dense_model, write_results
from secateurs.data import load_fashion_mnist
from secateurs.graph import build_graph
from secateurs.metrics import evaluate, measure_latency, profile
from secateurs.train import TrainConfig, train
from secateurs.zoo import build_model

TRAIN_LR = 0.05


def macs_of(model: nn.Module, example: torch.Tensor) -> int:
    return int(profile(model, example).totals["macs"])


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def classifier_of(model: nn.Module) -> list[nn.Module]:
    """The last Linear layer (its outputs are the classes: never pruned)."""
    return [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]


# --------------------------------------------------------------------------- methods


def secateurs_method(criterion: Any, allocation: str) -> Callable[..., tuple[nn.Module, float]]:
    def run(
        model: nn.Module, example: torch.Tensor, keep: float, **_: Any
    ) -> tuple[nn.Module, float]:
        t0 = time.perf_counter()
        small = sc.shrink(
            model, example, budget=sc.MACs(keep), criterion=criterion, allocation=allocation
        )
        return small, time.perf_counter() - t0

    return run


def _tp_prune(
    model: nn.Module, example: torch.Tensor, importance: Any, ratio: float, global_pruning: bool
) -> nn.Module:
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=classifier_of(model),
    )
    pruner.step()
    return model


def torch_pruning_method(
    make_importance: Callable[[], Any], global_pruning: bool = False
) -> Callable[..., tuple[nn.Module, float]]:
    """Torch-Pruning with its ``pruning_ratio`` bisected to reach the MACs budget."""

    def run(
        model: nn.Module, example: torch.Tensor, keep: float, **_: Any
    ) -> tuple[nn.Module, float]:
        dense = macs_of(model, example)
        lo, hi = 0.0, 0.95
        for _ in range(12):
            mid = (lo + hi) / 2
            trial = _tp_prune(copy.deepcopy(model), example, make_importance(), mid, global_pruning)
            if macs_of(trial, example) <= keep * dense:
                hi = mid
            else:
                lo = mid
        t0 = time.perf_counter()
        small = _tp_prune(copy.deepcopy(model), example, make_importance(), hi, global_pruning)
        return small, time.perf_counter() - t0

    return run


METHODS: dict[str, Callable[..., tuple[nn.Module, float]]] = {
    "secateurs L2 uniform": secateurs_method({"name": "magnitude", "p": 2}, "uniform"),
    "secateurs L2 global": secateurs_method({"name": "magnitude", "p": 2}, "global"),
    "secateurs BN scale uniform": secateurs_method("bn_scale", "uniform"),
    "Torch-Pruning L2": torch_pruning_method(lambda: tp.importance.GroupMagnitudeImportance(p=2)),
    "Torch-Pruning BN scale": torch_pruning_method(lambda: tp.importance.BNScaleImportance()),
}


# --------------------------------------------------------------------------- accuracy part


def accuracy_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    bundle = load_fashion_mnist()
    if args.quick:
        bundle = bundle.subset(2048, 1024)
    elif args.train_limit:
        bundle = bundle.subset(args.train_limit, len(bundle.test))
    example = torch.zeros(1, 1, 28, 28)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        loaders = bundle.loaders(128, seed=seed)
        dense = (
            _quick_dense(args.model, seed, loaders, 1 if args.quick else args.dense_epochs)
            if args.quick or args.train_limit
            else dense_model(args.model, seed, args.dense_epochs, loaders)
        )
        dense.eval()
        dense_acc = evaluate(dense, loaders[1]).accuracy
        dense_macs = macs_of(dense, example)
        print(f"{args.model} seed {seed}: dense {dense_acc:.2%}, {dense_macs:,} MACs", flush=True)
        for name in args.methods:
            small, seconds = METHODS[name](copy.deepcopy(dense), example, args.keep)
            before = evaluate(small, loaders[1]).accuracy
            train(small, loaders[0], TrainConfig(epochs=args.epochs, lr=TRAIN_LR / 10, seed=seed))
            after = evaluate(small, loaders[1]).accuracy
            row = {
                "part": "accuracy",
                "model": args.model,
                "seed": seed,
                "method": name,
                "dense_accuracy": dense_acc,
                "accuracy_before_finetune": before,
                "accuracy": after,
                "dense_macs": dense_macs,
                "macs": macs_of(small, example),
                "dense_params": params_of(dense),
                "params": params_of(small),
                "prune_seconds": seconds,
                "finetune_epochs": args.epochs,
            }
            rows.append(row)
            print(
                f"  {name:<28} {before:.2%} -> {after:.2%}  MACs {row['macs'] / dense_macs:.3f}  "
                f"params {row['params'] / row['dense_params']:.3f}  prune {seconds:.2f} s",
                flush=True,
            )
    return rows


def _quick_dense(name: str, seed: int, loaders: Any, epochs: int) -> nn.Module:
    """A dense model trained on a subset (not cached: the cache holds full-data models)."""
    model = build_model(name, seed=seed)
    train(model, loaders[0], TrainConfig(epochs=epochs, lr=TRAIN_LR, seed=seed))
    return model


# --------------------------------------------------------------------------- speed part

SPEED_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (builder, input shape without batch, large batch)
    "vgg-bn": (lambda: build_model("vgg-bn"), (1, 28, 28), 64),
    "resnet18": (lambda: torchvision.models.resnet18(), (3, 224, 224), 64),
    "resnet50": (lambda: torchvision.models.resnet50(), (3, 224, 224), 64),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (3, 224, 224), 64),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(), (3, 224, 224), 8),
}


def _latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    return measure_latency(model, x, warmup=2, repeats=repeats).median_ms


def speed_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in args.models:
        build, shape, big = SPEED_MODELS[name]
        torch.manual_seed(0)
        model = build().eval()
        x1 = torch.randn(1, *shape)
        dense_macs = macs_of(model, x1)
        t0 = time.perf_counter()
        graph = build_graph(model, x1)
        graph_s = time.perf_counter() - t0
        keep = args.keep
        try:
            small = sc.shrink(model, x1, budget=sc.MACs(keep))
        except sc.BudgetError as exc:
            print(f"{name}: {exc}", flush=True)
            keep = 0.8
            small = sc.shrink(model, x1, budget=sc.MACs(keep))
        report = sc.report_of(small, sc.ShrinkReport)
        t_tp = None
        tp_graph_s = None
        tp_macs = None
        try:
            t0 = time.perf_counter()
            pruner = tp.pruner.MetaPruner(
                copy.deepcopy(model), x1, importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=0.3, ignored_layers=classifier_of(model),
            )  # fmt: skip
            tp_graph_s = time.perf_counter() - t0
            pruner.step()
            t_tp = time.perf_counter() - t0
            tp_macs = macs_of(pruner.model, x1)
        except Exception as exc:  # a peer failing on a model is a result, not a crash
            print(f"{name}: Torch-Pruning failed: {type(exc).__name__}: {exc}", flush=True)
        small_macs = macs_of(small, x1)
        lat: dict[str, list[float]] = {
            "dense_1": [],
            "small_1": [],
            "dense_big": [],
            "small_big": [],
        }
        xb = torch.randn(big, *shape)
        for _ in range(args.rounds):  # interleaved rounds: both see the same machine load
            lat["dense_1"].append(_latency(model, x1, args.repeats))
            lat["small_1"].append(_latency(small, x1, args.repeats))
            lat["dense_big"].append(_latency(model, xb, max(3, args.repeats // 4)))
            lat["small_big"].append(_latency(small, xb, max(3, args.repeats // 4)))
        med = {k: statistics.median(v) for k, v in lat.items()}
        reduction = dense_macs / small_macs
        row = {
            "part": "speed",
            "model": name,
            "input": list(shape),
            "large_batch": big,
            "keep": keep,
            "dense_macs": dense_macs,
            "macs": small_macs,
            "dense_params": params_of(model),
            "params": params_of(small),
            "graph_seconds": graph_s,
            "groups": len(graph.prunable_groups),
            "shrink_seconds": report.seconds,
            "torch_pruning_graph_seconds": tp_graph_s,
            "torch_pruning_seconds": t_tp,
            "torch_pruning_macs_at_ratio_0.3": tp_macs,
            "latency_ms": med,
            "speedup_batch1": med["dense_1"] / med["small_1"],
            "speedup_large_batch": med["dense_big"] / med["small_big"],
            "macs_reduction": reduction,
            "limit_fraction_batch1": med["dense_1"] / med["small_1"] / reduction,
            "limit_fraction_large_batch": med["dense_big"] / med["small_big"] / reduction,
        }
        rows.append(row)
        print(
            f"{name:<13} MACs x{reduction:.2f}  graph {graph_s:.2f} s  shrink {report.seconds:.2f} s  "
            f"(TP graph+prune {t_tp if t_tp is None else round(t_tp, 2)} s)  "
            f"batch 1 x{row['speedup_batch1']:.2f}  batch {big} x{row['speedup_large_batch']:.2f} "
            f"({row['limit_fraction_large_batch']:.2f} of the limit)",
            flush=True,
        )
    return rows


def summarise(rows: list[dict[str, Any]]) -> None:
    acc = [r for r in rows if r["part"] == "accuracy"]
    if acc:
        print(
            f"\n{'method':<28}{'acc (mean ± sd)':>18}{'before ft':>11}{'MACs':>8}{'params':>8}{'prune s':>9}"
        )
        for m in dict.fromkeys(r["method"] for r in acc):
            rs = [r for r in acc if r["method"] == m]
            a = [r["accuracy"] for r in rs]
            sd = statistics.stdev(a) if len(a) > 1 else 0.0
            print(
                f"{m:<28}{statistics.mean(a):>11.2%} ± {sd:.2%}"
                f"{statistics.mean(r['accuracy_before_finetune'] for r in rs):>11.2%}"
                f"{statistics.mean(r['macs'] / r['dense_macs'] for r in rs):>8.3f}"
                f"{statistics.mean(r['params'] / r['dense_params'] for r in rs):>8.3f}"
                f"{statistics.mean(r['prune_seconds'] for r in rs):>9.2f}"
            )
        dense = [r["dense_accuracy"] for r in acc if r["method"] == acc[0]["method"]]
        print(f"{'dense':<28}{statistics.mean(dense):>11.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["accuracy", "speed", "both"], default="both")
    parser.add_argument("--model", default="vgg-bn", help="zoo model of the accuracy part")
    parser.add_argument(
        "--models", nargs="+", default=list(SPEED_MODELS), choices=list(SPEED_MODELS)
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of MACs to keep")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    parser.add_argument("--dense-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="1 seed, data subsets, 1 round")
    parser.add_argument(
        "--train-limit", type=int, default=None, help="train on the first N examples only"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.repeats = args.seeds[:1], 1, 3
        args.models = [m for m in args.models if m in ("vgg-bn", "resnet18")]
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    if args.part in ("accuracy", "both"):
        rows += accuracy_part(args)
    if args.part in ("speed", "both"):
        rows += speed_part(args)
    summarise(rows)
    args.machine = {
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "torch_pruning": tp.__version__,
    }
    out = (
        Path(args.out)
        if args.out
        else RESULTS / ("shrink_quick.json" if args.quick else f"shrink_{args.part}.json")
    )
    write_results(out, args, rows)


if __name__ == "__main__":
    main()
