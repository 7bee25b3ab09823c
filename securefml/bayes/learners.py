"""Bayesian meta-learners (Bayesian Meta-SGD, Bayesian MAML), pFedBayes and Meta-SGD + temperature scaling.

Bayesian meta-learning (amortized Bayesian meta-learning, Ravi & Beatson, ICLR 2019; VAMPIRE,
Nguyen, Do & Carneiro, WACV 2020): the server holds a mean-field Gaussian *prior*
``p(w) = N(mu, diag(exp(logvar)))`` over the weights of the chosen layers.  A client's local
inference is a few steps of variational inference on its support set, *starting from the prior*:

    q_0 = p,   q_{k+1} = q_k - rate * grad_q [ E_q NLL(support) + kl_weight * KL(q || p) / n_support ]

with the expectation estimated by one reparameterized sample per example and step (local
reparameterization trick, ``securefml.bayes.network``).  Predictions average the softmax over
``eval_samples`` Monte Carlo samples (32 by default, a fixed, documented count; the noise is drawn
from a generator seeded with ``BayesConfig.seed`` on every call, so predictions are reproducible).
The meta-objective is the query set's negative log *predictive* likelihood after local inference,
``-mean_j log (1/S) sum_s p(y_j | x_j, w_s)`` with ``train_samples`` samples, differentiated
through the inner steps (second order, like MAML; ``torch.func.grad`` of a ``grad``).

Optionally (``BayesConfig.head_variance_step``) local inference ends with a closed-form step that
sets the output layer's variances to the free energy's stationary point given the support set
(``securefml.bayes.variance``): the gradient steps alone leave the posterior's variances at the
prior's, so without it every client gets the same uncertainty.  ``BayesConfig.variance_step_layers``
extends the step to the hidden layers' Gaussian weights (exact diagonal GGN, weights sampled).
``BayesConfig.prior_scale_strength`` lets each client scale the prior's variances of the stepped
layers by an empirical-Bayes fit on its support set (``securefml.bayes.hierarchical``), so a
support set the prior explains badly can widen the posterior; ``BayesConfig.temperature_prior``
gives each client a predictive temperature from its out-of-fold support predictions under a
prior the federation fits on training clients (``securefml.bayes.temperature_prior``).

Bayesian Meta-SGD meta-learns, with the prior, one inner rate per mean *and* per log-variance
(Meta-SGD, Li et al. 2017): ``alpha.<name>`` and ``alpha.logvar.<name>``.  Bayesian MAML uses
the fixed ``inner_lr`` for all of them (cheap: no extra parameters).

Layers.  By default every ``Linear`` of the bundled MLP is Gaussian: the two hidden layers and
the output layer (``layers.0``, ``layers.2``, ``layers.4`` of the 64-64 MLP, 9,029 weights).  On
5-shot support sets every layer is fitted from very little data, and the uncertainty that matters
for calibration is in the output layer and the features feeding it; restricting the Gaussian to
some layers (``BayesConfig.layers``) keeps the others deterministic and halves their traffic.

Units of the log-variances.  ``logvar.<name>`` stores the log-variance divided by
``BayesConfig.logvar_unit`` (8): the server's Adam moves a coordinate by about its rate per round
whatever the gradient, which in raw units left the prior's variances where they started
(``BayesConfig`` gives the measurements).  ``gaussian(params)`` is the Gaussian in natural units;
local inference, the KL and the predictions work there, ``adapt`` returns stored units.

What travels.  The meta-parameters are the prior's means (under the model's own names),
scaled log-variances (``logvar.<name>``) and rates (``alpha.<...>``); a client uploads ``theta_local -
theta`` of all of them, flattened by ``LayerLayout`` like any other layers (``logvar.layers.0``
is a layer), so CKKS, SecAgg+, selection (log-variances and rates follow their layer), DP and
every defense apply unchanged.  Variances are therefore aggregated as the (weighted, or robust)
**mean of log-variances** of the local priors, i.e. a geometric mean of variances: see
``securefml.bayes.aggregation`` for why not precision-weighted natural parameters.

Privacy.  User-level DP (clip + noise of the upload) wraps these learners like any other.
Record-level DP does not: Opacus' route for second-order learners computes per-example
meta-gradients under ``torch.func.vmap``, which forbids the random draws of local inference;
``securefml.privacy`` raises a ``ConfigError`` that says to use user-level DP.

Regression is not supported (a Gaussian likelihood would need a noise model); a regression task
raises ``ConfigError`` before any work.

References
----------
Ravi & Beatson, Amortized Bayesian Meta-Learning, ICLR 2019.  Nguyen, Do & Carneiro, Uncertainty
in Model-Agnostic Meta-Learning using Variational Inference (VAMPIRE), WACV 2020.  Zhang et al.,
Personalized Federated Learning via Variational Bayesian Inference (pFedBayes), ICML 2022.
Guo et al., On Calibration of Modern Neural Networks, ICML 2017.  Kingma, Salimans & Welling,
Variational Dropout and the Local Reparameterization Trick, NeurIPS 2015.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.func import grad

from securefml.bayes.gaussian import LOGVAR_PREFIX, clamp_logvar, kl_params, logvar_name
from securefml.bayes.hierarchical import scaled_posterior_logvars
from securefml.bayes.network import StochasticMLP
from securefml.bayes.temperature import fit_temperature
from securefml.bayes.temperature_prior import TemperaturePrior, out_of_fold_logits, shot_folds
from securefml.bayes.variance import ELEMENTWISE, mlp_ggn_diagonal, softmax_head_ggn_diagonal, stationary_logvar
from securefml.data.base import Task
from securefml.errors import ConfigError
from securefml.meta.base import MetaConfig, MetaLearner, Params
from securefml.meta.gradients import Gradients
from securefml.meta.metasgd import ALPHA_PREFIX, MetaSGD
from securefml.meta.registry import LEARNERS
from securefml.updates import ParamRole, Role

__all__ = ["LOGRATE_MAX", "LOGRATE_MIN", "BayesConfig", "BayesMAML", "BayesMetaSGD", "BayesianLearner",
           "MetaSGDFixedTemperature", "MetaSGDTemperature", "MetaSGDTemperatureCV", "PFedBayes", "TEMPERATURE_KEY"]

TEMPERATURE_KEY = "temperature"
#: range of the natural log of a log-variance's inner rate with ``BayesConfig.log_logvar_rates``
#: (1e-6 to 2.2e4): a diverged or Byzantine stored value gives a very small or large rate, never inf
LOGRATE_MIN = -13.8
LOGRATE_MAX = 10.0


@dataclass(frozen=True)
class BayesConfig:
    """Settings of the Bayesian learners (the step counts and rates are ``MetaConfig``'s).

    Attributes
    ----------
    train_samples:
        Monte Carlo samples of the query predictive in the meta-objective.
    eval_samples:
        Monte Carlo samples of every prediction (personalization, evaluation, detectors).
    init_logvar:
        Initial log-variance of the prior (std ``exp(init_logvar / 2)``; -6 gives 0.05, about
        0.7x the std of PyTorch's default initialization of a 64-input layer, 0.072: the prior's
        noise is of the order of the weights, and meta-training learns how wide it should be).  Measured after 30
        rounds (seed 0, kl_weight 0.01): -4 gave 55% accuracy, -6 77%, -8 70%.
    kl_weight:
        Weight of ``KL(q || p) / n`` in local inference (1 = the ELBO per example).  The KL term's
        curvature in a mean is ``kl_weight / (n * var_prior)``; an inner step of rate ``r`` is
        stable only while ``r`` times that stays below 2.  With 25 support examples and rate 0.1 the
        full ELBO (1.0) gives 1.6 at the prior std 0.05 (at the edge; the prior's variances shrink
        in meta-training) and 33 at std 0.011 (diverges at once, measured).  Even when stable, a
        strong KL pins the posterior to the prior: after 30 rounds (seed 0) weight 0.1 reached
        65% personalized accuracy, 0.01 reached 77% (Meta-SGD 84%).  The default tempers the KL
        to 0.01 (VAMPIRE also weights its KL term); the learned rates and prior variances are
        meta-trained under that weight.  It has a side effect: the prior's variance is also the
        inverse strength of the KL's pull on the adapted means, and meta-training widens the prior
        to loosen it, more than the predictive wants (``benchmarks/bayes_gradient_channels.py``).
        Retrained with 0.001 (200 rounds x 3 seeds): the output layer's prior narrowed (std 0.061
        -> 0.036), the per-client debiased calibration error fell from 0.047 to 0.038 (Meta-SGD
        0.033), but NLL rose from 0.146 to 0.166 and out-of-task AUROC fell from 0.818 to 0.763, so
        the default stays 0.01 (``docs/bayes.md``).
    layers:
        Gaussian ``Linear`` layers (``"layers.0"``...); ``None`` = all of them.
    seed:
        Seed of the prediction noise (fixed per call) and of the training noise stream.
    zeta:
        pFedBayes only: weight of its KL term to the global distribution, per example.  0.01 like
        ``kl_weight``: with 1.0 (measured, 30 rounds, seed 0) the KL pinned every personalized
        posterior to the global one and pFedBayes stayed at chance (21.8% on 5-way).
    logvar_unit:
        The meta-parameter ``logvar.<name>`` stores the log-variance divided by this unit (8, a
        power of two, so the conversion is exact).  Why: the server's Adam moves every
        coordinate by about ``server_lr`` (0.005) per round whatever the gradient's size, so in
        raw units a prior log-variance could move by at most 1.0 in 200 rounds; measured, it
        stayed within 0.03 of its initial value after 30 rounds.  In units of 8 the same step is
        0.04 of log-variance per round.  The merge is unchanged: a mean of scaled log-variances
        is the scaled mean of log-variances.  Measured (60 rounds, seed 0): in raw units the
        prior's mean log-variance per layer ended within 0.15 of -6 and the run reached 88.0%
        accuracy, ECE 0.125, NLL 0.356; in units of 8 the hidden layers narrowed (-6.4 to -7.1)
        and the output layer's weights widened (-5.8): 90.4%, 0.127, 0.310.
    newton_logvar_step:
        Local inference scales the log-variance gradient by ``n / kl_weight``, the inverse of the
        KL term's curvature in a log-variance at ``q = p`` (``kl_weight / (2 n)``; a diagonal
        Newton step on that term).  Why: the free energy's log-variance gradient is
        ``0.5 var * (data curvature) + kl_weight / (2 n) * (var_q / var_p - 1)``, about 1e-4 at
        std 0.05, so a rate-0.1 step moved the posterior's log-variance by 1e-5 (measured): the
        posterior *was* the prior.  Rescaled, the KL term pulls a step of rate ``r`` back by
        ``r / 2`` of its distance to the prior and the data term shrinks the variance where the
        likelihood is curved.  Never applied for ``kl_weight = 0`` (no KL to scale by).  **Off by
        default, because it measured worse**: the one-sample reparameterized gradient of a
        log-variance is noisy and the factor (2,500 for 25 support examples at ``kl_weight``
        0.01) amplifies the noise with the signal.  60 rounds, seed 0, digits-fewshot 5-way
        5-shot: without it 90.4% accuracy, ECE 0.127, NLL 0.310; with it at rate 0.1 88.4%,
        0.132, 0.355; at rate 1.0 84.8%, 0.198, 0.551.
    init_logvar_rate:
        Initial inner rate of the log-variances (``alpha.logvar.<name>`` for Bayesian Meta-SGD,
        the fixed rate for Bayesian MAML); ``None`` (default) = ``inner_lr``.  With the Newton
        step, 1.0 makes the KL term halve the distance to the prior per step.
    predictive_var_scale:
        Factor on the posterior's variances in *predictions* only (``forward``,
        ``sample_probabilities``; local inference, the KL and meta-training never see it): the
        pre-activation noise is multiplied by its square root.  1 (default) is the posterior as
        inferred; 0 is the mean network.  A tempered posterior, for a scale chosen on *training*
        clients' query sets after personalization (``benchmarks/bayes_calibration.py`` picks it
        by their NLL): the 200-round models' Monte Carlo predictive is under-confident on
        held-out clients (mean confidence below accuracy), and this is the Bayesian knob for it.
    log_logvar_rates:
        Bayesian Meta-SGD only (the learners without learned rates refuse it with a
        ``ConfigError``): ``alpha.logvar.<name>`` stores the *logarithm* of the
        log-variance's inner rate, divided by ``logvar_unit`` (rate ``exp(logvar_unit * s)``,
        clamped to ``[LOGRATE_MIN, LOGRATE_MAX]`` in natural log), instead of the rate itself.
        Why: local inference left the posterior's log-variances at the prior (moved by 6e-5 to
        9e-5 after 200 rounds) because their gradient is 1e-5 to 2e-4 per step and the learned
        rate could not grow to match it: the server's Adam moves a coordinate by about
        ``server_lr`` (0.005) per round, so a rate stored as itself can go from 0.1 to at most
        about 1.1 in 200 rounds (measured on the three kept 200-round models: mean learned rates
        0.10 to 0.12 in the hidden layers, 0.24 to 0.27 for the output weights, largest 0.58 to
        0.61, all from 0.1).  A
        log-variance moved by O(0.1) in five steps needs a rate of 1e2 to 1e4.  Stored as
        ``log(rate) / 8``, the same Adam step multiplies the rate by up to ``exp(0.04)`` per round
        (a factor of 3,000 in 200 rounds either way), rates stay positive, and meta-training, not
        a fixed factor (``newton_logvar_step``), decides how far the variances move.  Initial rate
        as before (``init_logvar_rate`` or ``inner_lr``).  Measured (60 rounds, seed 0): given the
        freedom, meta-training did not take it (output weights' rate 0.10 -> 0.18, plain 0.17;
        posterior log-variances still moved by 4e-5), so it stays off by default.
    head_variance_step:
        After the mean steps of local inference, set the output layer's log-variances to the
        free energy's stationary point in the variances, ``1 / s2 = 1 / s2_prior + (n / kappa) *
        E_q[per-example mean of the diagonal GGN of the support NLL]`` (``securefml.bayes.variance``
        derives it from ``E_q NLL + kappa * KL / n``).  Why: the gradient steps leave the posterior's
        log-variances at the prior's (moved by 3e-5 to 9e-5 on the 200-round models), so every
        client gets the prior's uncertainty; with the step, a head weight whose feature the
        client's support set exercises (and does not yet fit with certainty) gets a narrower
        posterior, one it never sees keeps the prior's width.  The head's learned log-variance
        rates are then unused (the step replaces what they would move).  The output layer must
        be Gaussian.  Off by default.
    head_variance_weight:
        ``kappa`` in the step; ``None`` = ``kl_weight`` (the free energy's own weight).  A larger
        value keeps the variance nearer the prior's.  For one value chosen by the federation on
        *training* clients at scoring time (``benchmarks/bayes_calibration.py``).
    head_variance_samples:
        Monte Carlo samples (per support example) of the expectation over ``q`` in the step.
    head_variance_iterations:
        Evaluations of the step, each at the ``q`` the previous one produced (1 = one
        natural-gradient step of size 1 from the current posterior; more = a fixed-point iteration
        towards the exact stationary point).
    variance_step_layers:
        The Gaussian layers whose log-variances the closed-form step sets (``head_variance_step``
        must be on).  ``None``: the output layer only, its diagonal GGN from the sampled head
        inputs and logits (``softmax_head_ggn_diagonal``).  A tuple of layer names (e.g. all three
        ``("layers.0", "layers.2", "layers.4")``): each named layer, with the exact diagonal GGN
        of every layer from one weight sample per Monte Carlo sample (``mlp_ggn_diagonal``: for a
        hidden weight ``W_uj``, ``h_j^2 g_u^T Lambda g_u`` with ``g_u`` the logits' Jacobian in the
        unit's pre-activation).  Why: the hidden layers' variances also stay at the prior's under
        the gradient steps (``docs/bayes.md``), and the head's step alone narrowed the head most for
        the clients the model fits worst; a step in the features lets the support set narrow the
        uncertainty of the representation too.  The model's activations must be elementwise.
    prior_scale_strength:
        ``None`` (default): the closed-form variance step uses the meta-learned prior as it is.  A
        positive ``nu``: each client first fits, per Gaussian layer of the step, a scale ``s`` of
        the prior's variances by the free energy with an inverse-gamma hyper-prior of pseudo-count
        ``nu`` (mode ``s = 1``; ``securefml.bayes.hierarchical``): ``s = (A + 2 nu) / (gamma + 2 nu)``
        with ``A`` the means' squared displacement from the prior in prior variances and ``gamma``
        the number of directions the support set determines.  Why: the variance step can only
        narrow, and narrowed most for the clients the model fits worst (``docs/bayes.md``); with the
        scale, a support set that pulls the means further than the prior expects widens the
        client's posterior.  Needs ``head_variance_step``; ``nu`` is chosen by the federation on
        training clients (``benchmarks/bayes_calibration.py``).
    prior_scale_modes:
        The hyper-prior's mode per layer, ``((layer, s0), ...)``; a layer not named (and ``None``,
        the default) has mode 1, the meta-learned prior itself.  For a location of the hyper-prior
        fitted by the federation on *training* clients (``benchmarks/bayes_calibration.py``: the
        geometric mean of their per-client scales), so that a client is widened or narrowed
        relative to the clients the federation has seen, not relative to a prior whose level the
        meta-training's tempered KL set.
    prior_scale_iterations:
        Contraction steps of the scale's root-finding (each at least halves the error).
    temperature_prior:
        ``None`` (default): no per-client temperature.  A ``TemperaturePrior`` (``log T ~ N(m,
        tau^2)``, fitted by the federation on *training* clients, ``fit_temperature_prior``): in
        ``adapt`` each client splits its support set into ``temperature_folds`` stratified folds,
        runs local inference on the others and predicts each held-out fold (the log of the Monte
        Carlo predictive), and divides its predictions by the posterior mean temperature given
        those out-of-fold predictions (``securefml.bayes.temperature_prior``).  Why: the variance
        of a Gaussian posterior over a 5-shot likelihood narrows most for the clients the model
        fits worst (``docs/bayes.md``); out-of-fold mistakes measure misfit directly, and the
        shared prior holds a client without any mistakes near the federation's level instead of
        letting it fit the grid's minimum.  Costs ``temperature_folds`` extra local inferences per
        client; meta-training never sees it.  Not with ``temperature`` != 1.
    temperature_folds:
        Folds of the out-of-fold predictions (``temperature_prior``), >= 2.
    temperature:
        Predictions divide the log of the Monte Carlo predictive by this temperature
        (``forward`` only; softmax of the result is the predictive raised to ``1 / T`` and
        renormalized).  1 (default) leaves it unchanged.  For one temperature fitted by the
        federation on *training* clients' personalized query predictions and shipped with the
        model, the Bayesian analogue of ``MetaSGDFixedTemperature``.
    """

    train_samples: int = 4
    eval_samples: int = 32
    init_logvar: float = -6.0
    kl_weight: float = 0.01
    layers: tuple[str, ...] | None = None
    seed: int = 0
    zeta: float = 0.01
    logvar_unit: float = 8.0
    newton_logvar_step: bool = False
    init_logvar_rate: float | None = None
    predictive_var_scale: float = 1.0
    log_logvar_rates: bool = False
    temperature: float = 1.0
    head_variance_step: bool = False
    head_variance_weight: float | None = None
    head_variance_samples: int = 8
    head_variance_iterations: int = 1
    variance_step_layers: tuple[str, ...] | None = None
    prior_scale_strength: float | None = None
    prior_scale_modes: tuple[tuple[str, float], ...] | None = None
    prior_scale_iterations: int = 40
    temperature_prior: TemperaturePrior | None = None
    temperature_folds: int = 5

    def __post_init__(self) -> None:
        if self.temperature_prior is not None and self.temperature != 1.0:
            raise ConfigError("temperature_prior fits a temperature per client; it cannot be combined with a fixed "
                              f"temperature ({self.temperature})")
        if self.temperature_folds < 2:
            raise ConfigError(f"temperature_folds must be >= 2, got {self.temperature_folds}")
        if self.prior_scale_strength is not None:
            if not self.head_variance_step:
                raise ConfigError("prior_scale_strength scales the prior of the closed-form variance step: "
                                  "it needs head_variance_step=True")
            if not (math.isfinite(self.prior_scale_strength) and self.prior_scale_strength > 0):
                raise ConfigError(f"prior_scale_strength must be a positive number (or None), "
                                  f"got {self.prior_scale_strength}")
        if self.prior_scale_modes is not None:
            if self.prior_scale_strength is None:
                raise ConfigError("prior_scale_modes locates the prior scale's hyper-prior: "
                                  "it needs prior_scale_strength")
            names = [m[0] for m in self.prior_scale_modes]
            if len(set(names)) != len(names) or not all(math.isfinite(m[1]) and m[1] > 0
                                                        for m in self.prior_scale_modes):
                raise ConfigError(f"prior_scale_modes must give distinct layers positive modes, "
                                  f"got {self.prior_scale_modes}")
        if self.prior_scale_iterations < 1:
            raise ConfigError(f"prior_scale_iterations must be >= 1, got {self.prior_scale_iterations}")
        if self.variance_step_layers is not None:
            if not self.head_variance_step:
                raise ConfigError("variance_step_layers chooses the layers of the closed-form variance step: "
                                  "it needs head_variance_step=True")
            if not self.variance_step_layers or len(set(self.variance_step_layers)) != len(self.variance_step_layers):
                raise ConfigError(f"variance_step_layers must name distinct layers, got {self.variance_step_layers}")
        if self.head_variance_samples < 1 or self.head_variance_iterations < 1:
            raise ConfigError(f"head_variance_samples and head_variance_iterations must be >= 1, got "
                              f"{self.head_variance_samples} and {self.head_variance_iterations}")
        if self.head_variance_weight is not None and not (math.isfinite(self.head_variance_weight)
                                                          and self.head_variance_weight > 0):
            raise ConfigError(f"head_variance_weight must be a positive number (or None), "
                              f"got {self.head_variance_weight}")
        if self.head_variance_step and self.variance_step_weight() <= 0:
            raise ConfigError("head_variance_step needs a positive KL weight (kl_weight or head_variance_weight): "
                              "with no KL term the stationary variance is 0")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature}")
        if not (math.isfinite(self.predictive_var_scale) and self.predictive_var_scale >= 0):
            raise ConfigError(f"predictive_var_scale must be a finite number >= 0, got {self.predictive_var_scale}")
        if self.train_samples < 1 or self.eval_samples < 1:
            raise ConfigError("train_samples and eval_samples must be >= 1")
        if not (math.isfinite(self.logvar_unit) and self.logvar_unit > 0):
            raise ConfigError(f"logvar_unit must be a positive number, got {self.logvar_unit}")
        if self.init_logvar_rate is not None and not (math.isfinite(self.init_logvar_rate)
                                                      and self.init_logvar_rate > 0):
            raise ConfigError(f"init_logvar_rate must be positive (or None), got {self.init_logvar_rate}")
        if not math.isfinite(self.init_logvar) or not -16 <= self.init_logvar <= 2:
            raise ConfigError(f"init_logvar must be in [-16, 2], got {self.init_logvar}")
        if not (self.kl_weight >= 0 and self.zeta >= 0):
            raise ConfigError("kl_weight and zeta must be >= 0")


    def prior_scale_mode(self, layer: str) -> float:
        """The hyper-prior's mode of ``layer``'s prior scale (``prior_scale_modes``; 1 if not named)."""
        return dict(self.prior_scale_modes or ()).get(layer, 1.0)

    def variance_step_weight(self) -> float:
        """``kappa`` of the closed-form variance step (``head_variance_weight``, else ``kl_weight``)."""
        return self.kl_weight if self.head_variance_weight is None else self.head_variance_weight


class BayesianLearner(MetaLearner):
    """Shared machinery: the Gaussian prior's parameters, noise, ELBO, local inference, prediction.

    Parameters
    ----------
    model:
        The bundled MLP (``securefml.models.MLP``); only its structure and initial weights are used.
    config:
        Inner steps (local inference), inner rate, outer rate and steps.
    bayes:
        Monte Carlo sample counts, prior initialization, Gaussian layers, seed.
    """

    name = "bayes"
    #: whether the log-variances' inner rates are meta-parameters (``BayesConfig.log_logvar_rates``)
    learns_logvar_rates = False
    adapts_with_learned_rates = True  # personalization keeps the full posterior (means + log-variances)

    def __init__(self, model: nn.Module, config: MetaConfig | None = None, *, bayes: BayesConfig | None = None) -> None:
        super().__init__(model, config)
        self.bayes = bayes or BayesConfig()
        if self.bayes.log_logvar_rates and not self.learns_logvar_rates:
            raise ConfigError(f"log_logvar_rates needs learned log-variance rates (bayes-metasgd); "
                              f"{self.name} has none")
        self.net = StochasticMLP(model, self.bayes.layers)
        if (self.bayes.head_variance_step and self.bayes.variance_step_layers is None
                and self.net.head not in self.net.bayesian_layers):
            raise ConfigError(f"head_variance_step needs a Gaussian output layer; {self.net.head!r} is not among "
                              f"the Gaussian layers {self.net.bayesian_layers}")
        self._step_layers: tuple[str, ...] | None = None
        self._activations: dict[str, nn.Module | None] = {}
        if self.bayes.variance_step_layers is not None:
            unknown = [n for n in self.bayes.variance_step_layers if n not in self.net.bayesian_layers]
            if unknown:
                raise ConfigError(f"variance_step_layers {unknown} are not Gaussian layers; choose from "
                                  f"{self.net.bayesian_layers}")
            self._step_layers = tuple(n for n in self.net.bayesian_layers if n in self.bayes.variance_step_layers)
            self._activations = self._layer_activations()
        unknown_modes = [m[0] for m in self.bayes.prior_scale_modes or () if m[0] not in self.net.bayesian_layers]
        if unknown_modes:
            raise ConfigError(f"prior_scale_modes names {unknown_modes}, not Gaussian layers; choose from "
                              f"{self.net.bayesian_layers}")
        self._train_generator = torch.Generator().manual_seed(self.bayes.seed + 1)

    def _layer_activations(self) -> dict[str, nn.Module | None]:
        """The activation after each ``Linear`` (``None`` after the head); ``ConfigError`` unless elementwise."""
        head = self.net.head
        if self.net.steps[0][0] != self.net.linear_layers[0]:
            raise ConfigError(f"variance_step_layers needs the model to start with a Linear layer, it starts with "
                              f"{self.net.steps[0][0]!r}")
        acts: dict[str, nn.Module | None] = {}
        current: str | None = None
        for name, module in self.net.steps:
            if isinstance(module, nn.Linear):
                current = name
                acts[name] = None
            elif not isinstance(module, ELEMENTWISE) or acts[str(current)] is not None or current == head:
                raise ConfigError(f"variance_step_layers needs one elementwise activation between Linear layers; "
                                  f"{name!r} is {type(module).__name__}")
            else:
                acts[str(current)] = module
        missing = [n for n in self.net.linear_layers[:-1] if acts[n] is None]
        if missing:
            raise ConfigError(f"variance_step_layers: hidden layers {missing} have no activation")
        return acts

    # -- parameters ------------------------------------------------------------------------
    def init_params(self, device: torch.device | str | None = None) -> Params:
        means = {n: p.detach().clone().to(device or p.device) for n, p in self.model.named_parameters()}
        missing = [n for n in self.net.mean_names if n not in means]
        if missing:
            raise ConfigError(f"model parameters {missing} not found")
        logvars = {logvar_name(n): torch.full_like(means[n], self.bayes.init_logvar / self.bayes.logvar_unit)
                   for n in self.net.gaussian_names}
        return {**means, **logvars}

    def model_params(self, params: Params) -> Params:
        """The posterior (or prior) parameters as stored: means and scaled log-variances, without rates."""
        return {n: params[n] for n in self.net.posterior_names()}

    def layer_roles(self) -> Mapping[str, ParamRole]:
        """Each log-variance is the ``LOG_VARIANCE`` of its mean (selection keeps them with their layer)."""
        return {logvar_name(n): ParamRole(Role.LOG_VARIANCE, of=n) for n in self.net.gaussian_names}

    def gaussian(self, params: Params) -> Params:
        """The Gaussian itself: means and log-variances in natural units (stored ones times ``logvar_unit``)."""
        c = self.bayes.logvar_unit
        return {n: (params[n] * c if n.startswith(LOGVAR_PREFIX) else params[n]) for n in self.net.posterior_names()}

    def stored(self, q: Params) -> Params:
        """Inverse of ``gaussian``: log-variances divided by ``logvar_unit``."""
        c = self.bayes.logvar_unit
        return {n: (v / c if n.startswith(LOGVAR_PREFIX) else v) for n, v in q.items()}

    # -- prediction ------------------------------------------------------------------------
    def _check_kind(self, kind: str) -> None:
        if kind != "classification":
            raise ConfigError(f"{self.name} supports classification tasks only, got {kind!r}")

    def sample_probabilities(self, params: Params, x: torch.Tensor, *, samples: int | None = None,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample predictive probabilities ``[n, S, C]`` (``S = eval_samples``; seeded noise)."""
        gen = generator or torch.Generator().manual_seed(self.bayes.seed)
        noise = self._prediction_noise(self.net.draw_noise(x.shape[0], samples or self.bayes.eval_samples,
                                                           generator=gen, device=x.device, dtype=x.dtype))
        return torch.softmax(self.net.logits(self.gaussian(params), x, noise), dim=-1)

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Log of the Monte Carlo predictive probabilities ``[n, C]`` (softmax of it = the predictive)."""
        gen = torch.Generator().manual_seed(self.bayes.seed)
        noise = self._prediction_noise(self.net.draw_noise(x.shape[0], self.bayes.eval_samples, generator=gen,
                                                           device=x.device, dtype=x.dtype))
        logp = self.net.log_predictive(self.gaussian(params), x, noise)
        if TEMPERATURE_KEY in params:  # a client's own temperature (BayesConfig.temperature_prior)
            return logp / params[TEMPERATURE_KEY]
        return logp if self.bayes.temperature == 1.0 else logp / self.bayes.temperature

    def _prediction_noise(self, noise: list[torch.Tensor]) -> list[torch.Tensor]:
        """The noise of a prediction, for variances scaled by ``predictive_var_scale`` (see ``BayesConfig``)."""
        scale = self.bayes.predictive_var_scale
        return noise if scale == 1.0 else [e * math.sqrt(scale) for e in noise]

    # -- local inference -------------------------------------------------------------------
    def expected_nll(self, q: Params, x: torch.Tensor, y: torch.Tensor, noise: Sequence[torch.Tensor]) -> torch.Tensor:
        """Monte Carlo estimate of ``E_q[-log p(y | x, w)]`` averaged over examples."""
        logits = self.net.logits(q, x, noise)  # [n, S, C]
        s = logits.shape[1]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat_interleave(s))

    def free_energy(self, q: Params, prior: Params, x: torch.Tensor, y: torch.Tensor,
                    noise: Sequence[torch.Tensor], *, weight: float) -> torch.Tensor:
        """Negative ELBO per example: ``E_q NLL + weight * KL(q || prior) / n``."""
        kl = kl_params(q, prior, self.net.gaussian_names)
        return self.expected_nll(q, x, y, noise) + weight * kl / x.shape[0]

    def _logvar_rate(self) -> float:
        return self.config.inner_lr if self.bayes.init_logvar_rate is None else self.bayes.init_logvar_rate

    def rates(self, params: Params) -> Params:
        """Inner step size of each posterior entry (Bayesian MAML: fixed, ``inner_lr`` for means)."""
        lv = self._logvar_rate()
        return {n: torch.full_like(params[n], lv if n.startswith(LOGVAR_PREFIX) else self.config.inner_lr)
                for n in self.net.posterior_names()}

    def logvar_gradient_scale(self, n_examples: int) -> float:
        """Factor on the log-variance gradient in local inference (``n / kl_weight``, see ``BayesConfig``)."""
        if self.bayes.newton_logvar_step and self.bayes.kl_weight > 0:
            return n_examples / self.bayes.kl_weight
        return 1.0

    def infer(self, params: Params, x: torch.Tensor, y: torch.Tensor, *, steps: int,
              generator: torch.Generator, scales: dict[str, torch.Tensor] | None = None) -> Params:
        """``steps`` steps of variational inference from the prior in ``params`` (differentiable).

        Returns the posterior in natural units (``gaussian``); ``adapt`` stores it.  ``scales``, if
        given, receives each stepped layer's ``log s`` (``BayesConfig.prior_scale_strength``).
        """
        prior = self.gaussian(params)
        rates = self.rates(params)
        scale = self.logvar_gradient_scale(x.shape[0])
        rates = {n: (r * scale if n.startswith(LOGVAR_PREFIX) else r) for n, r in rates.items()}
        q = dict(prior)
        step = grad(lambda q_, noise: self.free_energy(q_, prior, x, y, noise, weight=self.bayes.kl_weight))
        for _ in range(steps):
            noise = self.net.draw_noise(x.shape[0], 1, generator=generator, device=x.device, dtype=x.dtype)
            g = step(q, noise)
            q = {n: q[n] - rates[n] * g[n] for n in q}
            # a step may not leave the clamped range: outside it the gradient is zero and the entry is stuck
            q = {n: (clamp_logvar(v) if n.startswith(LOGVAR_PREFIX) else v) for n, v in q.items()}
        if self.bayes.head_variance_step:
            noise = self.net.draw_noise(x.shape[0], self.bayes.head_variance_samples, generator=generator,
                                        device=x.device, dtype=x.dtype)
            for _ in range(self.bayes.head_variance_iterations):
                if self._step_layers is None:
                    q = self.head_variance_step(q, prior, x, noise, scales=scales)
                else:
                    q = self.layer_variance_step(q, prior, x, self.draw_weights(
                        q, self.bayes.head_variance_samples, generator=generator), scales=scales)
        return q

    def prior_log_scales(self, params: Params, task_x: torch.Tensor, task_y: torch.Tensor, kind: str,
                         *, steps: int | None = None) -> dict[str, float]:
        """Each stepped layer's fitted ``log s`` for this support set (local inference exactly as ``adapt``'s)."""
        self._check_kind(kind)
        if self.bayes.prior_scale_strength is None:
            raise ConfigError("prior_log_scales needs BayesConfig.prior_scale_strength")
        scales: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            self.infer(params, task_x, task_y, steps=self.config.inner_steps if steps is None else steps,
                       generator=torch.Generator().manual_seed(self.bayes.seed), scales=scales)
        return {k: float(v) for k, v in scales.items()}

    def draw_weights(self, q: Params, samples: int, *, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``samples`` draws of every Linear's weight and bias under ``q`` (natural units), ``[S, *shape]`` each.

        Gaussian layers: ``mean + std * eps`` (``eps`` from ``generator`` on the CPU, then moved);
        deterministic layers: their values repeated.
        """
        out = {}
        for name in self.net.mean_names:
            m = q[name]
            if name in self.net.gaussian_names:
                eps = torch.randn(samples, *m.shape, generator=generator, dtype=m.dtype).to(m.device)
                out[name] = m + torch.exp(0.5 * clamp_logvar(q[logvar_name(name)])) * eps
            else:
                out[name] = m.unsqueeze(0).expand(samples, *m.shape)
        return out

    def layer_variance_step(self, q: Params, prior: Params, x: torch.Tensor,
                            weights: Mapping[str, torch.Tensor],
                            scales: dict[str, torch.Tensor] | None = None) -> Params:
        """The closed-form variance step of the ``variance_step_layers`` (exact diagonal GGN of every layer).

        ``q``, ``prior`` in natural units; ``weights`` sampled under ``q`` (``draw_weights``).  Returns
        ``q`` with those layers' log-variances at ``stationary_logvar`` of ``mlp_ggn_diagonal``'s
        diagonal; means and the other layers unchanged.  Differentiable.
        """
        layers = self.net.linear_layers
        ggn = mlp_ggn_diagonal(x.flatten(1), [weights[f"{n}.weight"] for n in layers],
                               [weights[f"{n}.bias"] for n in layers], [self._activations[n] for n in layers])
        out = dict(q)
        for name, (gw, gb) in zip(layers, ggn):
            if name in (self._step_layers or ()):
                out.update(self._layer_logvars(q, prior, name, gw, gb, x.shape[0], scales))
        return out

    def _layer_logvars(self, q: Params, prior: Params, layer: str, ggn_w: torch.Tensor, ggn_b: torch.Tensor,
                       n: int, scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One layer's stationary log-variances: under the prior as learned, or scaled per client.

        (``BayesConfig.prior_scale_strength``; ``securefml.bayes.hierarchical``.)
        """
        kappa = self.bayes.variance_step_weight()
        w, b = logvar_name(f"{layer}.weight"), logvar_name(f"{layer}.bias")
        if self.bayes.prior_scale_strength is None:
            return {w: stationary_logvar(prior[w], ggn_w, n, kappa), b: stationary_logvar(prior[b], ggn_b, n, kappa)}
        (lw, lb), log_s = scaled_posterior_logvars(
            [q[f"{layer}.weight"], q[f"{layer}.bias"]], [prior[f"{layer}.weight"], prior[f"{layer}.bias"]],
            [prior[w], prior[b]], [ggn_w, ggn_b], n, kappa, strength=self.bayes.prior_scale_strength,
            mode=self.bayes.prior_scale_mode(layer), iterations=self.bayes.prior_scale_iterations)
        if scales is not None:
            scales[layer] = log_s
        return {w: lw, b: lb}

    def head_variance_step(self, q: Params, prior: Params, x: torch.Tensor,
                           noise: Sequence[torch.Tensor], scales: dict[str, torch.Tensor] | None = None) -> Params:
        """One closed-form variance step of the output layer (``BayesConfig.head_variance_step``).

        ``q`` and ``prior`` in natural units; ``noise`` for every Gaussian layer (``[n, S, out]``,
        ``draw_noise``) samples the features and the head's logits under ``q``.  Returns ``q`` with
        the head's log-variances at ``securefml.bayes.variance.stationary_logvar``; means unchanged.
        Differentiable (the meta-gradient flows through it).
        """
        head = self.net.head
        h, logits = self.net.head_inputs_and_logits(q, x, noise)
        probs = torch.softmax(logits, dim=-1)
        ggn_w, ggn_b = softmax_head_ggn_diagonal(h, probs)
        return {**q, **self._layer_logvars(q, prior, head, ggn_w, ggn_b, x.shape[0], scales)}

    def adapt(self, params: Params, task_x: torch.Tensor, task_y: torch.Tensor, kind: str,
              *, steps: int | None = None) -> Params:
        """Local inference on a support set; returns the posterior (means and log-variances).

        The noise comes from a generator seeded with ``BayesConfig.seed`` on every call, so a
        client's posterior is a deterministic function of its data and the prior.
        """
        self._check_kind(kind)
        steps = self.config.inner_steps if steps is None else steps
        posterior = self._posterior(params, task_x, task_y, steps)
        prior = self.bayes.temperature_prior
        if prior is None:
            return posterior
        logits, labels = self.out_of_fold_log_predictive(params, task_x, task_y, steps=steps)
        ref = next(iter(posterior.values()))
        t = prior.temperature(logits, labels)
        return {**posterior, TEMPERATURE_KEY: torch.tensor(t, dtype=ref.dtype, device=ref.device)}

    def _posterior(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        q = self.infer(params, x, y, steps=steps, generator=torch.Generator().manual_seed(self.bayes.seed))
        return self.stored(q)

    def out_of_fold_log_predictive(self, params: Params, x: torch.Tensor, y: torch.Tensor, *, steps: int | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """Out-of-fold log predictives on a support set (``temperature_folds`` stratified folds), untempered.

        The evidence of ``BayesConfig.temperature_prior`` for this client; also what the federation
        fits that prior on (training clients, ``fit_temperature_prior``).
        """
        steps = self.config.inner_steps if steps is None else steps
        plain = replace(self.bayes, temperature=1.0)

        def adapted(xk: torch.Tensor, yk: torch.Tensor):  # type: ignore[no-untyped-def]
            post = self._posterior(params, xk, yk, steps)
            return lambda xo: self._untempered_forward({**params, **post}, xo, plain)

        return out_of_fold_logits(adapted, x, y, folds=self.bayes.temperature_folds)

    def _untempered_forward(self, params: Params, x: torch.Tensor, bayes: BayesConfig) -> torch.Tensor:
        gen = torch.Generator().manual_seed(bayes.seed)
        noise = self._prediction_noise(self.net.draw_noise(x.shape[0], bayes.eval_samples, generator=gen,
                                                           device=x.device, dtype=x.dtype))
        return self.net.log_predictive(self.gaussian(params), x, noise)

    # -- meta-training ---------------------------------------------------------------------
    def query_nll(self, params: Params, task: Task, seed: int) -> torch.Tensor:
        """Query negative log predictive likelihood after local inference on the support set.

        ``seed`` seeds the noise of the inner steps and of the query samples.
        """
        gen = torch.Generator().manual_seed(seed)
        q = self.infer(params, task.support_x, task.support_y, steps=self.config.inner_steps, generator=gen)
        noise = self.net.draw_noise(task.query_x.shape[0], self.bayes.train_samples, generator=gen,
                                    device=task.query_x.device, dtype=task.query_x.dtype)
        logp = self.net.log_predictive(q, task.query_x, noise)
        return nn.functional.nll_loss(logp, task.query_y)

    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        self._check_kind(task.kind)
        loss = 0.0
        for _ in range(self.config.outer_steps):
            seed = int(torch.randint(0, 2**62, (1,), generator=self._train_generator))  # fresh noise each step
            g, value = _value_and_grad(self.query_nll, params, task, seed)
            loss = value
            params = {n: (p - self.config.outer_lr * g[n]).detach() for n, p in params.items()}
        return params, {"query_loss": loss}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, {self.bayes}, gaussian_layers={self.net.bayesian_layers})"


def _value_and_grad(fn, params: Params, *args):  # type: ignore[no-untyped-def]
    from torch.func import grad_and_value

    g, value = grad_and_value(fn)(params, *args)
    return g, float(value.detach())


@LEARNERS.register("bayes-maml")
class BayesMAML(BayesianLearner):
    """Bayesian MAML (VAMPIRE-style): local VI at the fixed rate ``inner_lr``; meta-learns the prior only."""

    name = "bayes-maml"


@LEARNERS.register("bayes-metasgd")
class BayesMetaSGD(BayesianLearner):
    """Bayesian Meta-SGD: meta-learns the prior *and* one inner rate per mean and per log-variance.

    Rates start at ``inner_lr`` and live under ``alpha.<name>`` (``alpha.logvar.<name>`` for the
    log-variances), so they are layers of their own and travel like Meta-SGD's.
    """

    name = "bayes-metasgd"
    learns_logvar_rates = True

    def init_params(self, device: torch.device | str | None = None) -> Params:
        prior = super().init_params(device)
        lv = self._logvar_rate()
        if self.bayes.log_logvar_rates:
            lv = math.log(lv) / self.bayes.logvar_unit
        rates = {ALPHA_PREFIX + n: torch.full_like(p, lv if n.startswith(LOGVAR_PREFIX) else self.config.inner_lr)
                 for n, p in prior.items()}
        return {**prior, **rates}

    def rates(self, params: Params) -> Params:
        """The inner rates in natural units (``exp`` of the stored log-rates for log-variances, if so configured)."""
        out = {n: params[ALPHA_PREFIX + n] for n in self.net.posterior_names()}
        if self.bayes.log_logvar_rates:
            c = self.bayes.logvar_unit
            out = {n: (torch.exp((r * c).clamp(LOGRATE_MIN, LOGRATE_MAX)) if n.startswith(LOGVAR_PREFIX) else r)
                   for n, r in out.items()}
        return out

    def layer_roles(self) -> Mapping[str, ParamRole]:
        rates = {ALPHA_PREFIX + n: ParamRole(Role.LEARNED_RATE, of=n) for n in self.net.posterior_names()}
        return {**super().layer_roles(), **rates}


@LEARNERS.register("pfedbayes")
class PFedBayes(BayesianLearner):
    """pFedBayes (Zhang et al., ICML 2022): personalized Gaussian posteriors tied to a global one by a KL term.

    Each client alternates ``inner_steps`` times, on all its local data (support and query):

    1. a step on its personalized posterior ``q`` (initialized from the global ``w``):
       ``E_q NLL + zeta * KL(q || w) / n`` at rate ``inner_lr``;
    2. a step on its local copy of the global distribution ``w`` towards ``q``, minimising
       ``KL(q || w)``.  This is a natural-gradient step of size ``outer_lr``
       (``mu_w -= outer_lr * (mu_w - mu_q)``, ``logvar_w -= outer_lr * (1 - (var_q + (mu_q - mu_w)^2) / var_w)``);
       the paper takes plain gradient steps, which at small variances are either negligible or
       unstable, so this is a documented deviation.

    It uploads ``w_local - w``; the server's (weighted) mean averages Gaussian means and
    log-variances (the paper averages means and the softplus-parameterized standard deviations).
    Personalization of a new client is step 1 alone, on its support set, from the global ``w``;
    predictions are Monte Carlo averages like the other Bayesian learners'.
    """

    name = "pfedbayes"

    def __init__(self, model: nn.Module, config: MetaConfig | None = None, *, bayes: BayesConfig | None = None) -> None:
        # log-variances in raw units (logvar_unit 1): the unit exists so the *meta-gradient* can move
        # a prior's variances; here the server steps on pFedBayes' own natural-gradient moves of the
        # global log-variances, and 8x that step widened the global distribution until predictions
        # were at chance (200 rounds, seed 0: log-variances -6 -> -3.3..-4.8, std above the weights'
        # mean magnitude 0.1; accuracy 26%)
        super().__init__(model, config, bayes=bayes or BayesConfig(logvar_unit=1.0))
        if self.bayes.head_variance_step:
            raise ConfigError("pfedbayes does not take head_variance_step (its local inference is pFedBayes' own); "
                              "use bayes-metasgd or bayes-maml")

    def infer(self, params: Params, x: torch.Tensor, y: torch.Tensor, *, steps: int,
              generator: torch.Generator, scales: dict[str, torch.Tensor] | None = None) -> Params:
        prior = self.gaussian(params)  # no variance step here (refused in __init__), so no scales either
        q = dict(prior)
        step = grad(lambda q_, noise: self.free_energy(q_, prior, x, y, noise, weight=self.bayes.zeta))
        for _ in range(steps):
            noise = self.net.draw_noise(x.shape[0], 1, generator=generator, device=x.device, dtype=x.dtype)
            g = step(q, noise)
            q = {n: (q[n] - self.config.inner_lr * g[n]).detach() for n in q}
        return q

    def meta_update(self, params: Params, task: Task) -> tuple[Params, dict[str, float]]:
        self._check_kind(task.kind)
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        w = self.gaussian({n: p.detach() for n, p in params.items()})
        q = dict(w)
        rho = self.config.outer_lr
        loss = 0.0
        for _ in range(self.config.inner_steps):
            noise = self.net.draw_noise(x.shape[0], 1, generator=self._train_generator, device=x.device, dtype=x.dtype)
            g, loss = _value_and_grad(
                lambda q_, noise_, w_=w: self.free_energy(q_, w_, x, y, noise_, weight=self.bayes.zeta), q, noise)
            q = {n: (q[n] - self.config.inner_lr * g[n]).detach() for n in q}
            new_w = dict(w)
            for n in self.net.mean_names:
                new_w[n] = w[n] - rho * (w[n] - q[n])
            for n in self.net.gaussian_names:
                lv = logvar_name(n)
                var_w, var_q = torch.exp(clamp_logvar(w[lv])), torch.exp(clamp_logvar(q[lv]))
                new_w[lv] = w[lv] - rho * (1 - (var_q + (q[n] - w[n]) ** 2) / var_w)
            w = new_w
        return {**params, **self.stored(w)}, {"train_loss": loss}


@LEARNERS.register("metasgd-ts")
class MetaSGDTemperature(MetaSGD):
    """Meta-SGD, then post-hoc temperature scaling fitted on the client's support set.

    Meta-training is Meta-SGD's.  In personalization, after adapting, ``calibrate`` fits one
    temperature on the support set (``securefml.bayes.temperature``) and stores it under
    ``temperature`` in the adapted parameters; ``forward`` divides the logits by it.  The
    temperature never travels (it is not in ``init_params``).
    """

    name = "metasgd-ts"

    def model_params(self, params: Params) -> Params:
        return {n: p for n, p in super().model_params(params).items() if n != TEMPERATURE_KEY}

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(params, x)
        t = params.get(TEMPERATURE_KEY)
        return out if t is None else out / t

    def calibrate(self, adapted: Params, support_x: torch.Tensor, support_y: torch.Tensor, kind: str) -> Params:
        if kind != "classification":
            return adapted
        with torch.no_grad():
            logits = super().forward(adapted, support_x)
        t = fit_temperature(logits, support_y)
        return {**adapted, TEMPERATURE_KEY: torch.tensor(t, dtype=logits.dtype, device=logits.device)}


_shot_folds = shot_folds  # the stratified folds of the cross-validated temperatures


@LEARNERS.register("metasgd-ts-cv")
class MetaSGDTemperatureCV(MetaSGDTemperature):
    """Meta-SGD + temperature scaling fitted on *cross-validated* support predictions.

    Why: fitted on the support set the model was just adapted to, the temperature sees
    near-perfect predictions and sharpens (T < 1), which makes the rare query mistakes
    costly in NLL (``MetaSGDTemperature``; measured NLL 0.615 against Meta-SGD's 0.160).  A user
    with only a support set would hold part of it out: here the support is split into ``folds``
    stratified folds (one shot per class each for 5-shot); for each fold the model is adapted
    from the meta-model on the others and predicts the held-out fold; the temperature minimises
    the NLL of those out-of-fold logits; the final model is adapted on the whole support set and
    divided by it.  Costs ``folds`` extra adaptations per client.  The out-of-fold models are
    adapted on ``(k-1)/k`` of the data, so they are slightly less confident than the final one:
    the fitted temperature is, if anything, a little low.

    Meta-training is Meta-SGD's (``adapt`` is only called in personalization; the meta-gradient
    uses the inner loop directly).  A support set with fewer than two examples of some class has
    no out-of-fold prediction for it; with fewer than two folds possible the temperature is 1.
    """

    name = "metasgd-ts-cv"

    def __init__(self, model: nn.Module, config: MetaConfig | None = None, *, folds: int = 5,
                 first_order: bool = False, gradients: Gradients | None = None,
                 prior: TemperaturePrior | None = None) -> None:
        super().__init__(model, config, first_order=first_order, gradients=gradients)
        if folds < 2:
            raise ConfigError(f"cross-validated temperature scaling needs folds >= 2, got {folds}")
        self.folds = folds
        #: with a prior shared by the federation (``securefml.bayes.temperature_prior``), the client's
        #: temperature is the posterior mean given its out-of-fold logits instead of their maximum likelihood
        self.prior = prior

    def query_loss(self, params: Params, task: Task) -> torch.Tensor:
        adapted = MetaSGD.adapt(self, params, task.support_x, task.support_y, task.kind)
        return self.loss(adapted, task.query_x, task.query_y, task.kind)

    def adapt(self, params: Params, task_x: torch.Tensor, task_y: torch.Tensor, kind: str,
              *, steps: int | None = None) -> Params:
        adapted = MetaSGD.adapt(self, params, task_x, task_y, kind, steps=steps)
        if kind != "classification":
            return adapted
        logits, labels = self.out_of_fold_logits(params, task_x, task_y, steps=steps)
        if self.prior is not None:
            t = self.prior.temperature(logits, labels)
        else:
            t = fit_temperature(logits, labels) if logits is not None and labels is not None else 1.0
        ref = next(iter(adapted.values()))
        return {**adapted, TEMPERATURE_KEY: torch.tensor(t, dtype=ref.dtype, device=ref.device)}

    def out_of_fold_logits(self, params: Params, x: torch.Tensor, y: torch.Tensor, *, steps: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """Meta-SGD's out-of-fold logits on a support set (``folds`` stratified folds, untempered)."""
        def adapted(xk: torch.Tensor, yk: torch.Tensor):  # type: ignore[no-untyped-def]
            part = MetaSGD.adapt(self, params, xk, yk, "classification", steps=steps)
            return lambda xo: MetaSGD.forward(self, {**params, **part}, xo)

        return out_of_fold_logits(adapted, x, y, folds=self.folds)

    def calibrate(self, adapted: Params, support_x: torch.Tensor, support_y: torch.Tensor, kind: str) -> Params:
        return adapted  # the temperature was fitted in ``adapt``, out of fold


class MetaSGDFixedTemperature(MetaSGDTemperature):
    """Meta-SGD whose personalized logits are divided by one temperature fixed in advance.

    For a temperature the federation fits once on *training* clients (their query sets after
    personalization, ``fit_temperature`` on the pooled logits) and ships with the model; the
    held-out clients never fit anything.  Meta-training is Meta-SGD's.
    """

    name = "metasgd-ts-fixed"

    def __init__(self, model: nn.Module, config: MetaConfig | None = None, *, temperature: float = 1.0,
                 first_order: bool = False, gradients: Gradients | None = None) -> None:
        super().__init__(model, config, first_order=first_order, gradients=gradients)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be a positive number, got {temperature}")
        self.temperature = float(temperature)

    def calibrate(self, adapted: Params, support_x: torch.Tensor, support_y: torch.Tensor, kind: str) -> Params:
        ref = next(iter(adapted.values()))
        return {**adapted, TEMPERATURE_KEY: torch.tensor(self.temperature, dtype=ref.dtype, device=ref.device)}
