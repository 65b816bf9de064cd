"""CPU latency of sparse Linear layers against dense: the crossover grid, and what auto picks.

For each layer size, sparsity and batch, one ``nn.Linear`` with that fraction of its weights
zeroed (element-wise at random by default; ``--pattern blocks`` zeroes whole 16x16 tiles) is
timed dense, as :class:`~secateurs.compress.SparseLinear` (CSR) and as
:class:`~secateurs.compress.BlockSparseLinear` (BSR). The candidates are timed in interleaved
rounds (each round calls every candidate once, alternating the order), so the load of a shared
machine hits them alike; the figure is the median over ``--repeats`` rounds after warm-up.
A candidate far slower than dense after 3 rounds (over 4x) stops being timed; its median over
those rounds is kept. ``auto`` is what :func:`~secateurs.compress.sparsify_` chooses for the
layer at that batch (its own, separate measurement); its speedup is the chosen module's speedup
in this grid's measurement (1.0 where it keeps the dense layer), so an auto point below 1.0
would be a layer sparsify_ made slower.

Sizes are ``IN x OUT`` (in_features x out_features), like LeNet-300-100's first layer 784x300.

    python benchmarks/bench_sparse_inference.py            # the full grid (slow on 2 cores)
    python benchmarks/bench_sparse_inference.py --quick    # a smaller grid, fewer repeats

Writes ``benchmarks/results/sparse_inference.json`` (every point, torch version, threads,
machine) and ``benchmarks/results/sparse_inference.png`` (speedup against sparsity, one line
per batch, one panel per size, dense = 1.0).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench_finegrained import cpu_name
from secateurs.compress.inference import (
    BlockSparseLinear,
    SparseLinear,
    SparsifyReport,
    choose_block,
    sparsify_,
)
from secateurs.errors import ModelError
from secateurs.provenance import report_of

RESULTS = Path(__file__).parent / "results"
FULL = {
    "sizes": "1024x1024,4096x4096,4096x1024,784x300",
    "sparsities": "0.5,0.7,0.8,0.9,0.95,0.98,0.99",
    "batches": "1,8,32,128,256",
}
QUICK = {"sizes": "1024x1024,4096x4096", "sparsities": "0.5,0.9,0.95,0.99", "batches": "1,32,256"}
PATTERN_BLOCK = 16  #: tile side zeroed together by ``--pattern blocks``
GIVE_UP = 4.0  #: stop timing a candidate this many times slower than dense after 3 rounds


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        fan_in, fan_out = item.lower().split("x")
        sizes.append((int(fan_in), int(fan_out)))
    return sizes


def sparse_linear(fan_in: int, fan_out: int, sparsity: float, pattern: str) -> nn.Linear:
    """A Linear with exactly ``round(sparsity * weights)`` zeros (whole tiles for ``blocks``)."""
    layer = nn.Linear(fan_in, fan_out)
    if pattern == "blocks" and fan_in % PATTERN_BLOCK == 0 and fan_out % PATTERN_BLOCK == 0:
        grid = (fan_out // PATTERN_BLOCK, fan_in // PATTERN_BLOCK)
        keep = torch.zeros(grid[0] * grid[1])
        keep[torch.rand(keep.numel()).argsort()[round(sparsity * keep.numel()) :]] = 1
        mask = keep.reshape(grid).repeat_interleave(PATTERN_BLOCK, 0)
        mask = mask.repeat_interleave(PATTERN_BLOCK, 1)
    else:
        scores = torch.rand(fan_out, fan_in).flatten()
        mask = torch.zeros(scores.numel())
        mask[scores.argsort()[round(sparsity * scores.numel()) :]] = 1
        mask = mask.reshape(fan_out, fan_in)
    with torch.no_grad():
        layer.weight.mul_(mask)
    return layer


def time_interleaved(
    calls: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Median (and p10/p90) ms per call over interleaved rounds; hopeless candidates dropped."""
    samples: dict[str, list[float]] = {k: [] for k in calls}
    live = dict(calls)
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in live.values():
                fn()
        for r in range(repeats):
            for name in list(live) if r % 2 == 0 else list(reversed(live)):
                start = time.perf_counter()
                live[name]()
                samples[name].append((time.perf_counter() - start) * 1000.0)
            if r == 2 and repeats > 3:
                dense = statistics.median(samples["dense"])
                for name in [k for k in live if k != "dense"]:
                    if statistics.median(samples[name]) > GIVE_UP * dense:
                        del live[name]
    out = {}
    for name, ts in samples.items():
        cuts = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
        out[name] = {
            "median_ms": statistics.median(ts),
            "p10_ms": cuts[0],
            "p90_ms": cuts[-1],
            "runs": len(ts),
        }
    return out


def bind(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    return lambda: module(x)


def measure_point(
    fan_in: int,
    fan_out: int,
    sparsity: float,
    batch: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    dense = sparse_linear(fan_in, fan_out, sparsity, args.pattern)
    x = torch.randn(batch, fan_in)
    modules: dict[str, nn.Module] = {"dense": dense, "csr": SparseLinear(dense)}
    block = choose_block(dense.weight)
    if block is not None:
        modules["bsr"] = BlockSparseLinear(dense, block=block)
    calls: dict[str, Callable[[], Any]] = {name: bind(m, x) for name, m in modules.items()}
    timing = time_interleaved(calls, args.warmup, args.repeats)

    model = nn.Sequential(copy.deepcopy(dense))
    sparsify_(model, x, repeats=args.auto_repeats, warmup=args.warmup)
    choice = report_of(model, SparsifyReport).layers[0]
    dense_ms = timing["dense"]["median_ms"]
    speedup = {k: dense_ms / v["median_ms"] for k, v in timing.items()}
    auto_speedup = 1.0 if choice.chosen == "dense" else speedup[choice.chosen]
    return {
        "size": f"{fan_in}x{fan_out}",
        "in_features": fan_in,
        "out_features": fan_out,
        "sparsity": sparsity,
        "batch": batch,
        "bsr_block": block,
        "timing": timing,
        "speedup": speedup,
        "auto": {
            "chosen": choice.chosen,
            "speedup": auto_speedup,
            "sparsify_dense_ms": choice.dense_ms,
            "sparsify_sparse_ms": choice.sparse_ms,
            "reason": choice.reason,
        },
    }


def machine_info() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


TABLE_HEAD = (
    f"{'size':>10} {'sparsity':>8} {'batch':>5} {'dense ms':>9} {'csr':>8} {'bsr':>8}  auto"
)


def table_row(r: dict[str, Any]) -> str:
    s = r["speedup"]
    return (
        f"{r['size']:>10} {r['sparsity']:>8.2f} {r['batch']:>5} "
        f"{r['timing']['dense']['median_ms']:>9.3f} {fmt_x(s.get('csr')):>8} "
        f"{fmt_x(s.get('bsr')):>8}  {r['auto']['chosen']} {fmt_x(r['auto']['speedup'])}"
    )


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig = Figure(figsize=(4.2 * len(sizes), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    colors = [f"C{i}" for i in range(len(batches))]
    for ax, size in zip(axes, sizes, strict=True):
        for batch, color in zip(batches, colors, strict=True):
            pts = sorted(
                (r["sparsity"], r["speedup"])
                for r in rows
                if r["size"] == size and r["batch"] == batch
            )
            xs = [p[0] * 100 for p in pts]
            ax.plot(xs, [p[1]["csr"] for p in pts], "o-", color=color, label=f"batch {batch} CSR")
            bsr = [(x, p[1]["bsr"]) for x, p in zip(xs, pts, strict=True) if "bsr" in p[1]]
            if bsr:
                ax.plot(*zip(*bsr, strict=True), ":", color=color, alpha=0.6)
        auto = [(r["sparsity"] * 100, r["auto"]["speedup"]) for r in rows if r["size"] == size]
        ax.scatter(*zip(*auto, strict=True), s=60, facecolors="none", edgecolors="black", zorder=3)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("sparsity (%)")
        ax.set_title(f"Linear {size} (in x out)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup over dense (solid CSR, dotted BSR, circles auto)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", help=f"IN x OUT list (default {FULL['sizes']})")
    parser.add_argument("--sparsities", help=f"default {FULL['sparsities']}")
    parser.add_argument("--batches", help=f"default {FULL['batches']}")
    parser.add_argument("--repeats", type=int, help="timed rounds per point (default 21, quick 7)")
    parser.add_argument(
        "--auto-repeats", type=int, help="sparsify_'s repeats (default 11, quick 5)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--pattern", choices=("elements", "blocks"), default="elements")
    parser.add_argument("--quick", action="store_true", help=f"smaller grid: {QUICK}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "sparse_inference.json"))
    parser.add_argument("--plot", default=str(RESULTS / "sparse_inference.png"))
    args = parser.parse_args()
    grid = QUICK if args.quick else FULL
    args.repeats = args.repeats or (7 if args.quick else 21)
    args.auto_repeats = args.auto_repeats or (5 if args.quick else 11)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = parse_sizes(args.sizes or grid["sizes"])
    sparsities = [float(s) for s in (args.sparsities or grid["sparsities"]).split(",")]
    batches = [int(b) for b in (args.batches or grid["batches"]).split(",")]

    info = machine_info()
    print(
        f"torch {info['torch']}, {info['threads']} threads, {info['cpu']}, pattern {args.pattern}"
    )
    print(TABLE_HEAD)
    print("-" * (len(TABLE_HEAD) + 12))
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for fan_in, fan_out in sizes:
        for sparsity in sparsities:
            for batch in batches:
                try:
                    rows.append(measure_point(fan_in, fan_out, sparsity, batch, args))
                except ModelError as exc:
                    print(f"skipped {fan_in}x{fan_out} {sparsity} {batch}: {exc}")
                    continue
                print(table_row(rows[-1]), flush=True)

    slower = [
        {k: r[k] for k in ("size", "sparsity", "batch")} | {"auto": r["auto"]}
        for r in rows
        if r["auto"]["speedup"] < 1.0
    ]
    target = next(
        (
            r
            for r in rows
            if (r["in_features"], r["out_features"]) == (4096, 4096)
            and r["sparsity"] == 0.95
            and r["batch"] == 1
        ),
        None,
    )
    summary = {
        "points": len(rows),
        "auto_slower_than_dense": slower,
        "target_4096x4096_95pct_batch1_csr_speedup": target["speedup"]["csr"] if target else None,
        "target_met_5x": (target["speedup"]["csr"] >= 5.0) if target else None,
        "seconds": time.perf_counter() - started,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if target:
        print(f"4096x4096 at 95% sparsity, batch 1: CSR {target['speedup']['csr']:.2f}x dense")
    print(f"auto points slower than dense: {len(slower)} of {len(rows)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": info,
        "pattern": args.pattern,
        "repeats": args.repeats,
        "auto_repeats": args.auto_repeats,
        "warmup": args.warmup,
        "seed": args.seed,
    }
    out.write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=2))
    print(f"wrote {out}")
    title = f"sparse Linear vs dense, {info['threads']} CPU threads, torch {info['torch']}"
    plot(rows, Path(args.plot), f"{title}, {args.pattern} sparsity")
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
