"""Calibration of the trained Bayesian and deterministic meta-models, measured so a 2x difference shows; prints JSON.

    python benchmarks/bayes_calibration.py --runs-dir results/bayes_runs [--seeds 0 1 2] [--heldout 100]

Why this exists.  ``benchmarks/bayes.py`` scores each learner on 30 held-out clients with 50
query predictions each.  Plain 15-bin ECE on 50 predictions has a floor (the ECE of *exactly
calibrated* predictions with the same confidences) of about 0.054 at these learners' accuracy,
and both Meta-SGD (0.056) and Bayesian Meta-SGD (0.053) sat on it: the comparison could not
resolve the issue's 2x target.  This script re-scores the *same trained models* (the global
vectors ``benchmarks/bayes.py --runs-dir`` keeps) two ways:

* **larger query sets**: new held-out clients drawn from the same held-out image pool (disjoint
  from the training pool for that seed), each with every remaining image of its 5 classes as
  query (about 45 per class, ~225 per client instead of 50), ``--heldout`` clients per seed;
* **a debiased estimator**: the debiased squared calibration error of Kumar, Liang & Ma
  (NeurIPS 2019; ``securefml.calibration.squared_calibration_error``, 15 equal-mass bins),
  averaged over clients and then square-rooted (``l2_ce_debiased``).  Its floor on calibrated
  predictions is ~0 at any query size.

The plain 15-bin ECE is reported beside it (per client and pooled, with each learner's own floor
from ``calibrated_ece_floor`` and ``ece - floor``), and every number gets a 95% interval over
seeds (Student t, ``n - 1`` degrees of freedom).  The bayes/Meta-SGD ratios also get a paired
bootstrap over held-out clients (resampling the same clients for both learners within each seed).

**The target is judged on ``l2_ce_debiased`` per client** (mean of the per-client debiased
squared errors, then the root), decided before the numbers were seen: it is the only estimator
here whose expectation does not depend on the query size, and per client (not pooled) because a
personalized model's calibration is a property of each client's model; pooling can cancel one
client's over-confidence against another's under-confidence.

Learners scored from the kept runs (same seed, same data, same rounds as ``bayes.py``):
``metasgd``, ``bayes-metasgd``, ``pfedbayes``, ``bayes-maml`` (where its run exists), and on the
trained Meta-SGD model three temperature-scaling baselines: ``metasgd-ts`` (fitted on the support
set, as in ``bayes.py``), ``metasgd-ts-cv`` (fitted on cross-validated support predictions, what a
user with only a support set can do without fitting to data the model was adapted on) and
``metasgd-ts-train`` (one temperature fitted by the federation on *training-pool* clients' query
sets after personalization, then shipped).  Choices are never made on held-out query data.

For the Bayesian learners also ``<learner>-tempered`` (the predictive variance scale chosen on
training-pool clients) and ``<learner>-ts-train`` (one temperature on the log of the Monte Carlo
predictive fitted on training-pool clients, ``BayesConfig.temperature``), ``<learner>-varstep``
(the closed-form head variance step of ``securefml.bayes.variance`` applied to the kept model at
scoring time, its KL weight chosen from ``KAPPAS`` on training-pool clients), ``<learner>-varstep-all``
(the same step in every Gaussian layer, ``BayesConfig.variance_step_layers``, exact diagonal GGN,
kappa chosen the same way; the ``checks`` compare its training-pool NLL with the head-only step's,
the only evidence a decision to retrain with it may use); and every retrained
variant of ``benchmarks/bayes_variant.py`` whose kept runs are in ``--runs-dir``
(``bayes-metasgd-<variant>``), with its ratios to Meta-SGD and to bayes-metasgd in ``checks``.

Misfit-tracking variants (issue 16's last round; choices on training-pool clients only):
``<learner>-ebscale`` (the all-layer variance step under a per-client empirical-Bayes scale of the
prior's variances, ``securefml.bayes.hierarchical``; ``(kappa, nu, mode)`` by the training-pool NLL)
and ``<learner>-ts-hier`` / ``metasgd-ts-hier`` (a per-client temperature from out-of-fold support
predictions under a log-normal prior fitted by type-II maximum likelihood on training-pool clients'
support sets, ``securefml.bayes.temperature_prior``); both report the Spearman correlation across
held-out clients of the per-client width or temperature against query accuracy.  They are scored
on the large query sets only.

Also: ``diagnosis`` per Bayesian learner, how far local inference moves the posterior from the
prior (mean |posterior - prior| of means and log-variances, over held-out clients), the prior's
standard deviation per layer, and the spread of the Monte Carlo samples' probabilities.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import bayes_variant
import numpy as np
import torch
from peers import write_report

from securefml.bayes import (
    LOGVAR_PREFIX,
    TEMPERATURE_KEY,
    BayesianLearner,
    MetaSGDFixedTemperature,
    MetaSGDTemperature,
    MetaSGDTemperatureCV,
    TemperaturePrior,
    fit_temperature,
    fit_temperature_prior,
)
from securefml.bayes.temperature_prior import TAU_GRID
from securefml.calibration import calibrated_ece_floor, squared_calibration_error
from securefml.data import load_dataset
from securefml.data.digits import load_digits_tensors, make_digits_fewshot
from securefml.experiment import RunConfig
from securefml.meta import LEARNERS
from securefml.meta.base import MetaConfig
from securefml.models import make_model
from securefml.personalize import personalize, personalized_probabilities

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
#: predictive variance scales tried on training-pool clients (``BayesConfig.predictive_var_scale``)
VAR_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: KL weights of the closed-form head variance step tried on training-pool clients (``head_variance_weight``)
KAPPAS = (1e-7, 1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 1e-2, 0.1, 1.0)
KEYS = ("accuracy", "ece", "ece_floor", "ece_minus_floor", "ece_pooled", "ece_pooled_floor", "ece_adaptive",
        "l2_ce_debiased", "l2_ce_debiased_pooled", "l2_ce_plugin", "nll", "brier", "selective_accuracy",
        "ood_auroc", "mean_confidence")


def max_query(seed: int, *, k_shot: int = 5, heldout_fraction: float = 0.3) -> int:
    """Largest per-class query size ``make_digits_fewshot`` accepts for this seed's held-out pool.

    Repeats its pool split (the first draw of ``default_rng(seed)``); ``make_digits_fewshot``
    itself raises ``ConfigError`` if this is ever too large, so a drift cannot go unnoticed.
    """
    _, y = load_digits_tensors()
    labels = y.numpy()
    perm = np.random.default_rng(seed).permutation(len(labels))
    held = perm[int(len(perm) * (1 - heldout_fraction)):]
    return int(min((labels[held] == c).sum() for c in range(10))) - k_shot


def _build(algorithm: str, data: Any, seed: int, **kwargs: Any) -> Any:
    hp = RunConfig(dataset="digits-fewshot", algorithm="metasgd", seed=seed).resolved(data.kind)
    cfg = MetaConfig(hp["inner_steps"], hp["inner_lr"], hp["outer_lr"], hp["outer_steps"])
    net = make_model(data, seed=seed)
    if algorithm.startswith("bayes-metasgd-"):  # a variant trained by benchmarks/bayes_variant.py
        return bayes_variant.build(algorithm[len("bayes-metasgd-"):], net, cfg), hp["finetune_steps"]
    if algorithm in ("metasgd-ts", "metasgd-ts-cv", "metasgd-ts-fixed"):
        cls = {"metasgd-ts": MetaSGDTemperature, "metasgd-ts-cv": MetaSGDTemperatureCV,
               "metasgd-ts-fixed": MetaSGDFixedTemperature}[algorithm]
        return cls(net, cfg, **kwargs), hp["finetune_steps"]
    return LEARNERS.create(algorithm, model=net, config=cfg), hp["finetune_steps"]


def score(learner: Any, params: Any, tasks: Any, steps: int) -> dict[str, Any]:
    """Every number of the report for one learner on one seed's held-out clients."""
    rep = personalize(learner, params, tasks, steps=steps)
    assert rep.calibration is not None
    cal = rep.calibration
    probs = [personalized_probabilities(learner, params, t, steps=steps) for t in tasks]
    gen = torch.Generator().manual_seed(0)
    floor = statistics.fmean(calibrated_ece_floor(p, draws=50, generator=gen) for p in probs)
    p_all, y_all = torch.cat(probs), torch.cat([t.query_y for t in tasks])
    sq = [float(v) for v in cal.per_client["sq_ce_debiased"] if v is not None]
    plug = [squared_calibration_error(p, t.query_y, debiased=False) for p, t in zip(probs, tasks)]
    out: dict[str, Any] = {
        "accuracy": rep.mean, "ece": cal.mean("ece"), "ece_floor": floor, "ece_adaptive": cal.mean("ece_adaptive"),
        "ece_pooled": cal.pooled["ece"], "ece_pooled_floor": calibrated_ece_floor(p_all, draws=10, generator=gen),
        "sq_ce_debiased": statistics.fmean(sq), "l2_ce_debiased": math.sqrt(max(0.0, statistics.fmean(sq))),
        "l2_ce_debiased_pooled": math.sqrt(max(0.0, squared_calibration_error(p_all, y_all))),
        "l2_ce_plugin": math.sqrt(statistics.fmean(plug)),
        "nll": cal.mean("nll"), "brier": cal.mean("brier"), "selective_accuracy": cal.mean("selective_accuracy"),
        "ood_auroc": cal.mean("ood_auroc"), "mean_confidence": float(p_all.max(1).values.mean()),
        "query_per_client": int(tasks[0].query_x.shape[0]), "clients": len(tasks),
    }
    out["ece_minus_floor"] = out["ece"] - floor
    out["per_client_sq_ce_debiased"] = sq
    return out


def diagnose(learner: BayesianLearner, params: Any, tasks: Any, steps: int) -> dict[str, Any]:
    """How far local inference moves the posterior from the prior, and how wide the prior is."""
    prior = learner.gaussian(params)
    moved_mean: list[float] = []
    moved_lv: list[float] = []
    spread: list[float] = []
    for t in tasks:
        q = learner.gaussian({**params, **learner.adapt(params, t.support_x, t.support_y, t.kind, steps=steps)})
        for n in learner.net.posterior_names():
            d = float((q[n] - prior[n]).abs().mean())
            (moved_lv if n.startswith(LOGVAR_PREFIX) else moved_mean).append(d)
        samples = learner.sample_probabilities(learner.stored(q), t.query_x)
        spread.append(float(samples.std(dim=1).mean()))
    stds = {n[len(LOGVAR_PREFIX):]: float(torch.exp(0.5 * prior[n]).mean())
            for n in learner.net.posterior_names() if n.startswith(LOGVAR_PREFIX)}
    mags = {n: float(prior[n].abs().mean()) for n in learner.net.mean_names if n in stds}
    return {"posterior_minus_prior_mean_absmean": statistics.fmean(moved_mean),
            "posterior_minus_prior_logvar_absmean": statistics.fmean(moved_lv),
            "prior_std_mean_per_layer": stds, "prior_mean_abs_per_layer": mags,
            "mc_probability_std_mean": statistics.fmean(spread)}


def score_algorithm(algorithm: str, run: dict[str, Any], seed: int, big: Any, small: Any,
                    train_val: Any) -> dict[str, Any]:
    """One kept run scored on both settings, with its variants (temperature baselines, tempered posterior)."""
    out: dict[str, Any] = {"big": {}, "small": {}, "diagnosis": None, "chosen": {}}
    started = time.perf_counter()
    learner, steps = _build(algorithm, big, seed)
    params = learner.layout().unflatten(torch.tensor(run["vector"], dtype=torch.float32))
    variants = [(algorithm, learner)]
    if algorithm == "metasgd":
        logp = [torch.log(personalized_probabilities(learner, params, t, steps=steps)) for t in train_val]
        t_train = fit_temperature(torch.cat(logp), torch.cat([t.query_y for t in train_val]))
        out["chosen"]["metasgd-ts-train"] = {"temperature": t_train}
        variants += [("metasgd-ts", _build("metasgd-ts", big, seed)[0]),
                     ("metasgd-ts-cv", _build("metasgd-ts-cv", big, seed)[0]),
                     ("metasgd-ts-train", _build("metasgd-ts-fixed", big, seed, temperature=t_train)[0])]
    if algorithm.startswith("bayes-"):  # the tempered posterior, scale chosen on training clients
        curve = {}
        for scale in VAR_SCALES:
            tempered = type(learner)(learner.model, learner.config,
                                     bayes=replace(learner.bayes, predictive_var_scale=scale))
            rep = personalize(tempered, params, train_val, steps=steps)
            assert rep.calibration is not None
            curve[str(scale)] = rep.calibration.pooled["nll"]
        best = min(VAR_SCALES, key=lambda v: curve[str(v)])
        out["chosen"][f"{algorithm}-tempered"] = {"predictive_var_scale": best, "train_pool_nll": curve}
        variants.append((f"{algorithm}-tempered", type(learner)(
            learner.model, learner.config, bayes=replace(learner.bayes, predictive_var_scale=best))))
    for name, lr in variants:
        out["big"][name] = score(lr, params, big.heldout, steps)
        out["small"][name] = score(lr, params, small.heldout, steps)
        out["small"][name].pop("per_client_sq_ce_debiased")
        if name == algorithm:
            out["small"][name]["kept_run_ece"] = run["metrics"]["ece"]  # reproduction check
        print(f"seed {seed} {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if isinstance(learner, BayesianLearner):
        out["diagnosis"] = diagnose(learner, params, big.heldout, steps)
    out["seconds"] = time.perf_counter() - started
    return out


def score_ts_train(algorithm: str, run: dict[str, Any], seed: int, big: Any, small: Any,
                   train_val: Any) -> dict[str, Any]:
    """A Bayesian learner's predictive with one temperature fitted on *training-pool* clients.

    The Bayesian analogue of ``metasgd-ts-train``: the federation personalizes its own training
    clients, fits one temperature to their pooled query predictions (the log of the Monte Carlo
    predictive, ``fit_temperature``) and ships it in ``BayesConfig.temperature``; held-out
    clients fit nothing.
    """
    started = time.perf_counter()
    learner, steps = _build(algorithm, big, seed)
    params = learner.layout().unflatten(torch.tensor(run["vector"], dtype=torch.float32))
    logp = [torch.log(personalized_probabilities(learner, params, t, steps=steps)) for t in train_val]
    t_train = fit_temperature(torch.cat(logp), torch.cat([t.query_y for t in train_val]))
    tempered = type(learner)(learner.model, learner.config, bayes=replace(learner.bayes, temperature=t_train))
    name = f"{algorithm}-ts-train"
    out: dict[str, Any] = {"big": {name: score(tempered, params, big.heldout, steps)},
                           "small": {name: score(tempered, params, small.heldout, steps)},
                           "diagnosis": None, "chosen": {name: {"temperature": t_train}}}
    out["small"][name].pop("per_client_sq_ce_debiased")
    out["seconds"] = time.perf_counter() - started
    print(f"seed {seed} {name}: {out['seconds']:.0f} s", file=sys.stderr, flush=True)
    return out


def score_varstep(algorithm: str, run: dict[str, Any], seed: int, big: Any, small: Any,
                  train_val: Any, *, layers: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A kept Bayesian model with the closed-form variance step applied at scoring time.

    Local inference as trained, then the output layer's variances (``layers=None``;
    ``<algorithm>-varstep``) or every Gaussian layer's (``layers``: ``BayesConfig.variance_step_layers``,
    exact diagonal GGN; ``<algorithm>-varstep-all``) set to the free energy's stationary point
    (``securefml.bayes.variance``) with the KL weight ``kappa`` of the step chosen from ``KAPPAS``
    by the pooled query NLL of *training-pool* clients after personalization (held-out clients fit
    nothing).  Also how the step's variances respond to each held-out client's support set: per
    layer, the mean over clients of the mean log-variance minus the prior's and its spread across
    clients, and (all-layer step) the Spearman correlation across held-out clients between a
    layer's mean posterior log-variance and the client's query accuracy.
    """
    started = time.perf_counter()
    learner, steps = _build(algorithm, big, seed)
    params = learner.layout().unflatten(torch.tensor(run["vector"], dtype=torch.float32))

    def stepped(kappa: float) -> Any:
        return type(learner)(learner.model, learner.config, bayes=replace(
            learner.bayes, head_variance_step=True, head_variance_weight=kappa, variance_step_layers=layers))

    curve: dict[str, float] = {}
    for kappa in KAPPAS:
        rep = personalize(stepped(kappa), params, train_val, steps=steps)
        assert rep.calibration is not None
        curve[str(kappa)] = rep.calibration.pooled["nll"]
    best = min(KAPPAS, key=lambda k: curve[str(k)])
    chosen = stepped(best)
    name = f"{algorithm}-varstep" if layers is None else f"{algorithm}-varstep-all"
    prior = chosen.gaussian(params)
    watched = [chosen.net.head] if layers is None else list(chosen.net.bayesian_layers)
    moved: dict[str, list[float]] = {f"{layer}.{part}": [] for layer in watched for part in ("weight", "bias")}
    accuracy: list[float] = []
    for t in big.heldout:
        adapted = chosen.adapt(params, t.support_x, t.support_y, t.kind, steps=steps)
        q = chosen.gaussian(adapted)
        for key in moved:
            lv = f"{LOGVAR_PREFIX}{key}"
            moved[key].append(float((q[lv] - prior[lv]).mean()))
        if layers is not None:
            with torch.no_grad():
                pred = chosen.forward({**params, **adapted}, t.query_x).argmax(-1)
            accuracy.append(float((pred == t.query_y).float().mean()))
    if layers is None:
        response: dict[str, Any] = {
            f"head_{part}_logvar_minus_prior": {"mean": statistics.fmean(v), "std_across_clients":
                                                statistics.stdev(v), "min": min(v), "max": max(v)}
            for part, v in ((k.rsplit(".", 1)[1], v) for k, v in moved.items())}
    else:
        response = {f"{key}_logvar_minus_prior": {"mean": statistics.fmean(v), "std_across_clients":
                                                  statistics.stdev(v), "min": min(v), "max": max(v),
                                                  "spearman_vs_query_accuracy": _spearman(v, accuracy)}
                    for key, v in moved.items()}
    out: dict[str, Any] = {"big": {name: score(chosen, params, big.heldout, steps)},
                           "small": {name: score(chosen, params, small.heldout, steps)},
                           "diagnosis": None,
                           "chosen": {name: {"head_variance_weight": best, "train_pool_nll": curve,
                                             "heldout_response": response}}}
    out["small"][name].pop("per_client_sq_ce_debiased")
    out["seconds"] = time.perf_counter() - started
    print(f"seed {seed} {name}: {out['seconds']:.0f} s", file=sys.stderr, flush=True)
    return out


def score_varstep_all(algorithm: str, run: dict[str, Any], seed: int, big: Any, small: Any,
                      train_val: Any) -> dict[str, Any]:
    """``score_varstep`` with the step in every Gaussian layer (``BayesConfig.variance_step_layers``)."""
    learner, _ = _build(algorithm, big, seed)
    return score_varstep(algorithm, run, seed, big, small, train_val, layers=learner.net.bayesian_layers)


#: the empirical-Bayes prior scale's grid (``BayesConfig.prior_scale_strength``): KL weights of the step,
#: hyper-prior strengths nu, and the hyper-prior's mode (1, or the federation's: the geometric mean of the
#: training clients' scales at nu = 1e-3)
EB_KAPPAS = (1e-7, 1e-4, 1e-2)
EB_STRENGTHS = (1.0, 30.0, 1e3, 3e4)
EB_MODES = ("unit", "federation")


def _accuracy(learner: Any, adapted: Any, params: Any, task: Any) -> float:
    with torch.no_grad():
        pred = learner.forward({**params, **adapted}, task.query_x).argmax(-1)
    return float((pred == task.query_y).float().mean())


def score_ebscale(algorithm: str, run: dict[str, Any], seed: int, big: Any, small: Any,
                  train_val: Any, *, fixed: tuple[float, float] | None = None) -> dict[str, Any]:
    """A kept Bayesian model with the all-layer variance step under a per-client empirical-Bayes prior scale.

    ``securefml.bayes.hierarchical``: each held-out client fits, per Gaussian layer, a scale ``s`` of
    the prior's variances by the free energy under an inverse-gamma hyper-prior (strength ``nu``,
    mode 1 or the federation's level), so a support set that pulls the means further than the
    prior expects widens the posterior.  ``(kappa, nu, mode)`` chosen from ``EB_KAPPAS x
    EB_STRENGTHS x EB_MODES`` by the pooled query NLL of *training-pool* clients.  Also the
    misfit correlation: Spearman across held-out clients of each layer's mean posterior
    log-variance (and of its ``log s``) against the client's query accuracy (negative = the
    clients the model fits worst get the widest posteriors).

    ``fixed = (kappa, nu)``: no choice, a diagnostic (``<algorithm>-ebscale-own``: the free energy's
    own KL weight and the weakest hyper-prior, mode 1), to show what the scale does where it is free
    to act, whatever the training-pool NLL says.
    """
    started = time.perf_counter()
    learner, steps = _build(algorithm, big, seed)
    params = learner.layout().unflatten(torch.tensor(run["vector"], dtype=torch.float32))
    layers = learner.net.bayesian_layers

    def make(kappa: float, nu: float, modes: Any = None) -> Any:
        return type(learner)(learner.model, learner.config, bayes=replace(
            learner.bayes, head_variance_step=True, head_variance_weight=kappa, variance_step_layers=layers,
            prior_scale_strength=nu, prior_scale_modes=modes))

    curve: dict[str, float] = {}
    configs: dict[str, tuple[float, float, Any]] = {}
    for kappa in EB_KAPPAS if fixed is None else ():
        pre = make(kappa, 1e-3)
        logs = [pre.prior_log_scales(params, t.support_x, t.support_y, t.kind, steps=steps) for t in train_val]
        federation = tuple((layer, math.exp(statistics.fmean(d[layer] for d in logs))) for layer in layers)
        for nu in EB_STRENGTHS:
            for mode in EB_MODES:
                modes = None if mode == "unit" else federation
                key = f"kappa={kappa} nu={nu} mode={mode}"
                rep = personalize(make(kappa, nu, modes), params, train_val, steps=steps)
                assert rep.calibration is not None
                curve[key] = rep.calibration.pooled["nll"]
                configs[key] = (kappa, nu, modes)
    if fixed is not None:
        best = f"kappa={fixed[0]} nu={fixed[1]} mode=unit (fixed, not chosen)"
        configs[best] = (fixed[0], fixed[1], None)
    else:
        best = min(curve, key=lambda k: curve[k])
    chosen = make(*configs[best])
    name = f"{algorithm}-ebscale" if fixed is None else f"{algorithm}-ebscale-own"
    prior = chosen.gaussian(params)
    moved: dict[str, list[float]] = {layer: [] for layer in layers}
    scales: dict[str, list[float]] = {layer: [] for layer in layers}
    accuracy: list[float] = []
    for t in big.heldout:
        adapted = chosen.adapt(params, t.support_x, t.support_y, t.kind, steps=steps)
        q = chosen.gaussian(adapted)
        log_s = chosen.prior_log_scales(params, t.support_x, t.support_y, t.kind, steps=steps)
        for layer in layers:
            lv = f"{LOGVAR_PREFIX}{layer}.weight"
            moved[layer].append(float((q[lv] - prior[lv]).mean()))
            scales[layer].append(log_s[layer])
        accuracy.append(_accuracy(chosen, adapted, params, t))
    response = {f"{layer}.weight_logvar_minus_prior": {
        "mean": statistics.fmean(moved[layer]), "std_across_clients": statistics.stdev(moved[layer]),
        "min": min(moved[layer]), "max": max(moved[layer]),
        "spearman_vs_query_accuracy": _spearman(moved[layer], accuracy)} for layer in layers}
    response.update({f"{layer}_log_scale": {
        "mean": statistics.fmean(scales[layer]), "std_across_clients": statistics.stdev(scales[layer]),
        "spearman_vs_query_accuracy": _spearman(scales[layer], accuracy)} for layer in layers})
    kappa, nu, modes = configs[best]
    out: dict[str, Any] = {"big": {name: score(chosen, params, big.heldout, steps)}, "small": {},
                           "diagnosis": None,
                           "chosen": {name: {"head_variance_weight": kappa, "prior_scale_strength": nu,
                                             "prior_scale_modes": modes, "chosen": best, "train_pool_nll": curve,
                                             "heldout_response": response}}}
    out["seconds"] = time.perf_counter() - started
    print(f"seed {seed} {name}: {out['seconds']:.0f} s", file=sys.stderr, flush=True)
    return out


def score_ebscale_own(algorithm: str, run: dict[str, Any], seed: int, big: Any, small: Any,
                      train_val: Any) -> dict[str, Any]:
    """``score_ebscale`` at the learner's own KL weight and ``nu`` = 1 (a diagnostic, no choice)."""
    learner, _ = _build(algorithm, big, seed)
    return score_ebscale(algorithm, run, seed, big, small, train_val, fixed=(learner.bayes.kl_weight, 1.0))


def _memo_out_of_fold(learner: Any, attr: str, cache: dict[Any, Any]) -> Any:
    """Cache ``learner.<attr>`` (out-of-fold predictions) per support set in ``cache`` (shared by learners on
    the same model: scoring adapts each client twice, and two priors see the same out-of-fold predictions)."""
    plain = getattr(learner, attr)

    def cached(params: Any, x: torch.Tensor, y: torch.Tensor, *, steps: int | None = None) -> Any:
        key = (x.data_ptr(), tuple(x.shape), steps)
        if key not in cache:
            cache[key] = plain(params, x, y, steps=steps)
        return cache[key]

    setattr(learner, attr, cached)
    return learner


def score_ts_hier(algorithm: str, run: dict[str, Any], seed: int, big: Any, small: Any,
                  train_val: Any) -> dict[str, Any]:
    """A per-client temperature from cross-validated support predictions under a federation prior.

    ``securefml.bayes.temperature_prior``: the federation fits ``log T ~ N(m, tau^2)`` on
    *training-pool* clients; each held-out client's temperature is the posterior mean given its own
    out-of-fold support predictions.  Two ways to fit the prior, both on training clients only:

    * ``<algorithm>-ts-hier``: ``(m, tau)`` by type-II maximum likelihood of the training clients'
      out-of-fold support predictions (``fit_temperature_prior``; their query sets are not used);
    * ``<algorithm>-ts-hier-nll``: for each ``tau`` in ``TAU_GRID``, ``m`` by type-II maximum
      likelihood, and ``tau`` by the pooled query NLL of the training clients after each takes its
      own posterior temperature (the spread that predicts best, not the one the support sets explain best).

    ``metasgd``: ``MetaSGDTemperatureCV(prior=...)``; Bayesian learners: ``BayesConfig.temperature_prior``
    on the Monte Carlo predictive.  Also the misfit correlation (Spearman across held-out clients of
    ``log T`` against query accuracy; negative = the clients the model fits worst get the highest
    temperatures) and how many clients made no out-of-fold mistake.
    """
    started = time.perf_counter()
    learner, steps = _build(algorithm, big, seed)
    params = learner.layout().unflatten(torch.tensor(run["vector"], dtype=torch.float32))
    cache: dict[Any, Any] = {}
    metasgd = algorithm == "metasgd"
    attr = "out_of_fold_logits" if metasgd else "out_of_fold_log_predictive"

    def with_prior(prior: Any) -> Any:
        if metasgd:
            return _memo_out_of_fold(_build("metasgd-ts-cv", big, seed, prior=prior)[0], attr, cache)
        return _memo_out_of_fold(type(learner)(learner.model, learner.config,
                                               bayes=replace(learner.bayes, temperature_prior=prior)), attr, cache)

    probe = with_prior(TemperaturePrior())
    oof = [getattr(probe, attr)(params, t.support_x, t.support_y, steps=steps) for t in train_val]
    evidence = [(z, y) for z, y in oof if z is not None and y is not None]
    # the untempered query predictions of the training clients' final models, for the NLL choice of tau
    base = _build("metasgd", big, seed)[0] if metasgd else learner
    query_logits = []
    for t in train_val:
        adapted = {**params, **base.adapt(params, t.support_x, t.support_y, t.kind, steps=steps)}
        with torch.no_grad():
            query_logits.append(base.forward(adapted, t.query_x).to(torch.float64))
    curve: dict[str, float] = {}
    priors: dict[str, Any] = {}
    for tau in TAU_GRID:
        prior = fit_temperature_prior(evidence, taus=(tau,))
        nll = []
        for (z, y), logits, t in zip(oof, query_logits, train_val):
            temp = prior.temperature(z, y)
            nll.append(torch.nn.functional.cross_entropy(logits / temp, t.query_y, reduction="sum"))
        curve[str(tau)] = float(sum(nll)) / sum(int(t.query_y.numel()) for t in train_val)
        priors[str(tau)] = prior
    by_nll = priors[min(curve, key=lambda k: curve[k])]
    by_evidence = fit_temperature_prior(evidence)
    train_clean = sum(int(z is not None and bool((z.argmax(-1) == y).all())) for z, y in oof) / len(train_val)
    out: dict[str, Any] = {"big": {}, "small": {}, "diagnosis": None, "chosen": {}}
    for name, prior in ((f"{algorithm}-ts-hier", by_evidence), (f"{algorithm}-ts-hier-nll", by_nll)):
        chosen = with_prior(prior)
        temps, accuracy, clean = [], [], 0
        for t in big.heldout:
            adapted = chosen.adapt(params, t.support_x, t.support_y, t.kind, steps=steps)
            temps.append(math.log(float(adapted[TEMPERATURE_KEY])))
            accuracy.append(_accuracy(chosen, adapted, params, t))
            z, y = getattr(chosen, attr)(params, t.support_x, t.support_y, steps=steps)
            clean += int(z is not None and bool((z.argmax(-1) == y).all()))
        response = {"log_temperature": {"mean": statistics.fmean(temps),
                                        "std_across_clients": statistics.stdev(temps), "min": min(temps),
                                        "max": max(temps), "spearman_vs_query_accuracy": _spearman(temps, accuracy)},
                    "heldout_clients_without_out_of_fold_mistakes": clean / len(big.heldout),
                    "training_clients_without_out_of_fold_mistakes": train_clean}
        out["big"][name] = score(chosen, params, big.heldout, steps)
        out["chosen"][name] = {"log_t0": prior.log_t0, "temperature_t0": math.exp(prior.log_t0), "tau": prior.tau,
                               "heldout_response": response}
        print(f"seed {seed} {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    out["chosen"][f"{algorithm}-ts-hier-nll"]["train_pool_query_nll_by_tau"] = curve
    out["seconds"] = time.perf_counter() - started
    return out


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def run_seed(job: tuple[int, str, int, int, str | None, tuple[str, ...] | None]) -> dict[str, Any]:
    """Every kept run of one seed; each learner's block is cached in ``cache`` (a rerun scores only new runs).

    ``compute_only``: compute only these labels' missing blocks (cached blocks are always used), so
    a scarce CPU can go to the blocks needed first.
    """
    seed, runs_dir, n_heldout, rounds, cache, compute_only = job
    torch.set_num_threads(1)
    started = time.perf_counter()
    q = max_query(seed)
    big = make_digits_fewshot(seed=seed, n_heldout=n_heldout, query=q)
    small = load_dataset("digits-fewshot", seed=seed)  # the bayes.py setting: 30 clients x 50 queries
    train_val = big.train[:30]  # training-pool clients (never held-out data): every choice is made on them
    out: dict[str, Any] = {"seed": seed, "query_per_class": q, "big": {}, "small": {}, "diagnosis": {},
                           "chosen": {}, "seconds": {}}
    variants = [bayes_variant.algorithm_name(v) for v in sorted(bayes_variant.VARIANTS)]
    parts = [(a, "main") for a in ("metasgd", "bayes-metasgd", "pfedbayes", "bayes-maml", *variants)]
    parts += [(a, "ts-train") for a in ("bayes-metasgd", "bayes-maml", *variants)]
    # a model trained with the all-layer step is re-scored with it (its kappa re-chosen), not the head's alone
    parts += [(a, "varstep") for a in ("bayes-metasgd", "bayes-maml", *variants) if not a.endswith("-allvar")]
    parts += [(a, "varstep-all") for a in ("bayes-metasgd", "bayes-maml", *variants)]
    parts += [(a, "ts-hier") for a in ("metasgd", "bayes-metasgd-allvar", "bayes-metasgd")]
    parts += [(a, "ebscale") for a in ("bayes-metasgd-allvar", "bayes-metasgd")]
    parts += [(a, "ebscale-own") for a in ("bayes-metasgd-allvar", "bayes-metasgd")]
    for algorithm, part in parts:
        path = Path(runs_dir) / f"{algorithm}_plaintext_main_r{rounds}_s{seed}.json"
        if not path.exists():
            continue
        label = algorithm if part == "main" else f"{algorithm}-{part}"
        kept = Path(cache) / f"{label}_s{seed}_h{n_heldout}.json" if cache else None
        if kept is not None and kept.exists():
            block = json.loads(kept.read_text())
        elif compute_only is not None and label not in compute_only:
            continue
        else:
            scorer = {"main": score_algorithm, "ts-train": score_ts_train, "varstep": score_varstep,
                      "varstep-all": score_varstep_all, "ts-hier": score_ts_hier, "ebscale": score_ebscale,
                      "ebscale-own": score_ebscale_own}[part]
            block = scorer(algorithm, json.loads(path.read_text()), seed, big, small, train_val)
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(json.dumps(block))
        for key in ("big", "small", "chosen"):
            out[key].update(block[key])
        if block["diagnosis"] is not None:
            out["diagnosis"][algorithm] = block["diagnosis"]
        out["seconds"][label] = block["seconds"]
    out["wall_seconds"] = time.perf_counter() - started
    return out


def interval(values: list[float | None]) -> dict[str, Any]:
    """Mean and 95% Student-t interval over seeds (``None`` where a value is undefined, e.g. a ratio to 0)."""
    if any(v is None or not math.isfinite(v) for v in values):
        return {"mean": None, "lo": None, "hi": None, "values": [v if v is not None and math.isfinite(v) else None
                                                                 for v in values]}
    vals = [float(v) for v in values if v is not None]
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return {"mean": m, "lo": None, "hi": None}
    h = T975.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / math.sqrt(len(vals))
    return {"mean": m, "lo": m - h, "hi": m + h}


def paired_bootstrap(a: list[list[float]], b: list[list[float]], *, draws: int = 2000, seed: int = 0) -> dict[str, Any]:
    """95% interval of ``sqrt(mean sq_a) / sqrt(mean sq_b)``, resampling clients within each seed (paired)."""
    rng = np.random.default_rng(seed)
    ratios = []
    arrays = [(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)]
    for _ in range(draws):
        sa, sb = 0.0, 0.0
        for x, y in arrays:
            idx = rng.integers(0, len(x), len(x))
            sa += float(x[idx].mean())
            sb += float(y[idx].mean())
        ratios.append(math.sqrt(max(sa, 0.0)) / math.sqrt(sb) if sb > 0 else math.nan)
    r = np.asarray(ratios)
    finite = r[np.isfinite(r)]
    if finite.size < len(r) // 2:
        return {"lo": None, "hi": None, "undefined_fraction": 1 - finite.size / len(r)}
    return {"lo": float(np.quantile(finite, 0.025)), "hi": float(np.quantile(finite, 0.975)),
            "undefined_fraction": 1 - finite.size / len(r)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", required=True, help="the --runs-dir of benchmarks/bayes.py (kept global vectors)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=100, help="held-out clients per seed for the large query sets")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--cache", help="keep each learner's scores per seed here and reuse them (resume)")
    ap.add_argument("--compute-only", nargs="+", help="compute only these labels' missing blocks (others: cache)")
    args = ap.parse_args()
    started = time.perf_counter()
    before = os.getloadavg()[0]
    only = tuple(args.compute_only) if args.compute_only else None
    jobs = [(s, args.runs_dir, args.heldout, args.rounds, args.cache, only) for s in args.seeds]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        per_seed = list(pool.map(run_seed, jobs))
    report: dict[str, Any] = {
        "setting": {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dataset": "digits-fewshot",
                    "n_way": 5, "k_shot": 5, "rounds": args.rounds, "seeds": args.seeds,
                    "big": {"heldout_clients": args.heldout,
                            "query_per_class": [r["query_per_class"] for r in per_seed]},
                    "small": {"heldout_clients": 30, "query_per_class": 10},
                    "ece_bins": 15, "debiased_bins": "15 equal-mass", "interval": "95% Student t over seeds",
                    "judged_on": "l2_ce_debiased (per client, big query sets)"},
    }
    for setting in ("big", "small"):
        names = sorted({n for r in per_seed for n in r[setting]})
        table: dict[str, Any] = {}
        for name in names:
            rows = [r[setting][name] for r in per_seed if name in r[setting]]
            table[name] = {"seeds": [r["seed"] for r in per_seed if name in r[setting]],
                           **{k: interval([row[k] for row in rows]) for k in KEYS}}
            if setting == "small":
                table[name]["kept_run_ece"] = [row.get("kept_run_ece") for row in rows]
        report[setting] = table
    big = {n: [r["big"][n] for r in per_seed if n in r["big"]] for n in report["big"]}
    checks: dict[str, Any] = {}
    if "bayes-metasgd" in big and "metasgd" in big:
        b, m = big["bayes-metasgd"], big["metasgd"]
        checks["l2_ce_debiased ratio bayes-metasgd / metasgd (target <= 0.5)"] = interval(
            [x["l2_ce_debiased"] / y["l2_ce_debiased"] if y["l2_ce_debiased"] > 0 else None
             for x, y in zip(b, m)])
        checks["l2_ce_debiased ratio, paired bootstrap over clients"] = paired_bootstrap(
            [x["per_client_sq_ce_debiased"] for x in b], [y["per_client_sq_ce_debiased"] for y in m])
        checks["l2_ce_debiased bayes-metasgd - metasgd"] = interval(
            [x["l2_ce_debiased"] - y["l2_ce_debiased"] for x, y in zip(b, m)])
        checks["ece ratio bayes-metasgd / metasgd (big query sets)"] = interval(
            [x["ece"] / y["ece"] for x, y in zip(b, m)])
        checks["ece-minus-floor ratio bayes-metasgd / metasgd"] = interval(
            [x["ece_minus_floor"] / y["ece_minus_floor"] for x, y in zip(b, m)])
        checks["accuracy difference bayes-metasgd - metasgd (points)"] = interval(
            [100 * (x["accuracy"] - y["accuracy"]) for x, y in zip(b, m)])
        checks["nll difference bayes-metasgd - metasgd"] = interval([x["nll"] - y["nll"] for x, y in zip(b, m)])
        for other in ("metasgd-ts", "metasgd-ts-cv", "metasgd-ts-train", "pfedbayes", "bayes-maml",
                      "bayes-metasgd-tempered"):
            if other in big and len(big[other]) == len(b):
                checks[f"l2_ce_debiased bayes-metasgd - {other}"] = interval(
                    [x["l2_ce_debiased"] - y["l2_ce_debiased"] for x, y in zip(b, big[other])])
                checks[f"accuracy bayes-metasgd - {other} (points)"] = interval(
                    [100 * (x["accuracy"] - y["accuracy"]) for x, y in zip(b, big[other])])
    others = ["bayes-metasgd-tempered", "bayes-metasgd-ts-train", "bayes-metasgd-varstep", "bayes-maml-varstep",
              "bayes-metasgd-varstep-all", "bayes-maml-varstep-all", "metasgd-ts-hier", "bayes-metasgd-ts-hier",
              "bayes-metasgd-ebscale", "metasgd-ts-hier-nll", "bayes-metasgd-ts-hier-nll", "bayes-metasgd-ebscale-own"]
    for v in sorted(bayes_variant.VARIANTS):
        name = bayes_variant.algorithm_name(v)
        others += [name, f"{name}-tempered", f"{name}-ts-train", f"{name}-varstep", f"{name}-varstep-all",
                   f"{name}-ts-hier", f"{name}-ts-hier-nll", f"{name}-ebscale", f"{name}-ebscale-own"]
    for other in others:
        if other not in big or "metasgd" not in big or len(big[other]) != len(big["metasgd"]):
            continue
        bt, m = big[other], big["metasgd"]
        checks[f"l2_ce_debiased ratio {other} / metasgd"] = interval(
            [x["l2_ce_debiased"] / y["l2_ce_debiased"] if y["l2_ce_debiased"] > 0 else None
             for x, y in zip(bt, m)])
        checks[f"l2_ce_debiased ratio {other} / metasgd, paired bootstrap over clients"] = paired_bootstrap(
            [x["per_client_sq_ce_debiased"] for x in bt], [y["per_client_sq_ce_debiased"] for y in m])
        checks[f"accuracy difference {other} - metasgd (points)"] = interval(
            [100 * (x["accuracy"] - y["accuracy"]) for x, y in zip(bt, m)])
        checks[f"nll difference {other} - metasgd"] = interval(
            [x["nll"] - y["nll"] for x, y in zip(bt, m)])
        if "metasgd-ts-train" in big and len(big["metasgd-ts-train"]) == len(bt):
            checks[f"l2_ce_debiased {other} - metasgd-ts-train"] = interval(
                [x["l2_ce_debiased"] - y["l2_ce_debiased"] for x, y in zip(bt, big["metasgd-ts-train"])])
            checks[f"l2_ce_debiased ratio {other} / metasgd-ts-train, paired bootstrap over clients"] = \
                paired_bootstrap([x["per_client_sq_ce_debiased"] for x in bt],
                                 [y["per_client_sq_ce_debiased"] for y in big["metasgd-ts-train"]])
        if "pfedbayes" in big and len(big["pfedbayes"]) == len(bt):
            checks[f"l2_ce_debiased {other} - pfedbayes"] = interval(
                [x["l2_ce_debiased"] - y["l2_ce_debiased"] for x, y in zip(bt, big["pfedbayes"])])
        checks[f"ood_auroc difference {other} - metasgd"] = interval(
            [x["ood_auroc"] - y["ood_auroc"] for x, y in zip(bt, m)])
    for v in sorted(bayes_variant.VARIANTS):  # did the retrained variant improve on the learner it changes?
        name = bayes_variant.algorithm_name(v)
        if name in big and "bayes-metasgd" in big and len(big[name]) == len(big["bayes-metasgd"]):
            bv, b = big[name], big["bayes-metasgd"]
            checks[f"l2_ce_debiased ratio {name} / bayes-metasgd"] = interval(
                [x["l2_ce_debiased"] / y["l2_ce_debiased"] if y["l2_ce_debiased"] > 0 else None
                 for x, y in zip(bv, b)])
            checks[f"l2_ce_debiased ratio {name} / bayes-metasgd, paired bootstrap over clients"] = paired_bootstrap(
                [x["per_client_sq_ce_debiased"] for x in bv], [y["per_client_sq_ce_debiased"] for y in b])
            checks[f"accuracy difference {name} - bayes-metasgd (points)"] = interval(
                [100 * (x["accuracy"] - y["accuracy"]) for x, y in zip(bv, b)])
            checks[f"nll difference {name} - bayes-metasgd"] = interval([x["nll"] - y["nll"] for x, y in zip(bv, b)])
    # did the all-layer step help on the *training-pool* clients (the only data a choice may use)?
    step: dict[str, Any] = {}
    bases = ("bayes-metasgd", "bayes-maml", *(bayes_variant.algorithm_name(v) for v in sorted(bayes_variant.VARIANTS)))
    for base in bases:
        both = [(r["chosen"].get(f"{base}-varstep-all"), r["chosen"].get(f"{base}-varstep")) for r in per_seed]
        for seed, (a, h) in zip([r["seed"] for r in per_seed], both):
            if a is not None and h is not None:
                step[f"{base} seed {seed}"] = {"all_layers": min(a["train_pool_nll"].values()),
                                               "head_only": min(h["train_pool_nll"].values()),
                                               "kappa_all_layers": a["head_variance_weight"],
                                               "kappa_head_only": h["head_variance_weight"]}
    if step:
        checks["all-layer vs head variance step, training-pool NLL at the chosen kappa"] = step
    for base in ("bayes-metasgd", "bayes-metasgd-allvar"):
        label = f"{base}-varstep-all"
        resp = [r["chosen"][label]["heldout_response"] for r in per_seed if label in r["chosen"]]
        if resp and len(resp) == len(per_seed):
            key = ("spearman across held-out clients, mean log-variance vs query accuracy (all-layer step)"
                   if base == "bayes-metasgd" else
                   f"spearman across held-out clients, mean log-variance vs query accuracy ({base}, all-layer step)")
            checks[key] = {k.replace("_logvar_minus_prior", ""): interval([r[k]["spearman_vs_query_accuracy"]
                                                                            for r in resp]) for k in resp[0]}
    # misfit correlation of the per-client width (empirical-Bayes scale) and temperature (federation prior)
    for label in ("bayes-metasgd-ebscale", "bayes-metasgd-allvar-ebscale", "bayes-metasgd-ebscale-own",
                  "bayes-metasgd-allvar-ebscale-own", "metasgd-ts-hier", "bayes-metasgd-ts-hier",
                  "bayes-metasgd-allvar-ts-hier", "metasgd-ts-hier-nll", "bayes-metasgd-ts-hier-nll",
                  "bayes-metasgd-allvar-ts-hier-nll"):
        resp = [r["chosen"][label]["heldout_response"] for r in per_seed if label in r["chosen"]]
        if resp and len(resp) == len(per_seed):
            checks[f"spearman across held-out clients vs query accuracy ({label})"] = {
                k: interval([r[k]["spearman_vs_query_accuracy"] for r in resp]) for k in resp[0]
                if isinstance(resp[0][k], dict)}
    report["checks"] = checks
    report["chosen_on_training_clients"] = {r["seed"]: r["chosen"] for r in per_seed}
    report["diagnosis"] = {r["seed"]: r["diagnosis"] for r in per_seed}
    report["seconds_per_learner_and_seed"] = {r["seed"]: r["seconds"] for r in per_seed}
    report["wall_seconds"] = time.perf_counter() - started
    report["note"] = (f"Re-scores the global vectors kept by benchmarks/bayes.py and benchmarks/bayes_variant.py "
                      f"(no retraining here); timings on a shared 2-core machine under nice (1-min load average "
                      f"{before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)"
                      + ("; scores reused from --cache where present, so wall_seconds is the assembly time and "
                         "seconds_per_learner_and_seed the time of each block when it was computed"
                         if args.cache else ""))
    write_report(report, args.out)


if __name__ == "__main__":
    main()
