"""Differential privacy for meta-learning clients (``securefml.privacy``).

Three modes, one seam (:func:`setup_privacy`):

``none``
    No mechanism; the learner and the server run unchanged.
``record``
    DP-SGD inside each client through Opacus (:mod:`securefml.privacy.record`).  The privacy
    unit is one local example; each client has its own accountant and reports its own epsilon.
    FedAvg, Reptile, FOMAML and first-order Meta-SGD are fully covered.  For second-order MAML
    the per-query-example meta-gradients are privatized (``vmap(grad)`` into Opacus' ``no_op``
    grad-sample mode), but **the support set is not covered** (every support example influences
    every meta-gradient): it must be acknowledged with ``allow_support_leak=True``, and
    user-level DP is the recommended mode for MAML.
``user``
    Clip each client's whole update to S and add Gaussian noise ``z S`` to the sum
    (:mod:`securefml.privacy.user`), centrally at the server or as per-client shares that sum
    to the full noise (for secure aggregation).  The privacy unit is a client; the federation
    has one accountant, fed the cohort sampling rate once per round.

Accounting uses Opacus' RDP or PRV accountants (:mod:`securefml.privacy.accounting`); a target
epsilon is turned into a noise multiplier with Opacus' ``get_noise_multiplier`` for the planned
number of steps.  Epsilon is computed once per round, never per step.

Secure randomness (``secure_rng=True``)
---------------------------------------
Opacus' full ``secure_mode`` needs torchcsprng, which has no build for this Python.  What is
provided: Gaussian noise from Opacus' floating-point-attack-resistant sampler (the sum of four
Gaussian draws scaled by 1/2, Holohan et al. 2021, as ``DPOptimizer(secure_mode=True)`` does),
for both record-level and user-level noise, and a noise generator seeded from the operating
system (``secrets``) instead of the run's seed, so the noise cannot be regenerated from a
published seed.  What is *not* provided: a cryptographically secure generator (torch's
generator is a Mersenne Twister/Philox stream, predictable from enough of its output), and
secure Poisson sampling (batch and cohort sampling use torch's generator).  Without
``secure_rng`` the noise is reproducible from the run's seed, which is right for experiments
and wrong for deployment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from securefml.privacy.config import ACCOUNTANTS, MODES, PLACEMENTS, PrivacyConfig
from securefml.privacy.setup import PrivacySetup, setup_privacy

if TYPE_CHECKING:
    from securefml.privacy.accounting import Ledger, epsilon_for, max_compositions, noise_for_target
    from securefml.privacy.record import RecordLevelDP, record_route, steps_per_participation, summed_loss
    from securefml.privacy.user import UserLevelDP, clip_update, gaussian_noise

# The mechanisms import Opacus (seconds of start-up): they load on first use, so a run or a
# ``securefml --help`` without DP never imports it.
_LAZY = {
    "Ledger": "accounting", "epsilon_for": "accounting", "max_compositions": "accounting",
    "noise_for_target": "accounting", "RecordLevelDP": "record", "record_route": "record",
    "steps_per_participation": "record", "summed_loss": "record", "UserLevelDP": "user",
    "clip_update": "user", "gaussian_noise": "user",
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
    "MODES",
    "PLACEMENTS",
    "Ledger",
    "PrivacyConfig",
    "PrivacySetup",
    "RecordLevelDP",
    "UserLevelDP",
    "clip_update",
    "epsilon_for",
    "gaussian_noise",
    "max_compositions",
    "noise_for_target",
    "record_route",
    "setup_privacy",
    "steps_per_participation",
    "summed_loss",
]
