"""SecAgg+ parameter derivation: ``k`` and ``t`` for a cohort, and the public weight bound.

Why a module of its own: these are the protocol's *public* choices, fixed before any client
speaks, and each has a security argument that must not depend on the clients' inputs.

- ``graph_params`` turns the user's settings (explicit ``k``/``t``, or the tolerated dropout and
  corrupt fractions) into ``GraphParams`` for an ``n``-client sum.  Derived values come from
  ``secagg_graph.derive_parameters`` (Bell et al., CCS 2020); a cohort too small for any sparse
  graph falls back to the complete graph (classic SecAgg) with the majority threshold
  ``t = (n - 1 + c) // 2 + 1``, keeping the security condition ``2t > k + c`` and losing dropout
  tolerance instead.  An explicit ``k`` without ``t`` gets the smallest ``t`` with ``2t > k + c``.
- ``resolve_max_weight`` picks the public bound on one client's weight that sizes the ring
  (``quantize.FixedPoint``).  The server must never learn a single client's weight, so the
  bound is never derived from the clients' updates: it is the round's public setting
  (``HalvesSetup.max_weight``), else the protocol's own ``max_weight``, else
  ``DEFAULT_MAX_WEIGHT``.  A client whose weight exceeds the bound encodes the bound (its
  influence is capped, as documented in ``FixedPoint``); its half logs it and counts it in its
  own stats (``SecAggClientStats.weight_clipped``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from securefml.errors import ConfigError
from securefml.protocols.secagg_graph import GraphParams, derive_parameters

__all__ = ["DEFAULT_MAX_WEIGHT", "graph_params", "resolve_max_weight"]

#: The public weight bound when neither the round nor the protocol sets one: a power of two
#: above the sample counts of the bundled few-shot tasks.  Each doubling halves the precision.
DEFAULT_MAX_WEIGHT = 64.0


def resolve_max_weight(round_bound: float | None, protocol_bound: float | None) -> float:
    """The round's public weight bound: ``round_bound``, else ``protocol_bound``, else the default.

    Raises
    ------
    ConfigError
        If the chosen bound is not positive and finite.
    """
    bound = round_bound if round_bound is not None else protocol_bound
    if bound is None:
        return DEFAULT_MAX_WEIGHT
    if not (math.isfinite(bound) and bound > 0):
        raise ConfigError(f"max_weight must be positive and finite, got {bound}")
    return float(bound)


def graph_params(
    n: int,
    *,
    neighbours: int | None,
    threshold: int | None,
    dropout_fraction: float,
    corrupt_fraction: float,
    sigma: int,
    eta: int,
    warn: Callable[[str, str], None] | None = None,
) -> GraphParams:
    """``k`` and ``t`` for a secure sum over ``n`` clients.

    ``warn(key, message)`` is told when a small cohort falls back to the complete graph
    (``SecAggPlus`` says it once per run).

    Raises
    ------
    ConfigError
        If ``n < 2`` or the resulting threshold exceeds ``k``.
    """
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
    derived = None
    if neighbours is None or threshold is None:
        try:
            derived = derive_parameters(n, dropout_fraction=dropout_fraction, corrupt_fraction=corrupt_fraction,
                                        sigma=sigma, eta=eta)
        except ConfigError as exc:  # small cohorts: keep the security condition, lose dropout tolerance
            corrupt = math.ceil(corrupt_fraction * n)
            derived = GraphParams(n - 1, min(n - 1, (n - 1 + corrupt) // 2 + 1))
            if warn is not None:
                warn(f"complete-graph-{n}", f"secagg: {exc}; using the complete graph with t={derived.t} "
                     "(said once per run)")
    if neighbours is not None:
        k = min(neighbours, n - 1)
    else:
        assert derived is not None
        k = derived.k
    if threshold is not None:
        t = threshold
    elif neighbours is None:
        assert derived is not None
        t = derived.t
    else:
        c = math.ceil(corrupt_fraction * k)
        t = (k + c) // 2 + 1
    if t > k:
        raise ConfigError(f"threshold {t} exceeds the {k} neighbours of a {n}-client sum")
    return GraphParams(k, t)
