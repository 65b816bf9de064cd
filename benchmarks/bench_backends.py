"""Where independent work runs: one process, a fork pool or Ray, on this machine.

Two parts:

* ``scan``: the sensitivity scan of LeNet-5 (10 ratios per layer, element masks and removed
  channels; the cached 10-epoch dense model of ``bench_finegrained.py``, 2,000 calibration
  images) run by ``local`` (this process), ``fork`` (2 forked workers) and ``ray`` (2 Ray
  workers). Ray is timed two ways: ``ray (warm)``, inside a Ray session that is already up with
  its workers started (a cluster one joins, or the second scan of a session), and
  ``ray (cold)``, which also starts a local Ray and stops it (what one ``secateurs
  sensitivity --backend ray`` pays). Each scan's ratio map and curves must equal the local
  ones. Medians over ``--repeats`` rounds (local and fork interleaved).
* ``grid``: the benchmark grid ``benchmarks/grids/fashion_lenets.yaml`` run locally and
  through Ray (``--set`` slices it, e.g. ``--set seeds=[0]``), each from an empty dense cache;
  wall time of each, and whether every record is the same once the fields that measure time
  or the machine are removed (``latency_ms``, ``timestamp``, ``versions`` and every key
  ending in ``seconds``, at any depth: ``prune_seconds``, the dense model's training
  seconds, a method's search seconds). ``--part compare`` redoes that comparison on the
  records the last ``grid`` part wrote.

    python benchmarks/bench_backends.py --part scan
    python benchmarks/bench_backends.py --part grid --set seeds=[0]
    python benchmarks/bench_backends.py --part compare

Prints a table per part and writes ``benchmarks/results/backends.json`` (a part run again
replaces its rows; the other part's stay). The load average of the machine is recorded
before and after each part: read the seconds of a loaded machine as relative.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

import secateurs as sc
from bench_finegrained import RESULTS, dense_model, machine
from secateurs.backends import RayBackend
from secateurs.bench import parse_grid, read_records, run_grid, without_timing
from secateurs.data import load_fashion_mnist

OUT = RESULTS / "backends.json"
GRID = Path(__file__).parent / "grids" / "fashion_lenets.yaml"


def load() -> tuple[float, float, float]:
    return os.getloadavg()


# ------------------------------------------------------------------------------------- scan


def scan_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds of the LeNet-5 sensitivity scan on each backend, and whether they agree."""
    bundle = load_fashion_mnist()
    dense = dense_model("lenet-5", 0, 10, bundle.loaders(128, seed=0)).eval()
    calib = list(DataLoader(bundle.calibration_split(args.calibration, seed=0), batch_size=500))
    example = torch.zeros(1, 1, 28, 28)
    ratios = [round(0.1 * i, 1) for i in range(10)]

    def scan(space: str, backend: Any) -> tuple[float, sc.SearchResult]:
        method = {"name": "sensitivity", "ratios": ratios, "backend": backend}
        start = time.perf_counter()
        found = sc.search_allocation(
            dense, example, sc.Sparsity(0.5), method, space=space, data=calib
        )
        return time.perf_counter() - start, found

    rows = []
    for space in ("elements", "channels"):
        before = load()
        seconds: dict[str, list[float]] = {}
        found: dict[str, sc.SearchResult] = {}
        for _ in range(args.repeats):  # interleaved: a busy moment slows both alike
            for name, backend in (("local", "local"), ("fork", {"name": "fork", "workers": 2})):
                t, found[name] = scan(space, backend)
                seconds.setdefault(name, []).append(t)
        for _ in range(args.cold_repeats):  # starts a local Ray and stops it
            t, found["ray (cold)"] = scan(space, RayBackend(workers=2))
            seconds.setdefault("ray (cold)", []).append(t)
        ray = RayBackend(workers=2)
        with ray.session():
            t, _ = scan(space, ray)  # the first scan starts the workers (imports torch)
            seconds["ray (first scan of a session)"] = [t]
            for _ in range(args.repeats):
                t, found["ray (warm)"] = scan(space, ray)
                seconds.setdefault("ray (warm)", []).append(t)
        local = found["local"]
        fork = statistics.median(seconds["fork"])
        for name, times in seconds.items():
            same = name not in found or (
                dict(found[name].ratios) == dict(local.ratios)
                and found[name].history == local.history
            )
            rows.append(
                {
                    "part": "scan",
                    "space": space,
                    "backend": name,
                    "workers": 1 if name == "local" else 2,
                    "evaluations": local.evaluations,
                    "seconds": statistics.median(times),
                    "all_seconds": times,
                    "vs_fork": statistics.median(times) / fork,
                    "same_result_as_local": same,
                    "load_before": before,
                    "load_after": load(),
                }
            )
    return rows


# ------------------------------------------------------------------------------------- grid


def _apply_sets(raw: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    for item in sets:
        key, _, value = item.partition("=")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def grid_records(name: str) -> dict[str, Any]:
    return {
        r["key"]: without_timing(r) for r in read_records(RESULTS / f"backends_grid_{name}.jsonl")
    }


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` of the grid part with the local and Ray records compared (timing aside)."""
    local, ray = grid_records("local"), grid_records("ray")
    differing = sorted(k for k in local if local[k] != ray.get(k))
    for row in rows:
        row["identical_records"] = local.keys() == ray.keys() and not differing
        row["differing_keys"] = differing
        row["compared_records"] = len(local)
    return rows


def compare_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The grid part's rows, compared again from the records it wrote."""
    rows = [r for r in json.loads(OUT.read_text())["rows"] if r["part"] == "grid"]
    if not rows:
        raise SystemExit("no grid part in backends.json: run --part grid first")
    return compare(rows)


def grid_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The grid locally and through Ray, each from an empty dense cache."""
    raw = _apply_sets(yaml.safe_load(GRID.read_text()), args.set)
    grid = parse_grid(raw)
    rows = []
    for name in ("local", "ray"):
        out = RESULTS / f"backends_grid_{name}.jsonl"
        cache = RESULTS / "cache" / f"backends_{name}"
        out.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        before = load()
        start = time.perf_counter()
        result = run_grid(
            grid,
            out,
            cache_dir=cache,
            threads=1,
            backend=None if name == "local" else RayBackend(threads=1),
            on_record=lambda r: print(f"  {r['key']}: {r['status']}", flush=True),
        )
        seconds = time.perf_counter() - start
        rows.append(
            {
                "part": "grid",
                "backend": name,
                "runs": len(read_records(out)),
                "failed": len(result.failed),
                "seconds": seconds,
                "slice": args.set,
                "load_before": before,
                "load_after": load(),
            }
        )
        print(f"{name}: {rows[-1]['runs']} runs in {seconds:.0f} s", flush=True)
    return compare(rows)


# ------------------------------------------------------------------------------------ table


def print_table(rows: list[dict[str, Any]]) -> None:
    scan = [r for r in rows if r["part"] == "scan"]
    if scan:
        print("\nsensitivity scan of LeNet-5, 10 ratios")
        print(f"{'space':<9} {'backend':<30} {'evals':>5} {'seconds':>8} {'vs fork':>8} same")
        for r in scan:
            print(
                f"{r['space']:<9} {r['backend']:<30} {r['evaluations']:>5} {r['seconds']:>8.2f} "
                f"{r['vs_fork']:>7.2f}x {'yes' if r['same_result_as_local'] else 'NO'}"
            )
    grid = [r for r in rows if r["part"] == "grid"]
    if grid:
        print(f"\ngrid {GRID.name} {' '.join(grid[0]['slice']) or '(whole)'}")
        print(f"{'backend':<8} {'runs':>5} {'failed':>6} {'seconds':>8} identical records")
        for r in grid:
            print(
                f"{r['backend']:<8} {r['runs']:>5} {r['failed']:>6} {r['seconds']:>8.0f} "
                f"{'yes' if r['identical_records'] else 'NO: ' + ', '.join(r['differing_keys'])}"
            )
    loads = [(r["load_before"], r["load_after"]) for r in rows]
    print(f"\nload average (1, 5, 15 min) before/after: {loads[0][0]} / {loads[-1][1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["scan", "grid", "compare"], required=True)
    parser.add_argument("--repeats", type=int, default=3, help="timed scans per backend")
    parser.add_argument("--cold-repeats", type=int, default=2, help="scans that start Ray")
    parser.add_argument("--calibration", type=int, default=2000, help="calibration images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="slice the grid"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {"scan": scan_part, "grid": grid_part, "compare": compare_part}[args.part](args)
    part = "grid" if args.part == "compare" else args.part
    previous = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": [], "args": {}}
    kept = [r for r in previous["rows"] if r["part"] != part]
    recorded = dict(previous.get("args", {}))
    if args.part != "compare":
        recorded[part] = vars(args)
    payload = {
        "rows": kept + rows,
        "args": recorded,
        "versions": {"torch": torch.__version__, "secateurs": sc.__version__},
        "cpus": os.cpu_count(),
        "machine": machine(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(payload, indent=2))
    print_table(rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
