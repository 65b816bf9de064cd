"""Render the README's benchmark tables (Markdown) from the JSON in benchmarks/results/.

python benchmarks/tables.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def finegrained() -> str:
    rows = []
    for path in sorted(RESULTS.glob("finegrained_*.json")):
        if path.name != "finegrained_defaults.json":  # its own dense models: its own table
            rows += json.loads(path.read_text())["rows"]
    if not rows:
        return ""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "| model | dense | sparsity | " + " | ".join(methods) + " | gradual − torch.prune |",
        "|---|---:|---:|" + "---:|" * (len(methods) + 1),
    ]
    keys = list(dict.fromkeys((r["model"], r["sparsity"]) for r in rows))
    for model, sparsity in keys:
        cell = {r["method"]: r for r in rows if r["model"] == model and r["sparsity"] == sparsity}
        dense = next(iter(cell.values()))["dense_accuracy"]
        accs = [f"{cell[m]['accuracy']:.2%}" if m in cell else "–" for m in methods]
        gap = "–"
        if "secateurs gradual" in cell and "torch.prune one-shot" in cell:
            gap = f"{(cell['secateurs gradual']['accuracy'] - cell['torch.prune one-shot']['accuracy']) * 100:+.2f} pt"
        lines.append(
            f"| {model} | {dense:.2%} | {sparsity:.0%} | " + " | ".join(accs) + f" | {gap} |"
        )
    return "\n".join(lines)


def finegrained_defaults() -> str:
    """The README's loop as a user writes it: at the training rate, a tenth of it, with LAMP."""
    path = RESULTS / "finegrained_defaults.json"
    if not path.is_file():
        return ""
    rows = json.loads(path.read_text())["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "| model | dense | sparsity | " + " | ".join(methods) + " |",
        "|---|---:|---:|" + "---:|" * len(methods),
    ]
    for model, sparsity in dict.fromkeys((r["model"], r["sparsity"]) for r in rows):
        cell = {r["method"]: r for r in rows if r["model"] == model and r["sparsity"] == sparsity}
        dense = next(iter(cell.values()))["dense_accuracy"]
        accs = [f"{cell[m]['accuracy']:.2%}" if m in cell else "–" for m in methods]
        lines.append(f"| {model} | {dense:.2%} | {sparsity:.0%} | " + " | ".join(accs) + " |")
    return "\n".join(lines)


def global_masks() -> str:
    path = RESULTS / "global_masks.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    lines = [
        "| method | weights | time (s, median) | peak extra memory (MB) | × the weights' bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['method']} | {r['params']:,} | {r['seconds_median']:.2f} | "
            f"{r['peak_extra_mb_median']:,.0f} | {r['peak_extra_mb_median'] / r['weight_mb']:.2f} |"
        )
    s = data["summary"]
    lines.append("")
    lines.append(
        f"secateurs is {s['speedup_vs_torch_prune']:.1f}x faster (median of {data['repeats']} runs each)."
    )
    return "\n".join(lines)


def deep_compression() -> str:
    """One row per model and setting: accuracy before/after, file bytes, ratio."""
    rows = []
    for path in sorted(RESULTS.glob("deep_compression*.json")):
        data = json.loads(path.read_text())
        rows += [{**r, "centroid_epochs": data["args"]["centroid_epochs"]} for r in data["rows"]]
    if not rows:
        return ""
    lines = [
        "| model | nonzero values | bits conv/fc | centroid epochs | dense | pruned "
        "| from the .sct file | change | dense file (B) | .sct file (B) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows.sort(key=lambda r: (r["model"], -r["ratio"]))
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['nonzeros'] / r['params']:.1%} | {r['bits']['conv']}/{r['bits']['fc']} "
            f"| {r['centroid_epochs']} "
            f"| {r['dense_accuracy']:.2%} | {r['pruned_accuracy']:.2%} | {r['accuracy_from_file']:.2%} "
            f"| {r['accuracy_change_pt']:+.2f} pt | {r['dense_file_bytes']:,} | {r['file_bytes']:,} "
            f"| **{r['ratio']:.1f}x** |"
        )
    return "\n".join(lines)


def sparse_inference() -> str:
    """CSR speedup over dense by layer size, sparsity and batch."""
    path = RESULTS / "sparse_inference.json"
    if not path.is_file():
        return ""
    rows = json.loads(path.read_text())["rows"]
    batches = sorted({r["batch"] for r in rows})
    lines = [
        "| layer (in x out) | sparsity | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|---:|" + "---:|" * len(batches),
    ]
    at = {(r["size"], r["sparsity"], r["batch"]): r for r in rows}
    for size in dict.fromkeys(r["size"] for r in rows):
        for sparsity in (0.5, 0.8, 0.9, 0.95, 0.99):
            cells = [
                f"{at[size, sparsity, b]['speedup']['csr']:.2f}x"
                if (size, sparsity, b) in at
                else "–"
                for b in batches
            ]
            lines.append(f"| {size} | {sparsity:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shrink_accuracy() -> str:
    """Structural pruning at equal MACs: accuracy after the same fine-tuning, mean ± sd."""
    rows = []
    for path in sorted(RESULTS.glob("shrink_accuracy*.json")):  # one file per seed, or one
        rows += json.loads(path.read_text())["rows"]
    if not rows:
        return ""
    lines = [
        "| method | accuracy after fine-tuning | before fine-tuning | MACs kept | params kept | seconds to prune |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    seeds = sorted({r["seed"] for r in rows})
    dense = [r["dense_accuracy"] for r in rows if r["method"] == rows[0]["method"]]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        acc = [r["accuracy"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(
            f"| {method} | {statistics.mean(acc):.2%} ± {sd:.2%} "
            f"| {statistics.mean(r['accuracy_before_finetune'] for r in rs):.2%} "
            f"| {statistics.mean(r['macs'] / r['dense_macs'] for r in rs):.3f} "
            f"| {statistics.mean(r['params'] / r['dense_params'] for r in rs):.3f} "
            f"| {statistics.mean(r['prune_seconds'] for r in rs):.2f} |"
        )
    sd = statistics.stdev(dense) if len(dense) > 1 else 0.0
    lines.append(
        f"| dense ({len(seeds)} seeds) | {statistics.mean(dense):.2%} ± {sd:.2%} | | 1 | 1 | |"
    )
    return "\n".join(lines)


def shrink_speed() -> str:
    """Structural pruning on random-weight models: time to prune and measured speedups."""
    by_model: dict[str, dict] = {}
    for name in ("shrink_speed.json", "shrink_speed_rerun.json"):  # a rerun replaces a model
        path = RESULTS / name
        if path.is_file():
            by_model.update({r["model"]: r for r in json.loads(path.read_text())["rows"]})
    rows = list(by_model.values())
    if not rows:
        return ""
    lines = [
        "| model | MACs kept | graph (s) | shrink (s) | Torch-Pruning graph + prune (s) | batch 1 speedup | large-batch speedup | of the physical limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tp = r["torch_pruning_seconds"]
        lines.append(
            f"| {r['model']} | {r['macs'] / r['dense_macs']:.3f} | {r['graph_seconds']:.2f} "
            f"| {r['shrink_seconds']:.2f} | {'failed' if tp is None else f'{tp:.2f}'} "
            f"| {r['speedup_batch1']:.2f}x | {r['speedup_large_batch']:.2f}x (batch {r['large_batch']}) "
            f"| {r['limit_fraction_large_batch']:.2f} |"
        )
    return "\n".join(lines)


def allocation() -> str:
    """Automatic per-layer ratios against uniform/global at one budget, same fine-tuning."""
    out = []
    for part, title in (("vgg", "VGG-BN, channels removed"), ("lenet5", "LeNet-5, masks")):
        rows = []
        for path in sorted(RESULTS.glob(f"allocation_{part}*.json")):
            if not path.stem.endswith("_quick"):
                rows += [r for r in json.loads(path.read_text())["rows"] if "accuracy" in r]
        if not rows:
            continue
        quiet = RESULTS / f"allocation_{part}_latency.json"
        remeasured = (
            {
                (r["method"], r["seed"]): r["latency_ms"]
                for r in json.loads(quiet.read_text())["rows"]
            }
            if quiet.is_file()
            else {}
        )
        if remeasured:  # timed again on a quiet machine, interleaved (bench --part latency)
            for r in rows:
                r["latency_ms"] = remeasured.get((r["method"], r["seed"]), r["latency_ms"])
                r["dense_latency_ms"] = remeasured.get(("dense", r["seed"]), r["dense_latency_ms"])
        seeds = sorted({r["seed"] for r in rows})
        dense = [next(r["dense_accuracy"] for r in rows if r["seed"] == s) for s in seeds]
        base = {r["seed"]: r["accuracy"] for r in rows if r["method"] == "uniform"}
        out += [
            f"{title}, {rows[0]['budget']}, {len(seeds)} seed(s); dense "
            f"{statistics.mean(dense):.2%}",
            "",
            "| allocation | accuracy after fine-tuning | vs uniform | before fine-tuning "
            "| MACs kept | nonzeros kept | latency (ms, batch 64) | search (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == method]
            acc = [r["accuracy"] for r in rs]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            diffs = [r["accuracy"] - base[r["seed"]] for r in rs if r["seed"] in base]
            vs = f"{statistics.mean(diffs) * 100:+.2f} pt" if diffs else ""
            out.append(
                f"| {method} | {statistics.mean(acc):.2%} ± {sd:.2%} | {vs} "
                f"| {statistics.mean(r['accuracy_before_finetune'] for r in rs):.2%} "
                f"| {statistics.mean(r['macs'] / r['dense_macs'] for r in rs):.3f} "
                f"| {statistics.mean(r['nonzeros'] / r['dense_nonzeros'] for r in rs):.3f} "
                + (
                    f"| {statistics.mean(r['latency_ms'] for r in rs):.1f} "
                    f"(dense {statistics.mean(r['dense_latency_ms'] for r in rs):.1f}) "
                    if part == "vgg"
                    else "| dense kernels: unchanged "  # masks; in-run timings were load noise
                )
                + f"| {statistics.mean(r['search_seconds'] for r in rs):.1f} |"
            )
        out.append("")
    path = RESULTS / "allocation_timing.json"
    if path.is_file():
        out += [
            "| sensitivity scan of LeNet-5 | workers | evaluations | seconds |",
            "|---|---:|---:|---:|",
        ]
        for r in json.loads(path.read_text())["rows"]:
            out.append(
                f"| {r['space']} | {r['workers']} | {r['evaluations']} | {r['seconds']:.1f} |"
            )
    return "\n".join(out).rstrip()


if __name__ == "__main__":
    print(shrink_accuracy())
    print()
    print(shrink_speed())
    print()
    print(finegrained())
    print()
    print(finegrained_defaults())
    print()
    print(global_masks())
    print()
    print(deep_compression())
    print()
    print(sparse_inference())
    print()
    print(allocation())
