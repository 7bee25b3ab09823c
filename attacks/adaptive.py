"""An adaptive attack: search the attack strength that hurts a *given* defense the most.

Fixed-strength attacks are tuned for one rule; a defense evaluated only against them looks
better than it is.  ``Adaptive`` knows the server's rule (``AttackContext.defense``, any
securefml ``Defense``) and the round's honest updates, and line-searches the strength
``gamma`` of ``mean + gamma * p`` that maximises the distance between the defense's output and
the honest mean.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from securefml.attacks.base import Attack, AttackContext
from securefml.attacks.model_poisoning import benign_reference, perturbation_direction
from securefml.attacks.registry import ATTACKS
from securefml.errors import ConfigError

__all__ = ["Adaptive", "defense_deviation"]


def defense_deviation(
    defense: Any, honest: torch.Tensor, malicious: torch.Tensor, *, context: Mapping[str, Any] | None = None
) -> float:
    """``|| defense(honest + malicious rows) - mean(honest) ||``, the damage one round does.

    The honest rows come first, the malicious ones last; a rule that returns only weights (a
    Gram-only rule) is applied to the rows here.  A non-finite result counts as no damage.
    The rule runs on a copy, so a stateful defense (centered clipping's center, a
    reputation's evidence) is not changed by the attacker's simulation; ``context`` is what
    the server passes its rule (e.g. the derived Byzantine budget).
    """
    rows = torch.cat([honest, malicious.to(honest.dtype)])
    result = copy.deepcopy(defense)(rows, context=dict(context or {}))
    agg = result.aggregate
    if agg is None:
        w = result.weights.to(torch.float64)
        agg = (w[:, None] * rows.to(torch.float64)).sum(0)
    dev = (agg.to(torch.float64) - honest.to(torch.float64).mean(0)).norm()
    return float(dev) if torch.isfinite(dev) else 0.0


@ATTACKS.register("adaptive", positional="direction")
class Adaptive(Attack):
    """Line search on the attack strength against the server's own defense.

    The malicious rows are ``mean(benign) + gamma * p`` (all identical), ``p`` one of
    Shejwalkar & Houmansadr's perturbations (``"unit"``: ``-mean/||mean||``, ``"std"``,
    ``"sign"``), or ``"ipm"`` (rows ``-gamma * mean``, Xie et al.'s direction).  The search
    evaluates a geometric grid of ``grid`` strengths in ``[gamma_min, gamma_max]`` and then
    refines around the best one with ``refine`` golden-section steps; the deviation is
    measured by :func:`defense_deviation`.  With ``omniscient=False`` the malicious clients
    use their own genuine updates as the benign estimate.

    Threat model: ``f`` colluding clients that know the aggregation rule (white box) and,
    when omniscient, the honest updates; they cost the server ``grid + refine`` extra
    evaluations of its rule per round, on the attacker's side.

    Parameters
    ----------
    direction:
        ``"unit"``, ``"std"``, ``"sign"`` or ``"ipm"``.
    gamma_min, gamma_max:
        Search range of the strength.
    grid:
        Number of grid points (geometric spacing).
    refine:
        Golden-section refinement steps around the best grid point.

    References
    ----------
    Shejwalkar & Houmansadr, NDSS 2021 (AGR-tailored attacks optimise the strength against
    a known rule); Fang et al., USENIX Security 2020 (full-knowledge attacks).
    """

    name = "adaptive"

    def __init__(
        self,
        direction: str = "unit",
        *,
        gamma_min: float = 1e-2,
        gamma_max: float = 1e3,
        grid: int = 16,
        refine: int = 8,
        omniscient: bool = True,
    ) -> None:
        if direction not in ("unit", "std", "sign", "ipm"):
            raise ConfigError(f"unknown direction {direction!r}; choose one of: ipm, sign, std, unit")
        if not (0 < gamma_min < gamma_max) or not math.isfinite(gamma_max):
            raise ConfigError(f"need 0 < gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        if int(grid) < 2 or int(refine) < 0:
            raise ConfigError(f"need grid >= 2 and refine >= 0, got grid={grid}, refine={refine}")
        self.direction = direction
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.grid = int(grid)
        self.refine = int(refine)
        self.omniscient = bool(omniscient)

    def _base(self, benign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(origin, direction)`` with rows ``origin + gamma * direction`` (float64)."""
        b = benign.to(torch.float64)
        mu = b.mean(0)
        if self.direction == "ipm":
            return torch.zeros_like(mu), -mu
        return mu, perturbation_direction(b, self.direction)

    def rows(self, benign: torch.Tensor, gamma: float, m: int) -> torch.Tensor:
        """The ``[m, d]`` malicious rows for strength ``gamma`` (float64)."""
        origin, p = self._base(benign)
        return (origin + gamma * p).unsqueeze(0).expand(m, -1)

    def search(
        self, benign: torch.Tensor, m: int, defense: Any, *, context: Mapping[str, Any] | None = None
    ) -> tuple[float, float]:
        """Return ``(gamma, deviation)`` of the best strength found."""
        honest = benign.to(torch.float64)
        origin, p = self._base(honest)

        def score(g: float) -> float:
            rows = (origin + g * p).unsqueeze(0).expand(m, -1)
            return defense_deviation(defense, honest, rows, context=context)

        grid = torch.logspace(math.log10(self.gamma_min), math.log10(self.gamma_max), self.grid, dtype=torch.float64)
        values = [score(float(g)) for g in grid]
        best = max(range(len(values)), key=lambda i: values[i])
        best_g, best_v = float(grid[best]), values[best]
        # Golden-section search in log-strength on the bracket around the best grid point.
        lo = math.log(float(grid[max(best - 1, 0)]))
        hi = math.log(float(grid[min(best + 1, len(grid) - 1)]))
        phi = (math.sqrt(5) - 1) / 2
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        fa, fb = score(math.exp(a)), score(math.exp(b))
        for _ in range(self.refine):
            for g, v in ((a, fa), (b, fb)):
                if v > best_v:
                    best_g, best_v = math.exp(g), v
            if fa >= fb:
                hi, b, fb = b, a, fa
                a = hi - phi * (hi - lo)
                fa = score(math.exp(a))
            else:
                lo, a, fa = a, b, fb
                b = lo + phi * (hi - lo)
                fb = score(math.exp(b))
        for g, v in ((a, fa), (b, fb)):
            if v > best_v:
                best_g, best_v = math.exp(g), v
        return best_g, best_v

    def poison_updates(self, own: torch.Tensor, context: AttackContext) -> torch.Tensor:
        if context.defense is None:
            raise ConfigError("the adaptive attack needs the server's defense in AttackContext.defense")
        benign = benign_reference(own, context, omniscient=self.omniscient)
        gamma, dev = self.search(benign, own.shape[0], context.defense,
                                 context=context.defense_context)
        context.attack_info[self.name] = {"gamma": gamma, "deviation": dev}
        return self.rows(benign, gamma, own.shape[0]).to(own.dtype).clone()
