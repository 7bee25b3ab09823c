"""Closed-form math of diagonal Gaussians over named weights: KL divergence, parameter names.

A mean-field Gaussian over the weights of a layer is stored as two tensors of the weight's
shape: the mean (under the weight's own name, e.g. ``layers.0.weight``) and the log-variance
(under ``logvar.layers.0.weight``).  Log-variances are unconstrained reals, so gradient steps,
server optimizers and every robust aggregation rule keep the variance positive.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from securefml.meta.base import Params

__all__ = ["LOGVAR_MAX", "LOGVAR_MIN", "LOGVAR_PREFIX", "clamp_logvar", "kl_diagonal", "kl_params", "logvar_name"]

LOGVAR_PREFIX = "logvar."
#: log-variances are clamped to this range wherever they are used (std from 3e-4 to 2.7): a
#: diverged or Byzantine value cannot produce inf/nan samples, only a very wide or narrow one
LOGVAR_MIN = -16.0
LOGVAR_MAX = 2.0


def logvar_name(name: str) -> str:
    """``layers.0.weight -> logvar.layers.0.weight``."""
    return LOGVAR_PREFIX + name


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    return logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def kl_diagonal(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu_q, e^lv_q) || N(mu_p, e^lv_p))`` summed over all entries.

    ``0.5 * sum(lv_p - lv_q + (e^lv_q + (mu_q - mu_p)^2) / e^lv_p - 1)``.

    >>> z = torch.zeros(3)
    >>> float(kl_diagonal(z, z, z, z))
    0.0
    >>> round(float(kl_diagonal(torch.ones(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))), 6)
    0.5
    """
    # exp(lv_q - lv_p) rather than exp(lv_q) * exp(-lv_p): exactly 0 when q = p, in any precision
    return 0.5 * (logvar_p - logvar_q + torch.exp(logvar_q - logvar_p) + (mu_q - mu_p) ** 2 * torch.exp(-logvar_p)
                  - 1).sum()


def kl_params(q: Params, p: Params, names: Iterable[str]) -> torch.Tensor:
    """KL between two mean-field Gaussians over the weights ``names`` (log-variances clamped)."""
    total = None
    for n in names:
        term = kl_diagonal(q[n], clamp_logvar(q[logvar_name(n)]), p[n], clamp_logvar(p[logvar_name(n)]))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("kl_params needs at least one weight name")
    return total
