"""Structural pruning of real architectures: every torchvision classification model and
Hugging Face transformers built from tiny configs (BERT, GPT-2, Llama with grouped- and
multi-query attention, ViT) prune exactly.

For each model the channel graph is built on an example input, about 30% of every prunable
group's prunable channels are removed at random, and the physically pruned model must

* run,
* give the masked model's output (the same positions zeroed in place) to 1e-4 of the
  output's scale,
* have lost channels and parameters.

Weights are randomised first (several torchvision models zero-init their classifier or layer
scales, which would make every output trivially equal), and the masked output must differ
from the dense one, so a wrong coupling cannot pass unnoticed. Nothing is skipped: a model
that cannot be pruned fails here with the error secateurs raised.

To stay fast on two cores the models are built without their default initialisation (our own
randomisation overwrites every parameter anyway), filled from a short random pattern rather
than by drawing hundreds of millions of random numbers, run on small inputs, and pruned in
place (mask, run, then slice the same model: the removed positions are the zeroed ones).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn

from secateurs.graph import apply_plan_, build_graph, mask_plan_, plan_from_removed
from secateurs.graph.groups import ChannelGraph

TORCHVISION_MODELS: list[str] = torchvision.models.list_models(module=torchvision.models)

#: side of the square example image; 32 unless the architecture needs more
IMAGE_SIDE: dict[str, int] = {
    "alexnet": 64,
    "inception_v3": 96,
    "maxvit_t": 224,  # every block's grid must divide into 7x7 partitions
    "vit_b_16": 32,
    "vit_l_16": 32,
    "vit_b_32": 64,
    "vit_l_32": 64,
    "vit_h_14": 28,
}

#: outcome of each model test run in this session, for the summary test at the end
RESULTS: dict[str, bool] = {}

REL_TOL = 1e-4
PERIOD = 65_521  # prime: rows of a filled matrix never repeat


# --------------------------------------------------------------------------- building


@contextlib.contextmanager
def skip_default_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s in-place initialisers no-ops while a model is built.

    Default initialisation of the largest models (vit_h_14, regnet_y_128gf: 600M+ weights)
    takes seconds; :func:`randomize_` overwrites every parameter afterwards anyway.
    """
    saved: dict[str, Callable[..., Any]] = {}
    for name in dir(nn.init):
        fn = getattr(nn.init, name)
        if name.endswith("_") and not name.startswith("_") and callable(fn):
            saved[name] = fn
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _fill_(t: Tensor, pattern: Tensor, offset: int, low: float, high: float) -> None:
    """Fill ``t`` with ``pattern`` (uniform in [0, 1), twice :data:`PERIOD` long) mapped to
    ``[low, high)``, tiled from ``offset``: random-looking values at the speed of a copy."""
    chunk = pattern[offset : offset + PERIOD] * (high - low) + low
    flat = torch.empty(t.numel(), dtype=t.dtype)
    full = t.numel() // PERIOD
    if full:
        flat[: full * PERIOD].view(full, PERIOD).copy_(chunk.expand(full, PERIOD))
    rest = t.numel() - full * PERIOD
    flat[full * PERIOD :].copy_(chunk[:rest])
    t.copy_(flat.view_as(t))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm statistic distinct non-zero values.

    Weights of two or more dims: uniform with std ``1/sqrt(fan_in)``; 1-D scales in
    [0.5, 1.5); biases small; running variances positive. Other buffers (relative position
    tables, indices) are part of the architecture and are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.rand(2 * PERIOD, generator=gen)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            offset = (i * 7919) % PERIOD
            if p.dim() >= 2:
                bound = math.sqrt(3.0 / max(p[0].numel(), 1))
                _fill_(p, pattern, offset, -bound, bound)
            elif name.endswith("bias"):
                _fill_(p, pattern, offset, -0.1, 0.1)
            else:
                _fill_(p, pattern, offset, 0.5, 1.5)
        for i, m in enumerate(model.modules()):
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                assert m.running_var is not None
                _fill_(m.running_mean, pattern, i % PERIOD, -0.1, 0.1)
                _fill_(m.running_var, pattern, (i * 31) % PERIOD, 0.5, 1.5)
    return model.eval()


def torchvision_model(name: str) -> tuple[nn.Module, Tensor]:
    """The named torchvision model (10 classes, random weights) and an example image."""
    side = IMAGE_SIDE.get(name, 32)
    kwargs: dict[str, Any] = {"num_classes": 10}
    if name.startswith("vit_"):
        kwargs["image_size"] = side
    if name.startswith("maxvit"):
        kwargs["input_size"] = (side, side)
    with skip_default_init(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inception's "default init will change"
        model = torchvision.models.get_model(name, **kwargs)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    return randomize_(model), x


def _bert() -> tuple[nn.Module, Any]:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(config), {"input_ids": _tokens(12)}


def _gpt2() -> tuple[nn.Module, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=100,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config), {"input_ids": _tokens(12)}


def _llama(kv_heads: int) -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,  # fewer than the query heads: grouped-query attention
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config), {"input_ids": _tokens(12)}


def _vit() -> tuple[nn.Module, Any]:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ViTForImageClassification(config), {"pixel_values": x}


def _tokens(n: int) -> Tensor:
    return torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(1))


#: Hugging Face models built from tiny configs (random weights, never downloaded)
TRANSFORMERS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "bert": _bert,
    "gpt2": _gpt2,
    "llama-gqa": lambda: _llama(2),
    "llama-mqa": lambda: _llama(1),  # one key/value head: its head dim looks like channels
    "vit": _vit,
}


# --------------------------------------------------------------------------- checking


def random_removal(graph: ChannelGraph, seed: int = 0, fraction: float = 0.3) -> dict[int, Tensor]:
    """Remove about ``fraction`` of each prunable group's prunable channels, never all."""
    gen = torch.Generator().manual_seed(seed)
    removed = {}
    for group in graph.prunable_groups:
        candidates = group.prunable.nonzero().flatten()
        k = max(1, round(fraction * len(candidates)))
        k = min(k, len(candidates), group.size - 1)
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:k]]
        mask = torch.zeros(group.size, dtype=torch.bool)
        mask[chosen] = True
        removed[group.index] = mask
    return removed


def _run(model: nn.Module, inputs: Any) -> Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping):  # e.g. segmentation's {"out": ..., "aux": ...}
        return torch.cat([v.flatten() for v in out.values() if isinstance(v, Tensor)])
    first = out[0]
    assert isinstance(first, Tensor)
    return first


def check_prunes_exactly(name: str, model: nn.Module, inputs: Any) -> None:
    """Build the graph, remove channels at random, and compare pruned with masked."""
    RESULTS[name] = False
    model.eval()
    dense = _run(model, inputs)
    graph = build_graph(model, inputs)
    assert graph.prunable_groups, f"{name}: no prunable channel group"
    plan = plan_from_removed(graph, random_removal(graph))
    assert plan.num_removed > 0, f"{name}: the plan removes nothing"

    params_before = sum(p.numel() for p in model.parameters())
    masked = _run(mask_plan_(model, plan), inputs)
    pruned = _run(apply_plan_(model, plan), inputs)  # same model: removes the zeroed positions
    params_after = sum(p.numel() for p in model.parameters())

    scale = masked.abs().max().item()
    assert scale > 0 and math.isfinite(scale), f"{name}: masked output scale {scale}"
    assert (masked - dense).abs().max().item() > 1e-3 * scale, (
        f"{name}: removing channels did not change the output, so the check proves nothing"
    )
    assert pruned.shape == masked.shape
    err = (pruned - masked).abs().max().item() / scale
    assert err <= REL_TOL, f"{name}: pruned differs from masked by {err:.2e} of the output scale"
    assert params_after < params_before, f"{name}: parameters {params_before} -> {params_after}"
    RESULTS[name] = True


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_model_prunes_exactly(name: str) -> None:
    model, x = torchvision_model(name)
    check_prunes_exactly(name, model, x)


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformers_model_prunes_exactly(name: str) -> None:
    torch.manual_seed(0)
    model, inputs = TRANSFORMERS[name]()
    check_prunes_exactly(f"transformers:{name}", randomize_(model), inputs)


#: attention heads that are whole channels: (model, query projection, heads per channel)
HEADS = {
    "bert": ("bert.encoder.layer.0.attention.self.query", 4, 1),
    "llama-gqa": ("model.layers.0.self_attn.q_proj", 2, 2),
    "vit": ("vit.layers.0.attention.q_proj", 4, 1),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_transformer_heads_are_whole_channels_with_their_key_value_heads(name: str) -> None:
    """Hugging Face attention splits channels with ``view(..., -1, head_dim)``: each head
    (with grouped queries: each key/value head and its query heads) is one channel."""
    model, inputs = TRANSFORMERS[name]()
    query, channels, per = HEADS[name]
    graph = build_graph(model.eval(), inputs)
    group, member = next(
        (g, m)
        for g in graph.groups
        for m in g.members
        if m.ref.qualname == f"{query}.weight" and m.dim == 0
    )
    assert group.size == channels and group.num_prunable == channels
    assert member.channel.tolist() == [c for c in range(channels) for _ in range(per * 16)]


def test_zoo_summary() -> None:
    """Every torchvision classification model is tested (none left out), and of those that
    ran in this session, report how many pruned exactly; all of them must have."""
    assert len(TORCHVISION_MODELS) >= 80
    assert torchvision.models.list_models(module=torchvision.models) == TORCHVISION_MODELS
    tv = [n for n in RESULTS if not n.startswith("transformers:")]
    hf = [n for n in RESULTS if n.startswith("transformers:")]
    passed_tv = sum(RESULTS[n] for n in tv)
    passed_hf = sum(RESULTS[n] for n in hf)
    print(
        f"\nstructural pruning is exact for {passed_tv}/{len(tv)} torchvision models run "
        f"(of {len(TORCHVISION_MODELS)}) and {passed_hf}/{len(hf)} transformers configs"
    )
    failed = sorted(n for n, ok in RESULTS.items() if not ok)
    assert not failed, f"models that did not prune exactly: {failed}"
