"""No silent no-ops: f required or derived, data-driven cclip tau, mean warnings, partial layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.defenses import (
    ARC,
    BYZANTINE_KEY,
    NNM,
    CenteredClipping,
    Krum,
    Mean,
    MeanEquivalenceWarning,
    MultiKrum,
    TrimmedMean,
    byzantine_budget,
    cohort_tail,
    make_defense,
)
from securefml.errors import ConfigError
from securefml.updates import LayerLayout

LAYOUT = LayerLayout([("body.weight", (6, 4)), ("body.bias", (6,)), ("head.weight", (2, 6))])


@pytest.mark.parametrize("spec", ["krum", "multikrum", "nnm>>krum:f=1", "arc>>mean", "trimmedmean:f=1", "bulyan"])
def test_f_is_required_without_a_federation_budget(spec):
    rule = make_defense(spec)
    x = torch.randn(9, 5)
    if "f=1" in spec and "nnm" not in spec and "arc" not in spec:
        rule(x)  # an explicit f needs nothing from the context
        return
    with pytest.raises(ConfigError, match="needs f"):
        rule(x)
    rule(x, context={BYZANTINE_KEY: 1})  # the federation's derived budget resolves it


@settings(max_examples=60, deadline=None)
@given(frac=st.floats(0.01, 0.45), cohort=st.integers(2, 30), extra=st.integers(0, 200))
def test_budget_is_the_smallest_f_covering_95_percent_of_random_cohorts(frac, cohort, extra):
    pop = cohort + extra
    f = byzantine_budget(frac, cohort, population=pop)
    cap = (cohort - 1) // 2
    assert 0 <= f <= cap
    if f < cap:
        assert cohort_tail(frac, cohort, f, population=pop) <= 0.05 + 1e-12
    if f > 0:
        assert cohort_tail(frac, cohort, f - 1, population=pop) > 0.05


def test_budget_margin_for_the_issue_cohort():
    # 25% of 100 clients, 8 per round: 2 on average, but more than 2 in about a third of rounds
    assert cohort_tail(0.25, 8, 2, population=100) > 0.3
    assert byzantine_budget(0.25, 8, population=100) == 3


@pytest.mark.parametrize(
    "rule",
    [MultiKrum(f=0), NNM(f=0) >> Krum(f=1), TrimmedMean(f=0), ARC(f=0) >> Mean(),
     make_defense("nnm:f=0>>multikrum:f=0")],
    ids=["multikrum0", "nnm0>>krum", "trimmed0", "arc0>>mean", "nnm0>>multikrum0"],
)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(5, 9))
def test_configurations_that_reduce_to_the_mean_warn_once_and_are_the_mean(rule, seed, n):
    x = torch.randn(n, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    object.__setattr__(rule, "_mean_warned", False)
    with pytest.warns(MeanEquivalenceWarning):
        out = rule(x).aggregate
    assert torch.allclose(out, x.mean(0), atol=1e-10)  # the warning's claim holds
    with warnings.catch_warnings():
        warnings.simplefilter("error", MeanEquivalenceWarning)
        rule(x)  # once per instance


@pytest.mark.parametrize("rule", [Krum(f=1), MultiKrum(f=1), NNM(f=1) >> Mean(), ARC(f=2) >> Mean(), TrimmedMean(f=1)])
def test_robust_configurations_do_not_warn(rule):
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MeanEquivalenceWarning)
        rule(x)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_cclip_default_tau_is_the_round_median_distance(scale):
    x = scale * torch.randn(9, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = CenteredClipping()(x)
    norms = x.norm(dim=1)  # first round: the center is zero
    assert res.info["tau"] == pytest.approx(float(norms.median()))
    assert res.info["clipped"] == int((norms > norms.median()).sum()) > 0


def test_cclip_with_a_constant_tau_that_clips_nothing_warns_and_is_the_mean():
    x = 1e-3 * torch.randn(8, 10, dtype=torch.float64)
    rule = CenteredClipping(tau=10.0)
    with pytest.warns(MeanEquivalenceWarning, match="clipped no update"):
        out = rule(x).aggregate
    assert torch.allclose(out, x.mean(0))


def _ctx(layers):
    return {"layout": LAYOUT, "layers": LAYOUT.canonical(layers)}


def test_cclip_keeps_a_per_layer_center_across_partial_uploads():
    rule = CenteredClipping()
    full = torch.randn(6, LAYOUT.numel, dtype=torch.float64)
    rule(full, context=_ctx(LAYOUT.layer_names))
    center_before = rule.state_dict()["center"].clone()
    head = ("head",)
    # the issue's crash: all layers in round 0, then only the head
    out = rule(torch.randn(6, LAYOUT.numel_of(head), dtype=torch.float64), context=_ctx(head)).aggregate
    after = rule.state_dict()["center"]
    body = LAYOUT.mask(["body"])
    assert torch.equal(after[body], center_before[body])  # untouched layers keep their center
    assert torch.equal(after[LAYOUT.mask(head)], out)


def test_cclip_refuses_a_dimension_change_without_layer_context():
    rule = CenteredClipping()
    rule(torch.randn(5, 40))
    with pytest.raises(ConfigError, match="uploaded layers changed"):
        rule(torch.randn(5, 12))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    byz=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=2),
    n_byz=st.integers(1, 3),
)
def test_byzantine_rows_cannot_move_the_center_of_layers_they_did_not_upload(seed, byz, n_byz):
    g = torch.Generator().manual_seed(seed)
    rule = CenteredClipping()
    rule(torch.randn(7, LAYOUT.numel, generator=g, dtype=torch.float64), context=_ctx(LAYOUT.layer_names))
    body = LAYOUT.mask(["body"])
    kept = rule.state_dict()["center"][body].clone()
    head = ("head",)
    x = torch.randn(7, LAYOUT.numel_of(head), generator=g, dtype=torch.float64)
    x[:n_byz] = byz[0]
    x[:n_byz, ::2] = byz[1]  # the adversary picks any values for its rows
    rule(x, context=_ctx(head))
    assert torch.equal(rule.state_dict()["center"][body], kept)
