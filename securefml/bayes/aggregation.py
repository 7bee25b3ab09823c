"""How the clients' Gaussian priors are merged, and why the federation uses the mean of log-variances.

Two candidate merges of ``n`` diagonal Gaussians ``N(mu_i, exp(logvar_i))`` with weights ``a_i``:

* **mean of log-variances** (``mean_log_variance``): ``mu = sum a_i mu_i``,
  ``logvar = sum a_i logvar_i`` (a geometric mean of the variances).  This is exactly what the
  federation computes, since every client uploads ``theta_local - theta`` of its means and
  log-variances and the protocols sum those linearly; the server optimizer then steps on it.
* **precision-weighted natural parameters** (``precision_weighted``): precisions
  ``lambda_i = exp(-logvar_i)`` and ``lambda_i * mu_i`` sum linearly too (so secure aggregation
  could compute them), giving ``lambda = sum a_i lambda_i`` and ``mu = sum a_i lambda_i mu_i / lambda``
  (the product-of-experts merge).

The federation uses the first, because:

1. **Validity under any input.**  A log-variance is an unconstrained real: the weighted mean, the
   coordinate-wise median, a trimmed mean, Krum's choice or any other rule's output of finite
   log-variances is a finite log-variance, i.e. a positive variance, whatever a Byzantine client
   sends.  A sum of precisions is positive only if every term is: one client uploading a negative
   "precision" (which secure aggregation hides from the server) can make the merged precision zero
   or negative, an invalid Gaussian that no later step repairs.
2. **Robust rules apply unchanged.**  Coordinate-wise and geometric rules act on the same vectors
   the plaintext mean does; a precision-weighted merge is a ratio of two sums, which a robust rule
   over the two sums separately does not make robust.
3. **It is what the server optimizer already does** (Adam on the flat meta-parameters), so prior
   means, log-variances and the Meta-SGD rates are treated alike.

The cost: the merged prior does not get narrower as clients agree (precision-weighting would
shrink the variance by ``~1/n``); a meta-learned prior is a *prior for a new client*, not a
posterior over a shared weight, so that is the behaviour wanted.  Tests check both the server's
result (it equals ``mean_log_variance`` of the local priors under plaintext, CKKS and SecAgg+) and
the failure mode of the alternative under an adversary.
"""

from __future__ import annotations

import torch

from securefml.errors import InvalidUpdateError

__all__ = ["mean_log_variance", "precision_weighted"]


def _weights(n: int, weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    w = torch.ones(n, dtype=like.dtype, device=like.device) if weights is None else weights.to(like)
    return w / w.sum()


def mean_log_variance(means: torch.Tensor, logvars: torch.Tensor,
                      weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted means of ``[n, d]`` means and log-variances (the federation's merge).

    >>> mu, lv = mean_log_variance(torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [2.0]]))
    >>> float(mu), float(lv)
    (1.0, 1.0)
    """
    w = _weights(means.shape[0], weights, means)
    return (w[:, None] * means).sum(0), (w[:, None] * logvars).sum(0)


def precision_weighted(means: torch.Tensor, precisions: torch.Tensor,
                       weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-of-experts merge from natural parameters; returns ``(mean, logvar)``.

    ``precisions`` are what clients would upload (``exp(-logvar)``).  Raises
    ``InvalidUpdateError`` when the merged precision is not positive and finite: the failure a
    single client can cause without being seen under secure aggregation.

    >>> mu, lv = precision_weighted(torch.tensor([[0.0], [3.0]]), torch.tensor([[1.0], [2.0]]))
    >>> float(mu), round(float(lv), 6)
    (2.0, -0.405465)
    """
    w = _weights(means.shape[0], weights, means)
    lam = (w[:, None] * precisions).sum(0)
    eta = (w[:, None] * precisions * means).sum(0)
    bad = ~torch.isfinite(lam) | (lam <= 0)
    if bool(bad.any()):
        raise InvalidUpdateError(f"merged precision is not positive at {int(bad.sum())} coordinates: "
                                 "not a Gaussian (a client sent a non-positive precision)")
    return eta / lam, -torch.log(lam)
