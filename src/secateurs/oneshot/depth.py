"""Depth pruning: remove whole blocks that change their input least (ShortGPT's block influence).

In a deep transformer many blocks barely change the hidden state that flows through them.
ShortGPT (Men et al. 2024) scores block ``i`` by its *block influence*
``BI_i = 1 - E[cos(x_i, x_{i+1})]``, one minus the mean cosine similarity, over calibration
tokens, of the hidden state entering the block and the one leaving it; the blocks with the
lowest influence go. Width (MLP channels, attention heads with their key/value groups) is
:func:`secateurs.shrink`'s job; this removes depth.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secateurs.errors import ConfigError, DataError, ModelError
from secateurs.oneshot.blocks import capture_block_inputs, find_blocks, run_block
from secateurs.provenance import record
from secateurs.running import EvalMode


@dataclass
class DepthReport:
    """What :func:`drop_blocks` measured and removed."""

    blocks: str  #: the qualified name of the block list
    influence: list[float]  #: block influence of every block, in order
    removed: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "influence": self.influence, "removed": self.removed}


def block_influence(
    model: nn.Module, data: Iterable[Any], calibration_batches: int | None = None
) -> tuple[str, list[float]]:
    """``(name of the block list, BI of each block)`` on the calibration batches ``data``."""
    found = find_blocks(model)
    if found is None:
        raise ModelError(
            f"{type(model).__name__} has no repeated blocks (a ModuleList of decoder layers) "
            "whose depth could be pruned"
        )
    path, blocks = found
    batches = [
        b for i, b in enumerate(data) if calibration_batches is None or i < calibration_batches
    ]
    if not batches:
        raise DataError("block influence needs calibration data: give at least one batch")
    with EvalMode(model), torch.no_grad():
        inputs = capture_block_inputs(model, blocks[0], batches)
        total = torch.zeros(len(blocks), dtype=torch.float64)
        tokens = 0
        for x in inputs:
            hidden = x.args[0]
            for i, block in enumerate(blocks):
                out = run_block(block, x.with_hidden(hidden))
                cos = nn.functional.cosine_similarity(
                    hidden.reshape(-1, hidden.shape[-1]).double(),
                    out.reshape(-1, out.shape[-1]).double(),
                    dim=-1,
                )
                total[i] += cos.sum()
                hidden = out
            tokens += hidden.reshape(-1, hidden.shape[-1]).shape[0]
    return path, (1.0 - total / tokens).tolist()


def drop_blocks(
    model: nn.Module,
    data: Iterable[Any],
    count: int,
    *,
    calibration_batches: int | None = None,
) -> nn.Module:
    """A copy of ``model`` without its ``count`` blocks of lowest block influence.

    The block list is rebuilt without them; a Hugging Face model's ``config.num_hidden_layers``
    and each attention layer's ``layer_idx`` are renumbered so its cache still works. The
    influence of every block and the indices removed are recorded on the copy:
    ``sc.report_of(small, DepthReport)``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count (blocks to remove) must be an int >= 1; got {count!r}")
    path, influence = block_influence(model, data, calibration_batches)
    if count >= len(influence):
        raise ConfigError(
            f"cannot remove {count} of {len(influence)} blocks: at least one must stay"
        )
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    removed = sorted(order[:count])
    small = copy.deepcopy(model)
    blocks = small.get_submodule(path)
    assert isinstance(blocks, nn.ModuleList)
    kept = [b for i, b in enumerate(blocks) if i not in removed]
    _renumber(kept)
    parent_name, _, attr = path.rpartition(".")
    parent = small.get_submodule(parent_name) if parent_name else small
    setattr(parent, attr, nn.ModuleList(kept))
    config = getattr(small, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(influence):
            config.layer_types = [t for i, t in enumerate(types) if i not in removed]
    record(small, DepthReport(path, influence, removed))
    return small


def _renumber(blocks: Sequence[nn.Module]) -> None:
    """Give the attention modules of ``blocks`` their new positions (``layer_idx``)."""
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", i)  # noqa: B010 - a plain int attribute
