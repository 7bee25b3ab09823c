"""Bucket-level reputation: evidence from bucket sums and public membership across rounds.

The adversary (hypothesis) chooses the attackers' directions and scales; the guarantees tested:
a majority of the buckets always reaches the wrapped rule; no attacker scale beyond the norm
gate changes any decision (aggregate, flags, evidence); the rule receives the bucket means of
real SecAgg+ bucket sums with their membership and decides as on the plaintext bucket means;
the state round trip keeps the decisions; bad input is refused with a typed error.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefml.defenses import (
    BucketMembership,
    BucketReputation,
    CenteredClipping,
    Krum,
    Mean,
    MedianClipping,
    make_defense,
    recommended,
)
from securefml.defenses.buckets import aggregate_buckets
from securefml.errors import ConfigError
from securefml.protocols.base import ClientUpdate
from securefml.protocols.secagg import SecAggPlus
from securefml.updates import LayerLayout

D = 24


def _partition(ids: list[int], size: int, gen: torch.Generator) -> list[list[int]]:
    perm = torch.randperm(len(ids), generator=gen).tolist()
    k = len(ids) // size
    return [[ids[perm[j]] for j in range(b, len(ids), k)] for b in range(k)]


def _federation(rounds: int, *, scale: float, direction: torch.Tensor | None = None, seed: int = 0):
    """Yield (bucket means, totals, membership) of rounds of 10 of 40 clients in buckets of 2.

    Clients 0-7 are attackers, two of them in every cohort (the other 8 drawn from clients 8-39):
    each sends ``-scale`` times its honest update (or ``scale`` times ``direction`` when given).
    Honest updates share a common component (cosine about 0.2).
    """
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(D, generator=g)
    for _ in range(rounds):
        attackers = torch.randperm(8, generator=g)[:2].tolist()
        cohort = sorted(attackers + (8 + torch.randperm(32, generator=g)[:8]).tolist())
        x = {c: 0.5 * common + torch.randn(D, generator=g) for c in cohort}
        for c in cohort:
            if c < 8:
                x[c] = scale * (direction if direction is not None else -x[c])
        members = _partition(cohort, 2, g)
        means = torch.stack([torch.stack([x[c] for c in m]).mean(0) for m in members]).to(torch.float64)
        yield means, torch.full((len(members),), 2.0, dtype=torch.float64), BucketMembership.of(members)


def test_consistent_flippers_are_flagged_from_buckets_alone():
    rule = BucketReputation(gate=None)
    for means, totals, mem in _federation(60, scale=1.0):
        out = rule.decide_buckets(means, totals, mem, context={})
        assert len(out.flagged_buckets) <= (mem.k - 1) // 2
    flagged = set(rule.flagged_ids())
    attackers = set(range(8))
    assert len(flagged & attackers) >= 6  # 6 of 8 unit-scale flippers from pairs' sums only
    assert len(flagged - attackers) <= 3  # of 32 honest clients


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=D, max_size=D), st.floats(10.0, 1e8),
       st.floats(1.0, 1e4), st.integers(0, 2**16))
def test_no_attacker_scale_beyond_the_gate_changes_a_decision(direction, scale, more, seed):
    """Attackers all send one direction of the adversary's choice, at any scale above the gate.

    Two attackers in each cohort of 10 (buckets of 2): at most 2 of the 5 buckets, so the gate's
    reference is an honest bucket norm, every attacker bucket is gated (score -1, left out), and
    nothing the rule decides depends on how far beyond the gate the attackers scale.
    """
    d = torch.tensor(direction, dtype=torch.float64)
    if float(d.norm()) < 1e-3:
        d = torch.ones(D, dtype=torch.float64)
    d = d / d.norm() * 30.0  # norm 30 x scale: far above 3 x an honest bucket's (about 4)
    a, b = BucketReputation(), BucketReputation()
    for (m1, t1, mem), (m2, _, _) in zip(_federation(12, scale=scale, direction=d, seed=seed),
                                         _federation(12, scale=scale * more, direction=d, seed=seed)):
        o1 = a.decide_buckets(m1, t1, mem, context={})
        o2 = b.decide_buckets(m2, t1, mem, context={})
        assert o1.flagged == o2.flagged and o1.flagged_buckets == o2.flagged_buckets
        assert torch.equal(o1.aggregate, o2.aggregate)
        attacked = {b for b, m in enumerate(mem.members) if any(c < 8 for c in m)}
        assert attacked <= set(o1.flagged_buckets)  # every attacker bucket gated and left out
        assert len(o1.flagged_buckets) <= (mem.k - 1) // 2  # a majority reaches the rule
    assert a.flagged_ids() == b.flagged_ids()
    assert {c: a.statistic(c) for c in range(40)} == {c: b.statistic(c) for c in range(40)}


@settings(max_examples=20, deadline=None)
@given(st.integers(3, 9), st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=9 * 4, max_size=9 * 4))
def test_a_majority_of_buckets_always_reaches_the_rule(k, values):
    rule = BucketReputation(min_rounds=1)
    means = torch.tensor(values[: k * 4], dtype=torch.float64).reshape(k, 4)
    mem = BucketMembership.of([[b] for b in range(k)])
    for _ in range(4):
        out = rule.decide_buckets(means, torch.ones(k, dtype=torch.float64), mem, context={})
        assert len(out.flagged_buckets) <= (k - 1) // 2


def test_secagg_buckets_give_the_rule_membership_and_it_decides_as_on_plain_bucket_means():
    layout = LayerLayout([("head.weight", (3, 5)), ("head.bias", (3,))])
    g = torch.Generator().manual_seed(3)
    secure, plain = BucketReputation(gate=2.0), BucketReputation(gate=2.0)
    common = torch.randn(layout.numel, generator=g)
    for rnd in range(4):
        x = (0.3 * common + 0.3 * torch.randn(10, layout.numel, generator=g)).clamp(-4, 4)
        x[:2] = (-3.0 * x[:2]).clamp(-4, 4)  # two scaled sign flippers
        ups = [ClientUpdate(100 + i, x[i], layout.layer_names, 1.0) for i in range(10)]
        proto = SecAggPlus(buckets=2, clip_range=4.0, public_seed=b"pub")
        out = proto.run_round(rnd, ups, layout, defense=secure)
        members = [out.extras["buckets"][i] for i in out.extras["bucket_index"]]
        means = torch.stack([x[[c - 100 for c in m]].to(torch.float64).mean(0) for m in members])
        ref = plain.decide_buckets(means, torch.full((len(members),), 2.0, dtype=torch.float64),
                                   BucketMembership.of(members), context={})
        assert out.flagged == ref.flagged
        assert out.suspected == ref.suspected == ref.flagged  # the detector's verdict, by client, through SecAgg+
        assert list(out.extras["flagged_buckets"]) == list(ref.flagged_buckets)
        agg = layout.gather(out.aggregate, layout.layer_names).to(torch.float64)
        assert float((agg - ref.aggregate.to(torch.float64)).abs().max()) <= 10 * out.extras["error_bound"] + 1e-6


def test_state_round_trip_keeps_the_decisions():
    a = BucketReputation()
    rounds = list(_federation(15, scale=1.0, seed=5))
    for means, totals, mem in rounds[:10]:
        a.decide_buckets(means, totals, mem, context={})
    b = BucketReputation()
    b.load_state_dict(a.state_dict())
    assert b.flagged_ids() == a.flagged_ids()
    for means, totals, mem in rounds[10:]:
        oa, ob = a.decide_buckets(means, totals, mem, context={}), b.decide_buckets(means, totals, mem, context={})
        assert oa.flagged == ob.flagged and torch.equal(oa.aggregate, ob.aggregate)


def test_plaintext_rows_are_buckets_of_one():
    rule = BucketReputation()
    x = torch.randn(6, D, dtype=torch.float64)
    out = rule(x, client_ids=[10, 11, 12, 13, 14, 15])
    assert out.client_ids == (10, 11, 12, 13, 14, 15)
    assert float(out.aggregate.norm()) <= float(x.norm(dim=1).sort().values[2]) * (1 + 1e-12)


def test_bad_input_is_refused_with_typed_errors():
    with pytest.raises(ConfigError, match="two buckets"):
        BucketMembership.of([[1, 2], [2, 3]])
    with pytest.raises(ConfigError, match="non-empty"):
        BucketMembership.of([[1], []])
    with pytest.raises(ConfigError, match="gate"):
        BucketReputation(gate=0.5)
    with pytest.raises(ConfigError, match="bucket sums"):
        BucketReputation(make_defense("reputation>>mean"))
    with pytest.raises(ConfigError, match="per bucket"):
        BucketReputation().decide_buckets(torch.zeros(3, 4), torch.ones(2), BucketMembership.of([[1], [2], [3]]),
                                          context={})


def test_spec_and_aggregate_buckets_path():
    rule = make_defense("bucketrep:gate=2>>medclip>>cclip")
    assert isinstance(rule, BucketReputation) and rule.gate == 2.0
    assert isinstance(rule.rule.pre, MedianClipping) and isinstance(rule.rule.rule, CenteredClipping)
    assert isinstance(make_defense("bucketrep").rule.rule, Mean)
    sums = torch.tensor([[1.0, 0.0], [2.0, 0.2], [1.8, -0.2], [-40.0, 0.0]])
    out = aggregate_buckets(BucketReputation(), sums, [2.0] * 4, [[1, 2], [3, 4], [5, 6], [7, 8]])
    assert out.flagged_buckets == (3,) and out.client_ids == (1, 2, 3, 4, 5, 6, 7, 8)
    # a rule that is not bucket-aware still flags buckets, never clients
    assert aggregate_buckets(Krum(0), sums, [2.0] * 4, [[1, 2], [3, 4], [5, 6], [7, 8]]).flagged == ()


def test_recommended_secagg_default_is_bucket_reputation():
    assert isinstance(recommended("secagg-buckets"), BucketReputation)
