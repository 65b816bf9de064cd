"""Time and peak memory to compute global magnitude masks over 100M+ parameters.

secateurs' ``prune_(model, sparsity=0.9)`` (global L1 magnitude) against
``torch.nn.utils.prune.global_unstructured`` with L1Unstructured, on six 4096x4096 Linear layers
(100.7M weights, 403 MB). Each run is a fresh subprocess; peak extra memory is the growth of the
process's peak resident set (``ru_maxrss``) during the pruning call, after the model exists.

    python benchmarks/bench_global_masks.py [--repeats 3] [--layers 6] [--out benchmarks/results/global_masks.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import json, resource, sys, time
import torch
from torch import nn
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[3]))
method, layers = sys.argv[1], int(sys.argv[2])
model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(layers)])
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak_mb()
start = time.perf_counter()
if method == "secateurs":
    import secateurs as sc
    before = peak_mb()
    start = time.perf_counter()
    sc.prune_(model, sparsity=0.9)
else:
    import torch.nn.utils.prune as prune
    prune.global_unstructured([(m, "weight") for m in model], pruning_method=prune.L1Unstructured, amount=0.9)
seconds = time.perf_counter() - start
extra = peak_mb() - before
zeros = sum(int((m.weight == 0).sum()) for m in model)
total = sum(m.weight.numel() for m in model)
print(json.dumps({"method": method, "seconds": seconds, "peak_extra_mb": extra,
                  "weight_mb": weight_bytes / 2**20, "sparsity": zeros / total, "params": total}))
"""


def run_once(method: str, layers: int, threads: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(layers), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "global_masks.json")
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for method in ("secateurs", "torch.nn.utils.prune"):
        runs = [run_once(method, args.layers, args.threads) for _ in range(args.repeats)]
        rows.append(
            {
                "method": method,
                "params": runs[0]["params"],
                "weight_mb": runs[0]["weight_mb"],
                "sparsity": runs[0]["sparsity"],
                "seconds_median": statistics.median(r["seconds"] for r in runs),
                "peak_extra_mb_median": statistics.median(r["peak_extra_mb"] for r in runs),
                "runs": runs,
            }
        )
    ours, peer = rows
    summary = {
        "speedup_vs_torch_prune": peer["seconds_median"] / ours["seconds_median"],
        "secateurs_peak_extra_over_weights": ours["peak_extra_mb_median"] / ours["weight_mb"],
        "torch_prune_peak_extra_over_weights": peer["peak_extra_mb_median"] / peer["weight_mb"],
    }
    print(
        f"{'method':<22}{'params':>14}{'sparsity':>10}{'seconds':>10}{'peak extra MB':>15}{'x weights':>11}"
    )
    for r in rows:
        print(
            f"{r['method']:<22}{r['params']:>14,}{r['sparsity']:>10.4f}{r['seconds_median']:>10.2f}"
            f"{r['peak_extra_mb_median']:>15.0f}{r['peak_extra_mb_median'] / r['weight_mb']:>11.2f}"
        )
    print(f"secateurs is {summary['speedup_vs_torch_prune']:.1f}x faster than torch.nn.utils.prune")
    from bench_finegrained import machine  # torch only now: the children measure memory

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"rows": rows, "summary": summary, "repeats": args.repeats, "machine": machine()},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
