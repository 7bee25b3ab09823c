"""Optimal ALIE/IPM: at least as damaging as the fixed-strength attacks, and side-effect free."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.attacks import ALIE, IPM, AttackContext, OptimalALIE, OptimalIPM, defense_deviation, make_attack
from securefml.defenses import BYZANTINE_KEY, CenteredClipping, Reputation, make_defense


def _round(seed: int, h: int = 12, m: int = 4, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.randn(h, d, generator=g, dtype=torch.float64),
            0.5 + torch.randn(m, d, generator=g, dtype=torch.float64))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), spec=st.sampled_from(["nnm>>cclip", "median", "trimmedmean", "geomed"]))
def test_optimal_attacks_do_at_least_the_damage_of_the_fixed_ones(seed, spec):
    honest, own = _round(seed)
    defense = make_defense(spec)
    dctx = {BYZANTINE_KEY: 4}
    for optimal, fixed in ((OptimalALIE(), ALIE()), (OptimalIPM(), IPM(0.1))):
        ctx = AttackContext(round=0, n_clients=16, n_malicious=4, honest_updates=honest, defense=defense,
                            defense_context=dctx)
        rows = optimal.poison_updates(own, ctx)
        base = fixed.poison_updates(own, AttackContext(0, 16, 4, honest_updates=honest))
        assert (defense_deviation(defense, honest, rows, context=dctx)
                >= defense_deviation(defense, honest, base, context=dctx) - 1e-9)


def test_the_search_does_not_touch_a_stateful_defense():
    honest, own = _round(0)
    for defense in (CenteredClipping(), Reputation()):
        defense(torch.cat([honest, own]), client_ids=range(16))
        before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in defense.state_dict().items()}
        ctx = AttackContext(round=1, n_clients=16, n_malicious=4, honest_updates=honest, defense=defense)
        make_attack("optimal-alie").poison_updates(own, ctx)
        after = defense.state_dict()
        for k, v in before.items():
            assert torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]
