"""Tracing: run the model once and record how its channels are coupled.

A :class:`~torch.overrides.TorchFunctionMode` sees every torch function the forward pass
calls, on real tensors, so data-dependent control flow, ``torch.no_grad()`` and eval mode are
all fine: the trace follows the path the example inputs take. Each call is handed to the rule
registered for its name in :mod:`secateurs.graph.rules`, which computes the output's channel
labels and records which ids are tied or pinned. An operation without a rule cannot be
guessed at: its channels are pinned (never removed) and the op is reported by name and module
path, so the result is always a correct model and the user sees what limited it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from secateurs.errors import ModelError
from secateurs.graph.rules import apply_rule
from secateurs.graph.state import TensorRef, TraceState, tensors_in
from secateurs.running import Inputs, run_example


class _Mode(TorchFunctionMode):
    def __init__(self, state: TraceState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        out = func(*args, **kwargs)
        apply_rule(self.state, func, args, kwargs, out)
        return out


def _register_refs(model: nn.Module, state: TraceState) -> None:
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False):
            state.refs.setdefault(id(p), TensorRef(mod_name, name, True))
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                state.refs.setdefault(id(b), TensorRef(mod_name, name, False))


def _tie_views(state: TraceState) -> None:
    """A parameter used both as a layer weight (ids per dimension) and elementwise (ids per
    element) is one tensor: element ``[.., i, ..]`` leaves with position ``i`` of each dim."""
    for (ref, dim), ids in state.dim_ids.items():
        elements = state.element_ids.get(ref)
        if elements is not None:
            rows = elements.movedim(dim, 0).reshape(elements.shape[dim], -1)
            state.ids.join_rows(ids, rows, f"{ref.qualname} used two ways")


def trace(model: nn.Module, example_inputs: Inputs) -> TraceState:
    """Run ``model`` on ``example_inputs`` once and record its channel coupling."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ModelError(
            "structural pruning needs plain weights, but the model has parametrizations "
            "(masks or shared weights); call sc.make_permanent_(model) first"
        )
    state = TraceState()
    _register_refs(model, state)
    names = {id(m): n for n, m in model.named_modules()}

    def enter(module: nn.Module, *_: Any) -> None:
        state.module_stack.append(names.get(id(module), state.module_stack[-1]))

    def leave(module: nn.Module, *_: Any) -> None:
        if len(state.module_stack) > 1:
            state.module_stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave, always_call=True))
    try:
        with _Mode(state):
            out = run_example(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    state.module_stack = [""]
    _tie_views(state)
    state.output_shapes = [tuple(t.shape) for t in tensors_in(out)]
    for t in tensors_in(out):
        if state.has_label(t):
            state.ids.pin(state.label(t), "a model output")
    if not state.weight_uses:
        raise ModelError(
            f"{type(model).__name__} ran no convolution or linear layer with its own weights "
            "on the example inputs, so it has no channels to remove"
        )
    return state
