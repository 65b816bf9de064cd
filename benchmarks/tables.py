"""Render the README's benchmark tables (Markdown) from the JSON in benchmarks/results/.

python benchmarks/tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def finegrained() -> str:
    rows = []
    for path in sorted(RESULTS.glob("finegrained_*.json")):
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


if __name__ == "__main__":
    print(finegrained())
    print()
    print(global_masks())
    print()
    print(deep_compression())
    print()
    print(sparse_inference())
