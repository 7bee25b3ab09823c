"""Attacks against the library's own robust rules: each attack does what its paper says to the
rule it targets (one round, n = 25 clients, f = 5 malicious, noisy honest updates)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.attacks import ALIE, IPM, Adaptive, AttackContext, FangKrum, FangTrimmedMean, defense_deviation
from securefml.defenses import CoordinateMedian, Krum, Mean, TrimmedMean

N, F, D = 25, 5, 40


def honest_round(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic updates: a common drift under larger per-client noise."""
    g = torch.Generator().manual_seed(seed)
    drift = 0.3 * torch.randn(D, generator=g, dtype=torch.float64)
    honest = drift + torch.randn(N - F, D, generator=g, dtype=torch.float64)
    own = drift + torch.randn(F, D, generator=g, dtype=torch.float64)
    return honest, own


def context(honest: torch.Tensor, defense=None) -> AttackContext:
    return AttackContext(round=0, n_clients=N, n_malicious=F, honest_updates=honest, defense=defense,
                         generator=torch.Generator().manual_seed(0))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000))
def test_fang_krum_makes_krum_output_a_malicious_update(seed: int) -> None:
    honest, own = honest_round(seed)
    rows = FangKrum().poison_updates(own, context(honest))
    result = Krum(F)(torch.cat([rows, honest]), client_ids=list(range(N)))
    assert result.info["selected"][0] < F  # a malicious client (ids 0..F-1) is Krum's output
    assert float(result.aggregate @ honest.mean(0)) < 0  # and it points against the honest direction


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000))
def test_fang_trimmed_mean_drags_every_coordinate_against_the_honest_direction(seed: int) -> None:
    honest, own = honest_round(seed)
    rows = FangTrimmedMean().poison_updates(own, context(honest))
    clean = TrimmedMean(F)(torch.cat([own, honest])).aggregate
    attacked = TrimmedMean(F)(torch.cat([rows, honest])).aggregate
    s = torch.sign(honest.mean(0))
    assert bool(((attacked - clean) * s <= 1e-12).all())
    assert float(((attacked - clean) * s).sum()) < 0


@pytest.mark.parametrize("rule", [CoordinateMedian(), TrimmedMean(F), Krum(F)], ids=["median", "trimmedmean", "krum"])
def test_adaptive_std_direction_is_at_least_as_damaging_as_alie(rule) -> None:
    honest, own = honest_round(7)
    alie_rows = ALIE().poison_updates(own, context(honest))
    alie_damage = defense_deviation(rule, honest, alie_rows)
    ctx = context(honest, rule)
    adaptive_rows = Adaptive("std").poison_updates(own, ctx)
    damage = defense_deviation(rule, honest, adaptive_rows)
    # ALIE is one point (gamma = z) on the adaptive attack's search line.
    assert damage >= 0.95 * alie_damage
    assert damage == pytest.approx(ctx.attack_info["adaptive"]["deviation"])


def test_robust_rules_bound_what_breaks_the_mean() -> None:
    honest, own = honest_round(3)
    rows = IPM(100.0).poison_updates(own, context(honest))
    mean_damage = defense_deviation(Mean(), honest, rows)
    assert mean_damage > 10 * float(honest.mean(0).norm())  # large-epsilon IPM breaks the mean ...
    spread = float((honest - honest.mean(0)).norm(dim=1).max())
    for rule in (CoordinateMedian(), TrimmedMean(F), Krum(F)):
        # ... while a robust rule stays within the honest updates' own spread around their mean.
        assert defense_deviation(rule, honest, rows) <= spread
