"""AMC (He et al. 2018): a DDPG agent choosing per-layer ratios, as an allocation search."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import secateurs as sc
import secateurs.search.amc
from conftest import make_mlp
from helpers import snapshot
from secateurs.errors import ConfigError, ModelError
from secateurs.metrics import profile
from secateurs.search.amc import AMC, _clamp, _static_features, _truncated_normal
from secateurs.search.base import SEARCHES
from secateurs.search.space import ChannelSpace, ElementSpace

X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
X_MLP = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
#: small networks and few episodes keep every search well under a second
FAST = {"name": "amc", "episodes": 6, "warmup": 3, "hidden": [16, 16], "batch_size": 8}


def make_convs(seed: int = 0) -> nn.Sequential:
    """Three convolutions whose channels can all be removed, then a classifier."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 16, 10),
    ).eval()


def _batches(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A held-out split labelled by the dense model itself (its accuracy is 1)."""
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        model.eval()
        for _ in range(2):
            xb = torch.randn(32, *x.shape[1:], generator=g)
            out.append((xb, model(xb).argmax(1)))
    return out


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _zero_rows(model: nn.Sequential) -> float:
    """Fraction of the first convolution's output channels that are zero (its ratio)."""
    w = model[0].weight.detach().flatten(1)
    return float((w.abs().sum(1) == 0).float().mean())


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ the budget


@pytest.mark.parametrize(
    ("space", "budget"),
    [
        ("channels", sc.MACs(0.5)),
        ("channels", sc.Params(0.4)),
        ("elements", sc.Sparsity(0.7)),
        ("elements", sc.Params(0.5)),
    ],
)
def test_resource_protocol_meets_the_budget_in_every_episode(space: str, budget: sc.Budget) -> None:
    model = make_convs() if space == "channels" else make_mlp()
    x = X if space == "channels" else X_MLP
    before = snapshot(model)
    messages: list[str] = []
    result = sc.search_allocation(
        model, x, budget, FAST, space=space, data=_batches(model, x), progress=messages.append
    )
    assert result.method == "amc"
    assert result.value <= result.limit
    episodes = result.history["episodes"]
    assert [e["episode"] for e in episodes] == list(range(6))
    assert all(e["value"] <= result.limit for e in episodes)  # the clamp, every episode
    assert all(e["reward"] == pytest.approx(e["score"] - 1.0) for e in episodes)  # -error
    best = max(episodes, key=lambda e: e["reward"])
    assert result.ratios == best["ratios"] and result.score == best["score"]
    assert result.evaluations == 6
    assert len(messages) == 6 and messages[0].startswith("episode 0: reward ")
    assert result.unit in messages[-1]
    assert _same_state(model, before)
    # the ratios feed the usual machinery and keep what was measured
    if space == "channels":
        small = sc.shrink(model, x, budget, allocation=result.ratios)
        macs = ChannelSpace(model, x).measure(sc.MACs(0.5), result.ratios)
        assert profile(small, x).totals["macs"] == macs


def test_clamp_is_the_smallest_ratio_that_keeps_the_budget_reachable() -> None:
    model = make_convs()
    space = ChannelSpace(model, X)
    budget = sc.MACs(0.1)
    limit = space.limit(budget)
    first, *later = space.layers
    rest = {layer.name: layer.max_ratio for layer in later}
    clamped = _clamp(space, budget, limit, {}, first, later, 0.0)
    assert space.measure(budget, {first.name: clamped, **rest}) <= limit
    # brute force over whole channels: nothing smaller keeps the budget reachable
    smaller = [k / first.size for k in range(first.size) if k / first.size < clamped]
    assert all(space.measure(budget, {first.name: r, **rest}) > limit for r in smaller)
    assert clamped > 0  # MACs(0.1) does need the first layer pruned
    # an action above the clamp is kept as it is
    assert _clamp(space, budget, limit, {}, first, later, first.max_ratio) == first.max_ratio
    # actions of 0 everywhere, clamped layer after layer, still end within the budget
    done: dict[str, float] = {}
    for t, layer in enumerate(space.layers):
        done[layer.name] = _clamp(space, budget, limit, done, layer, space.layers[t + 1 :], 0.0)
    assert space.measure(budget, done) <= limit


# ------------------------------------------------------------------ reproducibility


def test_same_seed_same_result_and_another_seed_differs() -> None:
    model = make_convs()
    data = _batches(model, X)

    def run(seed: int) -> sc.SearchResult:
        return sc.search_allocation(model, X, sc.MACs(0.5), FAST, data=data, seed=seed)

    one, two, other = run(3), run(3), run(4)
    assert one.ratios == two.ratios
    assert one.history == two.history
    assert [e["ratios"] for e in one.history["episodes"]] != [
        e["ratios"] for e in other.history["episodes"]
    ]


# --------------------------------------------------------------- accuracy-guaranteed


@pytest.mark.parametrize("clamp", [True, False])
def test_accuracy_protocol_rewards_minus_error_times_log_macs(clamp: bool) -> None:
    model = make_convs()
    result = sc.search_allocation(
        model,
        X,
        sc.MACs(0.2),
        {**FAST, "protocol": "accuracy", "clamp": clamp},
        data=_batches(model, X),
    )
    episodes = result.history["episodes"]
    assert result.history["protocol"] == "accuracy"
    assert result.unit == "MACs"
    for e in episodes:
        assert e["reward"] == pytest.approx(-(1.0 - e["score"]) * math.log(e["value"]))
    assert result.value == ChannelSpace(model, X).measure(sc.MACs(0.2), result.ratios)
    if clamp:  # the named budget is a ceiling for every episode
        assert all(e["value"] <= result.limit for e in episodes)
    else:  # the paper's unconstrained search: random warm-up actions leave more MACs
        assert any(e["value"] > result.limit for e in episodes)


def test_the_resource_protocol_cannot_drop_the_clamp() -> None:
    with pytest.raises(ConfigError, match="clamp=false needs protocol 'accuracy'"):
        AMC(clamp=False)
    with pytest.raises(ConfigError, match="clamp must be true or false"):
        AMC(protocol="accuracy", clamp="no")  # type: ignore[arg-type]


def test_accuracy_protocol_on_a_kept_fraction_counts_kept_weights() -> None:
    space = ElementSpace(make_mlp(), X_MLP)
    amc = AMC(protocol="accuracy")
    total = sum(layer.size for layer in space.layers)
    reward = amc.reward(0.75, 0.5, sc.Sparsity(0.5), space)
    assert reward == pytest.approx(-0.25 * math.log(0.5 * total))
    assert AMC().reward(0.75, 0.5, sc.Sparsity(0.5), space) == pytest.approx(-0.25)


# -------------------------------------------------------------------------- restoring


def test_the_model_is_restored_after_a_failing_or_nan_evaluation() -> None:
    model = make_convs()
    before = snapshot(model)
    calls = 0

    def raises(m: nn.Module) -> float:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("out of memory")
        return 0.5

    with pytest.raises(ModelError, match="RuntimeError: out of memory"):
        sc.search_allocation(model, X, sc.MACs(0.5), "amc", evaluate=raises)
    assert calls == 3 and _same_state(model, before)

    def nan(m: nn.Module) -> float:
        return float("nan") if _zero_rows(m) > 0 else 1.0  # NaN only on a pruned model

    with pytest.raises(ModelError, match="nan"):
        sc.search_allocation(model, X, sc.MACs(0.5), {**FAST, "episodes": 4}, evaluate=nan)
    assert _same_state(model, before)


# ---------------------------------------------------------------------------- learning


def test_the_agent_learns_to_spare_the_layer_the_evaluator_rewards() -> None:
    """The score is minus layer 0's ratio: after warm-up the actor prunes layer 0 far less
    than random actions did, and the best map spares it more than the uniform ratio."""
    model = make_convs()
    options = {
        "name": "amc",
        "episodes": 40,
        "warmup": 10,
        "hidden": [64, 64],
        "actor_lr": 1e-3,
        "batch_size": 32,
    }
    result = sc.search_allocation(
        model, X, sc.MACs(0.5), options, evaluate=lambda m: -_zero_rows(m), seed=0
    )
    first = ChannelSpace(model, X).layers[0].name
    episodes = result.history["episodes"]
    warm = [e["ratios"][first] for e in episodes[:10]]
    last = [e["ratios"][first] for e in episodes[-10:]]
    assert sum(last) / len(last) < 0.5 * sum(warm) / len(warm)
    uniform = 1 - math.sqrt(0.5)  # about what one shared channel ratio needs for MACs(0.5)
    assert result.ratios[first] < uniform
    assert result.score == -math.floor(result.ratios[first] * 8 + 1e-9) / 8


# ------------------------------------------------------------------------ the pieces


def test_layer_embedding_is_normalised_and_noise_stays_in_range() -> None:
    space = ChannelSpace(make_convs(), X)
    static = _static_features(space.layers)
    assert static.shape == (len(space.layers), 8)
    assert float(static.min()) >= 0.0 and float(static.max()) <= 1.0
    assert static[:, 0].tolist() == [0.0, 0.5, 1.0]  # the index
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    draws = [_truncated_normal(0.9, 0.5, g1) for _ in range(200)]
    assert draws == [_truncated_normal(0.9, 0.5, g2) for _ in range(200)]
    assert all(0.0 <= d <= 1.0 for d in draws)
    assert _truncated_normal(0.3, 0.0, g1) == 0.3


def test_registered_and_bad_options_name_what_is_allowed() -> None:
    assert SEARCHES.get("amc") is AMC
    model = make_convs()
    data = _batches(model, X)
    with pytest.raises(ConfigError, match=r"episodes must be an int >= 1; got -3"):
        sc.search_allocation(model, X, sc.MACs(0.5), {"name": "amc", "episodes": -3}, data=data)
    with pytest.raises(ConfigError, match=r"'resource', 'accuracy'.*got 'flops'"):
        sc.search_allocation(
            model, X, sc.MACs(0.5), {"name": "amc", "protocol": "flops"}, data=data
        )
    with pytest.raises(ConfigError, match="unknown option"):
        sc.search_allocation(model, X, sc.MACs(0.5), {"name": "amc", "epochs": 3}, data=data)
    for bad in (
        {"warmup": -1},
        {"hidden": []},
        {"hidden": [0]},
        {"actor_lr": 0.0},
        {"gamma": 1.5},
        {"tau": 0.0},
        {"sigma": -0.1},
        {"sigma_decay": 0.0},
        {"batch_size": 0},
        {"max_ratio": 1.5},
        {"episodes": True},
    ):
        with pytest.raises(ConfigError, match="amc"):
            AMC(**bad)  # type: ignore[arg-type]
