"""Weight sharing (k-means, linear init, centroid gradients) and canonical Huffman coding."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.compress import build_code, decode, encode, share_weights
from secateurs.errors import ConfigError, DataError


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 400), bits=st.integers(1, 6), seed=st.integers(0, 1000))
def test_sharing_keeps_zeros_and_uses_at_most_2_to_the_bits_values(
    n: int, bits: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    s = share_weights(t, bits=bits)
    dense = s.to_dense()
    assert bool((dense[t == 0] == 0).all())
    assert torch.unique(dense[t != 0]).numel() <= 2**bits
    assert s.codes.numel() == int((t != 0).sum())
    if s.codes.numel():
        assert int(s.codes.max()) < 2**bits


def test_each_weight_maps_to_its_nearest_centroid_and_error_shrinks_with_bits() -> None:
    torch.manual_seed(0)
    t = torch.randn(2000)
    errors = []
    for bits in (2, 3, 4, 5):
        s = share_weights(t, bits=bits)
        dist = (t[:, None] - s.codebook[None, :]).abs()
        assert torch.equal(dist.argmin(1), s.codes) or bool(
            torch.allclose(dist.gather(1, s.codes[:, None]).squeeze(1), dist.min(1).values)
        )
        errors.append(float((s.to_dense() - t).square().mean()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 20


def test_linear_initialisation_spans_min_to_max() -> None:
    t = torch.tensor([-4.0, -1.0, 0.0, 0.5, 3.0])
    s = share_weights(t, bits=1, iterations=1)
    # kept weights -4, -1, 0.5, 3; centroids start at min and max (-4, 3), the midpoint -0.5
    # splits them {-4, -1} | {0.5, 3}, and one k-means step moves them to the means
    assert s.codebook.tolist() == pytest.approx([-2.5, 1.75])


def test_centroid_gradient_sums_the_gradients_of_its_weights() -> None:
    t = torch.tensor([[1.0, 0.0, 1.1], [-2.0, -2.1, 0.0]])
    s = share_weights(t, bits=1)
    grad = torch.tensor([[0.5, 9.0, 0.25], [1.0, 2.0, 9.0]])
    g = s.centroid_grad(grad)
    assert g.tolist() == pytest.approx([3.0, 0.75])  # pruned positions (9.0) contribute nothing


@pytest.mark.parametrize("bits", [0, 17, True])
def test_sharing_bits_are_checked(bits: object) -> None:
    with pytest.raises(ConfigError, match=r"1\.\.16"):
        share_weights(torch.ones(3), bits=bits)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=300))
def test_huffman_round_trip(values: list[int]) -> None:
    symbols = torch.tensor(values)
    code = build_code(symbols)
    data, n_bits = encode(symbols, code)
    assert len(data) == math.ceil(n_bits / 8)
    assert torch.equal(decode(data, n_bits, len(values), code), symbols)
    # prefix-free: no code is a prefix of another
    codes = code.codes()
    as_text = [format(c, f"0{n}b") for c, n in codes.values()]
    assert not any(a != b and b.startswith(a) for a in as_text for b in as_text)


def test_huffman_beats_fixed_width_on_skewed_data() -> None:
    torch.manual_seed(0)
    symbols = torch.distributions.Geometric(probs=0.5).sample((5000,)).long().clamp(max=31)
    code = build_code(symbols)
    _, n_bits = encode(symbols, code)
    assert n_bits < 0.6 * 5 * symbols.numel()  # versus 5 fixed bits for 32 symbols


def test_huffman_corrupt_stream_is_rejected() -> None:
    symbols = torch.tensor([0, 1, 1, 2, 2, 2, 2])
    code = build_code(symbols)
    data, n_bits = encode(symbols, code)
    with pytest.raises(DataError):
        decode(data, n_bits, len(symbols) + 1, code)
    with pytest.raises(DataError):
        decode(data[:-1], n_bits, len(symbols), code)
