"""One interface for robust aggregation rules, pre-aggregators and detectors.

A rule takes the ``[n, d]`` updates (optional weights) and returns an ``AggregationResult``.
Rules that need only geometry also implement ``aggregate_gram``: given a ``Gram`` they return
the weights to apply to the (encrypted) updates.  ``runs_on`` declares what a rule needs to
see, so a protocol can refuse a rule it cannot serve (DESIGN.md, robust aggregation under
secrecy) instead of silently skipping it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from securefml.errors import ConfigError
from securefml.gram import Gram
from securefml.protocols.base import Reveals

__all__ = ["AggregationResult", "Defense", "PreAggregator", "Composed", "prepare_inputs"]


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
        Client ids the rule considers Byzantine (excluded or down-weighted).
    client_ids:
        The ids the rows referred to, in order.
    """

    aggregate: torch.Tensor | None
    client_ids: tuple[int, ...]
    weights: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    flagged: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


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
    if weights is None:
        w = torch.ones(n, dtype=torch.float64, device=x.device)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64, device=x.device).reshape(-1)
        if w.numel() != n or (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
            raise ConfigError("weights must be n finite non-negative numbers with a positive sum")
    ids = tuple(range(n)) if client_ids is None else tuple(int(c) for c in client_ids)
    if len(ids) != n:
        raise ConfigError(f"{len(ids)} client ids for {n} updates")
    return x, w, ids


class Defense(ABC):
    """Base class of every aggregation rule.

    Subclasses validate hyper-parameters once in ``__init__`` and implement ``aggregate``.
    """

    runs_on: frozenset[str] = frozenset({Reveals.UPDATES, Reveals.BUCKETS})
    name: str = "defense"

    def __call__(
        self,
        updates: torch.Tensor | Sequence[torch.Tensor],
        weights: torch.Tensor | Sequence[float] | None = None,
        *,
        client_ids: Sequence[int] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> AggregationResult:
        x, w, ids = prepare_inputs(updates, weights, client_ids)
        return self.aggregate(x, w, ids, context=context or {})

    @abstractmethod
    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        """Aggregate validated ``[n, d]`` updates with normalised inputs."""

    def aggregate_gram(
        self, gram: Gram, weights: torch.Tensor | None = None, *, context: Mapping[str, Any] | None = None
    ) -> AggregationResult:
        """Decide per-client weights from geometry only (for encrypted updates)."""
        raise ConfigError(f"{self!r} needs every client's coordinates; it cannot run on a Gram matrix")

    def __rshift__(self, other: Defense) -> Defense:
        if not isinstance(self, PreAggregator):
            raise ConfigError(f"only a pre-aggregator can be composed before a rule, not {self!r}")
        return Composed(self, other)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class PreAggregator(Defense):
    """A transform applied before a rule (NNM, Bucketing, clipping, ARC)."""

    @abstractmethod
    def transform(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Return new rows (and their weights/ids) for the downstream rule."""

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        x, w, ids = self.transform(updates, weights, client_ids, context=context)
        agg = (w[:, None] * x.to(torch.float64)).sum(0) / w.sum()
        return AggregationResult(agg.to(updates.dtype), ids, weights=w / w.sum())


class Composed(Defense):
    """``pre >> rule``: the rule runs on what the pre-aggregator produced."""

    def __init__(self, pre: PreAggregator, rule: Defense) -> None:
        self.pre = pre
        self.rule = rule
        self.runs_on = pre.runs_on & rule.runs_on
        self.name = f"{pre.name}>>{rule.name}"

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        x, w, ids = self.pre.transform(updates, weights, client_ids, context=context)
        res = self.rule.aggregate(x, w, ids, context=context)
        res.client_ids = client_ids
        res.info["pre_aggregated_ids"] = ids
        return res

    def __repr__(self) -> str:
        return f"{self.pre!r} >> {self.rule!r}"
