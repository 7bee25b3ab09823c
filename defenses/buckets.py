"""Run a rule on what bucketed secure aggregation reveals: bucket sums and bucket membership.

Under SecAgg in bucketed mode the server learns, for each random bucket of clients, only the
(securely summed) weighted sum of their updates and the bucket's total weight, plus *which*
clients each bucket holds: the partition is derived from public round data
(``protocols/secagg.py``, "Bucketed mode"), so membership is declared leakage, not a secret.
A coordinate-wise or geometric rule (TrimmedMean, CoordinateMedian, CClip, ...) then runs on
the bucket means, exactly as ``Bucketing(size) >> rule`` does in plaintext with the same
partition.

A rule that also uses the membership (``BucketAware``, e.g. ``BucketReputation``, which
attributes each bucket's disagreement to its members across rounds) receives it as a typed
``BucketMembership`` value, not through an info dict.  It sees nothing beyond the bucket sums,
the bucket totals and the membership: the same values every other rule on this path sees.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from securefml.defenses.base import AggregationResult, Defense
from securefml.errors import ConfigError
from securefml.reveals import Reveals

__all__ = ["BucketMembership", "BucketAware", "aggregate_buckets"]


@dataclass(frozen=True)
class BucketMembership:
    """Which clients each revealed bucket sum covers (public: from the round's public seed).

    Attributes
    ----------
    members:
        ``members[b]`` are the client ids summed in bucket ``b`` (bucket order as revealed).
        Non-empty buckets; no client in two buckets.
    """

    members: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.members or any(len(m) == 0 for m in self.members):
            raise ConfigError(f"bucket membership needs at least one non-empty bucket, got {self.members!r}")
        seen: set[int] = set()
        for b, mem in enumerate(self.members):
            for c in mem:
                if isinstance(c, bool) or not isinstance(c, int):
                    raise ConfigError(f"bucket {b} holds a client id that is not an int: {c!r}")
                if c in seen:
                    raise ConfigError(f"client {c} is in two buckets (bucket {b} and an earlier one)")
                seen.add(c)

    @classmethod
    def of(cls, members: Sequence[Sequence[int]]) -> BucketMembership:
        """Build from any nested sequence of ids (converted to ints)."""
        return cls(tuple(tuple(int(c) for c in mem) for mem in members))

    @property
    def k(self) -> int:
        """Number of buckets."""
        return len(self.members)

    @property
    def clients(self) -> tuple[int, ...]:
        """Every member, in bucket order."""
        return tuple(c for mem in self.members for c in mem)


class BucketAware(Defense):
    """A rule that uses bucket membership besides the bucket means (``decide_buckets``).

    ``aggregate_buckets`` calls ``decide_buckets`` instead of running the rule on anonymous
    bucket rows.  Its result's ``client_ids`` are the members (bucket order), ``flagged`` may
    name clients (a decision derived from bucket sums and membership over rounds), and
    ``flagged_buckets`` the positions of the buckets left out this round.
    """

    @abstractmethod
    def decide_buckets(
        self, means: torch.Tensor, totals: torch.Tensor, membership: BucketMembership, *, context: Mapping[str, Any]
    ) -> AggregationResult:
        """Aggregate ``[k, d]`` bucket means with ``[k]`` positive totals and their membership."""


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
        does not say which of its members misbehaved.  A ``BucketAware`` rule gets the
        membership itself (``decide_buckets``) and may flag clients from evidence it pooled
        over rounds.
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
    membership = BucketMembership.of(members)
    if isinstance(defense, BucketAware):
        res = defense.decide_buckets(means, t, membership, context=context or {})
        res.info["buckets"] = membership.members
        return res
    bucket_ids = tuple(-(b + 1) for b in range(k))
    res = defense(means, t, client_ids=bucket_ids, context=context)
    info = dict(res.info)
    info["buckets"] = membership.members
    if res.weights is not None:
        info["bucket_weights"] = res.weights
    return AggregationResult(res.aggregate, membership.clients, weights=None, scores=None, flagged=(), info=info,
                             flagged_buckets=tuple(-c - 1 for c in res.flagged))
