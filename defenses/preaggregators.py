"""Pre-aggregators: NNM, Bucketing, ARC and Clipping, composed before a rule with ``>>``.

Every pre-aggregator here is *linear*: it replaces the ``[n, d]`` updates by ``M @ updates``
for an ``[k, n]`` mixing matrix ``M`` computed from geometry (distances, norms) or from
randomness.  That makes each of them usable on a CKKS ``Gram`` (the mixed Gram is
``M G M.T``) and lets a composed rule's row weights be reported per client as ``M.T @ w``,
so ``NNM(f=2) >> Krum(f=2)`` runs under CKKS as a weighted homomorphic sum.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import PreAggregator, effective_f
from securefml.defenses.budget import check_optional_f
from securefml.defenses.linalg import DEFAULT_CHUNK, mix, row_norms, sq_distances_from_gram, stable_gram
from securefml.defenses.registry import DEFENSES
from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = [
    "nnm_mixing",
    "bucket_mixing",
    "clip_scales",
    "arc_scales",
    "NNM",
    "Bucketing",
    "ARC",
    "Clipping",
    "MedianClipping",
    "median_clip_scales",
]

_ALL = frozenset({Reveals.UPDATES, Reveals.GRAM, Reveals.BUCKETS})


def nnm_mixing(sq_dist: torch.Tensor, f: int) -> torch.Tensor:
    """NNM's ``[n, n]`` mixing matrix: row i averages the ``n - f`` nearest rows to i (i included)."""
    n = sq_dist.shape[0]
    if n <= f:
        raise ConfigError(f"NNM with f={f} needs n > f clients, got n={n}")
    k = n - f
    # the diagonal is 0, so each row's own index is among its k nearest
    idx = sq_dist.topk(k, dim=1, largest=False).indices
    m = torch.zeros(n, n, dtype=torch.float64, device=sq_dist.device)
    m.scatter_(1, idx, 1.0 / k)
    return m


def bucket_mixing(
    weights: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Random buckets of ``size`` clients: weighted-mean mixing matrix, bucket weights, members.

    The permutation is drawn on the CPU from ``generator``, so the same seed gives the same
    buckets on every device.
    """
    n = weights.numel()
    perm = torch.randperm(n, generator=generator).tolist()
    members = [sorted(perm[i : i + size]) for i in range(0, n, size)]
    w = weights.to(torch.float64).cpu()
    m = torch.zeros(len(members), n, dtype=torch.float64)
    for b, mem in enumerate(members):  # O(n) in total: one entry per client
        tot = w[mem].sum()
        m[b, mem] = w[mem] / tot if tot > 0 else 1.0 / len(mem)
    return m, m.new_tensor([float(w[mem].sum()) for mem in members]), members


def clip_scales(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """Per-row factors ``min(1, bound / ||u_i||)``."""
    n64 = norms.to(torch.float64)
    return torch.where(n64 > bound, bound / n64.clamp_min(1e-300), torch.ones_like(n64))


def arc_scales(norms: torch.Tensor, f: int) -> torch.Tensor:
    """ARC: clip the ``floor(2 (f/n) (n - f))`` largest-norm rows to the next largest norm."""
    n = norms.numel()
    k = min(int(math.floor(2 * f * (n - f) / n)), n - 1) if n else 0
    if k <= 0:
        return torch.ones(n, dtype=torch.float64, device=norms.device)
    bound = float(norms.to(torch.float64).sort(descending=True).values[k])
    return clip_scales(norms, bound)


def median_clip_scales(norms: torch.Tensor) -> torch.Tensor:
    """Clip every row to the lower median norm: the ``ceil(n/2)``-th smallest (``k = floor(n/2)``)."""
    n = norms.numel()
    if n == 0:
        return torch.ones(0, dtype=torch.float64, device=norms.device)
    bound = float(norms.to(torch.float64).sort().values[(n + 1) // 2 - 1])
    return clip_scales(norms, bound)


class _LinearPre(PreAggregator):
    """Shared plumbing: subclasses say how to build ``M`` from updates and from a Gram."""

    runs_on = _ALL

    @abstractmethod
    def _mixing_plain(
        self, x: torch.Tensor, w: torch.Tensor, ids: tuple[int, ...], context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Subclasses define this."""

    @abstractmethod
    def _mixing_gram(
        self, gram: Gram, w: torch.Tensor, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Subclasses define this."""

    def _rows(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return mix(m, x, chunk=getattr(self, "chunk", DEFAULT_CHUNK))

    def transform(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        x, w, ids, _ = self.transform_with_mixing(updates, weights, client_ids, context=context)
        return x, w, ids

    def transform_with_mixing(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], torch.Tensor | None]:
        m, w, ids = self._mixing_plain(updates, weights, client_ids, context)
        return self._rows(m, updates), w.to(updates.device), ids, m

    def transform_gram(
        self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, Gram, torch.Tensor]:
        m, w, ids = self._mixing_gram(gram, weights, context)
        m = m.to(gram.inner.device, torch.float64)
        inner = m @ gram.inner.to(torch.float64) @ m.T
        ref = None if gram.reference is None else m @ gram.reference.to(torch.float64)
        return m, Gram(ids, inner, ref, gram.reference_sq_norm), w


@DEFENSES.register("nnm", positional="f")
class NNM(_LinearPre):
    """Nearest Neighbor Mixing (Allouah et al., AISTATS 2023).

    Each update is replaced by the average of its ``n - f`` nearest updates (itself
    included); the downstream rule then runs on the mixed rows.  Mixing rows map one to
    one to clients, so the rule's flags still name clients.

    Threat model: up to ``f < n/2`` Byzantine clients.  Guarantee (paper, Thm. 1): composed
    with a rule that is robust for i.i.d. inputs (Krum, CoordinateMedian, TrimmedMean,
    GeometricMedian), the composition is (f, kappa)-robust with an optimal-order kappa under
    heterogeneity.  Needs only pairwise distances: runs on a CKKS Gram.

    References
    ----------
    Y. Allouah, S. Farhadkhani, R. Guerraoui, N. Gupta, R. Pinot, J. Stephan. Fixing by
    Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity. AISTATS 2023.
    """

    name = "nnm"
    mixes_to_mean = True

    def __init__(self, f: int | None = None, *, chunk: int = DEFAULT_CHUNK) -> None:
        self.f = check_optional_f(f)
        self.chunk = int(chunk)

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        f = effective_f(self.f, context, self)
        return "f=0: every row is mixed with all n rows" if f == 0 else None

    def _mixing_plain(
        self, x: torch.Tensor, w: torch.Tensor, ids: tuple[int, ...], context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        sq = sq_distances_from_gram(stable_gram(x, chunk=self.chunk))
        return nnm_mixing(sq, effective_f(self.f, context, self)), w, ids

    def _mixing_gram(
        self, gram: Gram, w: torch.Tensor, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        return nnm_mixing(gram.sq_distances(), effective_f(self.f, context, self)), w, gram.client_ids


@DEFENSES.register("bucketing", positional="size")
class Bucketing(_LinearPre):
    """Bucketing (Karimireddy, He, Jaggi, ICLR 2022): average random buckets of ``size`` clients.

    The clients are shuffled with ``context["generator"]`` (a ``torch.Generator``; a
    ``ConfigError`` names the key if it is missing) and split into ``ceil(n / size)``
    buckets; each bucket's (client-weighted) mean becomes one row for the downstream rule.
    The rows are buckets, not clients: a composed rule's flags are reported in
    ``info["flagged_rows"]`` (bucket ``b`` has id ``-(b + 1)``), never as client ids.

    Threat model: ``f`` Byzantine clients contaminate at most ``f`` buckets; with
    ``size <= n / (2f)`` a majority of buckets is honest, and the heterogeneity the
    downstream rule sees shrinks by ``size``.  Under SecAgg the protocol itself securely sums
    random buckets (``Reveals.BUCKETS``); this class is the plaintext/CKKS equivalent.

    References
    ----------
    S. P. Karimireddy, L. He, M. Jaggi. Byzantine-Robust Learning on Heterogeneous Datasets
    via Bucketing. ICLR 2022.
    """

    name = "bucketing"
    mixes_to_mean = True

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        if self.size >= n:
            return f"bucket size {self.size} >= n={n}: one bucket, the mean"
        return None

    def __init__(self, size: int = 2, *, chunk: int = DEFAULT_CHUNK) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"bucket size must be a positive integer, got {size!r}")
        self.size = size
        self.chunk = int(chunk)

    def buckets(self, weights: torch.Tensor, context: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list]:
        gen = context.get("generator")
        if not isinstance(gen, torch.Generator):
            raise ConfigError("Bucketing needs context['generator'] (a torch.Generator) to draw the buckets")
        return bucket_mixing(weights, self.size, gen)

    def _mixing(self, w: torch.Tensor, context: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        m, bw, members = self.buckets(w, context)
        return m, bw, tuple(-(b + 1) for b in range(len(members)))

    def _mixing_plain(
        self, x: torch.Tensor, w: torch.Tensor, ids: tuple[int, ...], context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        return self._mixing(w, context)

    def _mixing_gram(
        self, gram: Gram, w: torch.Tensor, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        return self._mixing(w, context)


class _ScalePre(_LinearPre):
    """A diagonal mixing matrix: rows are rescaled, never combined."""

    chunk = DEFAULT_CHUNK
    mixes = False

    @abstractmethod
    def _scales(self, norms: torch.Tensor, context: Mapping[str, Any]) -> torch.Tensor:
        """Subclasses define this."""

    def _rows(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * torch.diagonal(m).to(x.device, x.dtype)[:, None]

    def _mixing_plain(
        self, x: torch.Tensor, w: torch.Tensor, ids: tuple[int, ...], context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        return torch.diag(self._scales(row_norms(x, chunk=self.chunk), context)), w, ids

    def _mixing_gram(
        self, gram: Gram, w: torch.Tensor, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        return torch.diag(self._scales(gram.norms, context)), w, gram.client_ids


@DEFENSES.register("clipping", positional="bound")
class Clipping(_ScalePre):
    """Static clipping: scale every update to norm at most ``bound`` before the rule.

    Threat model: bounds each client's influence on the downstream rule to ``bound``; the
    bound must be set from knowledge of honest norms (ARC chooses it adaptively).  Needs
    only norms: runs on a CKKS Gram.

    References
    ----------
    ByzFL's ``Clipping`` pre-aggregator (LPD-EPFL); Sun et al., arXiv:1911.07963, 2019.
    """

    name = "clipping"

    def __init__(self, bound: float = 2.0, *, chunk: int = DEFAULT_CHUNK) -> None:
        if not (isinstance(bound, (int, float)) and 0 < bound < float("inf")):
            raise ConfigError(f"bound must be a positive finite number, got {bound!r}")
        self.bound = float(bound)
        self.chunk = int(chunk)

    def _scales(self, norms: torch.Tensor, context: Mapping[str, Any]) -> torch.Tensor:
        return clip_scales(norms, self.bound)


@DEFENSES.register("arc", positional="f")
class ARC(_ScalePre):
    """Adaptive Robust Clipping (Allouah et al., NeurIPS 2024).

    The ``k = floor(2 (f/n) (n - f))`` updates with the largest norms are clipped to the
    norm of the ``(k+1)``-th largest; the rest are unchanged.  No bound to tune.

    Threat model: up to ``f < n/2`` Byzantine clients.  Guarantee (paper, Thm. 1): composed
    with an (f, kappa)-robust rule it preserves robustness and improves it when the honest
    updates are small.  Needs only norms: runs on a CKKS Gram.

    References
    ----------
    Y. Allouah, R. Guerraoui, N. Gupta, A. Jellouli, G. Rizk, J. Stephan. Boosting
    Robustness by Clipping Gradients in Distributed Learning. NeurIPS 2024 (arXiv:2405.14432).
    """

    name = "arc"

    def __init__(self, f: int | None = None, *, chunk: int = DEFAULT_CHUNK) -> None:
        self.f = check_optional_f(f)
        self.chunk = int(chunk)

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        f = effective_f(self.f, context, self)
        k = min(int(math.floor(2 * f * (n - f) / n)), n - 1) if n else 0
        return f"f={f} clips k=0 of n={n} updates (it is the identity)" if k <= 0 else None

    def _scales(self, norms: torch.Tensor, context: Mapping[str, Any]) -> torch.Tensor:
        return arc_scales(norms, effective_f(self.f, context, self))


@DEFENSES.register("medclip")
class MedianClipping(_ScalePre):
    """Clip every update to the round's median norm (the ``ceil(n/2)``-th smallest).

    Why not ARC alone: ARC clips the ``floor(2 (f/n)(n - f))`` largest norms, so its bound is
    an honest norm only while a cohort holds at most ``f`` attackers.  Cohorts are drawn at
    random: with ``f`` set to cover 95 % of cohorts, one round in twenty holds more, and then
    the bound *is* an attacker's norm.  Measured on digits-fewshot FOMAML (20 % sign flippers
    at scale 10, cohorts of 10, ``f = 4``): in the one round with 5 attackers an unclipped row
    made the aggregate ten times its usual norm, and the server's Adam state (second moments
    remembered over ~1,000 steps) shrank every later step: the run lost 10-17 points against
    the unit-scale attack.  The median needs no ``f`` and no luck with the cohort.

    Guarantee (property-tested): whenever at most ``floor(n/2)`` rows are Byzantine, every
    output row has norm at most the ``ceil(n/2)``-th smallest *honest* norm, and the output
    does not depend on how far the Byzantine rows are scaled beyond that bound: a 10x sign
    flipper is exactly a unit vector of the same direction clipped to the bound.  Since
    ``floor(2 (f/n)(n - f)) <= n/2``, this bound is never above ARC's, so
    ``ARC >> MedianClipping`` is ``MedianClipping``.

    Rounds whose cohort holds a Byzantine *majority* (random cohorts do, rarely: 2 of 50 rounds
    in some digits-fewshot runs at 25 %) put an attacker's norm at the median.  With
    ``history = W > 0`` the bound is also capped at ``growth`` times the median of the last ``W``
    rounds' bounds, so such a round cannot raise it more than ``growth``-fold (honest norms grow
    a few percent per round in these runs).  The same cap applies in every round; ``history=0``
    (the default) is the per-round rule above.

    The first round has no history to cap it.  ``start="min"`` makes that round's bound the
    *smallest* norm of the cohort (``start="median"``, the default: the median as in every
    round): a first cohort with a Byzantine majority (a cohort of 10 at 25 % holds 6 or more
    attackers with probability 0.02, the first round is one of them in 2 % of runs) otherwise sets
    the first bound to an attacker's norm, and one inflated first step shrinks every later step of
    the server's Adam.  Guarantee (property-tested): with at least one honest row, every row of the
    first round ends at most at the smallest honest norm, whatever the other rows' scale.  Cost:
    the honest rows of the first round are shortened to the smallest norm.

    Cost: the larger half of the honest updates is shortened to the median (a direction-
    preserving reweighting of the mean); the no-attack accuracy this costs is measured in
    ``docs/robustness.md``.  Needs only norms: runs on a CKKS Gram and on bucket means.

    References
    ----------
    Clipping to a data-driven norm quantile: Andrew, Thakkar, McMahan, Ramaswamy, Differentially
    Private Learning with Adaptive Clipping, NeurIPS 2021 (median of update norms as the clip
    bound); Allouah et al., NeurIPS 2024 (ARC, the ``f``-based adaptive bound it replaces here).
    """

    name = "medclip"

    def __init__(self, *, history: int = 0, growth: float = 2.0, chunk: int = DEFAULT_CHUNK,
                 start: str = "median") -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ConfigError(f"history must be a number of rounds >= 0, got {history!r}")
        if start not in ("median", "min"):
            raise ConfigError(f"start must be 'median' or 'min', got {start!r}")
        if start == "min" and not history:
            raise ConfigError("start='min' needs history > 0 (it sets the first bound of the history)")
        self._start = start
        if not (isinstance(growth, (int, float)) and 1 <= growth < float("inf")):
            raise ConfigError(f"growth must be a finite factor >= 1, got {growth!r}")
        self.history = history
        self.growth = float(growth)
        self.chunk = int(chunk)
        self._bounds: list[float] = []

    def bound(self, norms: torch.Tensor) -> float:
        """This round's bound: the lower median, capped at ``growth`` x the median of past bounds."""
        n = norms.numel()
        ordered = norms.to(torch.float64).sort().values
        first = self._start == "min" and self.history and not self._bounds
        b = float(ordered[0] if first else ordered[(n + 1) // 2 - 1])
        if self.history and self._bounds:
            past = sorted(self._bounds)
            b = min(b, self.growth * past[(len(past) - 1) // 2])
        if self.history:
            self._bounds = [*self._bounds, b][-self.history:]
        return b

    def _scales(self, norms: torch.Tensor, context: Mapping[str, Any]) -> torch.Tensor:
        if not self.history:
            return median_clip_scales(norms)
        return clip_scales(norms, self.bound(norms)) if norms.numel() else torch.ones(0, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"bounds": list(self._bounds)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._bounds = [float(b) for b in state.get("bounds", [])][-self.history:] if self.history else []

    @property
    def start(self) -> str:
        """The first round's bound: ``"median"`` (as every round) or ``"min"`` (the smallest norm)."""
        return self._start

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        return "n=1: one update is its own median" if n <= 1 else None

    def __repr__(self) -> str:
        text = super().__repr__()
        return text if self._start == "median" else f"{text[:-1]}, start={self._start!r})"
