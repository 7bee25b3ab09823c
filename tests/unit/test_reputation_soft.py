"""``Reputation(soft=True)``: down-weighting before ``min_rounds``, against an adversary that
picks its scale and its direction (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.defenses import Mean, MedianClipping, Reputation, make_defense
from securefml.errors import ConfigError


def _round(seed: int, n_bad: int, scale: float, direction: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    common = torch.zeros(30, dtype=torch.float64)
    common[0] = 1.0
    x = 0.6 * common + torch.randn(10, 30, generator=g, dtype=torch.float64) / 30**0.5
    honest = x[n_bad:].mean(0)
    x[:n_bad] = direction * scale * x[:n_bad]
    return x, honest


def test_soft_is_off_by_default_and_typed():
    assert Reputation().soft is False
    assert "soft" not in repr(Reputation())
    assert make_defense("reputation:soft=true>>mean").soft is True
    with pytest.raises(ConfigError, match="soft"):
        Reputation(soft="yes")  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_bad=st.integers(1, 4), scale=st.floats(1.0, 1e6))
def test_new_sign_flippers_weigh_less_and_the_aggregate_is_closer_to_the_honest_mean(seed, n_bad, scale):
    """In the flippers' first participation (nobody can be flagged yet), soft weighting never
    gives a flipper more weight than the honest members get on average, and never moves the
    aggregate further from the honest mean than full weights do."""
    x, honest = _round(seed, n_bad, scale, -1.0)
    ids = tuple(range(10))
    hard = (MedianClipping() >> Reputation(Mean()))(x, client_ids=ids)
    soft_rule = MedianClipping() >> Reputation(Mean(), soft=True)
    soft = soft_rule(x, client_ids=ids)
    assert hard.flagged == soft.flagged == ()
    assert soft.weights is not None
    assert float(soft.weights[:n_bad].mean()) <= float(soft.weights[n_bad:].mean()) + 1e-12
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(soft.aggregate, honest, dim=0)) >= float(cos(hard.aggregate, honest, dim=0)) - 1e-9


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scales=st.lists(st.floats(3.0, 1e6), min_size=2, max_size=2))
def test_soft_weights_are_blind_to_the_attackers_scale(seed, scales):
    """Once a flipper is clipped, more scale changes no weight, flag or aggregate (soft included)."""
    outs = []
    for scale in scales:
        rule = MedianClipping(history=10) >> Reputation(Mean(), soft=True)
        run = []
        for r in range(6):
            x, _ = _round(seed + r, 3, scale, -1.0)
            ids = tuple(range(3 * r, 3 * r + 10))
            res = rule(x, client_ids=ids)
            run.append((res.aggregate, res.flagged))
        outs.append(run)
    for (a, fa), (b, fb) in zip(*outs):
        assert fa == fb
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_soft_leaves_established_members_at_full_weight():
    """Members seen ``min_rounds`` times are judged by their evidence, not by one round's score."""
    rule = Reputation(Mean(), soft=True, min_rounds=2)
    ids = tuple(range(8))
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        rule(torch.randn(8, 12, generator=g, dtype=torch.float64), client_ids=ids)
    x = torch.randn(8, 12, generator=g, dtype=torch.float64)
    res = rule(x, client_ids=ids)
    kept = [i for i, c in enumerate(ids) if c not in res.flagged]
    assert res.weights is not None
    assert torch.allclose(res.weights[kept], torch.full((len(kept),), 1.0 / len(kept), dtype=torch.float64))
