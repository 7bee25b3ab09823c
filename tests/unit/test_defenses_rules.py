"""Unit tests of the defense catalog: known answers, errors, state, composition, registry."""

from __future__ import annotations

import pytest
import torch

from securefml.defenses import (
    ARC,
    DEFENSES,
    FLAME,
    NNM,
    Bucketing,
    Bulyan,
    CedarDetector,
    CenteredClipping,
    Clipping,
    CoordinateMedian,
    DnC,
    FLTrust,
    FoolsGold,
    GeometricMedian,
    Krum,
    Meamed,
    Mean,
    MultiKrum,
    NormBound,
    TrimmedMean,
    make_defense,
)
from securefml.defenses.base import NONFINITE_KEY
from securefml.defenses.buckets import aggregate_buckets
from securefml.defenses.cedar import corr2, two_means_low
from securefml.defenses.coordinate import trimmed_mean
from securefml.defenses.linalg import gram_matrix, stable_gram
from securefml.defenses.metrics import DetectionTracker, detection_rates
from securefml.errors import ConfigError, InvalidUpdateError
from securefml.gram import Gram
from securefml.protocols.base import Reveals
from securefml.protocols.plaintext import Plaintext

ALL_NAMES = [
    "mean", "median", "trimmedmean", "krum", "multikrum", "bulyan", "geomed", "cclip", "normbound", "meamed",
    "nnm", "bucketing", "arc", "clipping", "fltrust", "flame", "foolsgold", "dnc", "cedar",
]


def cluster(n_honest=8, n_bad=2, d=20, *, seed=0, bad_offset=50.0):
    g = torch.Generator().manual_seed(seed)
    honest = 1.0 + 0.1 * torch.randn(n_honest, d, generator=g, dtype=torch.float64)
    bad = bad_offset + torch.randn(n_bad, d, generator=g, dtype=torch.float64)
    return torch.cat([honest, bad]), tuple(range(n_honest, n_honest + n_bad))


def test_registry_has_every_rule_and_builds_compositions():
    assert set(ALL_NAMES) <= set(DEFENSES.names())
    rule = make_defense("nnm:f=1>>trimmedmean:f=1")
    assert rule.name == "nnm>>trimmedmean"
    assert make_defense("krum:2").f == 2
    with pytest.raises(ConfigError, match="choose one of"):
        make_defense("nosuchrule")
    with pytest.raises(ConfigError, match="only a pre-aggregator"):
        make_defense("krum:1>>mean")


@pytest.mark.parametrize("bad", [{"f": -1}, {"f": 1.5}, {"f": True}])
def test_invalid_f_is_a_config_error(bad):
    for cls in (TrimmedMean, Krum, MultiKrum, Bulyan, Meamed, NNM, ARC, DnC):
        with pytest.raises(ConfigError, match="f"):
            cls(**bad)


def test_size_constraints_are_checked_with_the_reason():
    x = torch.randn(6, 3)
    with pytest.raises(ConfigError, match="n > 2f \\+ 2"):
        Krum(2)(x)
    with pytest.raises(ConfigError, match="4f \\+ 3"):
        Bulyan(1)(x)
    with pytest.raises(ConfigError, match="n > 2f"):
        TrimmedMean(3)(x)


def test_known_answers_on_a_small_example():
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [100.0, -100.0]], dtype=torch.float64)
    torch.testing.assert_close(CoordinateMedian()(x).aggregate, torch.tensor([3.0, 20.0], dtype=torch.float64))
    torch.testing.assert_close(TrimmedMean(1)(x).aggregate, torch.tensor([3.0, 20.0], dtype=torch.float64))
    # Meamed(1): per coordinate the 4 values closest to the median
    torch.testing.assert_close(Meamed(1)(x).aggregate, torch.tensor([2.5, 25.0], dtype=torch.float64))
    # even n: the median averages the two middle values
    torch.testing.assert_close(CoordinateMedian()(x[:4]).aggregate, torch.tensor([2.5, 25.0], dtype=torch.float64))


def test_krum_scores_follow_blanchard_n_minus_f_minus_2_neighbours():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [30.0]], dtype=torch.float64)
    res = Krum(1)(x)  # n - f - 2 = 2 nearest neighbours
    expect = torch.tensor([1 + 9, 1 + 4, 4 + 9, 16 + 36, 529 + 729], dtype=torch.float64)
    torch.testing.assert_close(res.scores, expect)
    assert res.info["selected"] == (1,)
    assert res.flagged == (4,)
    torch.testing.assert_close(res.weights, torch.tensor([0, 1.0, 0, 0, 0], dtype=torch.float64))


def test_multikrum_and_bulyan_exclude_the_outliers():
    x, bad = cluster(n_honest=9, n_bad=2)
    mk = MultiKrum(2)(x)
    assert set(mk.flagged) == set(bad)
    torch.testing.assert_close(mk.aggregate, x[:9].mean(0))
    bu = Bulyan(2)(x)
    assert set(bad) <= set(bu.flagged) and len(bu.flagged) == 4
    assert (bu.aggregate - 1.0).abs().max() < 0.5


def test_geometric_median_runs_to_tolerance_and_resists_a_minority():
    x, _ = cluster(n_honest=7, n_bad=3, bad_offset=1e6)
    res = GeometricMedian(tol=1e-10)(x)
    assert res.info["converged"] and res.info["iterations"] > 3
    assert (res.aggregate - 1.0).abs().max() < 0.5
    # the first-order optimality condition: the unit vectors to the points sum to ~0
    z = res.aggregate
    diff = x - z
    unit = diff / diff.norm(dim=1, keepdim=True)
    assert unit.sum(0).norm() < 1e-3


def test_stable_gram_resolves_distances_next_to_huge_rows():
    x = torch.tensor([[1e30, 1e30], [-1e15, 0.0], [1.0, 2.0], [1.5, 2.5], [0.5, 1.0]], dtype=torch.float64)
    sq = torch.diagonal(stable_gram(x))[:, None] + torch.diagonal(stable_gram(x))[None, :] - 2 * stable_gram(x)
    assert abs(float(sq[2, 3]) - 0.5) < 1e-9
    # while a plain mean-centred Gram loses them entirely
    plain = gram_matrix(x, center=True)
    sq_plain = torch.diagonal(plain)[:, None] + torch.diagonal(plain)[None, :] - 2 * plain
    assert abs(float(sq_plain[2, 3]) - 0.5) > 0.1
    assert Krum(1)(x).info["selected"][0] in (2, 3, 4)


def test_centered_clipping_keeps_explicit_state():
    x, _ = cluster(n_honest=8, n_bad=2, bad_offset=100.0)
    rule = CenteredClipping(tau=1.0, iterations=5)
    first = rule(x).aggregate
    state = rule.state_dict()
    torch.testing.assert_close(state["center"], first)
    second = rule(x).aggregate
    fresh = CenteredClipping(tau=1.0, iterations=5)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x).aggregate, second)
    # without state the first call starts from zero again
    torch.testing.assert_close(CenteredClipping(tau=1.0, iterations=5)(x).aggregate, first)
    with pytest.raises(ConfigError, match="center"):
        rule(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ConfigError):
        CenteredClipping(tau=0)


def test_normbound_clipping_and_arc_scale_as_documented():
    x = torch.tensor([[3.0, 4.0], [0.6, 0.8], [30.0, 40.0]], dtype=torch.float64)
    res = NormBound(bound=1.0)(x)
    torch.testing.assert_close(res.aggregate, torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert res.flagged == (0, 2)
    adaptive = NormBound()(x)  # median norm = 5
    assert adaptive.info["bound"] == 5.0
    clipped = Clipping(bound=1.0).transform(x, torch.ones(3, dtype=torch.float64), (0, 1, 2), context={})[0]
    torch.testing.assert_close(clipped.norm(dim=1), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    # ARC with f=1, n=3: floor(2 * 1/3 * 2) = 1 vector clipped, to the second largest norm
    arc = ARC(1).transform(x, torch.ones(3, dtype=torch.float64), (0, 1, 2), context={})[0]
    torch.testing.assert_close(arc.norm(dim=1), torch.tensor([5.0, 1.0, 5.0], dtype=torch.float64))


def test_fltrust_follows_the_reference_direction():
    ref = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-5.0, 0.0]], dtype=torch.float64)
    res = FLTrust()(x, context={"reference": ref})
    ts = torch.tensor([1.0, 2**-0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(res.scores, ts)
    expect = (1.0 * torch.tensor([1.0, 0.0]) + 2**-0.5 * torch.tensor([2**-0.5, 2**-0.5])) / (1 + 2**-0.5)
    torch.testing.assert_close(res.aggregate, expect.to(torch.float64))
    assert res.flagged == (2,)
    with pytest.raises(ConfigError, match="reference"):
        FLTrust()(x)
    with pytest.raises(ConfigError, match="reference inner products"):
        FLTrust().aggregate_gram(Gram.from_updates(x))


def test_flame_filters_the_minority_direction_and_adds_seeded_noise():
    g = torch.Generator().manual_seed(3)
    honest = torch.tensor([1.0, 1.0, 0.0]) + 0.05 * torch.randn(7, 3, generator=g)
    bad = torch.tensor([-1.0, 0.5, 3.0]) + 0.05 * torch.randn(3, 3, generator=g)
    x = torch.cat([honest, bad]).to(torch.float64)
    res = FLAME(noise=0.0)(x)
    # HDBSCAN may also leave an honest border point out; the majority is admitted
    assert {7, 8, 9} <= set(res.flagged) and len(res.flagged) <= 4
    with pytest.raises(ConfigError, match="generator"):
        FLAME()(x)
    a = FLAME(noise=0.01)(x, context={"generator": torch.Generator().manual_seed(1)})
    b = FLAME(noise=0.01)(x, context={"generator": torch.Generator().manual_seed(1)})
    torch.testing.assert_close(a.aggregate, b.aggregate)
    assert not torch.equal(a.aggregate, res.aggregate)
    on_gram = FLAME(noise=0.01).aggregate_gram(Gram.from_updates(x))
    assert on_gram.info["noise_std"] == pytest.approx(0.01 * on_gram.info["clip_bound"])
    torch.testing.assert_close(on_gram.weights, res.weights)


def test_foolsgold_downweights_sybils_over_rounds():
    g = torch.Generator().manual_seed(0)
    rule = FoolsGold()
    sybil_dir = torch.randn(30, generator=g, dtype=torch.float64)
    for _ in range(3):
        honest = torch.randn(6, 30, generator=g, dtype=torch.float64)
        sybils = sybil_dir + 0.01 * torch.randn(3, 30, generator=g, dtype=torch.float64)
        res = rule(torch.cat([honest, sybils]))
    assert res.scores[6:].max() < 0.1 < res.scores[:6].min()
    assert set(res.flagged) >= {6, 7, 8} - {i for i in (6, 7, 8) if res.scores[i] > 0}
    state = rule.state_dict()
    assert set(state["history"]) == set(range(9))
    clone = FoolsGold()
    clone.load_state_dict(state)
    torch.testing.assert_close(clone.state_dict()["history"][3], state["history"][3])


def test_dnc_removes_a_shifted_group_and_needs_a_generator():
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(12, 200, generator=g, dtype=torch.float64)
    bad = honest.mean(0) + 3.0 * honest.std(0) * torch.ones(200, dtype=torch.float64)
    x = torch.cat([honest, bad.expand(3, 200)])
    res = DnC(3, subsample=50)(x, context={"generator": torch.Generator().manual_seed(0)})
    assert {12, 13, 14} <= set(res.flagged)
    with pytest.raises(ConfigError, match="generator"):
        DnC(3)(x)


def _stimulus_model(d_in=6, n_cls=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    stimuli = torch.randn(n_cls, d_in, generator=g, dtype=torch.float64)

    def forward(vec):
        return stimuli @ vec.reshape(d_in, n_cls)

    gvec = torch.randn(d_in * n_cls, generator=g, dtype=torch.float64)
    return forward, gvec, g


def test_cedar_flags_the_low_similarity_group():
    forward, gvec, g = _stimulus_model()
    honest = 0.05 * torch.randn(7, gvec.numel(), generator=g, dtype=torch.float64)
    bad = -2.0 * gvec + 0.05 * torch.randn(2, gvec.numel(), generator=g, dtype=torch.float64)  # sign-flipped
    x = torch.cat([honest, bad])
    res = CedarDetector()(x, context={"forward": forward, "global_vector": gvec})
    assert set(res.flagged) == {7, 8}
    assert res.scores[:7].min() > res.scores[7:].max()
    torch.testing.assert_close(res.aggregate, honest.mean(0))
    for key in ("forward", "global_vector"):
        ctx = {"forward": forward, "global_vector": gvec}
        del ctx[key]
        with pytest.raises(ConfigError, match=key):
            CedarDetector()(x, context=ctx)


def test_cedar_helpers():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert corr2(a, 2 * a + 1) == pytest.approx(1.0)
    assert corr2(a, -a) == pytest.approx(-1.0)
    low = two_means_low(torch.tensor([0.9, 0.1, 0.95, 0.2, 0.92]))
    assert low.tolist() == [False, True, False, True, False]
    assert not two_means_low(torch.tensor([0.5, 0.5, 0.5])).any()


def test_nonfinite_rows_are_flagged_and_all_nonfinite_is_a_typed_error():
    x = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, float("inf")], [2.0, 3.0]])
    res = Mean()(x, client_ids=[10, 11, 12, 13])
    assert res.flagged == (11, 12) and res.info[NONFINITE_KEY] == (11, 12)
    torch.testing.assert_close(res.aggregate, torch.tensor([1.5, 2.5]))
    torch.testing.assert_close(res.weights, torch.tensor([0.5, 0, 0, 0.5], dtype=torch.float64))
    with pytest.raises(InvalidUpdateError, match="client 11"):
        Mean()(x[1:3], client_ids=[11, 12])
    gram = Gram(
        (1, 2, 3), torch.tensor([[1.0, 0.5, float("nan")], [0.5, 2.0, float("nan")], [float("nan")] * 3],
                                dtype=torch.float64)
    )
    gres = Mean().aggregate_gram(gram)
    assert gres.flagged == (3,)
    torch.testing.assert_close(gres.weights, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


def test_composition_maps_row_weights_back_to_clients():
    x, bad = cluster(n_honest=8, n_bad=2)
    ids = tuple(range(20, 30))
    res = (NNM(2) >> Krum(2))(x, client_ids=ids)
    torch.testing.assert_close(res.aggregate, (res.weights[:, None] * x).sum(0))
    assert res.weights.sum() == pytest.approx(1.0)
    assert all(float(res.weights[i]) == 0 for i in (8, 9))
    on_gram = (NNM(2) >> Krum(2)).aggregate_gram(Gram.from_updates(x, ids))
    torch.testing.assert_close(on_gram.weights, res.weights, atol=1e-9, rtol=0)
    # bucket rows are not clients: the rule's flags move to info
    ctx = {"generator": torch.Generator().manual_seed(0)}
    bres = (Bucketing(2) >> MultiKrum(1))(x, client_ids=ids, context=ctx)
    assert bres.flagged == () and all(b < 0 for b in bres.info["flagged_rows"])
    torch.testing.assert_close(bres.aggregate, (bres.weights[:, None] * x).sum(0).to(x.dtype))
    with pytest.raises(ConfigError, match="generator"):
        (Bucketing(2) >> TrimmedMean(1))(x)


def test_trimmed_mean_on_secagg_bucket_sums_equals_trimmed_mean_of_bucket_means():
    from securefml.protocols.secagg_graph import bucket_partition

    x, _ = cluster(n_honest=10, n_bad=2)
    cohort = list(range(100, 112))
    members = bucket_partition(cohort, 6, b"\x01" * 32)
    w = {c: float(1 + (c % 3)) for c in cohort}
    row = {c: x[i] for i, c in enumerate(cohort)}
    sums = torch.stack([sum(w[c] * row[c] for c in mem) for mem in members])
    totals = [sum(w[c] for c in mem) for mem in members]
    res = aggregate_buckets(TrimmedMean(1), sums, totals, members)
    means = torch.stack([s / t for s, t in zip(sums, totals)])
    torch.testing.assert_close(res.aggregate, trimmed_mean(means, 1))
    assert res.info["buckets"] == tuple(tuple(m) for m in members)
    with pytest.raises(ConfigError, match="bucket sums"):
        aggregate_buckets(CedarDetector(), sums, totals, members)


def test_bucketing_pre_aggregator_matches_rule_on_its_bucket_means():
    x, _ = cluster(n_honest=10, n_bad=2)
    w = torch.ones(12, dtype=torch.float64)
    pre = Bucketing(3)
    m, _, members = pre.buckets(w, {"generator": torch.Generator().manual_seed(5)})
    means = torch.stack([x[mem].mean(0) for mem in members])
    res = (pre >> TrimmedMean(1))(x, context={"generator": torch.Generator().manual_seed(5)})
    torch.testing.assert_close(res.aggregate, trimmed_mean(means, 1))


class _GramOnly(Plaintext):
    """The plaintext halves declared as revealing only a Gram: only ``check_defense`` is used."""

    name = "gram-protocol"
    reveals = Reveals.GRAM


@pytest.mark.parametrize("name", ALL_NAMES)
def test_protocol_refuses_rules_that_cannot_run_on_what_it_reveals(name):
    rule = DEFENSES.create(name)
    proto = _GramOnly()
    if Reveals.GRAM in rule.runs_on:
        proto.check_defense(rule)
    else:
        with pytest.raises(ConfigError, match="gram-protocol"):
            proto.check_defense(rule)
        with pytest.raises(ConfigError, match="Gram"):
            rule.aggregate_gram(Gram.from_updates(torch.randn(5, 3)))


def test_gram_capable_set_matches_the_design():
    gram_rules = {n for n in ALL_NAMES if Reveals.GRAM in DEFENSES.create(n).runs_on}
    assert gram_rules == {"mean", "krum", "multikrum", "normbound", "fltrust", "flame", "nnm", "geomed", "arc",
                          "clipping", "bucketing"}
    assert DEFENSES.create("cedar").runs_on == frozenset({Reveals.UPDATES})
    assert DEFENSES.create("median").runs_on == frozenset({Reveals.UPDATES, Reveals.BUCKETS})


def test_detection_rates_and_tracker():
    r = detection_rates([1, 2], malicious_ids=[1, 5], cohort_ids=range(6))
    assert (r.tp, r.fp, r.fn, r.tn) == (1, 1, 1, 3)
    assert r.tpr == 0.5 and r.fpr == 0.25
    assert detection_rates([], [], range(3)).tpr is None
    with pytest.raises(ConfigError, match="not in the cohort"):
        detection_rates([9], [1], range(3))
    t = DetectionTracker(malicious_ids=(0,))
    t.update(0, flagged=[0], cohort_ids=[0, 1])
    t.update(1, flagged=[1], cohort_ids=[1, 2])
    d = t.to_dict()
    assert d["overall"]["tp"] == 1 and d["overall"]["fp"] == 1 and d["overall"]["tpr"] == 1.0
    assert [p["round"] for p in d["per_round"]] == [0, 1] and d["per_round"][1]["tpr"] is None


def test_rules_run_in_float32_and_keep_the_dtype():
    x, _ = cluster()
    x32 = x.to(torch.float32)
    ctx = {"generator": torch.Generator().manual_seed(0), "reference": x32[:8].mean(0)}
    for name in ALL_NAMES:
        if name == "cedar":
            continue
        f = {"bulyan": 1}.get(name, 2)
        takes_f = name in ("trimmedmean", "krum", "multikrum", "bulyan", "meamed", "nnm", "arc", "dnc")
        rule = make_defense(f"{name}:f={f}" if takes_f else name)
        before = x32.clone()
        res = rule(x32, context=ctx)
        assert torch.equal(x32, before), f"{name} modified its input"
        assert res.aggregate.dtype == torch.float32, name
        assert torch.isfinite(res.aggregate).all(), name


def test_rules_never_modify_float64_inputs():
    x, _ = cluster()
    before = x.clone()
    ctx = {"generator": torch.Generator().manual_seed(0), "reference": x[:8].mean(0)}
    for spec in ("krum:f=2", "multikrum:f=2", "geomed", "nnm:f=2>>median", "flame", "dnc:f=2", "cclip", "fltrust"):
        make_defense(spec)(x, context=ctx)
        assert torch.equal(x, before), spec
