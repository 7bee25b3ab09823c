"""Coordinate-wise robust rules: CoordinateMedian, TrimmedMean, Meamed.

Each coordinate is aggregated on its own, so these rules need every client's coordinates:
they run on plaintext updates or, under SecAgg, on the means of random buckets of clients
(``Reveals.BUCKETS``), never on a CKKS Gram matrix (they need comparisons).

Client weights are ignored: a Byzantine client could claim any weight, and the guarantees
below count clients, not samples.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense, effective_f
from securefml.defenses.linalg import DEFAULT_CHUNK, coordinatewise
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


def _sorted_block(xb: torch.Tensor) -> torch.Tensor:
    """Each column sorted (a contiguous row-wise sort of the transpose: faster than sorting dim 0)."""
    return xb.T.contiguous().sort(dim=1).values.T


def _median_block(xb: torch.Tensor) -> torch.Tensor:
    lower = xb.median(dim=0).values.to(torch.float64)
    if xb.shape[0] % 2:
        return lower
    # the lower median of -x is minus the upper median of x
    return (lower - (-xb).median(dim=0).values.to(torch.float64)) / 2


def coordinate_median(x: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Coordinate-wise median of the rows of ``x`` (the mean of the two middle values if n is even)."""
    return coordinatewise(x, _median_block, chunk=chunk)


def trimmed_mean(x: torch.Tensor, f: int, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per coordinate, drop the ``f`` largest and ``f`` smallest values and average the rest."""
    n = x.shape[0]
    if n <= 2 * f:
        raise ConfigError(f"TrimmedMean with f={f} needs n > 2f clients, got n={n}")

    def block(xb: torch.Tensor) -> torch.Tensor:
        return _sorted_block(xb)[f : n - f].to(torch.float64).mean(dim=0)

    return coordinatewise(x, block, chunk=chunk)


def mean_around_median(x: torch.Tensor, keep: int, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per coordinate, average the ``keep`` values closest to the coordinate's median."""
    n = x.shape[0]
    if not 1 <= keep <= n:
        raise ConfigError(f"cannot keep {keep} of {n} values per coordinate")

    def block(xb: torch.Tensor) -> torch.Tensor:
        # the `keep` values closest to the median form a window of the sorted column: pick,
        # among the n - keep + 1 windows, the one whose farther end is nearest the median
        # (ties: the lower window, decided on values only, so row order never matters)
        v = _sorted_block(xb).to(torch.float64)
        med = (v[(n - 1) // 2] + v[n // 2]) / 2
        starts = torch.arange(n - keep + 1, device=v.device)
        cost = torch.maximum(med - v[starts], v[starts + keep - 1] - med)
        best = cost.argmin(dim=0)
        csum = torch.cat([torch.zeros_like(v[:1]), v.cumsum(dim=0)])
        total = csum.gather(0, (best + keep)[None]) - csum.gather(0, best[None])
        return total[0] / keep

    return coordinatewise(x, block, chunk=chunk)


def meamed(x: torch.Tensor, f: int, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per coordinate, average the ``n - f`` values closest to the coordinate's median."""
    n = x.shape[0]
    if n <= 2 * f:
        raise ConfigError(f"Meamed with f={f} needs n > 2f clients, got n={n}")
    return mean_around_median(x, n - f, chunk=chunk)


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

    def __init__(self, *, chunk: int = DEFAULT_CHUNK) -> None:
        self.chunk = int(chunk)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        return AggregationResult(coordinate_median(updates, chunk=self.chunk), client_ids)


class _TrimmingRule(Defense):
    """Shared plumbing of the coordinate rules parameterised by the Byzantine budget ``f``."""

    runs_on = _COORD

    def __init__(self, f: int = 0, *, chunk: int = DEFAULT_CHUNK) -> None:
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
