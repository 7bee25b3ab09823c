"""User-level DP (McMahan et al., 2018): clip each client's whole update, add Gaussian noise.

Threat model and guarantee
--------------------------
The privacy unit is one client (all of its data).  Each client's flat update ``u`` is scaled to
norm at most S (``u * min(1, S / ||u||)``), so adding or removing one client moves the *sum* of
the cohort's updates by at most S.  The Gaussian mechanism with std ``z * S`` on that sum,
composed over rounds with cohort sampling rate ``q = clients_per_round / n_clients``, gives
(epsilon, delta)-DP for every client against anyone who sees the released aggregates
(the server, and everyone who receives the model).  Accounting uses Opacus' accountants
(:mod:`securefml.privacy.accounting`).

What the server holds is the **mean** of the m accepted updates (``RoundOutput.aggregate``),
not the sum.  The noise is therefore scaled to that object:

* ``central``: the server adds ``N(0, (z S / m)^2)`` to the mean, which is exactly
  ``(sum + N(0, (z S)^2)) / m``: noise multiplier z with respect to the sum's sensitivity S.
  The server sees individual clipped updates, so this protects against the model's users and
  later observers, not against the server itself.
* ``distributed``: each client adds its share ``N(0, (z S)^2 / n)`` before encoding, where n is
  the planned cohort size; the sum of m surviving shares has variance ``(z S)^2 m / n``.  The
  effective noise multiplier of a round is ``z * sqrt(m / n)``, and that (not z) is what the
  ledger records, so dropouts cost budget instead of silently weakening the guarantee.  With
  secure aggregation the server never sees a single noised update.  Every client in the cohort
  must add its share: a client that withholds its share lowers the noise for the others
  (colluding clients are outside this guarantee).

Assumptions: the aggregate is the plain (equally weighted) mean of the accepted, clipped
updates.  With unequal client weights one client's share of the mean is ``w_i / W`` rather than
``1 / m``, and with a robust rule that selects or reweights updates from the data (Krum,
trimmed mean...) the sensitivity analysis does not hold; the noise is still added, but the
stated epsilon is then not a guarantee.  Layer selection must give every accepted client the
same layers (uploading everything, or a server-dictated set): with per-client selection a layer
uploaded by fewer than m clients is averaged over fewer updates than the noise is sized for.
The cohort is sampled as a fixed-size draw; it is
accounted as Poisson sampling at rate q, as is common in practice (DP-FedAvg).

References
----------
McMahan, Ramage, Talwar, Zhang, Learning Differentially Private Recurrent Language Models,
ICLR 2018; Kairouz et al., The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation, ICML 2021 (distributed noise under SecAgg).
"""

from __future__ import annotations

import math

import torch
from opacus.optimizers.optimizer import _generate_noise

from securefml.errors import ConfigError, InvalidUpdateError
from securefml.privacy.accounting import Ledger

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
    """Client-update clipping and Gaussian noise, with a round-level ledger.

    Parameters
    ----------
    clip:
        S, the L2 bound of one client's flat update.
    noise_multiplier:
        z; the sum of the accepted clipped updates carries noise std ``z * S``.
    cohort_size:
        n, the planned number of clients per round (distributed shares are ``1/n`` of the variance).
    sample_rate:
        q, the cohort sampling rate recorded by the ledger each round.
    ledger:
        Where rounds are accounted.
    placement:
        ``"central"`` or ``"distributed"``.
    generator:
        Noise source (injected; ``setup_privacy`` seeds it from the OS when ``secure_rng``).
    secure_mode:
        Opacus' floating-point-attack-resistant sampler.
    """

    def __init__(self, *, clip: float, noise_multiplier: float, cohort_size: int, sample_rate: float,
                 ledger: Ledger, placement: str = "central", generator: torch.Generator | None = None,
                 secure_mode: bool = False) -> None:
        if placement not in ("central", "distributed"):
            raise ConfigError(f"unknown DP placement {placement!r}; choose central or distributed")
        if cohort_size <= 0:
            raise ConfigError(f"cohort size must be positive, got {cohort_size}")
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.cohort_size = int(cohort_size)
        self.sample_rate = float(sample_rate)
        self.ledger = ledger
        self.placement = placement
        self.generator = generator
        self.secure_mode = secure_mode
        self._accepted: int | None = None
        self.rounds_accounted = 0

    @property
    def share_std(self) -> float:
        """Std of one client's noise share (distributed placement)."""
        return self.noise_multiplier * self.clip / math.sqrt(self.cohort_size)

    def update_hook(self, client_id: int, update: torch.Tensor) -> torch.Tensor:
        """Client side, before encoding: clip to S, and in distributed placement add this client's share."""
        if not bool(torch.isfinite(update).all()):
            raise InvalidUpdateError("update is not finite; it cannot be clipped", sender=client_id)
        out = clip_update(update, self.clip)
        if self.placement == "distributed" and self.noise_multiplier > 0:
            out = out + gaussian_noise(out.shape, self.share_std, generator=self.generator,
                                       secure_mode=self.secure_mode, device=out.device, dtype=out.dtype)
        return out

    def aggregate_hook(self, n_accepted: int, aggregate: torch.Tensor) -> torch.Tensor:
        """Server side, on the mean of ``n_accepted`` updates: central noise ``N(0, (z S / m)^2)``."""
        if n_accepted <= 0:
            return aggregate
        self._accepted = int(n_accepted)
        if self.placement == "central" and self.noise_multiplier > 0:
            std = self.noise_multiplier * self.clip / n_accepted
            aggregate = aggregate + gaussian_noise(aggregate.shape, std, generator=self.generator,
                                                   secure_mode=self.secure_mode, device=aggregate.device,
                                                   dtype=aggregate.dtype)
        return aggregate

    def effective_noise_multiplier(self, n_accepted: int) -> float:
        """Noise std on the sum of ``n_accepted`` updates, in units of S."""
        if self.placement == "central":
            return self.noise_multiplier
        return self.noise_multiplier * math.sqrt(n_accepted / self.cohort_size)

    def end_round(self) -> None:
        """Account the round's release once (nothing is released in a round without accepted updates)."""
        if self._accepted is None:
            return
        self.ledger.step(noise_multiplier=self.effective_noise_multiplier(self._accepted),
                         sample_rate=self.sample_rate)
        self._accepted = None
        self.rounds_accounted += 1

    def __repr__(self) -> str:
        return (f"UserLevelDP(clip={self.clip}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"cohort_size={self.cohort_size}, placement={self.placement!r}, secure_mode={self.secure_mode})")
