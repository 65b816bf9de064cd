"""The ``secateurs`` command line: demo, run, sensitivity, summary, inspect, report, methods,
bench.

The CLI owns the terminal (rich tables and progress bars); the library only reports through
callbacks. Every user error exits with status 2 and one line saying what was wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from secateurs.errors import SecateursError

#: Where a ``torchrun`` worker started by ``--nproc`` writes its error for the launcher.
ERROR_FILE_ENV = "SECATEURS_ERROR_FILE"

#: Piped or redirected output (CI logs, ``> file``) gets wide lines rather than rich's
#: 80-column default, so result tables keep every column; ``COLUMNS`` still overrides.
_PIPED_WIDTH = 200
console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console = Console(width=_PIPED_WIDTH)


def _axes() -> dict[str, Any]:
    from secateurs import ALLOCATIONS, BUDGETS, CRITERIA, SCHEDULES, SEARCHES, STRUCTURES

    return {
        "structure": STRUCTURES,
        "criterion": CRITERIA,
        "allocation": ALLOCATIONS,
        "allocation search": SEARCHES,
        "schedule": SCHEDULES,
        "budget": BUDGETS,
    }


def _doc_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def _options(cls: type) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def cmd_methods(args: argparse.Namespace) -> int:
    rows = [
        {
            "axis": axis,
            "name": name,
            "class": cls.__name__,
            "options": _options(cls),
            "summary": _doc_line(cls),
        }
        for axis, registry in _axes().items()
        for name, cls in registry.items()
    ]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for axis in _axes():
        table = Table(title=f"{axis}", title_justify="left", show_lines=False)
        table.add_column("name", style="bold cyan")
        table.add_column("options")
        table.add_column("what it is for")
        for row in rows:
            if row["axis"] == axis:
                opts = ", ".join(f"{k}={v!r}" for k, v in row["options"].items())
                table.add_row(row["name"], opts, row["summary"])
        console.print(table)
    return 0


@contextmanager
def _progress(out: Console | None = None) -> Iterator[Any]:
    from secateurs.runs import Progress as Callbacks

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out or console,
        transient=False,
    )
    state: dict[str, Any] = {"task": None}

    def phase(name: str, total: int) -> None:
        state["task"] = bar.add_task(name, total=total)

    def advance(done: int, total: int) -> None:
        if state["task"] is not None:
            bar.update(state["task"], completed=done, total=total)

    def message(text: str) -> None:
        bar.console.print(f"  {text}")

    with bar:
        yield Callbacks(phase=phase, advance=advance, message=message)


def _apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SecateursError(f"--set expects key.path=value; got {item!r}")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SecateursError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def _parse_recipe(
    text: str, source: str, args: argparse.Namespace, extra_sets: Sequence[str] = ()
) -> Any:
    """The recipe in ``text`` with the command line's ``--set`` (then ``extra_sets``) and
    ``--out`` applied."""
    from secateurs import recipe

    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise SecateursError(f"{source} must be a YAML mapping")
    raw = _apply_overrides(raw, [*(args.set or []), *extra_sets])
    if args.out:
        raw.setdefault("output", {})["dir"] = args.out
    return recipe.parse(raw, source=source)


def _recipe_file(path_text: str) -> tuple[str, str]:
    path = Path(path_text)
    if not path.is_file():
        raise SecateursError(f"recipe file {str(path)!r} does not exist")
    return path.read_text(), f"recipe file {str(path)!r}"


def _run_recipe_text(
    text: str, source: str, args: argparse.Namespace, extra_sets: Sequence[str] = ()
) -> int:
    """Run a recipe: here, as one rank of a ``torchrun`` group, or (``--nproc N``) by starting
    ``torchrun`` with N processes. Under ``torchrun`` only rank 0 prints."""
    from secateurs import distributed, pipeline

    if args.nproc is not None:
        return _launch(text, source, args, extra_sets)
    parsed = _parse_recipe(text, source, args, extra_sets)
    joined = distributed.under_torchrun()
    if args.backend is not None and not joined:
        raise SecateursError(
            f"--backend {args.backend} chooses the process group of --nproc N or torchrun; "
            "this run is one process (add --nproc N)"
        )
    if joined:
        distributed.init(args.backend or distributed.default_backend())
    try:
        main = distributed.rank() == 0
        out = console if main else Console(quiet=True)
        processes = distributed.world_size()
        if processes > 1:
            pipeline.check_parallel(parsed, processes)
        out.print(
            f"[bold]secateurs[/bold] running {parsed.name!r} -> {parsed.out_dir()}"
            + (f" on {processes} processes" if processes > 1 else "")
        )
        with _progress(out) as callbacks:
            result = pipeline.run(parsed, callbacks)
        if main:
            _print_headline(result.report.to_dict())
            for name, path in result.files.items():
                console.print(f"  {name}: {path}")
    finally:
        if joined:
            distributed.close()
    return 0


def _worker_argv(args: argparse.Namespace, backend: str) -> list[str]:
    """The command line of each ``torchrun`` worker: this one without ``--nproc``."""
    argv = [args.command, *([args.recipe] if args.command == "run" else [])]
    if getattr(args, "quick", False):
        argv.append("--quick")
    if args.out:
        argv += ["--out", args.out]
    for item in args.set or []:
        argv += ["--set", item]
    return [*argv, "--backend", backend]


def _launch(text: str, source: str, args: argparse.Namespace, extra_sets: Sequence[str]) -> int:
    """``--nproc N``: check everything that can be checked here (nothing is written when it
    fails), then run ``python -m torch.distributed.run --nproc-per-node N -m secateurs ...``.

    The workers' error output is kept aside: when a worker fails with a secateurs error, that
    error alone is reported (one line, exit 2), not torchrun's account of the failure.
    """
    import subprocess
    import tempfile

    from secateurs import distributed, pipeline

    n = args.nproc
    if distributed.under_torchrun():
        raise SecateursError("--nproc starts torchrun; a worker of torchrun must not pass it")
    if n < 1:
        raise SecateursError(f"--nproc = {n} is invalid; must be an integer >= 1 (processes)")
    backend = args.backend or distributed.default_backend()
    distributed.check_backend(backend, n)
    pipeline.check_parallel(_parse_recipe(text, source, args, extra_sets), n)
    argv = _worker_argv(args, backend)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(n), "-m", "secateurs", *argv]
    console.print(
        f"[bold]secateurs[/bold] torchrun --nproc-per-node {n} -m secateurs {' '.join(argv)}",
        highlight=False,
    )
    env = dict(os.environ)
    # one process per share of the cores (torchrun would give each a single thread)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    with tempfile.TemporaryDirectory() as tmp:
        error_file = Path(tmp) / "error"
        env[ERROR_FILE_ENV] = str(error_file)
        with (Path(tmp) / "stderr").open("w+") as log:
            code = subprocess.run(command, env=env, stderr=log, check=False).returncode
            log.seek(0)
            captured = log.read()
        if code and error_file.is_file():
            raise SecateursError(error_file.read_text().strip())
    sys.stderr.write(captured)
    return code


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def _print_headline(report: dict[str, Any]) -> None:
    """Dense against pruned, and what the run realised, in one table a person reads at once."""
    from secateurs.report.writer import headline_rows, realised_rows

    d, p = report["dense"], report["pruned"]
    table = Table(title=f"{report['title']}: {report['model']} on {report['dataset']}")
    for col in ("", "dense", "pruned", "change"):
        table.add_column(col, justify="right")
    if "perplexity" in d:
        table.add_row(
            "perplexity (held-out text)",
            f"{d['perplexity']:.2f}",
            f"{p['perplexity']:.2f}",
            f"{(p['perplexity'] / d['perplexity'] - 1) * 100:+.1f}%",
        )
        _print_lm_rows(table, report)
        console.print(table)
        return
    rows, _ = headline_rows(d, p)
    wanted = ("top-1 accuracy", "nonzero parameters")
    for row in rows:
        if row[0] in wanted:
            table.add_row(*row)
    saved, why_not = realised_rows(report.get("extra", {}))
    for row in saved:
        table.add_row(*row)
    console.print(table)
    for line in why_not:
        console.print(f"  [dim]{line}[/dim]")


def _print_lm_rows(table: Table, report: dict[str, Any]) -> None:
    """The rows of a language-model run after its perplexity: sizes, files, time, memory."""
    d, p, extra = report["dense"], report["pruned"], report.get("extra", {})
    table.add_row(
        "nonzero params",
        f"{d['nonzeros']:,}",
        f"{p['nonzeros']:,}",
        _ratio(d["nonzeros"], p["nonzeros"]),
    )
    reloaded = extra.get("perplexity_from_hf_directory")
    if reloaded is not None:
        table.add_row("perplexity from hf/ (transformers)", "", f"{reloaded:.2f}", "")
    for key, label in (
        ("packed_nm", "file bytes (packed N:M)"),
        ("compressed", "file bytes (.sct)"),
    ):
        found = extra.get("export", {}).get(key)
        if found:
            table.add_row(label, f"{d['bytes_dense']:,}", f"{found['file_bytes']:,}",
                          _ratio(d["bytes_dense"], found["file_bytes"]))  # fmt: skip
    seconds = extra.get("seconds", {})
    table.add_row("seconds to prune", "", f"{seconds.get('prune', 0):.1f}", "")
    table.add_row("peak memory (MB)", "", f"{extra.get('peak_rss_mb', 0):,.0f}", "")


def cmd_run(args: argparse.Namespace) -> int:
    return _run_recipe_text(*_recipe_file(args.recipe), args)


def _backend_spec(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--backend`` and ``--address`` as a backend spec (None: the command's default)."""
    if args.backend is None and args.address is None:
        return None
    spec: dict[str, Any] = {"name": args.backend or "local"}
    if args.address is not None:
        spec["address"] = args.address
    return spec


def _scan_on(parsed: Any, backend: dict[str, Any]) -> Any:
    """The recipe with its scanned section's sensitivity options running on ``backend``.

    ``pipeline.sensitivity`` scans the ``shrink`` section when it has a budget, else the
    ``prune`` section, with that section's allocation options when it is ``sensitivity``;
    the backend joins those options (the section is rebuilt, so it is validated again).
    """
    from secateurs.backends import backend_of

    backend_of(backend)  # a bad name or option fails here, before the dense model trains
    name = "shrink" if parsed.shrink.budget is not None else "prune"
    section = getattr(parsed, name)
    spec = section.allocation
    sensitivity = isinstance(spec, dict) and spec.get("name") == "sensitivity"
    options = {**(spec if sensitivity else {}), "name": "sensitivity", "backend": backend}
    return dataclasses.replace(parsed, **{name: dataclasses.replace(section, allocation=options)})


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from secateurs import pipeline

    parsed = _parse_recipe(*_recipe_file(args.recipe), args)
    backend = _backend_spec(args)
    if backend is not None:
        parsed = _scan_on(parsed, backend)
    console.print(f"[bold]secateurs[/bold] sensitivity of {parsed.name!r} -> {parsed.out_dir()}")
    with _progress() as callbacks:
        result = pipeline.sensitivity(parsed, callbacks, workers=args.workers)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    baseline = result["history"]["baseline"]
    table = Table(title=f"per-layer ratios for {result['budget']} ({result['space']})")
    for col in ("layer", "chosen ratio", "drop at chosen", "worst drop scanned"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for name, curve in result["history"]["curves"].items():
        chosen = result["ratios"][name]
        below = [s for r, s in curve if r <= chosen + 1e-12]
        table.add_row(
            name,
            f"{chosen:.3f}",
            f"{baseline - min(below):+.4f}",
            f"{baseline - min(s for _, s in curve):+.4f}",
        )
    console.print(table)
    console.print(
        f"  {result['value']:,.4g} {result['unit']} (allowed {result['limit']:,.4g}); score "
        f"{result['score']:.4f} with every layer pruned, unpruned {baseline:.4f}; "
        f"{result['evaluations']} evaluations in {result['seconds']:.1f} s"
    )
    out = parsed.out_dir()
    console.print(f"  curves: {out / 'sensitivity.json'}, plot: {out / 'sensitivity.png'}")
    return 0


#: What ``secateurs demo --quick`` sets in the demo recipe.
QUICK_DEMO = (
    "data.limit_train=6000",
    "data.limit_test=2000",
    "train.epochs=2",
    "finetune.epochs=2",
    "prune.schedule={name: gradual, start: 0, end: 1, every: 0.25}",
)


def cmd_demo(args: argparse.Namespace) -> int:
    text = resources.files("secateurs").joinpath("recipes/demo.yaml").read_text()
    return _run_recipe_text(text, "the demo recipe", args, QUICK_DEMO if args.quick else ())


def cmd_summary(args: argparse.Namespace) -> int:
    import torch

    from secateurs.metrics import summary
    from secateurs.pipeline import load_model_from_checkpoint

    model, meta = load_model_from_checkpoint(args.checkpoint)
    example = torch.zeros(1, *meta.get("input_shape", [1, 28, 28]))
    result = summary(model, example)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        console.print(
            f"[bold]{args.checkpoint}[/bold]: {meta['model']} ({meta.get('dataset', '?')})"
        )
        print(result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild a run's report.html (and report.md, plots) from its report.json."""
    from secateurs.report import rebuild_report

    paths = rebuild_report(args.run_dir)
    console.print(f"  report: {paths['html']}")
    if args.open:
        import webbrowser

        if not webbrowser.open(paths["html"].resolve().as_uri()):
            console.print("  [dim]no browser to open here; open the path above[/dim]")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from secateurs.compress import inspect_compressed

    info = inspect_compressed(args.file)
    d = info.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    table = Table(
        title=f"{args.file}: {d['file_bytes']:,} bytes, {d['ratio']:.1f}x smaller than "
        f"{d['dense_bytes']:,} dense bytes (format v{d['version']})",
        title_justify="left",
    )
    columns = ("tensor", "shape", "encoding", "bits", "nonzeros", "bytes", "bits/nz", "ratio")
    for col in columns:
        table.add_column(
            col, justify="left" if col in ("tensor", "encoding") else "right", overflow="fold"
        )
    for t in d["tensors"]:
        how = t["encoding"] if t["encoding"] == "raw" else f"{t['encoding']} {t['layout']}"
        bits = "/".join(str(b) for b in (t["bits"], t["index_bits"]) if b) or "-"
        per_nonzero = t["bits_per_nonzero"]
        table.add_row(
            t["name"],
            "x".join(map(str, t["shape"])),
            how,
            bits,
            f"{t['nonzeros']:,}",
            f"{t['bytes']:,}",
            f"{per_nonzero:.1f}" if per_nonzero else "-",
            f"{t['ratio']:.1f}x" if t["ratio"] else "-",
        )
    console.print(table)
    console.print(
        f"  header {d['header_bytes']:,} bytes; {d['nonzeros']:,} of {d['params']:,} values "
        "nonzero; bits = code bits / gap bits; bits/nz = stored bits per nonzero value"
    )
    return 0


def _bench_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Mean +- standard deviation over seeds of each (model, dataset, method, budget)."""

    def pm(mean: float | None, sd: float | None, scale: float = 1.0, fmt: str = ".2f") -> str:
        if mean is None:
            return "-"
        text = f"{mean * scale:{fmt}}"
        return text if sd is None else f"{text} ± {sd * scale:{fmt}}"

    table = Table(title=title, title_justify="left")
    for col in ("model", "method", "budget", "seeds", "top-1 %", "drop pt", "robust drop pt"):
        table.add_column(col, justify="left" if col in ("model", "method", "budget") else "right")
    for col in ("compression", "file bytes", "latency ms"):
        table.add_column(col, justify="right")
    for r in rows:
        seeds = str(r["n"]) + (f" ({r['failed']} failed)" if r["failed"] else "")
        table.add_row(
            r["model"],
            r["method"],
            r["budget_label"],
            seeds,
            pm(r["accuracy"], r["accuracy_sd"], 100),
            pm(r["accuracy_drop"], r["accuracy_drop_sd"], 100),
            pm(r["robustness_drop"], r["robustness_drop_sd"], 100),
            pm(r["compression"], None, 1, ".1f") + ("x" if r["compression"] else ""),
            pm(r["file_bytes"], None, 1, ",.0f"),
            pm(r["latency_ms"], r["latency_ms_sd"], 1, ".3f"),
        )
    return table


def cmd_bench(args: argparse.Namespace) -> int:
    from secateurs.backends import backend_of
    from secateurs.bench import load_grid

    grid = load_grid(args.grid)
    backend = None
    if args.backend is not None or args.address is not None or args.workers is not None:
        threads = args.threads if args.threads is not None else grid.threads
        backend = backend_of(_backend_spec(args), args.workers, threads)
    with backend.session() if backend else contextlib.nullcontext():  # fails before any output
        return _bench(args, grid, backend)


def _bench(args: argparse.Namespace, grid: Any, backend: Any) -> int:
    """``secateurs bench`` once the grid is loaded and the backend is up."""
    from secateurs.bench import aggregate, read_records, run_grid

    out = Path(args.out) if args.out else Path("runs") / "bench" / f"{grid.name}.jsonl"
    n_points = len(grid.all_points())
    console.print(
        f"[bold]secateurs bench[/bold] {grid.name!r}: {n_points} runs "
        f"({len(grid.models)} models x {len(grid.datasets)} data sets x {len(grid.seeds)} seeds, "
        f"dense + {sum(len(m.budgets) for m in grid.methods)} method points) -> {out}"
    )

    def on_record(record: dict[str, Any]) -> None:
        finished[0] += 1
        callbacks.advance(finished[0], finished[1])
        if record["status"] == "ok":
            console.print(
                f"  [green]ok[/green] {record['key']}: top-1 {record['accuracy']:.2%}, "
                f"{record['compression']:.1f}x, prune {record['prune_seconds']:.1f} s, "
                f"fine-tune {record['finetune_seconds']:.1f} s",
                highlight=False,
            )
        else:
            last = (record["error"] or "").strip().splitlines()[-1:]
            console.print(
                f"  [red]failed[/red] {record['key']}: {last[0] if last else ''}", highlight=False
            )

    def on_message(text: str) -> None:
        if not text.startswith("  "):
            console.print(f"[bold]{text}[/bold]", highlight=False)

    def on_start(total: int) -> None:
        finished[1] = total
        callbacks.phase(f"{grid.name} on {type(backend).__name__ if backend else 'local'}", total)

    finished = [0, 0]  # runs finished, runs to do (every worker's)
    with _progress() as callbacks:
        result = run_grid(
            grid,
            out,
            cache_dir=args.cache_dir,
            threads=args.threads,
            backend=backend,
            on_start=on_start,
            on_record=on_record,
            on_message=on_message,
        )
    if result.skipped:
        console.print(f"  skipped {len(result.skipped)} run(s) already in {out}")
    records = read_records(out)
    console.print(_bench_table(aggregate(records), f"{grid.name}: mean ± sd over seeds"))
    if result.failed:
        console.print(f"  [red]{len(result.failed)} run(s) failed[/red]; tracebacks in {out}")
    if args.report:
        from secateurs.report.bench_html import write_bench_report

        written = write_bench_report(records, Path(args.report))
        console.print(f"  report: {written or args.report}")
    return 0


def _parallel_options(p: argparse.ArgumentParser) -> None:
    """``--nproc`` and ``--backend``: data-parallel runs (``torchrun``) of a recipe."""
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train, prune and fine-tune on N data-parallel processes (starts torchrun); "
        "data.batch_size is the global batch, split among them",
    )
    p.add_argument(
        "--backend",
        metavar="NAME",
        help="process group with --nproc or under torchrun: gloo (CPUs) or nccl (one GPU per "
        "process); default nccl when this machine has a GPU, else gloo",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secateurs",
        description="Prune PyTorch models and prove what it buys: accuracy, bytes, MACs, latency.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo", help="LeNet-5 on Fashion-MNIST: train, prune to 95%%, fine-tune, report"
    )
    p.add_argument("--out", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a small subset and few epochs (~30 s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    _parallel_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a YAML recipe end to end")
    p.add_argument("recipe", help="path to the recipe (see recipes/)")
    p.add_argument("--out", help="output directory (overrides output.dir)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. prune.sparsity=0.9",
    )
    _parallel_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sensitivity",
        help="scan each layer of a recipe's dense model alone, plot the curves, pick ratios",
    )
    p.add_argument("recipe", help="path to the recipe; its shrink or prune budget is used")
    p.add_argument("--out", help="output directory (overrides output.dir)")
    p.add_argument("--workers", type=int, help="evaluations at once (default 1)")
    p.add_argument(
        "--backend",
        help="where the evaluations run: local, fork or ray (default: local for one worker, "
        "fork for more)",
    )
    p.add_argument(
        "--address", help="with --backend ray: a running Ray cluster (default: start one here)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser(
        "summary", help="per-layer params, nonzeros, density and MACs of a checkpoint"
    )
    p.add_argument("checkpoint", help="a model.safetensors written by 'secateurs run'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "inspect", help="per-tensor bytes, bits per weight and ratio of a compressed .sct file"
    )
    p.add_argument("file", help="a .sct file written by save_compressed or a recipe's export")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "bench",
        help="run a benchmark grid (models x data sets x methods x budgets x seeds) from YAML",
    )
    p.add_argument("grid", help="path to the grid YAML (see benchmarks/grids/)")
    p.add_argument("--out", help="results JSON Lines file (default runs/bench/<grid name>.jsonl)")
    p.add_argument("--report", metavar="DIR", help="also write the HTML report to DIR")
    p.add_argument("--cache-dir", help="dense model cache (default <out folder>/cache/bench)")
    p.add_argument("--threads", type=int, help="torch CPU threads for the whole grid")
    p.add_argument(
        "--backend", help="where the runs go: local (default, one after another), fork or ray"
    )
    p.add_argument(
        "--address", help="with --backend ray: a running Ray cluster (default: start one here)"
    )
    p.add_argument(
        "--workers", type=int, help="with fork or ray: the most runs at once (default: every CPU)"
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="rebuild a run's report.html from its report.json")
    p.add_argument("run_dir", help="a directory written by 'secateurs run' or 'demo'")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("methods", help="the registered methods, axis by axis, with recipe names")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SecateursError as exc:
        _note_error(str(exc))
        if int(os.environ.get("RANK", "0")) == 0:  # a torchrun worker other than rank 0 is quiet
            Console(file=sys.stderr).print(
                f"[bold red]secateurs: error:[/bold red] {exc}", highlight=False, soft_wrap=True
            )
        return 2


def _note_error(message: str) -> None:
    """In a worker started by ``--nproc``, leave the first error for the launcher to report."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with contextlib.suppress(FileExistsError), open(path, "x") as f:
            f.write(message)


if __name__ == "__main__":
    sys.exit(main())
