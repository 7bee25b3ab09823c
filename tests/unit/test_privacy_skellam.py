"""The Skellam mechanism's accounting and sampling, checked against independent computations.

* the RDP bound (Agarwal et al. 2021) is at least the exact Renyi divergence of the 1-D Skellam
  distribution and its shift, computed from scipy's pmf, and close to it for large variance;
* it tends to the Gaussian mechanism's RDP ``alpha l2^2 / (2 v)`` in the continuous limit;
* calibration spends the target; the rounding bound holds for real stochastic rounding;
* the CSPRNG's Poisson / Skellam / Gaussian samplers have the right distributions;
* a full distributed-DP run through SecAgg stays within its target epsilon and reports the mechanism.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from securefml.data import make_digits_fewshot
from securefml.errors import ConfigError
from securefml.experiment import RunConfig, run_experiment
from securefml.privacy import NoiseSource, PoissonCohort, rounded_sensitivity, skellam_epsilon, skellam_rdp
from securefml.privacy.skellam import ORDERS, noise_multiplier_for_target, rdp_to_epsilon, skellam_rdp_curve
from securefml.protocols.quantize import FixedPoint


def _exact_renyi(alpha: int, shift: int, variance: float) -> float:
    """D_alpha(Sk(v) + shift || Sk(v)) by summing the pmf (scipy's Skellam with both means v/2)."""
    half = variance / 2
    width = int(40 * math.sqrt(variance)) + 40 + shift
    k = np.arange(-width, width + 1)
    lp = stats.skellam.logpmf(k - shift, half, half)
    lq = stats.skellam.logpmf(k, half, half)
    ok = np.isfinite(lp) & np.isfinite(lq)
    return float(logsumexp(alpha * lp[ok] + (1 - alpha) * lq[ok]) / (alpha - 1))


@pytest.mark.parametrize("variance", [2.0, 10.0, 60.0])
@pytest.mark.parametrize("alpha", [2, 5, 16])
@pytest.mark.parametrize("shift", [1, 3])
def test_rdp_bound_dominates_the_exact_one_dimensional_divergence(variance: float, alpha: int, shift: int) -> None:
    exact = _exact_renyi(alpha, shift, variance)
    bound = skellam_rdp(alpha, l1=shift, l2=shift, variance=variance)
    assert bound >= exact * (1 - 1e-9)
    gaussian = alpha * shift**2 / (2 * variance)
    assert exact <= gaussian * 1.05  # the Skellam is at least about as private as the Gaussian of its variance


def test_rdp_bound_is_tight_for_large_variance() -> None:
    exact = _exact_renyi(4, 2, 400.0)
    assert skellam_rdp(4, l1=2, l2=2, variance=400.0) == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize("alpha", [2, 8, 64])
def test_continuous_limit_is_the_gaussian_mechanism(alpha: int) -> None:
    # l2^2 / v fixed while v grows: the Skellam RDP tends to alpha l2^2 / (2 v) (sigma^2 = v)
    for l2 in (1e2, 1e4, 1e6):
        v = (1.3 * l2) ** 2
        got = skellam_rdp(alpha, l1=math.sqrt(1000) * l2, l2=l2, variance=v)
        gaussian = alpha / (2 * 1.3**2)
        assert got >= gaussian and got == pytest.approx(gaussian, rel=10 / l2)


def test_non_integer_order_is_refused() -> None:
    with pytest.raises(ConfigError, match="integer"):
        skellam_rdp(2.5, l1=1, l2=1, variance=1.0)  # type: ignore[arg-type]


def test_epsilon_of_a_composition_and_calibration() -> None:
    l1, l2 = rounded_sensitivity(scale=1e4, clip=1.0, dim=500)
    z = noise_multiplier_for_target(target_epsilon=3.0, delta=1e-5, releases=5, l1=l1, l2=l2)
    spent = skellam_epsilon([(l1, l2, (z * l2) ** 2)] * 5, 1e-5)
    assert spent <= 3.0 and spent == pytest.approx(3.0, rel=1e-3)
    # composition adds RDP: five releases cost what one release of five times the RDP costs
    once = skellam_rdp_curve(l1=l1, l2=l2, variance=(z * l2) ** 2)
    assert spent == pytest.approx(rdp_to_epsilon(5 * once, 1e-5))
    assert rdp_to_epsilon(np.full(len(ORDERS), math.inf), 1e-5) == math.inf
    with pytest.raises(ConfigError, match="cannot reach"):
        noise_multiplier_for_target(target_epsilon=1e-6, delta=1e-12, releases=10**6, l1=l1, l2=l2)


def test_rounded_sensitivity_holds_for_stochastic_rounding() -> None:
    rng = np.random.default_rng(0)
    d, clip = 400, 0.7
    fp = FixedPoint(1e6, 3)  # a wide entry range: a small integer scale (~700), where rounding matters
    l1, l2 = rounded_sensitivity(scale=fp.scale, clip=clip, dim=d)
    for _ in range(20):
        x = rng.normal(size=d)
        x *= clip / np.linalg.norm(x)
        q = fp.encode(x.astype(np.float32), 1.0)[:-1].view(np.int32).astype(np.float64)
        assert np.linalg.norm(q) <= l2 and np.abs(q).sum() <= l1


@pytest.mark.parametrize("lam", [0.4, 6.0, 25.0, 3e3])
def test_poisson_sampler_matches_the_distribution(lam: float) -> None:
    x = NoiseSource.seeded(1).poisson(60_000, lam)
    lo, hi = stats.poisson.ppf(1e-4, lam), stats.poisson.ppf(1 - 1e-4, lam)
    edges = np.unique(np.linspace(lo, hi + 1, 30).astype(int))
    observed, _ = np.histogram(x, bins=np.concatenate([[-np.inf], edges[1:-1], [np.inf]]) - 0.5)
    cdf = stats.poisson.cdf(np.concatenate([edges[1:-1] - 1, [np.inf]]), lam)
    expected = np.diff(np.concatenate([[0.0], cdf])) * x.size
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-4


def test_skellam_and_gaussian_samplers() -> None:
    src = NoiseSource.seeded(2)
    sk = src.skellam(100_000, 9.0)
    assert sk.dtype == np.int64 and abs(sk.mean()) < 0.05 and sk.var() == pytest.approx(9.0, rel=0.03)
    g = src.normal(100_000, 2.0)
    assert stats.kstest(g / 2.0, "norm").pvalue > 1e-4
    assert stats.kstest(src.normal(50_000, 1.0, fp_resistant=False), "norm").pvalue > 1e-4
    with pytest.raises(ConfigError, match="double precision"):
        src.poisson(1, 1e13)


def test_secure_sources_differ_and_seeded_ones_repeat() -> None:
    assert not np.array_equal(NoiseSource.secure().uint64(4), NoiseSource.secure().uint64(4))
    assert np.array_equal(NoiseSource.seeded(5).uint64(4), NoiseSource.seeded(5).uint64(4))
    parent = NoiseSource.seeded(5)
    assert not np.array_equal(parent.fork("a").uint64(4), parent.fork("a").uint64(4))  # forks are independent


def test_poisson_cohort_caps_participations() -> None:
    sampler = PoissonCohort(10, 0.9, NoiseSource.seeded(3), max_participations=2)
    seen = [c for _ in range(10) for c in sampler.sample()]
    assert max(seen.count(i) for i in range(10)) <= 2
    with pytest.raises(ConfigError, match="planned for 10"):
        sampler.sample(11)


def test_distributed_dp_run_through_secagg_stays_within_target() -> None:
    data = make_digits_fewshot(n_train=10, n_heldout=2, k_shot=3, query=3, seed=0)
    cfg = RunConfig(dataset="digits-fewshot", rounds=6, clients_per_round=5, protocol="secagg",
                    privacy=dict(mode="user", target_epsilon=8.0, delta=1e-3, placement="distributed"))
    priv = run_experiment(cfg, dataset=data).metrics["privacy"]
    assert priv["mechanism"] == "skellam" and priv["cohort_sampling"].startswith("poisson")
    assert priv["noise_source"] == "os-csprng"
    assert len(priv["noise_variance_per_round"]) == priv["rounds_accounted"] <= 6
    assert priv["max_participations"] >= 1 and priv["min_survivors"] >= 2
    # no dropouts here, and cohorts below min_survivors are skipped: no deficit, so the target holds
    assert priv["deficit_rounds"] == []
    assert 0 < priv["epsilon_max"] <= 8.0 + 1e-9


def test_rounds_accounted_counts_only_rounds_that_released_and_a_noiseless_release_is_unbounded() -> None:
    """The report's ``rounds_accounted`` equals the rounds the distributed accountant charged.

    A round without contributors (an empty Poisson cohort, or one below SecAgg's minimum that the
    run skips) releases nothing and costs nothing; a round whose contributors were summed with no
    noise share drawn for it is charged as an unbounded loss, never skipped.
    """
    from securefml.privacy import Ledger, UserLevelDP
    from securefml.privacy.distributed import DistributedSkellam
    from securefml.protocols.secagg_client import MaskJob

    mech = DistributedSkellam(clip=1.0, noise_multiplier=1.0, min_survivors=2, delta=1e-5,
                              source=NoiseSource.seeded(0))
    dp = UserLevelDP(clip=1.0, noise_multiplier=1.0, expected_cohort=3, sample_rate=0.5,
                     ledger=Ledger("rdp", 1e-5), placement="distributed", distributed=mech)
    fp = FixedPoint((2**31 - 1 - 3) / (3 * 100.0), 3)  # an integer scale of 100 per unit: small Poisson means
    for c in (0, 1, 2):
        mech.ring_noise(MaskJob(np.zeros(50, np.float32), 1.0, fp, [], [], c, 0, {}))
    dp.end_round(0, accepted=[0, 1, 2])
    dp.end_round(1, accepted=[])  # nothing released
    assert dp.rounds_accounted == mech.rounds_accounted == len(mech.variance_per_round) == 1
    eps_before = dp.epsilon()
    assert 0 < eps_before < math.inf
    dp.end_round(2, accepted=[0, 1])  # summed, but no client drew a share for round 2
    assert dp.rounds_accounted == mech.rounds_accounted == len(mech.variance_per_round) == 2
    per_client = mech.epsilon_per_client()
    assert per_client[0] == per_client[1] == math.inf and per_client[2] == pytest.approx(eps_before)
