"""Distance-based rules: Krum, MultiKrum, Bulyan, NormBound.

Krum, MultiKrum and NormBound need only the geometry of the updates (pairwise distances,
norms), so they also run on a ``Gram`` matrix: under CKKS the key holder decrypts the Gram,
the rule returns per-client coefficients, and the server forms the weighted homomorphic sum.
In plaintext Krum and Multi-Krum decide from a float32 blocked Gram when its proven error bound
cannot change the decision (``certified_order``), and from the float64 centred ``stable_gram``
otherwise; identical updates always tie exactly (``tie_duplicates``).  ``krum_scores`` is the
library's one Krum score (the Fang et al. attack on Krum uses it too).  Bulyan ends with a
coordinate-wise step, so it needs coordinates (plaintext or buckets).
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense, effective_f
from securefml.defenses.budget import check_optional_f
from securefml.defenses.coordinate import mean_around_median
from securefml.defenses.linalg import (
    DEFAULT_CHUNK,
    duplicate_representatives,
    float32_sq_distances,
    gram_matrix,
    medoid,
    mix,
    remap_rows,
    row_norms,
    sq_distances_with_bound,
    stable_gram,
)
from securefml.defenses.mean import weighted_mean
from securefml.defenses.registry import DEFENSES
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = [
    "nearest_sums",
    "krum_neighbours",
    "krum_scores",
    "certified_order",
    "exact_enough_sq_distances",
    "multikrum_select",
    "rank_by",
    "bulyan_select",
    "selection_average",
    "split_ids",
    "norm_bound_coefficients",
    "combine",
    "Krum",
    "MultiKrum",
    "Bulyan",
    "NormBound",
]

logger = logging.getLogger(__name__)

_GEOMETRY = frozenset({Reveals.UPDATES, Reveals.GRAM, Reveals.BUCKETS})


def combine(coeffs: torch.Tensor, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``sum_i coeffs[i] * x[i]`` accumulated in float64, returned in ``dtype`` (default: x's)."""
    return mix(coeffs[None, :], x, dtype=dtype)[0]


def nearest_sums(sq_dist: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's sum of its ``k`` smallest off-diagonal entries (``0 <= k <= n - 1``).

    The kernel behind every Krum score: one masked ``topk`` (a partial selection, not a
    full sort) on the ``[n, n]`` matrix.  Monotone in every entry, which is what lets
    ``certified_order`` bound it from entrywise bounds.
    """
    n = sq_dist.shape[0]
    if not 0 <= k <= max(n - 1, 0):
        raise ConfigError(f"cannot sum the {k} nearest of {n - 1} other rows")
    if k == 0:
        return torch.zeros(n, dtype=sq_dist.dtype, device=sq_dist.device)
    others = sq_dist + torch.diag(torch.full((n,), float("inf"), dtype=sq_dist.dtype, device=sq_dist.device))
    return others.topk(k, dim=1, largest=False).values.sum(dim=1)


def krum_neighbours(n: int, f: int) -> int:
    """How many nearest others a Krum score sums: ``n - f - 2`` (Blanchard et al.), within ``[1, n - 1]``.

    Krum itself refuses ``n <= 2f + 2``; where ``n - f - 2 < 1`` (an attacker simulating
    Krum on a small view, Bulyan's last picks) the score still uses the nearest other row,
    so it keeps ranking rows by isolation instead of tying them all; one row scores 0.
    """
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"f (the Byzantine budget of a Krum score) must be a non-negative integer, got {f!r}")
    return min(max(n - f - 2, 1), max(n - 1, 0))


def krum_scores(sq_dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row: the sum of squared distances to its ``krum_neighbours(n, f)`` nearest others.

    The one Krum score of the library: Krum, Multi-Krum, Bulyan and the Fang et al. attack
    on Krum all call it.

    Parameters
    ----------
    sq_dist:
        ``[n, n]`` squared pairwise distances (zero diagonal).
    f:
        Byzantine budget (``ConfigError`` unless a non-negative integer).
    """
    if sq_dist.dim() != 2 or sq_dist.shape[0] != sq_dist.shape[1]:
        raise ConfigError(f"Krum scores need a square matrix of squared distances, got shape {tuple(sq_dist.shape)}")
    return nearest_sums(sq_dist, krum_neighbours(sq_dist.shape[0], f))


def certified_order(
    sq_dist: torch.Tensor, err: torch.Tensor, f: int, cuts: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Krum scores from approximate distances, and their order, when the bound proves the cuts.

    ``err`` bounds ``|sq_dist - exact|`` entry by entry.  A Krum score is monotone in every
    entry, so the exact score of row ``i`` lies in ``[lo_i, hi_i]``: the scores of
    ``sq_dist - err`` (clamped at 0) and of ``sq_dist + err``.  A cut ``r`` (the first ``r``
    rows of the order against the rest) is proven when every row before it has
    ``hi < lo`` of every row after it; then the exact scores, and the float64 ones of the
    straightforward path (whose error is far below ``err``), put the same rows before the
    cut.  Returns ``(scores, order)`` (ascending scores, ties by position), or ``None``
    when some cut is not proven (near-ties, exact ties): the caller then decides in float64.
    """
    n = sq_dist.shape[0]
    k = krum_neighbours(n, f)
    scores = nearest_sums(sq_dist, k)
    order = torch.sort(scores, stable=True).indices
    todo = [r for r in cuts if 0 < r < n]
    if not todo:
        return scores, order
    lo = nearest_sums((sq_dist - err).clamp_min(0), k)[order]
    hi = nearest_sums(sq_dist + err, k)[order]
    head_max = torch.cummax(hi, dim=0).values
    tail_min = torch.flip(torch.cummin(torch.flip(lo, [0]), dim=0).values, [0])
    for r in todo:
        if not bool(head_max[r - 1] < tail_min[r]):
            return None
    return scores, order


def exact_enough_sq_distances(
    x: torch.Tensor, *, chunk: int = DEFAULT_CHUNK, f: int = 0, cuts: tuple[int, ...] = ()
) -> torch.Tensor:
    """float64 squared distances from ``stable_gram``, identical updates given identical rows.

    With ``cuts`` (a Krum decision, see ``certified_order``) the float64 error bound
    (``sq_distances_with_bound``) is checked too: rows sharing a component far larger than
    their distances (a Byzantine row that drags the mean, short of ``stable_gram``'s
    ``1e3`` norm gap) lose those distances to cancellation, so when the bound does not
    prove the decision the Gram is recomputed centred on the medoid row and the better
    bounded of the two decides.
    """
    def bounded(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = max(-(-x.shape[1] // chunk), 1)
        return _deduplicated(x, *sq_distances_with_bound(g, width=min(chunk, x.shape[1]), blocks=blocks))

    sq, err = bounded(stable_gram(x, chunk=chunk))
    if not cuts or certified_order(sq, err, f, cuts) is not None:
        return sq
    sq2, err2 = bounded(gram_matrix(x, center=x[medoid(sq)], chunk=chunk))
    if certified_order(sq2, err2, f, cuts) is not None or float(err2.sum()) < float(err.sum()):
        return sq2
    logger.debug("Krum decision not proven in float64 either: a near-tie at float64 precision")
    return sq


def _deduplicated(x: torch.Tensor, sq: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sq`` and its bound with identical updates given the first copy's rows (``tie_duplicates``)."""
    idx = duplicate_representatives(sq, x, err)  # err bounds what rounding leaves of a zero distance
    return (sq, err) if idx is None else (remap_rows(sq, idx), remap_rows(err, idx))


def _check_krum(n: int, f: int, who: str) -> None:
    if n <= 2 * f + 2:
        raise ConfigError(f"{who} with f={f} needs n > 2f + 2 clients, got n={n}")


def rank_by(scores: torch.Tensor, client_ids: tuple[int, ...], *, descending: bool = False) -> torch.Tensor:
    """Row positions sorted by score, ties broken by client id (so the order ignores row order)."""
    ids = torch.tensor(client_ids, dtype=torch.long, device=scores.device)
    by_id = torch.sort(ids, stable=True).indices
    return by_id[torch.sort(scores[by_id], descending=descending, stable=True).indices]


def multikrum_select(
    sq_dist: torch.Tensor, f: int, m: int, client_ids: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``m`` rows with the lowest Krum scores (ties: lower client id), and all scores."""
    scores = krum_scores(sq_dist, f)
    ids = tuple(range(scores.numel())) if client_ids is None else client_ids
    return rank_by(scores, ids)[:m].sort().values, scores


def bulyan_select(sq_dist: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan's selection set: ``n - 2f`` rows picked one by one by Krum on the rows left.

    Each step recomputes Krum scores on the remaining rows (a masked top-k on the one
    precomputed distance matrix, no new distances).
    """
    n = sq_dist.shape[0]
    theta = n - 2 * f
    remaining = torch.ones(n, dtype=torch.bool, device=sq_dist.device)
    chosen: list[int] = []
    for _ in range(theta):
        idx = remaining.nonzero().flatten()
        m = idx.numel()
        # Late steps leave few rows, where Krum's n - f - 2 neighbours drop to 0 or 1: with
        # 0 every row ties, with 1 the two rows of a mutually-nearest pair tie, and the pick
        # then depends on row order.  Score against at least two others (all, if fewer) so
        # the selection stays a function of the set, not of its order.
        k = max(m - f - 2, min(2, m - 1))
        scores = nearest_sums(sq_dist[idx][:, idx], k)
        pick = int(idx[int(torch.argmin(scores))])
        chosen.append(pick)
        remaining[pick] = False
    return torch.tensor(sorted(chosen), dtype=torch.long, device=sq_dist.device)


def split_ids(sel: torch.Tensor, client_ids: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The client ids at positions ``sel`` and the others (the flagged ones), both in row order."""
    chosen = set(sel.tolist())
    return (
        tuple(c for i, c in enumerate(client_ids) if i in chosen),
        tuple(c for i, c in enumerate(client_ids) if i not in chosen),
    )


def selection_average(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i coeffs[i] x[i]`` for coefficients that are equal on a selection and 0 elsewhere.

    One selected row is returned exactly (a copy); several are averaged by the Mean rule's
    single ``gemv`` in x's dtype, with its error bound (``weighted_mean``: within
    ``(m + 2) u sum_i |c_i x_i|`` per coordinate), instead of a float64 copy of the updates.
    """
    rows = coeffs.nonzero().flatten()
    if rows.numel() == 1 and float(coeffs[rows[0]]) == 1.0:
        return x[int(rows[0])].clone()
    return weighted_mean(x, coeffs)[0]


def norm_bound_coefficients(
    norms: torch.Tensor, weights: torch.Tensor, bound: float | None
) -> tuple[torch.Tensor, float]:
    """Coefficients of the weighted mean of norm-clipped updates, and the bound used.

    ``bound=None`` takes the median norm (FLAME's adaptive bound).
    """
    norms = norms.to(torch.float64)
    b = float(norms.median()) if bound is None else float(bound)
    scale = torch.where(norms > b, b / norms.clamp_min(1e-300), torch.ones_like(norms))
    w = weights.to(device=norms.device, dtype=torch.float64)
    return w * scale / w.sum(), b


class _GeometryRule(Defense):
    """A rule that decides from squared distances; shared plaintext and Gram entry points."""

    runs_on = _GEOMETRY

    def __init__(self, f: int | None = None, *, chunk: int = DEFAULT_CHUNK) -> None:
        self.f = check_optional_f(f)
        self.chunk = int(chunk)

    @abstractmethod
    def _decide(
        self, sq_dist: torch.Tensor, client_ids: tuple[int, ...], f: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], dict[str, Any]]:
        """Subclasses define this."""

    @abstractmethod
    def _cuts(self, n: int, f: int) -> tuple[int, ...]:
        """Ranks at which the decision splits the Krum order (selected / flagged sets)."""

    def sq_distances(self, updates: torch.Tensor, f: int) -> torch.Tensor:
        """The squared distances the decision is taken on, the cheapest way that is exact enough.

        float32 updates: one float32 blocked Gram (``float32_sq_distances``) with a proven
        error bound; when ``certified_order`` shows that the bound cannot move a row across
        any cut of this rule's decision, those distances decide (the exact ones would decide
        the same).  Otherwise, and for other dtypes, the float64 ``stable_gram``.  Identical
        updates get identical rows either way (``tie_duplicates``), so ties between copies
        go by client id.
        """
        cuts = self._cuts(updates.shape[0], f)
        fast = float32_sq_distances(updates)
        if fast is not None:
            sq, err = _deduplicated(updates, *fast)  # copies: the first copy's distances and bounds
            if certified_order(sq, err, f, cuts) is not None:
                return sq
            logger.debug("%s: float32 distances do not prove the decision; float64 Gram", type(self).__name__)
        return exact_enough_sq_distances(updates, chunk=self.chunk, f=f, cuts=cuts)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        f = effective_f(self.f, context, self)
        _check_krum(updates.shape[0], f, type(self).__name__)
        coeffs, scores, flagged, info = self._decide(self.sq_distances(updates, f), client_ids, f)
        agg = selection_average(coeffs, updates)
        return AggregationResult(agg, client_ids, weights=coeffs, scores=scores, flagged=flagged, info=info)

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        f = effective_f(self.f, context, self)
        coeffs, scores, flagged, info = self._decide(gram.sq_distances(), gram.client_ids, f)
        return AggregationResult(None, gram.client_ids, weights=coeffs, scores=scores, flagged=flagged, info=info)


@DEFENSES.register("krum", positional="f")
class Krum(_GeometryRule):
    """Krum (Blanchard et al., NeurIPS 2017): output the update closest to its neighbours.

    Each update is scored by the sum of squared distances to its ``n - f - 2`` nearest other
    updates; the lowest-scoring update is the output (its coefficient is 1, all others 0).

    Threat model: up to ``f`` Byzantine clients with ``n > 2f + 2``.  Guarantee (paper,
    Prop. 1): (alpha, f)-Byzantine resilience; in particular, when the honest updates are
    closer to each other than to any Byzantine vector the chosen update is honest.
    ``flagged`` lists the ``f`` highest-scoring clients (the ones Krum finds most isolated).
    Runs on plaintext updates, on a Gram matrix, and on SecAgg bucket means.  The CKKS protocol
    refuses it (``selects = 1``: its output is one client's update, which the key holder would
    decrypt); ``NNM(f) >> Krum(f)`` outputs an average of ``n - f`` updates and runs there.

    References
    ----------
    P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent. NeurIPS 2017.
    """

    name = "krum"
    selects = 1

    def _cuts(self, n: int, f: int) -> tuple[int, ...]:
        return (1, n - f)  # the selected row; the f flagged rows

    def _decide(
        self, sq_dist: torch.Tensor, client_ids: tuple[int, ...], f: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], dict[str, Any]]:
        n = sq_dist.shape[0]
        _check_krum(n, f, "Krum")
        sel, scores = multikrum_select(sq_dist, f, 1, client_ids)
        coeffs = torch.zeros(n, dtype=torch.float64, device=sq_dist.device)
        coeffs[sel] = 1.0
        worst = rank_by(scores, client_ids, descending=True)[:f].tolist()
        flagged = tuple(client_ids[i] for i in sorted(worst))
        return coeffs, scores, flagged, {"selected": (client_ids[int(sel[0])],), "f": f}


@DEFENSES.register("multikrum", positional="f")
class MultiKrum(_GeometryRule):
    """Multi-Krum (Blanchard et al., NeurIPS 2017): average the ``m`` best Krum-scored updates.

    Scores are computed once, as in the paper (some later works re-score after each pick;
    that variant is Bulyan's selection).  ``m`` defaults to ``n - f``.

    Threat model: up to ``f`` Byzantine clients, ``n > 2f + 2``.  Guarantee: the
    selected set inherits Krum's resilience; averaging ``m`` updates reduces the variance.
    ``flagged`` lists the clients left out.  Runs on plaintext updates, on a CKKS Gram
    matrix (the CKKS protocol refuses ``m`` below its key holder's ``min_contributors``), and
    on SecAgg bucket means; the same clients are selected on a Gram as on the
    plaintext updates, up to the Gram's numerical error.

    References
    ----------
    P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent. NeurIPS 2017.
    """

    name = "multikrum"

    def __init__(self, f: int | None = None, *, m: int | None = None, chunk: int = DEFAULT_CHUNK) -> None:
        super().__init__(f, chunk=chunk)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"m (how many updates MultiKrum averages) must be a positive integer, got {m!r}")
        self.m = m
        self.selects = m

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        m = self._m(n, effective_f(self.f, context, self))
        return f"it averages m={m} of n={n} updates, i.e. all of them" if m >= n else None

    def _m(self, n: int, f: int) -> int:
        return n - f if self.m is None else min(self.m, n)

    def _cuts(self, n: int, f: int) -> tuple[int, ...]:
        return (self._m(n, f),)

    def _decide(
        self, sq_dist: torch.Tensor, client_ids: tuple[int, ...], f: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], dict[str, Any]]:
        n = sq_dist.shape[0]
        _check_krum(n, f, "MultiKrum")
        m = self._m(n, f)
        sel, scores = multikrum_select(sq_dist, f, m, client_ids)
        coeffs = torch.zeros(n, dtype=torch.float64, device=sq_dist.device)
        coeffs[sel] = 1.0 / m
        selected, flagged = split_ids(sel, client_ids)
        return coeffs, scores, flagged, {"selected": selected, "f": f, "m": m}


@DEFENSES.register("bulyan", positional="f")
class Bulyan(Defense):
    """Bulyan (El Mhamdi et al., ICML 2018): Krum selection, then a coordinate-wise trim.

    1. Select ``theta = n - 2f`` updates one at a time, each by Krum on the updates not yet
       selected.  2. Per coordinate, average the ``beta = theta - 2f`` selected values
       closest to the coordinate-wise median of the selection.

    Threat model: up to ``f`` Byzantine clients with ``n >= 4f + 3``.  Guarantee (paper,
    Prop. 2): each coordinate of the output deviates from the honest ones by at most
    O(sigma / sqrt(d)) and Bulyan resists the "hidden in high dimension" attack on Krum.
    ``flagged`` lists the ``2f`` clients the selection left out.  Needs coordinates.

    References
    ----------
    E. M. El Mhamdi, R. Guerraoui, S. Rouault. The Hidden Vulnerability of Distributed
    Learning in Byzantium. ICML 2018.
    """

    name = "bulyan"
    runs_on = frozenset({Reveals.UPDATES, Reveals.BUCKETS})

    def __init__(self, f: int | None = None, *, chunk: int = DEFAULT_CHUNK) -> None:
        self.f = check_optional_f(f)
        self.chunk = int(chunk)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        f = effective_f(self.f, context, self)
        n = updates.shape[0]
        if n < 4 * f + 3:
            raise ConfigError(f"Bulyan with f={f} needs n >= 4f + 3 clients, got n={n}")
        sel = bulyan_select(exact_enough_sq_distances(updates, chunk=self.chunk), f)
        agg = mean_around_median(updates, n - 4 * f, rows=sel)
        selected, flagged = split_ids(sel, client_ids)
        return AggregationResult(agg, client_ids, flagged=flagged, info={"selected": selected, "f": f})


@DEFENSES.register("normbound", positional="bound")
class NormBound(Defense):
    """Norm bounding (Sun et al., 2019): clip every update to norm ``bound``, then average.

    ``bound=None`` uses the median update norm of the round (the adaptive bound of FLAME),
    so an honest majority sets it.  Client weights are honoured (it is a weighted mean of
    clipped updates).  ``flagged`` lists the clients whose update was clipped.

    Threat model: any number of clients scaling their update (model replacement, boosted
    backdoors); it bounds each client's influence to ``weight * bound`` but does not remove
    direction-based attacks.  Needs only norms: runs on a CKKS Gram (its diagonal).

    References
    ----------
    Z. Sun, P. Kairouz, A. T. Suresh, H. B. McMahan. Can You Really Backdoor Federated
    Learning? arXiv:1911.07963, 2019.
    """

    name = "normbound"
    runs_on = _GEOMETRY

    def __init__(self, bound: float | None = None, *, chunk: int = DEFAULT_CHUNK) -> None:
        if bound is not None and not (isinstance(bound, (int, float)) and bound > 0 and bound < float("inf")):
            raise ConfigError(f"bound must be a positive finite number or None, got {bound!r}")
        self.bound = None if bound is None else float(bound)
        self.chunk = int(chunk)

    def _decide(
        self, norms: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...]
    ) -> tuple[torch.Tensor, tuple[int, ...], float]:
        coeffs, b = norm_bound_coefficients(norms, weights, self.bound)
        flagged = tuple(client_ids[i] for i in (norms > b).nonzero().flatten().tolist())
        return coeffs, flagged, b

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        norms = row_norms(updates, chunk=self.chunk)
        coeffs, flagged, b = self._decide(norms, weights, client_ids)
        return AggregationResult(
            combine(coeffs, updates), client_ids, weights=coeffs, scores=norms, flagged=flagged, info={"bound": b}
        )

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        norms = gram.norms
        coeffs, flagged, b = self._decide(norms, weights, gram.client_ids)
        return AggregationResult(
            None, gram.client_ids, weights=coeffs, scores=norms, flagged=flagged, info={"bound": b}
        )
