"""Distributed user-level DP under SecAgg: Skellam noise shares in the integer ring.

Mechanism
---------
Each client clips its flat update to L2 norm S (``UserLevelDP.update_hook``); SecAgg's fixed-point
code scales it by ``g`` (``FixedPoint.scale`` of the round's plan, client weight 1) and rounds it
stochastically into an integer vector ``q``; the client then adds an integer noise share
``Sk(v_c)`` to every coordinate of ``q`` *before masking* (``SecAggPlus(ring_noise=...)``, set by
:meth:`DistributedSkellam.attach`).  Nothing is clipped or rounded after the noise: the server
decodes ``(sum of q + Sk(m v_c)) mod 2^bits`` for the ``m`` contributors, a Skellam mechanism
followed by post-processing (the modular reduction, the division by ``g`` and by the public
expected cohort size).  The server learns nothing beyond that sum (SecAgg's guarantee), so
distributed DP is refused with any protocol that reveals more (:func:`check_mechanism`).

Noise size and the dropout deficit
----------------------------------
The sum's L2 sensitivity in ring units is ``l2 = g S + sqrt(d)`` (rounding moves each of the d
coordinates by less than one; :func:`securefml.privacy.skellam.rounded_sensitivity`).  The target
total variance is ``(z l2)^2``; each client adds ``v_c = (z l2)^2 / m_min`` where ``m_min``
(``PrivacyConfig.min_survivors``, default the 5% quantile of the Binomial(N, q) cohort size, at
least 2) is the number of contributors the noise is sized for; the run skips sampled cohorts
smaller than that, so only dropouts can leave a round short.  A round with ``m`` contributors releases variance
``m v_c``: at least the target when ``m >= m_min`` and *less* when clients dropped out below it
(their shares are missing).  The ledger records the variance actually released, so a deficit
shows up as a larger epsilon, never as a silently weaker guarantee; the report lists the
variance of every round and the rounds with a deficit.

Who is protected against whom
-----------------------------
- Adversary: the server (honest-but-curious, per SecAgg's threat model) and everyone who sees
  the models.  The server sees who took part in each round, so **no amplification by sampling is
  claimed**: a client's epsilon is the composition over the rounds it contributed to, with
  zero-out neighbouring (its update replaced by zeros).  The reported epsilon is the largest over
  clients.  With a target epsilon, the noise is calibrated for ``max_participations`` rounds per
  client (a high quantile of its Binomial participation count) and the cohort sampler stops
  inviting a client once it has contributed that often, so no client exceeds the target.
- Every contributor must add its share honestly: a client colluding with the server can
  subtract its own share, so with ``c`` colluders the noise is ``(m - c) v_c`` (outside the
  stated guarantee unless ``min_survivors`` is lowered by ``c``).

Utility: the modular sum wraps only if a coordinate of ``|sum q| + noise`` reaches
``2^(bits-1)``; :func:`secagg_clip_range` picks SecAgg's ``clip_range`` so the integer scale is
``g S ~ 100 sqrt(d)`` (sensitivity within 1% of the unrounded one) and the ring keeps a margin of
many noise standard deviations.  ``attach`` refuses a protocol whose range leaves less than ten
standard deviations, or whose scale would need Poisson means beyond exact double-precision sampling.

References
----------
Agarwal, Kairouz, Liu, The Skellam Mechanism for Differentially Private Federated Learning,
NeurIPS 2021; Kairouz, Liu, Steinke, The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation, ICML 2021; Bonawitz et al., CCS 2017 (secure aggregation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from securefml.errors import ConfigError
from securefml.privacy.randomness import MAX_POISSON_LAM, NoiseSource
from securefml.privacy.skellam import ORDERS, rdp_to_epsilon, rounded_sensitivity, skellam_rdp_curve

if TYPE_CHECKING:  # pragma: no cover
    from securefml.protocols.secagg import SecAggPlus
    from securefml.protocols.secagg_client import MaskJob

__all__ = ["DistributedSkellam", "secagg_clip_range"]

log = logging.getLogger(__name__)

#: the integer scale g S is at least this many times sqrt(d) (and at least 2^10)
SCALE_PER_SQRT_DIM = 100.0
#: the ring keeps this many noise standard deviations of margin per coordinate
RING_MARGIN_STDS = 10.0


def _target_scale(clip: float, dim: int) -> float:
    return max(2.0**10, SCALE_PER_SQRT_DIM * math.sqrt(dim)) / clip


def secagg_clip_range(*, clip: float, cohort: int, dim: int, bits: int = 32) -> float:
    """The SecAgg ``clip_range`` whose fixed-point scale is ``g = max(2^10, 100 sqrt(dim)) / clip`` for ``cohort``.

    ``FixedPoint.scale = (2^(bits-1) - 1 - n) / (n * max_weight * clip_range)`` with weight 1, so
    ``clip_range = (2^(bits-1) - 1 - n) / (n * g)``.  It is far above ``clip``: per-entry clipping
    never binds on an L2-clipped update, and the unused range is the room the noise needs.
    """
    if cohort < 1 or dim < 1 or not clip > 0:
        raise ConfigError(f"need cohort >= 1, dim >= 1 and clip > 0, got {cohort}, {dim}, {clip}")
    g = _target_scale(clip, dim)
    return (2 ** (bits - 1) - 1 - cohort) / (cohort * g)


class DistributedSkellam:
    """Skellam noise shares added in SecAgg's ring, and a per-client RDP ledger against the server.

    Parameters
    ----------
    clip:
        S, the L2 bound of one client's update (clipped before quantization).
    noise_multiplier:
        z: the released sum carries variance ``(z * l2)^2`` (ring units) when ``m_min`` clients contribute.
    min_survivors:
        ``m_min``: each client adds ``1 / m_min`` of that variance.
    delta:
        The delta epsilon is reported at.
    source:
        The master noise source; each (client, round) share uses its own fork.
    """

    mechanism = "skellam"

    def __init__(self, *, clip: float, noise_multiplier: float, min_survivors: int, delta: float,
                 source: NoiseSource) -> None:
        if min_survivors < 1:
            raise ConfigError(f"min_survivors must be >= 1, got {min_survivors}")
        if not (math.isfinite(clip) and clip > 0):
            raise ConfigError(f"distributed DP needs a finite clip norm, got {clip}")
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.min_survivors = int(min_survivors)
        self.delta = float(delta)
        self.source = source
        self._round: dict[int, tuple[float, float, float]] = {}  # round -> (l1, l2, v_c)
        self._rdp: dict[int, np.ndarray] = {}
        self.variance_per_round: list[float] = []
        self.deficit_rounds: list[int] = []
        self.rounds_accounted = 0

    def __repr__(self) -> str:
        return (f"DistributedSkellam(clip={self.clip}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"min_survivors={self.min_survivors}, source={self.source.kind})")

    # -- protocol side ----------------------------------------------------------------------------
    def attach(self, protocol: SecAggPlus, *, cohort: int, dim: int) -> None:
        """Check ``protocol``'s ring for the planned ``cohort`` and ``dim`` and install the noise hook."""
        from securefml.protocols.quantize import FixedPoint  # privacy must not import protocols at import time

        fp = FixedPoint(protocol.clip_range, max(cohort, 2), protocol.bits, 1.0)
        _, l2 = rounded_sensitivity(scale=fp.scale, clip=self.clip, dim=dim)
        v_c = self.share_variance(l2)
        if v_c / 2 > MAX_POISSON_LAM:
            hint = secagg_clip_range(clip=self.clip, cohort=cohort, dim=dim, bits=protocol.bits)
            raise ConfigError(f"SecAgg clip_range={protocol.clip_range:g} gives an integer scale of {fp.scale:.3g} "
                              f"per unit, so each noise share would need Poisson means of {v_c / 2:.3g} (above "
                              f"{MAX_POISSON_LAM:.0g}, not sampled exactly); use clip_range={hint:.6g} "
                              "(secagg_clip_range)")
        worst = cohort * (fp.scale * self.clip + 1) + RING_MARGIN_STDS * math.sqrt(cohort * v_c)
        if worst >= 2 ** (protocol.bits - 1):
            hint = secagg_clip_range(clip=self.clip, cohort=cohort, dim=dim, bits=protocol.bits)
            raise ConfigError(f"a {protocol.bits}-bit ring with clip_range={protocol.clip_range:g} leaves no room for "
                              f"the noise of {cohort} clients (worst coordinate {worst:.3g} >= 2^{protocol.bits - 1}); "
                              f"use clip_range={hint:.6g} (secagg_clip_range) or more bits")
        if protocol.max_weight not in (None, 1.0):
            raise ConfigError(f"distributed DP needs unit client weights; SecAgg's max_weight={protocol.max_weight:g} "
                              "sizes the ring for others (leave it unset)")
        protocol.max_weight = 1.0  # the public weight bound the ring above was sized for (every weight is 1)
        protocol.ring_noise = self.ring_noise

    def share_variance(self, l2: float) -> float:
        """Variance of one client's share for sensitivity ``l2``: ``(z l2)^2 / m_min``."""
        return (self.noise_multiplier * l2) ** 2 / self.min_survivors

    def ring_noise(self, job: MaskJob) -> np.ndarray:
        """One client's integer share for ``job`` (``len(job.vector) + 1`` entries; 0 on the weight coordinate)."""
        fp = job.fixed_point
        factor = min(float(job.weight), fp.max_weight) * fp.scale
        if not math.isclose(factor, fp.scale):
            raise ConfigError(f"distributed DP needs client weight 1 (equal weights); client {job.client_id} has "
                              f"weight {job.weight}")
        d = int(job.vector.size)
        l1, l2 = rounded_sensitivity(scale=factor, clip=self.clip, dim=d)
        v_c = self.share_variance(l2)
        known = self._round.get(job.round_idx)
        if known is not None and not math.isclose(known[1], l2):
            raise ConfigError("every client of one round must quantize with the same scale and length")
        self._round[job.round_idx] = (l1, l2, v_c)
        out = np.zeros(d + 1, dtype=np.int64)
        if v_c > 0:
            out[:d] = self.source.fork(f"client={job.client_id}|round={job.round_idx}").skellam(d, v_c)
        return out

    # -- accounting -----------------------------------------------------------------------------------
    def end_round(self, round_idx: int, accepted: Sequence[int]) -> bool:
        """Account the round's release for each contributor (``accepted``), with the variance actually released.

        Returns whether the round released anything (and was accounted): a round without
        contributors (an empty Poisson cohort, one below the protocol's minimum) releases nothing.
        A round whose contributors were summed although no client drew a noise share for it
        released their sum without noise: it is accounted as an unbounded loss for each of them
        (epsilon becomes infinite and says so), never skipped.
        """
        params = self._round.pop(round_idx, None)
        if not accepted:
            return False
        if params is None:
            log.error("round %d: %d contributors were summed but no noise share was drawn for the round: "
                      "accounted as an unbounded privacy loss", round_idx, len(accepted))
            for c in accepted:
                self._rdp[c] = self._rdp.get(c, np.zeros(len(ORDERS))) + np.full(len(ORDERS), math.inf)
            self.variance_per_round.append(0.0)
            self.rounds_accounted += 1
            return True
        l1, l2, v_c = params
        m = len(accepted)
        variance = m * v_c
        self.variance_per_round.append(variance)
        if m < self.min_survivors:
            self.deficit_rounds.append(round_idx)
            log.warning("round %d: %d contributors < min_survivors=%d: the sum carries %.3g of the planned noise "
                        "variance (accounted as such)", round_idx, m, self.min_survivors, m / self.min_survivors)
        curve = skellam_rdp_curve(l1=l1, l2=l2, variance=variance) if variance > 0 else np.full(len(ORDERS), math.inf)
        for c in accepted:
            self._rdp[c] = self._rdp.get(c, np.zeros(len(ORDERS))) + curve
        self.rounds_accounted += 1
        return True

    def epsilon_per_client(self) -> dict[int, float]:
        return {c: rdp_to_epsilon(r, self.delta) for c, r in sorted(self._rdp.items())}

    def epsilon(self) -> float:
        """The largest epsilon over clients so far (0 before any release)."""
        if not self._rdp:
            return 0.0
        return max(rdp_to_epsilon(r, self.delta) for r in self._rdp.values())
