"""Grouping clients by relevance into groups of at least a minimum size (for SecAgg+).

SecAgg+ reveals only sums.  To personalize under it, the server partitions the cohort into
groups of related clients, each group is securely summed, and every member receives its
group's mean.  Declared leakage: group membership and group sums.  A group must hold at least
``min_size`` clients so that a member learns the sum of at least ``min_size - 1`` others.

Algorithm: size-constrained average-linkage agglomeration on the similarity matrix.  Start
from singletons; while some group is smaller than ``min_size``, merge the undersized group and
the other group with the highest average pairwise similarity (ties broken by the smallest
client positions, so the result does not depend on input order beyond ties).  Groups that are
already large enough are never merged with each other, so well-separated tasks stay apart.
"""

from __future__ import annotations

import torch

from securefml.errors import ConfigError

__all__ = ["relevance_groups"]


def relevance_groups(similarity: torch.Tensor, min_size: int) -> list[tuple[int, ...]]:
    """Partition positions ``0..n-1`` into groups of size >= ``min_size`` (one group if n < min_size).

    Returns groups as sorted tuples of positions, ordered by their smallest member.
    """
    s = similarity.to(torch.float64)
    n = s.shape[0]
    if s.shape != (n, n):
        raise ConfigError(f"similarity must be square, got {tuple(s.shape)}")
    if min_size < 1:
        raise ConfigError(f"min_size must be >= 1, got {min_size}")
    if n == 0:
        return []
    if n < 2 * min_size:
        return [tuple(range(n))]
    groups: list[list[int]] = [[i] for i in range(n)]
    while len(groups) > 1 and any(len(g) < min_size for g in groups):
        best: tuple[float, int, int] | None = None
        for a, ga in enumerate(groups):
            if len(ga) >= min_size:
                continue
            for b, gb in enumerate(groups):
                if a == b:
                    continue
                link = float(s[ga][:, gb].mean())
                key = (link, -min(ga + gb), -max(min(ga), min(gb)))
                if best is None or key > (best[0], -min(groups[best[1]] + groups[best[2]]),
                                          -max(min(groups[best[1]]), min(groups[best[2]]))):
                    best = (link, a, b)
        assert best is not None
        _, a, b = best
        merged = sorted(groups[a] + groups[b])
        groups = [g for k, g in enumerate(groups) if k not in (a, b)] + [merged]
    return sorted((tuple(g) for g in groups), key=lambda g: g[0])
