"""Renyi DP of the Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021): the pure math.

The Skellam distribution of variance ``v`` is ``Poisson(v/2) - Poisson(v/2)``.  It is closed
under summation (``Sk(v1) + Sk(v2) = Sk(v1 + v2)``), so clients that each add an independent
share to their integer vector before secure aggregation release the integer sum plus exactly
``Sk(sum of the shares' variances)``: one Skellam mechanism, with no rounding after the noise.

RDP (Agarwal et al. 2021, Theorem 3.5 / Corollary 3.6, variance parametrisation): for an integer
query with L1 sensitivity ``l1`` and L2 sensitivity ``l2``, adding i.i.d. ``Sk(v)`` noise to every
coordinate is ``(alpha, eps(alpha))``-RDP for every integer ``alpha > 1`` with

    eps(alpha) <= alpha l2^2 / (2 v) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 v^2), 3 l1 / (2 v)).

The first term is the Gaussian mechanism's RDP at the same variance; the second vanishes as
``v`` grows with ``l2^2 / v`` fixed (the continuous limit, checked in the tests against the
Gaussian and against the exact divergence of the one-dimensional Skellam distribution).

Rounding (``rounded_sensitivity``): a real vector ``x`` with ``||x||_2 <= S`` scaled by ``g`` and
rounded coordinate-wise (stochastically or not: every coordinate moves by less than one) is an
integer vector ``q`` with ``||q||_2 < g S + sqrt(d)``; and because every non-zero coordinate of an
integer vector has magnitude at least 1, ``||q||_1 <= min(sqrt(d) ||q||_2, ||q||_2^2)``.  Those are
the sensitivities under *zero-out* neighbouring (one client's update replaced by zeros, which
encode to exactly zero), the relation that fits a server which sees who took part.

Composition adds RDP order by order; the conversion to (epsilon, delta) is Opacus'
``get_privacy_spent`` (Balle et al. 2020's conversion), so no home-made formula is used there.

References
----------
Agarwal, Kairouz, Liu, The Skellam Mechanism for Differentially Private Federated Learning,
NeurIPS 2021; Mironov, Renyi Differential Privacy, CSF 2017; Kairouz, Liu, Steinke, The
Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation, ICML 2021
(rounding bounds, zero-out neighbouring).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent

from securefml.errors import ConfigError

__all__ = [
    "ORDERS",
    "rdp_to_epsilon",
    "rounded_sensitivity",
    "skellam_epsilon",
    "skellam_rdp",
    "skellam_rdp_curve",
    "noise_multiplier_for_target",
]

#: integer RDP orders (the bound holds for integer alpha > 1 only)
ORDERS: tuple[int, ...] = tuple(range(2, 65)) + tuple(range(72, 257, 8)) + (320, 384, 512)


def skellam_rdp(alpha: int, *, l1: float, l2: float, variance: float) -> float:
    """The RDP bound above at integer order ``alpha`` for per-coordinate noise ``Sk(variance)``."""
    if int(alpha) != alpha or alpha < 2:
        raise ConfigError(f"the Skellam RDP bound holds for integer orders >= 2, got {alpha}")
    if variance <= 0:
        return math.inf
    a, v = float(alpha), float(variance)
    return a * l2**2 / (2 * v) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * v**2), 3 * l1 / (2 * v))


def skellam_rdp_curve(*, l1: float, l2: float, variance: float, orders: Sequence[int] = ORDERS) -> np.ndarray:
    """``skellam_rdp`` at every order of ``orders``."""
    return np.array([skellam_rdp(a, l1=l1, l2=l2, variance=variance) for a in orders])


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: Sequence[int] = ORDERS) -> float:
    """The (epsilon, delta) guarantee of an RDP curve (Opacus' conversion); ``inf`` if unbounded."""
    rdp = np.asarray(rdp, dtype=float)
    if not np.all(np.isfinite(rdp)):
        return math.inf
    if not np.any(rdp > 0):
        return 0.0
    with warnings.catch_warnings():  # Opacus warns when the best order is at the end of the range
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def skellam_epsilon(releases: Sequence[tuple[float, float, float]], delta: float) -> float:
    """Epsilon of the composition of Skellam releases ``[(l1, l2, variance), ...]`` at ``delta``."""
    total = np.zeros(len(ORDERS))
    for l1, l2, v in releases:
        total = total + skellam_rdp_curve(l1=l1, l2=l2, variance=v)
    return rdp_to_epsilon(total, delta)


def rounded_sensitivity(*, scale: float, clip: float, dim: int) -> tuple[float, float]:
    """``(l1, l2)`` of ``round(scale * x)`` over ``||x||_2 <= clip`` in ``dim`` coordinates (see above).

    A relative margin of 1e-6 on ``scale * clip`` covers the float32 rounding of a clipped vector.
    """
    if dim < 1 or not (scale > 0 and clip > 0):
        raise ConfigError(f"need dim >= 1, scale > 0 and clip > 0, got {dim}, {scale}, {clip}")
    l2 = scale * clip * (1 + 1e-6) + math.sqrt(dim)
    l1 = min(math.sqrt(dim) * l2, l2**2)
    return l1, l2


def noise_multiplier_for_target(*, target_epsilon: float, delta: float, releases: int, l1: float,
                                l2: float) -> float:
    """The smallest z (noise std ``z * l2`` on the sum) whose ``releases``-fold composition spends the target.

    Bisection on the exact RDP bound (epsilon decreases in z); ``ConfigError`` if no z below 1e4
    reaches the target.
    """
    if math.isinf(target_epsilon):
        return 0.0
    if releases <= 0:
        raise ConfigError(f"no release is planned (releases={releases}); nothing to calibrate noise for")

    def eps(z: float) -> float:
        return rdp_to_epsilon(releases * skellam_rdp_curve(l1=l1, l2=l2, variance=(z * l2) ** 2), delta)

    lo, hi = 1e-3, 1e4
    if eps(hi) > target_epsilon:
        raise ConfigError(f"cannot reach epsilon={target_epsilon} at delta={delta} over {releases} releases with "
                          "the Skellam mechanism; raise the target or lower the number of rounds")
    if eps(lo) <= target_epsilon:
        return lo
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-6:
            break
    return hi
