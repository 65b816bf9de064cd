"""Regularizers toward prunability: values, gradients through masks, schedules, training."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import secateurs as sc
from secateurs.errors import ConfigError, ModelError
from secateurs.registry import to_spec
from secateurs.targets import Target
from secateurs.train import (
    BNL1,
    L1,
    L2,
    REGULARIZERS,
    GroupLasso,
    Regularizer,
    TrainConfig,
    group_ids,
    train,
)


class Small(nn.Module):
    """Linear(8, 6) -> BatchNorm1d -> Linear(6, 4), with a ConvTranspose on the side."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 4)
        with torch.no_grad():
            self.bn.weight.uniform_(-2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _weights(model: nn.Module) -> list[Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def test_l1_l2_and_bn_l1_match_hand_computation() -> None:
    model = Small()
    w1, w2 = (w.detach() for w in _weights(model))
    l1 = L1(coefficient=0.3).bind(model)
    assert [t.name for t in l1.targets_] == ["fc1.weight", "fc2.weight"]  # no biases, no BN
    assert l1(0).item() == pytest.approx(0.3 * float(w1.abs().sum() + w2.abs().sum()))
    l2 = L2(coefficient=0.3).bind(model)
    assert l2(5).item() == pytest.approx(0.15 * float(w1.pow(2).sum() + w2.pow(2).sum()))
    assert L1(coefficient=1.0, include=["fc2"]).bind(model)(0).item() == pytest.approx(
        float(w2.abs().sum())
    )
    bn = BNL1(coefficient=0.5).bind(model)
    assert [t.name for t in bn.targets_] == ["bn.weight"]
    assert bn(0).item() == pytest.approx(0.5 * model.bn.weight.abs().sum().item())


def test_l2_gradient_equals_weight_decay() -> None:
    model = Small()
    L2(coefficient=0.01).bind(model)(0).backward()
    assert torch.allclose(model.fc1.weight.grad, 0.01 * model.fc1.weight.detach())


def _group_lasso_by_hand(groups: list[Tensor]) -> float:
    return sum(math.sqrt(g.numel()) * float(g.norm()) for g in groups)


def test_group_lasso_matches_hand_computation_on_every_structure() -> None:
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(8, 3, bias=False))
    w = lin[0].weight.detach()  # [3 out, 8 in]
    cases: list[tuple[Any, list[Tensor]]] = [
        ("channels", list(w)),  # rows
        ({"name": "channels", "dim": 1}, list(w.T)),  # columns
        ({"name": "blocks", "shape": [2, 4]}, [w[:2, :4], w[:2, 4:], w[2:, :4], w[2:, 4:]]),
        (sc.NM(2, 4), [w[r, k : k + 4] for r in range(3) for k in (0, 4)]),
        ("elements", list(w.reshape(-1, 1))),
    ]
    for structure, groups in cases:
        reg = GroupLasso(coefficient=2.0, structure=structure).bind(lin)
        expected = 2.0 * _group_lasso_by_hand(groups)
        assert reg(0).item() == pytest.approx(expected, rel=1e-5), structure
    # elements: sqrt(1) * |w| summed is plain L1
    assert GroupLasso(structure="elements").bind(lin)(0).item() == pytest.approx(
        L1().bind(lin)(0).item()
    )


def test_group_lasso_on_convolutions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 4, 3), nn.ConvTranspose2d(4, 6, 2))
    conv = model[0].weight.detach()  # [4 out, 8 in, 3, 3]
    deconv = model[1].weight.detach()  # [4 in, 6 out, 2, 2]
    filters = _group_lasso_by_hand(list(conv)) + _group_lasso_by_hand(list(deconv.transpose(0, 1)))
    assert GroupLasso(coefficient=1.0).bind(model)(0).item() == pytest.approx(filters, rel=1e-5)
    # 2:4 blocks run along the input channels, one kernel position at a time
    nm_groups = [conv[o, k : k + 4, i, j] for o in range(4) for k in (0, 4) for i in range(3) for j in range(3)]  # fmt: skip
    reg = GroupLasso(coefficient=1.0, structure=sc.NM(2, 4), include=["0"]).bind(model)
    assert reg(0).item() == pytest.approx(_group_lasso_by_hand(nm_groups), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 7),
    inp=st.integers(1, 9),
    kernel=st.sampled_from([(), (2,), (1, 3)]),
    block=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    transposed=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_groups_are_exactly_the_structures_pruning_groups(
    out: int,
    inp: int,
    kernel: tuple[int, ...],
    block: tuple[int, int],
    transposed: bool,
    seed: int,
) -> None:
    """Masking group g with ``expand`` hits exactly the elements ``group_ids`` puts in g."""
    if transposed and not kernel:
        return
    if not kernel:
        module: nn.Module = nn.Linear(inp, out)
    elif transposed:
        cls = nn.ConvTranspose1d if len(kernel) == 1 else nn.ConvTranspose2d
        module = cls(inp, out, kernel)
    else:
        module = (nn.Conv1d if len(kernel) == 1 else nn.Conv2d)(inp, out, kernel)
    target = Target("weight", "", module, "weight")
    generator = torch.Generator().manual_seed(seed)
    for structure in (sc.Blocks(block), sc.Channels(dim=0), sc.Channels(dim=1), sc.Elements()):
        ids, count = group_ids(structure, target)
        keep = torch.rand(count, generator=generator) > 0.5
        assert torch.equal(structure.expand(keep, target), keep[ids])
        sizes = torch.bincount(ids.reshape(-1), minlength=count)
        assert int(sizes.max()) <= structure.largest_group(target)


def test_gradients_reach_raw_parameters_and_are_zero_where_pruned() -> None:
    for structure in ("elements", "channels"):
        for reg_factory in (
            lambda: L1(coefficient=1.0),
            lambda: L2(coefficient=1.0),
            lambda: GroupLasso(coefficient=1.0, structure="channels"),
            lambda: GroupLasso(coefficient=1.0, structure={"name": "channels", "dim": 1}),
        ):
            model = Small()
            sc.prune_(model, sparsity=0.5, structure=structure)
            reg = reg_factory().bind(model)
            reg(0).backward()
            for lin in (model.fc1, model.fc2):
                raw = lin.parametrizations.weight.original
                mask = lin.parametrizations.weight[0].mask
                assert raw.grad is not None and bool(torch.isfinite(raw.grad).all())
                assert bool((raw.grad[~mask] == 0).all()), (structure, reg)
                assert bool((raw.grad[mask] != 0).any()), (structure, reg)


def test_pruned_weights_do_not_count() -> None:
    model = Small()
    before = {name: REGULARIZERS.build(name).bind(model)(0).item() for name in ("l1", "l2")}
    sc.prune_(model, sparsity=0.5)
    for name, value in before.items():
        reg = REGULARIZERS.build(name).bind(model)
        effective = [t.weight.detach() for t in reg.targets_]
        expected = sum(
            float(w.abs().sum() if name == "l1" else 0.5 * w.pow(2).sum()) for w in effective
        )
        assert reg(0).item() == pytest.approx(1e-4 * expected) and reg(0).item() < value


def _problem() -> tuple[Tensor, Tensor]:
    """16 inputs mixing 4 latent factors: any 4 well-chosen inputs are enough to fit y."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 4, generator=g)
    x = z @ torch.randn(4, 16, generator=g) + 0.05 * torch.randn(256, 16, generator=g)
    return x, z @ torch.randn(4, 3, generator=g)


def _fit(coefficient: float) -> tuple[Tensor, float, float]:
    """Fit Linear(16, 3) with group lasso over input columns, then prune 12 of the 16 columns.

    Returns the column norms before pruning and the loss before and after pruning.
    """
    x, y = _problem()
    torch.manual_seed(0)
    model = nn.Linear(16, 3, bias=False)
    terms = []
    if coefficient:
        terms.append(GroupLasso(coefficient, structure=sc.Channels(dim=1)).bind(model))
    config = TrainConfig(epochs=150, lr=0.03, momentum=0.9, weight_decay=0.0, cosine=False)
    train(model, [(x, y)], config, loss_fn=nn.functional.mse_loss, loss_terms=terms)
    with torch.no_grad():
        dense = float(nn.functional.mse_loss(model(x), y))
    norms = model.weight.detach().norm(dim=0)
    sc.prune_(model, sparsity=0.75, structure=sc.Channels(dim=1))
    with torch.no_grad():
        pruned = float(nn.functional.mse_loss(model(x), y))
    return norms, dense, pruned


def test_group_lasso_zeroes_whole_groups_and_makes_channel_pruning_cheaper() -> None:
    plain_norms, plain_dense, plain_pruned = _fit(0.0)
    lasso_norms, lasso_dense, lasso_pruned = _fit(0.1)
    # most columns are driven to (near) zero; without the penalty none is
    assert int((lasso_norms < 0.03 * lasso_norms.max()).sum()) >= 9
    assert float(plain_norms.min()) > 0.1 * float(plain_norms.max())
    # so removing 12 columns costs far less with the penalty than without it
    assert lasso_pruned - lasso_dense < 0.2 * (plain_pruned - plain_dense)
    assert lasso_pruned < 0.2 * plain_pruned


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, [1.0, 1.0, 1.0, 1.0]),
        ({"schedule": "linear", "warmup": 10}, [0.0, 0.5, 1.0, 1.0]),
        ({"schedule": "cosine", "steps": 10}, [1.0, 0.5, 0.0, 0.0]),
    ],
)
def test_coefficient_schedules(options: dict[str, Any], expected: list[float]) -> None:
    model = Small()
    reg = L1(coefficient=2.0, **options).bind(model)
    penalty = reg.penalty().item()
    for step, factor in zip([0, 5, 10, 50], expected, strict=True):
        assert reg.coefficient_at(step) == pytest.approx(2.0 * factor)
        assert reg(step).item() == pytest.approx(2.0 * factor * penalty)


def test_linear_warmup_in_the_training_loop_sees_the_step() -> None:
    model = Small()
    seen: list[int] = []

    class Spy(L1):
        def coefficient_at(self, step: int) -> float:
            seen.append(step)
            return super().coefficient_at(step)

    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    train(
        model,
        [(x, y)] * 3,
        TrainConfig(epochs=1),
        loss_terms=[Spy(schedule="linear", warmup=2).bind(model)],
    )
    assert seen == [0, 1, 2]


def test_bn_l1_shrinks_batchnorm_scales(cnn_factory: Callable[[int], nn.Module]) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 4, 4, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]  # fmt: skip
    config = TrainConfig(epochs=2, lr=0.05, weight_decay=0.0)
    gammas = []
    for coefficient in (0.0, 0.5):
        model = cnn_factory(0)
        terms = [BNL1(coefficient).bind(model)] if coefficient else []
        train(model, batches, config, loss_terms=terms)
        gammas.append(model.bn.weight.detach().abs())  # type: ignore[union-attr]
    plain, slim = gammas
    assert float(slim.sum()) < 0.7 * float(plain.sum())


def test_no_terms_and_zero_coefficients_train_bitwise_identically() -> None:
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    config = TrainConfig(epochs=3, lr=0.1)
    states, losses = [], []
    for terms in (None, [], [L1(coefficient=0.0)], [GroupLasso(coefficient=0.0)]):
        model = Small()
        bound = [t.bind(model) for t in terms] if terms is not None else None
        history = train(model, loader, config, loss_terms=bound)
        states.append(model.state_dict())
        losses.append(history.losses)
    for state, loss in zip(states[1:], losses[1:], strict=True):
        assert loss == losses[0]
        assert all(torch.equal(state[k], v) for k, v in states[0].items())


def test_training_with_a_term_lowers_its_penalty() -> None:
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4
    config = TrainConfig(epochs=10, lr=0.05, weight_decay=0.0)
    penalties = []
    for coefficient in (0.0, 0.05):
        model = Small()
        reg = L1(coefficient=coefficient).bind(model)
        history = train(model, [(x, y)], config, loss_terms=[reg])
        assert all(math.isfinite(v) for v in history.losses)
        penalties.append(reg.penalty().item())
    without, with_term = penalties
    assert with_term < 0.9 * without


def test_registry_and_round_trip() -> None:
    assert set(REGULARIZERS.names()) >= {"l1", "l2", "group_lasso", "bn_l1"}
    reg = REGULARIZERS.build(
        {"name": "group_lasso", "coefficient": 1e-3, "structure": {"name": "nm", "n": 2, "m": 4}}
    )
    assert isinstance(reg, GroupLasso) and reg.structure_ == sc.NM(2, 4)
    assert isinstance(REGULARIZERS.build("bn_l1"), BNL1)
    spec = to_spec(L1(coefficient=0.5, schedule="linear", warmup=3, include=["fc1"]))
    assert spec == {
        "name": "l1", "coefficient": 0.5, "schedule": "linear", "warmup": 3, "steps": 0,
        "include": ["fc1"], "exclude": None,
    }  # fmt: skip
    assert REGULARIZERS.build(spec) == L1(0.5, "linear", 3, include=["fc1"])
    with pytest.raises(ConfigError, match=r"unknown regularizer 'l0'; allowed: .*group_lasso"):
        REGULARIZERS.build("l0")
    with pytest.raises(ConfigError, match=r"unknown option.*'lambda'"):
        REGULARIZERS.build({"name": "l1", "lambda": 1.0})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"coefficient": -1.0}, r"coefficient = -1.0 is invalid; must be >= 0"),
        ({"coefficient": float("nan")}, r"coefficient = nan is invalid; must be a finite"),
        ({"coefficient": True}, r"coefficient = True is invalid"),
        ({"coefficient": "big"}, r"coefficient = 'big' is invalid"),
        ({"schedule": "step"}, r"schedule = 'step' is invalid; must be one of constant, linear"),
        ({"schedule": "linear"}, r"'linear' needs warmup >= 1"),
        ({"schedule": "cosine"}, r"'cosine' needs steps >= 1"),
        ({"warmup": 10}, r"warmup is used only by schedule 'linear'"),
        ({"schedule": "linear", "warmup": 2, "steps": 3}, r"steps is used only by schedule 'cos"),
        ({"warmup": -1}, r"warmup = -1 is invalid"),
        ({"include": ["fc("]}, r"include pattern 'fc\(' is not a valid regular expression"),
    ],
)
def test_bad_options_are_named(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        L1(**options)


def test_bad_models_and_selectors() -> None:
    model = Small()
    with pytest.raises(ConfigError, match=r"unknown structure 'rows'; allowed: .*channels"):
        GroupLasso(structure="rows")
    with pytest.raises(ConfigError, match=r"include pattern 'conv.*' matches no prunable layer"):
        L1(include=["conv.*"]).bind(model)
    with pytest.raises(ModelError, match="not divisible by M=4"):
        GroupLasso(structure=sc.NM(2, 4)).bind(model)  # fc2 has 6 inputs
    mlp = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))
    with pytest.raises(ModelError, match="no BatchNorm layer with a learnable scale"):
        BNL1().bind(mlp)
    with pytest.raises(ConfigError, match=r"include pattern 'bn2' matches no BatchNorm.*: bn"):
        BNL1(include=["bn2"]).bind(model)
    with pytest.raises(ConfigError, match="exclude pattern Conv2d matches no BatchNorm"):
        BNL1(exclude=[nn.Conv2d]).bind(model)
    with pytest.raises(ModelError, match="no BatchNorm"):
        BNL1(exclude=["bn"]).bind(model)
    with pytest.raises(ConfigError, match=r"not bound to a model; call \.bind\(model\) first"):
        L1()(0)
    reg = L1(include=["fc1"]).bind(model)
    with pytest.raises(ConfigError):
        reg.bind(nn.Sequential(nn.Linear(2, 2)))
    assert [t.name for t in reg.targets_] == ["fc1.weight"]  # a failed bind keeps the old one


def test_loss_term_errors_in_train() -> None:
    model = Small()
    batch = [(torch.randn(4, 8), torch.arange(4))]
    config = TrainConfig(epochs=1)

    class Weighted:
        task_weight = 0.5

        def __call__(self, **batch: Any) -> Tensor:
            return torch.zeros(())

    with pytest.raises(ConfigError, match="at most one may set task_weight"):
        train(model, batch, config, loss_terms=[Weighted(), Weighted()])
    with pytest.raises(ConfigError, match="must be callables"):
        train(model, batch, config, loss_terms=[1.0])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="must be a list"):
        train(model, batch, config, loss_terms=L1().bind(model))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"returned \(4,\); it must return a scalar"):
        train(model, batch, config, loss_terms=[lambda **kw: torch.zeros(4)])
    bad = Weighted()
    bad.task_weight = -1.0
    with pytest.raises(ConfigError, match=r"task_weight = -1.0"):
        train(model, batch, config, loss_terms=[bad])


def test_task_weight_scales_the_task_loss() -> None:
    """A term with task_weight w trains exactly like loss_fn scaled by w."""
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 4
    config = TrainConfig(epochs=2, lr=0.1)

    class Half:
        task_weight = 0.5

        def __call__(self, **batch: Any) -> Tensor:
            return torch.zeros(())

    a, b = Small(), Small()
    train(a, [(x, y)], config, loss_terms=[Half()])
    train(b, [(x, y)], config, loss_fn=lambda out, t: 0.5 * nn.functional.cross_entropy(out, t))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_regularizer_is_a_dataclass_config_that_round_trips_through_its_spec() -> None:
    assert issubclass(GroupLasso, Regularizer)
    reg = GroupLasso(coefficient=0.1, schedule="linear", warmup=5, include=["fc1"])
    again = REGULARIZERS.build(to_spec(reg))
    assert again == reg and again is not reg
    assert again != GroupLasso(coefficient=0.2, schedule="linear", warmup=5, include=["fc1"])
    bound = L1().bind(Small())
    assert bound == L1() and bound.targets_  # what bind selects is state, not config
    assert "targets_" not in repr(bound)
