"""``MedianClipping(history=W, start="min")``: the first round, which has no history to cap its
bound, clips to the smallest norm, so a first cohort with a Byzantine majority (hypothesis chooses
how many, their directions and scales) cannot set the bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.defenses import Mean, MedianClipping, Reputation, make_defense
from securefml.errors import ConfigError
from securefml.gram import Gram


def _honest(seed: int, n: int, d: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * (0.5 + torch.rand(n, 1, generator=g,
                                                                                   dtype=torch.float64))


def test_start_is_typed_and_the_default_unchanged():
    assert MedianClipping(history=10).start == "median"
    assert "start" not in repr(MedianClipping(history=10))
    assert make_defense("medclip:history=10,start=min>>reputation>>mean").pre.start == "min"
    with pytest.raises(ConfigError, match="start"):
        MedianClipping(history=10, start="max")
    with pytest.raises(ConfigError, match="history"):
        MedianClipping(start="min")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_honest=st.integers(1, 5), n_bad=st.integers(0, 9),
       scales=st.lists(st.floats(1e-3, 1e8), min_size=9, max_size=9), gram=st.booleans())
def test_a_first_round_byzantine_majority_cannot_raise_the_bound(seed, n_honest, n_bad, scales, gram):
    h = _honest(seed, n_honest)
    bad = _honest(seed + 1, n_bad) * torch.tensor(scales[:n_bad], dtype=torch.float64)[:, None] if n_bad else h[:0]
    x = torch.cat([bad, h])
    ids = tuple(range(x.shape[0]))
    rule = MedianClipping(history=10, start="min")
    smallest_honest = float(h.norm(dim=1).min())
    w = torch.ones(x.shape[0], dtype=torch.float64)
    if gram:
        _, mixed, _ = rule.transform_gram(Gram.from_updates(x, ids), w, context={})
        out_norms = mixed.norms
    else:
        out, _, _ = rule.transform(x, w, ids, context={})
        out_norms = out.to(torch.float64).norm(dim=1)
    assert float(out_norms.max()) <= smallest_honest * (1 + 1e-6)


def test_only_the_first_round_differs_from_the_median_rule():
    """After round 0 the bound is the median capped by the history, as with ``start="median"``."""
    a, b = MedianClipping(history=10), MedianClipping(history=10, start="min")
    for r in range(5):
        norms = _honest(r, 10).norm(dim=1)
        ba, bb = a.bound(norms), b.bound(norms)
        if r == 0:
            assert bb == float(norms.min()) and ba == float(norms.sort().values[4])
        else:
            assert bb <= ba


def test_recommended_with_start_min_survives_a_majority_first_round():
    """A first cohort of 6 crafted 1e4-scale rows and 4 honest ones: the aggregate stays at an
    honest norm with ``start="min"``; the median rule lets the crafted norm through."""
    h = _honest(3, 4)
    bad = torch.full((6, 20), 1e4, dtype=torch.float64)
    x = torch.cat([bad, h])
    ids = tuple(range(10))
    safe = (MedianClipping(history=10, start="min") >> Reputation(Mean()))(x, client_ids=ids)
    plain = (MedianClipping(history=10) >> Reputation(Mean()))(x, client_ids=ids)
    assert float(safe.aggregate.norm()) <= float(h.norm(dim=1).min()) * (1 + 1e-6)
    assert float(plain.aggregate.norm()) > 100 * float(h.norm(dim=1).max())
