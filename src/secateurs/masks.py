"""How a pruning mask lives on a module.

A mask is a ``bool`` buffer (one byte per weight) inside a ``torch.nn.utils.parametrize``
parametrization whose forward returns ``original * mask``. Reading ``module.weight`` therefore
always gives the masked tensor, whatever an optimizer did to the raw values (momentum, weight
decay and Adam state cannot revive a pruned weight), and the mask follows the module through
``state_dict``, ``copy.deepcopy``, ``.to(device)`` and ``.to(dtype)`` (a bool buffer is never cast)
because it is an ordinary buffer. The raw parameter object is kept, so an optimizer built before
pruning still updates it.

:func:`make_permanent_` bakes the masks in and removes the parametrizations: the model is a plain
``nn.Module`` again whose ``state_dict`` loads strictly into the original class.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateurs.errors import ModelError


class Baked(nn.Module):
    """Base of secateurs' parametrizations: :func:`make_permanent_` bakes every one of them in.

    ``param_order`` remembers the module's parameter names in their order before the first
    parametrization moved the tensor away, so that baking puts it back in its place
    (``state_dict`` keys in the unpruned model's order: ``weight`` before ``bias``).
    """

    param_order: tuple[str, ...] = ()


def register_baked(module: nn.Module, name: str, parametrization: Baked) -> None:
    """Parametrize ``module.<name>`` with ``parametrization``, remembering where it stood."""
    if not parametrize.is_parametrized(module, name):
        parametrization.param_order = tuple(module._parameters)
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)


class Mask(Baked):
    """Parametrization multiplying a tensor by a fixed boolean mask."""

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask


def _parametrization_list(module: nn.Module, name: str) -> nn.ModuleList:
    plist = module.parametrizations[name]  # type: ignore[index]
    assert isinstance(plist, nn.ModuleList)
    return plist


def get_mask(module: nn.Module, name: str) -> Tensor | None:
    """The mask on ``module.<name>``, or ``None`` when the tensor is not masked."""
    if not parametrize.is_parametrized(module, name):
        return None
    for p in _parametrization_list(module, name):
        if isinstance(p, Mask):
            return p.mask
    return None


def raw_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """The trainable tensor behind ``module.<name>``, unmasked (what an optimizer updates)."""
    if parametrize.is_parametrized(module, name):
        original = _parametrization_list(module, name).original
        assert isinstance(original, nn.Parameter)
        return original
    param = getattr(module, name)
    if not isinstance(param, nn.Parameter):
        raise ModelError(f"{type(module).__name__}.{name} is not a parameter")
    return param


def set_mask(module: nn.Module, name: str, mask: Tensor) -> None:
    """Attach ``mask`` to ``module.<name>``, or replace the mask already there.

    The mask tensor is kept as is (not copied): pass one nobody else mutates.
    The raw values at pruned positions are zeroed too, so a later :func:`make_permanent_`,
    a regrowth that unmasks them, or a reader of the raw parameter never sees stale values.
    """
    current = get_mask(module, name)
    raw = raw_parameter(module, name)
    if mask.shape != raw.shape:
        raise ModelError(
            f"mask of shape {tuple(mask.shape)} does not fit {name} of shape {tuple(raw.shape)}"
        )
    mask = mask.to(device=raw.device, dtype=torch.bool)
    if current is None:
        register_baked(module, name, Mask(mask))
    else:
        current.copy_(mask)
    with torch.no_grad():
        raw.masked_fill_(~mask, 0)


def bake_(module: nn.Module, name: str) -> None:
    """Bake the parametrization of ``module.<name>`` into its values and drop it.

    ``copy.deepcopy`` of a parametrized module shares the injected class, and torch removes a
    parametrization by deleting its property from that class, which would break every copy.
    The module gets a class of its own first, so copies are unaffected.
    """
    order = next(
        (p.param_order for p in _parametrization_list(module, name) if isinstance(p, Baked)), ()
    )
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    params = module._parameters
    if order:
        ordered = {k: params[k] for k in order if k in params}
        ordered.update((k, v) for k, v in params.items() if k not in ordered)
        params.clear()
        params.update(ordered)


def remove_mask(module: nn.Module, name: str) -> None:
    """Bake the mask of ``module.<name>`` into its values and drop the parametrization."""
    if get_mask(module, name) is not None:
        bake_(module, name)


def iter_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """Every masked tensor: (qualified name, module, attribute name, mask)."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        parametrizations = module.parametrizations
        assert isinstance(parametrizations, nn.ModuleDict)
        for name in list(parametrizations.keys()):
            mask = get_mask(module, name)
            if mask is not None:
                yield (f"{module_name}.{name}" if module_name else name), module, name, mask


def collect_masks(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every mask in ``model``, keyed by qualified tensor name."""
    return {name: mask.clone() for name, _, _, mask in iter_masks(model)}


def make_permanent_(model: nn.Module) -> nn.Module:
    """Bake every mask (and shared-weight codebook) into its weights, in place.

    Afterwards the model is a plain module of its original class: pruned weights are stored
    as zeros and ``model.state_dict()`` has the original keys. Parametrizations that are not
    secateurs' own are left alone. Returns ``model``.
    """
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        parametrizations = module.parametrizations
        assert isinstance(parametrizations, nn.ModuleDict)
        for name in list(parametrizations.keys()):
            if all(isinstance(p, Baked) for p in _parametrization_list(module, name)):
                bake_(module, name)
    return model


def apply_masks_(model: nn.Module, masks_by_name: Mapping[str, Tensor]) -> nn.Module:
    """Attach masks given by qualified tensor name (as returned by :func:`collect_masks`), in place.

    All names and shapes are checked before anything is attached, so a bad mapping leaves
    the model untouched.
    """
    modules = dict(model.named_modules())
    resolved: list[tuple[nn.Module, str, Tensor]] = []
    for qualified, mask in masks_by_name.items():
        module_name, _, attr = qualified.rpartition(".")
        module = modules.get(module_name)
        if module is None or not hasattr(module, attr):
            raise ModelError(f"no tensor named {qualified!r} in {type(model).__name__}")
        shape = raw_parameter(module, attr).shape
        if tuple(mask.shape) != tuple(shape):
            raise ModelError(
                f"mask for {qualified!r} has shape {tuple(mask.shape)}, tensor has {tuple(shape)}"
            )
        resolved.append((module, attr, mask))
    for module, attr, mask in resolved:
        set_mask(module, attr, mask.clone())
    return model


def load_masked_state_dict_(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load a state dict saved from a masked model into an unmasked model of the same class.

    The masks found in ``state_dict`` (keys ``*.parametrizations.<name>.0.mask``) are
    attached first, then the state is loaded strictly.
    """
    suffix = ".0.mask"
    found: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(suffix) and (
            ".parametrizations." in key or key.startswith("parametrizations.")
        ):
            module_name, _, rest = key.partition(".parametrizations.")
            if key.startswith("parametrizations."):
                module_name, rest = "", key[len("parametrizations.") :]
            attr = rest[: -len(suffix)]
            found[f"{module_name}.{attr}" if module_name else attr] = value
    apply_masks_(model, found)
    model.load_state_dict(state_dict, strict=True)
    return model
