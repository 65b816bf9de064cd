"""Where independent tasks run: in this process, in forked worker processes, or on Ray.

A sensitivity scan (one evaluation per layer and ratio), NetAdapt's per-layer candidates and a
benchmark grid (one run per cell) are made of tasks that do not depend on one another. A
:class:`Backend` runs such tasks and hands each result back as soon as it is ready, so that the
caller can record it at once:

* :meth:`Backend.map` runs ``fn(shared, item)`` for every item and yields ``(index, outcome)``
  in completion order; ``outcome`` is the task's return value or a :class:`Failure` (its
  exception type, message and traceback), never an exception raised at the caller. ``shared``
  is one large read-only object every task needs (the model, the calibration batches, the
  data set): it reaches the workers once, not once per task.
* :meth:`Backend.map_after` adds one dependency: the items come in groups, a ``setup`` task
  runs once per group (a benchmark's dense model, trained once per model, data set and seed)
  and each item of the group runs after it, with its result.
* :meth:`Backend.session` keeps the workers up across several maps (NetAdapt maps once per
  iteration); a map outside a session opens and closes one itself.

Three backends are registered in :data:`BACKENDS`, found by name like every other method:
``local`` (this process, one task after another, in order: the default), ``fork`` (a pool of
``workers`` forked processes: the shared object is inherited by the fork, never pickled, so
it may hold closures and unpicklable objects) and ``ray`` (a local Ray that starts and stops
with the session, or an existing cluster at ``address``; the shared object goes to the object
store once with ``ray.put``, tasks whose worker died are retried by Ray). Ray is imported only
by the ``ray`` backend: secateurs imports and runs without it. Whichever backend runs a set of
tasks, the results are the same: only the order they arrive in differs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import multiprocessing
import os
import pickle
import socket
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NoReturn, TypeVar

import torch

from secateurs.errors import ConfigError, ModelError, SecateursError
from secateurs.registry import Registry, build_dataclass

S = TypeVar("S")  #: the shared object
K = TypeVar("K")  #: a group's key
D = TypeVar("D")  #: what a group's setup returns
T = TypeVar("T")  #: an item
R = TypeVar("R")  #: what a task returns


@dataclass(frozen=True)
class Failure:
    """A task that raised: what it raised and where, as text that travels between processes.

    ``error`` is the exception itself when it could come back (always in this process;
    from a worker when it pickles), else None.
    """

    kind: str  #: the exception's type, e.g. ``RuntimeError`` or ``WorkerCrashedError``
    message: str
    traceback: str
    error: BaseException | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, exc: BaseException, portable: bool = False) -> Failure:
        """The failure of ``exc`` (raised just now: its traceback is formatted here).

        ``portable``: keep the exception object only if it survives pickling (a worker's
        failure is sent back to the caller).
        """
        text = "".join(traceback.format_exception(exc))
        error: BaseException | None = exc
        if portable:
            try:
                pickle.loads(pickle.dumps(exc))
            except Exception:
                error = None
        return cls(type(exc).__name__, str(exc), text, error)

    def raise_(self, what: str) -> NoReturn:
        """Raise it at the caller: a secateurs error as it was raised (it already says what to
        do), anything else as a :class:`~secateurs.ModelError` saying that ``what`` raised."""
        if isinstance(self.error, SecateursError):
            raise self.error
        raise ModelError(f"{what} raised {self.kind}: {self.message}") from self.error


def attempt(fn: Callable[..., R], *args: Any, portable: bool = False) -> R | Failure:
    """``fn(*args)``, or the :class:`Failure` of the exception it raised (an ``Exception``:
    a KeyboardInterrupt still stops the caller)."""
    try:
        return fn(*args)
    except Exception as exc:
        return Failure.of(exc, portable=portable)


@dataclass(frozen=True)
class _Ungrouped(Generic[S, T, R]):
    """``fn(shared, item)`` as a task of :meth:`Backend.map_after` (which passes a setup
    result too): how :meth:`Backend.map` is built on it."""

    fn: Callable[[S, T], R]

    def __call__(self, shared: S, prepared: object, item: T) -> R:
        return self.fn(shared, item)


class Backend(ABC):
    """Base class: runs independent tasks and yields each outcome as it finishes."""

    registry_name: ClassVar[str]
    #: True when the shared object is pickled to reach the workers: a caller then gives it
    #: tensors of their own (a pickled view carries its whole storage).
    pickles_shared: ClassVar[bool] = False

    @contextmanager
    def session(self) -> Iterator[Backend]:
        """Keep what the backend starts (a Ray runtime) up until the block ends."""
        yield self

    def map(
        self, fn: Callable[[S, T], R], items: Sequence[T], shared: S
    ) -> Generator[tuple[int, R | Failure], None, None]:
        """``fn(shared, item)`` for every item; yields ``(index of the item, outcome)`` in
        completion order. ``fn`` must not change ``shared`` (the workers see one copy)."""
        return self.map_after(None, _Ungrouped(fn), [(None, items)], shared)

    @abstractmethod
    def map_after(
        self,
        setup: Callable[[S, K], D] | None,
        fn: Callable[[S, D | Failure, T], R],
        groups: Sequence[tuple[K, Sequence[T]]],
        shared: S,
    ) -> Generator[tuple[int, R | Failure], None, None]:
        """For each ``(key, items)`` of ``groups``: ``setup(shared, key)`` once (skipped for a
        group without items; ``None`` for no setup), then ``fn(shared, prepared, item)`` for
        each item after it, ``prepared`` being what the setup returned or its
        :class:`Failure`. Yields ``(index, outcome)`` in completion order, ``index`` counting
        the items of all groups in order."""


BACKENDS: Registry[Backend] = Registry("backend", Backend)


def _offsets(groups: Sequence[tuple[Any, Sequence[Any]]]) -> list[int]:
    """The flat index of each group's first item."""
    out, n = [], 0
    for _, items in groups:
        out.append(n)
        n += len(items)
    return out


def _check_count(name: str, value: object, least: int, backend: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"backend {backend!r}: {name} must be an int >= {least}; got {value!r}")


# ------------------------------------------------------------------------------------ local


@BACKENDS.register("local")
@dataclass
class LocalBackend(Backend):
    """In this process, one task after another, in order (the default)."""

    def map_after(
        self,
        setup: Callable[[S, K], D] | None,
        fn: Callable[[S, D | Failure, T], R],
        groups: Sequence[tuple[K, Sequence[T]]],
        shared: S,
    ) -> Generator[tuple[int, R | Failure], None, None]:
        for start, (key, items) in zip(_offsets(groups), groups, strict=True):
            if not items:
                continue
            prepared: Any = None if setup is None else attempt(setup, shared, key)
            for i, item in enumerate(items):
                yield start + i, attempt(fn, shared, prepared, item)


# ------------------------------------------------------------------------------------- fork

#: What forked workers run and share: set by the parent just before the pool forks, so the
#: children inherit it without pickling (the model and the evaluator need not be picklable).
_FORKED: tuple[Any, Any, Any] | None = None


def _fork_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _fork_setup(key: Any) -> Any:
    assert _FORKED is not None
    setup, _, shared = _FORKED
    return attempt(setup, shared, key, portable=True)


def _fork_task(prepared: Any, item: Any) -> Any:
    assert _FORKED is not None
    _, fn, shared = _FORKED
    return attempt(fn, shared, prepared, item, portable=True)


def _default_workers() -> int:
    return os.cpu_count() or 1


@BACKENDS.register("fork")
@dataclass
class ForkBackend(Backend):
    """A pool of ``workers`` processes forked from this one (Linux, macOS), ``threads`` torch
    threads each: the shared object is inherited by the fork, never pickled."""

    workers: int = field(default_factory=_default_workers)
    threads: int = 1

    def __post_init__(self) -> None:
        _check_count("workers", self.workers, 1, "fork")
        _check_count("threads", self.threads, 1, "fork")
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ConfigError(
                "backend 'fork' needs the fork start method, which this platform lacks; use "
                f"one of: {', '.join(n for n in BACKENDS.names() if n != 'fork')}"
            )

    def map_after(
        self,
        setup: Callable[[S, K], D] | None,
        fn: Callable[[S, D | Failure, T], R],
        groups: Sequence[tuple[K, Sequence[T]]],
        shared: S,
    ) -> Generator[tuple[int, R | Failure], None, None]:
        global _FORKED
        offsets = _offsets(groups)
        if not any(items for _, items in groups):
            return
        previous, _FORKED = _FORKED, (setup, fn, shared)
        pool = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_fork_init,
            initargs=(self.threads,),
        )
        pending: dict[Future[Any], tuple[bool, int]] = {}  # future -> (is a setup, index)
        ready: deque[tuple[int, Any]] = deque()  # outcomes known without a worker

        def submit_items(g: int, prepared: Any) -> None:
            for i, item in enumerate(groups[g][1]):
                try:
                    pending[pool.submit(_fork_task, prepared, item)] = (False, offsets[g] + i)
                except Exception as exc:  # the pool broke: a worker died
                    ready.append((offsets[g] + i, Failure.of(exc)))

        try:
            for g, (key, items) in enumerate(groups):
                if not items:
                    continue
                if setup is None:
                    submit_items(g, None)
                    continue
                try:
                    pending[pool.submit(_fork_setup, key)] = (True, g)
                except Exception as exc:
                    submit_items(g, Failure.of(exc))
            while pending or ready:
                while ready:
                    yield ready.popleft()
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    is_setup, where = pending.pop(future)
                    try:
                        outcome = future.result()
                    except Exception as exc:  # a worker died, or a result did not pickle
                        outcome = Failure.of(exc)
                    if is_setup:
                        submit_items(where, outcome)
                    else:
                        ready.append((where, outcome))
        finally:
            _FORKED = previous
            pool.shutdown(wait=True, cancel_futures=True)


# -------------------------------------------------------------------------------------- ray


def _import_ray() -> Any:
    """The ``ray`` module, or a ConfigError saying how to get it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ConfigError(
            f"backend 'ray' needs the ray package ({exc}); install it (pip install 'ray') or "
            "use backend 'fork' or 'local'"
        ) from None


def _ray_setup(payload: tuple[Any, Any, Any], key: Any, threads: int) -> Any:
    """A group's setup on a Ray worker (``payload`` arrives resolved from the object store)."""
    torch.set_num_threads(threads)
    setup, _, shared = payload
    return attempt(setup, shared, key, portable=True)


def _ray_task(payload: tuple[Any, Any, Any], prepared: Any, item: Any, threads: int) -> Any:
    """One task on a Ray worker; ``prepared`` is its group's setup, resolved by Ray (the task
    was scheduled only once that was ready)."""
    torch.set_num_threads(threads)
    _, fn, shared = payload
    return attempt(fn, shared, prepared, item, portable=True)


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for ``auto``/``local``."""
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _why_not_pickled(ray: Any, value: object) -> str:
    """One line saying why ``value`` does not pickle (Ray's own report is a page long)."""
    try:
        ray.cloudpickle.dumps(value)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"{type(exc).__name__}: {first}"
    return "Ray could not serialize them"


@BACKENDS.register("ray")
@dataclass
class RayBackend(Backend):
    """Ray tasks: a local Ray started (and stopped) for the session, or a cluster at
    ``address``; the shared object is put in the object store once.

    ``address``: ``host:port`` of a running cluster's head (``ray start --head`` prints it),
    ``ray://host:port`` for Ray Client, or ``auto``; None starts a local Ray of ``workers``
    CPUs (None: all of them). A Ray already initialised in this process is used as it is.
    ``workers``: the most tasks running at once (None: as many as the cluster's CPUs allow).
    ``threads``: torch threads per task, and the CPUs each task reserves. ``max_retries``:
    how often Ray reruns a task whose worker process died (a task that raises is not rerun:
    it is a :class:`Failure`).
    """

    address: str | None = None
    workers: int | None = None
    threads: int = 1
    max_retries: int = 3
    #: seconds to wait for a TCP connection to ``address`` before calling it unreachable
    connect_timeout: float = 5.0

    pickles_shared: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ConfigError(
                f"backend 'ray': address must be 'host:port', 'ray://host:port' or 'auto' (or "
                f"None to start a local Ray); got {self.address!r}"
            )
        if self.workers is not None:
            _check_count("workers", self.workers, 1, "ray")
        _check_count("threads", self.threads, 1, "ray")
        _check_count("max_retries", self.max_retries, 0, "ray")
        timeout = self.connect_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(
                f"backend 'ray': connect_timeout must be a number of seconds > 0; got {timeout!r}"
            )
        if importlib.util.find_spec("ray") is None:
            raise ConfigError(
                "backend 'ray' needs the ray package, which is not installed; install it "
                "(pip install 'ray') or use backend 'fork' or 'local'"
            )

    def _check_reachable(self) -> None:
        """Fail fast (Ray itself waits minutes) when nothing listens at ``address``."""
        target = _host_port(self.address) if self.address else None
        if target is None:
            return
        try:
            with socket.create_connection(target, timeout=self.connect_timeout):
                pass
        except OSError as exc:
            raise ConfigError(
                f"backend 'ray': no Ray cluster reachable at {self.address!r} ({exc}); start "
                "one there (ray start --head) or leave the address out to start a local Ray"
            ) from None

    @contextmanager
    def session(self) -> Iterator[Backend]:
        ray = _import_ray()
        if ray.is_initialized():
            yield self
            return
        self._check_reachable()
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if self.address is None:
            if self.workers is not None:
                options["num_cpus"] = self.workers * self.threads
        else:
            options["address"] = self.address
        try:
            ray.init(**options)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            where = f"at {self.address!r}" if self.address else "locally"
            raise ConfigError(f"backend 'ray' could not start {where}: {first}") from None
        try:
            yield self
        finally:
            ray.shutdown()

    def map_after(
        self,
        setup: Callable[[S, K], D] | None,
        fn: Callable[[S, D | Failure, T], R],
        groups: Sequence[tuple[K, Sequence[T]]],
        shared: S,
    ) -> Generator[tuple[int, R | Failure], None, None]:
        with self.session():
            ray = _import_ray()
            try:
                payload = ray.put((setup, fn, shared))
            except Exception:
                why = _why_not_pickled(ray, (setup, fn, shared))
                raise ConfigError(
                    "backend 'ray' sends the tasks and their shared object to worker processes "
                    f"by pickling, and they do not pickle ({why}); use backend 'fork', which "
                    "inherits them"
                ) from None
            yield from self._run(ray, payload, setup is not None, groups)

    def _run(
        self, ray: Any, payload: Any, has_setup: bool, groups: Sequence[tuple[Any, Sequence[Any]]]
    ) -> Generator[tuple[int, Any], None, None]:
        """Submit setups first, then items (at most ``workers`` in flight), and yield each
        item's outcome as Ray reports it done."""
        opts = {"num_cpus": self.threads, "max_retries": self.max_retries}
        setup_fn = ray.remote(_ray_setup).options(**opts)
        task_fn = ray.remote(_ray_task).options(**opts)
        offsets = _offsets(groups)
        jobs: deque[tuple[bool, int, int]] = deque()  # (is a setup, group, item within it)
        live = [g for g, (_, items) in enumerate(groups) if items]
        if has_setup:
            jobs.extend((True, g, -1) for g in live)
        jobs.extend((False, g, i) for g in live for i in range(len(groups[g][1])))
        prepared: dict[int, Any] = {}  # group -> ObjectRef of its setup (None: no setup)
        pending: dict[Any, tuple[bool, int]] = {}  # ObjectRef -> (is a setup, flat index)
        cap = self.workers if self.workers is not None else len(jobs) or 1
        try:
            while jobs or pending:
                while jobs and len(pending) < cap:
                    is_setup, g, i = jobs.popleft()
                    key, items = groups[g]
                    if is_setup:
                        ref = setup_fn.remote(payload, key, self.threads)
                        prepared[g] = ref
                        pending[ref] = (True, g)
                    else:
                        ref = task_fn.remote(payload, prepared.get(g), items[i], self.threads)
                        pending[ref] = (False, offsets[g] + i)
                done, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
                for ref in done:
                    is_setup, where = pending.pop(ref)
                    if is_setup:
                        continue  # its items get the ObjectRef; they fetch it themselves
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # worker lost after retries, dependency lost...
                        outcome = Failure.of(exc)
                    yield where, outcome
        finally:
            for ref in pending:
                ray.cancel(ref)


# ------------------------------------------------------------------------------ choosing one


def _has_field(cls: type, name: str) -> bool:
    return dataclasses.is_dataclass(cls) and any(f.name == name for f in dataclasses.fields(cls))


def backend_of(
    spec: str | Mapping[str, Any] | Backend | None,
    workers: int | None = None,
    threads: int | None = None,
) -> Backend:
    """The backend a search or a grid runs its tasks on.

    ``spec``: a name (``local``, ``fork``, ``ray``), ``{"name": ..., **options}`` or a
    :class:`Backend`; None picks ``local`` for one worker and ``fork`` for more (``local``
    where this platform cannot fork: what secateurs always did). ``workers`` fills in the
    backend's own ``workers`` option when the spec does not set it; more than one worker on
    ``local`` is an error naming the backends that run several. ``threads`` (torch threads
    per task) likewise fills in ``threads`` where the backend has it (``local`` runs with the
    caller's).
    """
    if isinstance(workers, bool) or (workers is not None and not isinstance(workers, int)):
        raise ConfigError(f"workers must be an int >= 1; got {workers!r}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be an int >= 1; got {workers!r}")
    if isinstance(spec, Backend):
        return spec
    if spec is None:
        many = workers is not None and workers > 1
        spec = "fork" if many and "fork" in multiprocessing.get_all_start_methods() else "local"
    if isinstance(spec, str):
        options: dict[str, Any] = {}
        name = spec
    elif isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(
                f"a backend given as a mapping needs a 'name' key ({', '.join(BACKENDS.names())})"
                f"; got {dict(spec)!r}"
            )
    else:
        raise ConfigError(
            f"backend must be a name ({', '.join(BACKENDS.names())}), a mapping "
            f"{{'name': ..., **options}} or a Backend object; got {spec!r}"
        )
    cls = BACKENDS.get(name)
    if threads is not None and "threads" not in options and _has_field(cls, "threads"):
        options["threads"] = threads
    if workers is not None and "workers" not in options:
        if _has_field(cls, "workers"):
            options["workers"] = workers
        elif workers > 1:
            several = [n for n, c in BACKENDS.items() if _has_field(c, "workers")]
            raise ConfigError(
                f"backend {name!r} runs one task at a time in this process; workers={workers} "
                f"needs one of: {', '.join(several)}"
            )
    return build_dataclass(cls, options, where=f"backend {name!r}")
