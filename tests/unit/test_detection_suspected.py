"""The detector's verdict travels beside the action: ``suspected`` (flagged) and ``flagged`` (excluded).

``Reputation`` excludes at most ``(n - 1) // 2`` of a cohort (the rule always sees a majority),
so a client its detector flags can still reach the rule when a cohort holds more suspects than
that.  Detection is scored on what the detector concluded (``AggregationResult.suspected``,
``RoundRecord.suspected``), the action on ``flagged``.  These tests pin down what each holds:
the suspects include the flagged-but-admitted ones when the cap binds, the CKKS Gram path
reports the plaintext path's suspects on the same inputs (real TenSEAL), every exclusion is a
suspect, a near-copy or a non-finite row, and a suspect reaches the rule only when the cap binds.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.defenses import (
    BYZANTINE_KEY,
    BucketReputation,
    Mean,
    MultiKrum,
    Reputation,
    cumulative_detection,
    make_defense,
    recommended,
)
from securefml.defenses.reputation import duplicates
from securefml.gram import Gram
from securefml.protocols.base import ClientUpdate
from securefml.protocols.plaintext import Plaintext
from securefml.updates import LayerLayout
from tests.defense_rounds import signflip_round

LAYOUT = LayerLayout([("a.weight", (6, 10)), ("a.bias", (6,))])
D = LAYOUT.numel


def _round(g: torch.Generator, ids, bad, d: int = D, signal: float = 0.6) -> torch.Tensor:
    return signflip_round(g, ids, bad, d, signal)


def _trained(rep: Reputation, seed: int = 0, rounds: int = 60) -> tuple[Reputation, set[int]]:
    """``rep`` after ``rounds`` random cohorts of 8 from 40 clients, clients 0-9 sign flippers."""
    g = torch.Generator().manual_seed(seed)
    bad = set(range(10))
    for _ in range(rounds):
        ids = sorted(torch.randperm(40, generator=g)[:8].tolist())
        rep(_round(g, ids, bad), client_ids=ids)
    return rep, bad


def _crowded_cohort(rep: Reputation, bad: set[int]) -> tuple[int, ...]:
    """Five clients the detector flags and three honest ones it does not: more suspects than the cap (3)."""
    suspects = [c for c in rep.flagged_ids() if c in bad][:5]
    honest = [c for c in range(10, 40) if not rep.is_flagged(c)][:3]
    assert len(suspects) == 5 and len(honest) == 3
    return tuple(sorted(suspects + honest))


def test_suspected_holds_the_flagged_clients_the_cap_lets_through():
    rep, bad = _trained(Reputation())
    ids = _crowded_cohort(rep, bad)
    g = torch.Generator().manual_seed(99)
    res = rep(_round(g, ids, bad), client_ids=ids)
    assert len(res.flagged) == (len(ids) - 1) // 2 == 3  # the majority guarantee binds
    assert set(res.flagged) < set(res.suspected)  # every exclusion is a suspect, and more are suspected
    assert set(res.suspected) == {c for c in ids if rep.is_flagged(c)} == {c for c in ids if c in bad}
    # scored on the exclusions, two attackers of this round count as missed; on the detector's flags none
    on_exclusions = cumulative_detection([(0, ids, res.flagged)], bad)[-1][1]
    on_detector = cumulative_detection([(0, ids, res.suspected)], bad)[-1][1]
    assert (on_exclusions.tp, on_exclusions.fn) == (3, 2)
    assert (on_detector.tp, on_detector.fn, on_detector.fp) == (5, 0, 0)


def test_rules_without_a_detector_suspect_nobody():
    g = torch.Generator().manual_seed(1)
    x = _round(g, range(8), {0, 1})
    for rule in (Mean(), MultiKrum(f=2), make_defense("medclip>>mean")):
        assert rule(x, client_ids=range(8), context={BYZANTINE_KEY: 2}).suspected == ()


def test_compositions_pass_the_inner_detectors_verdict_through():
    """``medclip:history=10>>reputation>>mean`` (the recommended default): the reputation sits inside."""
    rule = recommended("plaintext")
    rep = rule.rule
    assert isinstance(rep, Reputation)
    g = torch.Generator().manual_seed(2)
    seen = False
    for _ in range(40):
        ids = sorted(torch.randperm(40, generator=g)[:8].tolist())
        res = rule(_round(g, ids, set(range(10))), client_ids=ids)
        assert set(res.suspected) == {c for c in ids if rep.is_flagged(c)}
        assert set(res.flagged) <= set(res.suspected)
        seen |= bool(res.suspected)
    assert seen


def test_the_round_output_carries_both_sets():
    """Through a protocol's round (plaintext here, CKKS below): ``RoundOutput.suspected`` beside ``flagged``."""
    rep, bad = _trained(Reputation())
    ids = _crowded_cohort(rep, bad)
    x = _round(torch.Generator().manual_seed(5), ids, bad).to(torch.float32)
    ups = [ClientUpdate(c, x[i], LAYOUT.layer_names, 1.0) for i, c in enumerate(ids)]
    out = Plaintext().run_round(0, ups, LAYOUT, defense=rep)
    assert len(out.flagged) == 3 and set(out.flagged) < set(out.suspected)
    assert set(out.suspected) == {c for c in ids if c in bad}


def test_the_ckks_gram_path_suspects_what_the_plaintext_path_suspects(stats_proto):
    """Real TenSEAL: the key holder decrypts the Gram, the reputation decides on it.  From the same
    evidence (state round trip) and on the same updates: the same suspects and the same capped
    exclusions as plaintext, over random cohorts and in a cohort with five suspects (cap 3)."""
    plain_rule, bad = _trained(Reputation())
    enc_rule = Reputation()
    enc_rule.load_state_dict(plain_rule.state_dict())
    g = torch.Generator().manual_seed(11)
    cohorts = [tuple(sorted(torch.randperm(40, generator=g)[:8].tolist())) for _ in range(3)]
    cohorts.append(_crowded_cohort(plain_rule, bad))
    for rnd, ids in enumerate(cohorts):
        x = _round(g, ids, bad).to(torch.float32)
        ups = [ClientUpdate(c, x[i], LAYOUT.layer_names, 1.0) for i, c in enumerate(ids)]
        enc = stats_proto.run_round(rnd, ups, LAYOUT, defense=enc_rule)
        plain = Plaintext().run_round(rnd, ups, LAYOUT, defense=plain_rule)
        assert enc.suspected == plain.suspected
        assert enc.flagged == plain.flagged
    assert len(enc.suspected) == 5 and len(enc.flagged) == 3  # the crowded cohort: the cap binds on both
    assert enc_rule.flagged_ids() == plain_rule.flagged_ids()


def test_bucket_reputation_names_its_suspects_by_client():
    """Under bucketed SecAgg the exclusion is of buckets; the detector's verdict names clients."""
    rep = BucketReputation()
    g = torch.Generator().manual_seed(3)
    seen = False
    for _ in range(40):
        ids = sorted(torch.randperm(40, generator=g)[:8].tolist())
        res = rep(_round(g, ids, set(range(10))), client_ids=ids)
        assert res.suspected == tuple(c for c in ids if rep.is_flagged(c)) == res.flagged
        seen |= bool(res.suspected)
    assert seen


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 10), n_bad=st.integers(0, 6), n_copies=st.integers(0, 3),
       nonfinite=st.booleans(), rescore=st.sampled_from([0, 2, 6]), min_rounds=st.integers(1, 3),
       rounds=st.integers(1, 8))
def test_every_exclusion_is_a_suspect_a_near_copy_or_non_finite(seed, n, n_bad, n_copies, nonfinite, rescore,
                                                                 min_rounds, rounds):
    """What is true in the code: ``flagged`` (excluded) is a subset of ``suspected`` plus the round's
    near-copies plus its non-finite rows; suspects that were not excluded exist only when the cap binds
    (exactly ``(m - 1) // 2`` of the ``m`` finite rows excluded); suspects are cohort members."""
    g = torch.Generator().manual_seed(seed)
    rep = Reputation(min_rounds=min_rounds, rescore=rescore)
    pool = 2 * n
    bad = set(range(min(n_bad, pool)))
    for _ in range(rounds):
        ids = sorted(torch.randperm(pool, generator=g)[:n].tolist())
        x = _round(g, ids, bad, d=24)
        for k in range(1, min(n_copies, n - 1) + 1):
            x[k] = x[0] * (1 + 1e-4 * k)  # near-copies of row 0
        bad_rows: set[int] = set()
        if nonfinite and n >= 4:
            x[n - 1, 3] = math.nan
            bad_rows = {ids[n - 1]}
        res = rep(x, client_ids=ids)
        finite = [i for i, c in enumerate(ids) if c not in bad_rows]
        inner = Gram.from_updates(x[finite], tuple(ids[i] for i in finite)).inner
        dup = {ids[finite[i]] for i in duplicates(inner, 0.99).nonzero().flatten().tolist()}
        assert set(res.suspected) <= set(ids)
        assert set(res.suspected) == {c for c in ids if c not in bad_rows and rep.is_flagged(c)}
        assert set(res.flagged) <= set(res.suspected) | dup | bad_rows
        excluded_finite = set(res.flagged) - bad_rows
        assert len(excluded_finite) <= (len(finite) - 1) // 2
        if set(res.suspected) - set(res.flagged):
            assert len(excluded_finite) == (len(finite) - 1) // 2


def test_a_run_scores_detection_both_ways():
    """``metrics.detection``: the exclusions (as before) and ``detector``, the same counts on the suspects."""
    from securefml.experiment import RunConfig, run_experiment

    torch.set_num_threads(1)
    res = run_experiment(RunConfig(dataset="digits-fewshot", algorithm="fomaml", rounds=8, clients_per_round=8, seed=0,
                                   protocol="plaintext", defense="recommended", attack="signflip:scale=1",
                                   malicious=0.25, last_k=1))
    det = res.metrics["detection"]
    by_detector = det["detector"]
    assert len(by_detector["per_round"]) == len(det["per_round"]) == len(by_detector["cumulative"]) == 8
    for h in res.history:
        assert set(h["flagged"]) <= set(h["suspected"]) <= set(h["accepted"])
    want = cumulative_detection(((h["round"], h["accepted"], h["suspected"]) for h in res.history),
                                det["malicious_ids"])
    assert [c["tp"] for c in by_detector["cumulative"]] == [c.tp for _, c in want]
    assert [c["fp"] for c in by_detector["cumulative"]] == [c.fp for _, c in want]
    assert by_detector["suspected_total"] == sum(len(h["suspected"]) for h in res.history)
