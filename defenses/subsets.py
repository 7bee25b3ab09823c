"""Subset and spectral rules from geometry: MDA, SMEA and CAF.

Each rule outputs a weighted average of the updates whose weights depend only on the Gram
matrix (pairwise inner products), so each runs in plaintext, on SecAgg bucket means, and on
a CKKS ``Gram`` (the key holder decrypts the matrix; the server forms the weighted
homomorphic sum).  The covariance of any weighted subset has the same non-zero eigenvalues
as its centred, weighted Gram matrix, which is how SMEA and CAF avoid ``d x d`` matrices.

Threat model for all three: up to ``f < n/2`` Byzantine clients sending anything.

References
----------
E. M. El Mhamdi, R. Guerraoui, S. Rouault. Distributed Momentum for Byzantine-resilient
Stochastic Gradient Descent. ICLR 2021 (MDA, after Rousseeuw's minimum volume ellipsoid).
Y. Allouah, R. Guerraoui, N. Gupta, R. Pinot, G. Rizk. Robust Distributed Learning: Tight
Error Bounds and Breakdown Point under Data Heterogeneity. NeurIPS 2023 (SMEA).
Y. Allouah, R. Guerraoui, J. Stephan. Towards Trustworthy Federated Learning with Untrusted
Participants. ICML 2025 (CAF, covariance-bound agnostic filter).  ByzFL (LPD-EPFL) also
implements all three; these are not cross-checked against it (it is not installed here).
"""

from __future__ import annotations

import itertools
import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense, effective_f
from securefml.defenses.budget import check_optional_f
from securefml.defenses.distance import combine
from securefml.defenses.linalg import DEFAULT_CHUNK, sq_distances_from_gram, stable_gram
from securefml.defenses.registry import DEFENSES
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = ["mda_subset", "smea_subset", "caf_weights", "MDA", "SMEA", "CAF", "MAX_SUBSETS"]

_GEOMETRY = frozenset({Reveals.UPDATES, Reveals.GRAM, Reveals.BUCKETS})
#: exhaustive subset rules refuse cohorts with more subsets than this (they are exponential)
MAX_SUBSETS = 200_000


def _subsets(n: int, f: int, rule: str) -> itertools.combinations:
    if not 0 <= f < n / 2:
        raise ConfigError(f"{rule} with f={f} needs n > 2f clients, got n={n}")
    count = math.comb(n, n - f)
    if count > MAX_SUBSETS:
        raise ConfigError(f"{rule} would search {count} subsets of {n - f} of {n} clients (limit {MAX_SUBSETS})")
    return itertools.combinations(range(n), n - f)


def mda_subset(sq_dist: torch.Tensor, f: int) -> tuple[int, ...]:
    """The ``n - f`` rows with the smallest diameter (max pairwise distance).

    Subsets sharing the diameter pair tie on the diameter; ties are broken by the next
    largest distances (lexicographic on the sorted pairwise distances), a function of the
    set's geometry, so the choice does not depend on row order.
    """
    n = sq_dist.shape[0]
    best: tuple[int, ...] = ()
    best_key: list[float] | None = None
    iu = torch.triu_indices(n - f, n - f, offset=1)
    for s in _subsets(n, f, "MDA"):
        idx = torch.tensor(s)
        key = sq_dist[idx][:, idx][iu[0], iu[1]].sort(descending=True).values.tolist()
        if best_key is None or key < best_key:
            best, best_key = s, key
    return best


def _max_eig_centred(g: torch.Tensor) -> float:
    """Largest eigenvalue of the empirical covariance of the rows whose Gram is ``g``."""
    k = g.shape[0]
    h = torch.eye(k, dtype=torch.float64) - 1.0 / k
    return float(torch.linalg.eigvalsh(h @ g @ h / k)[-1])


def smea_subset(inner: torch.Tensor, f: int) -> tuple[int, ...]:
    """The ``n - f`` rows whose covariance has the smallest top eigenvalue."""
    g = inner.to(torch.float64).cpu()
    best, best_e = (), math.inf
    for s in _subsets(g.shape[0], f, "SMEA"):
        idx = torch.tensor(s)
        e = _max_eig_centred(g[idx][:, idx])
        if e < best_e - 1e-12 * max(1.0, abs(best_e) if math.isfinite(best_e) else 1.0):
            best, best_e = s, e
    return best


def caf_weights(inner: torch.Tensor, f: int) -> torch.Tensor:
    """CAF's averaging weights (sum 1), from the Gram matrix only.

    Start with ``c = 1``; while ``sum(c) > n - 2f``: take the ``c``-weighted mean ``mu`` and
    covariance, its top eigenpair ``(lam, v)``, the squared projections ``tau_i = <u_i - mu,
    v>^2`` and shrink ``c_i <- c_i (1 - tau_i / max tau)``.  Return the weighted mean whose
    covariance had the smallest ``lam`` along the way.
    """
    g = inner.to(torch.float64).cpu()
    n = g.shape[0]
    if not 0 <= f < n / 2:
        raise ConfigError(f"CAF with f={f} needs n > 2f clients, got n={n}")
    c = torch.ones(n, dtype=torch.float64)
    best_a, best_lam = c / n, math.inf
    for _ in range(n + 1):
        total = float(c.sum())
        a = c / total
        p = torch.eye(n, dtype=torch.float64) - a[None, :]  # row i: u_i - mu in the basis of updates
        centred = p @ g @ p.T
        sq = c.clamp_min(0).sqrt()
        evals, evecs = torch.linalg.eigh(sq[:, None] * centred * sq[None, :] / total)
        lam, w = float(evals[-1]), evecs[:, -1]
        if lam < best_lam:
            best_a, best_lam = a, lam
        if total <= n - 2 * f or lam <= 1e-300:
            break
        proj = (centred @ (sq * w)) / math.sqrt(total * lam)  # <u_i - mu, v>
        tau = proj.square()
        if float(tau.max()) <= 0:
            break
        c = c * (1 - tau / tau.max())
    return best_a


class _SubsetRule(Defense):
    runs_on = _GEOMETRY

    def __init__(self, f: int | None = None, *, chunk: int = DEFAULT_CHUNK) -> None:
        self.f = check_optional_f(f)
        self.chunk = int(chunk)

    @abstractmethod
    def _coeffs(self, inner: torch.Tensor, f: int) -> torch.Tensor:
        """The ``[n]`` combination weights the rule picks from the ``[n, n]`` inner products."""

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        return "f=0 keeps every update" if effective_f(self.f, context, self) == 0 else None

    def _result(
        self, coeffs: torch.Tensor, ids: tuple[int, ...], agg: torch.Tensor | None, f: int
    ) -> AggregationResult:
        flagged = tuple(c for c, w in zip(ids, coeffs.tolist()) if w <= 0)
        return AggregationResult(agg, ids, weights=coeffs, flagged=flagged, info={"f": f})

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        f = effective_f(self.f, context, self)
        coeffs = self._coeffs(stable_gram(updates, chunk=self.chunk), f).to(updates.device)
        return self._result(coeffs, client_ids, combine(coeffs, updates), f)

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        f = effective_f(self.f, context, self)
        return self._result(self._coeffs(gram.inner, f), gram.client_ids, None, f)


def _uniform(n: int, subset: tuple[int, ...]) -> torch.Tensor:
    w = torch.zeros(n, dtype=torch.float64)
    w[list(subset)] = 1.0 / len(subset)
    return w


@DEFENSES.register("mda")
class MDA(_SubsetRule):
    """Minimum Diameter Averaging: the mean of the ``n - f`` updates with the smallest diameter.

    Guarantee: whenever the honest updates are closer to each other than any Byzantine update
    is to them, the chosen subset is the honest one; in general the output lies within the
    honest diameter of an honest update.  Exhaustive search over ``C(n, f)`` subsets
    (refused above ``MAX_SUBSETS``).  See the module references.
    """

    name = "mda"

    def _coeffs(self, inner: torch.Tensor, f: int) -> torch.Tensor:
        sq = sq_distances_from_gram(inner.to(torch.float64))
        return _uniform(inner.shape[0], mda_subset(sq, f))


@DEFENSES.register("smea")
class SMEA(_SubsetRule):
    """Smallest Maximum Eigenvalue Averaging: the mean of the ``n - f`` updates whose covariance
    has the smallest largest eigenvalue (Allouah et al. 2023, optimal error under
    heterogeneity up to constants).  Exhaustive over ``C(n, f)`` subsets (``MAX_SUBSETS``)."""

    name = "smea"

    def _coeffs(self, inner: torch.Tensor, f: int) -> torch.Tensor:
        return _uniform(inner.shape[0], smea_subset(inner, f))


@DEFENSES.register("caf")
class CAF(_SubsetRule):
    """Covariance-bound Agnostic Filter: iterative down-weighting along the top eigenvector of
    the weighted covariance (polynomial time, unlike SMEA), returning the weighted mean with
    the smallest top eigenvalue seen.  ``flagged``: clients whose weight reached 0."""

    name = "caf"

    def _coeffs(self, inner: torch.Tensor, f: int) -> torch.Tensor:
        return caf_weights(inner, f)
