"""Model-poisoning attacks: each attack's defining property, mostly as hypothesis properties."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from securefml.attacks import (
    ALIE,
    ATTACKS,
    IPM,
    Attack,
    AttackContext,
    FangKrum,
    FangTrimmedMean,
    Gaussian,
    Mimic,
    MinMax,
    MinSum,
    ModelReplacement,
    Scaling,
    SignFlip,
    alie_z,
    make_attack,
)
from securefml.attacks.model_poisoning import minmax_gamma, perturbation_direction
from securefml.defenses.distance import krum_scores
from securefml.defenses.linalg import sq_distances_from_gram, stable_gram
from securefml.errors import ConfigError

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def rounds(draw: st.DrawFn, *, min_honest: int = 3) -> tuple[torch.Tensor, torch.Tensor, AttackContext]:
    """Honest ``[h, d]`` updates, the malicious clients' own ``[m, d]`` updates, and a context."""
    h = draw(st.integers(min_honest, 9))
    m = draw(st.integers(1, max(1, (h - 1) // 2)))
    d = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(d, generator=g, dtype=torch.float64)
    honest = shift + 0.5 * torch.randn(h, d, generator=g, dtype=torch.float64)
    own = shift + 0.5 * torch.randn(m, d, generator=g, dtype=torch.float64)
    ctx = AttackContext(round=0, n_clients=h + m, n_malicious=m, honest_updates=honest,
                        generator=torch.Generator().manual_seed(seed + 1))
    return honest, own, ctx


# -- registry -------------------------------------------------------------------------------


def test_registry_names_and_specs() -> None:
    expected = {"none", "signflip", "gaussian", "scaling", "alie", "ipm", "minmax", "minsum", "fang-krum",
                "fang-trmean", "mimic", "labelflip", "backdoor", "adaptive", "meta-backdoor", "metasgd-lr"}
    assert expected <= set(ATTACKS.names())
    assert make_attack("signflip:2").scale == 2.0
    assert make_attack("ipm:epsilon=0.5").epsilon == 0.5
    assert make_attack("alie:1.5").z == 1.5
    assert make_attack("minmax:perturbation=unit").perturbation == "unit"
    assert type(make_attack("none")) is Attack
    with pytest.raises(ConfigError, match="choose one of"):
        make_attack("nonesuch")
    with pytest.raises(ConfigError):
        make_attack("ipm:epsilon=-1")


# -- simple attacks -------------------------------------------------------------------------


@SETTINGS
@given(rounds(), st.floats(0.1, 10))
def test_signflip_negates_and_scales(data, scale: float) -> None:
    _, own, ctx = data
    assert torch.allclose(SignFlip(scale).poison_updates(own, ctx), -scale * own)


def test_gaussian_statistics_and_reproducibility() -> None:
    own = torch.zeros(4, 5000, dtype=torch.float64)
    ctx = AttackContext(round=0, n_clients=10, n_malicious=4, generator=torch.Generator().manual_seed(3))
    out = Gaussian(2.0, mean=1.0).poison_updates(own, ctx)
    assert abs(float(out.mean()) - 1.0) < 0.05 and abs(float(out.std()) - 2.0) < 0.05
    ctx2 = AttackContext(round=0, n_clients=10, n_malicious=4, generator=torch.Generator().manual_seed(3))
    again = Gaussian(2.0, mean=1.0).poison_updates(own, ctx2)
    assert torch.equal(out, again)
    around = Gaussian(1e-9, around_own=True).poison_updates(own + 5, ctx)
    assert torch.allclose(around, own + 5, atol=1e-6)


@SETTINGS
@given(rounds(), st.floats(0.1, 2.0))
def test_model_replacement_replaces_the_mean(data, server_lr: float) -> None:
    """m attackers with the same target X, scaled by n/(eta m): the global step equals X (Bagdasaryan)."""
    honest, own, ctx = data
    target = own[:1].expand_as(own)
    # Bagdasaryan's approximation: honest updates cancel out (sum to ~0) near convergence.
    centred = honest - honest.mean(0)
    sent = ModelReplacement(server_lr=server_lr).poison_updates(target, ctx)
    step = server_lr * torch.cat([centred, sent]).mean(0)
    assert torch.allclose(step, target[0], atol=1e-9)
    assert torch.allclose(Scaling(3.0).poison_updates(own, ctx), 3 * own)


# -- ALIE and IPM ---------------------------------------------------------------------------


def test_alie_z_matches_the_paper_formula() -> None:
    for n, f in [(25, 5), (50, 12), (10, 2), (100, 20)]:
        s = math.floor(n / 2 + 1) - f
        assert alie_z(n, f) == pytest.approx(NormalDist().inv_cdf((n - s) / n))
    with pytest.raises(ConfigError):
        alie_z(10, 0)


@SETTINGS
@given(n=st.integers(2, 40), extra=st.integers(0, 40), d=st.integers(1, 6))
def test_alie_in_a_byzantine_majority_cohort_uses_the_largest_defined_z(n: int, extra: int, d: int) -> None:
    """A random cohort with more than n // 2 attackers must not end the run: ALIE uses z(n, n // 2)."""
    f = min(n - 1, n // 2 + 1 + extra)
    assume(f > n // 2)  # n = 2, 3: no majority short of the whole cohort
    with pytest.raises(ConfigError):
        alie_z(n, f)
    honest = torch.randn(n - f, d, dtype=torch.float64, generator=torch.Generator().manual_seed(n + d))
    ctx = AttackContext(round=0, n_clients=n, n_malicious=f, honest_updates=honest)
    z = ALIE().z_for(ctx)
    assert z == alie_z(n, n // 2) == pytest.approx(NormalDist().inv_cdf((n - 1) / n))
    std = honest.std(0, correction=1) if n - f > 1 else torch.zeros(d, dtype=torch.float64)
    out = ALIE().poison_updates(torch.zeros(f, d, dtype=torch.float64), ctx)
    assert torch.allclose(out, (honest.mean(0) - z * std).expand(f, d))
    assert ALIE(z=0.5).z_for(ctx) == 0.5


@SETTINGS
@given(rounds())
def test_alie_rows_equal_mean_minus_z_std(data) -> None:
    honest, own, ctx = data
    out = ALIE().poison_updates(own, ctx)
    z = alie_z(ctx.n_clients, ctx.n_malicious)
    expected = honest.mean(0) - z * honest.std(0, correction=1)
    assert out.shape == own.shape
    assert torch.allclose(out, expected.expand_as(own), atol=1e-12)
    # Partial knowledge: the statistics of the attackers' own genuine updates.
    if own.shape[0] > 1:
        out_own = ALIE(z=1.0, omniscient=False).poison_updates(own, ctx)
        assert torch.allclose(out_own[0], own.mean(0) - own.std(0, correction=1), atol=1e-12)


@SETTINGS
@given(rounds(), st.floats(0.01, 100))
def test_ipm_is_minus_epsilon_times_the_honest_mean(data, eps: float) -> None:
    honest, own, ctx = data
    out = IPM(eps).poison_updates(own, ctx)
    assert torch.allclose(out, (-eps * honest.mean(0)).expand_as(own), atol=1e-12)
    # The defining effect: the inner product of the mean-aggregate with the honest mean flips sign
    # when enough IPM rows get through (here: as many as honest rows, epsilon > 1).
    mu = honest.mean(0)
    if eps > 1.0 and mu.norm() > 0:
        big = IPM(eps).poison_updates(torch.zeros_like(honest), ctx)
        assert float(torch.dot(torch.cat([honest, big]).mean(0), mu)) < 0


def test_omniscient_attack_without_honest_updates_is_a_config_error() -> None:
    ctx = AttackContext(round=0, n_clients=5, n_malicious=1)
    with pytest.raises(ConfigError, match="honest_updates"):
        IPM().poison_updates(torch.ones(1, 3), ctx)


# -- Min-Max / Min-Sum ----------------------------------------------------------------------


@SETTINGS
@given(rounds(), st.sampled_from(["unit", "std", "sign"]))
def test_minmax_stays_within_the_honest_max_pairwise_distance(data, perturbation: str) -> None:
    honest, own, ctx = data
    out = MinMax(perturbation).poison_updates(own, ctx)
    assert torch.allclose(out, out[0].expand_as(out))
    max_pair = torch.cdist(honest, honest).max()
    assert float(torch.cdist(out[:1], honest).max()) <= float(max_pair) * (1 + 1e-9) + 1e-12
    # ... and gamma is (nearly) the largest such: 1% more breaks the condition.
    gamma = ctx.attack_info["minmax"]["gamma"]
    p = perturbation_direction(honest, perturbation)
    if gamma > 0 and p.norm() > 0:
        beyond = honest.mean(0) + 1.01 * gamma * p
        assert float(torch.cdist(beyond[None], honest).max()) > float(max_pair)


@SETTINGS
@given(rounds(), st.sampled_from(["unit", "std", "sign"]))
def test_minsum_keeps_the_sum_of_squared_distances_bounded(data, perturbation: str) -> None:
    honest, own, ctx = data
    out = MinSum(perturbation).poison_updates(own, ctx)
    bound = torch.cdist(honest, honest).pow(2).sum(1).max()
    assert float(torch.cdist(out[:1], honest).pow(2).sum()) <= float(bound) * (1 + 1e-9) + 1e-12


def test_minmax_gamma_on_a_known_configuration() -> None:
    # Honest points at +-1 on the x axis: max pairwise distance 2; mean 0; direction (0, 1):
    # the farthest honest point is at sqrt(1 + gamma^2) <= 2  =>  gamma = sqrt(3).
    honest = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    gamma = minmax_gamma(honest, torch.tensor([0.0, 1.0], dtype=torch.float64), tol=1e-9)
    assert gamma == pytest.approx(math.sqrt(3), rel=1e-6)


# -- Fang et al. ----------------------------------------------------------------------------


def _brute_krum_scores(x: torch.Tensor, f: int) -> list[float]:
    n = x.shape[0]
    scores = []
    for i in range(n):
        d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: max(1, n - f - 2)]))
    return scores


def _brute_krum(x: torch.Tensor, f: int) -> int:
    scores = _brute_krum_scores(x, f)
    return min(range(len(scores)), key=scores.__getitem__)


@SETTINGS
@given(rounds(min_honest=5))
def test_fang_krum_gets_a_malicious_row_selected(data) -> None:
    honest, own, ctx = data
    attack = FangKrum()
    out = attack.poison_updates(own, ctx)
    lam = ctx.attack_info["fang-krum"]["lambda"]
    s = torch.sign(honest.mean(0))
    assert torch.allclose(out, (-lam * s).expand_as(own))
    assert lam <= FangKrum.lambda_upper_bound(honest, ctx.n_clients, own.shape[0]) + 1e-12
    if lam > attack.threshold:  # the search succeeded: Krum (checked independently) picks a malicious row
        assert _brute_krum(torch.cat([out, honest]), ctx.n_malicious) < own.shape[0]
    rows = torch.cat([out, honest])
    # the fast scores pick a row whose brute-force score is the minimum (the malicious rows are
    # identical, so their scores tie and either index is Krum's choice)
    brute = _brute_krum_scores(rows, ctx.n_malicious)
    picked = int(krum_scores(sq_distances_from_gram(stable_gram(rows)), ctx.n_malicious).argmin())
    assert brute[picked] <= min(brute) * (1 + 1e-9) + 1e-12


def test_fang_krum_succeeds_on_noisy_honest_updates() -> None:
    # Stochastic updates: a small common drift under much larger per-client noise (Fang et al.'s regime).
    g = torch.Generator().manual_seed(0)
    honest = 0.2 + torch.randn(20, 50, generator=g, dtype=torch.float64)
    ctx = AttackContext(round=0, n_clients=25, n_malicious=5, honest_updates=honest)
    out = FangKrum().poison_updates(torch.zeros(5, 50, dtype=torch.float64), ctx)
    assert ctx.attack_info["fang-krum"]["lambda"] > 1e-3
    assert _brute_krum(torch.cat([out, honest]), 5) < 5
    assert float(out[0] @ honest.mean(0)) < 0


@SETTINGS
@given(rounds(), st.floats(1.1, 5))
def test_fang_trimmed_mean_lies_beyond_the_honest_extremes(data, b: float) -> None:
    honest, own, ctx = data
    out = FangTrimmedMean(b).poison_updates(own, ctx)
    s = torch.sign(honest.mean(0))
    wmax, wmin = honest.max(0).values, honest.min(0).values
    tol = 1e-12
    down = s < 0  # parameter would decrease: push it up, at or above the honest maximum
    assert bool((out[:, down] >= wmax[down] - tol).all())
    assert bool((out[:, ~down] <= wmin[~down] + tol).all())
    # ... and within the paper's factor b of the extreme.
    assert bool((out[:, down].abs() <= b * wmax[down].abs() + tol).all())
    assert bool((out[:, ~down].abs() <= b * wmin[~down].abs() + tol).all())


# -- Mimic ----------------------------------------------------------------------------------


@SETTINGS
@given(rounds())
def test_mimic_copies_the_honest_update_farthest_along_the_top_direction(data) -> None:
    honest, own, ctx = data
    out = Mimic().poison_updates(own, ctx)
    idx = ctx.attack_info["mimic"]["target"]
    assert torch.equal(out, honest[idx].expand_as(own))
    centred = honest - honest.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    proj = (centred @ vh[0]).abs()
    assert float(proj[idx]) >= float(proj.max()) - 1e-9
    assert torch.equal(Mimic(target=1).poison_updates(own, ctx), honest[1].expand_as(own))


def test_bad_options_raise_config_errors() -> None:
    for build in (lambda: Gaussian(0), lambda: Scaling(-1), lambda: IPM(0), lambda: MinMax("bogus"),
                  lambda: FangTrimmedMean(1.0), lambda: Mimic(-1), lambda: ALIE(z=math.inf)):
        with pytest.raises(ConfigError):
            build()
