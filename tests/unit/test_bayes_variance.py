"""The closed-form variance step of the softmax head (``securefml.bayes.variance``, ``head_variance_step``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.bayes import (
    BayesConfig,
    BayesMAML,
    BayesMetaSGD,
    PFedBayes,
    logvar_name,
    softmax_head_ggn_diagonal,
    stationary_logvar,
)
from securefml.data import make_digits_fewshot
from securefml.errors import ConfigError
from securefml.meta import MetaConfig
from securefml.models import make_model

DATA = make_digits_fewshot(n_train=3, n_heldout=3, k_shot=3, query=4, seed=0)
CFG = MetaConfig(inner_steps=2, inner_lr=0.1, outer_lr=1.0)
HEAD = "layers.4"


def _learner(cls=BayesMetaSGD, **bayes):  # type: ignore[no-untyped-def]
    return cls(make_model(DATA, hidden=(16, 16)), CFG, bayes=BayesConfig(**bayes))


def test_head_ggn_diagonal_equals_autograd_hessian_of_the_mean_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    n, s, d, c = 6, 3, 4, 3
    h = torch.randn(n, s, d, generator=gen)
    w0, b0 = torch.randn(c, d, generator=gen), torch.randn(c, generator=gen)
    y = torch.randint(0, c, (n * s,), generator=gen)

    def ce(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = h.reshape(n * s, d) @ w.reshape(c, d).T + b
        return torch.nn.functional.cross_entropy(z, y)

    hw, _ = torch.autograd.functional.hessian(ce, (w0.flatten(), b0))[0]
    hb = torch.autograd.functional.hessian(ce, (w0.flatten(), b0))[1][1]
    ggn_w, ggn_b = softmax_head_ggn_diagonal(h, torch.softmax(h @ w0.T + b0, dim=-1))
    torch.testing.assert_close(ggn_w.flatten(), torch.diagonal(hw), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ggn_b, torch.diagonal(hb), rtol=1e-5, atol=1e-6)


def test_stationary_logvar_by_hand() -> None:
    # prior variance 1/4 (precision 4), n = 10, kappa = 0.5, mean GGN 0.1: precision 4 + 20 * 0.1 = 6
    lv = stationary_logvar(torch.tensor([math.log(0.25)]), torch.tensor([0.1]), 10, 0.5)
    assert float(lv) == pytest.approx(-math.log(6.0), rel=1e-6)
    with pytest.raises(ConfigError, match="positive KL weight"):
        stationary_logvar(torch.zeros(1), torch.zeros(1), 10, 0.0)


def test_the_learners_free_energy_is_stationary_in_the_head_variances_at_the_closed_form() -> None:
    """Checks the scaling ``n / kappa`` against ``free_energy`` itself (its reparameterized gradient)."""
    kappa = 0.01
    learner = _learner(layers=(HEAD,), init_logvar=-2.0, kl_weight=kappa)
    params = learner.init_params()
    t = DATA.train[0]
    x, y = t.support_x, t.support_y
    prior = learner.gaussian(params)
    q = learner.infer(params, x, y, steps=3, generator=torch.Generator().manual_seed(1))  # means moved
    fixed = dict(q)
    noise = learner.net.draw_noise(x.shape[0], 512, generator=torch.Generator().manual_seed(2), device="cpu")
    for _ in range(30):  # fixed-point iteration to the exact stationary point
        fixed = learner.head_variance_step(fixed, prior, x, noise)
    assert all(torch.equal(fixed[n], q[n]) for n in learner.net.mean_names)  # means untouched
    names = [logvar_name(f"{HEAD}.weight"), logvar_name(f"{HEAD}.bias")]
    check = learner.net.draw_noise(x.shape[0], 4096, generator=torch.Generator().manual_seed(3), device="cpu")

    def grad_norm(at: dict[str, torch.Tensor]) -> float:
        at = {n: v.detach().requires_grad_(n in names) for n, v in at.items()}
        g = torch.autograd.grad(learner.free_energy(at, prior, x, y, check, weight=kappa), [at[n] for n in names])
        return float(torch.sqrt(sum((gi ** 2).sum() for gi in g)))

    at_fixed, at_prior_var = grad_norm(fixed), grad_norm(q)
    assert at_prior_var > 0
    assert at_fixed < 0.05 * at_prior_var
    # the same step without the factor n (precision_p + E[mean GGN] / kappa) is far from stationary
    data_precision = {nm: torch.exp(-fixed[nm]) - torch.exp(-prior[nm]) for nm in names}
    wrong = {**fixed, **{nm: -torch.log(torch.exp(-prior[nm]) + data_precision[nm] / x.shape[0]) for nm in names}}
    assert grad_norm(wrong) > 5 * at_fixed


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), extra=st.integers(1, 8), seed=st.integers(0, 2**16), kappa=st.floats(1e-3, 1.0))
def test_the_head_variance_shrinks_as_support_evidence_grows(n: int, extra: int, seed: int, kappa: float) -> None:
    learner = _learner(kl_weight=kappa, head_variance_step=True)
    params = learner.init_params()
    prior = learner.gaussian(params)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + extra, DATA.train[0].support_x.shape[1], generator=gen)
    noise = learner.net.draw_noise(n + extra, 4, generator=gen, device="cpu")
    few = learner.head_variance_step(prior, prior, x[:n], [e[:n] for e in noise])
    more = learner.head_variance_step(prior, prior, x, noise)
    for name in (logvar_name(f"{HEAD}.weight"), logvar_name(f"{HEAD}.bias")):
        assert bool((more[name] <= few[name] + 1e-6).all())  # never wider with more evidence
        assert bool((few[name] <= prior[name] + 1e-6).all())  # never wider than the prior
    assert float((few[logvar_name(f"{HEAD}.bias")] - more[logvar_name(f"{HEAD}.bias")]).max()) > 0


def test_adapted_head_variances_respond_to_the_support_set_and_others_keep_the_prior() -> None:
    plain, stepped = _learner(), _learner(head_variance_step=True)
    params = plain.init_params()
    prior = plain.gaussian(params)
    lv = logvar_name(f"{HEAD}.weight")
    posts = []
    for t in DATA.train:
        q0 = plain.gaussian(plain.adapt(params, t.support_x, t.support_y, t.kind))
        q1 = stepped.gaussian(stepped.adapt(params, t.support_x, t.support_y, t.kind))
        assert float((q0[lv] - prior[lv]).abs().max()) < 1e-2  # gradient steps barely move it
        assert float((q1[lv] - prior[lv]).min()) < -0.05  # the step does
        assert bool((q1[lv] <= prior[lv] + 1e-6).all())
        assert torch.equal(q1[logvar_name("layers.0.weight")], q0[logvar_name("layers.0.weight")])
        posts.append(q1[lv])
    assert float((posts[0] - posts[1]).abs().max()) > 1e-3  # a different client, a different variance


@pytest.mark.parametrize("cls", [BayesMetaSGD, BayesMAML])
def test_meta_gradient_flows_through_the_variance_step(cls) -> None:  # type: ignore[no-untyped-def]
    learner = _learner(cls, head_variance_step=True)
    params = learner.init_params()
    upd, metrics = learner.update(params, DATA.train[1])
    assert set(upd) == set(params)
    assert all(bool(torch.isfinite(u).all()) for u in upd.values())
    assert float(upd[logvar_name(f"{HEAD}.weight")].abs().sum()) > 0  # the prior's head variance is meta-learned
    assert math.isfinite(next(iter(metrics.values())))
    probs = torch.softmax(learner.forward({**params, **learner.adapt(params, DATA.train[0].support_x,
                                                                       DATA.train[0].support_y, "classification")},
                                          DATA.train[0].query_x), dim=-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))


def test_bad_variance_step_configs_are_refused_before_work() -> None:
    with pytest.raises(ConfigError, match="positive KL weight"):
        BayesConfig(kl_weight=0.0, head_variance_step=True)
    BayesConfig(kl_weight=0.0, head_variance_step=True, head_variance_weight=0.01)  # its own kappa is enough
    with pytest.raises(ConfigError, match="head_variance_weight"):
        BayesConfig(head_variance_weight=-1.0)
    with pytest.raises(ConfigError, match="head_variance_samples"):
        BayesConfig(head_variance_samples=0)
    with pytest.raises(ConfigError, match="Gaussian output layer"):
        _learner(layers=("layers.0",), head_variance_step=True)
    with pytest.raises(ConfigError, match="pfedbayes"):
        PFedBayes(make_model(DATA, hidden=(16, 16)), CFG, bayes=BayesConfig(logvar_unit=1.0, head_variance_step=True))
    with pytest.raises(ConfigError, match="agree"):
        softmax_head_ggn_diagonal(torch.zeros(2, 3, 4), torch.zeros(2, 2, 5))
