"""Coordinate-wise robust rules: CoordinateMedian, TrimmedMean, Meamed.

Each coordinate is aggregated on its own, so these rules need every client's coordinates:
they run on plaintext updates or, under SecAgg, on the means of random buckets of clients
(``Reveals.BUCKETS``), never on a CKKS Gram matrix (they need comparisons).

Client weights are ignored: a Byzantine client could claim any weight, and the guarantees
below count clients, not samples.

Every rule here sorts each column once (``linalg.sorted_columns`` on blocks of
``SORT_CHUNK`` columns, shared among threads) and reads its answer from the sorted values;
``docs/performance.md`` explains the choice and its cost against ByzFL.  Meamed's ties at the
boundary distance are shared equally (``mean_around_median``), so the result is a function
of each column's values, never of client order (issue 18's tie bug).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense, effective_f, register_mean_condition
from securefml.defenses.linalg import SORT_CHUNK, coordinatewise, sorted_columns
from securefml.defenses.registry import DEFENSES
from securefml.errors import ConfigError
from securefml.reveals import Reveals

__all__ = [
    "coordinate_median",
    "trimmed_mean",
    "meamed",
    "mean_around_median",
    "check_f",
    "CoordinateMedian",
    "TrimmedMean",
    "Meamed",
]

_COORD = frozenset({Reveals.UPDATES, Reveals.BUCKETS})


def check_f(f: object) -> int:
    """Validate a Byzantine budget once, at construction."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"f (the number of Byzantine clients tolerated) must be an integer >= 0, got {f!r}")
    return f


def _middle(v: torch.Tensor) -> torch.Tensor:
    """Median of each sorted row of ``v`` (``[c, n]``), in float64: mean of the two middle values."""
    n = v.shape[1]
    lo = v[:, (n - 1) // 2].to(torch.float64)
    return lo if n % 2 else (lo + v[:, n // 2].to(torch.float64)) / 2


def coordinate_median(x: torch.Tensor, *, chunk: int = SORT_CHUNK) -> torch.Tensor:
    """Coordinate-wise median of the rows of ``x`` (the mean of the two middle values if n is even)."""
    return coordinatewise(x, lambda xb: _middle(sorted_columns(xb)), chunk=chunk)


def trimmed_mean(x: torch.Tensor, f: int, *, chunk: int = SORT_CHUNK) -> torch.Tensor:
    """Per coordinate, drop the ``f`` largest and ``f`` smallest values and average the rest."""
    n = x.shape[0]
    if n <= 2 * f:
        raise ConfigError(f"TrimmedMean with f={f} needs n > 2f clients, got n={n}")

    def block(xb: torch.Tensor) -> torch.Tensor:
        return sorted_columns(xb)[:, f : n - f].to(torch.float64).sum(dim=1) / (n - 2 * f)

    return coordinatewise(x, block, chunk=chunk)


def _around_median(v: torch.Tensor, keep: int) -> torch.Tensor:
    """Mean of the ``keep`` values nearest the median of each sorted row of ``v`` (float64).

    With ``r`` the ``keep``-th smallest distance to the median, every value nearer than ``r``
    is kept and the ``keep - #(nearer)`` remaining places are shared equally by all values
    at distance exactly ``r``: the expectation over a uniformly random tie-break, a function
    of the values alone (never of row order), equal to any tie-break when the tied values
    are equal (duplicated values, the usual case) and to the plain selection when no tie.
    """
    n = v.shape[1]
    med = _middle(v)
    w = v.to(torch.float64)
    # the keep nearest values of a sorted row form a window; r is the smallest, over the
    # n - keep + 1 windows, of the distance from the median to the window's farther end
    r = torch.maximum(med[:, None] - w[:, : n - keep + 1], w[:, keep - 1 :] - med[:, None]).amin(dim=1)
    dev = (w - med[:, None]).abs()
    nearer = dev < r[:, None]
    tied = dev == r[:, None]
    n_near = nearer.sum(dim=1)
    s_near = torch.where(nearer, w, 0.0).sum(dim=1)
    s_tied = torch.where(tied, w, 0.0).sum(dim=1)
    return (s_near + (keep - n_near) * s_tied / tied.sum(dim=1)) / keep


def mean_around_median(
    x: torch.Tensor, keep: int, *, rows: torch.Tensor | None = None, chunk: int = SORT_CHUNK
) -> torch.Tensor:
    """Per coordinate, average the ``keep`` values closest to the coordinate's median.

    ``rows`` (indices) restricts the rule to those rows of ``x`` without copying them out
    first (Bulyan's second step runs on its selection this way).

    Ties at the boundary distance share the remaining places equally (see ``_around_median``):
    on the column ``[-3, -3, -3, 0, 1, 2, 5]`` with ``keep = 5`` the median is 0, the values
    within distance 2 are 0, 1, 2 and two of the three -3 complete the five: -0.6.
    """
    n = x.shape[0] if rows is None else rows.numel()
    if not 1 <= keep <= n:
        raise ConfigError(f"cannot keep {keep} of {n} values per coordinate")
    if rows is None:
        return coordinatewise(x, lambda xb: _around_median(sorted_columns(xb), keep), chunk=chunk)
    idx = rows.to(x.device)
    return coordinatewise(x, lambda xb: _around_median(sorted_columns(xb[idx]), keep), chunk=chunk)


def meamed(x: torch.Tensor, f: int, *, chunk: int = SORT_CHUNK) -> torch.Tensor:
    """Per coordinate, average the ``n - f`` values closest to the coordinate's median."""
    n = x.shape[0]
    if n <= 2 * f:
        raise ConfigError(f"Meamed with f={f} needs n > 2f clients, got n={n}")
    return mean_around_median(x, n - f, chunk=chunk)


@DEFENSES.register("median")
class CoordinateMedian(Defense):
    """Coordinate-wise median (Yin et al., ICML 2018).

    Threat model: up to ``f < n/2`` Byzantine clients sending arbitrary vectors.
    Guarantee: every output coordinate lies within the range of the honest clients' values
    for that coordinate (a majority of the values on each side of the median is honest).
    Assumptions: honest updates are i.i.d.-like; the error bound grows with their variance.

    References
    ----------
    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett. Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates. ICML 2018.
    """

    name = "median"
    runs_on = _COORD

    def __init__(self, *, chunk: int = SORT_CHUNK) -> None:
        self.chunk = int(chunk)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        return AggregationResult(coordinate_median(updates, chunk=self.chunk), client_ids)


class _TrimmingRule(Defense):
    """Shared plumbing of the coordinate rules parameterised by the Byzantine budget ``f``."""

    runs_on = _COORD

    def __init__(self, f: int = 0, *, chunk: int = SORT_CHUNK) -> None:
        self.f = check_f(f)
        self.chunk = int(chunk)

    @abstractmethod
    def _combine(self, updates: torch.Tensor, f: int) -> torch.Tensor:
        """The per-coordinate aggregate of ``updates`` when ``f`` of them may be Byzantine."""

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        f = effective_f(self.f, context)
        return AggregationResult(self._combine(updates, f), client_ids, info={"f": f})


@DEFENSES.register("trimmedmean", positional="f")
class TrimmedMean(_TrimmingRule):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Per coordinate the ``f`` largest and ``f`` smallest values are dropped and the remaining
    ``n - 2f`` averaged.  The paper trims a fraction ``beta`` on each side; here the count
    ``f`` is given directly (``beta = f / n``), as in ByzFL.

    Threat model: up to ``f`` Byzantine clients, ``n > 2f``.  Guarantee: each output
    coordinate lies within the honest range of that coordinate.  Rows excluded earlier as
    NaN/Inf count against ``f``.

    References
    ----------
    D. Yin, Y. Chen, K. Ramchandran, P. Bartlett. Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates. ICML 2018.
    """

    name = "trimmedmean"

    def _combine(self, updates: torch.Tensor, f: int) -> torch.Tensor:
        return trimmed_mean(updates, f, chunk=self.chunk)


@DEFENSES.register("meamed", positional="f")
class Meamed(_TrimmingRule):
    """Mean around the median (Xie et al., 2018).

    Per coordinate, the ``n - f`` values closest to the coordinate-wise median are averaged.

    Threat model: up to ``f`` Byzantine clients, ``n > 2f``.  Guarantee (paper, Thm. 3):
    dimensional Byzantine resilience in expectation.  Unlike TrimmedMean it does *not*
    promise the output stays inside the honest range: a Byzantine value just outside the
    honest range can be among the ``n - f`` values closest to the median.

    References
    ----------
    C. Xie, O. Koyejo, I. Gupta. Generalized Byzantine-tolerant SGD. arXiv:1802.10116, 2018.
    """

    name = "meamed"

    def _combine(self, updates: torch.Tensor, f: int) -> torch.Tensor:
        return meamed(updates, f, chunk=self.chunk)


def _trimmed_to_mean(rule: TrimmedMean | Meamed, n: int, context: Mapping[str, Any]) -> str | None:
    """Trimmed rules reduce to the mean when their effective ``f`` trims nothing."""
    f = effective_f(rule.f, context, rule)
    return "f=0 trims nothing" if f == 0 else None


register_mean_condition(TrimmedMean, _trimmed_to_mean)
register_mean_condition(Meamed, _trimmed_to_mean)
