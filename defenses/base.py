"""One interface for robust aggregation rules, pre-aggregators and detectors.

A rule takes the ``[n, d]`` updates (optional weights) and returns an ``AggregationResult``.
Rules that need only geometry also implement ``aggregate_gram``: given a ``Gram`` they return
the weights to apply to the (encrypted) updates.  ``runs_on`` declares what a rule needs to
see, so a protocol can refuse a rule it cannot serve (DESIGN.md, robust aggregation under
secrecy) instead of silently skipping it.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from securefml.defenses.budget import resolve_f
from securefml.errors import ConfigError, InvalidUpdateError
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = [
    "AggregationResult",
    "Defense",
    "PreAggregator",
    "Composed",
    "prepare_inputs",
    "prepare_weights",
    "nonfinite_rows",
    "effective_f",
    "NONFINITE_KEY",
    "MeanEquivalenceWarning",
    "register_mean_condition",
]

#: Context key under which ``Defense.__call__`` / ``aggregate_gram`` pass the ids of the rows
#: they excluded as non-finite; rules use it (``effective_f``) to lower their Byzantine budget.
NONFINITE_KEY = "nonfinite"


@dataclass
class AggregationResult:
    """What a rule decided.

    Attributes
    ----------
    aggregate:
        The aggregated vector (None when the rule ran on a ``Gram`` only).
    weights:
        ``[n]`` coefficients the aggregate applies to the inputs, when the rule is a weighted
        combination (Mean, Krum, NormBound, FLTrust...); what a CKKS server multiplies with.
    scores:
        Per-input scores the rule computed (meaning depends on the rule), or None.
    flagged:
        Client ids the rule considers Byzantine (excluded or down-weighted): the rule's action.
    suspected:
        Client ids of the input that the rule's *detector* flags after this round's evidence,
        whether or not they were acted on (``Reputation`` excludes at most ``(n - 1) // 2`` of
        a cohort, so a flagged client can still reach the rule; ``BucketReputation`` names
        clients, never buckets).  Empty for rules without a detector.  Detection is scored on
        this set, the action on ``flagged`` (``defenses.metrics``).
    client_ids:
        The ids the rows referred to, in order.
    flagged_buckets:
        Positions (among the revealed bucket sums) of the buckets the rule flagged, when it ran on
        bucketed SecAgg+ sums: a flag there can never name a client.
    info:
        Diagnostics only (``f`` used, ``tau``, row-level weights under a pre-aggregator...): kept
        in the round's record for people to read; no part of the library decides on them.
    noise_std:
        Standard deviation of the Gaussian noise the rule's output carries (post-processing,
        e.g. FLAME's).  A rule that returns coordinates has added it to ``aggregate`` itself;
        when the rule decided on a ``Gram`` only (``aggregate`` is None), the aggregation step
        (``securefml.aggregation``) adds it to the combination the protocol revealed, for
        every protocol, drawn from ``context["generator"]``.
    """

    aggregate: torch.Tensor | None
    client_ids: tuple[int, ...]
    weights: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    flagged: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    noise_std: float = 0.0
    flagged_buckets: tuple[int, ...] = ()
    suspected: tuple[int, ...] = ()


def prepare_inputs(
    updates: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor | Sequence[float] | None,
    client_ids: Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Stack, validate and normalise the inputs every rule receives."""
    x = updates if isinstance(updates, torch.Tensor) else torch.stack(list(updates))
    if x.dim() != 2 or x.shape[0] == 0:
        raise ConfigError(f"updates must be a non-empty [n, d] tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    w = prepare_weights(weights, n).to(x.device)
    ids = tuple(range(n)) if client_ids is None else tuple(int(c) for c in client_ids)
    if len(ids) != n:
        raise ConfigError(f"{len(ids)} client ids for {n} updates")
    return x, w, ids


def prepare_weights(weights: torch.Tensor | Sequence[float] | None, n: int) -> torch.Tensor:
    """Validate optional per-client weights for ``n`` clients (float64, CPU; all ones if None)."""
    if weights is None:
        return torch.ones(n, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).cpu()
    if w.numel() != n or (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ConfigError("weights must be n finite non-negative numbers with a positive sum")
    return w


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Boolean ``[n]`` mask of rows holding a NaN or an Inf.

    A row sum in the row's own dtype is non-finite whenever an entry is (NaN and Inf
    propagate through addition), so one cheap reduction, with no ``[n, d]`` boolean mask,
    clears the rows whose sum is finite; only the rest (rows with a NaN/Inf, or finite rows
    so large that their sum overflowed) are checked entry by entry.
    """
    suspect = ~torch.isfinite(x.sum(dim=1))
    if not bool(suspect.any()):
        return suspect
    rows = suspect.nonzero().flatten()
    suspect[rows] = ~torch.isfinite(x[rows]).all(dim=1)
    return suspect


def effective_f(f: int | None, context: Mapping[str, Any], owner: object = None) -> int:
    """The Byzantine budget left once non-finite rows were excluded.

    ``f=None`` takes the federation's derived budget (``budget.BYZANTINE_KEY``) and raises a
    ``ConfigError`` naming ``owner`` when there is none.  Honest clients never send NaN/Inf,
    so every excluded row was Byzantine: at most ``f - excluded`` of the remaining rows can be.
    """
    return max(resolve_f(f, context, owner) - len(context.get(NONFINITE_KEY, ())), 0)


class MeanEquivalenceWarning(UserWarning):
    """A robust rule's configuration makes it compute exactly the plain mean (no robustness)."""


#: For rule classes defined outside this package's reach (``register_mean_condition``): a
#: function (rule, n, context) -> reason string when the rule equals the mean, else None.
_MEAN_CONDITIONS: dict[type, Callable[[Any, int, Mapping[str, Any]], str | None]] = {}


def register_mean_condition(cls: type, condition: Callable[[Any, int, Mapping[str, Any]], str | None]) -> None:
    """Declare when instances of ``cls`` reduce to the mean (used by ``Defense.reduces_to_mean``)."""
    _MEAN_CONDITIONS[cls] = condition


def _expand(res: AggregationResult, ids: tuple[int, ...], keep: torch.Tensor, bad: tuple[int, ...]) -> None:
    """Re-index a result computed on the finite rows onto every original row (in place)."""
    n = len(ids)
    if res.weights is not None and res.weights.numel() == keep.numel():
        full = torch.zeros(n, dtype=res.weights.dtype, device=res.weights.device)
        full[keep.to(res.weights.device)] = res.weights
        res.weights = full
    if res.scores is not None and res.scores.dim() == 1 and res.scores.numel() == keep.numel():
        full_s = torch.full((n,), float("nan"), dtype=res.scores.dtype, device=res.scores.device)
        full_s[keep.to(res.scores.device)] = res.scores
        res.scores = full_s
    res.client_ids = ids
    res.flagged = bad + tuple(c for c in res.flagged if c not in bad)
    res.info[NONFINITE_KEY] = bad


class Defense(ABC):
    """Base class of every aggregation rule.

    Subclasses validate hyper-parameters once in ``__init__`` and implement ``aggregate``.
    """

    runs_on: frozenset[Reveals] = frozenset({Reveals.UPDATES, Reveals.BUCKETS})
    name: str = "defense"
    #: True when the rule needs the server's own update on clean root data (``context["reference"]``)
    needs_reference: bool = False
    #: True only for the plain weighted mean: protocols can then aggregate each layer over the
    #: clients that sent it and need no statistics (no robust decision to make)
    is_weighted_mean: bool = False
    #: The most client updates the output can combine, when the rule fixes it (Krum: 1); None
    #: when it depends on the round.  CKKS refuses a rule below its key holder's
    #: ``min_contributors``: the key holder would be asked to decrypt one client's update.
    selects: int | None = None

    def __call__(
        self,
        updates: torch.Tensor | Sequence[torch.Tensor],
        weights: torch.Tensor | Sequence[float] | None = None,
        *,
        client_ids: Sequence[int] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> AggregationResult:
        x, w, ids = prepare_inputs(updates, weights, client_ids)
        self.warn_if_mean(x.shape[0], context or {})
        bad_mask = nonfinite_rows(x)
        if not bool(bad_mask.any()):
            return self.aggregate(x, w, ids, context=context or {})
        bad = tuple(ids[i] for i in bad_mask.nonzero().flatten().tolist())
        keep = (~bad_mask).nonzero().flatten()
        if keep.numel() == 0:
            raise InvalidUpdateError(f"every update contains NaN or Inf (clients {list(bad)})", sender=bad[0])
        if w[keep].sum() <= 0:
            raise ConfigError("the finite updates all have zero weight")
        ctx = dict(context or {})
        ctx[NONFINITE_KEY] = bad
        kept_ids = tuple(ids[i] for i in keep.tolist())
        res = self.aggregate(x[keep], w[keep], kept_ids, context=ctx)
        _expand(res, ids, keep.cpu(), bad)
        return res

    @abstractmethod
    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        """Aggregate validated ``[n, d]`` updates with normalised inputs."""

    def aggregate_gram(
        self, gram: Gram, weights: torch.Tensor | None = None, *, context: Mapping[str, Any] | None = None
    ) -> AggregationResult:
        """Decide per-client weights from geometry only (for encrypted updates).

        Rows whose Gram entries (or reference inner product) are non-finite are flagged and
        get weight 0 before the rule's ``decide_gram`` runs, as ``__call__`` does for updates.
        """
        if type(self).decide_gram is Defense.decide_gram:
            raise ConfigError(
                f"{self!r} needs every client's coordinates; it cannot run on a Gram matrix "
                f"(use a protocol that reveals {sorted(self.runs_on)})"
            )
        w = prepare_weights(weights, gram.n)
        self.warn_if_mean(gram.n, context or {})
        ok = torch.isfinite(torch.diagonal(gram.inner)).cpu()
        if gram.reference is not None:
            ok &= torch.isfinite(gram.reference).cpu()
        ids = gram.client_ids
        if bool(ok.all()):
            if not bool(torch.isfinite(gram.inner).all()):
                raise InvalidUpdateError("Gram matrix has non-finite off-diagonal entries", sender=None)
            return self.decide_gram(gram, w, context=context or {})
        bad = tuple(ids[i] for i in (~ok).nonzero().flatten().tolist())
        keep = ok.nonzero().flatten()
        if keep.numel() == 0:
            raise InvalidUpdateError(f"every update has a non-finite Gram row (clients {list(bad)})", sender=bad[0])
        sub = gram.subset(keep.tolist())
        if not bool(torch.isfinite(sub.inner).all()):
            raise InvalidUpdateError("Gram matrix has non-finite off-diagonal entries", sender=None)
        ctx = dict(context or {})
        ctx[NONFINITE_KEY] = bad
        res = self.decide_gram(sub, w[keep], context=ctx)
        _expand(res, ids, keep, bad)
        return res

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        """Rule hook behind ``aggregate_gram``: ``gram`` holds finite rows only.

        Gram-capable rules override this and return ``aggregate=None`` and ``weights``, the
        coefficients to apply to the clients' (encrypted) updates.
        """
        raise ConfigError(f"{self!r} needs every client's coordinates; it cannot run on a Gram matrix")

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        """Why this configuration provably outputs the plain mean of ``n`` inputs, or None.

        Rules override this (or ``register_mean_condition`` declares it); the base class
        consults the registered conditions and otherwise claims nothing.
        """
        for cls in type(self).__mro__:
            cond = _MEAN_CONDITIONS.get(cls)
            if cond is not None:
                return cond(self, n, context)
        return None

    def warn_if_mean(self, n: int, context: Mapping[str, Any], reason: str | None = None) -> None:
        """Warn once per instance when the rule computes nothing but the mean."""
        if self.is_weighted_mean or getattr(self, "_mean_warned", False):
            return
        try:
            reason = reason or self.reduces_to_mean(n, context)
        except ConfigError:
            return  # e.g. f unresolved: the rule itself raises the clear error
        if reason:
            object.__setattr__(self, "_mean_warned", True)
            warnings.warn(f"{self!r} reduces to the plain mean: {reason}", MeanEquivalenceWarning, stacklevel=3)

    def __rshift__(self, other: Defense) -> Defense:
        if not isinstance(self, PreAggregator):
            raise ConfigError(f"only a pre-aggregator can be composed before a rule, not {self!r}")
        return Composed(self, other)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "runs_on")
        return f"{type(self).__name__}({params})"


class PreAggregator(Defense):
    """A transform applied before a rule (NNM, Bucketing, clipping, ARC).

    A *linear* pre-aggregator (every one in this package) produces rows ``M @ updates`` for a
    mixing matrix ``M`` it reports through ``transform_with_mixing``; then the composed rule's
    row weights map back to per-client coefficients ``M.T @ w`` and the composition can also
    run on a Gram matrix (``transform_gram``: the mixed Gram is ``M G M.T``).
    """

    #: False when every output row is one client's update rescaled (no combining)
    mixes: bool = True

    def transform_with_mixing(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], torch.Tensor | None]:
        """``transform`` plus the ``[k, n]`` float64 mixing matrix, or None if not linear."""
        x, w, ids = self.transform(updates, weights, client_ids, context=context)
        return x, w, ids, None

    def transform_gram(
        self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, Gram, torch.Tensor]:
        """Return the mixing matrix ``M``, the Gram of the mixed rows and their weights."""
        raise ConfigError(f"{self!r} cannot run on a Gram matrix")

    @abstractmethod
    def transform(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Return new rows (and their weights/ids) for the downstream rule."""

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        x, w, ids, mixing = self.transform_with_mixing(updates, weights, client_ids, context=context)
        row_w = w / w.sum()
        agg = (row_w.to(x.device)[:, None] * x.to(torch.float64)).sum(0)
        coeffs = row_w if mixing is None else mixing.T @ row_w
        return AggregationResult(agg.to(updates.dtype), client_ids if mixing is not None else ids, weights=coeffs)

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        if type(self).transform_gram is PreAggregator.transform_gram:
            return super().decide_gram(gram, weights, context=context)
        mixing, _, w = self.transform_gram(gram, weights, context=context)
        return AggregationResult(None, gram.client_ids, weights=mixing.T @ (w / w.sum()))


class Composed(Defense):
    """``pre >> rule``: the rule runs on what the pre-aggregator produced."""

    def __init__(self, pre: PreAggregator, rule: Defense) -> None:
        self.pre = pre
        self.rule = rule
        self.runs_on = pre.runs_on & rule.runs_on
        self.name = f"{pre.name}>>{rule.name}"
        self.needs_reference = pre.needs_reference or rule.needs_reference
        self.selects = None if getattr(pre, "mixes", True) else rule.selects

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        x, w, ids, mixing = self.pre.transform_with_mixing(updates, weights, client_ids, context=context)
        res = self.rule.aggregate(x, w, ids, context=context)
        return self._lift(res, client_ids, ids, mixing)

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        mixing, mixed, w = self.pre.transform_gram(gram, weights, context=context)
        res = self.rule.decide_gram(mixed, w, context=context)
        return self._lift(res, gram.client_ids, mixed.client_ids, mixing)

    def reduces_to_mean(self, n: int, context: Mapping[str, Any]) -> str | None:
        reason = self.pre.reduces_to_mean(n, context)
        if reason and getattr(self.pre, "mixes_to_mean", False):
            return f"{self.pre.name}: {reason} (every row it passes on is the mean)"
        if reason:  # the pre-aggregator is the identity: the rule decides
            rule_reason = self.rule.is_weighted_mean and "the rule is the mean" or self.rule.reduces_to_mean(n, context)
            return f"{self.pre.name}: {reason}; {self.rule.name}: {rule_reason}" if rule_reason else None
        return None

    @staticmethod
    def _lift(
        res: AggregationResult, client_ids: tuple[int, ...], row_ids: tuple[int, ...], mixing: torch.Tensor | None
    ) -> AggregationResult:
        """Express a rule's result on the pre-aggregated rows in terms of the clients."""
        res.info["pre_aggregated_ids"] = row_ids
        if res.weights is not None and (mixing is not None or row_ids != client_ids):
            res.info["row_weights"] = res.weights
            res.weights = None if mixing is None else mixing.to(res.weights.device, torch.float64).T @ res.weights.to(
                torch.float64
            )
        if row_ids != client_ids:
            res.info["row_scores"] = res.scores
            res.scores = None
        if not set(row_ids) <= set(client_ids):
            res.info["flagged_rows"] = res.flagged
            res.flagged = ()
            res.info["suspected_rows"] = res.suspected
            res.suspected = ()
        res.client_ids = client_ids
        return res

    def state_dict(self) -> dict[str, Any]:
        return {"pre": self.pre.state_dict(), "rule": self.rule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pre.load_state_dict(state.get("pre", {}))
        self.rule.load_state_dict(state.get("rule", {}))

    def __repr__(self) -> str:
        return f"{self.pre!r} >> {self.rule!r}"
