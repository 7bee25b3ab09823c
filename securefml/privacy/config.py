"""``PrivacyConfig``: what differential privacy a run asks for, checked once when it is built.

The configuration only states intent (a mode, a target or a noise multiplier, clip norms,
an accountant).  Quantities that depend on the federation (sample rates, number of steps,
the noise multiplier derived from a target epsilon) are resolved by
:func:`securefml.privacy.setup.setup_privacy`, which also checks the delta against the size
of the dataset the privacy unit is drawn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from securefml.errors import ConfigError

__all__ = ["MODES", "PLACEMENTS", "ACCOUNTANTS", "PrivacyConfig"]

MODES = ("none", "record", "user")
PLACEMENTS = ("central", "distributed")
ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential-privacy settings of a federated run.

    Attributes
    ----------
    mode:
        ``"none"``; ``"record"`` (DP-SGD inside each client through Opacus: the privacy unit is
        one example of one client's local data); ``"user"`` (clip each client's whole update
        and add Gaussian noise: the privacy unit is a client).
    noise_multiplier:
        sigma (record) or z (user): the Gaussian noise std in units of the clip norm.  Give
        either this or ``target_epsilon``, not both.
    target_epsilon:
        Solve for the noise multiplier that spends exactly this budget at ``delta`` over the
        planned run (Opacus' ``get_noise_multiplier``).  ``math.inf`` means no noise (clipping
        only); it is reported as an unbounded epsilon.
    delta:
        The delta of (epsilon, delta)-DP; must be below 1 / (size of the dataset the privacy
        unit comes from), checked by ``setup_privacy``.
    max_grad_norm:
        C, the per-example gradient clip norm for record-level DP.  ``math.inf`` switches
        clipping off and is only accepted with zero noise (useful to check the DP code path
        against the non-private one).
    clip:
        S, the clip norm of a whole client update (user-level DP); ``math.inf`` likewise only
        with zero noise.
    sample_rate:
        Record-level Poisson sampling rate q of each local DP step: every local example joins a
        step's batch independently with probability q (the sampled Gaussian mechanism the
        accountants assume).
    accountant:
        ``"rdp"`` or ``"prv"`` (Opacus accountants).
    placement:
        User-level only: ``"central"`` (the server adds all the noise to the aggregate) or
        ``"distributed"`` (each client adds a share so that the sum carries the full noise;
        for secure aggregation, where the server never sees one update).
    insecure_seeded_noise:
        Draw DP noise and DP sampling coins from a stream keyed by the run's seed, so a run can be
        repeated exactly.  **Insecure**: anyone who knows the seed can regenerate and subtract the
        noise.  Off by default: noise and coins then come from an AES-256-CTR stream keyed from
        ``os.urandom`` (:mod:`securefml.privacy.randomness`).
    min_survivors:
        Distributed placement: the number of contributors each round's noise is sized for (each
        client adds ``1 / min_survivors`` of the target variance); ``None`` uses the 5% quantile of
        the Binomial(N, q) cohort size (at least 2).  Cohorts smaller than this are skipped; a round
        where dropouts leave fewer contributors releases less noise, and is accounted as such.
    allow_support_leak:
        Accept record-level DP for second-order MAML (or second-order Meta-SGD), whose
        guarantee covers the query examples only.  Off by default: user-level DP is the
        recommended mode for those learners.
    """

    mode: str = "none"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    clip: float = 1.0
    sample_rate: float = 0.5
    accountant: str = "rdp"
    placement: str = "central"
    insecure_seeded_noise: bool = False
    min_survivors: int | None = None
    allow_support_leak: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown DP mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "none":
            if self.noise_multiplier is not None or self.target_epsilon is not None:
                raise ConfigError(
                    "a noise multiplier or target epsilon was given with DP mode 'none'; "
                    "choose --dp record or --dp user to use it"
                )
            return
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError("give either a target epsilon or a noise multiplier, not both "
                              "(the noise multiplier is derived from the target)")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError(f"DP mode {self.mode!r} needs a budget: give a target epsilon (recommended) "
                              "or a noise multiplier")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"target epsilon must be > 0, got {self.target_epsilon}; "
                              "use math.inf for clipping without noise, or DP mode 'none'")
        z = self.noise_multiplier
        if z is not None and not (z >= 0 and math.isfinite(z)):
            raise ConfigError(f"noise multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}; a usual choice is below 1/dataset size")
        for name in ("max_grad_norm", "clip"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}: it is the clip norm that bounds one "
                                  "example's (record) or one client's (user) influence")
            if math.isinf(value) and self.noisy:
                raise ConfigError(f"{name}=inf (clipping off) gives no sensitivity bound, so noise cannot "
                                  "protect anything; set a finite clip norm or use zero noise")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"unknown DP placement {self.placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if self.min_survivors is not None and (self.placement != "distributed" or self.min_survivors < 1):
            raise ConfigError(f"min_survivors={self.min_survivors} applies to distributed placement only and must be "
                              ">= 1 (the number of contributors the noise shares are sized for)")
        if self.placement == "distributed" and self.mode != "user":
            raise ConfigError("distributed noise placement applies to user-level DP only; record-level noise "
                              "is always added by the client itself (--dp user --dp-placement distributed)")

    @property
    def enabled(self) -> bool:
        """Whether any DP mechanism runs."""
        return self.mode != "none"

    @property
    def noisy(self) -> bool:
        """Whether the configuration asks for non-zero noise."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier > 0
        return self.target_epsilon is not None and math.isfinite(self.target_epsilon)
