"""A per-client temperature under a prior the federation fits (``securefml.bayes.temperature_prior``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.bayes import (
    TEMPERATURE_KEY,
    BayesConfig,
    BayesMetaSGD,
    MetaSGDTemperatureCV,
    TemperaturePrior,
    fit_temperature,
    fit_temperature_prior,
    out_of_fold_logits,
    temperature_log_likelihood,
)
from securefml.bayes.temperature import TEMPERATURE_GRID
from securefml.data import make_digits_fewshot
from securefml.errors import ConfigError
from securefml.meta import MetaConfig
from securefml.models import make_model

DATA = make_digits_fewshot(n_train=3, n_heldout=3, k_shot=3, query=4, seed=0)
CFG = MetaConfig(inner_steps=2, inner_lr=0.1, outer_lr=1.0)


def _draw(t: float, n: int, gen: torch.Generator, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from ``softmax(logits / t)``: data whose true temperature is ``t``."""
    z = 3 * torch.randn(n, classes, generator=gen, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / t, dim=-1), 1, generator=gen).squeeze(1)
    return z, y


def test_likelihood_by_hand() -> None:
    z, y = torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    ll = temperature_log_likelihood(z, y, grid=torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(ll, torch.tensor([-math.log(1 + math.e ** 2), -math.log(1 + math.e)],
                                                dtype=torch.float64))


def test_narrow_and_wide_priors_are_the_two_limits() -> None:
    gen = torch.Generator().manual_seed(0)
    narrow = TemperaturePrior(log_t0=math.log(0.7), tau=0.02)  # a support set's worth of evidence barely moves it
    assert narrow.posterior_log_temperature(*_draw(2.0, 25, gen)) == pytest.approx(math.log(0.7), abs=0.05)
    z, y = _draw(2.0, 2000, gen)
    wide = TemperaturePrior(log_t0=0.0, tau=1e3)  # the cross-validated maximum likelihood, as the evidence grows
    assert wide.posterior_log_temperature(z, y) == pytest.approx(math.log(fit_temperature(z, y)), abs=0.03)
    assert wide.temperature(z, y) == pytest.approx(2.0, rel=0.1)
    assert narrow.posterior_log_temperature(None, None) == pytest.approx(math.log(0.7), abs=1e-6)  # the prior's mean


def test_the_fitted_prior_recovers_the_level_and_spread_that_generated_the_data() -> None:
    gen = torch.Generator().manual_seed(1)
    m, tau = math.log(1.5), 0.3
    temps = torch.exp(m + tau * torch.randn(60, generator=gen, dtype=torch.float64))
    prior = fit_temperature_prior([_draw(float(t), 150, gen) for t in temps])
    assert prior.log_t0 == pytest.approx(m, abs=0.1)
    assert 0.15 <= prior.tau <= 0.5


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(0, 30), log_t0=st.floats(-2.0, 2.0), tau=st.floats(0.05, 5.0),
       scale=st.floats(0.1, 20.0))
def test_a_confidently_wrong_prediction_never_lowers_the_temperature(seed: int, n: int, log_t0: float, tau: float,
                                                                     scale: float) -> None:
    """Adversarial evidence: an extra example labelled with its *least* likely class (any logits, any prior).

    Its likelihood rises with ``T`` (``d log p_y / dT = (E_p z - z_y) / T^2 >= 0`` when ``z_y`` is the
    smallest logit), so the posterior moves up in likelihood-ratio order and its mean cannot fall.
    """
    gen = torch.Generator().manual_seed(seed)
    prior = TemperaturePrior(log_t0=log_t0, tau=tau)
    z = scale * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=gen)
    extra = scale * torch.randn(1, 4, generator=gen, dtype=torch.float64)
    worse_z, worse_y = torch.cat([z, extra]), torch.cat([y, extra.argmin(dim=1)])
    before = prior.posterior_log_temperature(z, y)
    assert prior.posterior_log_temperature(worse_z, worse_y) >= before - 1e-9


def test_out_of_fold_logits_hold_each_fold_out() -> None:
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    seen: list[set[float]] = []

    def adapt(xk: torch.Tensor, yk: torch.Tensor):  # type: ignore[no-untyped-def]
        seen.append({float(v) for v in xk.flatten()})
        return lambda xo: torch.stack([xo.flatten(), -xo.flatten()], dim=1)

    logits, labels = out_of_fold_logits(adapt, x, y, folds=5)
    assert logits is not None and labels is not None
    assert logits.shape == (10, 2) and sorted(labels.tolist()) == sorted(y.tolist())
    assert len(seen) == 5 and all(len(s) == 8 for s in seen)  # two held out (one per class) each time
    assert out_of_fold_logits(adapt, x[:1], y[:1], folds=5) == (None, None)


def test_the_bayesian_learner_fits_and_applies_a_client_temperature() -> None:
    net = make_model(DATA, hidden=(16, 16))
    narrow = BayesMetaSGD(net, CFG, bayes=BayesConfig(temperature_prior=TemperaturePrior(math.log(3.0), 1e-3),
                                                      temperature_folds=3))
    plain = BayesMetaSGD(net, CFG)
    params = plain.init_params()
    t = DATA.train[0]
    adapted = narrow.adapt(params, t.support_x, t.support_y, t.kind)
    assert float(adapted[TEMPERATURE_KEY]) == pytest.approx(3.0, rel=0.02)
    logits, labels = narrow.out_of_fold_log_predictive(params, t.support_x, t.support_y)
    assert logits is not None and labels is not None and logits.shape[0] == t.support_x.shape[0]
    base = plain.adapt(params, t.support_x, t.support_y, t.kind)
    assert set(adapted) - set(base) == {TEMPERATURE_KEY}
    assert all(torch.equal(adapted[n], base[n]) for n in base)  # the posterior itself is unchanged
    torch.testing.assert_close(narrow.forward({**params, **adapted}, t.query_x),
                               plain.forward({**params, **base}, t.query_x) / adapted[TEMPERATURE_KEY])
    probs = torch.softmax(narrow.forward({**params, **adapted}, t.query_x), dim=-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))
    assert TEMPERATURE_KEY not in narrow.model_params({**params, **adapted})  # it never travels


def test_metasgd_cv_with_the_prior() -> None:
    net = make_model(DATA, hidden=(16, 16))
    learner = MetaSGDTemperatureCV(net, CFG, folds=3, prior=TemperaturePrior(math.log(0.5), 1e-3))
    params = learner.init_params()
    t = DATA.train[1]
    assert float(learner.adapt(params, t.support_x, t.support_y, t.kind)[TEMPERATURE_KEY]) == \
        pytest.approx(0.5, rel=0.02)
    wide = MetaSGDTemperatureCV(net, CFG, folds=3, prior=TemperaturePrior(0.0, 1e3))
    logits, labels = wide.out_of_fold_logits(params, t.support_x, t.support_y)
    assert logits is not None and labels is not None
    got = float(wide.adapt(params, t.support_x, t.support_y, t.kind)[TEMPERATURE_KEY])
    assert TEMPERATURE_GRID.min() <= got <= TEMPERATURE_GRID.max()


def test_bad_temperature_prior_settings_are_refused_before_work() -> None:
    with pytest.raises(ConfigError, match="tau must be a positive"):
        TemperaturePrior(0.0, 0.0)
    with pytest.raises(ConfigError, match="log_t0 must be finite"):
        TemperaturePrior(math.nan, 1.0)
    with pytest.raises(ConfigError, match="cannot be combined"):
        BayesConfig(temperature_prior=TemperaturePrior(), temperature=2.0)
    with pytest.raises(ConfigError, match="temperature_folds"):
        BayesConfig(temperature_folds=1)
    with pytest.raises(ConfigError, match="at least one client"):
        fit_temperature_prior([])
    with pytest.raises(ConfigError, match="finite logits"):
        temperature_log_likelihood(torch.tensor([[math.inf, 0.0]]), torch.tensor([0]))
    with pytest.raises(ConfigError, match="folds >= 2"):
        out_of_fold_logits(lambda a, b: (lambda c: c), torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), folds=1)
