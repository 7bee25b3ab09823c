"""The non-robust baseline: the (weighted) mean."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = ["Mean"]


class Mean(Defense):
    """Weighted arithmetic mean (FedAvg, McMahan et al. 2017).

    Threat model: none; a single Byzantine client moves the mean arbitrarily far.  Runs
    under every protocol, including plain SecAgg where only the sum is revealed.
    """

    name = "mean"
    is_weighted_mean = True
    runs_on = frozenset({Reveals.UPDATES, Reveals.GRAM, Reveals.BUCKETS, Reveals.SUM})

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        w = weights / weights.sum()
        agg = (w[:, None] * updates.to(torch.float64)).sum(0)
        return AggregationResult(agg.to(updates.dtype), client_ids, weights=w)

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        w = weights.to(torch.float64)
        return AggregationResult(None, gram.client_ids, weights=w / w.sum())
