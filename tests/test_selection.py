"""Exact selection of the lowest-scoring groups (allocation/select.py) against a plain reference."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor

import secateurs as sc
from secateurs.allocation import select
from secateurs.allocation.select import ordered_keys, select_lowest
from secateurs.structures import GroupScores

INF = math.inf


def reference(layers: list[GroupScores], k: int) -> list[Tensor]:
    """Stable sort of every score (layer order, then index), cut closest to ``k``, smaller on a draw."""
    entries = []  # (score, layer, index, size) in position order
    for layer, g in enumerate(layers):
        values = g.scores.tolist()
        for i, v in enumerate(values):
            size = g.sizes if isinstance(g.sizes, int) else int(g.sizes[i])
            entries.append((v, layer, i, size))
    order = sorted(range(len(entries)), key=lambda j: entries[j][0])  # stable; -0.0 == 0.0
    best_take, best_dist, cum = 0, abs(0 - k), 0
    for take, j in enumerate(order, start=1):
        cum += entries[j][3]
        if abs(cum - k) < best_dist:
            best_take, best_dist = take, abs(cum - k)
    out = [torch.zeros(g.scores.numel(), dtype=torch.bool) for g in layers]
    for j in order[:best_take]:
        _, layer, i, _ = entries[j]
        out[layer][i] = True
    return out


def run(layers: list[GroupScores], k: int) -> list[Tensor]:
    """Select through the radix path and the sort path; both must agree."""
    fns = [lambda g=g: g for g in layers]
    with mock.patch.object(select, "SORT_LIMIT", -1):
        radix = select_lowest(fns, k)
    by_sort = select_lowest(fns, k)
    for a, b in zip(radix, by_sort, strict=True):
        assert torch.equal(a, b), (a, b)
    return radix


SPECIAL = [-INF, -1e30, -3.5, -1.0, -1e-30, 0.0, 1e-40, 0.5, 1.0, 2.0, 3.0e38]


def score_values(negative_zero: bool) -> st.SearchStrategy[float]:
    pool = [*SPECIAL, -0.0] if negative_zero else SPECIAL
    floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
    if not negative_zero:
        floats = floats.map(lambda x: x + 0.0)  # -0.0 + 0.0 is +0.0
    # small integers make many exact ties
    values = [st.sampled_from(pool), floats, st.integers(-3, 3).map(float)]
    if negative_zero:
        values.append(st.sampled_from([0.0, -0.0]))  # signed zeros, often side by side
    return st.one_of(*values)


@st.composite
def layer_lists(draw: st.DrawFn, negative_zero: bool) -> list[GroupScores]:
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        values = draw(st.lists(score_values(negative_zero), min_size=0, max_size=12))
        scores = torch.tensor(values, dtype=torch.float32)
        if draw(st.booleans()):
            sizes: Tensor | int = draw(st.integers(1, 5))
        else:
            sizes = torch.tensor(
                draw(st.lists(st.integers(1, 5), min_size=len(values), max_size=len(values))),
                dtype=torch.int64,
            )
        layers.append(GroupScores(scores, sizes))
    return layers


def check(layers: list[GroupScores], k: int) -> None:
    got, want = run(layers, k), reference(layers, k)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bool
        assert torch.equal(g, w), (g, w)


@settings(max_examples=40, deadline=None)
@given(
    layers=layer_lists(negative_zero=False),
    k_fraction=st.floats(-0.1, 1.2),
    chunk=st.sampled_from([1, 2, 3, 5, 1 << 20]),
)
def test_select_matches_stable_sort_reference(
    layers: list[GroupScores], k_fraction: float, chunk: int
) -> None:
    total = sum(g.total() for g in layers)
    with mock.patch.object(select, "CHUNK", chunk):
        check(layers, round(k_fraction * total))


@settings(max_examples=40, deadline=None)
@given(layers=layer_lists(negative_zero=True), k_fraction=st.floats(0, 1))
@example(layers=[GroupScores(torch.tensor([0.0, -0.0, 1.0]), 1)], k_fraction=1 / 3)
def test_select_matches_stable_sort_reference_with_negative_zero(
    layers: list[GroupScores], k_fraction: float
) -> None:
    total = sum(g.total() for g in layers)
    check(layers, round(k_fraction * total))


def test_negative_zero_ties_with_positive_zero_by_position() -> None:
    # -0.0 == 0.0: the tie is broken by position, so the first zero goes first
    scores = torch.tensor([0.0, -0.0, 1.0])
    got = run([GroupScores(scores, 1)], 1)
    assert got[0].tolist() == [True, False, False]


def test_chunking_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layers = [
        GroupScores(torch.randint(-4, 5, (17,)).float(), 1),
        GroupScores(torch.randn(13), torch.randint(1, 4, (13,))),
        GroupScores(torch.full((7,), 0.5), 3),
        GroupScores(torch.cat([torch.full((4,), -INF), torch.rand(6)]), 2),
    ]
    total = sum(g.total() for g in layers)
    unchunked = {k: run(layers, k) for k in (1, 7, total // 2, total - 1)}
    monkeypatch.setattr(select, "CHUNK", 4)
    for k, want in unchunked.items():
        got = run(layers, k)
        ref = reference(layers, k)
        for g, w, r in zip(got, want, ref, strict=True):
            assert torch.equal(g, w)
            assert torch.equal(g, r)


def test_ties_are_broken_by_layer_then_index() -> None:
    layers = [GroupScores(torch.ones(4), 1), GroupScores(torch.ones(4), 1)]
    got = run(layers, 5)
    assert got[0].tolist() == [True] * 4
    assert got[1].tolist() == [True, False, False, False]


def test_cut_is_closest_to_k_and_smaller_on_a_draw() -> None:
    # groups of size 4: cuts at 0, 4, 8; k=6 is a draw between 4 and 8 -> 4
    layers = [GroupScores(torch.tensor([1.0, 2.0]), 4)]
    assert run(layers, 6)[0].tolist() == [True, False]
    assert run(layers, 7)[0].tolist() == [True, True]
    assert run(layers, 1)[0].tolist() == [False, False]
    assert run(layers, 2)[0].tolist() == [False, False]
    assert run(layers, 3)[0].tolist() == [True, False]


def test_k_out_of_range() -> None:
    layers = [GroupScores(torch.tensor([3.0, -INF, 1.0]), 1)]
    assert run(layers, 0)[0].tolist() == [False] * 3
    assert run(layers, -5)[0].tolist() == [False] * 3
    assert run(layers, 10)[0].tolist() == [True] * 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_positive_inf_scores_are_a_model_error(bad: float) -> None:
    layers = [GroupScores(torch.tensor([1.0, bad, 0.0]), 1)]
    with pytest.raises(sc.ModelError, match="NaN"):
        run(layers, 1)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=False).map(lambda x: x + 0.0), min_size=2, max_size=30)
)
def test_ordered_keys_preserve_float_order(values: list[float]) -> None:
    scores = torch.tensor(values, dtype=torch.float32)
    keys = ordered_keys(scores)
    assert keys.dtype == torch.int32
    s = scores.tolist()
    kk = keys.tolist()
    for i in range(len(s) - 1):
        a, b = s[i], s[i + 1]
        assert (a < b) == (kk[i] < kk[i + 1]) and (a == b) == (kk[i] == kk[i + 1])
