"""Which tensors of a model are pruned.

A :class:`Target` is one prunable tensor (``features.0.weight``). By default the weights of the
layers that carry almost all parameters and compute are targets: Linear, Conv1d/2d/3d (grouped
and depthwise included), ConvTranspose1d/2d/3d, Embedding and MultiheadAttention's input and
output projections. ``include`` / ``exclude`` select by regular expression over qualified module
or tensor names, or by module type; ``params`` adds any other named parameter by pattern.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from secateurs.errors import ConfigError, ModelError
from secateurs.masks import get_mask, raw_parameter
from secateurs.selection import (
    Candidate,
    Selection,
    Selector,
    compile_selectors,
    describe,
    preview,
)

#: Module types whose listed tensors are pruned by default.
DEFAULT_TARGETS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("weight",),
    nn.Conv1d: ("weight",),
    nn.Conv2d: ("weight",),
    nn.Conv3d: ("weight",),
    nn.ConvTranspose1d: ("weight",),
    nn.ConvTranspose2d: ("weight",),
    nn.ConvTranspose3d: ("weight",),
    nn.Embedding: ("weight",),
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}


@dataclass(frozen=True)
class Target:
    """One prunable tensor of a model."""

    name: str  #: qualified tensor name, e.g. ``"features.0.weight"``
    module_name: str  #: qualified module name, e.g. ``"features.0"``
    module: nn.Module
    attr: str  #: attribute on the module, e.g. ``"weight"``

    @property
    def weight(self) -> Tensor:
        """The effective (masked) tensor."""
        value = getattr(self.module, self.attr)
        assert isinstance(value, Tensor)
        return value

    @property
    def raw(self) -> nn.Parameter:
        """The trainable tensor behind the mask."""
        return raw_parameter(self.module, self.attr)

    @property
    def mask(self) -> Tensor | None:
        return get_mask(self.module, self.attr)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def numel(self) -> int:
        return self.raw.numel()

    @property
    def transposed(self) -> bool:
        """True when dim 0 of the tensor is the input side (ConvTranspose stores
        ``[in, out, ...]``, Hugging Face's GPT-2 ``Conv1D`` ``[in, out]``)."""
        return isinstance(self.module, nn.modules.conv._ConvTransposeNd) or is_hf_conv1d(
            self.module
        )


def find_targets(
    model: nn.Module,
    include: Sequence[Selector] | None = None,
    exclude: Sequence[Selector] | None = None,
    params: Sequence[str] | None = None,
) -> list[Target]:
    """The tensors of ``model`` to prune, in module order.

    ``include``: only default-target layers matching one of these (regex over the module or
    tensor name, or a module type). ``exclude``: drop matches. ``params``: regexes over tensor
    names adding any other parameter (a bias, a bare ``nn.Parameter``). Every pattern must
    match something, otherwise the error names it: a typo must not silently prune nothing.
    """
    selection = Selection(include, exclude)
    params_s = compile_selectors(params, "params")
    used_params: set[int] = set()
    targets: list[Target] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        attrs = set(_default_attrs(module))
        own = _own_tensor_names(module)
        candidates = [a for a in own if a in attrs or params_s] + [a for a in attrs if a not in own]
        for attr in candidates:
            tensor_name = f"{module_name}.{attr}" if module_name else attr
            raw = raw_parameter(module, attr)
            if id(raw) in seen:
                continue
            candidate = Candidate(module_name, tensor_name, module)
            chosen = attr in attrs and selection.included(candidate) is not False
            for i, s in enumerate(params_s):
                if isinstance(s, str) and re.fullmatch(s, tensor_name):
                    used_params.add(i)
                    chosen = True
            if not chosen or selection.excluded(candidate):
                continue
            seen.add(id(raw))
            targets.append(Target(tensor_name, module_name, module, attr))
    selection.check_used("prunable layer", model, _prunable_names(model))
    for i, s in enumerate(params_s):
        if i not in used_params:
            raise ConfigError(
                f"params pattern {describe(s)} matches no parameter of {type(model).__name__}; "
                f"parameters: {preview([n for n, _ in model.named_parameters()])}"
            )
    if not targets:
        raise ModelError(
            f"{type(model).__name__} has nothing to prune: no Linear, Conv, ConvTranspose, "
            "Embedding or MultiheadAttention weights were selected. Use params=[regex] to name "
            "other parameters, or loosen include/exclude."
        )
    return targets


def default_attrs(module: nn.Module) -> tuple[str, ...]:
    """The tensors of ``module`` pruned by default (:data:`DEFAULT_TARGETS`, and the
    ``weight`` of Hugging Face's ``Conv1D``, GPT-2's linear layer with its weight transposed)."""
    for cls, attrs in DEFAULT_TARGETS.items():
        if isinstance(module, cls):
            return attrs
    return ("weight",) if is_hf_conv1d(module) else ()


def is_hf_conv1d(module: nn.Module) -> bool:
    """``transformers``' ``Conv1D`` (``y = x @ W + b``, ``W`` of shape ``[in, out]``), known by
    its name and shape so that secateurs does not import transformers."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def _default_attrs(module: nn.Module) -> list[str]:
    return [a for a in default_attrs(module) if _has_tensor(module, a)]


def _has_tensor(module: nn.Module, attr: str) -> bool:
    return isinstance(getattr(module, attr, None), Tensor)


def _own_tensor_names(module: nn.Module) -> list[str]:
    names = [n for n, _ in module.named_parameters(recurse=False)]
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None:
        names += list(parametrizations.keys())
    return names


def _prunable_names(model: nn.Module) -> list[str]:
    return [f"{m}.{a}" if m else a for m, mod in model.named_modules() for a in _default_attrs(mod)]
