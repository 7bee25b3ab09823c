"""The one seam between a run and its DP mechanism: ``setup_privacy`` -> ``PrivacySetup``.

A run calls :func:`setup_privacy` once, uses ``setup.learner`` for its clients, passes
``setup.update_hook`` and ``setup.aggregate_hook`` to the ``Server``, calls
``setup.end_round(r)`` after each round and stores ``setup.report()`` as ``metrics.privacy``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from securefml.errors import ConfigError
from securefml.meta.base import MetaLearner
from securefml.privacy.config import PrivacyConfig

if TYPE_CHECKING:  # the mechanisms import Opacus: loaded only when DP is on (see setup_privacy)
    from securefml.privacy.record import RecordLevelDP
    from securefml.privacy.user import UserLevelDP

__all__ = ["PARTICIPATION_QUANTILE", "PrivacySetup", "participation_quantile", "setup_privacy"]


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
    """

    def __init__(self, config: PrivacyConfig, learner: MetaLearner, *, noise_multiplier: float = 0.0,
                 record: RecordLevelDP | None = None, user: UserLevelDP | None = None,
                 planned: dict[str, Any] | None = None) -> None:
        self.config = config
        self.learner = learner
        self.noise_multiplier = noise_multiplier
        self._record = record
        self._user = user
        self.planned = dict(planned or {})
        self.update_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = user.update_hook if user else None
        self.aggregate_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = (
            user.aggregate_hook if user else None
        )
        self.epsilon_history: list[float | None] = []
        self._per_client: dict[int, float] = {}

    def end_round(self, round_idx: int) -> float | None:
        """Account round ``round_idx`` once and return the largest epsilon spent so far (``None``: unbounded).

        Record level: epsilon is computed for the clients that trained this round (one accountant
        call per distinct history).  User level: the round's release is recorded in the
        federation's ledger, then epsilon is computed once.
        """
        if self._record is not None:
            touched = self._record.touched
            self._per_client.update(self._record.epsilons(touched))
            touched.clear()
            eps = max(self._per_client.values(), default=0.0)
        elif self._user is not None:
            self._user.end_round()
            eps = self._user.ledger.epsilon()
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
        out["secure_rng"] = cfg.secure_rng
        out["epsilon_history"] = list(self.epsilon_history)
        out.update(self.planned)
        if self._record is not None:
            eps = dict(self._per_client)
            out["epsilon_per_client"] = {str(k): _finite_or_none(v) for k, v in sorted(eps.items())}
            out["epsilon_max"] = _finite_or_none(max(eps.values())) if eps else 0.0
            out.update(max_grad_norm=cfg.max_grad_norm if math.isfinite(cfg.max_grad_norm) else None,
                       sample_rate=cfg.sample_rate, route=self._record.route,
                       covers=("query examples only (support set not covered)"
                               if self._record.route == "second-order" else "every local example"))
        elif self._user is not None:
            out["epsilon_max"] = _finite_or_none(self._user.ledger.epsilon())
            out.update(clip=cfg.clip if math.isfinite(cfg.clip) else None, placement=cfg.placement,
                       rounds_accounted=self._user.rounds_accounted, covers="every client (all of its data)")
        return out

    def __repr__(self) -> str:
        return (f"PrivacySetup(mode={self.config.mode!r}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"learner={self.learner!r})")


#: record-level noise is calibrated for the number of rounds a client joins with this probability
PARTICIPATION_QUANTILE = 0.95


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


def _noise_generator(config: PrivacyConfig, generator: torch.Generator | None) -> torch.Generator:
    if config.secure_rng:
        return torch.Generator().manual_seed(secrets.randbits(63))
    if generator is not None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return torch.Generator().manual_seed(seed)
    return torch.Generator().manual_seed(0)


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
        Where noise is drawn for CUDA runs (the CPU generator seeds a device generator).
    generator:
        Seeds the DP randomness (Poisson sampling and noise) reproducibly; ignored for the noise
        seed when ``config.secure_rng`` (seeded from the OS instead).

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
    from securefml.privacy.accounting import Ledger, max_compositions, noise_for_target
    from securefml.privacy.record import RecordLevelDP, record_route, steps_per_participation
    from securefml.privacy.user import UserLevelDP

    if n_train_clients <= 0 or clients_per_round <= 0 or rounds <= 0:
        raise ConfigError("n_train_clients, clients_per_round and rounds must be positive")
    cohort = min(clients_per_round, n_train_clients)
    q_cohort = cohort / n_train_clients
    gen = _noise_generator(config, generator)
    if config.mode == "user":
        if config.delta >= 1 / n_train_clients:
            raise ConfigError(
                f"delta={config.delta} is not below 1/{n_train_clients} (one over the number of clients, the "
                f"user-level dataset size): such a delta allows releasing a whole client; use delta <= "
                f"{1 / (10 * n_train_clients):.2g}"
            )
        z = config.noise_multiplier
        if z is None:
            assert config.target_epsilon is not None
            z = noise_for_target(target_epsilon=config.target_epsilon, delta=config.delta, sample_rate=q_cohort,
                                 steps=rounds, accountant=config.accountant)
        user = UserLevelDP(clip=config.clip, noise_multiplier=z, cohort_size=cohort, sample_rate=q_cohort,
                           ledger=Ledger(config.accountant, config.delta), placement=config.placement,
                           generator=gen, secure_mode=config.secure_rng)
        planned = {"algorithm": algorithm_name or learner.name, "cohort_sample_rate": q_cohort,
                   "planned_rounds": rounds}
        return PrivacySetup(config, learner, noise_multiplier=z, user=user, planned=planned)
    # record level
    record_route(learner)  # raises for learners it cannot privatize
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
        accountant=config.accountant, delta=config.delta, max_participations=max_part, generator=gen,
        secure_mode=config.secure_rng, allow_support_leak=config.allow_support_leak,
    )
    planned = {"algorithm": algorithm_name or learner.name, "planned_participations": planned_participations,
               "steps_per_participation": per_round, "max_participations": max_part}
    return PrivacySetup(config, wrapped, noise_multiplier=sigma, record=wrapped, planned=planned)
