"""Differential privacy for meta-learning clients (``securefml.privacy``).

Three modes, one seam (:func:`setup_privacy`):

``none``
    No mechanism; the learner and the server run unchanged.
``record``
    DP-SGD inside each client (:mod:`securefml.privacy.record`): the learner's gradient function
    is swapped for :class:`~securefml.privacy.dp_gradients.DPGradients` (per-example gradients
    with ``vmap(grad)``, clipping, Gaussian noise, one step on the client's Opacus accountant per
    released gradient), so any learner that declares ``released_gradients()`` is privatized
    without this package knowing it.  The privacy unit is one local example; each client has its
    own accountant and reports its own epsilon.  FedAvg, Reptile, FOMAML and first-order
    Meta-SGD are fully covered.  For second-order MAML the per-query-example meta-gradients are
    privatized, but **the support set is not covered** (every support example influences every
    meta-gradient): it must be acknowledged with ``allow_support_leak=True``, and user-level DP
    is the recommended mode for MAML.
``user``
    Clip each client's whole update to S and add noise to the sum (:mod:`securefml.privacy.user`):
    Gaussian ``z S`` centrally at the server (one Opacus accountant, fed the Poisson cohort
    sampling rate once per round), or integer Skellam shares added by the clients inside
    SecAgg's ring (:mod:`securefml.privacy.distributed`, per-client RDP against the server).
    The privacy unit is a client.

Accounting uses Opacus' RDP or PRV accountants (:mod:`securefml.privacy.accounting`); a target
epsilon is turned into a noise multiplier with Opacus' ``get_noise_multiplier`` for the planned
number of steps.  Epsilon is computed once per round, never per step.

Matching the mechanism to its accounting
----------------------------------------
- :func:`check_mechanism`: user-level DP only with the (equally) weighted mean; distributed
  placement only with SecAgg without buckets (the server sees the noised sum alone).
- Equal weights under user-level DP (``PrivacySetup.equal_weights``), and the fixed-denominator
  release ``(sum + noise) / (q N)``.
- Cohorts under user-level DP are Poisson samples with secret coins (:mod:`.sampling`), as the
  sampled Gaussian accountant assumes.
- Distributed placement is the Skellam mechanism in SecAgg's integer ring (:mod:`.distributed`,
  RDP in :mod:`.skellam`), accounted per client against the server, dropout deficit included.

Secure randomness
-----------------
By default every DP draw (Gaussian noise, Skellam shares, Poisson batch and cohort coins) comes
from an AES-256-CTR stream keyed with ``os.urandom`` (:mod:`.randomness`), with the
floating-point-attack-resistant Gaussian construction.  ``PrivacyConfig(insecure_seeded_noise=True)``
(``--dp-insecure-seeded-noise``) keys it from the run seed instead: reproducible, and insecure.
Opacus' own ``secure_mode`` (torchcsprng) has no build for this Python, so record-level noise
is drawn by ``DPGradients`` from the same source.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from securefml.privacy.compat import check_mechanism
from securefml.privacy.config import ACCOUNTANTS, MODES, PLACEMENTS, PrivacyConfig
from securefml.privacy.randomness import NoiseSource
from securefml.privacy.sampling import PoissonCohort
from securefml.privacy.setup import PrivacySetup, setup_privacy

if TYPE_CHECKING:
    from securefml.privacy.accounting import Ledger, epsilon_for, max_compositions, noise_for_target
    from securefml.privacy.distributed import DistributedSkellam, secagg_clip_range
    from securefml.privacy.dp_gradients import DPGradients, clip_and_sum
    from securefml.privacy.record import RecordLevelDP, steps_per_participation
    from securefml.privacy.skellam import rounded_sensitivity, skellam_epsilon, skellam_rdp
    from securefml.privacy.user import UserLevelDP, clip_update, gaussian_noise
    from securefml.privacy.vectorized import CohortDPGradients, run_cohort

# The mechanisms import Opacus (seconds of start-up): they load on first use, so a run or a
# ``securefml --help`` without DP never imports it.
_LAZY = {
    "Ledger": "accounting", "epsilon_for": "accounting", "max_compositions": "accounting",
    "noise_for_target": "accounting", "RecordLevelDP": "record", "DPGradients": "dp_gradients",
    "clip_and_sum": "dp_gradients", "steps_per_participation": "record", "UserLevelDP": "user",
    "clip_update": "user", "gaussian_noise": "user", "DistributedSkellam": "distributed",
    "secagg_clip_range": "distributed", "rounded_sensitivity": "skellam", "skellam_epsilon": "skellam",
    "skellam_rdp": "skellam", "CohortDPGradients": "vectorized", "run_cohort": "vectorized",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

__all__ = [
    "ACCOUNTANTS",
    "CohortDPGradients",
    "DPGradients",
    "MODES",
    "PLACEMENTS",
    "DistributedSkellam",
    "Ledger",
    "NoiseSource",
    "PoissonCohort",
    "PrivacyConfig",
    "PrivacySetup",
    "RecordLevelDP",
    "UserLevelDP",
    "check_mechanism",
    "clip_and_sum",
    "clip_update",
    "epsilon_for",
    "gaussian_noise",
    "max_compositions",
    "noise_for_target",
    "rounded_sensitivity",
    "run_cohort",
    "secagg_clip_range",
    "setup_privacy",
    "skellam_epsilon",
    "skellam_rdp",
    "steps_per_participation",
]
