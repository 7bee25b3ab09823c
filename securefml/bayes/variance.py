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

Hidden layers (``BayesConfig.variance_step_layers``).  For a hidden layer with pre-activation
``a_u`` and input ``h_j``, the logits depend on ``W_uj`` only through ``a_u``, so the GGN's
diagonal entry is ``h_j^2 * g_u^T Lambda g_u`` with ``g_u = dz / da_u`` (the column of the logits'
Jacobian for that unit) and ``Lambda = diag(p) - p p^T``; the bias's is ``g_u^T Lambda g_u``.
``g_u^T Lambda g_u = sum_k p_k g_ku^2 - (sum_k p_k g_ku)^2 >= 0``.  The Jacobian is propagated
backwards through the sampled weights: ``G_l = (G_{l+1} W_{l+1}) * phi'(a_l)``, ``G_L = I``
(``mlp_ggn_diagonal``).  Here the expectation over ``q`` samples the *weights* (one draw of every
Gaussian layer per Monte Carlo sample, shared by the support examples), not the pre-activations:
the local reparameterization trick gives the right distribution of each pre-activation but not
of the Jacobian ``dz / dh = W`` of the layers above.  For a hidden layer the GGN is not the
Hessian: the dropped term ``sum_k (dl / dz_k) d^2 z_k / dW_uj^2`` is zero almost everywhere for a
ReLU network (piecewise linear in each single weight), but ``E_q`` of a ReLU network's loss also
picks up the kinks (Price's theorem applies to the smoothed expectation), so the GGN's fixed point
is the standard Gauss-Newton approximation to the stationary point (VOGN's), not the exact one;
``test_bayes_variance.py`` measures how close the free energy's gradient gets to zero there.

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

from collections.abc import Callable, Sequence

import torch

from securefml.bayes.gaussian import clamp_logvar
from securefml.errors import ConfigError

__all__ = ["mlp_ggn_diagonal", "softmax_head_ggn_diagonal", "stationary_logvar"]


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


#: elementwise activations whose derivative ``mlp_ggn_diagonal`` takes by a forward-mode JVP with ones
ELEMENTWISE = (torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.GELU, torch.nn.ELU, torch.nn.LeakyReLU,
               torch.nn.SiLU, torch.nn.Softplus, torch.nn.Identity)


def mlp_ggn_diagonal(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                     activations: Sequence[Callable[[torch.Tensor], torch.Tensor] | None]
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-example mean of the exact diagonal GGN of the cross-entropy in every layer of an MLP.

    Parameters
    ----------
    x:
        ``[n, d]`` inputs.
    weights, biases:
        Per layer ``[S, out, in]`` and ``[S, out]``: ``S`` sampled (or repeated) weights, one per
        Monte Carlo sample; the last layer gives the logits.
    activations:
        ``activations[l]`` is applied to layer ``l``'s pre-activation (elementwise; ``None`` for none,
        the last must be ``None``).  Its derivative is a forward-mode JVP with a tangent of ones,
        differentiable, so a meta-gradient can flow through the step.

    Returns
    -------
    list of (weight, bias):
        Per layer ``[out, in]`` and ``[out]``: ``mean_{i,s} h_j^2 g_u^T Lambda g_u`` and
        ``mean_{i,s} g_u^T Lambda g_u`` (see the module docstring), the Monte Carlo estimate of
        ``E_q[(1/n) sum_i diag GGN_i]``.
    """
    if not (len(weights) == len(biases) == len(activations)) or not weights:
        raise ConfigError(f"one weight, bias and activation per layer, got {len(weights)}, {len(biases)}, "
                          f"{len(activations)}")
    if activations[-1] is not None:
        raise ConfigError("the last layer gives the logits: no activation after it")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ConfigError(f"inputs must be [n, d] with n >= 1, got {tuple(x.shape)}")
    samples = int(weights[0].shape[0])
    h = x.unsqueeze(1).expand(x.shape[0], samples, x.shape[1])
    inputs: list[torch.Tensor] = []
    slopes: list[torch.Tensor | None] = []
    for w, b, act in zip(weights, biases, activations):
        if w.dim() != 3 or b.dim() != 2 or w.shape[0] != samples or w.shape[2] != h.shape[-1]:
            raise ConfigError(f"layer weights [S, out, in] matching the input width {h.shape[-1]} and S = {samples} "
                              f"are needed, got {tuple(w.shape)}")
        inputs.append(h)
        a = torch.einsum("nsi,soi->nso", h, w) + b
        if act is None:
            slopes.append(None)
            h = a
        else:
            out, slope = torch.func.jvp(act, (a,), (torch.ones_like(a),))[:2]
            slopes.append(slope)
            h = out
    probs = torch.softmax(h, dim=-1)  # [n, S, C]
    count = x.shape[0] * samples
    result: list[tuple[torch.Tensor, torch.Tensor]] = []
    jac: torch.Tensor | None = None  # [n, S, C, u]: d logits / d pre-activation of the current layer
    for layer in reversed(range(len(weights))):
        if jac is None:
            r = probs * (1 - probs)  # G = I: the diagonal of Lambda
        else:
            slope = slopes[layer]
            assert slope is not None
            jac = jac * slope.unsqueeze(2)
            pj = torch.einsum("nsc,nscu->nsu", probs, jac)
            r = torch.einsum("nsc,nscu->nsu", probs, jac * jac) - pj * pj
        hin = inputs[layer]
        result.append((torch.einsum("nsu,nsj->uj", r, hin * hin) / count, r.sum(dim=(0, 1)) / count))
        if layer > 0:
            w = weights[layer]
            # d logits / d input of this layer, [n, S, C, in]
            jac = w.unsqueeze(0).expand(x.shape[0], *w.shape) if jac is None else torch.einsum("nscu,sui->nsci", jac, w)
    return result[::-1]
