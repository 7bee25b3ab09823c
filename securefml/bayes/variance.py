"""A closed-form variance step for the softmax head: the mean-field ELBO's stationary point in the variances.

Why.  Five gradient steps of variational inference from the prior move the posterior's
log-variances by 3e-5 to 9e-5 (measured on the 200-round models, ``docs/bayes.md``): the
gradient of the free energy in a log-variance is tiny at small variances, so a client's
posterior keeps the prior's variances and the predictive uncertainty is the same for every
client.  This module replaces those slow steps, for the output layer, by the point the steps
would converge to.

Derivation.  ``securefml.bayes`` minimises, per client, the free energy per example

    F(q) = E_q[ (1/n) sum_i l_i(w) ] + kappa * KL(q || p) / n,

with ``q = N(m, diag(s2))``, ``p = N(m_p, diag(s2_p))``, ``l_i`` the cross-entropy of support
example ``i`` and ``kappa`` the KL weight (``BayesConfig.kl_weight``).  For a Gaussian ``q``,
``d E_q[l] / d s2_j = 0.5 E_q[d^2 l / d w_j^2]`` (Bonnet / Price), and
``d KL / d s2_j = 0.5 (1 / s2_p_j - 1 / s2_j)``.  Setting ``dF / d s2_j = 0``:

    1 / s2_j = 1 / s2_p_j + (n / kappa) * E_q[ (1/n) sum_i d^2 l_i / d w_j^2 ]
             = 1 / s2_p_j + (1 / kappa) * E_q[ sum_i d^2 l_i / d w_j^2 ].

For the softmax head ``z = W h + b`` (``h`` the penultimate features), the cross-entropy's
Hessian in the logits is ``diag(p) - p p^T`` and ``z`` is linear in ``(W, b)``, so the Hessian's
diagonal in the head's weights is exactly the generalized Gauss-Newton's (GGN):
``p_k (1 - p_k) h_j^2`` for ``W_kj`` and ``p_k (1 - p_k)`` for ``b_k``; both are >= 0, so the
posterior precision is at least the prior's.  The expectation over ``q`` is a Monte Carlo
average over sampled features and logits (the local reparameterization trick samples the head's
pre-activations, which is what ``p`` is computed from).  The right side depends on ``q`` through
``p``; one evaluation at the current ``q`` is the natural-gradient (VOGN-style) variance update
with step 1 (Khan et al., ICML 2018), repeated it is a fixed-point iteration.

Guarantees (tested): the diagonal equals autograd's Hessian of the mean cross-entropy in the
head's weights; the free energy's own reparameterized gradient in the head's log-variances
vanishes at the fixed point (up to Monte Carlo error); the variance never exceeds the prior's and
never grows when support examples are added (``test_bayes_variance.py``, hypothesis-driven).
The posterior's means are untouched.

References
----------
Opper & Archambeau, The Variational Gaussian Approximation Revisited, Neural Computation 2009.
Khan et al., Fast and Scalable Bayesian Deep Learning by Weight-Perturbation in Adam (VOGN),
ICML 2018.  Martens, New Insights and Perspectives on the Natural Gradient Method, JMLR 2020.
"""

from __future__ import annotations

import torch

from securefml.bayes.gaussian import clamp_logvar
from securefml.errors import ConfigError

__all__ = ["softmax_head_ggn_diagonal", "stationary_logvar"]


def softmax_head_ggn_diagonal(features: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example mean of the diagonal GGN of the cross-entropy in a softmax head's weight and bias.

    Parameters
    ----------
    features:
        ``[n, S, d]`` inputs of the head (``S`` Monte Carlo samples per example).
    probs:
        ``[n, S, C]`` softmax probabilities of the head's (sampled) logits for the same samples.

    Returns
    -------
    (weight, bias):
        ``[C, d]`` and ``[C]``: ``mean_{i,s} p_k (1 - p_k) h_j^2`` and ``mean_{i,s} p_k (1 - p_k)``.
        Mean over examples *and* samples: the Monte Carlo estimate of ``E_q[(1/n) sum_i diag H_i]``.
    """
    if features.dim() != 3 or probs.dim() != 3 or features.shape[:2] != probs.shape[:2]:
        raise ConfigError(f"features [n, S, d] and probs [n, S, C] must agree in n and S, "
                          f"got {tuple(features.shape)} and {tuple(probs.shape)}")
    count = features.shape[0] * features.shape[1]
    if count == 0:
        raise ConfigError("the GGN of an empty support set is undefined")
    lam = probs * (1 - probs)
    weight = torch.einsum("nsc,nsd->cd", lam, features * features) / count
    return weight, lam.sum(dim=(0, 1)) / count


def stationary_logvar(prior_logvar: torch.Tensor, ggn_mean: torch.Tensor, n_examples: int,
                      kl_weight: float) -> torch.Tensor:
    """The log-variance at which the free energy is stationary: ``-log(1 / s2_p + (n / kappa) * ggn_mean)``.

    ``ggn_mean`` is the per-example mean of the diagonal GGN (``softmax_head_ggn_diagonal``);
    ``kl_weight`` (``kappa``) must be positive: with no KL term the stationary variance is 0.
    The result is clamped to the learners' log-variance range (``clamp_logvar``).
    """
    if not kl_weight > 0:
        raise ConfigError(f"the closed-form variance step needs a positive KL weight, got {kl_weight}")
    if n_examples < 1:
        raise ConfigError(f"the closed-form variance step needs support examples, got {n_examples}")
    precision = torch.exp(-clamp_logvar(prior_logvar)) + (n_examples / kl_weight) * ggn_mean
    return clamp_logvar(-torch.log(precision))
