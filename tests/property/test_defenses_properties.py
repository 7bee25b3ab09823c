"""Hypothesis properties of the robust rules: breakdown bounds, invariances, Gram equivalence."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from securefml.defenses import (
    ARC,
    FLAME,
    NNM,
    Bulyan,
    CenteredClipping,
    Clipping,
    CoordinateMedian,
    FLTrust,
    FoolsGold,
    GeometricMedian,
    Krum,
    Meamed,
    Mean,
    MultiKrum,
    NormBound,
    TrimmedMean,
)
from securefml.defenses.distance import krum_scores
from securefml.defenses.linalg import gram_matrix, sq_distances_from_gram
from securefml.gram import Gram
from securefml.testing.defense_checks import (
    assert_gram_matches_plaintext,
    assert_permutation_invariant,
    assert_selects_honest,
    assert_translation_equivariant,
    assert_weighted_mean,
    assert_within_honest_range,
    client_updates,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def minority_batch(draw, *, kinds=("huge", "nan", "inf", "adversarial", "far", "mimic"), min_n=3, max_n=11):
    """n clients of which f < n/2 are Byzantine (arbitrary kinds), with that f."""
    n = draw(st.integers(min_n, max_n))
    f = draw(st.integers(0, (n - 1) // 2))
    batch = draw(client_updates(n, st.integers(1, 6), byzantine=f, kinds=kinds))
    return batch, f


@FAST
@given(minority_batch())
def test_median_stays_inside_honest_range(data):
    batch, _ = data
    assert_within_honest_range(CoordinateMedian()(batch.updates).aggregate, batch.honest)


@FAST
@given(minority_batch())
def test_trimmed_mean_stays_inside_honest_range(data):
    batch, f = data
    assert_within_honest_range(TrimmedMean(f)(batch.updates).aggregate, batch.honest)


@FAST
@given(minority_batch())
def test_trimmed_mean_inside_honest_range_in_float32(data):
    batch, f = data
    x = batch.updates.to(torch.float32)
    honest = x[list(batch.honest_positions)]
    assert_within_honest_range(TrimmedMean(f)(x).aggregate, honest, atol=1e-6)


@st.composite
def krum_batch(draw):
    f = draw(st.integers(0, 3))
    n = draw(st.integers(2 * f + 3, 2 * f + 7))
    batch = draw(client_updates(n, st.integers(1, 6), byzantine=f, kinds=("huge", "nan", "inf", "far")))
    return batch, f


@FAST
@given(krum_batch())
def test_krum_picks_an_honest_vector(data):
    batch, f = data
    res = Krum(f)(batch.updates)
    assert_selects_honest(res, batch.byzantine)
    assert res.info["selected"][0] in batch.honest_positions
    torch.testing.assert_close(res.aggregate, batch.updates[res.info["selected"][0]])


@FAST
@given(krum_batch())
def test_multikrum_selects_only_honest_vectors(data):
    batch, f = data
    res = MultiKrum(f)(batch.updates)
    assert_selects_honest(res, batch.byzantine)
    assert set(res.flagged) == set(batch.byzantine)


@FAST
@given(client_updates(st.integers(1, 9), st.integers(1, 6)), st.data())
def test_mean_is_the_weighted_mean(batch, data):
    n = batch.updates.shape[0]
    w = torch.tensor(data.draw(st.lists(st.floats(0.01, 100.0), min_size=n, max_size=n)), dtype=torch.float64)
    res = Mean()(batch.updates, w)
    assert_weighted_mean(res, batch.updates, w)
    torch.testing.assert_close(res.weights, w / w.sum())


def _rules(n, f):
    rules = [
        Mean(),
        CoordinateMedian(),
        TrimmedMean(f),
        Meamed(f),
        NormBound(),
        GeometricMedian(),
        NNM(f) >> TrimmedMean(f),
        Clipping(bound=3.0) >> CoordinateMedian(),
        FLAME(noise=0.0),
    ]
    if n > 2 * f + 2:
        rules += [Krum(f), MultiKrum(f), ARC(f) >> MultiKrum(f)]
    if n >= 4 * f + 3:
        rules.append(Bulyan(f))
    return rules


@FAST
@given(minority_batch(kinds=("far", "adversarial", "huge"), min_n=4), st.data())
def test_rules_are_permutation_invariant(data, draw):
    batch, f = data
    x = batch.updates
    # generic position: Krum scores (hence selections) have no ties between distinct rows
    scores = krum_scores(sq_distances_from_gram(gram_matrix(x, center=True)), f)
    assume(torch.unique(scores).numel() == scores.numel())
    # ... and no near-ties either: float rounding of a permuted sum may swap two scores closer
    # than this, which changes the selection of Krum-based rules (Bulyan iterates it)
    gaps = torch.sort(scores).values.diff()
    assume(bool((gaps > 1e-6 * scores.abs().max().clamp_min(1.0)).all()))
    perm = draw.draw(st.permutations(range(x.shape[0])))
    for rule in _rules(x.shape[0], f):
        assert_permutation_invariant(rule, x, perm, atol=1e-6, rtol=1e-6)
    assert_permutation_invariant(lambda: CenteredClipping(tau=1.0, iterations=3), x, perm, atol=1e-6, rtol=1e-6)
    assert_permutation_invariant(FoolsGold, x, perm, atol=1e-6, rtol=1e-6)
    ref = x.mean(dim=0) + 1.0
    assert_permutation_invariant(FLTrust(), x, perm, context={"reference": ref})


@FAST
@given(minority_batch(kinds=("far", "mimic"), min_n=4), st.lists(st.floats(-1e3, 1e3), min_size=6, max_size=6))
def test_translation_equivariance(data, shift_vals):
    batch, f = data
    x = batch.updates
    shift = torch.tensor(shift_vals[: x.shape[1]], dtype=torch.float64)
    scores = krum_scores(sq_distances_from_gram(gram_matrix(x, center=True)), f)
    assume(torch.unique(scores).numel() == scores.numel())
    rules = [Mean(), CoordinateMedian(), TrimmedMean(f), Meamed(f), NNM(f) >> CoordinateMedian()]
    if x.shape[0] > 2 * f + 2:
        rules += [Krum(f), MultiKrum(f)]
    if x.shape[0] >= 4 * f + 3:
        rules.append(Bulyan(f))
    for rule in rules:
        assert_translation_equivariant(rule, x, shift)
    # the geometric median is equivariant up to its stopping tolerance
    assert_translation_equivariant(GeometricMedian(tol=1e-12), x, shift, atol=1e-5)


def _separated(values: torch.Tensor) -> bool:
    ordered = torch.sort(values).values
    return bool((ordered[1:] - ordered[:-1] > 1e-6 * (1 + ordered[1:].abs())).all())


def _clear_nnm_margins(x: torch.Tensor, f: int) -> bool:
    """No near-tie in NNM's nearest-neighbour sets nor in Krum scores of the NNM-mixed rows.

    The plaintext path and the Gram path round differently; only at a near-tie can they pick
    different neighbours or a different Multi-Krum selection, and then both answers are right.
    """
    d = torch.cdist(x, x) ** 2
    if not all(_separated(row) for row in d):
        return False
    keep = x.shape[0] - f
    mixed = x[d.argsort(dim=1)[:, :keep]].mean(dim=1)
    return _separated(krum_scores(sq_distances_from_gram(gram_matrix(mixed, center=True)), f))


@FAST
@given(minority_batch(kinds=("far", "adversarial", "mimic"), min_n=4))
def test_gram_rules_decide_the_same_on_the_gram(data):
    batch, f = data
    x = batch.updates
    ids = list(range(7, 7 + x.shape[0]))
    ref = x.mean(dim=0) + 0.5
    scores = krum_scores(sq_distances_from_gram(gram_matrix(x, center=True)), f)
    d_scores = torch.sort(scores).values
    # away from ties (the uncentred Gram has more rounding than the centred one)
    assume(bool((d_scores[1:] - d_scores[:-1] > 1e-6 * (1 + d_scores[1:].abs())).all()))
    gram = Gram.from_updates(x, ids, reference=ref)
    ctx = {"reference": ref}
    rules = [NormBound(), FLTrust()]
    if x.shape[0] > 2 * f + 2:
        rules += [Krum(f), MultiKrum(f)]
        if _clear_nnm_margins(x, f):  # NNM's neighbour sets and MultiKrum's order on the mixed rows
            rules.append(NNM(f) >> MultiKrum(f))
    for rule in rules:
        assert_gram_matches_plaintext(rule, x, gram, context=ctx, atol=1e-6)
    # an iterative solver: equal up to its tolerance (the plaintext path uses a centred Gram, and
    # with a far outlier the two Weiszfeld trajectories stop a few 1e-4 apart in the weights)
    assert_gram_matches_plaintext(GeometricMedian(tol=1e-12), x, gram, atol=1e-3)


@FAST
@given(minority_batch(kinds=("nan", "inf"), min_n=3))
def test_nonfinite_rows_are_flagged_and_excluded(data):
    batch, f = data
    ids = list(range(50, 50 + batch.updates.shape[0]))
    bad_ids = {ids[i] for i in batch.byzantine}
    for rule in (Mean(), CoordinateMedian(), TrimmedMean(f), MultiKrum(0) if len(ids) - f > 2 else Mean()):
        res = rule(batch.updates, client_ids=ids)
        assert bad_ids <= set(res.flagged)
        assert torch.isfinite(res.aggregate).all()
        if res.weights is not None:
            assert all(float(res.weights[ids.index(b)]) == 0 for b in bad_ids)
    honest = batch.honest
    torch.testing.assert_close(Mean()(batch.updates, client_ids=ids).aggregate, honest.mean(0))
