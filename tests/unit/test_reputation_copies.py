"""``Reputation(copies="one")``: a group of near-copies weighs as one client, against colluders
that copy an honest update (mimic) or send one crafted vector of any direction and scale (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.defenses import Mean, MedianClipping, Reputation, make_defense
from securefml.defenses.reputation import copy_groups
from securefml.errors import ConfigError
from securefml.gram import Gram


def _honest(seed: int, n: int, d: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    common = torch.zeros(d, dtype=torch.float64)
    common[0] = 1.0
    return 0.6 * common + torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5


def test_copies_is_exclude_by_default_and_typed():
    assert Reputation().copies == "exclude"
    assert "copies" not in repr(Reputation())
    assert make_defense("medclip:history=10>>reputation:copies=one>>mean").rule.copies == "one"
    with pytest.raises(ConfigError, match="copies"):
        Reputation(copies="two")


def test_copy_groups_are_connected_components():
    x = _honest(0, 6)
    x = torch.cat([x, x[1:2], x[4:5], x[1:2]])  # rows 6, 8 copy row 1; row 7 copies row 4
    assert copy_groups(Gram.from_updates(x, tuple(range(9))).inner, 0.99) == [[1, 6, 8], [4, 7]]
    assert copy_groups(Gram.from_updates(_honest(1, 6), tuple(range(6))).inner, 0.99) == []


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_honest=st.integers(4, 9), victim=st.integers(0, 8),
       n_copies=st.integers(1, 4), gram=st.booleans())
def test_mimic_copies_count_once_so_the_aggregate_is_the_honest_mean(seed, n_honest, victim, n_copies, gram):
    """Colluders that copy one honest update (any victim, any number of copies short of half the
    cohort): with ``copies="one"`` the aggregate is the honest mean (the copied update once, at
    its own weight), on updates and on the Gram alike; ``"exclude"`` drops the victim too."""
    victim %= n_honest
    n_copies = min(n_copies, (n_honest + n_copies - 1) // 2)
    h = _honest(seed, n_honest)
    x = torch.cat([h, h[victim:victim + 1].repeat(n_copies, 1)])
    ids = tuple(range(x.shape[0]))
    w = torch.ones(x.shape[0], dtype=torch.float64)
    rule = Reputation(Mean(), copies="one")
    res = rule.decide_gram(Gram.from_updates(x, ids), w, context={}) if gram else rule.aggregate(x, w, ids, context={})
    kept = [i for i in ids if i not in res.flagged]
    assert len(kept) == n_honest and victim in kept
    if gram:
        assert res.weights is not None
        agg = (res.weights.to(x.dtype) @ x) / res.weights.sum()
    else:
        agg = res.aggregate
    torch.testing.assert_close(agg.to(torch.float64), h.mean(0), rtol=1e-6, atol=1e-9)
    drop = Reputation(Mean()).aggregate(x, w, ids, context={})
    assert victim in drop.flagged


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_bad=st.integers(2, 4), scale=st.floats(1e-3, 1e8),
       direction=st.lists(st.floats(-1.0, 1.0), min_size=30, max_size=30))
def test_a_common_crafted_vector_passes_at_most_once_and_clipped(seed, n_bad, scale, direction):
    """Colluders sending one crafted vector (ALIE/IPM style, any direction and scale up to 1e8)
    behind median clipping: at most one of them reaches the mean, so the aggregate is the mean of
    the honest rows and at most one crafted row clipped to the round's median norm."""
    d = torch.tensor(direction, dtype=torch.float64)
    if float(d.norm()) < 1e-6:
        d = torch.ones(30, dtype=torch.float64)
    h = _honest(seed, 10 - n_bad)
    x = torch.cat([h, (scale * d / d.norm()).repeat(n_bad, 1)])
    ids = tuple(range(10))
    res = (MedianClipping() >> Reputation(Mean(), copies="one"))(x, client_ids=ids)
    admitted = [i for i in range(10 - n_bad, 10) if i not in res.flagged]
    assert len(admitted) <= 1
    bound = float(x.norm(dim=1).median())  # the lower median (torch): the n/2-th smallest norm
    hc = h * (bound / h.norm(dim=1)).clamp(max=1.0)[:, None]
    if admitted:
        bad = x[admitted[0]] * min(1.0, bound / float(x[admitted[0]].norm()))
        expect = (hc.sum(0) + bad) / (hc.shape[0] + 1)
    else:
        expect = hc.mean(0)
    torch.testing.assert_close(res.aggregate.to(torch.float64), expect, rtol=1e-5, atol=1e-9)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_without_near_copies_both_settings_decide_the_same(seed):
    """No group of near-copies (independent updates, sign flippers among them): ``copies="one"``
    makes bit-for-bit the decisions of the default over rounds."""
    a, b = Reputation(Mean()), Reputation(Mean(), copies="one")
    for r in range(8):
        x = _honest(seed + r, 10)
        x[:3] = -x[:3]
        ids = tuple((3 * r + i) % 20 for i in range(10))
        ra = a(x, client_ids=ids)
        rb = b(x, client_ids=ids)
        assert ra.flagged == rb.flagged
        assert torch.equal(ra.aggregate, rb.aggregate)


def test_a_group_of_flagged_copies_stays_out():
    """Colluders sending one anti-consensus vector every round are flagged (near-copies score -1);
    once all of a group is flagged none of it is admitted, and the aggregate is the honest mean."""
    rule = Reputation(Mean(), copies="one")
    bad = (7, 8, 9)
    for r in range(6):
        h = _honest(r, 7)
        x = torch.cat([h, (-h.mean(0)).repeat(3, 1)])
        res = rule(x, client_ids=tuple(range(10)))
    assert set(bad) <= set(rule.flagged_ids())
    assert set(res.flagged) == set(bad)
    torch.testing.assert_close(res.aggregate.to(torch.float64), h.mean(0), rtol=1e-6, atol=1e-9)
