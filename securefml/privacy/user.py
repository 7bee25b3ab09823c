"""User-level DP (McMahan et al., 2018): clip each client's whole update, add noise to the sum.

Threat model and guarantee
--------------------------
The privacy unit is one client (all of its data).  Each client's flat update ``u`` is scaled to
norm at most S (``u * min(1, S / ||u||)``), and every client gets the **same weight** (the
server is told to ignore sample counts: ``PrivacySetup.equal_weights``), so one client moves the
*sum* of the cohort's updates by at most S.  The released aggregate is the fixed-denominator
estimate ``(sum + noise) / (q N)`` (McMahan et al.'s ``f_f``): the expected cohort size ``q N`` is
public, so the released model is post-processing of the noised sum, and the number of clients
that happened to take part does not enter it.

* ``central``: the server adds ``N(0, (z S)^2)`` to the sum (``N(0, (z S / qN)^2)`` to the
  released mean).  The cohort is a Poisson sample with secret coins
  (:class:`~securefml.privacy.sampling.PoissonCohort`), which is what Opacus' accountant of the
  sampled Gaussian mechanism assumes: (epsilon, delta)-DP with amplification at rate q against
  everyone who sees the released models but not who took part.  The server sees every clipped
  update, so it is trusted here.
* ``distributed``: each client adds an integer Skellam share in SecAgg's ring before masking
  (:mod:`securefml.privacy.distributed`); the server sees only the noised sum.  Accounted per
  client against the server, without amplification (the server sees who took part), including
  the noise deficit of rounds where fewer than ``min_survivors`` clients contributed.

Assumptions (enforced by :func:`securefml.privacy.check_mechanism`): the aggregate is the
weighted mean with equal weights (no robust rule, whose output one client can move by more than
S); distributed placement only with SecAgg without buckets.  Layer selection must give every
accepted client the same layers (uploading everything, or a server-dictated set).  Not covered: a
round that releases nothing because nobody was accepted (with Poisson sampling an empty cohort
has probability ``(1 - q)^N``); such a round is still accounted.

Noise is drawn from a :class:`~securefml.privacy.randomness.NoiseSource` (``os.urandom``-keyed
AES-CTR unless ``insecure_seeded_noise``), with the floating-point-attack-resistant construction.

References
----------
McMahan, Ramage, Talwar, Zhang, Learning Differentially Private Recurrent Language Models,
ICLR 2018; Mironov, Talwar, Zhang, Renyi Differential Privacy of the Sampled Gaussian Mechanism,
2019; Agarwal, Kairouz, Liu, The Skellam Mechanism for Differentially Private Federated Learning,
NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from opacus.optimizers.optimizer import _generate_noise

from securefml.errors import ConfigError, InvalidUpdateError
from securefml.privacy.accounting import Ledger
from securefml.privacy.distributed import DistributedSkellam
from securefml.privacy.randomness import NoiseSource

__all__ = ["clip_update", "gaussian_noise", "UserLevelDP"]


def clip_update(update: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale ``update`` to L2 norm at most ``clip`` (unchanged if already within; ``inf``: no clipping)."""
    if not clip > 0:
        raise ConfigError(f"clip norm must be > 0, got {clip}")
    if math.isinf(clip):
        return update
    norm = float(torch.linalg.vector_norm(update.double()))
    if norm <= clip:
        return update
    return update * (clip / norm)


def gaussian_noise(shape: torch.Size | tuple[int, ...], std: float, *, generator: torch.Generator | None = None,
                   secure_mode: bool = False, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``N(0, std^2)`` samples of ``shape`` drawn with Opacus' noise sampler.

    The samples are drawn on the generator's device and moved to ``device``.  ``secure_mode``
    uses Opacus' floating-point-attack-resistant construction (four draws summed, scaled by
    1/2; Holohan et al. 2021), the same one ``DPOptimizer(secure_mode=True)`` uses.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    reference = torch.empty(tuple(shape), dtype=dtype, device=gen_device)
    return _generate_noise(std=std, reference=reference, generator=generator, secure_mode=secure_mode).to(device)


class UserLevelDP:
    """Client-update clipping, the fixed-denominator release, Gaussian (central) or Skellam (distributed) noise.

    Parameters
    ----------
    clip:
        S, the L2 bound of one client's flat update.
    noise_multiplier:
        z; the sum of the accepted clipped updates carries noise std ``z * S`` (central), or
        variance ``(z l2)^2`` in ring units (distributed, see ``DistributedSkellam``).
    expected_cohort:
        ``q N``, the public denominator of the released mean.
    sample_rate:
        q, the cohort sampling rate recorded by the central ledger each round.
    ledger:
        Where central rounds are accounted.
    placement:
        ``"central"`` or ``"distributed"``.
    source:
        Noise source for central noise (``None``: a fresh ``os.urandom``-keyed one).
    distributed:
        The Skellam mechanism (required for distributed placement).
    """

    def __init__(self, *, clip: float, noise_multiplier: float, expected_cohort: float, sample_rate: float,
                 ledger: Ledger, placement: str = "central", source: NoiseSource | None = None,
                 distributed: DistributedSkellam | None = None) -> None:
        if placement not in ("central", "distributed"):
            raise ConfigError(f"unknown DP placement {placement!r}; choose central or distributed")
        if not expected_cohort > 0:
            raise ConfigError(f"expected cohort size must be positive, got {expected_cohort}")
        if placement == "distributed" and distributed is None:
            raise ConfigError("distributed placement needs its SecAgg mechanism (DistributedSkellam)")
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_cohort = float(expected_cohort)
        self.sample_rate = float(sample_rate)
        self.ledger = ledger
        self.placement = placement
        self.source = source if source is not None else NoiseSource.secure()
        self.distributed = distributed
        self.rounds_accounted = 0

    def update_hook(self, client_id: int, update: torch.Tensor) -> torch.Tensor:
        """Client side, before encoding: clip to S (distributed noise is added later, in the ring)."""
        if not bool(torch.isfinite(update).all()):
            raise InvalidUpdateError("update is not finite; it cannot be clipped", sender=client_id)
        return clip_update(update, self.clip)

    def aggregate_hook(self, n_accepted: int, aggregate: torch.Tensor) -> torch.Tensor:
        """Server side, on the mean of ``n_accepted`` updates: the release ``(sum + noise) / (q N)``."""
        if n_accepted <= 0:
            return aggregate
        released = aggregate * (n_accepted / self.expected_cohort)
        if self.placement == "central" and self.noise_multiplier > 0:
            std = self.noise_multiplier * self.clip / self.expected_cohort
            released = released + self.source.normal_tensor(aggregate.shape, std, device=aggregate.device,
                                                             dtype=aggregate.dtype)
        return released

    def end_round(self, round_idx: int, accepted: Sequence[int] | None = None) -> None:
        """Account round ``round_idx`` once (central: one sampled Gaussian step; distributed: per contributor)."""
        if self.placement == "distributed":
            assert self.distributed is not None
            if accepted is None:
                raise ConfigError("distributed DP accounts per contributor: pass accepted= (the round's contributors)")
            # a round that released nothing (no contributor) costs nothing and is not counted
            if self.distributed.end_round(round_idx, accepted):
                self.rounds_accounted += 1
            return
        # central: every round is one sampled Gaussian step, an empty cohort included (the
        # amplification by sampling assumes the server steps every round, whatever it drew)
        self.ledger.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.rounds_accounted += 1

    def epsilon(self) -> float:
        if self.placement == "distributed":
            assert self.distributed is not None
            return self.distributed.epsilon()
        return self.ledger.epsilon()

    def __repr__(self) -> str:
        return (f"UserLevelDP(clip={self.clip}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"expected_cohort={self.expected_cohort:.4g}, placement={self.placement!r}, "
                f"source={self.source.kind})")
