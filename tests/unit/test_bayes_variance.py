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
    mlp_ggn_diagonal,
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
ALL = ("layers.0", "layers.2", "layers.4")


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


@pytest.mark.parametrize("act", [torch.nn.ReLU(), torch.nn.Tanh()])
def test_mlp_ggn_diagonal_equals_autograd_ggn_of_a_tiny_model(act: torch.nn.Module) -> None:
    """Every layer's diagonal against ``diag(mean_i J_i^T Lambda_i J_i)``, ``J_i`` from ``jacrev``."""
    gen = torch.Generator().manual_seed(0)
    n, dims = 5, (4, 3, 3, 3)
    x = torch.randn(n, dims[0], generator=gen)
    shapes = [(dims[i + 1], dims[i]) for i in range(3)]
    ws = [torch.randn(*sh, generator=gen) for sh in shapes]
    bs = [torch.randn(sh[0], generator=gen) for sh in shapes]
    flat = torch.cat([t.flatten() for pair in zip(ws, bs) for t in pair])
    sizes = [t.numel() for pair in zip(ws, bs) for t in pair]

    def logits(theta: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        h = xi
        for k in range(3):
            h = parts[2 * k].reshape(shapes[k]) @ h + parts[2 * k + 1]
            if k < 2:
                h = act(h)
        return h

    ggn = torch.zeros(flat.numel(), flat.numel())
    for i in range(n):
        jac = torch.func.jacrev(logits)(flat, x[i])  # [C, P]
        p = torch.softmax(logits(flat, x[i]), dim=-1)
        ggn += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac / n
    expected = torch.split(torch.diagonal(ggn), sizes)
    got = mlp_ggn_diagonal(x, [w.unsqueeze(0) for w in ws], [b.unsqueeze(0) for b in bs], [act, act, None])
    for k, (gw, gb) in enumerate(got):
        torch.testing.assert_close(gw.flatten(), expected[2 * k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gb, expected[2 * k + 1], rtol=1e-4, atol=1e-6)
    # S samples of the weights: the mean of the per-sample GGNs
    w2 = [torch.stack([w, 2 * w]) for w in ws]
    b2 = [torch.stack([b, b]) for b in bs]
    two = mlp_ggn_diagonal(x, w2, b2, [act, act, None])
    doubled = mlp_ggn_diagonal(x, [w[1:] for w in w2], [b[1:] for b in b2], [act, act, None])
    for (gw, gb), (ow, ob), (dw, db) in zip(two, got, doubled):
        torch.testing.assert_close(gw, (ow + dw) / 2)
        torch.testing.assert_close(gb, (ob + db) / 2)


def test_the_head_row_of_mlp_ggn_diagonal_is_the_softmax_head_diagonal() -> None:
    learner = _learner(head_variance_step=True, variance_step_layers=ALL)
    q = learner.gaussian(learner.init_params())
    x = DATA.train[0].support_x
    w = {n: q[n].unsqueeze(0) for n in learner.net.mean_names}  # the mean network, S = 1
    names = learner.net.linear_layers
    rows = mlp_ggn_diagonal(x, [w[f"{n}.weight"] for n in names], [w[f"{n}.bias"] for n in names],
                            [torch.nn.ReLU(), torch.nn.ReLU(), None])
    h = learner.net.head_inputs(q, x, None)
    ref_w, ref_b = softmax_head_ggn_diagonal(h, torch.softmax(learner.net.logits(q, x, None), dim=-1))
    torch.testing.assert_close(rows[-1][0], ref_w, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(rows[-1][1], ref_b, rtol=1e-4, atol=1e-7)


def test_the_free_energy_is_nearly_stationary_in_every_layer_variance_at_the_ggn_fixed_point() -> None:
    """Every layer's log-variance gradient of ``free_energy`` at the GGN fixed point vs at the prior's variances.

    The head's is stationary up to Monte Carlo error; the hidden layers' only up to the GGN's
    approximation (a ReLU network's kinks), so the bound there is looser and measured.
    """
    kappa = 0.01
    learner = _learner(init_logvar=-2.0, kl_weight=kappa, head_variance_step=True, variance_step_layers=ALL)
    params = learner.init_params()
    t = DATA.train[0]
    x, y = t.support_x, t.support_y
    prior = learner.gaussian(params)
    plain = _learner(init_logvar=-2.0, kl_weight=kappa)
    q = plain.infer(params, x, y, steps=3, generator=torch.Generator().manual_seed(1))  # means moved
    fixed = dict(q)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        fixed = learner.layer_variance_step(fixed, prior, x, learner.draw_weights(fixed, 256, generator=gen))
    assert all(torch.equal(fixed[n], q[n]) for n in learner.net.mean_names)
    check = learner.net.draw_noise(x.shape[0], 4096, generator=torch.Generator().manual_seed(3), device="cpu")

    def grad_norm(at: dict[str, torch.Tensor], layer: str) -> float:
        names = [logvar_name(f"{layer}.weight"), logvar_name(f"{layer}.bias")]
        at = {n: v.detach().requires_grad_(n in names) for n, v in at.items()}
        g = torch.autograd.grad(learner.free_energy(at, prior, x, y, check, weight=kappa), [at[n] for n in names])
        return float(torch.sqrt(sum((gi ** 2).sum() for gi in g)))

    ratios = {layer: grad_norm(fixed, layer) / grad_norm(q, layer) for layer in ALL}
    assert ratios[HEAD] < 0.05
    assert ratios["layers.2"] < 0.15 and ratios["layers.0"] < 0.15, ratios  # measured 0.05 and 0.055
    for layer in ALL:
        assert bool((fixed[logvar_name(f"{layer}.weight")] <= prior[logvar_name(f"{layer}.weight")] + 1e-6).all())


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 10), extra=st.integers(1, 8), seed=st.integers(0, 2**16), kappa=st.floats(1e-3, 1.0))
def test_every_layer_variance_shrinks_as_support_evidence_grows(n: int, extra: int, seed: int, kappa: float) -> None:
    learner = _learner(kl_weight=kappa, head_variance_step=True, variance_step_layers=ALL)
    prior = learner.gaussian(learner.init_params())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + extra, DATA.train[0].support_x.shape[1], generator=gen)
    weights = learner.draw_weights(prior, 3, generator=gen)  # the same weight samples for both sets
    few = learner.layer_variance_step(prior, prior, x[:n], weights)
    more = learner.layer_variance_step(prior, prior, x, weights)
    for layer in ALL:
        for part in ("weight", "bias"):
            name = logvar_name(f"{layer}.{part}")
            assert bool((few[name] <= prior[name] + 1e-6).all())
            # mean GGN over n examples times n = the sum: adding examples never lowers a precision
            assert bool((more[name] <= few[name] + 1e-5).all())


def test_variance_step_layers_in_local_inference_and_the_meta_gradient() -> None:
    learner = _learner(head_variance_step=True, variance_step_layers=ALL)
    params = learner.init_params()
    prior = learner.gaussian(params)
    t = DATA.train[0]
    q = learner.gaussian(learner.adapt(params, t.support_x, t.support_y, t.kind))
    for layer in ALL:
        lv = logvar_name(f"{layer}.weight")
        assert float((q[lv] - prior[lv]).min()) < -5e-3, layer  # the support set narrows every layer
    head_only = _learner(head_variance_step=True, variance_step_layers=(HEAD,))
    q1 = head_only.gaussian(head_only.adapt(params, t.support_x, t.support_y, t.kind))
    first = logvar_name("layers.0.weight")
    assert float((q1[first] - prior[first]).min()) > 0.5 * float((q[first] - prior[first]).min())
    upd, metrics = learner.update(params, DATA.train[1])
    assert all(bool(torch.isfinite(u).all()) for u in upd.values())
    assert float(upd[logvar_name("layers.0.weight")].abs().sum()) > 0
    assert math.isfinite(next(iter(metrics.values())))


def test_bad_variance_step_layers_are_refused_before_work() -> None:
    with pytest.raises(ConfigError, match="needs head_variance_step"):
        BayesConfig(variance_step_layers=ALL)
    with pytest.raises(ConfigError, match="distinct"):
        BayesConfig(head_variance_step=True, variance_step_layers=())
    with pytest.raises(ConfigError, match="not Gaussian layers"):
        _learner(layers=(HEAD,), head_variance_step=True, variance_step_layers=("layers.0",))
    with pytest.raises(ConfigError, match="last layer"):
        mlp_ggn_diagonal(torch.zeros(2, 3), [torch.zeros(1, 2, 3)], [torch.zeros(1, 2)], [torch.nn.ReLU()])
    with pytest.raises(ConfigError, match="matching the input width"):
        mlp_ggn_diagonal(torch.zeros(2, 3), [torch.zeros(1, 2, 4)], [torch.zeros(1, 2)], [None])
