"""ByzFL-style "optimal" ALIE and IPM: the attack's strength searched against the defense in use.

ALIE (Baruch et al. 2019) and IPM (Xie et al. 2020) have one strength parameter each (``z``,
``epsilon``) that the papers set by a formula or by hand.  The "optimal" variants (as in
ByzFL's ``Optimal_ALIE`` / ``Optimal_InnerProductManipulation``) pick, every round, the
strength that moves the server's *own* rule furthest from the honest mean: ALIE's rows
``mean - gamma * std`` and IPM's rows ``-gamma * mean``.  They are ``Adaptive`` with a fixed
direction; ``Adaptive`` documents the line search and its cost.

Threat model: white box: the colluding malicious clients know the rule (and the context the
server passes it, e.g. its derived ``f``) and, when omniscient, the round's honest updates.
The search runs the rule on a copy, so a stateful rule's state is not touched.

References
----------
G. Baruch, M. Baruch, Y. Goldberg. A Little Is Enough. NeurIPS 2019.  C. Xie, O. Koyejo,
I. Gupta. Fall of Empires. UAI 2020.  ByzFL (LPD-EPFL): optimal attacks by strength search.
"""

from __future__ import annotations

from securefml.attacks.adaptive import Adaptive
from securefml.attacks.registry import ATTACKS

__all__ = ["OptimalALIE", "OptimalIPM"]


@ATTACKS.register("optimal-alie")
class OptimalALIE(Adaptive):
    """ALIE rows ``mean - gamma * std`` with ``gamma`` searched against the defense in use."""

    name = "optimal-alie"

    def __init__(
        self, *, gamma_min: float = 1e-2, gamma_max: float = 1e2, grid: int = 12, refine: int = 6,
        omniscient: bool = True,
    ) -> None:
        super().__init__("std", gamma_min=gamma_min, gamma_max=gamma_max, grid=grid, refine=refine,
                         omniscient=omniscient)


@ATTACKS.register("optimal-ipm")
class OptimalIPM(Adaptive):
    """IPM rows ``-gamma * mean`` with ``gamma`` searched against the defense in use."""

    name = "optimal-ipm"

    def __init__(
        self, *, gamma_min: float = 1e-2, gamma_max: float = 1e2, grid: int = 12, refine: int = 6,
        omniscient: bool = True,
    ) -> None:
        super().__init__("ipm", gamma_min=gamma_min, gamma_max=gamma_max, grid=grid, refine=refine,
                         omniscient=omniscient)
