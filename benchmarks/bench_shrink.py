"""Structural pruning: secateurs' ``shrink`` against Torch-Pruning at the same MACs budget.

Three parts, all on this machine's CPU (``--part time``: ``shrink`` as a whole against one
Torch-Pruning pass on ResNet-50, interleaved rounds; see :func:`time_part`):

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
    python benchmarks/bench_shrink.py --part speed --round-to none 8 16 auto --explain
    python benchmarks/bench_shrink.py --part speed --runtime onnxruntime --fold-bn
    python benchmarks/bench_shrink.py --part speed --models mobilenet_v2 --round-to 16 \\
        --fold-bn --channels-last --include 'features\\.\\d+\\.conv\\.0\\.0'
    python benchmarks/bench_shrink.py --part accuracy --model torchvision:mobilenet_v2 \\
        --include 'features\\.\\d+\\.conv\\.0\\.0'    # any zoo or torchvision model
    python benchmarks/bench_shrink.py --quick          # a smoke test of a minute
"""

from __future__ import annotations

import argparse
import copy
import itertools
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch_pruning as tp
import torchvision
from torch import nn

import secateurs as sc
from bench_finegrained import RESULTS, dense_model, write_results
from secateurs.calibration import CALIBRATION_BATCHES  # the batches shrink reads by default
from secateurs.data import load_fashion_mnist
from secateurs.export import onnxruntime_module
from secateurs.graph import build_graph
from secateurs.metrics import evaluate, measure_latency, profile
from secateurs.train import Distillation, TrainConfig, train
from secateurs.zoo import build_model

TRAIN_LR = 0.05


def macs_of(model: nn.Module, example: torch.Tensor) -> int:
    return int(profile(model, example).totals["macs"] or 0)


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def classifier_of(model: nn.Module) -> list[nn.Module]:
    """The last Linear layer (its outputs are the classes: never pruned)."""
    return [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]


# --------------------------------------------------------------------------- methods


def secateurs_method(
    criterion: Any, allocation: str, with_data: bool = False
) -> Callable[..., tuple[nn.Module, float]]:
    """``shrink`` to the MACs budget; ``with_data``: given the calibration batches, so the cut
    is reconstructed (least-squares refit, shrink's default when data is given)."""

    def run(
        model: nn.Module,
        example: torch.Tensor,
        keep: float,
        data: Any = None,
        include: list[str] | None = None,
        round_to: Any = "auto",
        **_: Any,
    ) -> tuple[nn.Module, float]:
        t0 = time.perf_counter()
        small = sc.shrink(
            model,
            example,
            budget=sc.MACs(keep),
            criterion=criterion,
            allocation=allocation,
            include=include,
            round_to=round_to,
            data=data if with_data else None,
            loss_fn=nn.functional.cross_entropy if with_data else None,
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
        dense_macs = macs_of(model, example)
        lo, hi = 0.0, 0.95
        for _bisection in range(12):
            mid = (lo + hi) / 2
            trial = _tp_prune(copy.deepcopy(model), example, make_importance(), mid, global_pruning)
            if macs_of(trial, example) <= keep * dense_macs:
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
    "secateurs L2 uniform + reconstruct": secateurs_method(
        {"name": "magnitude", "p": 2}, "uniform", with_data=True
    ),
    "secateurs L2 global + reconstruct": secateurs_method(
        {"name": "magnitude", "p": 2}, "global", with_data=True
    ),
    "secateurs regression uniform": secateurs_method("regression", "uniform", with_data=True),
    "secateurs channel OBS uniform + reconstruct": secateurs_method(
        "channel_obs", "uniform", with_data=True
    ),
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
            calibration = list(itertools.islice(loaders[0], CALIBRATION_BATCHES))
            small, seconds = METHODS[name](
                copy.deepcopy(dense),
                example,
                args.keep,
                data=calibration,
                include=args.include,
                round_to=args.round_to[0],
            )
            before = evaluate(small, loaders[1]).accuracy
            finetune(small, dense, example, loaders[0], seed, args)
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
                "include": args.include if name.startswith("secateurs") else None,
                "round_to": args.round_to[0] if name.startswith("secateurs") else None,
                "distill_temperature": args.distill,
            }
            rows.append(row)
            print(
                f"  {name:<28} {before:.2%} -> {after:.2%}  MACs {row['macs'] / dense_macs:.3f}  "
                f"params {row['params'] / row['dense_params']:.3f}  prune {seconds:.2f} s",
                flush=True,
            )
    return rows


def finetune(
    small: nn.Module,
    dense: nn.Module,
    example: torch.Tensor,
    loader: Any,
    seed: int,
    args: argparse.Namespace,
) -> None:
    """The fine-tuning every method gets alike: ``args.epochs`` epochs at a tenth of the
    training rate (cosine to 0), on the task loss, or with ``--distill T`` on Hinton's
    distillation loss from the dense model as well (temperature T, ``Distillation``'s alpha)."""
    config = TrainConfig(epochs=args.epochs, lr=TRAIN_LR / 10, seed=seed)
    if args.distill is None:
        train(small, loader, config)
        return
    teacher = copy.deepcopy(dense).eval()
    with Distillation(temperature=args.distill).bind(teacher, small, example) as kd:
        train(small, loader, config, loss_terms=[kd])


def _quick_dense(name: str, seed: int, loaders: Any, epochs: int) -> nn.Module:
    """A dense model trained on a subset (not cached: the cache holds full-data models)."""
    model = build_model(name, seed=seed, in_channels=1)
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


#: Op-time buckets of the breakdown, first match wins (profiler op names, lower case).
OP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("conv", ("conv",)),
    ("linear", ("addmm", "aten::mm", "linear", "matmul", "bmm", "baddbmm")),
    ("norm", ("batch_norm", "layer_norm")),
    ("activation", ("relu", "hardtanh", "clamp", "gelu", "silu", "softmax")),
    ("add", ("aten::add",)),
    ("pool", ("pool", "aten::mean")),
)


def op_breakdown(model: nn.Module, x: torch.Tensor, runs: int) -> dict[str, float]:
    """Milliseconds per forward pass by kind of op (self CPU time of the profiler's leaf
    ops, so nothing is counted twice): which ops the time goes to, and so which follow MACs."""
    with torch.no_grad():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    out = {kind: 0.0 for kind, _ in OP_KINDS} | {"other": 0.0}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, keys in OP_KINDS if any(n in name for n in keys)), "other")
        out[kind] += event.self_cpu_time_total / 1000.0 / runs
    return out


#: Key of the floor model among a speed run's timed variants (``--explain``).
FLOOR = "floor"


def floor_model(model: nn.Module, x1: torch.Tensor) -> nn.Module:
    """``model`` with every prunable channel group cut to its last channel: what is left is
    the time no channel pruning can remove (per-call costs of every op, layers that are not
    pruned, the input's and output's own widths)."""
    return sc.shrink(
        model, x1, budget=sc.MACs(1.0), allocation={".*": 0.999}, max_ratio=0.999, round_to=None
    )


def floor_fields(
    med: dict[str, float], small_1: float, small_big: float, reduction: float, floor_macs: float
) -> dict[str, float]:
    """The floor's share of the dense time and the shrunk model's fraction of the limit net of
    it: a model whose dense time is ``floor + rest`` can at best run at ``floor + rest /
    reduction`` when its MACs fall by ``reduction``. ``floor_macs``: the floor model's MACs as
    a fraction of the dense model's."""
    out = {"floor_macs_fraction": floor_macs}
    for batch, small in (("1", small_1), ("big", small_big)):
        dense, floor = med[f"dense_{batch}"], med[f"small_{batch}_{FLOOR}"]
        best = min(floor, dense) + max(dense - floor, 0.0) / reduction
        suffix = "batch1" if batch == "1" else "large_batch"
        out[f"floor_ms_{suffix}"] = floor
        out[f"floor_share_{suffix}"] = floor / dense
        out[f"floor_adjusted_fraction_{suffix}"] = best / small
    return out


def _tp_pass(model: nn.Module, x1: torch.Tensor, name: str) -> tuple[float | None, ...]:
    """Torch-Pruning's graph build and one prune at ``pruning_ratio=0.3``: (graph s, total s,
    MACs after); Nones when it fails on the model (a result, not a crash)."""
    try:
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(
            copy.deepcopy(model), x1, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.3, ignored_layers=classifier_of(model),
        )  # fmt: skip
        graph_s = time.perf_counter() - t0
        pruner.step()
        return graph_s, time.perf_counter() - t0, macs_of(pruner.model, x1)
    except Exception as exc:
        print(f"{name}: Torch-Pruning failed: {type(exc).__name__}: {exc}", flush=True)
        return None, None, None


def _speed_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The speed model ``name`` in eval mode with seeded random weights, and its batch-1 input
    (drawn next from the same seeded stream)."""
    build, shape, _ = SPEED_MODELS[name]
    torch.manual_seed(0)
    return build().eval(), torch.randn(1, *shape)


def as_shipped(model: nn.Module, x1: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """What is timed: the model as built, or as a CPU deployment ships it: BatchNorm folded
    away (``--fold-bn``, a copy) and/or weights in channels-last order (``--channels-last``,
    in place: the values are unchanged, only their layout), which oneDNN's convolutions read
    without reordering, and/or compiled (``--compile``); or exported to ONNX and run by
    onnxruntime (``--runtime onnxruntime``, whose graph optimiser folds BatchNorm, fuses
    activations and picks its own blocked memory layout; ``x1``, the batch-1 input, is what
    the export traces, with a dynamic batch dimension)."""
    shipped = sc.fold_batchnorm(model) if args.fold_bn else model
    if args.runtime == "onnxruntime":
        return onnxruntime_module(shipped, x1, args.threads)
    if args.channels_last:
        shipped = shipped.to(memory_format=torch.channels_last)
    if args.compile:
        # Inductor with frozen weights: the parameters become constants, so oneDNN's
        # convolutions get pre-packed weights and the activations after them fused in. Each
        # input shape compiles once, in the timing's untimed warm-up runs.
        import torch._inductor.config as inductor  # only with --compile

        inductor.freezing = True
        shipped = cast(nn.Module, torch.compile(shipped, dynamic=False))  # an OptimizedModule
    return shipped


def speed_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per model: the dense model and one shrunk copy per ``--round-to`` value, timed in
    interleaved rounds so all see the same machine load."""
    rows: list[dict[str, Any]] = []
    for name in args.models:
        _, shape, big = SPEED_MODELS[name]
        model, x1 = _speed_model(name)
        xb = torch.randn(big, *shape)
        dense_macs = macs_of(model, x1)
        t0 = time.perf_counter()
        graph = build_graph(model, x1)
        graph_s = time.perf_counter() - t0
        keep = args.keep
        variants: dict[int | None, nn.Module] = {}
        for round_to in args.round_to:
            try:
                variants[round_to] = sc.shrink(
                    model, x1, budget=sc.MACs(keep), round_to=round_to, include=args.include
                )
            except sc.BudgetError as exc:
                print(f"{name}: {exc}", flush=True)
                keep = 0.8
                variants[round_to] = sc.shrink(
                    model, x1, budget=sc.MACs(keep), round_to=round_to, include=args.include
                )
        tp_graph_s, t_tp, tp_macs = _tp_pass(model, x1, name)
        timed = as_shipped(model, x1, args)
        runs: dict[Any, nn.Module] = {r: as_shipped(v, x1, args) for r, v in variants.items()}
        floor_macs = 0.0
        if args.explain:  # what no channel cut can remove: every group down to its last channel
            floor = floor_model(model, x1)
            floor_macs = macs_of(floor, x1) / dense_macs  # counted as built, like the variants
            runs[FLOOR] = as_shipped(floor, x1, args)
        if args.channels_last:  # inputs in the layout the models now read
            x1, xb = (x.contiguous(memory_format=torch.channels_last) for x in (x1, xb))
        lat: dict[str, list[float]] = {"dense_1": [], "dense_big": []}
        for r in runs:
            lat[f"small_1_{r}"], lat[f"small_big_{r}"] = [], []
        for _ in range(args.rounds):
            lat["dense_1"].append(_latency(timed, x1, args.repeats))
            lat["dense_big"].append(_latency(timed, xb, max(3, args.repeats // 4)))
            for r, small in runs.items():
                lat[f"small_1_{r}"].append(_latency(small, x1, args.repeats))
                lat[f"small_big_{r}"].append(_latency(small, xb, max(3, args.repeats // 4)))
        med = {k: statistics.median(v) for k, v in lat.items()}
        # the profiler sees PyTorch's ops only: no breakdown of an onnxruntime session
        dense_ops = op_breakdown(timed, xb, 3) if args.explain and args.runtime == "torch" else None
        for r, small in variants.items():
            report = sc.report_of(small, sc.ShrinkReport)
            small_macs = macs_of(small, x1)
            reduction = dense_macs / small_macs
            s1, sb = med[f"small_1_{r}"], med[f"small_big_{r}"]
            row = {
                "part": "speed",
                "model": name,
                "round_to": r,
                "fold_bn": args.fold_bn,
                "channels_last": args.channels_last,
                "compiled": args.compile,
                "runtime": args.runtime,
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
                "latency_ms": {
                    "dense_1": med["dense_1"],
                    "dense_big": med["dense_big"],
                    "small_1": s1,
                    "small_big": sb,
                },
                "speedup_batch1": med["dense_1"] / s1,
                "speedup_large_batch": med["dense_big"] / sb,
                "macs_reduction": reduction,
                "limit_fraction_batch1": med["dense_1"] / s1 / reduction,
                "limit_fraction_large_batch": med["dense_big"] / sb / reduction,
            }
            if dense_ops is not None:
                row["op_ms_dense"] = dense_ops
                row["op_ms_small"] = op_breakdown(runs[r], xb, 3)
            if args.explain:
                row.update(floor_fields(med, s1, sb, reduction, floor_macs))
            rows.append(row)
            print(
                f"{name:<13} round_to {r!s:<5} MACs x{reduction:.2f}  graph {graph_s:.2f} s  "
                f"shrink {report.seconds:.2f} s  (TP graph+prune "
                f"{t_tp if t_tp is None else round(t_tp, 2)} s)  "
                f"batch 1 x{row['speedup_batch1']:.2f} ({row['limit_fraction_batch1']:.2f})  "
                f"batch {big} x{row['speedup_large_batch']:.2f} "
                f"({row['limit_fraction_large_batch']:.2f} of the limit)",
                flush=True,
            )
            if args.explain:
                print(
                    f"    floor (every group at one channel, {row['floor_macs_fraction']:.3f} of "
                    f"the MACs): {row['floor_share_batch1']:.0%} of the dense time at batch 1, "
                    f"{row['floor_share_large_batch']:.0%} at batch {big}; of the limit net of "
                    f"the floor {row['floor_adjusted_fraction_batch1']:.2f} / "
                    f"{row['floor_adjusted_fraction_large_batch']:.2f}"
                )
            if dense_ops is not None:
                print("    op kind      dense ms   small ms   speedup   share of dense")
                total = sum(dense_ops.values())
                for kind, ms in dense_ops.items():
                    sm = row["op_ms_small"][kind]
                    if ms > 0.005 * total:
                        print(
                            f"    {kind:<11}{ms:>10.1f}{sm:>11.1f}{ms / max(sm, 1e-9):>9.2f}x"
                            f"{ms / total:>11.0%}"
                        )
    return rows


def time_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per model: ``shrink`` to ``--keep`` of the MACs as a whole (copy, trace, scoring, MACs
    search, surgery, check run) against one Torch-Pruning pass at ``pruning_ratio=0.3`` (copy,
    graph, prune), ``--rounds`` interleaved rounds in one process, medians."""
    rows: list[dict[str, Any]] = []
    for name in args.models:
        model, x1 = _speed_model(name)
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            sc.shrink(model, x1, budget=sc.MACs(args.keep))
            ours.append(time.perf_counter() - t0)
            t_tp = _tp_pass(model, x1, name)[1]
            if t_tp is not None:
                theirs.append(t_tp)
        row = {
            "part": "time",
            "model": name,
            "keep": args.keep,
            "shrink_seconds": statistics.median(ours),
            "shrink_seconds_all": ours,
            "torch_pruning_seconds": statistics.median(theirs) if theirs else None,
            "torch_pruning_seconds_all": theirs,
            "ratio_per_round_median": statistics.median(
                o / t for o, t in zip(ours, theirs, strict=False)
            )
            if theirs
            else None,
        }
        rows.append(row)
        tp_s = row["torch_pruning_seconds"]
        print(
            f"{name:<13} shrink to {args.keep:.2f} of the MACs {row['shrink_seconds']:.3f} s, "
            f"Torch-Pruning pass {'failed' if tp_s is None else f'{tp_s:.3f} s'} "
            f"(ratio {row['ratio_per_round_median'] or float('nan'):.2f}, the median of the rounds) "
            f"(medians of {args.rounds}, {torch.get_num_threads()} threads)",
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
    parser.add_argument("--part", choices=["accuracy", "speed", "time", "both"], default="both")
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
    parser.add_argument(
        "--round-to",
        nargs="+",
        type=lambda v: None if v == "none" else v if v == "auto" else int(v),
        default=["auto"],
        help="shrink's round_to: the speed part shrinks once per value (kept widths rounded "
        "up; 'none' = exact; 'auto', shrink's default, by group width); the accuracy part's "
        "secateurs methods take the first",
    )
    parser.add_argument(
        "--fold-bn",
        action="store_true",
        help="speed part: time the dense and shrunk models with BatchNorm folded into the "
        "layers before it (sc.fold_batchnorm), as a CPU deployment ships them",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="speed part: time the dense and shrunk models and their inputs in channels-last "
        "memory order (torch.channels_last), which oneDNN's convolutions read without reordering",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="speed part: time the dense and shrunk models compiled (torch.compile, Inductor "
        "with frozen weights), as a CPU server that can afford the compile ships them",
    )
    parser.add_argument(
        "--runtime",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="speed part: time the models in PyTorch, or exported to ONNX (sc.export_onnx) and "
        "run by onnxruntime's CPU provider with --threads threads (not with --channels-last or "
        "--compile: onnxruntime chooses its own layout and fusions)",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="speed part: profile op time by kind of op, and time the floor model (every "
        "channel group cut to one channel: the time no channel pruning removes)",
    )
    parser.add_argument(
        "--include",
        nargs="+",
        default=None,
        help="only these layers (regexes over module names) lose output channels (sc.shrink's "
        "include; the speed part and the accuracy part's secateurs methods), e.g. "
        "MobileNetV2's expansion layers 'features\\.\\d+\\.conv\\.0\\.0'",
    )
    parser.add_argument(
        "--distill",
        type=float,
        default=None,
        metavar="T",
        help="accuracy part: every method's fine-tuning also distils the dense model "
        "(temperature T, alpha 0.9); default: the task loss alone",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.runtime == "onnxruntime" and (args.channels_last or args.compile):
        parser.error("--runtime onnxruntime takes neither --channels-last nor --compile")
    if args.quick:
        args.seeds, args.rounds, args.repeats = args.seeds[:1], 1, 3
        args.models = [m for m in args.models if m in ("vgg-bn", "resnet18")]
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    if args.part in ("accuracy", "both"):
        rows += accuracy_part(args)
    if args.part in ("speed", "both"):
        rows += speed_part(args)
    if args.part == "time":
        rows += time_part(args)
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
