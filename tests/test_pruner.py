"""The pruner: allocation across layers, budgets, monotonicity, determinism, bad input, registry."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import secateurs as sc
from helpers import snapshot
from secateurs.registry import Registry, to_spec


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.Linear(16, 6))


LAYERS = ["0", "2", "3"]


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in LAYERS}


def zeros(model: nn.Module, name: str) -> int:
    return int((model.get_submodule(name).weight == 0).sum())


def pruned_sets(model: nn.Module) -> dict[str, Tensor]:
    return {n: (model.get_submodule(n).weight == 0).detach().clone() for n in LAYERS}


def lowest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` lowest entries of a flat tensor (no ties in random data)."""
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    out[scores.argsort()[:k]] = True
    return out


def split(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, w in like.items():
        out[name] = flat[start : start + w.numel()].reshape(w.shape)
        start += w.numel()
    return out


def assert_same_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


# -- allocation -------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("s", [0.3, 0.75, 0.99])
def test_global_matches_brute_force_global_threshold(s: float, p: int) -> None:
    model = make_model()
    dense = weights(model)
    sc.prune_(model, s, criterion=sc.Magnitude(p=p))
    flat = torch.cat([w.abs().reshape(-1) ** p for w in dense.values()])
    expected = split(lowest(flat, round(s * flat.numel())), dense)
    got = pruned_sets(model)
    for name in LAYERS:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("s", [0.3, 0.75, 0.99])
def test_uniform_gives_every_layer_the_same_sparsity(s: float) -> None:
    model = make_model()
    model[3].weight.data *= 100  # a scale difference Global would exploit
    dense = weights(model)
    sc.prune_(model, s, allocation=sc.Uniform())
    for name, w in dense.items():
        assert zeros(model, name) == round(s * w.numel()), name
        expected = lowest(w.abs().reshape(-1), round(s * w.numel())).reshape(w.shape)
        assert torch.equal(pruned_sets(model)[name], expected)


def lamp_scores(w: Tensor) -> Tensor:
    """Hand LAMP: w_u^2 / sum of w_v^2 over the layer's weights with |w_v| >= |w_u|."""
    sq = w.reshape(-1).double() ** 2
    return torch.stack([sq[i] / sq[sq >= sq[i]].sum() for i in range(sq.numel())])


def test_lamp_keeps_every_layer_alive_where_global_empties_one() -> None:
    model = make_model()
    model[2].weight.data *= 1e-3
    global_model = copy.deepcopy(model)
    sc.prune_(global_model, 0.99)
    assert zeros(global_model, "2") == global_model[2].weight.numel()  # Global empties it
    dense = weights(model)
    sc.prune_(model, 0.99, allocation=sc.LAMP())
    total = sum(w.numel() for w in dense.values())
    assert sum(zeros(model, n) for n in LAYERS) == round(0.99 * total)
    for name in LAYERS:
        assert zeros(model, name) < model.get_submodule(name).weight.numel(), name
    flat = torch.cat([lamp_scores(w) for w in dense.values()])
    expected = split(lowest(flat, round(0.99 * total)), dense)
    for name in LAYERS:
        assert torch.equal(pruned_sets(model)[name], expected[name]), name


def test_layer_map_applies_first_matching_pattern_and_default() -> None:
    model = make_model()
    sc.prune_(model, 0.5, allocation=sc.LayerMap({"0": 0.2, r"\d": 0.9}))
    assert zeros(model, "0") == round(0.2 * 240)
    assert zeros(model, "2") == round(0.9 * 320)
    assert zeros(model, "3") == round(0.9 * 96)
    model = make_model()
    sc.prune_(model, 0.5, allocation=sc.LayerMap({r"2\.weight": 0.7}, default=0.1))
    assert zeros(model, "2") == round(0.7 * 320)
    assert zeros(model, "0") == round(0.1 * 240)
    model = make_model()
    sc.prune_(model, 0.4, allocation={"name": "layer_map", "ratios": {"3": 0.8}})
    assert zeros(model, "3") == round(0.8 * 96)
    assert zeros(model, "0") == round(0.4 * 240)


def test_layer_map_pattern_matching_nothing_is_a_config_error_and_untouched() -> None:
    model = make_model()
    state = snapshot(model)
    with pytest.raises(sc.ConfigError, match=r"'decoder\.\*'.*0, 2, 3"):
        sc.prune_(model, 0.5, allocation=sc.LayerMap({"0": 0.3, "decoder.*": 0.5}))
    assert_same_state(model, state)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("bad", [{"0": 1.0}, {"0": -0.1}, {"0": "a"}, {"(": 0.5}, "not a mapping"])
def test_layer_map_bad_values_are_config_errors(bad: Any) -> None:
    with pytest.raises(sc.ConfigError):
        sc.LayerMap(bad)


# -- budgets ----------------------------------------------------------------------------


def nonzero_parameters(model: nn.Module) -> int:
    n = sum(int((m.bias != 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    return n + sum(int((model.get_submodule(name).weight != 0).sum()) for name in LAYERS)


TOTAL = 12 * 20 + 20 + 20 * 16 + 16 + 16 * 6 + 6  # 698
BIASES = 20 + 16 + 6


@pytest.mark.parametrize("keep", [600, 300, 123, BIASES + 1, 0.5, 0.25])
def test_params_budget_hits_the_parameter_count(keep: int | float) -> None:
    model = make_model()
    sc.prune_(model, budget=sc.Params(keep))
    want = round(keep * TOTAL) if isinstance(keep, float) else keep
    assert nonzero_parameters(model) == want


def test_params_budget_above_the_model_prunes_nothing() -> None:
    model = make_model()
    sc.prune_(model, budget={"name": "params", "keep": 10_000})
    assert nonzero_parameters(model) == TOTAL


def test_unreachable_params_budget_names_the_smallest_reachable_value() -> None:
    model = make_model()
    state = snapshot(model)
    with pytest.raises(sc.BudgetError, match=rf"Params\({BIASES + 1}\)"):
        sc.prune_(model, budget=sc.Params(BIASES))
    assert_same_state(model, state)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("keep", [0, -3, 0.0, 1.5, "a", True, None])
def test_bad_params_budget_is_a_config_error(keep: Any) -> None:
    with pytest.raises(sc.ConfigError, match=re.escape(repr(keep))):
        sc.Params(keep)


def test_sparsity_and_budget_together_is_a_config_error() -> None:
    with pytest.raises(sc.ConfigError, match="not both"):
        sc.prune_(make_model(), 0.5, budget=sc.Params(100))


# -- monotonicity and determinism -------------------------------------------------------


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
@pytest.mark.parametrize(
    "structure",
    [sc.Elements(), sc.Blocks((2, 2)), sc.Channels(dim=1)],
    ids=["elements", "blocks", "channels"],
)
def test_pruning_again_keeps_everything_already_pruned(criterion: str, structure: Any) -> None:
    model = make_model()
    previous = pruned_sets(model)
    for i, s in enumerate([0.3, 0.6, 0.9]):
        sc.prune_(model, s, criterion=criterion, structure=structure, seed=i)
        now = pruned_sets(model)
        for name in LAYERS:
            assert bool((now[name] | ~previous[name]).all()), f"{name} regrew at {s}"
        previous = now
    total = sum(m.numel() for m in previous.values())
    assert sum(int(m.sum()) for m in previous.values()) >= round(0.85 * total)


def test_pruner_prune_to_with_random_never_regrows() -> None:
    model = make_model()
    pruner = sc.Pruner(model, 0.9, criterion=sc.Random())
    previous = pruned_sets(model)
    for s in [0.2, 0.5, 0.7, 0.9]:
        pruner.prune_to(s)
        now = pruned_sets(model)
        for name in LAYERS:
            assert bool((now[name] | ~previous[name]).all())
        previous = now
        assert pruner.history[-1].measured == pytest.approx(s, abs=1 / 656)


def test_prune_to_lower_sparsity_is_a_config_error_and_untouched() -> None:
    model = make_model()
    sc.prune_(model, 0.8)
    state = snapshot(model)
    masks = sc.collect_masks(model)
    with pytest.raises(sc.ConfigError, match=r"0\.800\d.*0\.5000"):
        sc.prune_(model, 0.5)
    assert_same_state(model, state)
    for name, mask in sc.collect_masks(model).items():
        assert torch.equal(mask, masks[name])


@pytest.mark.parametrize(
    ("structure", "s"),
    [(sc.Elements(), 0.8), (sc.Blocks((2, 2)), 0.8), (sc.Blocks((2, 2)), 0.81)],
    ids=["elements-0.8", "blocks-0.8", "blocks-0.81"],
)
def test_asking_the_same_sparsity_again_is_a_no_op(structure: Any, s: float) -> None:
    # 0.8 of 656 weights is 524.8: 525 are pruned, a measured 0.8003 "above" the 0.8 asked;
    # 0.81 in 2x2 blocks is 531.4 -> 532 weights (a measured 0.8110)
    model = make_model()
    sc.prune_(model, s, structure=structure)
    state = snapshot(model)
    sc.prune_(model, s, structure=structure)
    assert_same_state(model, state)


@pytest.mark.parametrize(
    "options",
    [
        {"criterion": "random", "seed": 3},
        {"criterion": "magnitude"},
        {"criterion": "random", "structure": sc.Blocks((2, 4)), "allocation": "lamp", "seed": 11},
        {"criterion": "random", "structure": sc.NM(2, 4)},
    ],
    ids=["random", "magnitude", "random_blocks_lamp", "random_nm"],
)
def test_same_seed_same_inputs_same_masks(options: dict[str, Any]) -> None:
    a, b = make_model(seed=7), make_model(seed=7)
    sparsity = None if "structure" in options and isinstance(options["structure"], sc.NM) else 0.6
    sc.prune_(a, sparsity, **options)
    sc.prune_(b, sparsity, **options)
    ma, mb = sc.collect_masks(a), sc.collect_masks(b)
    assert ma.keys() == mb.keys() == {f"{n}.weight" for n in LAYERS}
    for name in ma:
        assert torch.equal(ma[name], mb[name])


# -- bad input --------------------------------------------------------------------------


class OnlyNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm(4)


BAD_INPUTS: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], type[Exception], str]] = {
    "sparsity_one": (make_model, {"sparsity": 1.0}, sc.ConfigError, "1.0"),
    "sparsity_negative": (make_model, {"sparsity": -0.1}, sc.ConfigError, "-0.1"),
    "sparsity_above_one": (make_model, {"sparsity": 1.5}, sc.ConfigError, "1.5"),
    "sparsity_string": (make_model, {"sparsity": "a"}, sc.ConfigError, "'a'"),
    "sparsity_nan": (make_model, {"sparsity": float("nan")}, sc.ConfigError, "nan"),
    "sparsity_bool": (make_model, {"sparsity": True}, sc.ConfigError, "True"),
    "no_sparsity": (make_model, {}, sc.ConfigError, "sparsity="),
    "nm_n_equals_m": (
        make_model,
        {"structure": {"name": "nm", "n": 4, "m": 4}},
        sc.ConfigError,
        "n=4, m=4",
    ),
    "nm_n_above_m": (
        make_model,
        {"structure": {"name": "nm", "n": 5, "m": 4}},
        sc.ConfigError,
        "n=5",
    ),
    "nm_not_dividing": (make_model, {"structure": sc.NM(2, 8)}, sc.ModelError, "exclude=['0']"),
    "include_nothing": (
        make_model,
        {"sparsity": 0.5, "include": ["decoder"]},
        sc.ConfigError,
        "'decoder'",
    ),
    "exclude_nothing": (
        make_model,
        {"sparsity": 0.5, "exclude": ["head"]},
        sc.ConfigError,
        "'head'",
    ),
    "params_nothing": (
        make_model,
        {"sparsity": 0.5, "params": ["scale"]},
        sc.ConfigError,
        "'scale'",
    ),
    "include_bad_regex": (make_model, {"sparsity": 0.5, "include": ["("]}, sc.ConfigError, "'('"),
    "include_not_a_type": (make_model, {"sparsity": 0.5, "include": [3]}, sc.ConfigError, "3"),
    "nothing_prunable": (OnlyNorm, {"sparsity": 0.5}, sc.ModelError, "OnlyNorm"),
    "exclude_everything": (
        make_model,
        {"sparsity": 0.5, "exclude": [nn.Linear]},
        sc.ModelError,
        "nothing to prune",
    ),
    "unknown_structure": (
        make_model,
        {"sparsity": 0.5, "structure": "elementz"},
        sc.ConfigError,
        "'elementz'",
    ),
    "unknown_option": (
        make_model,
        {"sparsity": 0.5, "criterion": {"name": "magnitude", "q": 2}},
        sc.ConfigError,
        "'q'",
    ),
    "layer_map_unmatched": (
        make_model,
        {"sparsity": 0.5, "allocation": sc.LayerMap({"enc": 0.5})},
        sc.ConfigError,
        "'enc'",
    ),
    "data_criterion_without_data": (
        make_model,
        {"sparsity": 0.5, "criterion": "taylor"},
        sc.ConfigError,
        "data=",
    ),
    "schedule_in_prune_": (
        make_model,
        {"sparsity": 0.5, "schedule": "gradual"},
        sc.ConfigError,
        "Pruner",
    ),
}


BAD_CASES = [
    pytest.param(case, prepruned, id=f"{case}-{'prepruned' if prepruned else 'dense'}")
    for case in BAD_INPUTS
    for prepruned in (False, True)
    if not (prepruned and case == "nothing_prunable")
]


@pytest.mark.parametrize(("case", "prepruned"), BAD_CASES)
def test_bad_input_raises_and_leaves_the_model_untouched(case: str, prepruned: bool) -> None:
    build, options, error, needle = BAD_INPUTS[case]
    model = build()
    if prepruned:
        sc.prune_(model, 0.3)
    state = snapshot(model)
    masks = sc.collect_masks(model)
    options = dict(options)
    sparsity = options.pop("sparsity", None)
    with pytest.raises(error) as info:
        sc.prune_(model, sparsity, **options)
    assert isinstance(info.value, sc.SecateursError)
    assert needle in str(info.value)
    assert_same_state(model, state)
    if not prepruned:
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
    now = sc.collect_masks(model)
    assert now.keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(now[name], mask)


# -- registry ---------------------------------------------------------------------------

REGISTRIES: dict[str, Registry[Any]] = {
    "structure": sc.STRUCTURES,
    "criterion": sc.CRITERIA,
    "allocation": sc.ALLOCATIONS,
    "schedule": sc.SCHEDULES,
    "budget": sc.BUDGETS,
    "search": sc.SEARCHES,
}

#: Options for every registered name: a new name without an entry here fails the suite.
OPTIONS: dict[str, dict[str, Any]] = {
    "elements": {},
    "nm": {"n": 1, "m": 4},
    "blocks": {"shape": [2, 2]},
    "channels": {"dim": 1},
    "magnitude": {"p": 2},
    "random": {},
    "taylor": {},
    "obd": {},
    "bn_scale": {},
    "apoz": {},
    "mean_activation": {},
    "fpgm": {},
    "regression": {"method": "lasso", "samples": 64},
    "channel_obs": {"samples": 64, "dampening": 0.05},
    "wanda": {"sequential": False},
    "sparsegpt": {"blocksize": 64, "dampening": 0.05, "sequential": True},
    "obs": {"dampening": 0.02},
    "movement": {},
    "uniform": {},
    "global": {},
    "lamp": {},
    "layer_map": {"ratios": {"enc.*": 0.5}, "default": 0.25},
    "oneshot": {"at": 3},
    "iterative": {"rounds": 2, "every": 5, "start": 1},
    "gradual": {"start": 10, "end": 50, "every": 10, "initial": 0.1},
    "erk": {},
    "owl": {"m": 7.0, "lam": 0.05},
    "lottery": {"every": 20, "rate": 0.3, "rewind": 2, "rounds": 3},
    "static": {"distribution": "uniform"},
    "set": {"every": 5, "end": 40, "fraction": 0.2, "distribution": "uniform"},
    "rigl": {"every": 5, "end": 40, "fraction": 0.4, "distribution": "erk"},
    "dsd": {"start": 3, "end": 9},
    "iht": {"sparse": 4, "dense": 6, "cycles": 3, "start": 1},
    "sparsity": {"value": 0.5},
    "params": {"keep": 10},
    "macs": {"keep": 0.5},
    "bytes": {"keep": 0.25},
    "latency": {"keep": 0.5},
    "sensitivity": {"ratios": [0.0, 0.25, 0.5], "workers": 2},
    "amc": {"episodes": 20, "warmup": 5, "protocol": "accuracy"},
    "netadapt": {"step": 0.1, "short_steps": 5, "long_steps": 50},
}

#: Names whose class has required options (no sensible default).
REQUIRED = {
    "sparsity": "value",
    "params": "keep",
    "macs": "keep",
    "bytes": "keep",
    "latency": "keep",
}

ALL_NAMES = [(axis, name) for axis, reg in REGISTRIES.items() for name in reg.names()]


def test_every_registered_name_has_test_options() -> None:
    assert {name for _, name in ALL_NAMES} == set(OPTIONS)
    expected_axes = {
        "structure": {"elements", "nm", "blocks", "channels"},
        "criterion": {
            "magnitude",
            "random",
            "taylor",
            "obd",
            "bn_scale",
            "apoz",
            "mean_activation",
            "fpgm",
            "regression",
            "channel_obs",
            "wanda",
            "sparsegpt",
            "obs",
            "movement",
        },
        "allocation": {"uniform", "global", "lamp", "layer_map", "erk", "owl"},
        "schedule": {
            "oneshot",
            "iterative",
            "gradual",
            "lottery",
            "static",
            "set",
            "rigl",
            "dsd",
            "iht",
        },
        "budget": {"sparsity", "params", "macs", "bytes", "latency"},
        "search": {"sensitivity", "amc", "netadapt"},
    }
    for axis, names in expected_axes.items():
        assert names <= set(REGISTRIES[axis].names()), axis


@pytest.mark.parametrize(("axis", "name"), ALL_NAMES)
def test_every_name_builds_from_its_name(axis: str, name: str) -> None:
    registry = REGISTRIES[axis]
    cls = registry.get(name)
    if name in REQUIRED:
        # a name alone cannot build it: the error must be a ConfigError naming the option
        with pytest.raises(sc.ConfigError, match=REQUIRED[name]):
            registry.build(name)
        return
    obj = registry.build(name)
    assert type(obj) is cls
    assert to_spec(obj)["name"] == name


@pytest.mark.parametrize(("axis", "name"), ALL_NAMES)
def test_every_name_builds_from_a_dict_with_options_and_round_trips(axis: str, name: str) -> None:
    registry = REGISTRIES[axis]
    obj = registry.build({"name": name, **OPTIONS[name]})
    assert type(obj) is registry.get(name)
    spec = to_spec(obj)
    assert spec == {**spec, "name": name, **OPTIONS[name]}
    assert registry.build(spec) == obj


@pytest.mark.parametrize("axis", list(REGISTRIES))
def test_unknown_name_lists_the_allowed_names(axis: str) -> None:
    registry = REGISTRIES[axis]
    for spec in ("no_such_method", {"name": "no_such_method"}):
        with pytest.raises(sc.ConfigError) as info:
            registry.build(spec)
        message = str(info.value)
        assert "'no_such_method'" in message
        for name in registry.names():
            assert name in message


@pytest.mark.parametrize("axis", list(REGISTRIES))
def test_mapping_without_name_or_with_unknown_option_is_a_config_error(axis: str) -> None:
    registry = REGISTRIES[axis]
    with pytest.raises(sc.ConfigError, match="'name'"):
        registry.build({"p": 2})
    name = registry.names()[0]
    with pytest.raises(sc.ConfigError, match="'bogus'"):
        registry.build({"name": name, "bogus": 1})


def test_registering_a_second_class_under_a_taken_name_is_a_config_error() -> None:
    registry: Registry[Any] = Registry("thing")

    @registry.register("a")
    class A:
        pass

    with pytest.raises(sc.ConfigError, match="'a'"):

        @registry.register("a")
        class B:
            pass


def test_pruner_accepts_names_and_reports_its_plan() -> None:
    model = make_model()
    pruner = sc.Pruner(
        model,
        0.5,
        structure="blocks",
        criterion={"name": "magnitude", "p": 2},
        allocation="lamp",
        schedule={"name": "oneshot", "at": 2},
    )
    plan = pruner.plan()
    assert plan["structure"]["name"] == "blocks"
    assert plan["criterion"] == {"name": "magnitude", "p": 2}
    assert plan["allocation"]["name"] == "lamp"
    assert plan["schedule"] == {"name": "oneshot", "at": 2}
    assert plan["final_sparsity"] == 0.5
    assert plan["targets"] == [f"{n}.weight" for n in LAYERS]
