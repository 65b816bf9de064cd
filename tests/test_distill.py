"""Distillation from the dense teacher: the loss formula, hooks, the teacher and bad input."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import secateurs as sc
from helpers import snapshot
from secateurs.errors import ConfigError
from secateurs.train import Distillation, TrainConfig, kd_loss, train


def _mlp(seed: int, classes: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, classes))


def _hooks(*models: nn.Module) -> int:
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


def _kl_by_hand(student: Tensor, teacher: Tensor, t: float) -> Tensor:
    p_t = torch.softmax(teacher / t, dim=1)
    log_p_s = torch.log_softmax(student / t, dim=1)
    return (p_t * (p_t.log() - log_p_s)).sum(1).mean()


def test_loss_equals_the_formula() -> None:
    teacher, student = _mlp(0), _mlp(1)
    x, y = torch.randn(6, 16), torch.arange(6) % 8
    with Distillation(temperature=3.0, alpha=0.7).bind(teacher, student, x) as kd:
        out = student(x)
        term = kd(inputs=x, outputs=out, labels=y, step=0)
        expected = 0.7 * 9.0 * _kl_by_hand(out, teacher(x).detach(), 3.0)
        assert torch.allclose(term, expected, rtol=1e-5)
        task = nn.functional.cross_entropy(out, y)
        out = student(x)
        total = kd.loss(task, inputs=x, outputs=out)
        assert torch.allclose(total, 0.3 * task + expected, rtol=1e-5)
        assert kd.task_weight == pytest.approx(0.3)


def test_t_squared_keeps_gradients_the_same_size_at_any_temperature() -> None:
    """Soft-target gradients shrink as 1/T**2; the T**2 factor undoes it (Hinton et al.)."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    student, teacher = student - student.mean(1, keepdim=True), teacher - teacher.mean(1, True)
    grads = []
    for t in (20.0, 40.0, 80.0):
        s = student.clone().requires_grad_(True)
        kd_loss(s, teacher, t).backward()
        assert s.grad is not None
        grads.append(s.grad)
        expected = t * t * _kl_by_hand(student, teacher, t)
        assert torch.allclose(kd_loss(student, teacher, t), expected, rtol=1e-3)
    # high-temperature limit: d/ds = (s - t) / (classes * batch), whatever T is
    limit = (student - teacher) / (10 * 4)
    norms = [float(grad.norm()) for grad in grads]
    assert max(norms) < 1.05 * min(norms)  # unscaled, they would shrink 16-fold from T=20 to 80
    for grad in grads:
        assert float((grad - limit).norm()) < 0.05 * float(limit.norm())


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 5),
    classes=st.integers(2, 7),
    temperature=st.floats(0.5, 10.0),
    shift=st.floats(-5.0, 5.0),
    seed=st.integers(0, 1000),
)
def test_kd_loss_properties(
    batch: int, classes: int, temperature: float, shift: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    s, t = (
        3 * torch.randn(batch, classes, generator=g),
        3 * torch.randn(batch, classes, generator=g),
    )
    value = kd_loss(s, t, temperature)
    assert float(value) >= -1e-6
    assert float(kd_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-5)
    # softmax ignores a constant added to every logit of a row
    assert float(kd_loss(s + shift, t, temperature)) == pytest.approx(float(value), abs=1e-4)
    # classes lie along dim 1: [batch, classes, positions] averages over positions
    spatial = kd_loss(
        s.unsqueeze(-1).expand(-1, -1, 3), t.unsqueeze(-1).expand(-1, -1, 3), temperature
    )
    assert float(spatial) == pytest.approx(float(value), rel=1e-4, abs=1e-6)


def test_feature_matching() -> None:
    teacher, student = _mlp(0), _mlp(1)
    x = torch.randn(5, 16)
    kd = Distillation(alpha=0.5, beta=2.0, features={"1": "1", "0": "0"})
    with kd.bind(teacher, student, x):
        assert _hooks(teacher, student) == 4
        out = student(x)
        term = kd(inputs=x, outputs=out, labels=None, step=0)
        with torch.no_grad():
            t0 = teacher[0](x)
        s0 = student[0](x)
        mse = nn.functional.mse_loss(s0, t0) + nn.functional.mse_loss(s0.relu(), t0.relu())
        expected = 0.5 * 16.0 * _kl_by_hand(out, teacher(x), 4.0) + 2.0 * mse
        assert torch.allclose(term, expected, rtol=1e-5)
        term.backward()
        assert student[0].weight.grad is not None  # the feature term reaches early layers
        with pytest.raises(ConfigError, match="did not run in the last forward pass"):
            kd(inputs=x, outputs=out.detach(), labels=None, step=0)
    assert _hooks(teacher, student) == 0


def test_feature_shape_mismatch_and_unknown_layers() -> None:
    teacher, student = _mlp(0), _mlp(1)
    x = torch.randn(2, 16)
    with pytest.raises(
        ConfigError, match=r"student '0' has shape \(2, 32\) but teacher '2' has shape \(2, 8\)"
    ):
        Distillation(features={"0": "2"}).bind(teacher, student, x)
    with pytest.raises(
        ConfigError, match=r"the teacher has no module named 'fc'; its modules: 0, 1"
    ):
        Distillation(features={"0": "fc"}).bind(teacher, student, x)
    with pytest.raises(ConfigError, match="the student has no module named 'conv1'"):
        Distillation(features={"conv1": "0"}).bind(teacher, student, x)
    assert _hooks(teacher, student) == 0


def test_output_shape_mismatch_is_an_error_before_training() -> None:
    teacher, student = _mlp(0, classes=10), _mlp(1, classes=8)
    teacher.train()
    state = snapshot(student)
    x = torch.randn(4, 16)
    with pytest.raises(
        ConfigError, match=r"teacher's output shape \(4, 10\) does not match the student's \(4, 8\)"
    ):
        Distillation().bind(teacher, student, x)
    assert _hooks(teacher, student) == 0 and teacher.training and student.training
    assert all(torch.equal(v, snapshot(student)[k]) for k, v in state.items())
    with pytest.raises(ConfigError, match="floating-point logits shaped"):
        Distillation().bind(nn.Linear(4, 1), nn.Linear(4, 1), torch.randn(4))


def test_teacher_is_untouched_by_training(cnn_factory: Callable[[int], nn.Module]) -> None:
    teacher = cnn_factory(0)  # has BatchNorm: its running statistics must not move either
    student = copy.deepcopy(teacher)
    sc.prune_(student, sparsity=0.8)
    before = snapshot(teacher)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]  # fmt: skip
    with Distillation(features={"conv2": "conv2"}).bind(teacher, student, batches[0][0]) as kd:
        assert not teacher.training
        train(student, batches, TrainConfig(epochs=2, lr=0.05), loss_terms=[kd])
        assert not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(p.grad is None for p in teacher.parameters())
    assert _hooks(teacher, student) == 0


def test_distillation_recovers_a_pruned_student() -> None:
    """Fine-tuning against the teacher alone (alpha=1) brings the student's logits closer."""
    teacher = _mlp(0)
    with torch.no_grad():
        teacher[2].weight.mul_(5)  # confident logits, far from uniform
    student = copy.deepcopy(teacher)
    sc.prune_(student, sparsity=0.8, allocation="uniform")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    labels = torch.randint(0, 8, (64,), generator=g)
    with torch.no_grad():
        gap_before = float(kd_loss(student(x), teacher(x), 1.0))
    loader = [(x[:32], labels[:32]), (x[32:], labels[32:])]
    config = TrainConfig(epochs=20, lr=0.1, weight_decay=0.0)
    with Distillation(temperature=1.0, alpha=1.0).bind(teacher, student, x[:2]) as kd:
        history = train(student, loader, config, loss_terms=[kd])
    with torch.no_grad():
        gap_after = float(kd_loss(student(x), teacher(x), 1.0))
    assert gap_after < 0.8 * gap_before and history.losses[-1] < 0.8 * history.losses[0]
    mask = student[0].parametrizations.weight[0].mask
    assert bool((student[0].weight[~mask] == 0).all())  # the masks held


def test_alpha_zero_is_the_task_loss_alone() -> None:
    """alpha = 0 and no features: training equals plain training (task weight 1, term 0)."""
    x, y = torch.randn(16, 16, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 8
    config = TrainConfig(epochs=2, lr=0.1)
    plain, distilled = _mlp(1), _mlp(1)
    train(plain, [(x, y)], config)
    with Distillation(alpha=0.0).bind(_mlp(0), distilled, x) as kd:
        train(distilled, [(x, y)], config, loss_terms=[kd])
    for (k, a), b in zip(plain.state_dict().items(), distilled.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_outputs_with_logits_are_accepted() -> None:
    class Wrapped(nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.net = _mlp(seed)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"logits": self.net(x)}

    teacher, student = Wrapped(0), Wrapped(1)
    x = torch.randn(3, 16)
    with Distillation(alpha=1.0, temperature=1.0).bind(teacher, student, x) as kd:
        term = kd(inputs=x, outputs=student(x), labels=None, step=0)
        assert torch.allclose(term, _kl_by_hand(student(x)["logits"], teacher(x)["logits"], 1.0))
    with pytest.raises(ConfigError, match="the student's output is a tuple"):
        Distillation().bind(_mlp(0), _TupleOut(), x)


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x), x


def test_same_or_sharing_teacher_is_refused() -> None:
    model = _mlp(0)
    x = torch.randn(2, 16)
    with pytest.raises(ConfigError, match="the same module; pass a copy"):
        Distillation().bind(model, model, x)
    shallow = nn.Sequential(model[0], nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(ConfigError, match=r"share 2 parameter\(s\) \(e.g. '0.weight'\)"):
        Distillation().bind(model, shallow, x)
    with pytest.raises(ConfigError, match="not bound"):
        Distillation()(inputs=x, outputs=model(x), labels=None, step=0)


def test_rebinding_and_close_leave_no_hooks() -> None:
    teacher, student = _mlp(0), _mlp(1)
    x = torch.randn(2, 16)
    kd = Distillation(features={"0": "0"})
    kd.bind(teacher, student, x)
    kd.bind(teacher, student, x)
    assert _hooks(teacher, student) == 2
    kd.close()
    kd.close()
    assert _hooks(teacher, student) == 0 and kd.teacher_ is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0.0}, r"temperature = 0.0 is invalid; must be a finite number > 0"),
        ({"temperature": float("inf")}, r"temperature = inf is invalid"),
        ({"alpha": 1.5}, r"alpha = 1.5 is invalid; must be a finite number in \[0, 1\]"),
        ({"beta": -1.0}, r"beta = -1.0 is invalid; must be a finite number >= 0"),
        ({"alpha": True}, r"alpha = True is invalid"),
        ({"features": ["fc1"]}, r"features must map student module names"),
        ({"features": {"fc1": 3}}, r"features must map student module names"),
    ],
)
def test_bad_config(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Distillation(**options)


def test_config_round_trips() -> None:
    from secateurs.registry import build_dataclass

    kd = Distillation(temperature=2.0, alpha=0.5, beta=0.1, features={"a": "b"})
    spec = {"temperature": 2.0, "alpha": 0.5, "beta": 0.1, "features": {"a": "b"}}
    assert build_dataclass(Distillation, spec, where="distillation") == kd
    with pytest.raises(ConfigError, match=r"unknown option.*'tau'"):
        build_dataclass(Distillation, {"tau": 2.0}, where="distillation")
