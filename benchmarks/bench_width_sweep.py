"""The ceiling of channel pruning's speed: every VGG-BN width configuration near a MACs budget,
timed, with the ones ``sc.shrink`` picks placed among them.

``bench_shrink --part speed`` measures how close a shrunk model comes to the speedup its MACs
promise ("of the limit": speedup over the MACs reduction). When that falls short, this sweep
asks whether any channel cut could do better: it builds the zoo's VGG-BN (convs 32-32-64-64-128,
28x28) at every combination of per-layer widths from ``--fractions`` of each layer (rounded to
whole channels) whose MACs land in ``--keep-range``, times them all beside the dense model in
interleaved rounds (random weights, the same runtime and threads), and ranks them. The widths
``sc.shrink`` chooses at half the MACs for each ``--round-to`` are timed in the same rounds.
If the best configuration misses a target too, no width choice can meet it on this runtime;
what is left is the runtime's (per-call and threading costs the MACs do not carry).

    python benchmarks/bench_width_sweep.py --runtime onnxruntime --fold-bn
    python benchmarks/bench_width_sweep.py --runtime onnxruntime --fold-bn --threads 1
    python benchmarks/bench_width_sweep.py --fold-bn --channels-last      # eager PyTorch
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

import secateurs as sc
from bench_finegrained import RESULTS, write_results
from bench_shrink import _latency, as_shipped, macs_of
from secateurs.zoo import VGG_CHANNELS, build_model

BIG = 64  # the large batch, as in bench_shrink's speed part for VGG-BN
SHAPE = (1, 28, 28)


def widths_of(model: nn.Module) -> tuple[int, ...]:
    """The output widths of a VGG-BN's convolutions, first to last."""
    return tuple(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def candidates(
    fractions: list[float], lo: float, hi: float, x1: torch.Tensor
) -> dict[tuple[int, ...], float]:
    """Every width configuration from ``fractions`` of each layer whose MACs, as a fraction of
    the dense model's, fall in ``[lo, hi]``: {widths: MACs fraction}."""
    dense = macs_of(build_model("vgg-bn"), x1)
    choices = [sorted({max(1, round(f * w)) for f in fractions}) for w in VGG_CHANNELS]
    out: dict[tuple[int, ...], float] = {}
    for widths in itertools.product(*choices):
        f = macs_of(build_model("vgg-bn", channels=widths), x1) / dense
        if lo <= f <= hi:
            out[widths] = f
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=["torch", "onnxruntime"], default="onnxruntime")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fold-bn", action="store_true", help="as bench_shrink's --fold-bn")
    parser.add_argument(
        "--channels-last", action="store_true", help="as bench_shrink's (PyTorch only)"
    )
    parser.add_argument("--keep", type=float, default=0.5, help="shrink's MACs budget")
    parser.add_argument("--keep-range", nargs=2, type=float, default=[0.42, 0.52])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.5, 0.75, 1.0])
    parser.add_argument(
        "--round-to",
        nargs="+",
        type=lambda v: None if v == "none" else v if v == "auto" else int(v),
        default=[None, 16, "auto"],
        help="shrink's round_to values whose widths are timed among the sweep's",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=150, help="batch-1 runs a round")
    parser.add_argument("--top", type=int, default=15, help="rows printed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.runtime == "onnxruntime" and args.channels_last:
        parser.error("--runtime onnxruntime does not take --channels-last")
    args.compile = False  # as_shipped reads it
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    x1, xb = torch.randn(1, *SHAPE), torch.randn(BIG, *SHAPE)
    dense = build_model("vgg-bn", seed=0).eval()
    dense_macs = macs_of(dense, x1)
    lo, hi = args.keep_range
    configs = candidates(args.fractions, lo, hi, x1)
    plans: dict[tuple[int, ...], list[str]] = {}
    for r in args.round_to:
        small = sc.shrink(dense, x1, budget=sc.MACs(args.keep), round_to=r)
        plans.setdefault(widths_of(small), []).append(f"shrink round_to={r}")
        configs[widths_of(small)] = macs_of(small, x1) / dense_macs
    configs[VGG_CHANNELS] = 1.0
    print(f"{len(configs)} configurations, {args.runtime}, {args.threads} thread(s)", flush=True)

    timed = {
        w: as_shipped(build_model("vgg-bn", seed=0, channels=w).eval(), x1, args) for w in configs
    }
    if args.channels_last:
        x1, xb = (x.contiguous(memory_format=torch.channels_last) for x in (x1, xb))
    lat: dict[tuple[int, ...], tuple[list[float], list[float]]] = {w: ([], []) for w in timed}
    for _ in range(args.rounds):
        for w, model in timed.items():
            lat[w][0].append(_latency(model, x1, args.repeats))
            lat[w][1].append(_latency(model, xb, max(3, args.repeats // 15)))
    d1, db = (statistics.median(v) for v in lat[VGG_CHANNELS])
    rows: list[dict[str, Any]] = []
    for w, f in configs.items():
        m1, mb = (statistics.median(v) for v in lat[w])
        rows.append(
            {
                "channels": list(w),
                "macs_fraction": f,
                "source": ", ".join(plans.get(w, ["dense" if w == VGG_CHANNELS else "sweep"])),
                "latency_ms_batch1": m1,
                "latency_ms_large_batch": mb,
                "limit_fraction_batch1": d1 / m1 * f,
                "limit_fraction_large_batch": db / mb * f,
            }
        )
    rows.sort(key=lambda r: -min(r["limit_fraction_batch1"], r["limit_fraction_large_batch"]))
    print(f"{'channels':<24}{'MACs':>7}{'b1 ms':>9}{'of limit':>10}{f'b{BIG} ms':>9}"
          f"{'of limit':>10}  source")  # fmt: skip
    for rank, r in enumerate(rows):
        if rank < args.top or r["source"] != "sweep":
            print(
                f"{tuple(r['channels'])!s:<24}{r['macs_fraction']:>7.3f}"
                f"{r['latency_ms_batch1']:>9.3f}{r['limit_fraction_batch1']:>10.2f}"
                f"{r['latency_ms_large_batch']:>9.2f}{r['limit_fraction_large_batch']:>10.2f}"
                f"  {r['source']} (rank {rank + 1})"
            )
    cut = [r for r in rows if r["source"] != "dense"]
    for key, label in (("limit_fraction_batch1", "batch 1"), ("limit_fraction_large_batch",
                                                                f"batch {BIG}")):  # fmt: skip
        best = max(cut, key=lambda r: r[key])
        print(f"best of the limit at {label}: {best[key]:.2f} {tuple(best['channels'])}")
    out = Path(args.out) if args.out else RESULTS / f"width_sweep_{args.runtime}.json"
    write_results(out, args, rows)


if __name__ == "__main__":
    main()
