"""The Byzantine budget ``f``: required, or derived from the malicious fraction and the cohort.

A rule told ``f = 0`` (the old default) tolerates no Byzantine client at all, and for most
rules that configuration *is* the plain mean.  So a rule built without ``f`` does not assume
0: it reads the budget the federation put in its context (``BYZANTINE_KEY``), and raises a
``ConfigError`` naming itself when there is none.

With random cohorts a fixed fraction is not enough: a cohort of 8 drawn from a population
that is 25 % malicious holds 2 attackers on average but more than 2 in about a third of the
rounds.  ``byzantine_budget`` therefore takes the hypergeometric tail: the smallest ``f``
with ``P(X > f) <= 1 - confidence`` for ``X`` the number of malicious clients in a cohort
drawn without replacement (binomial when the population is unknown).  The margin this adds
over ``fraction * cohort`` is stated in ``docs/robustness.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from securefml.errors import ConfigError

__all__ = ["BYZANTINE_KEY", "byzantine_budget", "cohort_tail", "check_optional_f", "resolve_f"]

log = logging.getLogger(__name__)

#: Context key holding the federation's derived Byzantine budget per cohort (an int).
BYZANTINE_KEY = "byzantine_budget"


def cohort_tail(fraction: float, cohort: int, f: int, *, population: int | None = None) -> float:
    """``P(X > f)``: the probability a random cohort holds more than ``f`` malicious clients.

    ``X`` is hypergeometric (``round(fraction * population)`` malicious among ``population``,
    ``cohort`` drawn without replacement) or binomial(``cohort``, ``fraction``) when
    ``population`` is None.

    >>> round(cohort_tail(0.25, 8, 2, population=100), 3)
    0.318
    """
    if population is None:
        return sum(
            math.comb(cohort, k) * fraction**k * (1 - fraction) ** (cohort - k) for k in range(f + 1, cohort + 1)
        )
    bad = int(round(fraction * population))
    total = math.comb(population, cohort)
    return sum(
        math.comb(bad, k) * math.comb(population - bad, cohort - k) for k in range(f + 1, min(bad, cohort) + 1)
    ) / total


def byzantine_budget(
    fraction: float, cohort: int, *, population: int | None = None, confidence: float = 0.95
) -> int:
    """The smallest ``f`` a random cohort exceeds with probability at most ``1 - confidence``.

    Capped at ``(cohort - 1) // 2`` (no rule tolerates a Byzantine majority); a warning is
    logged when the cap binds, since then the guarantee holds with lower confidence.

    Examples
    --------
    >>> byzantine_budget(0.2, 10, population=100), byzantine_budget(0.2, 25, population=100)
    (4, 8)
    >>> byzantine_budget(0.0, 8)
    0
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"malicious fraction must be in [0, 1), got {fraction!r}")
    if isinstance(cohort, bool) or not isinstance(cohort, int) or cohort < 1:
        raise ConfigError(f"cohort size must be a positive integer, got {cohort!r}")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    if population is not None and population < cohort:
        raise ConfigError(f"population {population} is smaller than the cohort {cohort}")
    if fraction == 0:
        return 0
    cap = (cohort - 1) // 2
    for f in range(cap + 1):
        if cohort_tail(fraction, cohort, f, population=population) <= 1 - confidence:
            return f
    log.warning(
        "a Byzantine budget covering %.0f%% of cohorts of %d at malicious fraction %.2f exceeds the "
        "majority cap f=%d; using the cap (P(X > f) = %.3f)",
        100 * confidence, cohort, fraction, cap, cohort_tail(fraction, cohort, cap, population=population),
    )
    return cap


def check_optional_f(f: object) -> int | None:
    """Validate a constructor's ``f``: a non-negative integer, or None (resolved per round)."""
    if f is None:
        return None
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"f (the number of Byzantine clients tolerated) must be an integer >= 0 or None, got {f!r}")
    return f


def resolve_f(f: int | None, context: Mapping[str, Any], owner: object = None) -> int:
    """The configured ``f``, else the federation's budget from ``context[BYZANTINE_KEY]``."""
    if f is not None:
        return int(f)
    value = context.get(BYZANTINE_KEY)
    if value is None:
        raise ConfigError(
            f"{owner if owner is not None else 'this rule'} needs f (the Byzantine clients to tolerate): pass f=..., "
            f"or run it in a federation that derives it from the malicious fraction (context[{BYZANTINE_KEY!r}])"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"context[{BYZANTINE_KEY!r}] must be an integer >= 0, got {value!r}")
    return value
