"""MDA, SMEA and CAF: honest subset found against arbitrary far outliers, Gram = plaintext."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.defenses import CAF, MDA, SMEA
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.testing import assert_permutation_invariant, assert_within_honest_range

RULES = [MDA, SMEA, CAF]


def _batch(seed: int, n_honest: int, n_bad: int, far: float, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    honest = torch.randn(n_honest, d, generator=g, dtype=torch.float64)
    direction = torch.randn(n_bad, d, generator=g, dtype=torch.float64)
    bad = far * direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return torch.cat([honest, bad]), honest


@pytest.mark.parametrize("cls", RULES, ids=lambda c: c.__name__)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_honest=st.integers(5, 8), n_bad=st.integers(1, 2),
       far=st.floats(1e3, 1e8))
def test_far_byzantine_rows_are_excluded(cls, seed, n_honest, n_bad, far):
    x, honest = _batch(seed, n_honest, n_bad, far)
    res = cls(f=n_bad)(x)
    assert_within_honest_range(res.aggregate, honest, atol=1e-6)
    assert float(res.weights[n_honest:].abs().sum()) < 1e-6  # every Byzantine row has weight 0


@pytest.mark.parametrize("cls", RULES, ids=lambda c: c.__name__)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(5, 8), data=st.data())
def test_gram_path_matches_plaintext_and_is_permutation_invariant(cls, seed, n, data):
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    plain = cls(f=2)(x)
    enc = cls(f=2).aggregate_gram(Gram.from_updates(x))
    assert torch.allclose(plain.weights, enc.weights, atol=1e-9)
    assert torch.allclose(plain.aggregate, enc.weights @ x, atol=1e-9)
    perm = data.draw(st.permutations(list(range(n))))
    assert_permutation_invariant(lambda: cls(f=2), x, perm)


def test_mda_picks_the_smallest_diameter_and_smea_the_smallest_eigenvalue():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]], dtype=torch.float64)
    assert torch.equal(MDA(f=1)(x).weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64))
    assert torch.equal(SMEA(f=1)(x).weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="subsets"):
        MDA(f=20)(torch.randn(50, 2))
