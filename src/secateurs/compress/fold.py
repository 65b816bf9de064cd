"""Folding BatchNorm into the layer before it: one op fewer per layer in the shipped model.

In eval mode a BatchNorm is a per-channel affine map, ``y = (x - mean) / sqrt(var + eps) *
gamma + beta``; when ``x`` is the output of a convolution or Linear layer read by nothing else,
the map folds into that layer's weight (each output channel scaled) and bias, and the BatchNorm
disappears. The MACs do not change, but on a CPU the norms take 8-20% of the dense time at
batch 64 on the speed benchmark's models and follow the channel count rather than the MACs;
folding removes them from the dense and the shrunk network alike (the README's speed section
says what that bought: most on MobileNetV2, noise on the ResNets). A zero weight
stays zero (only whole rows are scaled), so a sparse layer keeps its sparsity.
"""

from __future__ import annotations

import copy

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from secateurs.errors import ConfigError, ModelError
from secateurs.masks import iter_masks

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm that reads only the output of a
    convolution (not transposed) or Linear layer, and is that output's only reader, folded
    into the layer's weight and bias. Other BatchNorms stay (and run as before).

    The copy is a :class:`torch.fx.GraphModule`, so ``model`` must be traceable by
    ``torch.fx`` (torchvision's classification models are); ``model`` itself is not changed.
    Fold after pruning is made permanent (no masks) and before sparse kernels are swapped in.
    A BatchNorm1d after a Linear is folded as normalising its features, which holds for the
    usual ``(batch, features)`` input.
    """
    if any(True for _ in iter_masks(model)):
        raise ConfigError(
            "fold_batchnorm needs plain weights: this model still has pruning masks; call "
            "secateurs.make_permanent_(model) first"
        )
    try:
        traced = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        raise ModelError(
            f"fold_batchnorm traces the model with torch.fx, which failed on "
            f"{type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        norm = _module_of(node, modules)
        source = node.args[0] if node.args else None
        if not isinstance(norm, _BatchNorm) or not isinstance(source, fx.Node):
            continue
        layer = _module_of(source, modules)
        if not isinstance(layer, (*_CONVS, nn.Linear)) or len(source.users) != 1:
            continue
        folded = _fold(layer, norm)
        if folded is None:
            continue
        parent, _, name = str(source.target).rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name, folded)
        modules[str(source.target)] = folded
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def _module_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None


def _fold(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear, norm: _BatchNorm
) -> nn.Module | None:
    """``layer`` with ``norm`` folded in, or None when they do not line up: no running
    statistics, another channel count, a Linear's BatchNorm over more than features. Both are
    modules of the eval-mode traced copy, which is what PyTorch's fusion helpers require."""
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if not norm.track_running_stats or norm.running_mean is None or norm.num_features != channels:
        return None
    if isinstance(layer, nn.Linear):
        if not isinstance(norm, nn.BatchNorm1d):
            return None
        return fuse_linear_bn_eval(layer, norm)
    return fuse_conv_bn_eval(layer, norm)
