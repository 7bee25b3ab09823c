"""Privacy accounting on Opacus' accountants (RDP, PRV): no home-made formula.

A :class:`Ledger` is one party's accountant (one client for record-level DP, the whole
federation for user-level DP).  Steps are recorded as they happen (cheap: Opacus merges
consecutive identical steps into one history entry); epsilon is computed on demand, and the
computation (0.2-0.35 s per call) is cached on the exact history, so clients that share a
history (same noise, sample rate and step count) cost one call per round between them.

References
----------
Mironov, Renyi Differential Privacy, CSF 2017; Mironov, Talwar, Zhang, Renyi Differential
Privacy of the Sampled Gaussian Mechanism, 2019; Gopi, Lee, Wutschitz, Numerical Composition of
Differential Privacy (PRV accountant), NeurIPS 2021.
"""

from __future__ import annotations

import math
from functools import lru_cache

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from securefml.errors import ConfigError
from securefml.privacy.config import ACCOUNTANTS

__all__ = ["Ledger", "epsilon_for", "noise_for_target", "max_compositions"]

History = tuple[tuple[float, float, int], ...]


def _check_name(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


@lru_cache(maxsize=4096)
def _epsilon_cached(accountant: str, history: History, delta: float) -> float:
    if not history:
        return 0.0
    if any(q > 0 and n > 0 and sigma == 0 for sigma, q, n in history):
        return math.inf
    acc = create_accountant(accountant)
    acc.history = [h for h in history if h[1] > 0 and h[2] > 0]
    if not acc.history:
        return 0.0
    return float(acc.get_epsilon(delta=delta))


def epsilon_for(accountant: str, history: History, delta: float) -> float:
    """Epsilon of a composition ``history`` of (noise multiplier, sample rate, steps) at ``delta``.

    Zero noise on a non-empty history gives ``math.inf``; an empty history gives 0.
    """
    _check_name(accountant)
    return _epsilon_cached(accountant, tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


def noise_for_target(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str) -> float:
    """The noise multiplier that spends ``target_epsilon`` at ``delta`` after ``steps`` sampled steps.

    Wraps Opacus' ``get_noise_multiplier``; ``math.inf`` gives 0 (no noise).  Raises
    ``ConfigError`` when Opacus cannot reach the target (it reports that as ``ValueError``).
    """
    _check_name(accountant)
    if math.isinf(target_epsilon):
        return 0.0
    if steps <= 0:
        raise ConfigError(f"no DP step is planned (steps={steps}); nothing to calibrate noise for")
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as exc:
        raise ConfigError(f"cannot reach epsilon={target_epsilon} at delta={delta} with sample rate "
                          f"{sample_rate:.4g} over {steps} steps: {exc}; raise the target epsilon or "
                          "lower the number of steps/rounds") from exc


def max_compositions(*, noise_multiplier: float, sample_rate: float, steps_per_unit: int, target_epsilon: float,
                     delta: float, accountant: str, start: int, limit: int) -> int:
    """Largest ``k <= limit`` with epsilon(k * steps_per_unit steps) <= target, searched upwards from ``start``.

    Used to stop a record-level client once its own budget is spent (a client sampled in more
    rounds than planned).  Each probe is one accountant call, so the search is linear and
    starts at the planned count.
    """
    if math.isinf(target_epsilon):
        return limit
    k = max(0, start)
    while k < limit:
        eps = epsilon_for(accountant, ((noise_multiplier, sample_rate, (k + 1) * steps_per_unit),), delta)
        if eps > target_epsilon:
            break
        k += 1
    return k


class Ledger:
    """One party's privacy ledger over an Opacus accountant.

    Parameters
    ----------
    accountant:
        ``"rdp"`` or ``"prv"``.
    delta:
        The delta epsilon is reported at.
    """

    def __init__(self, accountant: str, delta: float) -> None:
        _check_name(accountant)
        self.name = accountant
        self.delta = delta
        self.accountant: IAccountant = create_accountant(accountant)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` applications of the sampled Gaussian mechanism."""
        for _ in range(steps):
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def history(self) -> History:
        return tuple((float(s), float(q), int(n)) for s, q, n in self.accountant.history)

    @property
    def steps(self) -> int:
        return int(sum(n for _, _, n in self.accountant.history))

    def epsilon(self) -> float:
        """Epsilon spent so far at ``self.delta`` (cached on the exact history)."""
        return epsilon_for(self.name, self.history, self.delta)

    def state_dict(self) -> dict[str, object]:
        return {"accountant": self.name, "delta": self.delta, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state.get("accountant") != self.name:
            raise ConfigError(f"ledger state is for accountant {state.get('accountant')!r}, not {self.name!r}")
        history = state.get("history", [])
        assert isinstance(history, list)
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]

    def __repr__(self) -> str:
        return f"Ledger(accountant={self.name!r}, delta={self.delta}, steps={self.steps})"
