"""Sparse training schedules: static sparse, SET, RigL, lottery tickets, DSD, IHT; ERK."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import secateurs as sc
from conftest import make_cnn, make_mlp
from secateurs.allocation import erk_densities
from secateurs.masks import raw_parameter
from secateurs.schedules import IHT, SET, Lottery, RigL, Static
from secateurs.sparse_training import (
    drop_and_grow,
    random_start,
    redistribute,
    rescale_for_kept_fan_in_,
)
from secateurs.zoo import build_model


def _data(n: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.randint(0, 8, (n,), generator=g)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def _live(model: nn.Module) -> dict[str, int]:
    return {k: int(m.sum()) for k, m in sc.collect_masks(model).items()}


def _train_steps(
    model: nn.Module, pruner: sc.Pruner, opt: torch.optim.Optimizer, steps: int
) -> list[dict[str, torch.Tensor]]:
    """Run ``steps`` optimizer steps with ``pruner.step()`` after each; masks after each step."""
    data = _data()
    masks = []
    for i in range(steps):
        x, y = data[i % len(data)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        masks.append(sc.collect_masks(model))
    return masks


# --------------------------------------------------------------------------- ERK


def test_erk_meets_the_density_and_favours_small_layers() -> None:
    shapes = [(300, 784), (100, 300), (10, 100)]
    dens = erk_densities(shapes, 0.1)
    sizes = [math.prod(s) for s in shapes]
    assert sum(d * n for d, n in zip(dens, sizes, strict=True)) == pytest.approx(0.1 * sum(sizes))
    assert dens[0] < dens[1] < dens[2] == 1.0  # the small output layer is kept dense
    # proportional to sum/prod among layers that are not capped
    assert dens[0] / dens[1] == pytest.approx((1084 / 235200) / (400 / 30000))


def test_erk_allocation_obtains_the_sparsity_asked() -> None:
    model = make_cnn()
    sc.prune_(model, sparsity=0.8, allocation="erk", criterion="random")
    masks = sc.collect_masks(model)
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert zeros / total == pytest.approx(0.8, abs=2 / total)


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 60)), min_size=1, max_size=5),
    density=st.floats(0.01, 0.9),
    floor=st.floats(0.0, 1.0),
)
def test_erk_floors_hold_and_the_budget_is_met(
    shapes: list[tuple[int, int]], density: float, floor: float
) -> None:
    sizes = [math.prod(s) for s in shapes]
    floors = [floor * (i % 2) for i in range(len(shapes))]  # every other layer has a floor
    dens = erk_densities(shapes, density, floors)
    used = sum(d * n for d, n in zip(dens, sizes, strict=True))
    assert all(0.0 <= d <= 1.0 for d in dens)
    assert used == pytest.approx(density * sum(sizes), rel=1e-9)
    cost = sum(f * n for f, n in zip(floors, sizes, strict=True))
    if cost <= density * sum(sizes):  # the floors fit the budget: each one holds
        assert all(d >= f - 1e-9 for d, f in zip(dens, floors, strict=True))


def test_erk_min_fan_in_feeds_lenet5s_second_convolution() -> None:
    """ERK leaves LeNet-5's conv2 (16 filters of 150 inputs) 45 weights at 98% and 23 at 99%.
    With a floor of 4 inputs per unit: at 98% the floors fit (944 of 1,229 kept weights), so
    conv2 keeps 64; at 99% (615 weights for 236 units) they do not, and every layer gets the
    same share of its floor (conv2 42). The overall density is the one asked either way."""
    for sparsity, plain_conv2, fed_conv2 in ((0.98, 45, 64), (0.99, 23, 42)):
        plain = build_model("lenet-5", seed=0)
        fed = copy.deepcopy(plain)
        sc.prune_(plain, sparsity=sparsity, allocation="erk", criterion="random")
        erk4 = {"name": "erk", "min_fan_in": 4}
        sc.prune_(fed, sparsity=sparsity, allocation=erk4, criterion="random")
        kept_plain = {k: int(m.sum()) for k, m in sc.collect_masks(plain).items()}
        kept_fed = {k: int(m.sum()) for k, m in sc.collect_masks(fed).items()}
        assert kept_plain["conv2.weight"] == plain_conv2
        assert kept_fed["conv2.weight"] == fed_conv2
        assert abs(sum(kept_fed.values()) - sum(kept_plain.values())) <= len(kept_fed)
    for bad in (-1, math.nan, math.inf, "4", True):
        with pytest.raises(sc.ConfigError, match="erk min_fan_in must be a finite number >= 0"):
            sc.prune_(plain, sparsity=0.5, allocation={"name": "erk", "min_fan_in": bad})


@pytest.mark.parametrize("transposed", [False, True])
def test_rescale_for_kept_fan_in_multiplies_each_unit_by_its_own_factor(transposed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, 2, 2, generator=g)
    mask = torch.rand(5, 3, 2, 2, generator=g) < 0.4
    mask[2] = False  # a unit with no input: left as it is
    want = weight.clone()
    units = mask.transpose(0, 1) if transposed else mask
    for i in range(units.shape[0]):
        kept = int(units[i].sum())
        if kept:
            factor = math.sqrt(units[i].numel() / kept)
            if transposed:
                want[:, i] *= factor
            else:
                want[i] *= factor
    got = rescale_for_kept_fan_in_(weight, mask, transposed)
    assert got is weight
    torch.testing.assert_close(weight, want)


def _first_layer_gradient(model: nn.Module) -> float:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    conv1 = model.get_submodule("conv1")
    if parametrize.is_parametrized(conv1, "weight"):
        grad = conv1.parametrizations.weight.original.grad
    else:
        grad = conv1.weight.grad
    assert grad is not None
    return float(grad.norm())


@pytest.mark.parametrize("sparsity", [0.98, 0.99])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_initialisation_lets_the_gradient_reach_the_first_layer(
    sparsity: float, seed: int
) -> None:
    """LeNet-5 sparse from scratch: with the dense initialisation's values the gradient of
    conv1 vanishes (under 1% of the dense network's); rescaled for the kept fan-in, it is of
    the dense network's order."""
    dense = _first_layer_gradient(build_model("lenet-5", seed=seed))
    ratios = {}
    for init in ("none", "rescale"):
        model = build_model("lenet-5", seed=seed)
        sc.Pruner(model, sparsity=sparsity, schedule=SET(init=init)).step()
        ratios[init] = _first_layer_gradient(model) / dense
    assert ratios["none"] < 0.01
    assert ratios["rescale"] > 0.05


def test_sparse_init_options_are_checked() -> None:
    with pytest.raises(sc.ConfigError, match="init 'xavier' is unknown; allowed: rescale, none"):
        SET(init="xavier")
    for bad in (-2, math.nan, math.inf):
        with pytest.raises(sc.ConfigError, match="RigL min_fan_in must be a finite number >= 0"):
            RigL(min_fan_in=bad)


@pytest.mark.parametrize(
    ("schedule", "decays"),
    [
        (SET(every=1, end=10, fraction=0.4), False),
        (SET(every=1, end=10, fraction=0.4, decay="cosine"), True),
        (RigL(every=1, end=10, fraction=0.4), True),
        (RigL(every=1, end=10, fraction=0.4, decay="constant"), False),
    ],
    ids=["set", "set_cosine", "rigl", "rigl_constant"],
)
def test_decay_sets_the_share_each_update_moves(schedule: SET, decays: bool) -> None:
    """SET moves a constant share by default, RigL a cosine-decayed one; ``decay`` swaps them."""
    shares = [event.fraction for t in (1, 5, 9) for event in schedule.events_at(t, 0.9)]
    if decays:
        assert shares == pytest.approx([0.2 * (1 + math.cos(math.pi * t / 10)) for t in (1, 5, 9)])
    else:
        assert shares == [0.4, 0.4, 0.4]
    assert schedule.events_at(10, 0.9) == []


def test_lamp_distribution_balances_the_layers_counts() -> None:
    """At 99% on LeNet-5 ERK (floored at 4 inputs per unit) keeps 16 of conv1's 150 weights,
    42 of conv2's 2,400 and 313 of fc1's 48,000; the ``lamp`` start keeps about as many in
    conv2 as in fc1 and more in conv1, at the same overall sparsity."""
    kept = {}
    for distribution in ("erk", "lamp"):
        model = build_model("lenet-5", seed=0)
        pruner = sc.Pruner(model, sparsity=0.99, schedule=Static(distribution=distribution))
        pruner.step()
        kept[distribution] = _live(model)
        assert pruner.measured_sparsity() == pytest.approx(0.99, abs=1e-4)
    erk, lamp = kept["erk"], kept["lamp"]
    assert erk["conv1.weight"] < 20 and erk["fc1.weight"] > 7 * erk["conv2.weight"]
    assert lamp["conv1.weight"] > 3 * erk["conv1.weight"]
    assert lamp["fc3.weight"] > 3 * erk["fc3.weight"]
    assert 0.7 < lamp["fc1.weight"] / lamp["conv2.weight"] < 1.5
    assert abs(sum(lamp.values()) - sum(erk.values())) <= len(lamp)


# --------------------------------------------------------------------------- static, SET, RigL


def test_static_sparse_training_keeps_its_random_erk_mask() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = sc.Pruner(model, sparsity=0.9, schedule="static", optimizer=opt)
    pruner.step()
    first = sc.collect_masks(model)
    assert pruner.measured_sparsity() == pytest.approx(0.9, abs=1 / 768)
    masks = _train_steps(model, pruner, opt, 10)
    assert all(torch.equal(m[k], first[k]) for m in masks for k in first)
    assert pruner.measured_sparsity() == pytest.approx(0.9, abs=1 / 768)
    # the same seed gives the same random mask; another seed another
    again = make_mlp()
    sc.Pruner(again, sparsity=0.9, schedule="static").step()
    assert all(torch.equal(sc.collect_masks(again)[k], v) for k, v in first.items())
    other = make_mlp()
    sc.Pruner(other, sparsity=0.9, schedule="static", seed=1).step()
    assert any(not torch.equal(sc.collect_masks(other)[k], v) for k, v in first.items())


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_drop_and_grow_keeps_each_layers_count_and_moves_connections(name: str) -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = {"name": name, "every": 3, "end": 13, "fraction": 0.3}
    pruner = sc.Pruner(
        model,
        sparsity=0.8,
        schedule=schedule,
        optimizer=opt,
        data=_data(),
        loss_fn=nn.functional.cross_entropy,
    )
    pruner.step()
    live = _live(model)
    before = sc.collect_masks(model)
    masks = _train_steps(model, pruner, opt, 15)
    for m in masks:
        assert {k: int(v.sum()) for k, v in m.items()} == live
    # updates happened at steps 3, 6, 9, 12 (step() counts from 0) and never after `end`
    changes = [
        i + 1
        for i in range(len(masks))
        if any(not torch.equal(masks[i][k], (masks[i - 1] if i else before)[k]) for k in live)
    ]
    if name == "set":
        assert changes == [3, 6, 9, 12]
    else:  # RigL's cosine-decayed fraction moves nothing once it rounds to zero weights
        assert changes[:3] == [3, 6, 9] and set(changes) <= {3, 6, 9, 12}
    kinds = [e.kind for e in pruner.history]
    assert kinds == ["remask", "scale_init"] + ["drop_grow"] * 4
    assert pruner.done


def test_grown_weights_start_at_zero_with_fresh_optimizer_state() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = sc.Pruner(
        model, sparsity=0.7, schedule={"name": "set", "every": 4, "end": 100}, optimizer=opt
    )
    pruner.step()
    _train_steps(model, pruner, opt, 3)  # steps 1..3: momentum builds up, no update yet
    before = sc.collect_masks(model)
    _train_steps(model, pruner, opt, 1)  # step 4: the update (pruner.step() with steps_done 4)
    after = sc.collect_masks(model)
    grown_any = False
    for name, mask in after.items():
        grown = mask & ~before[name]
        module = model.get_submodule(name.rpartition(".")[0])
        raw = module.parametrizations.weight.original
        assert bool((raw.detach()[grown] == 0).all())
        assert bool((opt.state[raw]["momentum_buffer"][grown] == 0).all())
        grown_any |= bool(grown.any())
    assert grown_any


def test_grow_scale_starts_grown_weights_on_the_layers_own_scale() -> None:
    """With ``grow_scale`` the weights an update grows start at random, their spread that
    multiple of the surviving live weights' (checked loosely, on about a hundred draws a
    layer), and their optimizer state is fresh as with the zero start."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 8))
    with torch.no_grad():
        model[0].weight.mul_(40)  # the first layer on a scale of its own: the draw must follow it
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = {"name": "set", "every": 4, "end": 100, "fraction": 0.5, "grow_scale": 0.5}
    pruner = sc.Pruner(model, sparsity=0.8, schedule=schedule, optimizer=opt)
    pruner.step()
    _train_steps(model, pruner, opt, 3)
    x, y = _data()[0]  # step 4 by hand: the optimizer step, then the update on its own
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    raws = {
        name: model.get_submodule(name.rpartition(".")[0]).parametrizations.weight.original
        for name in sc.collect_masks(model)
    }
    before = sc.collect_masks(model)
    values_before = {name: raw.detach().clone() for name, raw in raws.items()}
    pruner.step()
    scales = []
    for name, mask in sc.collect_masks(model).items():
        raw = raws[name].detach()
        survivors = before[name] & mask & (raw == values_before[name])
        grown = mask & ~before[name]
        values = raw[grown]
        assert values.numel() > 50 and bool((values != 0).all())
        ratio = float(values.std()) / float(raw[survivors].std())
        assert 0.35 < ratio < 0.65
        assert bool((opt.state[raws[name]]["momentum_buffer"][grown] == 0).all())
        scales.append(float(values.std()))
    assert scales[0] > 10 * scales[1]  # each layer drew on its own scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_start_draws_only_the_grown_weights_on_the_survivors_scale(
    dtype: torch.dtype,
) -> None:
    """``random_start`` draws ``count`` values (not one per position of the layer) whose spread
    is ``scale`` times the survivors', in the weight's dtype; with fewer than two survivors
    there is no scale to follow and the values are zeros."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 400, generator=g) * 3).to(dtype)
    survivors = torch.rand(300, 400, generator=g) < 0.05
    values = random_start(weight, survivors, 2000, 0.5, g)
    assert values.shape == (2000,) and values.dtype == dtype
    expected = 0.5 * float(weight[survivors].float().std())
    assert abs(float(values.float().std()) / expected - 1) < 0.1
    lone = torch.zeros_like(survivors)
    lone[0, 0] = True
    assert bool((random_start(weight, lone, 7, 0.5, g) == 0).all())


def test_rigl_grows_where_the_dense_gradient_is_largest() -> None:
    model = make_mlp()
    data = _data()
    pruner = sc.Pruner(
        model,
        sparsity=0.75,
        schedule={"name": "rigl", "every": 1, "end": 10, "fraction": 0.4},
        data=data[:1],
        loss_fn=nn.functional.cross_entropy,
        calibration_batches=1,
    )
    pruner.step()
    before = sc.collect_masks(model)
    # the dense gradient, computed independently on a plain copy of the effective weights
    plain = copy.deepcopy(model)
    sc.make_permanent_(plain)
    x, y = data[0]
    plain.eval()
    nn.functional.cross_entropy(plain(x), y).backward()
    weights = {n: model.get_submodule(n.rpartition(".")[0]).weight.detach() for n in before}
    pruner.step()  # step 1: one RigL update with fraction 0.4/2 * (1 + cos(pi/10))
    fraction = RigL(every=1, end=10, fraction=0.4).fraction_at(1)
    for name, mask in sc.collect_masks(model).items():
        old = before[name]
        k = int(fraction * int(old.sum()))
        w = weights[name]
        # the k live weights of smallest magnitude are dropped (ties by position)...
        order = torch.argsort(torch.where(old, w.abs(), torch.inf).flatten(), stable=True)[:k]
        survivors = old.flatten().clone()
        survivors[order] = False
        survivors = survivors.reshape(old.shape)
        assert bool((mask | ~survivors).all())  # every survivor is still live
        # ...and k positions are grown among the rest: those of largest dense gradient
        grown = mask & ~survivors
        assert int(grown.sum()) == k and int(mask.sum()) == int(old.sum())
        g = plain.get_submodule(name.rpartition(".")[0]).weight.grad.abs()
        assert float(g[grown].min()) >= float(g[~survivors & ~mask].max())


def _grown_after_one_update(grow: str, data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The positions one SET update (``grow``) newly grows in make_mlp at 80%."""
    model = make_mlp()
    schedule = {"name": "set", "every": 1, "end": 10, "fraction": 0.5, "grow": grow}
    pruner = sc.Pruner(
        model,
        sparsity=0.8,
        schedule=schedule,
        data=data[:1],
        loss_fn=nn.functional.cross_entropy,
        calibration_batches=1,
        seed=3,
    )
    pruner.step()
    before = sc.collect_masks(model)
    pruner.step()
    return {n: m & ~before[n] for n, m in sc.collect_masks(model).items()}


def test_set_live_grows_only_where_a_gradient_reaches() -> None:
    # the first 8 of the 16 inputs are always zero: a weight grown from them never trains
    data = [(torch.cat([torch.zeros_like(x[:, :8]), x[:, 8:]], 1), y) for x, y in _data()]
    live = _grown_after_one_update("live", data)
    anywhere = _grown_after_one_update("random", data)
    assert bool(live["0.weight"].any())
    assert not bool(live["0.weight"][:, :8].any())  # none from a silent input
    assert bool(anywhere["0.weight"][:, :8].any())  # SET as published grows some there
    # in every layer, each grown position has a nonzero dense gradient (on the plain model)
    plain = make_mlp()
    pruner = sc.Pruner(plain, sparsity=0.8, schedule="set", seed=3)
    pruner.step()  # the same sparse start and rescaling, no update
    sc.make_permanent_(plain)
    x, y = data[0]
    nn.functional.cross_entropy(plain(x), y).backward()
    for name, grown in live.items():
        gradient = plain.get_submodule(name.rpartition(".")[0]).weight.grad
        assert bool((gradient[grown] != 0).all()), name


def test_set_grow_is_checked_and_live_needs_data() -> None:
    with pytest.raises(
        sc.ConfigError, match="SET grow 'gradient' is unknown; allowed: random, live"
    ):
        SET(grow="gradient")
    assert not SET().needs_data and SET(grow="live").needs_data
    with pytest.raises(sc.ConfigError, match="SET needs calibration data"):
        sc.Pruner(make_mlp(), sparsity=0.5, schedule={"name": "set", "grow": "live"})
    with pytest.raises(sc.ConfigError, match="grow rule 'live' needs the dense gradient"):
        drop_and_grow(torch.ones(4), torch.ones(4, dtype=torch.bool), 0.5, "live")


def test_rigl_needs_data_and_set_needs_elements() -> None:
    with pytest.raises(sc.ConfigError, match="RigL needs calibration data"):
        sc.Pruner(make_mlp(), sparsity=0.5, schedule="rigl")
    with pytest.raises(sc.ConfigError, match="elements"):
        sc.Pruner(make_mlp(), sparsity=0.5, schedule="set", structure=sc.NM(2, 4))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 30),
    density=st.floats(0.05, 1.0),
    fraction=st.floats(0.01, 0.99),
    grow=st.sampled_from(["random", "live", "gradient"]),
    silent=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_drop_and_grow_properties(
    rows: int, cols: int, density: float, fraction: float, grow: str, silent: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < density
    grad = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) >= silent)
    new, grown = drop_and_grow(w, mask, fraction, grow, gradient=grad, generator=g)
    if grow == "live":  # grown where the gradient is nonzero while such positions remain
        reached = ~(new & ~grown) & (grad != 0)
        if int(reached.sum()) >= int(grown.sum()):
            assert not bool((grown & (grad == 0)).any())
        else:
            assert bool(grown[reached].all())
    k = int(fraction * int(mask.sum()))
    assert int(new.sum()) == int(mask.sum())  # the count of live weights is unchanged
    assert int(grown.sum()) == k
    dropped = mask & ~new
    assert int(dropped.sum()) <= k
    if k and bool((mask & new).any()) and bool(dropped.any()):
        # no kept live weight is smaller than a dropped one that was not regrown
        assert float(w.abs()[mask & new & ~grown].min()) >= float(w.abs()[dropped].max())


@settings(max_examples=60, deadline=None)
@given(
    drops=st.lists(st.integers(0, 50), min_size=1, max_size=6),
    scores=st.lists(st.floats(0.0, 10.0), min_size=6, max_size=6),
    extra=st.lists(st.integers(0, 80), min_size=6, max_size=6),
)
def test_redistribute_shares_every_drop_in_proportion_within_room(
    drops: list[int], scores: list[float], extra: list[int]
) -> None:
    n = len(drops)
    scores, room = scores[:n], [d + e for d, e in zip(drops, extra[:n], strict=True)]
    grow = redistribute(drops, scores, room)
    assert all(0 <= g <= r for g, r in zip(grow, room, strict=True))
    positive = [i for i in range(n) if scores[i] > 0]
    if not positive:
        assert grow == drops  # no signal: each layer regrows its own
        return
    # every dropped weight comes back somewhere; unscored layers take only what the full
    # scored layers cannot, each first up to its own drops
    assert sum(grow) == sum(drops)
    overflow = max(0, sum(drops) - sum(room[i] for i in positive))
    unscored = [i for i in range(n) if scores[i] == 0]
    assert sum(grow[i] for i in unscored) == overflow
    if overflow <= sum(drops[i] for i in unscored):
        assert all(grow[i] <= drops[i] for i in unscored)
    # proportional: a layer not at its room gets within one of its share of what is left
    # after the full layers
    free = [i for i in positive if grow[i] < room[i]]
    if free:
        left = sum(grow[i] for i in free)
        total = sum(scores[i] for i in free)
        for i in free:
            assert abs(grow[i] - left * scores[i] / total) < 1 + 1e-9


def test_redistribute_by_momentum_moves_weights_to_the_layer_that_learns() -> None:
    """Sparse momentum: the total stays, the layer whose live weights have the larger mean
    momentum grows more than it dropped, and the history records the moves."""
    torch.manual_seed(0)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = {"name": "set", "every": 3, "end": 100, "fraction": 0.3, "redistribute": "momentum"}
    pruner = sc.Pruner(model, sparsity=0.9, schedule=schedule, optimizer=opt)
    pruner.step()
    start = _live(model)
    _train_steps(model, pruner, opt, 2)
    names = sorted(start)
    # make one layer's momentum dominate, then run the update step
    module = model.get_submodule(names[0].rsplit(".", 1)[0])
    raw = raw_parameter(module, "weight")
    opt.state[raw]["momentum_buffer"].mul_(1000)
    _train_steps(model, pruner, opt, 1)
    after = _live(model)
    assert sum(after.values()) == sum(start.values())
    assert after[names[0]] > start[names[0]]
    assert all(after[n] <= start[n] for n in names[1:])
    assert [e.kind for e in pruner.history][-1] == "drop_grow"


def test_redistribute_refuses_unknown_rules_and_optimizers_without_momentum() -> None:
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sc.ConfigError, match="redistribute 'global' is unknown; allowed: none"):
        sc.Pruner(model, sparsity=0.9, schedule={"name": "rigl", "redistribute": "global"})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # no momentum
    schedule = {"name": "set", "every": 2, "end": 100, "redistribute": "momentum"}
    pruner = sc.Pruner(model, sparsity=0.9, schedule=schedule, optimizer=opt)
    pruner.step()
    opt.step()  # SGD without momentum keeps no per-weight state
    with pytest.raises(sc.ConfigError, match="needs an optimizer that keeps a momentum"):
        _train_steps(model, pruner, opt, 2)
    no_opt = sc.Pruner(make_mlp(), sparsity=0.9, schedule=schedule)
    no_opt.step()
    with pytest.raises(sc.ConfigError, match="needs the optimizer"):
        _train_steps(no_opt.model, no_opt, opt, 2)


# --------------------------------------------------------------------------- lottery


def test_lottery_rounds_prune_a_fifth_of_what_remains_and_rewind_the_survivors() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = Lottery(every=5, rate=0.2, rewind=0)
    final = 1 - 0.8**3  # three rounds exactly
    pruner = sc.Pruner(model, sparsity=final, schedule=schedule, optimizer=opt)
    assert schedule.round_count(final) == 3 and pruner.last_step == 15
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner.step()  # step 0: the snapshot of the initial weights
    data = _data()
    sparsities = []
    for step in range(1, 16):
        x, y = data[step % len(data)]
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if pruner.step() and step % 5 == 0:
            sparsities.append(pruner.measured_sparsity())
            # every surviving weight (and every bias) is back at its initial value
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear):
                    w, mask = module.weight.detach(), module.parametrizations.weight[0].mask
                    assert torch.equal(w[mask], initial[f"{name}.weight"][mask])
                    assert bool((w[~mask] == 0).all())
                    assert torch.equal(module.bias, initial[f"{name}.bias"])
            assert all(
                not bool(s["momentum_buffer"].any()) for s in opt.state.values()
            )  # training restarts with a fresh optimizer state
    expected = [1 - 0.8, 1 - 0.8**2, final]
    assert sparsities == pytest.approx(expected, abs=2 / 768)
    assert [e.kind for e in pruner.history] == ["snapshot"] + ["prune", "rewind"] * 3


def test_lottery_bad_input() -> None:
    with pytest.raises(sc.ConfigError, match="rewind step 10"):
        Lottery(every=10, rewind=10)
    with pytest.raises(sc.ConfigError, match=r"\(0, 1\)"):
        Lottery(rate=1.0)
    with pytest.raises(sc.ConfigError, match=r"\(0, 1\)"):
        SET(fraction=0.0)
    with pytest.raises(sc.ConfigError, match=">= 1"):
        SET(every=0)
    with pytest.raises(sc.ConfigError, match="'normal' is unknown; allowed: erk, uniform, lamp"):
        RigL(distribution="normal")
    with pytest.raises(sc.ConfigError, match="SET decay 'linear' is unknown; allowed: constant"):
        SET(decay="linear")
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(sc.ConfigError, match="RigL grow_scale must be a finite number >= 0"):
            RigL(grow_scale=bad)
    with pytest.raises(sc.ConfigError, match=">= 1"):
        IHT(sparse=0)


# --------------------------------------------------------------------------- DSD, IHT


def test_dsd_goes_dense_sparse_dense() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = sc.Pruner(
        model, sparsity=0.7, schedule={"name": "dsd", "start": 2, "end": 6}, optimizer=opt
    )
    pruner.step()
    masks = _train_steps(model, pruner, opt, 8)
    assert not masks[0]  # dense before `start`
    assert masks[1] and masks[4]  # sparse from step 2 to 5
    assert not masks[5] and not any(parametrize.is_parametrized(m) for m in model.modules())
    # after re-densifying, the pruned weights train again from zero
    final = model[0].weight.detach()
    assert float((final == 0).float().mean()) < 0.05
    assert [e.kind for e in pruner.history] == ["prune", "densify"]


def test_iht_alternates_and_may_revive_weights() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = sc.Pruner(
        model,
        sparsity=0.8,
        schedule={"name": "iht", "sparse": 2, "dense": 6, "cycles": 2},
        optimizer=opt,
    )
    pruner.step()
    first = sc.collect_masks(model)
    masks = _train_steps(model, pruner, opt, 6)  # masks[i]: after step i + 1
    dead = (~first["0.weight"]).nonzero()[0]
    with torch.no_grad():
        model[0].weight[tuple(dead)] = 10.0  # a weight pruned at step 0 grows large while dense
    masks += _train_steps(model, pruner, opt, 10)
    # steps 0-1 sparse, 2-7 dense, 8-9 sparse, 10-15 dense, 16 the final threshold
    assert masks[0] and not masks[1] and not masks[6] and masks[7] and not masks[9]
    assert masks[15] and pruner.measured_sparsity() == pytest.approx(0.8, abs=1 / 768)
    assert bool(masks[7]["0.weight"][tuple(dead)])  # thresholding afresh revives it
    assert [e.kind for e in pruner.history] == ["remask", "densify"] * 2 + ["remask"]


def test_sparse_schedules_survive_state_dict_and_deepcopy() -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = sc.Pruner(
        model, sparsity=0.8, schedule={"name": "set", "every": 2, "end": 20}, optimizer=opt
    )
    pruner.step()
    _train_steps(model, pruner, opt, 5)
    clone = copy.deepcopy(model)
    fresh = make_mlp(seed=3)
    sc.load_masked_state_dict_(fresh, model.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(clone(x), model(x)) and torch.equal(fresh(x), model(x))


def test_drop_and_grow_drops_nan_weights_first_and_keeps_the_count() -> None:
    """A diverged step leaves NaN weights: they are the first dropped, and the number of live
    weights stays what it was (a NaN must not make a dead position look droppable)."""
    w = torch.arange(1.0, 17.0).reshape(4, 4)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[1, 3, 5, 7, 9, 11]] = True
    w.view(-1)[[7, 11]] = float("nan")
    new, grown = drop_and_grow(w, mask.reshape(4, 4), 0.34, "random")
    assert int(new.sum()) == 6
    kept = (new & ~grown).reshape(-1)
    assert kept.nonzero().squeeze(1).tolist() == [1, 3, 5, 9]  # 7 and 11 (NaN) dropped
