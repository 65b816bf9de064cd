"""Schedules: exactly the published formulas, and a Pruner driven from a training loop."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import secateurs as sc


def gradual_reference(t: int, t0: int, dt: int, n: int, s_i: float, s_f: float) -> float | None:
    """Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 at t = t0 + j dt, j = 0..n."""
    if t < t0 or (t - t0) % dt or (t - t0) // dt > n:
        return None
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize(
    ("start", "every", "n", "initial", "final"),
    [(0, 10, 10, 0.0, 0.9), (5, 20, 3, 0.2, 0.75), (3, 1, 1, 0.0, 0.5), (0, 7, 6, 0.5, 0.98)],
)
def test_gradual_is_exactly_the_cubic_schedule(
    start: int, every: int, n: int, initial: float, final: float
) -> None:
    end = start + n * every
    schedule = sc.Gradual(start=start, end=end, every=every, initial=initial)
    assert schedule.last_step() == end
    events = 0
    previous = -1.0
    for t in range(end + 2 * every + 3):
        got = schedule.sparsity_at(t, final)
        want = gradual_reference(t, start, every, n, initial, final)
        if want is None:
            assert got is None, t
            continue
        events += 1
        assert got == pytest.approx(want, abs=1e-12), t
        assert got >= previous
        previous = got
    assert events == n + 1
    assert schedule.sparsity_at(start, final) == pytest.approx(initial, abs=1e-12)
    assert schedule.sparsity_at(end, final) == pytest.approx(final, abs=1e-12)


def test_gradual_with_end_off_the_grid_still_reaches_final_at_end() -> None:
    schedule = sc.Gradual(start=0, end=25, every=10)
    assert schedule.sparsity_at(20, 0.8) is not None
    assert schedule.sparsity_at(25, 0.8) == pytest.approx(0.8)
    assert schedule.sparsity_at(24, 0.8) is None
    assert schedule.sparsity_at(30, 0.8) is None


@pytest.mark.parametrize("rounds", [1, 3, 5])
def test_iterative_round_r_reaches_geometric_sparsity(rounds: int) -> None:
    schedule = sc.Iterative(rounds=rounds, every=10, start=4)
    assert schedule.last_step() == 4 + (rounds - 1) * 10
    final = 0.9
    for t in range(60):
        got = schedule.sparsity_at(t, final)
        if t >= 4 and (t - 4) % 10 == 0 and (t - 4) // 10 < rounds:
            r = (t - 4) // 10 + 1
            assert got == pytest.approx(1 - (1 - final) ** (r / rounds), abs=1e-12)
        else:
            assert got is None, t
    assert schedule.sparsity_at(4 + (rounds - 1) * 10, final) == pytest.approx(final)


def test_oneshot_prunes_once_at_its_step() -> None:
    schedule = sc.OneShot(at=7)
    assert [t for t in range(20) if schedule.sparsity_at(t, 0.6) is not None] == [7]
    assert schedule.sparsity_at(7, 0.6) == 0.6
    assert schedule.last_step() == 7


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: sc.Gradual(every=0), "0"),
        (lambda: sc.Gradual(start=0, end=0), "end"),
        (lambda: sc.Gradual(start=10, end=5), "5"),
        (lambda: sc.Gradual(initial=1.0), "1.0"),
        (lambda: sc.Gradual(initial=-0.1), "-0.1"),
        (lambda: sc.Gradual(initial=1.5), "1.5"),
        (lambda: sc.Gradual(start=-1), "-1"),
        (lambda: sc.Gradual(every=1.5), "1.5"),
        (lambda: sc.Gradual(end="10"), "'10'"),
        (lambda: sc.Iterative(rounds=0), "rounds"),
        (lambda: sc.Iterative(every=0), "every"),
        (lambda: sc.Iterative(start=-2), "-2"),
        (lambda: sc.OneShot(at=-1), "-1"),
        (lambda: sc.OneShot(at=True), "True"),
    ],
)
def test_bad_schedule_values_are_config_errors(make: Any, needle: str) -> None:
    with pytest.raises(sc.ConfigError) as info:
        make()
    assert needle in str(info.value)


def test_bad_schedule_from_a_recipe_mapping_is_a_config_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(sc.ConfigError, match="every"):
        sc.Pruner(model, 0.5, schedule={"name": "gradual", "every": 0})
    assert not sc.collect_masks(model)


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


TOTAL = 8 * 16 + 16 * 4


def count_zeros(model: nn.Sequential) -> int:
    return int((model[0].weight == 0).sum() + (model[2].weight == 0).sum())


def train_with(pruner: sc.Pruner, model: nn.Sequential, steps: int) -> list[tuple[int, float]]:
    """A user's loop: optimizer built before pruning, pruner.step() after each optimizer step."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    events = []
    for t in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        zeros_before = count_zeros(model)
        if pruner.step():
            events.append((t, count_zeros(model) / TOTAL))
            assert pruner.history[-1].step == t
            assert pruner.history[-1].measured == pytest.approx(events[-1][1], abs=1e-12)
        else:
            # between events nothing is pruned and nothing grows back
            assert count_zeros(model) == zeros_before
    return events


def test_pruner_follows_gradual_schedule_in_a_training_loop() -> None:
    model = make_model()
    schedule = sc.Gradual(start=2, end=42, every=8, initial=0.1)
    pruner = sc.Pruner(model, 0.9, schedule=schedule)
    events = train_with(pruner, model, 50)
    expected = [t for t in range(50) if schedule.sparsity_at(t, 0.9) is not None]
    assert [t for t, _ in events] == expected == [2, 10, 18, 26, 34, 42]
    for t, measured in events:
        want = schedule.sparsity_at(t, 0.9)
        assert want is not None
        assert round(measured * TOTAL) == round(want * TOTAL), t
        assert pruner.history[[e.step for e in pruner.history].index(t)].target == want
    assert events[-1][1] == round(0.9 * TOTAL) / TOTAL
    assert pruner.done
    assert pruner.steps_done == 50


def test_pruner_follows_iterative_schedule() -> None:
    model = make_model()
    pruner = sc.Pruner(model, 0.8, schedule=sc.Iterative(rounds=3, every=5, start=1))
    events = train_with(pruner, model, 15)
    assert [t for t, _ in events] == [1, 6, 11]
    for r, (_, measured) in enumerate(events, start=1):
        assert round(measured * TOTAL) == round((1 - 0.2 ** (r / 3)) * TOTAL)


def test_pruner_oneshot_at_step() -> None:
    model = make_model()
    pruner = sc.Pruner(model, 0.7, schedule=sc.OneShot(at=4))
    for _ in range(4):
        assert not pruner.step()
        assert not sc.collect_masks(model)
        assert not pruner.done
    assert pruner.step()
    assert count_zeros(model) == round(0.7 * TOTAL)
    assert pruner.done
    assert not pruner.step()


def test_pruner_resumes_from_its_state_dict() -> None:
    model = make_model()
    schedule = sc.Gradual(start=0, end=20, every=5)
    first = sc.Pruner(model, 0.8, schedule=schedule)
    for _ in range(7):
        first.step()
    second = sc.Pruner(model, 0.8, schedule=schedule)
    second.load_state_dict(first.state_dict())
    fired = []
    for _ in range(20):
        t = second.steps_done
        if second.step():
            fired.append(t)
    assert fired == [10, 15, 20]
    assert count_zeros(model) == round(0.8 * TOTAL)


def test_gradual_with_nm_never_breaks_the_pattern() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = sc.Pruner(
        model, 0.75, structure=sc.NM(2, 4), schedule=sc.Gradual(start=0, end=6, every=2)
    )
    for _ in range(7):
        if pruner.step():
            for layer in (model[0], model[2]):
                blocks = layer.weight.detach().reshape(layer.weight.shape[0], -1, 4)
                assert bool(((blocks != 0).sum(-1) <= 2).all())
            assert pruner.history[-1].measured >= 0.5
    assert count_zeros(model) == round(0.75 * TOTAL)
