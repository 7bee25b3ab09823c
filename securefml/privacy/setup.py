"""The one seam between a run and its DP mechanism: ``setup_privacy`` -> ``PrivacySetup``.

A run calls :func:`setup_privacy` once (with the protocol and defense it will use, which are
checked by :func:`~securefml.privacy.compat.check_mechanism`), uses ``setup.learner`` for its
clients, passes ``setup.update_hook``, ``setup.aggregate_hook`` and ``setup.equal_weights`` to the
``Server``, draws each round's cohort with ``setup.sample_cohort`` (user level: Poisson with secret
coins; ``None`` otherwise, and the run draws its own), calls ``setup.end_round(r, accepted=...)``
after each round and stores ``setup.report()`` as ``metrics.privacy``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from securefml.errors import ConfigError
from securefml.meta.base import MetaLearner
from securefml.privacy.compat import check_mechanism
from securefml.privacy.config import PrivacyConfig
from securefml.privacy.randomness import NoiseSource
from securefml.privacy.sampling import PoissonCohort

if TYPE_CHECKING:  # the mechanisms import Opacus: loaded only when DP is on (see setup_privacy)
    from securefml.privacy.record import RecordLevelDP
    from securefml.privacy.user import UserLevelDP

__all__ = ["COHORT_QUANTILE", "PARTICIPATION_QUANTILE", "PrivacySetup", "participation_quantile", "setup_privacy"]


def _finite_or_none(eps: float) -> float | None:
    return None if math.isinf(eps) else float(eps)


class PrivacySetup:
    """What a run needs from the DP mechanism, with one fixed shape whatever the mode.

    Attributes
    ----------
    config:
        The validated configuration.
    learner:
        The learner honest clients run (record level: wrapped in :class:`RecordLevelDP`).
    update_hook:
        ``(client_id, flat_update) -> flat_update`` for ``Server(update_hook=...)``, or ``None``.
    aggregate_hook:
        ``(n_accepted, mean_update) -> mean_update`` for ``Server(aggregate_hook=...)``, or ``None``.
    noise_multiplier:
        The sigma (record) or z (user) in use, derived from the target epsilon when one was given.
    equal_weights:
        Whether the server must give every client weight 1 (user level: the noise is sized for
        one client's share of an equally weighted sum).
    expected_cohort:
        ``q N``, the expected cohort size (user level), the public denominator of the release.
    min_cohort:
        Rounds whose cohort is smaller are skipped (distributed: ``min_survivors``, at least 2,
        so that a round without dropouts never carries less noise than planned).
    """

    def __init__(self, config: PrivacyConfig, learner: MetaLearner, *, noise_multiplier: float = 0.0,
                 record: RecordLevelDP | None = None, user: UserLevelDP | None = None,
                 planned: dict[str, Any] | None = None, sampler: PoissonCohort | None = None,
                 source: NoiseSource | None = None) -> None:
        self.config = config
        self.learner = learner
        self.noise_multiplier = noise_multiplier
        self._record = record
        self._user = user
        self._sampler = sampler
        self._source = source
        self.planned = dict(planned or {})
        self.equal_weights = user is not None
        self.expected_cohort = user.expected_cohort if user is not None else 0.0
        self.min_cohort = (max(2, user.distributed.min_survivors)
                           if user is not None and user.distributed is not None else 0)
        self.update_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = user.update_hook if user else None
        self.aggregate_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = (
            user.aggregate_hook if user else None
        )
        self.epsilon_history: list[float | None] = []
        self._per_client: dict[int, float] = {}

    def sample_cohort(self, round_idx: int, n_clients: int) -> list[int] | None:
        """Round ``round_idx``'s cohort (ids in ``range(n_clients)``) under user-level DP; ``None`` otherwise."""
        del round_idx  # the coins are fresh each call; kept for a uniform seam
        if self._sampler is None:
            return None
        return self._sampler.sample(n_clients)

    def end_round(self, round_idx: int, accepted: Sequence[int] | None = None) -> float | None:
        """Account round ``round_idx`` once and return the largest epsilon spent so far (``None``: unbounded).

        Record level: epsilon is computed for the clients that trained this round (one accountant
        call per distinct history).  User level, central: the round's release is recorded in the
        federation's ledger.  User level, distributed: ``accepted`` (the round's contributors) is
        required; each contributor's own RDP grows by the variance actually released.
        """
        if self._record is not None:
            touched = self._record.touched
            self._per_client.update(self._record.epsilons(touched))
            touched.clear()
            eps = max(self._per_client.values(), default=0.0)
        elif self._user is not None:
            self._user.end_round(round_idx, accepted)
            eps = self._user.epsilon()
        else:
            return None
        self.epsilon_history.append(_finite_or_none(eps))
        return _finite_or_none(eps)

    def report(self) -> dict[str, Any]:
        """JSON-ready summary for ``metrics.privacy`` (an unbounded epsilon is ``None``)."""
        cfg = self.config
        out: dict[str, Any] = {
            "mode": cfg.mode,
            "accountant": cfg.accountant if cfg.enabled else None,
            "delta": cfg.delta if cfg.enabled else None,
            "epsilon_max": None,
            "epsilon_per_client": {},
        }
        if not cfg.enabled:
            return out
        out["noise_multiplier"] = self.noise_multiplier
        out["target_epsilon"] = _finite_or_none(cfg.target_epsilon) if cfg.target_epsilon is not None else None
        out["noise_source"] = self._source.kind if self._source is not None else None
        out["epsilon_history"] = list(self.epsilon_history)
        out.update(self.planned)
        if self._record is not None:
            eps = dict(self._per_client)
            out["epsilon_per_client"] = {str(k): _finite_or_none(v) for k, v in sorted(eps.items())}
            out["epsilon_max"] = _finite_or_none(max(eps.values())) if eps else 0.0
            out.update(max_grad_norm=cfg.max_grad_norm if math.isfinite(cfg.max_grad_norm) else None,
                       sample_rate=cfg.sample_rate, covers=("every local example" if self._record.covers_support
                                                            else "query examples only (support set not covered)"))
        elif self._user is not None:
            user = self._user
            out["epsilon_max"] = _finite_or_none(user.epsilon())
            out.update(clip=cfg.clip if math.isfinite(cfg.clip) else None, placement=cfg.placement,
                       rounds_accounted=user.rounds_accounted, covers="every client (all of its data)",
                       cohort_sampling=self._sampler.description if self._sampler is not None else None,
                       expected_cohort=user.expected_cohort, equal_weights=True)
            if user.distributed is not None:
                dist = user.distributed
                out.update(mechanism="skellam", accountant="skellam-rdp", min_survivors=dist.min_survivors,
                           max_participations=self._sampler.max_participations if self._sampler else None,
                           noise_variance_per_round=list(dist.variance_per_round),
                           deficit_rounds=list(dist.deficit_rounds),
                           epsilon_per_client={str(k): _finite_or_none(v)
                                               for k, v in dist.epsilon_per_client().items()},
                           protects_against="the server and model observers (zero-out neighbouring, no "
                                            "amplification: the server sees who took part)")
            else:
                out.update(mechanism="gaussian",
                           protects_against="model observers who do not see who took part (Poisson sampling "
                                            "amplification); the server itself sees every clipped update")
        return out

    def __repr__(self) -> str:
        return (f"PrivacySetup(mode={self.config.mode!r}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"learner={self.learner!r})")


#: record-level noise is calibrated for the number of rounds a client joins with this probability
PARTICIPATION_QUANTILE = 0.95
#: distributed noise shares are sized for this lower quantile of the Poisson cohort's size
COHORT_QUANTILE = 0.05


def participation_quantile(rounds: int, sample_rate: float, quantile: float) -> int:
    """Smallest k >= 1 with P[Binomial(rounds, sample_rate) <= k] >= quantile.

    A record-level client's budget is spent per round it joins; calibrating the noise for the
    expected count would stop about half the clients early, so the noise is calibrated for a high
    quantile of the participation count and the rare client sampled more often sits out.
    """
    if sample_rate >= 1:
        return rounds
    cdf = 0.0
    for k in range(rounds + 1):
        cdf += math.comb(rounds, k) * sample_rate**k * (1 - sample_rate) ** (rounds - k)
        if cdf >= quantile:
            return max(1, k)
    return rounds


def _noise_source(config: PrivacyConfig, generator: torch.Generator | None) -> NoiseSource:
    """The secret ``os.urandom``-keyed source, or (only with ``insecure_seeded_noise``) one keyed by the run seed."""
    if not config.insecure_seeded_noise:
        return NoiseSource.secure()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
    return NoiseSource.seeded(seed)


def setup_privacy(
    config: PrivacyConfig,
    learner: MetaLearner,
    *,
    n_train_clients: int,
    clients_per_round: int,
    rounds: int,
    dataset_kind: str = "classification",
    algorithm_name: str | None = None,
    local_dataset_size: int | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    protocol: Any = None,
    defense: Any = None,
    selector: Any = None,
    dim: int | None = None,
) -> PrivacySetup:
    """Resolve ``config`` for a planned run and build its DP mechanism.

    Parameters
    ----------
    config:
        The DP settings.
    learner:
        The learner the run built; record level wraps it, user level leaves it unchanged.
    n_train_clients, clients_per_round, rounds:
        The plan: cohort sampling rate ``q = clients_per_round / n_train_clients`` and the number
        of rounds calibrate the noise for a target epsilon.
    dataset_kind:
        ``"classification"`` or ``"regression"`` (checked only).
    algorithm_name:
        The registry name of the learner (reported as ``algorithm``; defaults to the learner's name).
    local_dataset_size:
        Record level: the smallest number of local examples a client holds (delta must be below
        its inverse).  Required for record-level DP.
    device:
        Kept for a uniform seam: noise is drawn on the CPU and moved to the tensors' device.
    generator:
        Keys the DP randomness (sampling coins and noise) reproducibly, and only when
        ``config.insecure_seeded_noise``; otherwise the key comes from ``os.urandom``.
    protocol, defense:
        What the run aggregates with; checked by ``check_mechanism`` when given.  Distributed
        placement requires the protocol (SecAgg), whose ring receives the noise hook.
    selector:
        The run's layer selector, checked too when given (user level: server-dictated only).
    dim:
        Distributed placement: the largest number of entries a client uploads (default: every
        parameter of the learner), for the planned sensitivity.

    Raises
    ------
    ConfigError
        A delta not below 1/dataset size, a target that cannot be reached, record-level DP for a
        second-order learner without ``allow_support_leak``, or an inconsistent plan.
    """
    del device  # noise is drawn on the generator's device and moved; kept for a uniform seam
    if dataset_kind not in ("classification", "regression"):
        raise ConfigError(f"unknown dataset kind {dataset_kind!r}")
    if not config.enabled:
        return PrivacySetup(config, learner)
    # the mechanisms import Opacus (seconds): only now that DP is on
    from securefml.privacy.accounting import Ledger, max_compositions, noise_for_target
    from securefml.privacy.record import RecordLevelDP, steps_per_participation
    from securefml.privacy.user import UserLevelDP

    if n_train_clients <= 0 or clients_per_round <= 0 or rounds <= 0:
        raise ConfigError("n_train_clients, clients_per_round and rounds must be positive")
    cohort = min(clients_per_round, n_train_clients)
    q_cohort = cohort / n_train_clients
    source = _noise_source(config, generator)
    if protocol is not None or defense is not None:
        if protocol is None or defense is None:
            raise ConfigError("pass both protocol= and defense= (or neither) to check the DP mechanism against them")
        check_mechanism(config, protocol, defense, selector=selector)
    if config.mode == "user":
        if config.delta >= 1 / n_train_clients:
            raise ConfigError(
                f"delta={config.delta} is not below 1/{n_train_clients} (one over the number of clients, the "
                f"user-level dataset size): such a delta allows releasing a whole client; use delta <= "
                f"{1 / (10 * n_train_clients):.2g}"
            )
        planned: dict[str, Any] = {"algorithm": algorithm_name or learner.name, "cohort_sample_rate": q_cohort,
                                   "planned_rounds": rounds}
        expected = q_cohort * n_train_clients
        if config.placement == "distributed":
            return _distributed(config, learner, source=source, protocol=protocol, dim=dim, q=q_cohort,
                                n_clients=n_train_clients, rounds=rounds, planned=planned)
        z = config.noise_multiplier
        if z is None:
            assert config.target_epsilon is not None
            z = noise_for_target(target_epsilon=config.target_epsilon, delta=config.delta, sample_rate=q_cohort,
                                 steps=rounds, accountant=config.accountant)
        user = UserLevelDP(clip=config.clip, noise_multiplier=z, expected_cohort=expected, sample_rate=q_cohort,
                           ledger=Ledger(config.accountant, config.delta), placement="central",
                           source=source.fork("central-noise"))
        sampler = PoissonCohort(n_train_clients, q_cohort, source.fork("cohort"))
        return PrivacySetup(config, learner, noise_multiplier=z, user=user, planned=planned, sampler=sampler,
                            source=source)
    # record level
    steps_per_participation(learner)  # raises for learners that do not declare their released gradients
    if local_dataset_size is None:
        raise ConfigError("record-level DP needs local_dataset_size (the smallest client's number of examples) "
                          "to check delta against it")
    if config.delta >= 1 / local_dataset_size:
        raise ConfigError(
            f"delta={config.delta} is not below 1/{local_dataset_size} (one over the smallest local dataset, the "
            f"record-level dataset size): such a delta allows releasing a whole example; use delta <= "
            f"{1 / (10 * local_dataset_size):.2g}"
        )
    per_round = steps_per_participation(learner)
    planned_participations = participation_quantile(rounds, q_cohort, PARTICIPATION_QUANTILE)
    sigma = config.noise_multiplier
    max_part: int | None = None
    if sigma is None:
        assert config.target_epsilon is not None
        sigma = noise_for_target(target_epsilon=config.target_epsilon, delta=config.delta,
                                 sample_rate=config.sample_rate, steps=planned_participations * per_round,
                                 accountant=config.accountant)
        if sigma > 0:
            max_part = max_compositions(noise_multiplier=sigma, sample_rate=config.sample_rate,
                                        steps_per_unit=per_round, target_epsilon=config.target_epsilon,
                                        delta=config.delta, accountant=config.accountant,
                                        start=planned_participations, limit=rounds)
    wrapped = RecordLevelDP(
        learner, noise_multiplier=sigma, max_grad_norm=config.max_grad_norm, sample_rate=config.sample_rate,
        accountant=config.accountant, delta=config.delta, max_participations=max_part,
        source=source.fork("record"), secure_mode=True, allow_support_leak=config.allow_support_leak,
    )
    planned = {"algorithm": algorithm_name or learner.name, "planned_participations": planned_participations,
               "steps_per_participation": per_round, "max_participations": max_part}
    return PrivacySetup(config, wrapped, noise_multiplier=sigma, record=wrapped, planned=planned, source=source)


def _distributed(config: PrivacyConfig, learner: MetaLearner, *, source: NoiseSource, protocol: Any,
                 dim: int | None, q: float, n_clients: int, rounds: int, planned: dict[str, Any]) -> PrivacySetup:
    """Distributed placement: Skellam shares in SecAgg's ring, accounted per client against the server."""
    from securefml.privacy.accounting import Ledger
    from securefml.privacy.distributed import DistributedSkellam
    from securefml.privacy.skellam import noise_multiplier_for_target, rounded_sensitivity
    from securefml.privacy.user import UserLevelDP
    from securefml.protocols.quantize import FixedPoint  # privacy must not import protocols at import time

    if protocol is None:
        raise ConfigError("distributed DP needs the SecAgg protocol it runs under: pass protocol= and defense= "
                          "to setup_privacy (the noise is added in the protocol's integer ring)")
    expected = q * n_clients
    cohort = max(2, round(expected))
    d = dim if dim is not None else sum(p.numel() for p in learner.init_params().values())
    # noise sized for a low quantile of the Binomial(N, q) cohort size; smaller cohorts are skipped
    m_min = (config.min_survivors if config.min_survivors is not None
             else max(2, participation_quantile(n_clients, q, COHORT_QUANTILE)))
    scale = FixedPoint(protocol.clip_range, cohort, protocol.bits, 1.0).scale
    l1, l2 = rounded_sensitivity(scale=scale, clip=config.clip, dim=d)
    z = config.noise_multiplier
    cap: int | None = None
    if z is None:
        assert config.target_epsilon is not None
        cap = participation_quantile(rounds, q, PARTICIPATION_QUANTILE)
        z = noise_multiplier_for_target(target_epsilon=config.target_epsilon, delta=config.delta, releases=cap,
                                        l1=l1, l2=l2)
    mech = DistributedSkellam(clip=config.clip, noise_multiplier=z, min_survivors=m_min, delta=config.delta,
                              source=source.fork("skellam"))
    mech.attach(protocol, cohort=cohort, dim=d)
    user = UserLevelDP(clip=config.clip, noise_multiplier=z, expected_cohort=expected, sample_rate=q,
                       ledger=Ledger(config.accountant, config.delta), placement="distributed",
                       source=source.fork("unused"), distributed=mech)
    sampler = PoissonCohort(n_clients, q, source.fork("cohort"), max_participations=cap)
    planned = {**planned, "planned_sensitivity_ring_units": l2, "integer_scale": scale}
    return PrivacySetup(config, learner, noise_multiplier=z, user=user, planned=planned, sampler=sampler,
                        source=source)
