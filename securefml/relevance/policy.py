"""``RelevancePolicy``: the CKKS key holder's policy for per-client (relevance-weighted) aggregates.

Why the key holder needs more than ``DecryptionPolicy``
-------------------------------------------------------
Relevance aggregation decrypts one combination ``a_i = sum_j w_ij x_j`` per client.  The
project's ``DecryptionPolicy`` bounds the number of contributors and the largest share; a
row that puts 0.45 on client i itself, 0.45 on one other client j and 0.1 spread over the
rest passes it (no share above 0.5, many contributors), yet client i, who knows its own
``x_i``, reads ``x_j`` almost alone from ``a_i``.  The bound that matters is the effective
number of the *other* contributors, ``n_eff = (sum_{j != i} w_ij)^2 / sum_{j != i} w_ij^2``
(``securefml.relevance.weights``).

The key holder does not know whose aggregate a combination is (the request carries
coefficients and signed uploads, not a recipient).  So this policy is *recipient-blind*: it
requires ``n_eff >= min_effective`` for the rest after leaving out **any one** client (and
after leaving out nobody, for a new client that contributed nothing):
``worst_case_effective(w) >= min_effective``.  That holds whoever the recipient is, so a
server that lies about the recipient gains nothing.  The relevance step tempers its rows to
meet the same bound and checks them with the same function before it asks
(``RelevanceAggregation`` under CKKS), so an honest server is never refused.

Threat model
------------
As ``securefml.protocols.ckks_policy``: a curious server that may ask the key holder for any
coefficients over any signed uploads of a round; the key holder follows its code and does not
collude with the server.  Guarantee (``tests/property/test_relevance_ckks_adversary.py``, a
hypothesis-driven server): every combination the key holder decrypts satisfies the base
policy *and* has ``worst_case_effective >= min_effective``; every other request raises
``PolicyViolation`` before anything is decrypted.  Not covered: colluding clients pooling
their aggregates; a party that obtains several clients' aggregates of one round (each
``a_i`` must reach client i only, see ``docs/relevance.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from securefml.errors import ConfigError
from securefml.protocols.ckks_policy import SKIP_BELOW, DecryptionPolicy
from securefml.relevance.weights import worst_case_effective

__all__ = ["RelevancePolicy"]


@dataclass(frozen=True)
class RelevancePolicy(DecryptionPolicy):
    """``DecryptionPolicy`` plus the recipient-blind effective-contributors bound.

    Parameters
    ----------
    min_effective:
        ``m_min``: the smallest ``worst_case_effective`` of a decrypted combination's
        effective weights (1 disables the extra bound).
    min_contributors, max_share, negligible_share, reference_party:
        As for ``DecryptionPolicy``.  ``max_share`` defaults to 1.0 here when not given: a
        per-client aggregate legitimately gives its own client the largest weight, and the
        ``min_effective`` bound is the one that limits what the recipient learns.

    Examples
    --------
    >>> policy = RelevancePolicy(min_effective=2.0)
    >>> policy.violation({1: 0.45, 2: 0.45, 3: 0.05, 4: 0.05}) is not None  # 1 or 2 reads the other
    True
    >>> policy.violation({1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25}) is None
    True
    """

    min_effective: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.min_effective) and self.min_effective >= 1):
            raise ConfigError(f"min_effective must be a finite number >= 1, got {self.min_effective}")

    @property
    def max_share_bound(self) -> float:
        return float(self.max_share) if self.max_share is not None else 1.0

    def violation(self, weights: Mapping[int, float]) -> str | None:
        reason = super().violation(weights)
        if reason is not None or self.min_effective <= 1:
            return reason
        live = [float(w) for w in weights.values() if w > SKIP_BELOW]
        n_eff = worst_case_effective(torch.tensor(live, dtype=torch.float64))
        if n_eff < self.min_effective - 1e-9:
            return (f"leaving out one client, the rest have {n_eff:.3f} effective contributors, "
                    f"below the policy's {self.min_effective:g} (a concentrated per-client combination)")
        return None
