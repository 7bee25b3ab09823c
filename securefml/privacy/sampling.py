"""Cohort sampling that matches the accountant: Poisson sampling with coins from a secret stream.

Why: Opacus' accountants (the sampled Gaussian mechanism, Mironov et al. 2019) assume that every
client joins each round independently with probability q, and that nobody who learns the
released model knows the coins.  A fixed-size draw from the run's public seed is neither:
its size is fixed (sampling without replacement has a different, weaker amplification) and
anyone with the seed can recompute who took part.  ``PoissonCohort`` flips one coin per client
per round from a :class:`~securefml.privacy.randomness.NoiseSource` (``os.urandom``-keyed AES-CTR
by default), so the cohort has Binomial(N, q) size and is unpredictable without the key.

Who it protects against: the amplification holds against parties that see the released models
but not who took part (model users, other clients, an eavesdropper on the broadcast).  The
server running the round sees its cohort, so against the server there is no amplification;
``securefml.privacy.distributed`` accounts distributed DP without it.

``max_participations`` stops inviting a client after that many rounds (used by distributed DP,
whose per-client epsilon grows with every round the client joins).
"""

from __future__ import annotations

from securefml.errors import ConfigError
from securefml.privacy.randomness import NoiseSource

__all__ = ["PoissonCohort"]


class PoissonCohort:
    """Each of ``n_clients`` joins each round independently with probability ``rate``.

    Parameters
    ----------
    n_clients:
        Size of the population the cohort is drawn from (ids ``0 .. n_clients - 1``).
    rate:
        q, the per-round inclusion probability.
    source:
        Where the coins come from (secret by default in ``setup_privacy``).
    max_participations:
        A client is not invited again after this many rounds (``None``: no cap).
    """

    def __init__(self, n_clients: int, rate: float, source: NoiseSource, *,
                 max_participations: int | None = None) -> None:
        if n_clients < 1:
            raise ConfigError(f"n_clients must be >= 1, got {n_clients}")
        if not 0 < rate <= 1:
            raise ConfigError(f"the cohort sampling rate must be in (0, 1], got {rate}")
        if max_participations is not None and max_participations < 1:
            raise ConfigError(f"max_participations must be >= 1, got {max_participations}")
        self.n_clients = int(n_clients)
        self.rate = float(rate)
        self.source = source
        self.max_participations = max_participations
        self.participations = [0] * self.n_clients

    def __repr__(self) -> str:
        return (f"PoissonCohort(n_clients={self.n_clients}, rate={self.rate:.4g}, "
                f"max_participations={self.max_participations}, source={self.source.kind})")

    @property
    def description(self) -> str:
        return f"poisson (q={self.rate:.4g}, {'secret coins' if self.source.is_secure else 'seeded coins, insecure'})"

    def sample(self, n_clients: int | None = None) -> list[int]:
        """One round's cohort (sorted ids).  ``n_clients`` must equal the population size when given."""
        if n_clients is not None and n_clients != self.n_clients:
            raise ConfigError(f"the sampler was planned for {self.n_clients} clients, asked for {n_clients}")
        coins = self.source.bernoulli(self.n_clients, self.rate)
        cap = self.max_participations
        cohort = [i for i in range(self.n_clients) if coins[i] and (cap is None or self.participations[i] < cap)]
        for i in cohort:
            self.participations[i] += 1
        return cohort
