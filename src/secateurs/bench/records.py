"""The JSON Lines record of one benchmark run, shared by the harness and the report.

One line per run (a dense reference or a pruned point) in ``results.jsonl``. The contract is
fixed: every key of :data:`RECORD_KEYS` is present in every record (a value that was not
measured is ``null``, never missing; NaN is written as ``null``), ``schema`` is
:data:`SCHEMA`, and a results file is only resumed by the secateurs version that wrote it, so
one file never mixes numbers from two versions of the code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from secateurs.errors import DataError

#: The schema tag of every record; the report and resume refuse any other.
SCHEMA = "secateurs.bench/1"

#: Every key of a record, in the order they are written.
RECORD_KEYS: tuple[str, ...] = (
    "schema",
    "secateurs_version",
    "grid",
    "key",
    "model",
    "dataset",
    "method",
    "budget",
    "budget_label",
    "seed",
    "status",
    "error",
    "accuracy",
    "loss",
    "per_class_accuracy",
    "class_names",
    "params",
    "nonzeros",
    "compression",
    "file_bytes",
    "macs_dense",
    "macs_effective",
    "latency_ms",
    "latency_batch",
    "layer_density",
    "robustness",
    "prune_seconds",
    "finetune_seconds",
    "config",
    "versions",
    "timestamp",
)

#: Status values: a run that finished, and one that raised (its traceback is in ``error``).
STATUSES = ("ok", "failed")

#: The method name of the dense reference record of each (model, dataset, seed).
DENSE = "dense"

# Keys whose value must have this type whenever it is not null; bool is excluded from numbers.
_TYPES: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "secateurs_version": (str,),
    "grid": (str,),
    "key": (str,),
    "model": (str,),
    "dataset": (str,),
    "method": (str,),
    "budget": (dict,),
    "budget_label": (str,),
    "seed": (int,),
    "status": (str,),
    "error": (str,),
    "accuracy": (int, float),
    "loss": (int, float),
    "per_class_accuracy": (list,),
    "class_names": (list,),
    "params": (int,),
    "nonzeros": (int,),
    "compression": (int, float),
    "file_bytes": (int,),
    "macs_dense": (int,),
    "macs_effective": (int,),
    "latency_ms": (int, float),
    "latency_batch": (int,),
    "layer_density": (dict,),
    "robustness": (dict,),
    "prune_seconds": (int, float),
    "finetune_seconds": (int, float),
    "config": (dict,),
    "versions": (dict,),
    "timestamp": (str,),
}
# Keys that identify a run: never null, whatever its status.
_REQUIRED: tuple[str, ...] = (
    *("schema", "secateurs_version", "grid", "key", "model", "dataset", "method"),
    *("budget_label", "seed", "status", "config", "versions", "timestamp"),
)


def make_key(model: str, dataset: str, method: str, budget_label: str, seed: int) -> str:
    """The unique id of a run: ``"model|dataset|method|budget_label|seed"``."""
    return f"{model}|{dataset}|{method}|{budget_label}|{seed}"


def budget_label(budget: Mapping[str, Any] | None) -> str:
    """``"sparsity=0.9"`` for ``{"kind": "sparsity", "value": 0.9}``; ``"dense"`` for None."""
    if budget is None:
        return DENSE
    return f"{budget['kind']}={budget['value']:g}"


def clean(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


#: Record fields that measure time or the machine rather than the result (with, at any depth,
#: every key ending in ``seconds``: prune, fine-tune, dense training, search).
TIMING_FIELDS = frozenset({"latency_ms", "timestamp", "versions"})


def without_timing(value: Any) -> Any:
    """``value`` (a record, or any JSON value) without the fields that measure time or the
    machine, at any depth: what must be equal when the same grid runs on another backend."""
    if isinstance(value, Mapping):
        return {
            k: without_timing(v)
            for k, v in value.items()
            if k not in TIMING_FIELDS and not str(k).endswith("seconds")
        }
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def validate_record(record: Mapping[str, Any], where: str = "record") -> None:
    """Raise :class:`DataError` naming the first key that breaks the contract.

    Checks that every key is present (and no other), the schema tag, the types of the values
    that are not null, the status, and, for a run that finished, that accuracy is in [0, 1].
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: a record must be a JSON object; got {type(record).__name__}")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
    extra = [k for k in record if k not in RECORD_KEYS]
    if extra:
        raise DataError(
            f"{where}: unknown key(s) {', '.join(map(str, extra))}; allowed: {', '.join(RECORD_KEYS)}"
        )
    if record["schema"] != SCHEMA:
        raise DataError(
            f"{where}: schema {record['schema']!r} is not {SCHEMA!r}; this file was written by "
            "another version of the benchmark harness"
        )
    for key, types in _TYPES.items():
        value = record[key]
        if value is None:
            if key in _REQUIRED:
                raise DataError(f"{where}: {key!r} must not be null")
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            allowed = " or ".join(t.__name__ for t in types)
            raise DataError(f"{where}: {key!r} = {value!r} must be {allowed} or null")
    if record["status"] not in STATUSES:
        raise DataError(
            f"{where}: status {record['status']!r} is invalid; allowed: {', '.join(STATUSES)}"
        )
    budget = record["budget"]
    if budget is not None and not (
        isinstance(budget.get("kind"), str)
        and isinstance(budget.get("value"), (int, float))
        and not isinstance(budget.get("value"), bool)
    ):
        raise DataError(f"{where}: budget {budget!r} must be {{'kind': str, 'value': number}}")
    accuracy = record["accuracy"]
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        raise DataError(f"{where}: accuracy {accuracy!r} is outside [0, 1]")
    if record["status"] == "failed" and not record["error"]:
        raise DataError(f"{where}: a failed record needs its traceback in 'error'")


def new_record(**values: Any) -> dict[str, Any]:
    """A record with every key of the contract, null where ``values`` does not say."""
    unknown = [k for k in values if k not in RECORD_KEYS]
    if unknown:
        raise DataError(f"unknown record key(s) {', '.join(unknown)}")
    record: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
    record["schema"] = SCHEMA
    record.update(values)
    return record


def append_record(path: str | os.PathLike[str], record: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``record`` and append it as one line to ``path``; returns what was written.

    NaN becomes null. The line is written with one ``write`` and flushed to disk, so an
    interrupted grid loses at most the run in progress, never a finished one.
    """
    cleaned = clean(dict(record))
    ordered = {k: cleaned[k] for k in RECORD_KEYS if k in cleaned}
    ordered.update({k: v for k, v in cleaned.items() if k not in ordered})
    validate_record(ordered)
    line = json.dumps(ordered, allow_nan=False, separators=(",", ":")) + "\n"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return ordered


def _parse_lines(text: str, source: str, partial_tail: bool) -> tuple[list[dict[str, Any]], int]:
    """Records of ``text`` and the byte length of its complete lines."""
    records: list[dict[str, Any]] = []
    good = 0
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if last and line == "":
            break
        if not line.strip():
            good += len(line.encode()) + 1
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if last and partial_tail:
                break  # a line cut off by an interrupted write: the run did not finish
            raise DataError(
                f"{source}, line {number}: not a JSON record ({exc.msg}); the file is corrupt"
            ) from None
        validate_record(value, where=f"{source}, line {number}")
        records.append(value)
        good += len(line.encode()) + (0 if last else 1)
    return records, good


def read_records(
    path: str | os.PathLike[str], *, allow_partial_tail: bool = False
) -> list[dict[str, Any]]:
    """Every record of the JSON Lines file at ``path``, each checked against the contract.

    Raises :class:`DataError` naming the file and line of the first bad record (a record of
    another schema included). ``allow_partial_tail`` ignores a last line cut off mid-write
    (what an interrupted run leaves); resume uses it.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"results file {str(p)!r} does not exist")
    records, _ = _parse_lines(
        p.read_text(encoding="utf-8"), f"results file {str(p)!r}", allow_partial_tail
    )
    return records


def drop_partial_tail(path: str | os.PathLike[str]) -> None:
    """Cut a last line left incomplete by an interrupted write, so appends start clean."""
    p = Path(path)
    data = p.read_bytes()
    _, good = _parse_lines(data.decode("utf-8", errors="replace"), str(p), True)
    if good < len(data):
        with p.open("r+b") as f:
            f.truncate(good)


def check_version(records: Iterable[Mapping[str, Any]], version: str, source: str) -> None:
    """Raise :class:`DataError` if any record was written by another secateurs version."""
    others = sorted({str(r["secateurs_version"]) for r in records} - {version})
    if others:
        raise DataError(
            f"{source} holds results of secateurs {', '.join(others)}, not of this version "
            f"({version}); numbers from two versions must not be mixed. Write to a new file "
            "with --out, or move the old one away."
        )


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


#: Numeric fields :func:`aggregate` summarises, besides the drops against dense.
AGGREGATED = (
    "accuracy",
    "compression",
    "file_bytes",
    "macs_effective",
    "macs_dense",
    "latency_ms",
    "prune_seconds",
    "finetune_seconds",
)


def aggregate(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of each (model, dataset, method, budget).

    Only finished records count. Besides :data:`AGGREGATED` fields, each row has
    ``accuracy_drop`` (dense minus pruned accuracy, paired by seed), ``robustness_drop``
    (the same for the mean accuracy over every corruption and severity), the number of seeds
    ``n`` and of failed runs ``failed``. Rows keep the records' order of first appearance.
    """
    records = list(records)
    dense = {
        (r["model"], r["dataset"], r["seed"]): r
        for r in records
        if r["method"] == DENSE and r["status"] == "ok"
    }
    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    failed: dict[tuple[str, str, str, str], int] = {}
    for r in records:
        key = (r["model"], r["dataset"], r["method"], r["budget_label"])
        groups.setdefault(key, [])
        if r["status"] == "ok":
            groups[key].append(r)
        else:
            failed[key] = failed.get(key, 0) + 1

    def robust_mean(r: Mapping[str, Any]) -> float | None:
        values = [
            a for sev in (r["robustness"] or {}).values() for a in sev.values() if a is not None
        ]
        return sum(values) / len(values) if values else None

    rows: list[dict[str, Any]] = []
    for (model, dataset, method, label), ok in groups.items():
        row: dict[str, Any] = {
            "model": model,
            "dataset": dataset,
            "method": method,
            "budget_label": label,
            "budget": ok[0]["budget"] if ok else None,
            "n": len(ok),
            "failed": failed.get((model, dataset, method, label), 0),
        }
        for name in AGGREGATED:
            values = [float(r[name]) for r in ok if r[name] is not None]
            row[name], row[f"{name}_sd"] = _mean_sd(values)
        drops, rdrops = [], []
        for r in ok:
            d = dense.get((model, dataset, r["seed"]))
            if d is None:
                continue
            drops.append(float(d["accuracy"]) - float(r["accuracy"]))
            rd, rp = robust_mean(d), robust_mean(r)
            if rd is not None and rp is not None:
                rdrops.append(rd - rp)
        row["accuracy_drop"], row["accuracy_drop_sd"] = _mean_sd(drops)
        row["robustness_drop"], row["robustness_drop_sd"] = _mean_sd(rdrops)
        rows.append(row)
    return rows
