"""Masks survive DistributedDataParallel (a one-process gloo group on the CPU)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import secateurs as sc


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
