"""Backends (local, fork, ray): one interface for independent tasks, the same results on each.

The Ray tests share one local Ray (2 CPUs) started once for this module; its workers import
this module at start-up (``worker_process_setup_hook``), so the bench methods registered here
exist in them too. Without ray installed they are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from torch import nn

import secateurs as sc
from conftest import make_cnn, make_convnet, make_mlp, self_labelled, tiny_grid
from secateurs.backends import (
    BACKENDS,
    Backend,
    Failure,
    ForkBackend,
    LocalBackend,
    RayBackend,
    backend_of,
)
from secateurs.bench import (
    METHODS,
    BudgetPoint,
    PruneContext,
    Pruned,
    parse_grid,
    run_grid,
    without_timing,
)
from secateurs.bench import read_records as read_bench
from secateurs.bench.methods import GlobalMagnitude
from secateurs.errors import ConfigError, ModelError
from secateurs.search.netadapt import NetAdapt
from secateurs.search.sensitivity import Sensitivity

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
X_CNN = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- tasks for the tests


def square(shared: int, item: int) -> int:
    """``item ** 2 + shared``; raises on 3 (a task that fails among ones that do not)."""
    if item == 3:
        raise ValueError("three is not allowed")
    return item * item + shared


def group_setup(shared: int, key: str) -> tuple[str, int, float]:
    """A setup that leaves a token: every item of its group must see the same one."""
    if key == "broken":
        raise RuntimeError("setup of broken failed")
    return key, os.getpid(), float(torch.rand(1, generator=torch.Generator()).item())


def group_item(shared: int, prepared: Any, item: int) -> tuple[Any, int]:
    if isinstance(prepared, Failure):
        return ("no setup", prepared.kind), item
    return prepared, item + shared


def die_on_two(shared: None, item: int) -> int:
    if item == 2:
        os._exit(3)  # the worker process dies: no exception, no result
    time.sleep(0.2)
    return item


def outcomes(backend: Backend, fn: Any, items: list[Any], shared: Any) -> dict[int, Any]:
    """Every outcome of ``backend.map`` by index, checking each index comes once."""
    seen: dict[int, Any] = {}
    for i, outcome in backend.map(fn, items, shared):
        assert i not in seen
        seen[i] = outcome
    return seen


# --------------------------------------------------------------------------- local and fork


@pytest.mark.parametrize("backend", [LocalBackend(), ForkBackend(workers=2)], ids=["local", "fork"])
def test_map_gives_every_outcome_once_and_failures_with_their_traceback(backend: Backend) -> None:
    got = outcomes(backend, square, list(range(6)), 10)
    assert set(got) == set(range(6))
    assert {i: v for i, v in got.items() if i != 3} == {i: i * i + 10 for i in (0, 1, 2, 4, 5)}
    failure = got[3]
    assert isinstance(failure, Failure) and failure.kind == "ValueError"
    assert failure.message == "three is not allowed"
    assert "Traceback" in failure.traceback and "in square" in failure.traceback
    with pytest.raises(ModelError, match="the task raised ValueError: three is not allowed"):
        failure.raise_("the task")
    secateurs_error = Failure.of(ConfigError("bad option"), portable=True)
    with pytest.raises(ConfigError, match=r"^bad option$"):  # a secateurs error as it was
        secateurs_error.raise_("the task")


def test_local_runs_in_order_and_lazily() -> None:
    calls: list[int] = []

    def record(shared: None, item: int) -> int:
        calls.append(item)
        return item

    results = LocalBackend().map(record, [3, 1, 2], None)
    assert calls == []  # nothing runs before the caller asks
    assert next(results) == (0, 3) and calls == [3]
    assert list(results) == [(1, 1), (2, 2)]


@pytest.mark.parametrize("backend", [LocalBackend(), ForkBackend(workers=2)], ids=["local", "fork"])
def test_map_after_runs_each_setup_once_before_its_items(backend: Backend) -> None:
    groups = [("a", [1, 2, 3]), ("empty", []), ("broken", [4]), ("b", [5, 6])]
    got = dict(backend.map_after(group_setup, group_item, groups, 100))
    assert set(got) == {0, 1, 2, 3, 4, 5}  # flat indices over the groups' items, in order
    a = {got[i][0] for i in (0, 1, 2)}
    assert len(a) == 1 and next(iter(a))[0] == "a"  # one setup for the group, seen by all
    assert [got[i][1] for i in (0, 1, 2)] == [101, 102, 103]
    assert got[3] == (("no setup", "RuntimeError"), 4)  # the failed setup reaches its items
    assert {got[i][0][0] for i in (4, 5)} == {"b"}


def test_fork_shares_an_object_that_does_not_pickle() -> None:
    lock = threading.Lock()  # neither a lock nor a local closure pickles

    def use(shared: tuple[Any, Any], item: int) -> int:
        offset, _ = shared
        return int(offset(item))

    got = outcomes(ForkBackend(workers=2), use, [1, 2, 3], (lambda x: x + 1, lock))
    assert got == {0: 2, 1: 3, 2: 4}


def test_a_fork_worker_that_dies_is_a_failure_not_a_hang() -> None:
    start = time.perf_counter()
    got = outcomes(ForkBackend(workers=2), die_on_two, [0, 1, 2, 3, 4, 5], None)
    assert set(got) == set(range(6)) and time.perf_counter() - start < 60
    lost = [i for i, v in got.items() if isinstance(v, Failure)]
    assert 2 in lost and all(got[i].kind == "BrokenProcessPool" for i in lost)


def test_backend_of_defaults_and_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(backend_of(None), LocalBackend)
    assert isinstance(backend_of(None, 1), LocalBackend)
    fork = backend_of(None, 3)
    assert isinstance(fork, ForkBackend) and fork.workers == 3
    assert backend_of({"name": "fork", "workers": 2}, 5).workers == 2  # the spec's own wins
    assert backend_of("fork", 2, threads=4).threads == 4
    assert BACKENDS.names() == ["local", "fork", "ray"]
    with pytest.raises(ConfigError, match=r"unknown backend 'cluster'; allowed: fork, local, ray"):
        backend_of("cluster")
    with pytest.raises(ConfigError, match=r"workers=2 needs one of: fork, ray"):
        backend_of("local", 2)
    with pytest.raises(ConfigError, match=r"workers must be an int >= 1; got 0"):
        backend_of("fork", 0)
    with pytest.raises(ConfigError, match=r"backend 'fork': unknown option\(s\) 'address'"):
        backend_of({"name": "fork", "address": "x:1"})
    with pytest.raises(ConfigError, match="needs a 'name' key"):
        backend_of({"workers": 2})
    with pytest.raises(ConfigError, match="backend must be a name"):
        backend_of(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="address must be"):
        RayBackend(address="")
    with pytest.raises(ConfigError, match=r"unknown backend 'nope'; allowed"):
        Sensitivity(workers=2, backend="nope")
    with pytest.raises(ConfigError, match=r"workers=2 needs one of"):
        NetAdapt(workers=2, backend="local")
    assert isinstance(Sensitivity().backend_, LocalBackend)
    assert isinstance(Sensitivity(workers=2).backend_, ForkBackend)
    from secateurs import recipe

    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        recipe.parse(
            {"prune": {"sparsity": 0.5, "allocation": {"name": "sensitivity", "backend": "nope"}}}
        )
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="needs the ray package, which is not installed"):
        backend_of("ray")


def test_secateurs_imports_without_ray() -> None:
    code = (
        "import sys, secateurs, secateurs.backends, secateurs.bench, secateurs.search, "
        "secateurs.cli; assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- searches


def noisy_finetune(model: nn.Module, steps: int) -> None:
    """A fine-tune that draws from the global random state (as dropout or a shuffle would):
    its result depends on how the search seeds each candidate, not on where it runs."""
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))


def weight_score(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.abs().sum() for p in model.parameters()))


SEARCH_BACKENDS = ["local", "fork", "ray"]


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    """One local Ray for the module (2 CPUs); its workers import this module."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env={
                "env_vars": {"PYTHONPATH": str(TESTS)},
                "worker_process_setup_hook": f"{__name__}.in_ray_worker",
            },
        )
    yield ray
    if started:
        ray.shutdown()


def in_ray_worker() -> None:
    """Ray runs this in each worker at start-up: importing this module registered its bench
    methods there."""


def _backend(name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if name == "ray":
        request.getfixturevalue("ray_session")
    return {"name": name} if name == "local" else {"name": name, "workers": 2}


@pytest.mark.parametrize("space", ["channels", "elements"])
def test_sensitivity_scan_is_the_same_on_every_backend(
    space: str, request: pytest.FixtureRequest
) -> None:
    if space == "channels":
        model, x, budget = make_cnn(), X_CNN, sc.MACs(0.6)
    else:
        model, x, budget = make_mlp(), torch.randn(4, 16), sc.Sparsity(0.6)
    data = self_labelled(model, x)
    found = {}
    for name in SEARCH_BACKENDS:
        method = {"name": "sensitivity", "backend": _backend(name, request)}
        found[name] = sc.search_allocation(model, x, budget, method, space=space, data=data)
    local = found["local"]
    assert local.evaluations > 5
    for name in ("fork", "ray"):
        assert dict(found[name].ratios) == dict(local.ratios), name
        assert found[name].history == local.history, name
        assert found[name].evaluations == local.evaluations, name


def test_netadapt_is_the_same_on_every_backend(request: pytest.FixtureRequest) -> None:
    found = {}
    for name in SEARCH_BACKENDS:
        method = {
            "name": "netadapt",
            "step": 0.2,
            "short_steps": 2,
            "long_steps": 1,
            "backend": _backend(name, request),
        }
        found[name] = sc.search_allocation(
            make_convnet(),
            X_CNN,
            sc.MACs(0.6),
            method,
            evaluate=weight_score,
            finetune=noisy_finetune,
            seed=3,
        )
    local = found["local"]
    iterations = local.history["iterations"]
    assert len(iterations) >= 2 and all(len(it["candidates"]) >= 2 for it in iterations)
    assert local.model is not None
    for name in ("fork", "ray"):
        other = found[name]
        assert dict(other.ratios) == dict(local.ratios), name
        assert other.history == local.history, name
        assert other.model is not None
        theirs = other.model.state_dict()
        for key, value in local.model.state_dict().items():
            assert torch.equal(value, theirs[key]), (name, key)


def test_a_failing_evaluation_under_ray_is_a_clear_error(ray_session: Any) -> None:
    model = make_cnn()

    def evaluate(m: nn.Module) -> float:
        raise RuntimeError("boom on a worker")

    method = {"name": "sensitivity", "workers": 2, "backend": "ray"}
    with pytest.raises(ModelError, match="the evaluation function raised RuntimeError: boom"):
        sc.search_allocation(model, X_CNN, sc.MACs(0.5), method, evaluate=evaluate)


def test_ray_map_matches_local_and_refuses_what_does_not_pickle(ray_session: Any) -> None:
    ray = RayBackend(workers=2)
    got = outcomes(ray, square, list(range(6)), 10)
    local = outcomes(LocalBackend(), square, list(range(6)), 10)
    assert {i: v for i, v in got.items() if i != 3} == {i: v for i, v in local.items() if i != 3}
    assert got[3].kind == "ValueError" and "in square" in got[3].traceback
    groups = [("a", [1, 2, 3]), ("empty", []), ("broken", [4]), ("b", [5, 6])]
    after = dict(ray.map_after(group_setup, group_item, groups, 100))
    assert len({after[i][0] for i in (0, 1, 2)}) == 1 and after[3][0] == (
        "no setup",
        "RuntimeError",
    )
    with pytest.raises(ConfigError, match=r"do not pickle.*use backend 'fork'"):
        outcomes(ray, square, [1], threading.Lock())


# --------------------------------------------------------------------------- bench on Ray


@METHODS.register("raise_for_backends")
@dataclass
class RaiseForBackends(GlobalMagnitude):
    """Raises: a failed run must be recorded with its traceback, wherever it ran."""

    budget_kinds: ClassVar[tuple[str, ...]] = ("sparsity",)

    def prune(self, model: nn.Module, budget: BudgetPoint, ctx: PruneContext) -> Pruned:
        raise RuntimeError(f"boom from pid {os.getpid()}")


@METHODS.register("sleep_once_for_backends")
@dataclass
class SleepOnceForBackends(GlobalMagnitude):
    """Global magnitude, but the first run to start writes its process id to ``marker`` and
    sleeps (long enough to be killed); a rerun of it finds the marker and just prunes."""

    budget_kinds: ClassVar[tuple[str, ...]] = ("sparsity",)
    marker: str = ""

    def prune(self, model: nn.Module, budget: BudgetPoint, ctx: PruneContext) -> Pruned:
        path = Path(self.marker)
        try:
            with path.open("x") as f:
                f.write(str(os.getpid()))
        except FileExistsError:
            return super().prune(model, budget, ctx)
        time.sleep(120)
        return super().prune(model, budget, ctx)


def grid_dict(**overrides: Any) -> dict[str, Any]:
    """The tiny grid with 2 seeds x (dense + 2 methods x 2 budgets), latency and export on:
    every field a record can have is compared between backends."""
    evaluate = {
        "latency": True,
        "latency_repeats": 2,
        "export": True,
        "robustness": {"corruptions": ["gaussian_noise"], "severities": [1, 5], "limit": 64},
    }
    return tiny_grid(**{"seeds": [0, 1], "evaluate": evaluate, **overrides})


def test_bench_on_fork_writes_the_records_local_writes(tmp_path: Path) -> None:
    grid = parse_grid(grid_dict(seeds=[0]))
    run_grid(grid, tmp_path / "local.jsonl", cache_dir=tmp_path / "c1")
    result = run_grid(grid, tmp_path / "fork.jsonl", cache_dir=tmp_path / "c2", backend="fork")
    a = {r["key"]: without_timing(r) for r in read_bench(tmp_path / "local.jsonl")}
    b = {r["key"]: without_timing(r) for r in read_bench(tmp_path / "fork.jsonl")}
    assert len(a) == 5 and a == b and not result.failed


def test_bench_on_ray_writes_the_records_local_writes(
    ray_session: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from secateurs.cli import main

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid_dict()))
    local = run_grid(parse_grid(grid_dict()), tmp_path / "local.jsonl", cache_dir=tmp_path / "c1")
    out = tmp_path / "ray.jsonl"
    args = ["bench", str(grid_file), "--out", str(out), "--cache-dir", str(tmp_path / "c2")]
    assert main([*args, "--backend", "ray"]) == 0
    text = capsys.readouterr().out
    assert "10/10" in text and "tiny on RayBackend" in text  # one bar for the whole grid
    a = {r["key"]: without_timing(r) for r in read_bench(tmp_path / "local.jsonl")}
    b = {r["key"]: without_timing(r) for r in read_bench(out)}
    assert len(a) == 10 and not local.failed
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    assert len(list((tmp_path / "c2").glob("*.safetensors"))) == 2  # one dense model per seed
    # rerunning resumes: nothing left to do, nothing written
    assert main([*args, "--backend", "ray"]) == 0
    assert "skipped 10 run(s)" in capsys.readouterr().out
    assert len(read_bench(out)) == 10


def test_bench_run_that_raises_under_ray_is_recorded_as_failed(
    ray_session: Any, tmp_path: Path
) -> None:
    grid = parse_grid(grid_dict(seeds=[0], methods=["raise_for_backends", "global_magnitude"]))
    result = run_grid(grid, tmp_path / "r.jsonl", backend="ray")
    records = {r["key"]: r for r in read_bench(tmp_path / "r.jsonl")}
    assert len(records) == 5 and len(result.failed) == 2
    failed = records["lenet-300-100|synthetic|raise_for_backends|sparsity=0.8|0"]
    assert failed["status"] == "failed" and failed["accuracy"] is None
    assert "Traceback" in failed["error"] and "boom from pid" in failed["error"]
    assert f"boom from pid {os.getpid()}" not in failed["error"]  # it ran on a worker
    ok = records["lenet-300-100|synthetic|global_magnitude|sparsity=0.95|0"]
    assert ok["status"] == "ok" and ok["accuracy"] is not None


def test_bench_survives_a_ray_worker_killed_mid_grid(ray_session: Any, tmp_path: Path) -> None:
    marker = tmp_path / "sleeping.pid"
    methods = ["global_magnitude", {"name": "sleep_once_for_backends", "marker": str(marker)}]
    grid = parse_grid(grid_dict(methods=methods, budgets={"sparsity": [0.9]}))
    out = tmp_path / "r.jsonl"
    killed: list[int] = []

    def kill_the_sleeper() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text():
                pid = int(marker.read_text())
                if pid != os.getpid():  # a worker, never this process
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_sleeper, daemon=True)
    killer.start()
    written: list[str] = []
    result = run_grid(grid, out, backend="ray", on_record=lambda r: written.append(r["key"]))
    killer.join(timeout=5)
    assert killed, "the sleeping run never started on a worker"
    records = read_bench(out)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 6 == len(written)  # every run once, none lost
    assert sorted(keys) == sorted(p.key for p in grid.all_points())
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    assert not result.failed


def test_cli_bench_unreachable_ray_cluster_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid_dict(seeds=[0])))
    out = tmp_path / "r.jsonl"
    command = [sys.executable, "-m", "secateurs.cli", "bench", str(grid_file), "--out", str(out)]
    command += ["--backend", "ray", "--address", "127.0.0.1:1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no Ray cluster reachable at '127.0.0.1:1'" in lines[0]
    assert not out.exists() and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- the sensitivity CLI

QUICK = TESTS.parents[0] / "recipes" / "quick-synthetic.yaml"


def test_cli_sensitivity_on_ray_gives_the_local_scan(ray_session: Any, tmp_path: Path) -> None:
    from secateurs.cli import main

    sets = ["--set", "prune.structure=elements", "--set", "prune.criterion=magnitude"]
    common = ["sensitivity", str(QUICK), *sets]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    assert (
        main([*common, "--out", str(tmp_path / "ray"), "--workers", "2", "--backend", "ray"]) == 0
    )
    local, ray = (
        json.loads((tmp_path / name / "sensitivity.json").read_text()) for name in ("local", "ray")
    )
    assert ray["ratios"] == local["ratios"] and ray["history"] == local["history"]
    assert main([*common, "--out", str(tmp_path / "x"), "--backend", "cluster"]) == 2
    assert not (tmp_path / "x").exists()  # refused before the dense model trains
