"""An empirical-Bayes prior scale per client and layer: a posterior width that grows with the support set's misfit.

Why.  The closed-form variance step (``securefml.bayes.variance``) sets a client's posterior
precision to the prior's plus the support set's curvature.  The curvature ``p (1 - p)`` is largest
where the adapted model is *unsure*, so the clients the model fits worst got the narrowest
posteriors (Spearman of the head's log-variance against query accuracy +0.28 to +0.43 on the
200-round models, ``docs/bayes.md``).  Nothing in that step can widen a posterior: the prior's
variances are an upper bound.  A hierarchical prior lets the support set say that the meta-learned
prior is too narrow *for this client*.

Model.  Each Gaussian layer ``l`` of a client gets a prior ``N(m_p, s_l * s2_p)`` with a scale
``s_l > 0`` and an inverse-gamma hyper-prior on it with shape ``nu - 1`` and scale ``nu s0``
(mode ``s0``; ``s0 = 1`` is the meta-learned prior itself), ``-log p(s) = nu (log s + s0 / s) +
const``; ``nu`` (the ``strength``, a pseudo-count shared by the federation) says how much evidence
it takes to move ``s`` away from ``s0``.  The client minimises, in the posterior's variances ``s2`` and in ``s_l``, the
free energy per example of ``securefml.bayes`` with the hyper-prior tempered like the KL:

    F = E_q[(1/n) sum_i l_i] + (kappa / n) * [ KL(q || N(m_p, s s2_p)) + nu (log s + s0 / s) ].

With the expected NLL's curvature in ``s2_j`` from the diagonal GGN ``G_j`` (as in the variance
step), and ``c_j = (n / kappa) G_j``, the stationary point is (coordinate-wise exact):

    1 / s2_j = 1 / (s s2_p_j) + c_j                                  (the variance step, prior scaled)
    s = (A + 2 nu s0) / (gamma(s) + 2 nu),   A = sum_j (m_j - m_p_j)^2 / s2_p_j,
    gamma(s) = sum_j x_j / (1 + x_j),     x_j = s s2_p_j c_j,

the variational form of MacKay's evidence update (MacKay 1992; Tipping 2001 for the ARD form):
``A`` is how many prior variances the support set moved the means, ``gamma`` the number of
directions the support set determines.  Under a prior that fits the client, the two agree
(``E[A] ~ gamma``) and ``s ~ 1``; a support set that pulls the means further than the prior
expects (one the prior explains badly) gets ``s > 1`` and a wider posterior in every direction,
most in those the support set does not determine; a client the prior explains better than
expected gets a narrower one.  ``nu -> inf`` is the variance step with the prior scaled by ``s0``
(``s0 = 1``: without the scale).  Where the meta-learned prior's level does not match the means'
displacements at all (measured: local inference at KL weight 0.01 moves the means by about one
prior standard deviation per weight while the support set determines a few per cent of the
directions, so ``A >> gamma`` for every client and ``s0 = 1`` widens everyone), the federation
sets ``s0`` per layer from its training clients (``BayesConfig.prior_scale_modes``), and ``s``
then says how this client differs from those.

Solving for ``s``.  With ``t = log s``, ``h(t) = t + log(gamma(e^t) + 2 nu) - log(A + 2 nu s0)`` is
increasing with slope in ``[1, 2]`` (``s gamma'(s) = sum x / (1 + x)^2 <= gamma``), so it has one
root and ``t <- t - h(t) / 2`` is a contraction (factor at most 1/2) that never overshoots:
``iterations`` of it from ``t = 0`` (differentiable, so a meta-gradient flows through it).

Guarantees (tested in ``tests/unit/test_bayes_hierarchical.py``): at the returned point the
gradient of that free energy in every ``log s2_j`` and in ``log s`` vanishes (autograd on the
project's own ``kl_diagonal``); the scale and every posterior variance are non-decreasing in each
squared displacement of the means (hypothesis, exact for any number of iterations: each
iteration is monotone in ``t`` and in ``A``); a client whose means did not move and whose support
set determines nothing keeps ``s = s0``.  What is *not* guaranteed: that ``A`` measures misfit.  The means come
from a few gradient steps of local inference, not from the free energy's minimum, and how far they
move depends on the learned rates; whether the width then tracks held-out misfit is measured
(``benchmarks/bayes_calibration.py``, ``docs/bayes.md``), not claimed.

References
----------
MacKay, Bayesian Interpolation, Neural Computation 1992.  Tipping, Sparse Bayesian Learning and
the Relevance Vector Machine, JMLR 2001.  Bishop, Pattern Recognition and Machine Learning, 2006,
sections 3.5 and 10.1 (the evidence approximation, variational EM for a prior precision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from securefml.bayes.gaussian import clamp_logvar
from securefml.errors import ConfigError

__all__ = ["empirical_bayes_log_scale", "scaled_posterior_logvars"]


def _check_strength(strength: float) -> None:
    if not (math.isfinite(strength) and strength > 0):
        raise ConfigError(f"the prior scale's hyper-prior strength nu must be a positive number, got {strength}")


def empirical_bayes_log_scale(displacement_sq: torch.Tensor, prior_logvar: torch.Tensor, curvature: torch.Tensor,
                              *, strength: float, mode: float = 1.0, iterations: int = 40) -> torch.Tensor:
    """``log s`` of one layer: the root of ``s (gamma(s) + 2 nu) = A + 2 nu s0`` (see the module docstring).

    Parameters
    ----------
    displacement_sq:
        ``(m - m_p)^2`` of every entry of the layer (weights and biases concatenated, flat).
    prior_logvar:
        The meta-learned prior's log-variances of the same entries (natural units; clamped).
    curvature:
        ``c_j = (n / kappa) * G_j``: the support set's summed diagonal GGN over the KL weight (``>= 0``).
    strength:
        ``nu`` (> 0): the hyper-prior's pseudo-count; larger keeps ``s`` nearer its mode.
    mode:
        ``s0`` (> 0): the hyper-prior's mode (1: the meta-learned prior; or a level the federation
        fitted on training clients).
    iterations:
        Steps ``t <- t - h(t) / 2`` from ``t = 0``; the error shrinks by at least 2x per step.

    Returns
    -------
    torch.Tensor
        A scalar ``log s``, differentiable in every input.
    """
    _check_strength(strength)
    if not (math.isfinite(mode) and mode > 0):
        raise ConfigError(f"the prior scale's hyper-prior mode must be a positive number, got {mode}")
    if iterations < 1:
        raise ConfigError(f"the prior scale needs at least one iteration, got {iterations}")
    if not (displacement_sq.shape == prior_logvar.shape == curvature.shape) or displacement_sq.dim() != 1:
        raise ConfigError(f"displacements, prior log-variances and curvatures must be flat and of one length, got "
                          f"{tuple(displacement_sq.shape)}, {tuple(prior_logvar.shape)}, {tuple(curvature.shape)}")
    var_p = torch.exp(clamp_logvar(prior_logvar))
    pseudo = 2.0 * strength
    log_rhs = torch.log((displacement_sq / var_p).sum() + pseudo * mode)
    base = var_p * curvature.clamp_min(0)
    t = torch.zeros((), dtype=displacement_sq.dtype, device=displacement_sq.device)
    for _ in range(iterations):
        x = torch.exp(t) * base
        gamma = (x / (1 + x)).sum()
        t = t - 0.5 * (t + torch.log(gamma + pseudo) - log_rhs)
    return t


def scaled_posterior_logvars(means: Sequence[torch.Tensor], prior_means: Sequence[torch.Tensor],
                             prior_logvars: Sequence[torch.Tensor], ggn_means: Sequence[torch.Tensor],
                             n_examples: int, kl_weight: float, *, strength: float, mode: float = 1.0,
                             iterations: int = 40) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One layer's posterior log-variances under its empirical-Bayes prior scale, and ``log s``.

    ``means``, ``prior_means``, ``prior_logvars``, ``ggn_means``: one tensor per part of the layer
    (weight, bias), natural units; ``ggn_means`` is the per-example mean diagonal GGN
    (``mlp_ggn_diagonal``).  Returns ``-log(1 / (s s2_p) + (n / kappa) G)`` per part (clamped to the
    learners' range) and the scalar ``log s`` they share.
    """
    if not kl_weight > 0:
        raise ConfigError(f"the prior scale needs a positive KL weight, got {kl_weight}")
    if n_examples < 1:
        raise ConfigError(f"the prior scale needs support examples, got {n_examples}")
    if not (len(means) == len(prior_means) == len(prior_logvars) == len(ggn_means)) or not means:
        raise ConfigError("one mean, prior mean, prior log-variance and GGN diagonal per part of the layer")
    factor = n_examples / kl_weight
    lv_p = [clamp_logvar(v) for v in prior_logvars]
    log_s = empirical_bayes_log_scale(torch.cat([((m - mp) ** 2).flatten() for m, mp in zip(means, prior_means)]),
                                      torch.cat([v.flatten() for v in lv_p]),
                                      torch.cat([(factor * g).flatten() for g in ggn_means]),
                                      strength=strength, mode=mode, iterations=iterations)
    out = [clamp_logvar(-torch.log(torch.exp(-(v + log_s)) + factor * g)) for v, g in zip(lv_p, ggn_means)]
    return out, log_s
