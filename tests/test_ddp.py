"""Masks under DistributedDataParallel: a one-process gloo group, and data-parallel pruning on
two CPU processes (gloo) that must agree on every mask at every pruning event."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

import secateurs as sc
from secateurs import calibration, cli, data, distributed
from secateurs.criteria.hessian import HessianAccumulator
from secateurs.masks import collect_masks, iter_masks, raw_parameter
from secateurs.train import TrainConfig, make_optimizer, train
from secateurs.zoo import build_model

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_pruned_weights_stay_zero_under_ddp() -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        sc.prune_(model, sparsity=0.75)
        zeros = [(m.weight == 0).clone() for m in (model[0], model[2])]
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        for _ in range(5):
            loss = ddp(torch.randn(8, 16)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for layer, was_zero in zip((model[0], model[2]), zeros, strict=True):
            assert bool((layer.weight[was_zero] == 0).all())
            assert int((layer.weight == 0).sum()) == int(was_zero.sum())
    finally:
        dist.destroy_process_group()


# -- the training data each rank takes -----------------------------------------------------


@pytest.mark.parametrize(
    ("n_train", "batch", "ranks"), [(100, 20, 2), (103, 20, 2), (101, 12, 4), (6, 4, 4)]
)
def test_ranks_together_take_every_single_process_batch(
    n_train: int, batch: int, ranks: int
) -> None:
    """Pass after pass, the ranks' k-th batches are the one-process loader's k-th batch split
    evenly (a last batch that does not split is padded, as DistributedSampler pads)."""
    bundle = data.synthetic(n_train=n_train, n_test=4)
    single = bundle.loaders(batch, seed=3)[0].sampler  # batches of indices, as one process
    shards = [
        distributed.ShardedSampler(bundle.train, batch, num_replicas=ranks, rank=r, seed=3)
        for r in range(ranks)
    ]
    local = [torch.utils.data.BatchSampler(s, s.local_batch_size, drop_last=False) for s in shards]
    passes = []
    for _ in range(3):  # a later pass continues the one-process sequence
        expected = [list(b) for b in single]
        got = [[list(b) for b in sampler] for sampler in local]
        passes.append(got[0])
        assert all(len(g) == len(expected) == len(s) for g, s in zip(got, local, strict=True))
        for k, whole in enumerate(expected):
            sizes = {len(g[k]) for g in got}
            assert len(sizes) == 1  # equal shares: DDP's mean of means is the batch mean
            together = [i for g in got for i in g[k]]
            if len(whole) % ranks == 0:
                assert sorted(together) == sorted(whole)
            else:
                assert set(whole) <= set(together) and len(together) == sizes.pop() * ranks
    assert passes[0] != passes[1]  # each pass its own shuffle
    shards[0].set_epoch(1)  # set_epoch goes to a given pass
    assert [list(b) for b in local[0]] == passes[1]
    assert [list(b) for b in local[0]] == passes[2]


def test_start_epoch_sets_a_plain_distributed_sampler_only() -> None:
    dataset = data.synthetic(n_train=16, n_test=4).train
    plain = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=0)
    distributed.start_epoch(DataLoader(dataset, sampler=plain, batch_size=4), 5)
    assert plain.epoch == 5
    sharded = distributed.ShardedSampler(dataset, 4, num_replicas=2, rank=0)
    list(sharded)
    distributed.start_epoch(DataLoader(dataset, sampler=sharded, batch_size=2), 0)
    assert sharded.epoch == 1  # it counts its own passes


def test_collectives_are_no_ops_in_one_process() -> None:
    t = torch.arange(4.0)
    distributed.all_reduce_sum_([t])
    distributed.broadcast_([t])
    assert torch.equal(t, torch.arange(4.0))
    assert distributed.share(range(5)) == [0, 1, 2, 3, 4]
    assert distributed.share(range(5), limit=3) == [0, 1, 2]
    assert not distributed.is_distributed() and distributed.rank() == 0
    model = nn.Linear(2, 2)
    assert distributed.data_parallel(model) is model


# -- two processes -------------------------------------------------------------------------


def _digest(model: nn.Module) -> str:
    """A hash of every mask of ``model`` (names and bits)."""
    h = hashlib.sha256()
    for name, mask in sorted(collect_masks(model).items()):
        h.update(name.encode())
        h.update(mask.cpu().numpy().tobytes())
    return h.hexdigest()


def _gradual_taylor() -> dict[str, Any]:
    """LeNet-300-100 trained for two epochs (8 steps) on synthetic data while Taylor prunes it
    to 90% on Zhu & Gupta's schedule (events at steps 2 to 6; the first attaches the masks in
    the middle of training). In one process, or as one rank of a group: then on this rank's
    share of every batch and of the calibration batches."""
    bundle = data.synthetic(n_train=256, n_test=64, seed=0)
    model = build_model("lenet-300-100", seed=0)
    calib = DataLoader(bundle.calibration_split(256), batch_size=64)
    loader: Any
    if distributed.is_distributed():
        loader = distributed.sharded_loader(bundle.train, 64, seed=0)
    else:
        loader = bundle.loaders(64, seed=0)[0]
    config = TrainConfig(epochs=2, lr=0.05, weight_decay=1e-3)
    pruner = sc.Pruner(
        model,
        sparsity=0.9,
        criterion="taylor",
        schedule=sc.Gradual(start=2, end=6, every=1),
        data=distributed.share(calib),
        loss_fn=nn.functional.cross_entropy,
        optimizer=make_optimizer(model, config),
    )
    events: list[tuple[int, str]] = []

    def on_step(_: int) -> None:
        if pruner.step():
            events.append((pruner.steps_done - 1, _digest(model)))

    pruner.step()
    train(model, loader, config, on_step=on_step, optimizer=pruner.optimizer)
    raw_zero = all(
        bool((raw_parameter(m, attr).detach()[~mask] == 0).all())
        for _, m, attr, mask in iter_masks(model)
    )
    return {
        "events": events,
        "masks": collect_masks(model),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "raw_zero": raw_zero,
        "sparsity": pruner.measured_sparsity(),
    }


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the two-process test: writes what it saw to ``out/rank<r>.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = _gradual_taylor()
        bundle = data.synthetic(n_train=256, n_test=64, seed=0)
        mine = distributed.share(DataLoader(bundle.calibration_split(256), batch_size=64))
        # the same one-shot Taylor pruning without the all-reduce: each rank sees only its own
        # batches, so the masks must differ (this is what the all-reduce prevents)
        alone = build_model("lenet-300-100", seed=0)
        real = calibration.all_reduce_sum_
        calibration.all_reduce_sum_ = lambda tensors: None  # type: ignore[assignment]
        try:
            sc.prune_(alone, sparsity=0.9, criterion="taylor", data=mine,
                      loss_fn=nn.functional.cross_entropy)  # fmt: skip
        finally:
            calibration.all_reduce_sum_ = real
        result["unsynced"] = _digest(alone)
        # a layer-wise criterion: Wanda from each rank's own inputs, combined
        wanda = build_model("lenet-300-100", seed=0)
        sc.prune_(wanda, sparsity=0.5, criterion="wanda", data=mine)
        result["wanda"] = _digest(wanda)
        # the layer Hessian: each rank adds its own rows (20 and 50 of them)
        rows = torch.randn(2, 50, 6, generator=torch.Generator().manual_seed(0))
        acc = HessianAccumulator(6, dtype=torch.float64)
        acc.add(rows[rank][: 20 + 30 * rank])
        acc.all_reduce_()
        result["hessian"] = (acc.hessian(), acc.column_norms(), acc.samples)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_processes_agree_on_every_mask_at_every_event(tmp_path: Path) -> None:
    mp.start_processes(_rank_main, (2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert [step for step, _ in r0["events"]] == [2, 3, 4, 5, 6]
    assert r0["events"] == r1["events"]  # the same masks on both ranks at every event
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:  # and the same model at the end, bit for bit
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    # DDP's parameter sync (a wrapper rebuilt when the first masks came) revived nothing
    assert r0["raw_zero"] and r1["raw_zero"]
    assert r0["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert r0["unsynced"] != r1["unsynced"]  # without the all-reduce they would disagree
    assert r0["wanda"] == r1["wanda"]
    rows = torch.randn(2, 50, 6, generator=torch.Generator().manual_seed(0))
    whole = HessianAccumulator(6, dtype=torch.float64)
    whole.add(rows[0][:20])
    whole.add(rows[1][:50])
    for hessian, norms, samples in (r0["hessian"], r1["hessian"]):
        assert samples == 70
        torch.testing.assert_close(hessian, whole.hessian())
        torch.testing.assert_close(norms, whole.column_norms())
    # two processes did the work of one: the same batches, so (to rounding) the same masks
    single = _gradual_taylor()
    agree = sum(int((single["masks"][k] == m).sum()) for k, m in r0["masks"].items())
    total = sum(m.numel() for m in r0["masks"].values())
    assert agree / total > 0.999


# -- the command line ----------------------------------------------------------------------

RECIPE = """\
name: ddp
seed: 0
model: {name: lenet-300-100}
data: {name: synthetic, batch_size: 64, limit_train: 512, limit_test: 128,
       calibration_examples: 256}
train: {epochs: 1, lr: 0.05}
prune: {sparsity: 0.9, criterion: magnitude, schedule: oneshot}
finetune: {epochs: 1, lr: 0.05}
output: {latency: false}
"""


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_run_on_two_processes_gives_the_one_process_pattern(tmp_path: Path) -> None:
    """``secateurs run --nproc 2``: rank 0 alone prints and writes; with the batch split
    between the ranks, global magnitude after dense training keeps the weights one process
    keeps (a flip is allowed only at a tie within float rounding of the threshold)."""
    recipe = _recipe(tmp_path)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "secateurs", "run", str(recipe), "--nproc", "2",
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("dense accuracy") == 1  # only rank 0 speaks
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["extra"]["processes"] == 2
    one_dense = load_file(str(tmp_path / "one" / "dense.safetensors"))
    two_dense = load_file(str(tmp_path / "two" / "dense.safetensors"))
    one, two = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    weights = [k for k in one if k.endswith("weight")]
    dense = torch.cat([one_dense[k].abs().flatten() for k in weights])
    threshold = float(dense.kthvalue(round(0.9 * dense.numel())).values)
    for key in weights:
        torch.testing.assert_close(two_dense[key], one_dense[key], rtol=0, atol=1e-5)
        flipped = (one[key] == 0) != (two[key] == 0)
        near = (one_dense[key].abs() - threshold).abs() < 1e-5
        assert bool((~flipped | near).all()), key
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-3)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--nproc", "0"], "--nproc = 0 is invalid"),
        (["--nproc", "3"], "data.batch_size = 64 does not split among 3 processes"),
        (["--nproc", "2", "--set", "data.limit_train=1"], "only 1 training examples"),
        (
            [
                "--nproc",
                "2",
                "--set",
                "prune.criterion=taylor",
                "--set",
                "data.calibration_examples=64",
            ],
            "reads 1 calibration batch(es) per pruning event",
        ),
        (["--nproc", "2", "--backend", "nccl"], "backend 'nccl' needs one CUDA GPU per process"),
        (["--nproc", "2", "--backend", "mpi"], "backend 'mpi' is unknown"),
        (["--backend", "gloo"], "this run is one process"),
    ],
)
def test_bad_parallel_runs_exit_2_with_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], says: str
) -> None:
    if "nccl" in options and torch.cuda.device_count() >= 2:
        pytest.skip("this machine could start nccl on 2 GPUs")
    out = tmp_path / "out"
    assert cli.main(["run", str(_recipe(tmp_path)), "--out", str(out), *options]) == 2
    assert says in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_worker_error_is_reported_once_by_the_launcher(tmp_path: Path) -> None:
    """An error only the workers can see (a schedule longer than fine-tuning is checked when
    the data's size is known, inside the run) comes back as one line, exit 2, not as
    torchrun's account of failed children."""
    recipe = _recipe(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "secateurs", "run", str(recipe), "--nproc", "2", "--out",
         str(tmp_path / "out"), "--set", "prune.schedule={name: gradual, end: 5, every: 1}"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "fine-tuning has only 8 steps" in _one_line(done.stderr)
    assert not (tmp_path / "out").exists()


def test_masks_in_a_tensor_digest_are_what_differs() -> None:
    """The digest the two-process test compares changes with a single mask bit."""
    model = build_model("lenet-300-100", seed=0)
    sc.prune_(model, sparsity=0.5)
    before = _digest(model)
    _, module, attr, mask = next(iter_masks(model))
    mask.view(-1)[0] = ~mask.view(-1)[0]
    assert _digest(model) != before
    assert isinstance(module.parametrizations[attr].original, Tensor)  # type: ignore[index]
