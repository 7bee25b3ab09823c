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

``min_link`` (optional) changes the rule to average-linkage clustering with a threshold:
merge the two groups of highest average link while that link is at least ``min_link``,
whatever their sizes; a group that ends below ``min_size`` is a *fragment*, which the caller
must not sum (under ``RelevanceAggregation`` its members keep their own models for the
round: nothing about them is revealed and they learn nothing about anyone).  Why: a cohort is
a random sample, so a task cluster often has fewer than ``min_size`` members in a round, and
forcing them into the nearest *other* cluster hands every member of both a share of an
unrelated task (on ``digits-clusters``, seeds 10 and 11: 10-17 of about 110 groups per run
were mixed, 5-9 % of a member's aggregate came from another group); and stopping as soon as
every group reaches ``min_size`` splits one task cluster into several small groups, each
averaging fewer models than the cluster holds.
"""

from __future__ import annotations

import torch

from securefml.errors import ConfigError

__all__ = ["relevance_groups"]


def relevance_groups(similarity: torch.Tensor, min_size: int, *, min_link: float | None = None
                     ) -> list[tuple[int, ...]]:
    """Partition positions ``0..n-1`` into groups of size >= ``min_size``.

    Without ``min_link`` there is one group if ``n < 2 * min_size``, and every group reaches
    ``min_size``.  With ``min_link`` the groups are the threshold clusters and those below
    ``min_size`` are fragments (see the module docstring); the caller must not sum them.

    Returns groups as sorted tuples of positions, ordered by their smallest member.
    """
    s = similarity.to(torch.float64)
    n = s.shape[0]
    if s.shape != (n, n):
        raise ConfigError(f"similarity must be square, got {tuple(s.shape)}")
    if min_size < 1:
        raise ConfigError(f"min_size must be >= 1, got {min_size}")
    if min_link is not None and not -1.0 <= min_link <= 1.0:
        raise ConfigError(f"min_link is a cosine, it must lie in [-1, 1], got {min_link}")
    if n == 0:
        return []
    if n < 2 * min_size and min_link is None:
        return [tuple(range(n))]
    groups: list[list[int]] = [[i] for i in range(n)]
    while len(groups) > 1:
        best: tuple[tuple[float, int, int], int, int] | None = None
        for a, ga in enumerate(groups):
            if min_link is None and len(ga) >= min_size:
                continue  # size rule: only undersized groups look for a partner
            for b, gb in enumerate(groups):
                if a == b or (min_link is not None and b < a):
                    continue
                link = float(s[ga][:, gb].mean())
                if min_link is not None and link < min_link:
                    continue
                key = (link, -min(ga + gb), -max(min(ga), min(gb)))
                if best is None or key > best[0]:
                    best = (key, a, b)
        if best is None:  # size rule: nothing undersized; threshold rule: no pair linked enough
            break
        _, a, b = best
        merged = sorted(groups[a] + groups[b])
        groups = [g for k, g in enumerate(groups) if k not in (a, b)] + [merged]
    return sorted((tuple(g) for g in groups), key=lambda g: g[0])
