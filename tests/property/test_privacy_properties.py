"""Security properties of the DP mechanisms, on the real Opacus optimizer and real torch models.

* every clipped per-example gradient has norm <= C (record level: weights, and meta-gradients
  through a traced inner loop) and
  every clipped client update has norm <= S (user level);
* the added noise has standard deviation sigma*C (record) / z*S on the sum (user, central), within
  a statistical tolerance, and the release divides by the public expected cohort size;
* distributed Skellam shares are integers whose sum has the planned variance;
* with zero noise and clipping off, the DP path equals the non-private path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.data import make_digits_fewshot, make_sine
from securefml.data.base import Task
from securefml.meta import LEARNERS, MetaConfig, MetaSGD
from securefml.models import make_model
from securefml.privacy import (
    DistributedSkellam,
    Ledger,
    NoiseSource,
    RecordLevelDP,
    UserLevelDP,
    clip_update,
    rounded_sensitivity,
)

SINE = make_sine(n_train=3, n_heldout=1, seed=0)
DIGITS = make_digits_fewshot(n_train=2, n_heldout=1, k_shot=2, query=2, seed=0)
PROPS = settings(max_examples=12, deadline=None)


def _learner(name: str, data, config: MetaConfig):  # type: ignore[no-untyped-def]
    model = make_model(data, hidden=(8,), seed=0)
    if name == "metasgd-fo":
        return MetaSGD(model, config, first_order=True)
    return LEARNERS.create(name, model=model, config=config)


def _dp(learner, **kw) -> RecordLevelDP:  # type: ignore[no-untyped-def]
    base = dict(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=1.0, generator=torch.Generator().manual_seed(1),
                allow_support_leak=True)
    return RecordLevelDP(learner, **{**base, **kw})


def _one_example(task: Task, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return task.support_x[i:i + 1], task.support_y[i:i + 1]


@PROPS
@given(c=st.floats(0.01, 5.0), i=st.integers(0, 9), scale=st.floats(0.1, 100.0))
def test_clipped_per_example_gradient_norm_at_most_c_module_route(c: float, i: int, scale: float) -> None:
    """A batch of one example (q=1, no noise): the released gradient is that example's clipped gradient."""
    learner = _learner("fedavg", SINE, MetaConfig(inner_steps=1))
    dp = _dp(learner, max_grad_norm=c)
    params = learner.init_params()
    task = SINE.train[0]
    x, y = _one_example(task, i)
    g = dp.gradients_for(task.client_id)(learner.weights_loss_fn(task.kind), params, (x, y * scale))
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))
    assert norm <= c * (1 + 1e-5)


@PROPS
@given(c=st.floats(0.01, 5.0), i=st.integers(0, 3))
def test_clipped_per_example_meta_gradient_norm_at_most_c_vmap_route(c: float, i: int) -> None:
    learner = _learner("maml", DIGITS, MetaConfig(inner_steps=1, inner_lr=0.5))
    dp = _dp(learner, max_grad_norm=c)
    params = learner.init_params()
    task = DIGITS.train[0]
    grads = dp.gradients_for(task.client_id)

    def query_loss(p, x, y):  # type: ignore[no-untyped-def]  # through the (traced) inner loop
        adapted = learner.with_gradients(grads).sgd_adapt(p, task.support_x, task.support_y, task.kind, steps=1,
                                                          lr=0.5, traced=True)
        return learner.loss(adapted, x, y, task.kind) * 50.0

    g = grads(query_loss, params, (task.query_x[i:i + 1], task.query_y[i:i + 1]))
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))
    assert norm <= c * (1 + 1e-5)


@PROPS
@given(d=st.integers(1, 200), s=st.floats(1e-3, 1e3), scale=st.floats(1e-4, 1e4), seed=st.integers(0, 2**16))
def test_clipped_update_norm_at_most_s(d: int, s: float, scale: float, seed: int) -> None:
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * scale
    out = clip_update(u, s)
    assert float(out.norm()) <= s * (1 + 1e-5)
    if float(u.norm()) <= s:
        assert torch.equal(out, u)
    else:  # clipping only rescales
        assert torch.allclose(out / out.norm(), u / u.norm(), atol=1e-5)


def _std_ok(sample: torch.Tensor, expected: float) -> bool:
    # relative standard error of a sample std is about 1/sqrt(2N); allow ~6 of them
    tol = 6 / math.sqrt(2 * sample.numel())
    return abs(float(sample.std()) / expected - 1) < tol


@PROPS
@given(sigma=st.floats(0.2, 4.0), c=st.floats(0.05, 5.0), secure=st.booleans(), seed=st.integers(0, 2**16))
def test_record_noise_std_is_sigma_c(sigma: float, c: float, secure: bool, seed: int) -> None:
    """Same Poisson batch (q=1) with and without noise: the difference times the batch size is the noise."""
    learner = _learner("fedavg", DIGITS, MetaConfig(inner_steps=1))
    params = {n: p for n, p in learner.init_params().items()}
    task = DIGITS.train[0]
    quiet = _dp(learner, max_grad_norm=c)
    noisy = _dp(learner, max_grad_norm=c, noise_multiplier=sigma, secure_mode=secure,
                generator=torch.Generator().manual_seed(seed))
    x, y = task.support_x, task.support_y
    loss = learner.weights_loss_fn(task.kind)
    g0 = quiet.gradients_for(0)(loss, params, (x, y))
    g1 = noisy.gradients_for(0)(loss, params, (x, y))
    noise = torch.cat([(g1[n] - g0[n]).flatten() for n in g0]) * len(x)
    assert noise.numel() > 500
    assert abs(float(noise.mean())) < 6 * sigma * c / math.sqrt(noise.numel())
    assert _std_ok(noise, sigma * c)


@PROPS
@given(z=st.floats(0.1, 5.0), s=st.floats(0.01, 10.0), expected=st.floats(1.0, 20.0), m=st.integers(1, 20),
       seed=st.integers(0, 2**16))
def test_user_central_release_is_sum_plus_z_s_noise_over_expected_cohort(z: float, s: float, expected: float,
                                                                           m: int, seed: int) -> None:
    dp = UserLevelDP(clip=s, noise_multiplier=z, expected_cohort=expected, sample_rate=0.1,
                     ledger=Ledger("rdp", 1e-5), source=NoiseSource.seeded(seed))
    mean = torch.full((4000,), 0.25)
    released = dp.aggregate_hook(m, mean)
    # (sum + N(0, (z S)^2)) / (q N): the denominator is public, whatever m is
    noise = released - mean * (m / expected)
    assert _std_ok(noise, z * s / expected)


@PROPS
@given(z=st.floats(0.1, 5.0), n=st.integers(2, 12), m_min=st.integers(1, 12), scale=st.floats(10.0, 1e4),
       seed=st.integers(0, 2**16))
def test_skellam_shares_are_integers_summing_to_the_planned_variance(z: float, n: int, m_min: int, scale: float,
                                                                    seed: int) -> None:
    from securefml.protocols.quantize import FixedPoint
    from securefml.protocols.secagg_client import MaskJob

    clip, d = 1.0, 3000
    mech = DistributedSkellam(clip=clip, noise_multiplier=z, min_survivors=m_min, delta=1e-5,
                              source=NoiseSource.seeded(seed))
    fp = FixedPoint((2**31 - 1 - n) / (n * scale), n)  # clip_range chosen so fp.scale == scale
    shares = [mech.ring_noise(MaskJob(np.zeros(d, np.float32), 1.0, fp, [], [], c, 0, {})) for c in range(n)]
    assert all(sh.dtype == np.int64 and sh[-1] == 0 for sh in shares)  # integers; the weight coordinate untouched
    total = torch.from_numpy(np.sum(shares, axis=0)[:-1].astype(np.float64))
    _, l2 = rounded_sensitivity(scale=fp.scale, clip=clip, dim=d)
    assert _std_ok(total, math.sqrt(n * (z * l2) ** 2 / m_min))
    mech.end_round(0, list(range(n)))
    assert mech.variance_per_round == [pytest.approx(n * (z * l2) ** 2 / m_min)]


@pytest.mark.parametrize("name", ["fedavg", "reptile", "fomaml", "metasgd-fo", "maml", "metasgd"])
@settings(max_examples=4, deadline=None)
@given(client=st.integers(0, 1), steps=st.integers(1, 2), outer=st.integers(1, 2))
def test_no_noise_no_clipping_equals_non_private_path(name: str, client: int, steps: int, outer: int) -> None:
    cfg = MetaConfig(inner_steps=steps, inner_lr=0.05, outer_lr=0.1, outer_steps=outer)
    learner = _learner(name, DIGITS, cfg)
    dp = _dp(learner, max_grad_norm=math.inf)
    params = learner.init_params()
    task = DIGITS.train[client]
    ref, m_ref = learner.update(params, task)
    got, m_got = dp.update(params, task)
    assert set(ref) == set(got)
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-6, rtol=1e-4), n
    assert m_ref.keys() == m_got.keys()


@settings(max_examples=6, deadline=None)
@given(d=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_user_level_without_noise_or_clipping_is_identity(d: int, seed: int) -> None:
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 1e3
    dp = UserLevelDP(clip=math.inf, noise_multiplier=0.0, expected_cohort=3, sample_rate=0.5,
                     ledger=Ledger("rdp", 1e-5))
    assert torch.equal(dp.aggregate_hook(3, dp.update_hook(0, u)), u)


@settings(max_examples=200, deadline=None)
@given(x=st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=1, max_size=64),
       clip=st.floats(1e-3, 10.0), clip_range=st.floats(1e-2, 1e6), n=st.integers(2, 20))
def test_any_client_input_moves_the_ring_sum_by_at_most_the_accounted_sensitivity(
        x: list[float], clip: float, clip_range: float, n: int) -> None:
    """Whatever a client sends into the hook, its quantized vector stays within the sensitivity the ledger uses."""
    from securefml.protocols.quantize import FixedPoint

    dp = UserLevelDP(clip=clip, noise_multiplier=1.0, expected_cohort=n, sample_rate=0.5, ledger=Ledger("rdp", 1e-5))
    sent = dp.update_hook(0, torch.tensor(x, dtype=torch.float64)).to(torch.float32)
    fp = FixedPoint(clip_range, n)
    q = fp.encode(sent.numpy(), 1.0)[:-1].view(np.int32).astype(np.float64)
    l1, l2 = rounded_sensitivity(scale=fp.scale, clip=clip, dim=len(x))
    assert float(np.linalg.norm(q)) <= l2 and float(np.abs(q).sum()) <= l1
