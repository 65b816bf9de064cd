"""NetAdapt (Yang et al. 2018) as an allocation search: budgets met, fine-tuning called as the
paper's schedule says (short per candidate, long once), the original model untouched."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

import secateurs as sc
import secateurs.search.netadapt  # registers "netadapt"
from conftest import make_convnet
from helpers import assert_untouched, snapshot
from secateurs.data import synthetic
from secateurs.errors import BudgetError, ConfigError
from secateurs.graph import build_graph
from secateurs.metrics import profile
from secateurs.search.base import SEARCHES, SearchContext
from secateurs.search.netadapt import NetAdapt
from secateurs.search.space import ChannelSpace, ElementSpace

X = torch.randn(1, 3, 8, 8)
#: Latency needs layers whose compute outweighs the per-call overhead: a larger image
X_LATENCY = torch.randn(1, 3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def latency_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The latency cache in a temporary directory."""
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))


def weight_score(model: nn.Module) -> float:
    """A cheap deterministic score: candidates that keep more weight mass score higher."""
    with torch.no_grad():
        return float(sum(p.abs().sum() for p in model.parameters()))


class Counter:
    """A toy fine-tune: records every call (model id, steps)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, model: nn.Module, steps: int) -> None:
        self.calls.append((id(model), steps))


def _check_schedule(result: sc.SearchResult, counter: Counter, short: int, long: int) -> None:
    """Short fine-tunes: one per candidate of every iteration; the long one: once, last, on
    the returned model."""
    iterations = result.history["iterations"]
    candidates = sum(len(it["candidates"]) for it in iterations)
    assert candidates >= len(iterations) >= 1
    assert [s for _, s in counter.calls] == [short] * candidates + [long]
    assert counter.calls[-1][0] == id(result.model)


def _search(
    model: nn.Module,
    budget: sc.Budget,
    counter: Counter,
    lines: list[str] | None = None,
    x: torch.Tensor = X,
    **opts: object,
) -> sc.SearchResult:
    return sc.search_allocation(
        model,
        x,
        budget,
        method={"name": "netadapt", "short_steps": 3, "long_steps": 11, **opts},
        evaluate=weight_score,
        finetune=counter,
        progress=None if lines is None else lines.append,
    )


def test_macs_budget_met_on_the_returned_model() -> None:
    model = make_convnet()
    state = snapshot(model)
    counter, lines = Counter(), []
    result = _search(model, sc.MACs(0.5), counter, lines, step=0.1)
    assert_untouched(model, state)
    assert result.method == "netadapt" and result.unit == "MACs"
    assert result.limit == round(0.5 * profile(model, X).totals["macs"])
    assert result.value <= result.limit
    assert result.model is not None and result.model is not model
    macs = profile(result.model, X).totals["macs"]
    assert macs == result.value and macs <= result.limit
    _check_schedule(result, counter, 3, 11)
    iterations = result.history["iterations"]
    assert len(lines) == len(iterations)
    assert all(line.startswith(f"iteration {i + 1}:") for i, line in enumerate(lines))
    # every iteration lowers the value, and the chosen candidate is the best scored one
    values = [result.history["dense"]] + [it["value"] for it in iterations]
    assert all(b < a for a, b in itertools.pairwise(values))
    for it in iterations:
        assert it["score"] == max(c["score"] for c in it["candidates"])
        assert it["layer"] in {c["layer"] for c in it["candidates"]}
    # the score is the final model's, after the long fine-tune
    assert result.score == pytest.approx(weight_score(result.model))
    assert result.evaluations == sum(len(it["candidates"]) for it in iterations) + 1


def test_ratios_describe_the_returned_model_and_replay_with_shrink() -> None:
    model = make_convnet()
    result = _search(model, sc.MACs(0.6), Counter(), step=0.1)
    assert set(result.ratios) == {"0", "3"}  # groups named by the original producing layers
    assert result.model is not None
    widths = {"0": result.model[0].out_channels, "3": result.model[3].out_channels}
    assert result.history["widths"] == widths
    for name, dense in (("0", 16), ("3", 24)):
        assert result.ratios[name] == pytest.approx(1 - widths[name] / dense)
    # the same cut on a fresh copy of the original, by the ratio map
    small = sc.shrink(model, X, sc.MACs(0.6), allocation=result.ratios)
    assert small[0].out_channels == widths["0"] and small[3].out_channels == widths["3"]


def test_latency_budget_met_with_the_cached_table(tmp_path: Path) -> None:
    model = make_convnet()
    state = snapshot(model)
    counter = Counter()
    result = _search(model, sc.Latency(0.7), counter, x=X_LATENCY, step=0.1, decay=0.9)
    assert_untouched(model, state)
    assert result.unit == "ms (predicted)"
    assert result.value <= result.limit
    _check_schedule(result, counter, 3, 11)
    assert list((tmp_path / "latency").glob("*.json"))  # one table, cached
    assert result.model is not None
    # the prediction for the returned model's own shapes agrees with the search's value
    from secateurs.graph.latency import LatencyTable

    x = X_LATENCY
    table = LatencyTable.build(model, x, build_graph(model, x))
    assert table.from_cache
    assert table.estimate(build_graph(result.model, x).shapes) == pytest.approx(result.value)


def test_finetune_really_trains_the_candidates() -> None:
    """With SGD on synthetic data (a few steps) the pruned copies train; the original not."""
    data = synthetic(n_train=64, n_test=32, num_classes=4, shape=(3, 8, 8), seed=0)
    xs, ys = data.train.tensors
    model = make_convnet()
    state = snapshot(model)
    seen: list[int] = []

    def finetune(m: nn.Module, steps: int) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        m.train()
        for i in range(steps):
            j = (i * 16) % len(xs)
            loss = nn.functional.cross_entropy(m(xs[j : j + 16]), ys[j : j + 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
        seen.append(steps)

    xt, yt = data.test.tensors
    result = sc.search_allocation(
        model,
        X,
        sc.Params(0.7),
        method=NetAdapt(step=0.15, short_steps=2, long_steps=4),
        data=[(xt, yt)],
        finetune=finetune,
    )
    assert_untouched(model, state)
    assert result.model is not None
    assert profile(result.model, X).totals["params"] <= result.limit
    assert seen[-1] == 4 and set(seen[:-1]) == {2}
    assert 0.0 <= (result.score or 0.0) <= 1.0


def test_already_within_budget_only_long_finetune() -> None:
    counter = Counter()
    result = _search(make_convnet(), sc.MACs(1.0), counter)
    assert result.history["iterations"] == []
    assert all(r == 0 for r in result.ratios.values())
    assert [s for _, s in counter.calls] == [11]


def test_finetune_missing_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="finetune="):
        sc.search_allocation(
            make_convnet(), X, sc.MACs(0.5), method="netadapt", evaluate=weight_score
        )


def test_budget_errors() -> None:
    counter = Counter()
    # one iteration cannot reach half the MACs with a 5% step
    with pytest.raises(BudgetError, match="in 1 iterations"):
        _search(make_convnet(), sc.MACs(0.5), counter, step=0.05, max_iterations=1)
    # with half of each layer at most, one layer alone keeps >= 50% of the MACs and both
    # together about 28%: a step straight to 30% has no single-layer candidate
    with pytest.raises(BudgetError, match="no single layer") as err:
        sc.search_allocation(
            make_convnet(),
            X,
            sc.MACs(0.3),
            method=NetAdapt(step=1.0),
            evaluate=weight_score,
            finetune=Counter(),
            max_ratio=0.5,
        )
    assert "smallest value reached" in str(err.value)


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"step": 0}, "step"),
        ({"step": 1.5}, "step"),
        ({"decay": 0.0}, "decay"),
        ({"short_steps": -1}, "short_steps"),
        ({"long_steps": 1.5}, "long_steps"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"max_iterations": True}, "max_iterations"),
    ],
)
def test_options_are_validated(options: dict[str, object], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        SEARCHES.build({"name": "netadapt", **options})


def test_element_space_and_data_criteria_are_refused() -> None:
    ctx = SearchContext(weight_score, Counter())
    space = ElementSpace(make_convnet())
    with pytest.raises(ConfigError, match="space='channels'"):
        NetAdapt().search(space, sc.Params(0.5), ctx)
    taylor = ChannelSpace(
        make_convnet(),
        X,
        criterion="taylor",
        data=[(X, torch.tensor([0]))],
        loss_fn=nn.functional.cross_entropy,
    )
    with pytest.raises(ConfigError, match="needs data"):
        NetAdapt().search(taylor, sc.MACs(0.5), ctx)
    with pytest.raises(ConfigError, match="finetune="):
        NetAdapt().search(
            ChannelSpace(make_convnet(), X), sc.MACs(0.5), SearchContext(weight_score)
        )


def test_max_ratio_and_excluded_layers_hold_across_iterations() -> None:
    """The cap is on the original width (not a fraction of what is left each iteration), and
    an excluded layer (given as a module of the original) keeps its channels."""
    model = make_convnet()
    result = sc.search_allocation(
        model,
        X,
        sc.MACs(0.55),
        method=NetAdapt(step=0.08, short_steps=1, long_steps=1),
        evaluate=weight_score,
        finetune=Counter(),
        max_ratio=0.5,
        exclude=[model[3]],
    )
    assert set(result.ratios) == {"0"}
    assert result.ratios["0"] <= 0.5
    assert result.model is not None and result.model[3].out_channels == 24
