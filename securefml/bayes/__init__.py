"""Bayesian personalization (``securefml.bayes``): a meta-learned Gaussian prior, local VI, calibrated predictions.

* ``BayesMetaSGD`` (``--algorithm bayes-metasgd``), ``BayesMAML`` (``bayes-maml``): amortized
  Bayesian meta-learning with a mean-field prior over the MLP's layers, local variational
  inference from the prior on the support set, Monte Carlo predictions.
* ``PFedBayes`` (``pfedbayes``): the pFedBayes baseline (Zhang et al., ICML 2022).
* ``MetaSGDTemperature`` (``metasgd-ts``): Meta-SGD with temperature scaling fitted on the support set;
  ``MetaSGDTemperatureCV`` (``metasgd-ts-cv``) fits it on cross-validated support predictions, and
  ``MetaSGDFixedTemperature`` applies one temperature fitted beforehand on training clients.
* ``softmax_head_ggn_diagonal`` / ``stationary_logvar``: the closed-form variance step of the
  output layer (``BayesConfig.head_variance_step``), so a client's posterior variance responds to
  its support set (``securefml.bayes.variance``); ``mlp_ggn_diagonal``: the exact diagonal GGN of
  every layer, for the step in the hidden layers too (``BayesConfig.variance_step_layers``).
* ``empirical_bayes_log_scale`` / ``scaled_posterior_logvars``: a per-client, per-layer scale of the
  prior's variances fitted on the support set by the free energy under an inverse-gamma hyper-prior
  (``BayesConfig.prior_scale_strength``), so a support set the prior explains badly widens the
  posterior (``securefml.bayes.hierarchical``).
* ``TemperaturePrior`` / ``fit_temperature_prior``: a per-client predictive temperature from
  cross-validated support predictions under a log-normal prior the federation fits on training
  clients (``BayesConfig.temperature_prior``, ``MetaSGDTemperatureCV(prior=...)``;
  ``securefml.bayes.temperature_prior``).
* ``mean_log_variance`` / ``precision_weighted``: the two ways to merge Gaussian priors, and why
  the federation uses the first (``securefml.bayes.aggregation``).

The learners are registered in ``securefml.meta.LEARNERS`` and run through every protocol,
selector, defense and user-level DP like the deterministic ones.  See ``docs/bayes.md``.
"""

from securefml.bayes.aggregation import mean_log_variance, precision_weighted
from securefml.bayes.gaussian import LOGVAR_PREFIX, kl_diagonal, kl_params, logvar_name
from securefml.bayes.hierarchical import empirical_bayes_log_scale, scaled_posterior_logvars
from securefml.bayes.learners import (
    LOGRATE_MAX,
    LOGRATE_MIN,
    TEMPERATURE_KEY,
    BayesConfig,
    BayesianLearner,
    BayesMAML,
    BayesMetaSGD,
    MetaSGDFixedTemperature,
    MetaSGDTemperature,
    MetaSGDTemperatureCV,
    PFedBayes,
)
from securefml.bayes.network import StochasticMLP
from securefml.bayes.temperature import fit_temperature
from securefml.bayes.temperature_prior import (
    TemperaturePrior,
    fit_temperature_prior,
    out_of_fold_logits,
    temperature_log_likelihood,
)
from securefml.bayes.variance import mlp_ggn_diagonal, softmax_head_ggn_diagonal, stationary_logvar
from securefml.meta import LEARNERS

__all__ = [
    "LEARNERS",
    "LOGRATE_MAX",
    "LOGRATE_MIN",
    "LOGVAR_PREFIX",
    "TEMPERATURE_KEY",
    "BayesConfig",
    "BayesMAML",
    "BayesMetaSGD",
    "BayesianLearner",
    "MetaSGDFixedTemperature",
    "MetaSGDTemperature",
    "MetaSGDTemperatureCV",
    "PFedBayes",
    "StochasticMLP",
    "TemperaturePrior",
    "empirical_bayes_log_scale",
    "fit_temperature",
    "fit_temperature_prior",
    "kl_diagonal",
    "kl_params",
    "logvar_name",
    "mean_log_variance",
    "mlp_ggn_diagonal",
    "out_of_fold_logits",
    "precision_weighted",
    "scaled_posterior_logvars",
    "softmax_head_ggn_diagonal",
    "stationary_logvar",
    "temperature_log_likelihood",
]

# The learners register in securefml.meta's LEARNERS with decorators beside their definitions
# (securefml/bayes/learners.py): securefml.meta never imports this package.
