"""Bounded influence: a Byzantine row's scale cannot buy it more than the round's median norm.

The adversary (hypothesis) picks the cohort size, how many rows it controls (up to half), their
directions and their scales, arbitrarily; the honest rows are heterogeneous.  Claims tested:

* ``MedianClipping`` shortens every Byzantine row to at most the ``ceil(n/2)``-th smallest
  *honest* norm, and scaling a Byzantine row further never changes the output;
* the recommended default (``MedianClipping(history=10) >> Reputation(Mean)``) returns bit-for-bit the
  same aggregates and flags over many rounds whether the sign flippers send 1.5x, 10x or
  1e6x their update: a 10x attacker is exactly as strong as any attacker already at the bound;
* the Gram path (what CKKS reveals) computes the same clipping as the plaintext path.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.defenses import Mean, MedianClipping, recommended
from securefml.gram import Gram


@st.composite
def _rounds(draw):
    n = draw(st.integers(3, 12))
    n_byz = draw(st.integers(0, n // 2))
    seed = draw(st.integers(0, 2**31 - 1))
    scales = draw(st.lists(st.floats(1e-3, 1e8), min_size=n_byz, max_size=n_byz))
    return n, n_byz, seed, scales


@settings(max_examples=60, deadline=None)
@given(case=_rounds(), extra=st.floats(1.0, 1e6))
def test_byzantine_rows_are_clipped_to_an_honest_norm_whatever_their_scale(case, extra):
    n, n_byz, seed, scales = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 17, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    for i, s in enumerate(scales):
        x[i] = torch.randn(17, generator=g, dtype=torch.float64) * s  # any direction, any scale
    rule = MedianClipping()
    w = torch.ones(n, dtype=torch.float64)
    out, _, _ = rule.transform(x, w, tuple(range(n)), context={})
    honest = x[n_byz:].norm(dim=1).sort().values
    bound = float(honest[(n + 1) // 2 - 1])  # the ceil(n/2)-th smallest honest norm
    if n_byz:
        assert float(out[:n_byz].norm(dim=1).max()) <= bound * (1 + 1e-12)
    # scaling the rows that are already at or above the bound moves nothing
    big = out.norm(dim=1) < x.norm(dim=1) * (1 - 1e-12)  # rows the clipping shortened
    y = x.clone()
    for i in range(n_byz):
        if big[i]:
            y[i] *= extra
    out2, _, _ = rule.transform(y, w, tuple(range(n)), context={})
    assert torch.allclose(out, out2, rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(case=_rounds())
def test_the_gram_path_clips_exactly_like_the_plaintext_path(case):
    n, n_byz, seed, scales = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 9, generator=g, dtype=torch.float64)
    for i, s in enumerate(scales):
        x[i] *= s
    rule = MedianClipping() >> Mean()
    ids = tuple(range(n))
    w = torch.ones(n, dtype=torch.float64)
    plain = rule.aggregate(x, w, ids, context={})
    gram = rule.decide_gram(Gram.from_updates(x, ids), w, context={})
    assert gram.weights is not None and plain.weights is not None
    assert torch.allclose(gram.weights @ x, plain.aggregate, rtol=1e-9, atol=1e-12)


def _federation(scale: float, seed: int, rounds: int = 25) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    g = torch.Generator().manual_seed(seed)
    rule = recommended("plaintext")
    bad = set(range(6))
    common = torch.zeros(40, dtype=torch.float64)
    common[0] = 1.0
    out = []
    for _ in range(rounds):
        ids = tuple(sorted(torch.randperm(24, generator=g)[:8].tolist()))
        x = 0.5 * common + torch.randn(8, 40, generator=g, dtype=torch.float64) / 40**0.5
        # at most 4 of 8 are Byzantine (the clipping's honest-majority condition)
        n_bad = 0
        for i, c in enumerate(ids):
            if c in bad and n_bad < 4:
                x[i] = -scale * x[i]
                n_bad += 1
        res = rule(x, client_ids=ids)
        out.append((res.aggregate, res.flagged))
    return out


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scales=st.lists(st.floats(3.0, 1e6), min_size=2, max_size=2))
def test_the_recommended_default_is_blind_to_the_attackers_scale(seed, scales):
    """Once a flipper's norm reaches the median, more scale changes no aggregate and no flag."""
    a, b = _federation(scales[0], seed), _federation(scales[1], seed)
    for (agg_a, fl_a), (agg_b, fl_b) in zip(a, b):
        assert fl_a == fl_b
        assert torch.allclose(agg_a, agg_b, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 12), rounds=st.integers(2, 8),
       scale=st.floats(1.0, 1e8), growth=st.floats(1.0, 4.0))
def test_a_byzantine_majority_round_cannot_raise_the_capped_bound_more_than_growth_fold(seed, n, rounds, scale, growth):
    """With ``history``, even a round the attackers own entirely is clipped near past honest bounds."""
    g = torch.Generator().manual_seed(seed)
    rule = MedianClipping(history=5, growth=growth)
    w = torch.ones(n, dtype=torch.float64)
    bounds = []
    for _ in range(rounds):  # honest rounds
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        rule.transform(x, w, tuple(range(n)), context={})
        bounds.append(rule._bounds[-1])
    past = sorted(bounds[-5:])[(len(bounds[-5:]) - 1) // 2]
    evil = torch.randn(n, 6, generator=g, dtype=torch.float64) * scale  # every row Byzantine
    out, _, _ = rule.transform(evil, w, tuple(range(n)), context={})
    assert float(out.norm(dim=1).max()) <= growth * past * (1 + 1e-12)


def test_history_zero_is_the_per_round_median_and_the_spec_clips_before_the_reputation():
    from securefml.defenses import Reputation, make_defense

    x = torch.randn(9, 4, dtype=torch.float64)
    ids = tuple(range(9))
    w = torch.ones(9, dtype=torch.float64)
    a, _, _ = MedianClipping().transform(x, w, ids, context={})
    b, _, _ = MedianClipping(history=0).transform(x, w, ids, context={})
    assert torch.equal(a, b)
    rule = make_defense("medclip:history=10>>reputation>>mean")
    assert isinstance(rule.pre, MedianClipping) and rule.pre.history == 10 and isinstance(rule.rule, Reputation)
    state = rule.state_dict()
    rule(x, client_ids=ids)
    assert rule.state_dict() != state and len(rule.pre.state_dict()["bounds"]) == 1
