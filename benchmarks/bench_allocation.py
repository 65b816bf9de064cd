"""Automatic per-layer ratios against uniform and global allocation, at the same budget.

Three parts, all on this machine's CPU:

* ``vgg``: the zoo's VGG-BN on Fashion-MNIST (dense weights cached per seed, as in the other
  benchmarks), channels removed down to half the MACs by each allocation: ``uniform``,
  ``global``, ``sensitivity``, ``amc`` (resource-constrained), ``amc_accuracy``
  (accuracy-guaranteed: the budget is a ceiling, the reward may take it lower) and
  ``netadapt`` (MACs budget). Every search scores candidates on a calibration split of
  training images (never the test set), BatchNorm statistics re-estimated on it first
  (``--no-adapt-bn`` scores with the dense model's statistics);
  then every model gets the same fine-tuning (``--finetune-epochs`` at a tenth of the
  training rate). Recorded: test accuracy before and after fine-tuning, MACs (one counter,
  :func:`secateurs.metrics.profile`), measured latency (batch 64, one thread, median) and the
  search's own cost in seconds (for NetAdapt this includes its short-term fine-tuning).
* ``lenet5``: the zoo's LeNet-5, element masks at 90% sparsity, same protocol, for the
  allocations that work on masks.
* ``timing``: sensitivity analysis of LeNet-5 at 10 ratios, wall-clock seconds with 1 and 2
  worker processes.
* ``latency``: the ``vgg`` results' architectures rebuilt and timed again in interleaved
  rounds, for a machine that was busy while the ``vgg`` part ran.

    python benchmarks/bench_allocation.py --part vgg --seeds 0 1 2
    python benchmarks/bench_allocation.py --part lenet5 --seeds 0 1 2
    python benchmarks/bench_allocation.py --part timing
    python benchmarks/bench_allocation.py --part latency     # after vgg, on a quiet machine
    python benchmarks/bench_allocation.py --part plot        # allocation_<part>.png
    python benchmarks/bench_allocation.py --quick          # a smoke test

Writes ``benchmarks/results/allocation_<part>.json``; ``python benchmarks/tables.py`` renders
the tables and ``allocation_<part>.png`` plots accuracy against MACs per method.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import secateurs as sc
from bench_finegrained import RESULTS, TRAIN_LR, dense_model, write_results
from secateurs.data import load_fashion_mnist
from secateurs.metrics import evaluate, measure_latency, profile
from secateurs.pipeline import steps_finetuner
from secateurs.search.space import ElementSpace
from secateurs.train import TrainConfig, train
from secateurs.zoo import build_model


@dataclass
class Setup:
    """What every method of one (model, seed) point gets: the same dense model and data."""

    dense: nn.Module
    example: torch.Tensor
    calib: DataLoader[Any]
    loaders: Any
    seed: int
    budget: sc.Budget
    finetune: TrainConfig
    options: dict[str, Any]


#: method -> run(setup) -> (model, search seconds, search summary)
Method = Callable[[Setup], tuple[nn.Module, float, dict[str, Any]]]


def _shrink_with(allocation: str) -> Method:
    def run(s: Setup) -> tuple[nn.Module, float, dict[str, Any]]:
        start = time.perf_counter()
        small = sc.shrink(s.dense, s.example, s.budget, allocation=allocation)
        return small, time.perf_counter() - start, {}

    return run


def _channel_search(spec: dict[str, Any], budget: sc.Budget | None = None) -> Method:
    """Search a ratio map on the dense model, then remove channels by it."""

    def run(s: Setup) -> tuple[nn.Module, float, dict[str, Any]]:
        ft = steps_finetuner(s.loaders[0], s.finetune)
        found = sc.search_allocation(
            s.dense,
            s.example,
            budget or s.budget,
            {**spec, **s.options.get(spec["name"], {})},
            data=s.calib,
            finetune=ft,
            seed=s.seed,
            adapt_bn=s.options["adapt_bn"],
            progress=lambda m: print("    " + m, flush=True) if s.options.get("verbose") else None,
        )
        # the ratio map is applied to the dense model: every method then gets the same
        # fine-tuning (a search's own fine-tuning, NetAdapt's, counts in its search time)
        small = sc.shrink(s.dense, s.example, sc.MACs(1.0), allocation=found.ratios)
        return small, found.seconds, _summary(found)

    return run


def _summary(found: sc.SearchResult) -> dict[str, Any]:
    return {
        "ratios": dict(found.ratios),  # a LayerMap: its entries, for the JSON
        "value": found.value,
        "limit": found.limit,
        "unit": found.unit,
        "score": found.score,
        "evaluations": found.evaluations,
    }


CHANNEL_METHODS: dict[str, Method] = {
    "uniform": _shrink_with("uniform"),
    "global": _shrink_with("global"),
    "sensitivity": _channel_search({"name": "sensitivity", "workers": 2}),
    "amc": _channel_search({"name": "amc", "protocol": "resource"}),
    "amc_accuracy": _channel_search({"name": "amc", "protocol": "accuracy"}),
    "netadapt": _channel_search({"name": "netadapt"}),
}


def _element_method(spec: dict[str, Any] | str) -> Method:
    def run(s: Setup) -> tuple[nn.Module, float, dict[str, Any]]:
        model = copy.deepcopy(s.dense)
        start = time.perf_counter()
        if isinstance(spec, str):
            sc.prune_(model, budget=s.budget, allocation=spec)
            return model, time.perf_counter() - start, {}
        space = ElementSpace(model, s.example)
        found = sc.search_allocation(
            model,
            s.example,
            s.budget,
            {**spec, **s.options.get(spec["name"], {})},
            space=space,
            data=s.calib,
            finetune=steps_finetuner(s.loaders[0], s.finetune),
            seed=s.seed,
            adapt_bn=s.options["adapt_bn"],
        )
        sc.prune_(model, budget=s.budget, allocation=space.layer_map(found.ratios))
        return model, found.seconds, _summary(found)

    return run


ELEMENT_METHODS: dict[str, Method] = {
    "uniform": _element_method("uniform"),
    "global": _element_method("global"),
    "lamp": _element_method("lamp"),
    "sensitivity": _element_method(
        {"name": "sensitivity", "workers": 2, "ratios": [0.1 * i for i in range(10)] + [0.95, 0.98]}
    ),
    "amc": _element_method({"name": "amc", "protocol": "resource"}),
}


def _ratio(num: int | None, den: int | None) -> str:
    """``num`` as a fraction of ``den``, for printing ("-" when either was not counted)."""
    return "-" if num is None or not den else f"{num / den:.3f}"


def run_part(args: argparse.Namespace, part: str) -> list[dict[str, Any]]:
    model_name, epochs = ("vgg-bn", 4) if part == "vgg" else ("lenet-5", 10)
    methods = CHANNEL_METHODS if part == "vgg" else ELEMENT_METHODS
    budget: sc.Budget = sc.MACs(args.keep) if part == "vgg" else sc.Sparsity(args.sparsity)
    bundle = load_fashion_mnist()
    if args.quick:
        bundle = bundle.subset(2048, 1024)
    rows: list[dict[str, Any]] = []
    names = [m for m in args.methods if m in methods]
    for seed in args.seeds:
        loaders = bundle.loaders(128, seed=seed)
        if args.quick:
            dense = build_model(model_name, seed=seed)
            train(dense, loaders[0], TrainConfig(epochs=1, lr=TRAIN_LR, seed=seed))
        else:
            dense = dense_model(model_name, seed, epochs, loaders)
        dense.eval()
        example = torch.zeros(1, 1, 28, 28)
        batch = torch.randn(64, 1, 28, 28)
        calib = DataLoader(bundle.calibration_split(args.calibration, seed=seed), batch_size=500)
        ft_cfg = TrainConfig(epochs=args.finetune_epochs, lr=TRAIN_LR / 10, seed=seed)
        options = {
            "amc": {"episodes": args.amc_episodes, "warmup": max(1, args.amc_episodes // 4)},
            "netadapt": args.netadapt,
            "verbose": args.verbose,
            "adapt_bn": args.adapt_bn,
        }
        setup = Setup(dense, example, calib, loaders, seed, budget, ft_cfg, options)
        dense_acc = evaluate(dense, loaders[1]).accuracy
        dense_stats = profile(dense, example).totals
        dense_ms = measure_latency(dense, batch, warmup=3, repeats=args.repeats, threads=1)
        print(f"{model_name} seed {seed}: dense {dense_acc:.2%}", flush=True)
        for name in names:
            try:
                small, seconds, info = methods[name](setup)
            except sc.SecateursError as exc:
                print(f"  {name:<14} failed: {exc}", flush=True)
                rows.append({"part": part, "seed": seed, "method": name, "error": str(exc)})
                continue
            before = evaluate(small, loaders[1]).accuracy
            start = time.perf_counter()
            train(small, loaders[0], ft_cfg)
            ft_seconds = time.perf_counter() - start
            sc.make_permanent_(small)
            after = evaluate(small, loaders[1]).accuracy
            stats = profile(small, example).totals
            ms = measure_latency(small, batch, warmup=3, repeats=args.repeats, threads=1)
            row = {
                "part": part,
                "model": model_name,
                "seed": seed,
                "method": name,
                "budget": str(budget),
                "dense_accuracy": dense_acc,
                "accuracy_before_finetune": before,
                "accuracy": after,
                "dense_macs": dense_stats["macs"],
                "macs": stats["macs"],
                "dense_nonzeros": dense_stats["nonzeros"],
                "nonzeros": stats["nonzeros"],
                "dense_latency_ms": dense_ms.median_ms,
                "latency_ms": ms.median_ms,
                "search_seconds": seconds,
                "finetune_seconds": ft_seconds,
                "search": info,
            }
            rows.append(row)
            print(
                f"  {name:<14} {before:7.2%} -> {after:7.2%}  MACs {_ratio(stats['macs'], dense_stats['macs'])}"
                f"  nonzeros {_ratio(stats['nonzeros'], dense_stats['nonzeros'])}"
                f"  latency {ms.median_ms:6.2f} ms (dense {dense_ms.median_ms:.2f})"
                f"  search {seconds:7.1f} s",
                flush=True,
            )
    return rows


def timing_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Sensitivity analysis of LeNet-5 at 10 ratios (the issue's under-a-minute target)."""
    bundle = load_fashion_mnist()
    loaders = bundle.loaders(128, seed=0)
    dense = dense_model("lenet-5", 0, 10, loaders).eval()
    calib = DataLoader(bundle.calibration_split(args.calibration, seed=0), batch_size=500)
    rows = []
    for space in ("elements", "channels"):
        for workers in (1, 2):
            start = time.perf_counter()
            found = sc.search_allocation(
                dense,
                torch.zeros(1, 1, 28, 28),
                sc.Sparsity(0.5),
                {"name": "sensitivity", "workers": workers},
                space=space,
                data=calib,
            )
            seconds = time.perf_counter() - start
            print(
                f"lenet-5 {space}, {workers} worker(s): {found.evaluations} evaluations of "
                f"{args.calibration} images in {seconds:.1f} s",
                flush=True,
            )
            rows.append(
                {
                    "part": "timing",
                    "space": space,
                    "workers": workers,
                    "seconds": seconds,
                    "evaluations": found.evaluations,
                    "calibration_examples": args.calibration,
                }
            )
    return rows


def latency_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Re-measure the VGG-BN results' latency on a quiet machine, in interleaved rounds.

    Latency depends on the architecture only, so each result is rebuilt from what its row
    recorded (the ratio map of a search; uniform and global re-run on the cached dense model,
    which is deterministic) and timed against the dense model round after round: a busy
    moment then slows every model alike instead of one.
    """
    rows = []
    for path in sorted(RESULTS.glob("allocation_vgg*.json")):
        if not path.stem.endswith(("_quick", "_latency")):
            rows += [r for r in json.loads(path.read_text())["rows"] if "accuracy" in r]
    bundle = load_fashion_mnist()
    example = torch.zeros(1, 1, 28, 28)
    batch = torch.randn(args.latency_batch, 1, 28, 28)
    models: dict[str, nn.Module] = {}
    for r in rows:
        dense = dense_model("vgg-bn", r["seed"], 4, bundle.loaders(128, seed=r["seed"])).eval()
        models.setdefault(f"dense/{r['seed']}", dense)
        allocation = r["search"]["ratios"] if r["search"] else r["method"]
        keep = sc.MACs(1.0) if r["search"] else sc.MACs(args.keep)
        models[f"{r['method']}/{r['seed']}"] = sc.shrink(
            dense, example, keep, allocation=allocation
        )
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            ms = measure_latency(model, batch, warmup=2, repeats=args.repeats, threads=1)
            times[key].append(ms.median_ms)
    out = []
    for key, values in times.items():
        method, seed = key.split("/")
        out.append(
            {
                "part": "latency",
                "method": method,
                "seed": int(seed),
                "batch": args.latency_batch,
                "latency_ms": statistics.median(values),
                "rounds": values,
            }
        )
        print(f"{method:<14} seed {seed}: {statistics.median(values):.2f} ms", flush=True)
    return out


def plot_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Accuracy after fine-tuning against MACs kept (VGG-BN) or nonzeros kept (LeNet-5), one
    point per method with ± sd over seeds, and each search's cost: ``allocation_<part>.png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for part, size_key, label in (
        ("vgg", "macs", "MACs kept (fraction of dense)"),
        ("lenet5", "nonzeros", "nonzero parameters kept (fraction of dense)"),
    ):
        rows = []
        for path in sorted(RESULTS.glob(f"allocation_{part}*.json")):
            if not path.stem.endswith(("_quick", "_latency")):
                rows += [r for r in json.loads(path.read_text())["rows"] if "accuracy" in r]
        if not rows:
            continue
        fig = Figure(figsize=(10, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax, cost = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for i, m in enumerate(methods):
            rs = [r for r in rows if r["method"] == m]
            x = [r[size_key] / r[f"dense_{size_key}"] for r in rs]
            y = [r["accuracy"] * 100 for r in rs]
            sd = statistics.stdev(y) if len(y) > 1 else 0.0
            ax.errorbar(
                statistics.mean(x), statistics.mean(y), yerr=sd, fmt="o", capsize=3, label=m
            )
            cost.bar(i, statistics.mean(r["search_seconds"] for r in rs), label=m)
        dense = statistics.mean({r["seed"]: r["dense_accuracy"] * 100 for r in rows}.values())
        ax.axhline(dense, color="grey", ls="--", label="dense")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy after equal fine-tuning (%)")
        ax.set_title(f"{rows[0]['model']}, {rows[0]['budget']}: mean ± sd over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        cost.set_xticks(range(len(methods)), methods, rotation=30, fontsize=8)
        cost.set_yscale("log")
        cost.set_ylabel("search time (s, log scale)")
        cost.set_title("what finding the ratios costs")
        out = RESULTS / f"allocation_{part}.png"
        fig.savefig(out, dpi=100)
        print(f"wrote {out}")
    return []


def summarise(rows: list[dict[str, Any]]) -> None:
    done = [r for r in rows if "accuracy" in r]
    if not done:
        return
    print(
        f"\n{'method':<14}{'accuracy (mean ± sd)':>22}{'before ft':>11}{'MACs':>8}"
        f"{'nonzeros':>10}{'latency ms':>12}{'search s':>10}"
    )
    for m in dict.fromkeys(r["method"] for r in done):
        rs = [r for r in done if r["method"] == m]
        a = [r["accuracy"] for r in rs]
        sd = statistics.stdev(a) if len(a) > 1 else 0.0
        print(
            f"{m:<14}{statistics.mean(a):>13.2%} ± {sd:.2%}"
            f"{statistics.mean(r['accuracy_before_finetune'] for r in rs):>11.2%}"
            f"{statistics.mean(r['macs'] / r['dense_macs'] for r in rs):>8.3f}"
            f"{statistics.mean(r['nonzeros'] / r['dense_nonzeros'] for r in rs):>10.3f}"
            f"{statistics.mean(r['latency_ms'] for r in rs):>12.2f}"
            f"{statistics.mean(r['search_seconds'] for r in rs):>10.1f}"
        )
    dense = {r["seed"]: r["dense_accuracy"] for r in done}
    print(f"{'dense':<14}{statistics.mean(dense.values()):>13.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["vgg", "lenet5", "timing", "latency", "plot"]
    parser.add_argument("--part", choices=parts, default="vgg")
    all_methods = list(dict.fromkeys([*CHANNEL_METHODS, *ELEMENT_METHODS]))
    parser.add_argument("--methods", nargs="+", default=all_methods, choices=all_methods)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of MACs to keep (vgg)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="sparsity (lenet5)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=2000, help="search split size")
    parser.add_argument("--amc-episodes", type=int, default=60)
    parser.add_argument(
        "--adapt-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="searches re-estimate BatchNorm statistics before scoring a candidate",
    )
    parser.add_argument("--netadapt", type=json.loads, default={}, help="NetAdapt options, JSON")
    parser.add_argument("--repeats", type=int, default=20, help="latency repeats")
    parser.add_argument("--rounds", type=int, default=5, help="latency part: interleaved rounds")
    parser.add_argument("--latency-batch", type=int, default=64, help="latency part: batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 seed, subsets, short searches")
    parser.add_argument("--verbose", action="store_true", help="print the searches' progress")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.amc_episodes, args.repeats = args.seeds[:1], 6, 3
    torch.set_num_threads(args.threads)
    own = {"timing": timing_part, "latency": latency_part, "plot": plot_part}
    rows = own[args.part](args) if args.part in own else run_part(args, args.part)
    summarise(rows)
    suffix = "_quick" if args.quick else ""
    out = Path(args.out) if args.out else RESULTS / f"allocation_{args.part}{suffix}.json"
    if args.part != "plot":
        write_results(out, args, rows)


if __name__ == "__main__":
    main()
