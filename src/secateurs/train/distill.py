"""Knowledge distillation for recovery: the pruned student learns from the dense teacher.

The loss of one batch is (Hinton et al. 2015, plus FitNets-style feature matching)::

    (1 - alpha) * task_loss
    + alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))
    + beta * sum over (s, t) in features of MSE(student.s output, teacher.t output)

``T`` (``temperature``) softens both distributions so the student also learns how the
teacher ranks the wrong classes; the soft targets' gradients shrink as ``1 / T**2``, which the
``T**2`` factor undoes, so ``alpha`` means the same at any temperature. Classes lie along
dim 1 of the outputs (as for ``cross_entropy``); the KL is summed over classes and averaged
over every other position (over the batch for ``[batch, classes]`` logits).

The teacher only ever runs in eval mode under ``torch.no_grad``: it gets no gradients and its
BatchNorm statistics do not move. Feature maps are captured with forward hooks that
:meth:`Distillation.close` (or leaving a ``with`` block) removes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from secateurs.errors import ConfigError


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, classes along dim 1.

    Summed over classes, averaged over the batch (and any other position), computed in
    float32. Differentiable in ``student``; ``teacher`` is treated as a constant.
    """
    if student.shape != teacher.shape:
        raise ConfigError(
            f"student output shape {tuple(student.shape)} does not match teacher output shape "
            f"{tuple(teacher.shape)}"
        )
    t = float(temperature)
    log_s = torch.log_softmax(student.float() / t, dim=1)
    log_t = torch.log_softmax(teacher.detach().float() / t, dim=1)
    kl = nn.functional.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1)
    return t * t * kl.mean()


def _logits(output: Any, who: str) -> Tensor:
    """The logits in a model's output: a tensor, or an output object's ``logits``."""
    if isinstance(output, Tensor):
        return output
    logits = (
        output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    )
    if isinstance(logits, Tensor):
        return logits
    raise ConfigError(
        f"the {who}'s output is a {type(output).__name__}; distillation needs a tensor of "
        "logits (or an output with a .logits tensor)"
    )


def _to_device(inputs: Any, model: nn.Module) -> Any:
    if not isinstance(inputs, Tensor):
        return inputs
    for p in model.parameters():
        return inputs.to(p.device) if inputs.device != p.device else inputs
    return inputs


def _names_preview(model: nn.Module, limit: int = 10) -> str:
    names = [n for n, _ in model.named_modules() if n]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) or "(no submodules)"


@dataclass
class Distillation:
    """Distill a dense ``teacher`` into a (pruned) ``student``; see the module docstring.

    A plain config (``temperature``, ``alpha``, ``beta``, ``features`` mapping a student
    module name to the teacher module whose output it should reproduce) until :meth:`bind`
    attaches it to two models. Bound, it is a :class:`~secateurs.train.LossTerm` whose
    ``task_weight`` is ``1 - alpha``::

        with Distillation(alpha=0.9).bind(teacher, student, example_inputs) as kd:
            train(student, loader, config, loss_terms=[kd])

    or, in a loop of one's own, ``loss = kd.loss(task_loss, inputs=x, outputs=student(x))``.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    beta: float = 1.0
    features: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, ok, allowed in (
            ("temperature", self._number("temperature") and self.temperature > 0, "> 0"),
            ("alpha", self._number("alpha") and 0 <= self.alpha <= 1, "in [0, 1]"),
            ("beta", self._number("beta") and self.beta >= 0, ">= 0"),
        ):
            if not ok:
                raise ConfigError(
                    f"distillation {key} = {getattr(self, key)!r} is invalid; must be a finite "
                    f"number {allowed}"
                )
        if not isinstance(self.features, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.features.items()
        ):
            raise ConfigError(
                "distillation features must map student module names to teacher module names "
                f"(strings); got {self.features!r}"
            )
        self.features = dict(self.features)
        self.teacher_: nn.Module | None = None
        self.student_: nn.Module | None = None
        self._handles: list[RemovableHandle] = []
        self._student_features: dict[str, Any] = {}
        self._teacher_features: dict[str, Any] = {}

    def _number(self, key: str) -> bool:
        value = getattr(self, key)
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )

    @property
    def task_weight(self) -> float:
        """The weight of the task loss, ``1 - alpha``."""
        return 1.0 - float(self.alpha)

    # -- binding -------------------------------------------------------------------------
    def bind(self, teacher: nn.Module, student: nn.Module, example_inputs: Any) -> Self:
        """Attach to ``teacher`` and ``student`` and check them on ``example_inputs``; returns self.

        Both models run once on ``example_inputs`` (under ``no_grad``, the student briefly in
        eval mode so its BatchNorm statistics do not move). A :class:`ConfigError` that names
        both shapes is raised when their outputs or a pair of matched features differ in
        shape, and one that lists the modules when a named layer does not exist; then no hook
        is left behind. The teacher is put in eval mode and stays there.
        """
        self.close()
        if teacher is student:
            raise ConfigError(
                "the teacher and the student are the same module; pass a copy of the dense "
                "model as the teacher (copy.deepcopy(model) before pruning)"
            )
        student_params = {id(p) for p in student.parameters()}
        shared = [n for n, p in teacher.named_parameters() if id(p) in student_params]
        if shared:
            raise ConfigError(
                f"the teacher and the student share {len(shared)} parameter(s) (e.g. "
                f"{shared[0]!r}), so training the student would change the teacher; pass "
                "copy.deepcopy(model) as the teacher"
            )
        student_modules = dict(student.named_modules())
        teacher_modules = dict(teacher.named_modules())
        for s_name, t_name in self.features.items():
            for who, name, modules, model in (
                ("student", s_name, student_modules, student),
                ("teacher", t_name, teacher_modules, teacher),
            ):
                if name not in modules:
                    raise ConfigError(
                        f"distillation features: the {who} has no module named {name!r}; its "
                        f"modules: {_names_preview(model)}"
                    )
        for s_name, t_name in self.features.items():
            self._handles.append(
                student_modules[s_name].register_forward_hook(
                    _capture(self._student_features, s_name)
                )
            )
            self._handles.append(
                teacher_modules[t_name].register_forward_hook(
                    _capture(self._teacher_features, t_name)
                )
            )
        teacher_mode = teacher.training
        try:
            teacher.eval()
            student_mode = student.training
            try:
                student.eval()
                with torch.no_grad():
                    student_out = _logits(student(_to_device(example_inputs, student)), "student")
                    teacher_out = _logits(teacher(_to_device(example_inputs, teacher)), "teacher")
            finally:
                student.train(student_mode)
            if student_out.shape != teacher_out.shape:
                raise ConfigError(
                    f"the teacher's output shape {tuple(teacher_out.shape)} does not match the "
                    f"student's {tuple(student_out.shape)}; distillation needs the same logits "
                    "layout (same classes)"
                )
            if student_out.dim() < 2 or not student_out.is_floating_point():
                raise ConfigError(
                    f"distillation needs floating-point logits shaped [batch, classes, ...]; "
                    f"the models output {student_out.dtype} of shape {tuple(student_out.shape)}"
                )
            self._feature_pairs()
        except BaseException:
            teacher.train(teacher_mode)
            self.close()
            raise
        finally:
            self._student_features.clear()
            self._teacher_features.clear()
        self.teacher_, self.student_ = teacher, student
        return self

    def close(self) -> None:
        """Remove the feature hooks and forget the models (binding again is allowed)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._student_features.clear()
        self._teacher_features.clear()
        self.teacher_ = self.student_ = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- loss ----------------------------------------------------------------------------
    def __call__(self, *, inputs: Any, outputs: Any, labels: Any = None, step: int = 0) -> Tensor:
        """``alpha * T**2 * KL + beta * feature MSE`` for a batch the student just ran on.

        ``outputs`` is the student's output on ``inputs``; the teacher runs on ``inputs``
        here. Student features are those captured by that forward pass. ``labels`` and
        ``step`` are unused (they make this a loss term of :func:`~secateurs.train.train`,
        which scales the task loss by :attr:`task_weight`).
        """
        teacher = self.teacher_
        if teacher is None:
            raise ConfigError("Distillation is not bound; call .bind(teacher, student, inputs)")
        if teacher.training:
            teacher.eval()
        try:
            with torch.no_grad():
                teacher_out = _logits(teacher(_to_device(inputs, teacher)), "teacher")
            student_out = _logits(outputs, "student")
            loss = self.alpha * kd_loss(
                student_out, teacher_out.to(student_out.device), self.temperature
            )
            pairs = self._feature_pairs()
            for s, t in pairs:
                loss = loss + self.beta * nn.functional.mse_loss(s.float(), t.to(s.device).float())
        finally:
            self._student_features.clear()
            self._teacher_features.clear()
        return loss

    def loss(self, task_loss: Tensor, *, inputs: Any, outputs: Any) -> Tensor:
        """The whole loss: ``(1 - alpha) * task_loss`` plus this term (for one's own loop)."""
        return self.task_weight * task_loss + self(inputs=inputs, outputs=outputs)

    def _feature_pairs(self) -> list[tuple[Tensor, Tensor]]:
        pairs: list[tuple[Tensor, Tensor]] = []
        for s_name, t_name in self.features.items():
            found: list[Tensor] = []
            for who, name, store in (
                ("student", s_name, self._student_features),
                ("teacher", t_name, self._teacher_features),
            ):
                if name not in store:
                    raise ConfigError(
                        f"distillation features: the {who}'s module {name!r} did not run in the "
                        "last forward pass; compute the loss right after the student's forward "
                        "pass, and name modules that forward() actually calls"
                    )
                value = store[name]
                if not isinstance(value, Tensor):
                    raise ConfigError(
                        f"distillation features: the {who}'s module {name!r} outputs a "
                        f"{type(value).__name__}, not a tensor; name a module that returns one"
                    )
                found.append(value)
            s, t = found
            if s.shape != t.shape:
                raise ConfigError(
                    f"distillation features: student {s_name!r} has shape {tuple(s.shape)} but "
                    f"teacher {t_name!r} has shape {tuple(t.shape)}; match layers of the same "
                    "shape (channel pruning changes widths: pick layers it does not shrink)"
                )
            pairs.append((s, t))
        return pairs


def _capture(store: dict[str, Any], name: str) -> Callable[[nn.Module, Any, Any], None]:
    """A forward hook that keeps the module's latest output in ``store[name]``."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[name] = output

    return hook
