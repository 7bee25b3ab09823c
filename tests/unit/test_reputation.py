"""Reputation: evidence across rounds, the same flags from a Gram as from updates, bounded harm."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.defenses import CoordinateMedian, Krum, Mean, Reputation, cumulative_detection, make_defense
from securefml.defenses.reputation import consensus_cosine
from securefml.errors import ConfigError
from securefml.gram import Gram
from tests.defense_rounds import signflip_round

_round = signflip_round  # the round this module's tests build


def test_consensus_cosine_matches_a_direct_computation():
    x = torch.randn(6, 9, dtype=torch.float64)
    inc = torch.tensor([True, True, False, True, True, True])
    got = consensus_cosine(x @ x.T, inc)
    raw = consensus_cosine(x @ x.T, inc, normalize=False)
    for i in range(6):
        rest = sum(x[j] / x[j].norm() for j in range(6) if inc[j] and j != i)
        want = float(x[i] @ rest / (x[i].norm() * rest.norm()))
        assert abs(float(got[i]) - want) < 1e-10
        rest = sum(x[j] for j in range(6) if inc[j] and j != i)
        assert abs(float(raw[i]) - float(x[i] @ rest / (x[i].norm() * rest.norm()))) < 1e-10


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_bad=st.integers(1, 3),
       scales=st.lists(st.floats(1e-6, 1e8), min_size=3, max_size=3))
def test_no_attacker_scale_changes_an_honest_score(seed, n_bad, scales):
    """The consensus weighs every member's direction equally: scaling Byzantine rows moves nobody's score."""
    g = torch.Generator().manual_seed(seed)
    x = _round(g, tuple(range(8)), set(range(n_bad)))
    scaled = x.clone()
    for i in range(n_bad):
        scaled[i] *= scales[i]
    inc = torch.ones(8, dtype=torch.bool)
    a, b = consensus_cosine(x @ x.T, inc), consensus_cosine(scaled @ scaled.T, inc)
    assert torch.allclose(a, b, atol=1e-9)


def test_scaled_sign_flippers_are_the_ones_flagged():
    """Regression: with a raw sum, 10x flippers dominated the consensus and honest clients were flagged."""
    g = torch.Generator().manual_seed(1)
    bad = set(range(10))
    rep = Reputation()
    history = []
    for rnd in range(60):
        ids = sorted(torch.randperm(40, generator=g)[:8].tolist())
        x = _round(g, ids, bad)
        for i, c in enumerate(ids):
            if c in bad:
                x[i] *= 10
        history.append((rnd, ids, rep(x, client_ids=ids).flagged))
    final = cumulative_detection(history, bad)[-1][1]
    assert final.tpr >= 0.8 and final.fpr <= 0.1


def test_evidence_accumulates_and_flags_sign_flippers_over_rounds():
    g = torch.Generator().manual_seed(0)
    population, bad = list(range(40)), set(range(10))
    rep = Reputation()
    history = []
    for rnd in range(60):
        ids = sorted(torch.randperm(40, generator=g)[:8].tolist())
        res = rep(_round(g, ids, bad), client_ids=ids)
        history.append((rnd, ids, res.flagged))
    final = cumulative_detection(history, bad)[-1][1]
    assert final.tpr >= 0.8 and final.fpr <= 0.1
    assert set(rep.flagged_ids()) <= set(population)
    first = cumulative_detection(history, bad)[0][1]
    assert first.tp == 0  # one round is never enough evidence (min_rounds=2)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_bad=st.integers(0, 3), rounds=st.integers(1, 6), scale=st.floats(0.1, 1e4))
def test_the_gram_path_flags_exactly_what_the_plaintext_path_flags(seed, n_bad, rounds, scale):
    g = torch.Generator().manual_seed(seed)
    plain, gram = Reputation(Krum(f=1)), Reputation(Krum(f=1))
    for _ in range(rounds):
        ids = sorted(torch.randperm(12, generator=g)[:8].tolist())
        x = _round(g, ids, set(range(n_bad)))
        x[:n_bad] *= scale  # the adversary picks any scale for its rows
        a = plain(x, client_ids=ids)
        b = gram.aggregate_gram(Gram.from_updates(x, ids))
        assert a.flagged == b.flagged
        assert torch.allclose(a.weights, b.weights)
    assert plain.state_dict()["count"] == gram.state_dict()["count"]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), byz=st.floats(-1e6, 1e6, allow_nan=False), n_bad=st.integers(1, 2))
def test_output_is_the_wrapped_rule_on_the_clients_it_keeps(seed, byz, n_bad):
    # exclusion never weakens the rule: whatever the Byzantine rows, the result is rule(kept rows)
    g = torch.Generator().manual_seed(seed)
    rep = Reputation(CoordinateMedian())
    for _ in range(4):
        ids = list(range(7))
        x = _round(g, ids, set())
        x[:n_bad] = byz
        res = rep(x, client_ids=ids)
        kept = [i for i in ids if i not in res.flagged]
        assert len(kept) >= 2
        assert torch.equal(res.aggregate, CoordinateMedian()(x[kept]).aggregate)


def test_spec_state_round_trip_and_no_mean_warning():
    rule = make_defense("reputation:threshold=1.5>>nnm:f=1>>krum:f=1")
    assert isinstance(rule, Reputation) and rule.threshold == 1.5
    rep = Reputation(Mean())
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        rep(_round(g, list(range(6)), {0}), client_ids=range(6))
    copy = Reputation(Mean())
    copy.load_state_dict(rep.state_dict())
    assert copy.flagged_ids() == rep.flagged_ids()


def test_trusted_consensus_leaves_suspects_out_of_the_consensus():
    """With ``consensus="trusted"`` a member with evidence against it no longer shapes anyone's score."""
    g = torch.Generator().manual_seed(3)
    ids = tuple(range(8))
    x = _round(g, ids, {0, 1})
    rep = Reputation(consensus="trusted", min_rounds=50, rescore=0)  # never flags: only the consensus differs
    rep._count.update({0: 3, 1: 3})
    rep._sum.update({0: -0.9, 1: -0.9})  # evidence against clients 0 and 1, not yet a flag
    res = rep(x, client_ids=ids)
    trusted = torch.tensor([i not in (0, 1) for i in ids])
    assert torch.allclose(res.info["scores"], consensus_cosine(x @ x.T, trusted))
    old = Reputation(min_rounds=50, rescore=0)
    old._count.update({0: 3, 1: 3})
    old._sum.update({0: -0.9, 1: -0.9})
    everyone = old(x, client_ids=ids).info["scores"]
    assert torch.allclose(everyone, consensus_cosine(x @ x.T, torch.ones(8, dtype=torch.bool)))
    assert float(res.info["scores"][2:].mean()) > float(everyone[2:].mean())  # honest agree more with a clean consensus
    with pytest.raises(ConfigError, match="consensus"):
        Reputation(consensus="median")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_bad=st.integers(2, 3), scale=st.floats(1e-6, 1e8),
       direction=st.lists(st.floats(-1, 1), min_size=60, max_size=60).filter(lambda v: any(abs(x) > 1e-3 for x in v)))
def test_colluders_sending_one_vector_are_excluded_whatever_the_vector(seed, n_bad, scale, direction):
    """ALIE/IPM-style collusion (every attacker uploads the same crafted row) is excluded in the round it happens."""
    from securefml.defenses.reputation import duplicates

    g = torch.Generator().manual_seed(seed)
    ids = tuple(range(8))
    x = _round(g, ids, set())
    crafted = torch.tensor(direction, dtype=torch.float64) * scale
    x[:n_bad] = crafted
    assert duplicates(x @ x.T, 0.99).tolist() == [i < n_bad for i in ids]
    rep = Reputation()
    res = rep(x, client_ids=ids)
    assert set(res.flagged) == set(range(n_bad))
    honest_mean = x[n_bad:].mean(0)
    assert torch.allclose(res.aggregate.to(torch.float64), honest_mean, atol=1e-6 * float(honest_mean.norm()) + 1e-9)
    assert all(rep.statistic(c) < 0 for c in range(n_bad))


def test_honest_heterogeneous_rows_are_never_near_copies():
    from securefml.defenses.reputation import duplicates

    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        x = _round(g, tuple(range(10)), set())
        assert not duplicates(x @ x.T, 0.99).any()
    with pytest.raises(ConfigError, match="duplicate"):
        Reputation(duplicate=1.5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_batched_consensus_matches_the_per_round_formula_with_padding(seed, sizes):
    from securefml.defenses.reputation import batched_consensus_cosine, cosine_matrix

    g = torch.Generator().manual_seed(seed)
    width = max(sizes)
    cos = torch.zeros(len(sizes), width, width, dtype=torch.float64)
    inc = torch.zeros(len(sizes), width, dtype=torch.bool)
    singles = []
    for k, n in enumerate(sizes):
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
        m = torch.rand(n, generator=g) < 0.7
        cos[k, :n, :n] = cosine_matrix(x @ x.T)
        inc[k, :n] = m
        singles.append(consensus_cosine(x @ x.T, m))
    got = batched_consensus_cosine(cos, inc)
    for k, n in enumerate(sizes):
        assert torch.allclose(got[k, :n], singles[k], atol=1e-12)


def _reference_statistics(rounds, passes):
    """The re-scoring rule written out directly: per pass, per stored round, per member."""
    import math

    from securefml.defenses.reputation import robust_scale

    stat: dict[int, float] = {}
    for p in range(passes + 1):
        total: dict[int, float] = {}
        count: dict[int, int] = {}
        scores = []
        for ids, x in rounds:
            members = torch.tensor([p == 0 or stat[c] >= 0 for c in ids])
            if int(members.sum()) < 2:
                members = torch.ones(len(ids), dtype=torch.bool)
            z = consensus_cosine(x @ x.T, members)
            for c, zi in zip(ids, z.tolist()):
                total[c] = total.get(c, 0.0) + zi
                count[c] = count.get(c, 0) + 1
                scores.append(zi)
        sigma = max(robust_scale(torch.tensor(scores, dtype=torch.float64)), 1e-6) if len(scores) >= 8 else 1.0
        stat = {c: total[c] / (sigma * math.sqrt(count[c])) for c in total}
    return stat


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), passes=st.integers(0, 4))
def test_rescored_evidence_is_the_rule_written_out(seed, passes):
    g = torch.Generator().manual_seed(seed)
    rep = Reputation(rescore=passes, duplicate=None) if passes else Reputation(rescore=1, duplicate=None)
    rep.rescore = passes  # 0 passes of re-scoring after pass 0: every round against its own members
    rounds = []
    for _ in range(6):
        ids = tuple(sorted(torch.randperm(12, generator=g)[:6].tolist()))
        x = _round(g, ids, {0, 1, 2})
        rounds.append((ids, x))
        rep._observe_rescored(Gram.from_updates(x, ids))
    want = _reference_statistics(rounds, passes)
    for c, v in want.items():
        assert abs(rep.statistic(c) - v) < 1e-9


def test_state_round_trip_keeps_the_stored_rounds_and_the_decisions():
    g = torch.Generator().manual_seed(5)
    bad = set(range(6))
    a = Reputation()
    data = []
    for _ in range(30):
        ids = sorted(torch.randperm(24, generator=g)[:8].tolist())
        data.append((ids, _round(g, ids, bad)))
    for ids, x in data[:15]:
        a(x, client_ids=ids)
    b = Reputation()
    b.load_state_dict(a.state_dict())
    for ids, x in data[15:]:
        ra, rb = a(x, client_ids=ids), b(x, client_ids=ids)
        assert ra.flagged == rb.flagged and torch.equal(ra.aggregate, rb.aggregate)
    with pytest.raises(ConfigError, match="matrix"):
        bad_round = {"ids": [1, 2], "cos": [[1.0]], "dup": [0, 0]}
        Reputation().load_state_dict({"count": {}, "sum": {}, "rounds": [bad_round]})
