"""Finding a model's repeated blocks, and feeding them their inputs one block at a time.

Transformers keep their decoder (or encoder) layers in one ``nn.ModuleList`` of modules of one
class (``model.model.layers`` in Llama, ``transformer.h`` in GPT-2, ``encoder.layer`` in
BERT). :func:`find_blocks` looks for that list among the model's modules; it does not know
any architecture by name. :func:`capture_block_inputs` runs the model on each calibration
batch until the first block is called and keeps exactly what it was called with (hidden
states, attention mask, position embeddings, ...); :func:`run_block` calls a block on such an
input, and :meth:`BlockInput.with_hidden` gives the next block its input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.errors import DataError, ModelError
from secateurs.running import device_of, forward_error, to_device
from secateurs.targets import Target


@dataclass
class Batch:
    """One calibration batch as the model is called with it."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def of(batch: Any) -> Batch:
        """A tensor (token ids), an ``(inputs, labels)`` pair (inputs only), a tuple of
        positional inputs, or a mapping of keyword inputs."""
        if isinstance(batch, Batch):
            return batch
        if isinstance(batch, Tensor):
            return Batch((batch,))
        if isinstance(batch, Mapping):
            return Batch((), dict(batch))
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return Batch.of(batch[0])  # (inputs, labels): the labels are not the model's
        if isinstance(batch, (tuple, list)):
            return Batch(tuple(batch))
        raise DataError(
            "calibration batches must be tensors (token ids), (inputs, labels) pairs or "
            f"mappings of keyword tensors; got {type(batch).__name__}"
        )

    def to(self, device: torch.device | None) -> Batch:
        return Batch(to_device(self.args, device), to_device(self.kwargs, device))


@dataclass
class BlockInput:
    """What one block was called with on one batch: the hidden states first."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def with_hidden(self, hidden: Tensor) -> BlockInput:
        """The same call with other hidden states (the previous block's output)."""
        return BlockInput((hidden, *self.args[1:]), self.kwargs)


class _Stop(Exception):
    """Raised by the capture hook once the first block has its inputs."""


def find_blocks(
    model: nn.Module, targets: Sequence[Target] = ()
) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the ``nn.ModuleList`` (of two or more modules of one class)
    holding the most parameters, among those that hold a target when ``targets`` is given;
    ``(its qualified name, the list)``, or None."""
    best: tuple[int, str, nn.ModuleList] | None = None
    target_modules = {id(t.module) for t in targets}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if target_modules and not any(
            id(m) in target_modules for child in module for m in child.modules()
        ):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: Sequence[Any]
) -> list[BlockInput]:
    """Run ``model`` on each batch until ``block`` is called; its inputs, one per batch."""
    captured: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(BlockInput(_detach(args), _detach(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = device_of(model)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:  # a Hugging Face model: no key/value cache to carry between blocks
        config.use_cache = False  # type: ignore[union-attr]
    try:
        for raw in batches:
            batch = Batch.of(raw).to(device)
            try:
                model(*batch.args, **batch.kwargs)
            except _Stop:
                continue
            except Exception as exc:
                raise forward_error(model, raw, exc, "a calibration batch") from exc
            raise ModelError(
                f"{type(model).__name__} finished a forward pass without calling its first "
                "block; the blocks found are not on the path of the inputs"
            )
    finally:
        handle.remove()
        if use_cache:
            config.use_cache = use_cache  # type: ignore[union-attr]
    return captured


def run_block(block: nn.Module, inputs: BlockInput) -> Tensor:
    """The hidden states ``block`` returns for ``inputs`` (the first output of a tuple)."""
    out = block(*inputs.args, **inputs.kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise ModelError(
            f"{type(block).__name__} returned {type(out).__name__}; the engine needs the hidden "
            "states as a tensor (or the first item of a tuple)"
        )
    return out.detach()


def _detach(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(v) for v in obj)
    if isinstance(obj, list):
        return [_detach(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj
