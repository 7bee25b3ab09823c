"""Run a coordinate-wise rule on what bucketed secure aggregation reveals: bucket sums.

Under SecAgg in bucketed mode the server learns, for each random bucket of clients, only the
(securely summed) weighted sum of their updates and the bucket's total weight.  A
coordinate-wise rule (TrimmedMean, CoordinateMedian, Bulyan, ...) then runs on the bucket
means, exactly as ``Bucketing(size) >> rule`` does in plaintext with the same partition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense
from securefml.errors import ConfigError
from securefml.reveals import Reveals

__all__ = ["aggregate_buckets"]


def aggregate_buckets(
    defense: Defense,
    sums: torch.Tensor,
    totals: Sequence[float] | torch.Tensor,
    members: Sequence[Sequence[int]],
    *,
    context: Mapping[str, Any] | None = None,
) -> AggregationResult:
    """Run ``defense`` on bucket means and express the result per client.

    Parameters
    ----------
    defense:
        A rule whose ``runs_on`` includes ``Reveals.BUCKETS``; otherwise ``ConfigError``.
    sums:
        ``[k, d]`` weighted sum of each bucket's updates (what the secure sum reveals).
    totals:
        ``[k]`` total client weight of each bucket (positive).
    members:
        The client ids in each bucket (public: derived from the round's public seed).
    context:
        Passed to the rule.

    Returns
    -------
    AggregationResult
        ``client_ids`` are the clients (bucket order).  The rule's row weights, if any, are in
        ``info["bucket_weights"]``; its flags name buckets, so they are reported in
        ``flagged_buckets`` (bucket indices) and ``flagged`` is empty: a bucket flag
        does not say which of its members misbehaved.
    """
    if Reveals.BUCKETS not in defense.runs_on:
        raise ConfigError(f"defense {defense!r} cannot run on bucket sums; it needs one of {sorted(defense.runs_on)}")
    k = sums.shape[0]
    t = torch.as_tensor(totals, dtype=torch.float64).reshape(-1)
    if t.numel() != k or len(members) != k or k == 0:
        raise ConfigError(f"{k} bucket sums, {t.numel()} totals and {len(members)} member lists must agree (k > 0)")
    if not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
        raise ConfigError("bucket totals must be positive and finite")
    means = (sums.to(torch.float64) / t.to(sums.device)[:, None]).to(sums.dtype)
    bucket_ids = tuple(-(b + 1) for b in range(k))
    res = defense(means, t, client_ids=bucket_ids, context=context)
    clients = tuple(int(c) for mem in members for c in mem)
    info = dict(res.info)
    info["buckets"] = tuple(tuple(int(c) for c in mem) for mem in members)
    if res.weights is not None:
        info["bucket_weights"] = res.weights
    return AggregationResult(res.aggregate, clients, weights=None, scores=None, flagged=(), info=info,
                             flagged_buckets=tuple(-c - 1 for c in res.flagged))
