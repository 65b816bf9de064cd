"""Data-parallel runs (``torchrun``): which process this is, and the few collectives pruning needs.

Under ``torchrun --nproc-per-node N`` (``secateurs run RECIPE --nproc N``) every process trains
the same model on its share of each batch under ``DistributedDataParallel``; DDP averages the
gradients, so the weights stay identical on every rank. Masks must stay identical too, so the
statistics a data-aware criterion gathers from data (calibration gradients, movement scores,
layer input Hessians) are summed over the ranks by :func:`all_reduce_sum_` before any mask is
chosen: every rank then selects from the same numbers and gets the same masks.

Everything here is a no-op in one process (no process group, or a group of one), so library
code calls it unconditionally and the single-process path is unchanged.

:class:`ShardedSampler` splits each batch of the single-process training loader among the
ranks, so N processes take the same optimizer steps on the same global batches, in the same
order, as one process does: a recipe means the same thing on 1 and on N processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence, Sized
from datetime import timedelta
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from secateurs.errors import ConfigError

__all__ = [
    "BACKENDS",
    "ShardedSampler",
    "all_reduce_sum_",
    "broadcast_",
    "check_backend",
    "close",
    "data_parallel",
    "default_backend",
    "device",
    "init",
    "is_distributed",
    "layout",
    "rank",
    "sharded_loader",
    "share",
    "start_epoch",
    "under_torchrun",
    "world_size",
]

#: The process-group backends a run may ask for: ``gloo`` on CPUs, ``nccl`` on CUDA GPUs.
BACKENDS = ("gloo", "nccl")
#: Tensors up to this many bytes travel together in one collective (fewer, larger messages).
_BUCKET_BYTES = 32 * 2**20

T = TypeVar("T")


# -- who am I ------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in one process): rank 0 alone writes files and prints."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many processes share the work (1 in one process)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def under_torchrun() -> bool:
    """True when ``torchrun`` started this process (it sets these variables for each worker)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def default_backend() -> str:
    """``nccl`` when this machine has a CUDA GPU, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def check_backend(backend: str, processes: int) -> None:
    """Raise :class:`ConfigError` unless ``processes`` processes of ``backend`` can start here.

    ``nccl`` needs one CUDA GPU per process on this machine; ``gloo`` runs on CPUs.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run in one process")
    if backend == "gloo" and not dist.is_gloo_available():
        raise ConfigError("this PyTorch build has no gloo backend; use --backend nccl on GPUs")
    if backend == "nccl":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not dist.is_nccl_available() or gpus < processes:
            have = "no CUDA GPU" if gpus == 0 else f"{gpus} CUDA GPU(s)"
            raise ConfigError(
                f"backend 'nccl' needs one CUDA GPU per process: {processes} process(es), "
                f"{have} here{'' if dist.is_nccl_available() else ' and no NCCL in this build'}; "
                "use --backend gloo on CPUs"
            )


def device() -> torch.device:
    """Where this rank's model lives: its own GPU (``cuda:LOCAL_RANK``) under ``nccl``,
    else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(backend: str, timeout_minutes: float = 60.0) -> None:
    """Join the process group ``torchrun`` set up (its environment says where and who).

    Under ``nccl`` each process takes the GPU of its local rank. A group that cannot start
    is a :class:`ConfigError` naming the backend and the reason. ``timeout_minutes`` bounds
    how long a rank waits for the others (rank 0 measures and writes files while they wait).
    """
    check_backend(backend, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"the {backend!r} process group could not start: {first}") from None


def close() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- collectives ---------------------------------------------------------------------------


def _transport_device() -> torch.device:
    """Where a collective's buffer must live: the GPU under ``nccl``, the CPU under ``gloo``."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _buckets(tensors: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Consecutive runs of tensors of one dtype, each up to :data:`_BUCKET_BYTES` (a larger
    tensor travels alone). Every rank passes the same tensors, so buckets match across ranks."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or size + nbytes > _BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _collective_(tensors: Iterable[Tensor], op: str, src: int = 0) -> None:
    """Sum (``op="sum"``) or broadcast from ``src`` (``op="broadcast"``) every tensor, in place."""
    items = [t for t in tensors if t.numel()]
    if not is_distributed() or not items:
        return
    for bucket in _buckets(items):
        dtype = bucket[0].dtype
        wire = torch.uint8 if dtype == torch.bool else dtype  # gloo and nccl move no bools
        target = _transport_device()
        flat = torch.cat([t.detach().reshape(-1).to(device=target, dtype=wire) for t in bucket])
        if op == "sum":
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        else:
            dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for t in bucket:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view(t.shape).to(device=t.device, dtype=dtype))
                offset += n


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Replace every tensor, in place, by its sum over all ranks (a no-op in one process).

    Every rank must pass tensors of the same shapes and dtypes in the same order. The sum is
    the same bits on every rank, so selections made from it agree everywhere.
    """
    _collective_(tensors, "sum")


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite every tensor, in place, with rank ``src``'s (a no-op in one process)."""
    _collective_(tensors, "broadcast", src)


def share(items: Iterable[T], limit: int | None = None) -> list[T]:
    """This rank's share of the first ``limit`` items (all when ``None``): item ``i`` goes to
    rank ``i mod N``. With the same items on every rank, the shares partition them, so
    statistics summed over the ranks are those of all the items (each read once)."""
    out: list[T] = []
    r, n = rank(), world_size()
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            break
        if i % n == r:
            out.append(item)
    return out


# -- training data -------------------------------------------------------------------------


class ShardedSampler(DistributedSampler[int]):
    """This rank's share of every batch the single-process training loader yields.

    The single-process loader (:meth:`secateurs.data.DataBundle.loaders`) shuffles with a
    ``RandomSampler`` whose generator is seeded once, so pass ``p`` over the data has its own
    order, and cuts it into batches of ``batch_size``. Here pass ``p`` draws the same order,
    every batch is split among the ``num_replicas`` ranks (``batch_size / num_replicas``
    examples each, interleaved as ``DistributedSampler`` does), and the last, partial batch is
    padded from the start of the order to a multiple of the ranks, as ``DistributedSampler``
    pads. Together the ranks take the single-process batches, so with gradients averaged by
    DDP the N processes take the same steps as one (up to floating-point summation order).

    The pass number is :attr:`epoch`: each iteration uses it and moves it on by one, like the
    single-process generator, so a training phase after another continues the sequence
    instead of repeating it. :meth:`set_epoch` moves it explicitly.
    """

    #: The sampler counts its passes itself (:func:`start_epoch` leaves it alone).
    counts_passes: ClassVar[bool] = True

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        *,
        num_replicas: int,
        rank: int,
        seed: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size = {batch_size!r} is invalid; must be an integer >= 1")
        if batch_size % num_replicas:
            raise ConfigError(
                f"a batch of {batch_size} does not split evenly among {num_replicas} processes; "
                "give a batch size that is a multiple of the number of processes"
            )
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        self.batch_size = batch_size
        self.local_batch_size = batch_size // num_replicas
        self._sized = dataset
        self._order: RandomSampler | None = None
        self._passes = 0  # passes drawn from _order so far

    def _pass_order(self, index: int) -> list[int]:
        """The single-process loader's order on its pass ``index`` (from 0)."""
        if self._order is None or self._passes > index:
            generator = torch.Generator().manual_seed(self.seed)
            self._order = RandomSampler(self._sized, generator=generator)
            self._passes = 0
        while True:
            order = list(self._order)
            self._passes += 1
            if self._passes > index:
                return order

    def __iter__(self) -> Iterator[int]:
        order = self._pass_order(self.epoch)
        self.epoch += 1
        n, out = self.num_replicas, []
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) % n:
                batch += order[: n - len(batch) % n]
            out.extend(batch[self.rank :: n])
        return iter(out)

    def __len__(self) -> int:
        full, rest = divmod(len(self._sized), self.batch_size)
        return full * self.local_batch_size + -(-rest // self.num_replicas)


def sharded_loader(dataset: Sized, batch_size: int, seed: int = 0) -> DataLoader[Any]:
    """This rank's training loader: its share (:class:`ShardedSampler`) of each batch of
    ``batch_size`` (the global batch), sliced from the dataset one batch at a time."""
    sampler = ShardedSampler(dataset, batch_size, num_replicas=world_size(), rank=rank(), seed=seed)
    batches = BatchSampler(sampler, sampler.local_batch_size, drop_last=False)
    return DataLoader(dataset, sampler=batches, batch_size=None)  # type: ignore[arg-type]


def start_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Tell the loader's ``DistributedSampler`` that epoch ``epoch`` starts, so that every
    epoch has its own shuffle, the same on every rank (what ``set_epoch`` is for). A
    :class:`ShardedSampler` counts its passes itself and is left as it is."""
    for outer in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        for sampler in (outer, getattr(outer, "sampler", None)):
            if isinstance(sampler, DistributedSampler):
                if not getattr(sampler, "counts_passes", False):
                    sampler.set_epoch(epoch)
                return


# -- the model -----------------------------------------------------------------------------


def layout(model: nn.Module) -> tuple[int, ...]:
    """The identity of every parameter and buffer of ``model``, in order.

    Attaching a mask for the first time (or removing one) moves a weight into a
    parametrization and adds a buffer: DDP, built on the old layout, would then stop reducing
    that weight's gradient. A changed layout says the wrapper must be rebuilt.
    """
    return tuple(id(p) for p in model.parameters()) + tuple(id(b) for b in model.buffers())


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (on its own GPU under ``nccl``), or
    ``model`` itself in one process or when it is wrapped already.

    Building the wrapper broadcasts rank 0's parameters and buffers (masks included); they
    are the same on every rank already, and rank 0's raw weights are zero where its masks
    are, so a pruned weight comes back on no rank.
    """
    if not is_distributed() or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    first = next(model.parameters(), None)
    ids = [first.device.index] if first is not None and first.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
