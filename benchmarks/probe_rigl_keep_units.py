"""Probe: does RigL trail gradual pruning at 99% because its drops kill whole units?

At 99% on LeNet-300-100 RigL ends with 62-74 of the second layer's 100 units fed, gradual with
89; a unit whose last input is dropped is dead, and a dead ReLU unit has a zero gradient on
its inputs, so RigL's growth cannot bring it back. This probe runs
``bench_sparse_training.py`` (same arguments, same output) with one change: an update never
drops the ``--keep-per-unit`` largest live weights of each output unit, so no unit loses its
last input. If the gap to gradual were the dead units, it would close here.

    python benchmarks/probe_rigl_keep_units.py --keep-per-unit 1 -- --models lenet-300-100 \
        --sparsities 0.99 --methods rigl --seeds 0 1 2 --lr 0.2 --clip-grad 1 \
        --distribution lamp --skip-lth --skip-distill --out results.json
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import Tensor

import bench_sparse_training
import secateurs.pruner
from secateurs import sparse_training


def protect_units(keep: int) -> None:
    """Make every drop-and-grow update keep each output unit's ``keep`` largest live weights
    (dim 0 is the output dim: Linear and Conv layers, which is what the LeNets have)."""
    original = sparse_training.drop_and_grow

    def drop_and_grow(
        weight: Tensor, mask: Tensor, fraction: float, grow: str, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        rows = weight.detach().float().reshape(weight.shape[0], -1)
        live = mask.to(device=rows.device, dtype=torch.bool).reshape(rows.shape)
        ranked = rows.abs().masked_fill(~live, -1.0)
        top = ranked.topk(min(keep, rows.shape[1]), dim=1).indices
        protected = torch.zeros_like(live).scatter_(1, top, True) & live
        # the drop ranks live weights by magnitude: an infinite one is never the smallest
        shielded = rows.masked_fill(protected, float("inf")).reshape(weight.shape)
        return original(shielded, mask, fraction, grow, **kwargs)

    secateurs.pruner.drop_and_grow = drop_and_grow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-per-unit", type=int, default=1)
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the bench's")
    args = parser.parse_args()
    if args.keep_per_unit < 1:
        parser.error(f"--keep-per-unit must be at least 1, got {args.keep_per_unit}")
    protect_units(args.keep_per_unit)
    rest = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    sys.argv = ["bench_sparse_training.py", *rest]
    bench_sparse_training.main()


if __name__ == "__main__":
    main()
