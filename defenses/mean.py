"""The non-robust baseline: the (weighted) mean, at the memory floor.

One ``gemv`` in the updates' dtype (``weighted_mean``), with a documented and tested error
bound, and no separate pass looking for non-finite rows unless the result shows one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense, prepare_inputs
from securefml.defenses.registry import DEFENSES
from securefml.gram import Gram
from securefml.reveals import Reveals

__all__ = ["Mean", "weighted_mean", "MEAN_ERROR_FACTOR"]

#: ``weighted_mean`` on float32 rows is within ``(n + MEAN_ERROR_FACTOR) * 2**-24 * sum_i
#: |w_i x_i|`` of the exact weighted mean, coordinate by coordinate (see its docstring).
MEAN_ERROR_FACTOR = 2

_BLAS_DTYPES = (torch.float32, torch.float64)


def weighted_mean(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i w_i x_i / sum_i w_i`` as one matrix-vector product in x's dtype; and the weights.

    Why not float64: converting 100 x 10**6 float32 entries to float64 costs 25x the memory
    bound sum.  One ``gemv`` reads each entry once.  Accuracy (Higham, *Accuracy and
    Stability of Numerical Algorithms*, 2nd ed., section 3.1, any summation order, with or
    without FMA): with ``u`` the unit roundoff of x's dtype (``2**-24`` for float32) and the
    normalised weights rounded to that dtype, every output coordinate ``j`` satisfies
    ``|out_j - exact_j| <= (n + 2) u sum_i |w_i x_ij|`` (``gamma_n`` for the dot product,
    ``u`` for each rounded weight and ``u`` for the output); the test suite checks this
    bound on adversarial magnitudes.  Because the normalised weights sum to 1, no partial
    sum exceeds ``max |x_ij|`` in exact arithmetic, so nothing overflows that the inputs
    did not already nearly overflow.  float16/bfloat16 rows are accumulated in float64.
    """
    w = weights.to(device=x.device, dtype=torch.float64)
    w = w / w.sum()
    if x.dtype in _BLAS_DTYPES:
        return w.to(x.dtype) @ x, w
    return (w[:, None] * x.to(torch.float64)).sum(0).to(x.dtype), w


@DEFENSES.register("mean")
class Mean(Defense):
    """Weighted arithmetic mean (FedAvg, McMahan et al. 2017).

    Threat model: none; a single Byzantine client moves the mean arbitrarily far.  Runs
    under every protocol, including plain SecAgg where only the sum is revealed.
    """

    name = "mean"
    is_weighted_mean = True
    runs_on = frozenset({Reveals.UPDATES, Reveals.GRAM, Reveals.BUCKETS, Reveals.SUM})

    def __call__(
        self,
        updates: torch.Tensor | Sequence[torch.Tensor],
        weights: torch.Tensor | Sequence[float] | None = None,
        *,
        client_ids: Sequence[int] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> AggregationResult:
        """As ``Defense.__call__``, without its separate pass looking for non-finite rows.

        A NaN or Inf in a row with a positive weight makes the weighted sum non-finite at
        that coordinate, so a finite result proves every row finite; otherwise (or when a
        weight is 0, where a BLAS may skip the row) the generic path finds and excludes the
        non-finite rows.
        """
        x, w, ids = prepare_inputs(updates, weights, client_ids)
        if bool((w > 0).all()):
            agg, wn = weighted_mean(x, w)
            if bool(torch.isfinite(agg).all()):
                return AggregationResult(agg, ids, weights=wn)
        return super().__call__(x, w, client_ids=ids, context=context)

    def aggregate(
        self, updates: torch.Tensor, weights: torch.Tensor, client_ids: tuple[int, ...], *, context: Mapping[str, Any]
    ) -> AggregationResult:
        agg, w = weighted_mean(updates, weights)
        return AggregationResult(agg, client_ids, weights=w)

    def decide_gram(self, gram: Gram, weights: torch.Tensor, *, context: Mapping[str, Any]) -> AggregationResult:
        w = weights.to(torch.float64)
        return AggregationResult(None, gram.client_ids, weights=w / w.sum())
