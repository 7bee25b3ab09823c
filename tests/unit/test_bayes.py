"""Bayesian personalization: KL, predictive, local inference, baselines, registry and errors."""

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
    MetaSGDTemperature,
    PFedBayes,
    fit_temperature,
    kl_diagonal,
    kl_params,
    logvar_name,
)
from securefml.data import make_digits_fewshot, make_sine
from securefml.errors import ConfigError
from securefml.meta import ALPHA_PREFIX, LEARNERS, MetaConfig, MetaSGD
from securefml.models import make_model
from securefml.personalize import personalize

DATA = make_digits_fewshot(n_train=3, n_heldout=3, k_shot=3, query=4, seed=0)
CFG = MetaConfig(inner_steps=2, inner_lr=0.1, outer_lr=1.0)


def _learner(cls=BayesMetaSGD, **bayes):  # type: ignore[no-untyped-def]
    return cls(make_model(DATA, hidden=(16, 16)), CFG, bayes=BayesConfig(**bayes))


# -- KL -------------------------------------------------------------------------------------------
def test_kl_matches_closed_form_hand_example() -> None:
    # KL(N(1, e^0) || N(0, e^{log 4})) = 0.5 * (log 4 - 0 + (1 + 1) / 4 - 1) = 0.5 * log 4 - 0.25
    kl = kl_diagonal(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([math.log(4.0)]))
    assert float(kl) == pytest.approx(0.5 * math.log(4.0) - 0.25)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3), st.floats(-4, 2), st.floats(-3, 3), st.floats(-4, 2)),
                min_size=1, max_size=8))
def test_kl_equals_torch_distributions_closed_form(rows: list[tuple[float, float, float, float]]) -> None:
    mq, lq, mp, lp = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, torch.exp(lq / 2)),
                                            torch.distributions.Normal(mp, torch.exp(lp / 2))).sum()
    assert float(kl_diagonal(mq, lq, mp, lp)) == pytest.approx(float(ref), rel=1e-9, abs=1e-9)
    assert float(kl_diagonal(mq, lq, mq, lq)) == pytest.approx(0.0, abs=1e-12)


def test_kl_matches_monte_carlo_estimate() -> None:
    g = torch.Generator().manual_seed(0)
    mq, lq, mp, lp = torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(-0.2), torch.tensor(0.5)
    w = mq + torch.exp(lq / 2) * torch.randn(400_000, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mq.double(), torch.exp(lq / 2).double())
    p = torch.distributions.Normal(mp.double(), torch.exp(lp / 2).double())
    mc = float((q.log_prob(w) - p.log_prob(w)).mean())
    assert float(kl_diagonal(mq, lq, mp, lp)) == pytest.approx(mc, abs=5e-3)


def test_kl_of_learner_prior_to_itself_is_zero_and_grows_away_from_it() -> None:
    learner = _learner()
    prior = learner.gaussian(learner.init_params())
    names = learner.net.gaussian_names
    assert float(kl_params(prior, prior, names)) == 0.0
    moved = {**prior, names[0]: prior[names[0]] + 0.1}
    expected = 0.5 * prior[names[0]].numel() * 0.01 / math.exp(learner.bayes.init_logvar)
    assert float(kl_params(moved, prior, names)) == pytest.approx(expected, rel=1e-4)


# -- predictive -----------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 20.0), logvar=st.floats(-12.0, 1.0),
       perm_seed=st.integers(0, 1000))
def test_predictive_sums_to_one_and_is_invariant_to_sample_order(seed: int, scale: float, logvar: float,
                                                                 perm_seed: int) -> None:
    learner = _learner(init_logvar=logvar, eval_samples=8, seed=seed)
    params = {n: (p * scale if not n.startswith("logvar.") else p) for n, p in learner.init_params().items()}
    x = DATA.heldout[0].query_x
    per_sample = learner.sample_probabilities(params, x)  # [n, S, C], noise seeded by ``seed``
    assert per_sample.shape == (x.shape[0], 8, DATA.n_classes)
    assert torch.allclose(per_sample.sum(-1), torch.ones(x.shape[0], 8), atol=1e-5)
    predictive = torch.softmax(learner.forward(params, x), dim=1)
    assert torch.allclose(predictive.sum(1), torch.ones(x.shape[0]), atol=1e-5)
    assert bool((predictive >= 0).all())
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(perm_seed))
    assert torch.allclose(per_sample[:, perm].mean(1), predictive, atol=1e-5)
    assert torch.allclose(per_sample.mean(1), predictive, atol=1e-5)
    # the same seed gives the same prediction on every call
    assert torch.equal(learner.forward(params, x), learner.forward(params, x))


def test_zero_variance_predictive_is_the_mean_network() -> None:
    learner = _learner(init_logvar=-16.0)
    params = learner.init_params()
    x = DATA.train[0].query_x
    det = torch.softmax(learner.net.logits(learner.model_params(params), x, None)[:, 0], dim=1)
    assert torch.allclose(torch.softmax(learner.forward(params, x), 1), det, atol=1e-3)


def test_monte_carlo_averaging_is_less_confident_than_one_sample() -> None:
    learner = _learner(init_logvar=0.0)
    params = learner.init_params()
    x = DATA.train[0].query_x
    one = learner.sample_probabilities(params, x, samples=1)[:, 0]
    many = torch.softmax(learner.forward(params, x), 1)
    entropy = lambda p: float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())  # noqa: E731
    assert entropy(many) > entropy(one)


# -- parameters, local inference and meta-update --------------------------------------------------
def test_prior_parameters_and_layers() -> None:
    learner = _learner()
    params = learner.init_params()
    linears = ["layers.0", "layers.2", "layers.4"]
    assert learner.net.bayesian_layers == tuple(linears)
    for layer in linears:
        for kind in ("weight", "bias"):
            n = f"{layer}.{kind}"
            assert params[logvar_name(n)].shape == params[n].shape
            assert params[ALPHA_PREFIX + n].shape == params[n].shape
            assert params[ALPHA_PREFIX + logvar_name(n)].shape == params[n].shape
    only_head = _learner(layers=("layers.4",))
    assert {n for n in only_head.init_params() if n.startswith("logvar.")} == {"logvar.layers.4.weight",
                                                                              "logvar.layers.4.bias"}
    with pytest.raises(ConfigError, match="layers.1"):
        _learner(layers=("layers.1",))


def test_local_inference_starts_at_the_prior_and_fits_the_support_set() -> None:
    learner = _learner()
    params = learner.init_params()
    t = DATA.train[0]
    assert all(torch.equal(v, params[n]) for n, v in learner.adapt(params, t.support_x, t.support_y, t.kind,
                                                                   steps=0).items())
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    noise = learner.net.draw_noise(t.support_x.shape[0], 16, generator=gen(), device="cpu")
    prior = learner.gaussian(params)
    before = learner.free_energy(prior, prior, t.support_x, t.support_y, noise, weight=learner.bayes.kl_weight)
    q = learner.gaussian(learner.adapt(params, t.support_x, t.support_y, t.kind, steps=4))
    after = learner.free_energy(q, prior, t.support_x, t.support_y, noise, weight=learner.bayes.kl_weight)
    assert float(after) < float(before)
    again = learner.gaussian(learner.adapt(params, t.support_x, t.support_y, t.kind, steps=4))
    assert all(torch.equal(q[n], again[n]) for n in q)  # a deterministic function of data and prior


@pytest.mark.parametrize("cls", [BayesMetaSGD, BayesMAML, PFedBayes])
def test_update_is_finite_moves_means_and_logvars_and_lowers_query_loss(cls) -> None:  # type: ignore[no-untyped-def]
    learner = _learner(cls)
    params = learner.init_params()
    task = DATA.train[1]
    upd, metrics = learner.update(params, task)
    assert set(upd) == set(params)
    assert all(bool(torch.isfinite(u).all()) for u in upd.values())
    assert any(float(upd[n].abs().sum()) > 0 for n in upd if n.startswith("logvar."))
    assert any(float(upd[n].abs().sum()) > 0 for n in upd if not n.startswith(("logvar.", "alpha.")))
    if cls is BayesMetaSGD:
        assert any(float(upd[n].abs().sum()) > 0 for n in upd if n.startswith("alpha.logvar."))
    assert math.isfinite(next(iter(metrics.values())))


def test_meta_gradient_reduces_query_nll() -> None:
    learner = _learner(eval_samples=16)
    params = learner.init_params()
    task = DATA.train[2]
    before = float(learner.query_nll(params, task, 11))
    for _ in range(5):
        new, _ = learner.meta_update(params, task)
        params = {n: params[n] + 0.05 * (new[n] - params[n]) for n in params}
    assert float(learner.query_nll(params, task, 11)) < before


# -- baselines ------------------------------------------------------------------------------------
def test_fit_temperature_recovers_the_scale_of_overconfident_logits() -> None:
    g = torch.Generator().manual_seed(0)
    true = torch.randn(2000, 5, generator=g)
    labels = torch.distributions.Categorical(logits=true).sample()
    assert fit_temperature(true * 3.0, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(true, labels) == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ConfigError):
        fit_temperature(true, labels[:3])


def test_temperature_scaling_keeps_accuracy_and_fits_on_support() -> None:
    model = make_model(DATA, hidden=(16, 16))
    plain, ts = MetaSGD(model, CFG), MetaSGDTemperature(model, CFG)
    params = plain.init_params()
    a = personalize(plain, params, DATA.heldout, steps=2)
    b = personalize(ts, params, DATA.heldout, steps=2)
    assert a.per_client == b.per_client  # argmax unchanged by a positive temperature
    assert a.calibration is not None and b.calibration is not None
    assert b.calibration.pooled["nll"] != a.calibration.pooled["nll"]
    t = DATA.heldout[0]
    adapted = ts.calibrate({**params, **ts.adapt(params, t.support_x, t.support_y, t.kind)}, t.support_x,
                           t.support_y, t.kind)
    assert float(adapted["temperature"]) > 0 and "temperature" not in ts.init_params()


# -- registry, personalization and errors ---------------------------------------------------------
@pytest.mark.parametrize("name", ["bayes-metasgd", "bayes-maml", "pfedbayes", "metasgd-ts", "metasgd-ts-cv"])
def test_registered_and_personalize_reports_calibration(name: str) -> None:
    learner = LEARNERS.create(name, model=make_model(DATA, hidden=(16, 16)), config=CFG)
    rep = personalize(learner, learner.init_params(), DATA.heldout, steps=2)
    assert rep.calibration is not None and 0 <= rep.mean <= 1
    assert all(v is not None and 0 <= v <= 1 for v in rep.calibration.per_client["ood_auroc"])


def test_regression_is_refused_before_work() -> None:
    sine = make_sine(n_train=2, n_heldout=1, seed=0)
    learner = BayesMetaSGD(make_model(sine), CFG)
    with pytest.raises(ConfigError, match="classification"):
        learner.update(learner.init_params(), sine.train[0])


def test_record_level_dp_is_a_clear_config_error() -> None:
    from securefml.experiment import RunConfig, run_experiment

    cfg = RunConfig(dataset="digits-fewshot", algorithm="bayes-metasgd", rounds=1, clients_per_round=2,
                    dataset_options={"n_train": 3, "n_heldout": 2, "k_shot": 2, "query": 2},
                    privacy={"mode": "record", "noise_multiplier": 1.0, "max_grad_norm": 1.0})
    with pytest.raises(ConfigError, match="user-level DP"):
        run_experiment(cfg)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError):
        BayesConfig(eval_samples=0)
    with pytest.raises(ConfigError):
        BayesConfig(init_logvar=5.0)
    with pytest.raises(ConfigError, match="nn.Sequential"):
        BayesMetaSGD(torch.nn.Linear(3, 2))


def test_log_variances_and_rates_follow_their_layer_in_selection() -> None:
    from securefml.selection import make_selector

    learner = _learner()
    params = learner.init_params()
    layout = learner.layout()  # the roles the learner declares, not the names, tie them
    assert layout.owner("alpha.logvar.layers.4") == "layers.4"
    vec = layout.flatten(params)
    chosen = set(make_selector("named:layers.4").select(layout, torch.zeros_like(vec), vec))
    assert chosen == {"layers.4", "logvar.layers.4", "alpha.layers.4", "alpha.logvar.layers.4"}


def test_cedar_selection_runs_on_the_bayesian_learner() -> None:
    from securefml.experiment import RunConfig, run_experiment

    res = run_experiment(RunConfig(dataset="digits-fewshot", algorithm="bayes-maml", rounds=1, clients_per_round=2,
                                   select="cedar:1", inner_steps=1,
                                   dataset_options={"n_train": 3, "n_heldout": 2, "k_shot": 2, "query": 2}))
    uploaded = res.history[0]["uploaded_layers"]
    # one of the three Linear layers is withheld per client, with its log-variances
    assert sum(uploaded.get(n, 0) for n in ("layers.0", "layers.2", "layers.4")) == 2 * 2
    for n in ("layers.0", "layers.2", "layers.4"):
        assert uploaded.get(n, 0) == uploaded.get("logvar." + n, 0)


# -- the log-variance's units and inner step ------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(unit=st.sampled_from([1.0, 2.0, 8.0, 16.0]), logvar=st.floats(-16.0, 2.0, width=32, allow_subnormal=False))
def test_stored_log_variances_are_scaled_exactly_and_merge_linearly(unit: float, logvar: float) -> None:
    learner = _learner(logvar_unit=unit, init_logvar=logvar)
    params = learner.init_params()
    g = learner.gaussian(params)
    for n in learner.net.gaussian_names:
        assert torch.all(g[logvar_name(n)] == torch.tensor(logvar, dtype=torch.float32))
        assert torch.equal(params[logvar_name(n)] * unit, g[logvar_name(n)])
    back = learner.stored(g)
    assert all(torch.equal(back[n], params[n]) for n in back)
    # a mean of stored values is the stored mean of log-variances: the merge is unchanged by the unit
    a, b = torch.tensor([-7.0, 1.0]), torch.tensor([-3.0, -5.0])
    assert torch.allclose((a / unit + b / unit) / 2 * unit, (a + b) / 2)


def test_newton_step_moves_the_posterior_variance_off_the_prior() -> None:
    t = DATA.train[0]
    moved = {}
    for newton in (False, True):
        learner = _learner(BayesMAML, newton_logvar_step=newton, init_logvar_rate=0.1)
        params = learner.init_params()
        # a prior whose means already fit the task: the likelihood is curved, so the variance should shrink
        for _ in range(30):
            q = learner.gaussian(learner.adapt(params, t.support_x, t.support_y, t.kind, steps=1))
            params = {**params, **{n: q[n] for n in learner.net.mean_names}}
        prior = learner.gaussian(params)
        q = learner.gaussian(learner.adapt(params, t.support_x, t.support_y, t.kind, steps=5))
        moved[newton] = max(float((q[lv] - prior[lv]).abs().mean())
                            for lv in (logvar_name(n) for n in learner.net.gaussian_names))
    assert moved[False] < 1e-3  # the plain gradient step leaves the posterior's variance at the prior's
    assert moved[True] > 100 * moved[False]


def test_log_variance_rates_start_at_init_logvar_rate() -> None:
    learner = _learner(init_logvar_rate=0.7)
    params = learner.init_params()
    for n in learner.net.gaussian_names:
        assert torch.all(params[ALPHA_PREFIX + logvar_name(n)] == 0.7)
        assert torch.all(params[ALPHA_PREFIX + n] == CFG.inner_lr)
    assert torch.all(_learner(BayesMAML, init_logvar_rate=None).rates(params)[logvar_name("layers.0.weight")]
                     == CFG.inner_lr)
    # pFedBayes keeps raw units (its server step moves its own global log-variances, see PFedBayes)
    assert _learner(PFedBayes).bayes.logvar_unit == 8.0 and PFedBayes(make_model(DATA), CFG).bayes.logvar_unit == 1.0
    with pytest.raises(ConfigError):
        BayesConfig(logvar_unit=0.0)
    with pytest.raises(ConfigError):
        BayesConfig(init_logvar_rate=-1.0)


# -- temperature scaling baselines a user could fit ---------------------------------------------------
def test_cross_validated_temperature_is_fitted_on_out_of_fold_support_predictions() -> None:
    from securefml.bayes import MetaSGDTemperatureCV
    from securefml.bayes.learners import _shot_folds

    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    folds = _shot_folds(labels, 3)
    for f in range(3):  # every fold holds one shot of every class
        assert sorted(labels[folds == f].tolist()) == [0, 1, 2]
    model = make_model(DATA, hidden=(16, 16))
    cv, plain = MetaSGDTemperatureCV(model, CFG, folds=3), MetaSGD(model, CFG)
    params = plain.init_params()
    t = DATA.heldout[0]
    adapted = cv.adapt(params, t.support_x, t.support_y, t.kind, steps=2)
    # by hand: adapt on two shots per class, predict the third, fit on the nine out-of-fold logits
    fold = _shot_folds(t.support_y, 3)
    logits, ys = [], []
    for f in range(3):
        part = plain.adapt(params, t.support_x[fold != f], t.support_y[fold != f], t.kind, steps=2)
        logits.append(plain.forward({**params, **part}, t.support_x[fold == f]).detach())
        ys.append(t.support_y[fold == f])
    assert float(adapted["temperature"]) == pytest.approx(fit_temperature(torch.cat(logits), torch.cat(ys)))
    full = plain.adapt(params, t.support_x, t.support_y, t.kind, steps=2)
    for n, w in full.items():  # the final model is adapted on the whole support set
        assert torch.allclose(adapted[n], w)
    rep, base = personalize(cv, params, DATA.heldout, steps=2), personalize(plain, params, DATA.heldout, steps=2)
    assert rep.per_client == base.per_client  # a positive temperature keeps every argmax
    with pytest.raises(ConfigError):
        MetaSGDTemperatureCV(model, CFG, folds=1)
    assert LEARNERS.create("metasgd-ts-cv", model=model, config=CFG).name == "metasgd-ts-cv"


def test_fixed_temperature_divides_the_personalized_logits() -> None:
    from securefml.bayes import MetaSGDFixedTemperature
    from securefml.personalize import personalized_probabilities

    model = make_model(DATA, hidden=(16, 16))
    plain, fixed = MetaSGD(model, CFG), MetaSGDFixedTemperature(model, CFG, temperature=2.0)
    params = plain.init_params()
    t = DATA.heldout[0]
    full = {**params, **plain.adapt(params, t.support_x, t.support_y, t.kind, steps=2)}
    expected = torch.softmax(plain.forward(full, t.query_x).detach().double() / 2.0, dim=1)
    assert torch.allclose(personalized_probabilities(fixed, params, t, steps=2), expected, atol=1e-6)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError):
            MetaSGDFixedTemperature(model, CFG, temperature=bad)


def test_predictive_variance_scale_tempers_predictions_only() -> None:
    from dataclasses import replace

    learner = _learner()
    params = learner.init_params()
    t = DATA.heldout[0]
    sharp = _learner(predictive_var_scale=0.0)
    wide = _learner(predictive_var_scale=4.0)
    # scale 0 predicts with the mean network; local inference is the same whatever the scale
    mean_net = torch.log_softmax(learner.net.logits(learner.gaussian(params), t.query_x, None)[:, 0], dim=-1)
    assert torch.allclose(sharp.forward(params, t.query_x), mean_net, atol=1e-5)
    for n, v in learner.adapt(params, t.support_x, t.support_y, t.kind).items():
        assert torch.equal(v, wide.adapt(params, t.support_x, t.support_y, t.kind)[n])
    # scale 4 doubles the noise's standard deviation: the same draws, twice as far from the mean
    gen = torch.Generator().manual_seed(learner.bayes.seed)
    noise = [2 * e for e in learner.net.draw_noise(t.query_x.shape[0], learner.bayes.eval_samples, generator=gen,
                                                   device="cpu")]
    assert torch.allclose(wide.forward(params, t.query_x),
                          learner.net.log_predictive(learner.gaussian(params), t.query_x, noise), atol=1e-6)
    with pytest.raises(ConfigError):
        replace(learner.bayes, predictive_var_scale=-1.0)


def test_cross_validated_temperature_runs_from_the_run_config() -> None:
    from securefml.experiment import RunConfig, run_experiment

    cfg = RunConfig(dataset="digits-fewshot", algorithm="metasgd-ts-cv", rounds=1, clients_per_round=2,
                    dataset_options={"n_train": 4, "n_heldout": 2, "k_shot": 3, "query": 4})
    assert cfg.resolved("classification")["inner_lr"] == RunConfig(algorithm="metasgd-ts").resolved(
        "classification")["inner_lr"]
    res = run_experiment(cfg)
    assert 0 <= res.metrics["personalized"]["accuracy"] <= 1 and res.metrics["personalized"]["ece"] is not None


# -- log-scale rates of the log-variances; a shipped temperature ------------------------------------
def test_log_scale_logvar_rates_start_at_the_same_rate_and_travel_as_their_layer() -> None:
    from securefml.bayes import LOGRATE_MAX, LOGRATE_MIN

    plain, logr = _learner(), _learner(log_logvar_rates=True)
    p_plain, p_log = plain.init_params(), logr.init_params()
    # same names and shapes (what travels through LayerLayout is unchanged), same initial rates in natural units
    assert {n: v.shape for n, v in p_plain.items()} == {n: v.shape for n, v in p_log.items()}
    assert plain.layout().numel == logr.layout().numel and plain.layout().layer_names == logr.layout().layer_names
    for n, r in logr.rates(p_log).items():
        assert torch.allclose(r, plain.rates(p_plain)[n], rtol=1e-6)
    lv = logvar_name("layers.0.weight")
    assert torch.allclose(p_log[ALPHA_PREFIX + lv], torch.full_like(p_log[ALPHA_PREFIX + lv], math.log(0.1) / 8.0))
    # the same initial rates: the first local inference is the same posterior
    t = DATA.train[0]
    a, b = plain.adapt(p_plain, t.support_x, t.support_y, t.kind), logr.adapt(p_log, t.support_x, t.support_y, t.kind)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    # one server-sized step on the stored log-rate multiplies the rate, it does not add to it
    bumped = {**p_log, ALPHA_PREFIX + lv: p_log[ALPHA_PREFIX + lv] + 0.005}
    assert torch.allclose(logr.rates(bumped)[lv], 0.1 * torch.exp(torch.tensor(0.04)).expand_as(bumped[lv]), rtol=1e-5)
    # the means' rates are Meta-SGD's, stored as themselves
    assert torch.equal(logr.rates(p_log)["layers.0.weight"], p_log[ALPHA_PREFIX + "layers.0.weight"])
    assert math.exp(LOGRATE_MIN) < 1e-5 and math.exp(LOGRATE_MAX) > 1e4
    for cls in (BayesMAML, PFedBayes):  # no learned rates to put on a log scale: refused, naming the learner
        with pytest.raises(ConfigError, match=cls.name):
            _learner(cls, log_logvar_rates=True)


@settings(max_examples=25, deadline=None)
@given(st.floats(min_value=-1e30, max_value=1e30, allow_nan=False))
def test_no_finite_stored_log_rate_gives_a_non_finite_rate_or_posterior(value: float) -> None:
    # an adversary (a Byzantine upload, a diverged server step) sets every stored log-rate to any finite value
    learner = _learner(log_logvar_rates=True)
    params = learner.init_params()
    params = {n: (torch.full_like(v, value) if n.startswith(ALPHA_PREFIX + "logvar.") else v)
              for n, v in params.items()}
    for n, r in learner.rates(params).items():
        assert bool(torch.isfinite(r).all())
        if n.startswith("logvar."):
            assert bool((r > 0).all())
    t = DATA.train[0]
    q = learner.adapt(params, t.support_x, t.support_y, t.kind)
    assert all(bool(torch.isfinite(v).all()) for v in q.values())
    probs = torch.softmax(learner.forward({**params, **q}, t.query_x), dim=-1)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-5)


def test_log_scale_rates_let_the_meta_gradient_grow_the_logvar_rate_multiplicatively() -> None:
    # meta-gradient on the stored log-rate is rate * d/d(rate) * unit: the same sign as the plain
    # rate's, so a meta-step moves the rate the way the plain parameterization would, by a factor
    plain, logr = _learner(), _learner(log_logvar_rates=True)
    task = DATA.train[0]
    lv = ALPHA_PREFIX + logvar_name("layers.4.weight")
    from torch.func import grad

    g_plain = grad(lambda p: plain.query_nll(p, task, seed=3))(plain.init_params())[lv]
    g_log = grad(lambda p: logr.query_nll(p, task, seed=3))(logr.init_params())[lv]
    assert torch.allclose(g_log, g_plain * 0.1 * 8.0, rtol=1e-3, atol=1e-9)
    assert float(g_plain.abs().max()) > 0


def test_shipped_temperature_divides_the_log_predictive_and_keeps_the_argmax() -> None:
    learner, hot = _learner(), _learner(temperature=2.0)
    params = learner.init_params()
    t = DATA.heldout[0]
    q = {**params, **learner.adapt(params, t.support_x, t.support_y, t.kind)}
    base = learner.forward(q, t.query_x)
    assert torch.allclose(hot.forward(q, t.query_x), base / 2.0)
    probs = torch.softmax(hot.forward(q, t.query_x), dim=-1)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]), atol=1e-6)
    assert torch.equal(probs.argmax(-1), base.argmax(-1))
    # local inference never sees it
    assert all(torch.equal(v, hot.adapt(params, t.support_x, t.support_y, t.kind)[n])
               for n, v in learner.adapt(params, t.support_x, t.support_y, t.kind).items())
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="temperature"):
            BayesConfig(temperature=bad)
